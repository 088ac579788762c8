"""Prompt files for render batches: JSONL, CSV or Parquet, one render per row.

Columns: id, prompt, negative_prompt, seed, width, height, frames, fps, steps, guidance, image
(an optional conditioning image for image-to-video, relative to the prompt file) and loras (a
list of `{"path": ..., "scale": 0.8}`, paths relative to the prompt file; in CSV the same list
as JSON text; a row without the column takes the batch's default LoRAs). Only `prompt`
is required. Every row is checked up front: a bad row is rejected with its row number and the
rule it broke, and the good rows still render. Rows are numbered from 1 in file order (JSONL:
the line number; CSV: the record after the header; Parquet: the table row).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from hlwq.quant.errors import HLWQError, InvalidOptionError, PromptFileError
from hlwq.store.lora_file import inspect_lora_file

COLUMNS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "frames", "fps", "steps",
           "guidance", "image", "loras")
# Defaults follow LTX-2.3's usual settings: 768x512, 121 frames (about 5 s at 24 fps).
DEFAULTS = {"negative_prompt": "", "seed": 0, "width": 768, "height": 512, "frames": 121,
            "fps": 24.0, "steps": 30, "guidance": 3.0, "image": None}
# The video VAE compresses 32x in space and 8x in time (plus the first frame).
SIDE_MULTIPLE = 32
FRAME_STEP = 8
DEFAULT_SUITE = Path(__file__).with_name("prompt_suite") / "v1.jsonl"  # the output gates' prompts
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Longer number literals are refused as they are read: no setting needs more digits, and
# Python refuses to convert integers of over 4,300 digits at all.
MAX_NUMBER_CHARS = 40
SHOWN_CHARS = 60   # of a bad value, in a message


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a render: its file, that file's sha256 (part of the render key) and scale."""

    path: str
    sha256: str
    scale: float = 1.0


@dataclass(frozen=True)
class RenderRequest:
    """One valid row: everything a render needs, with the image path resolved."""

    id: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    frames: int
    fps: float
    steps: int
    guidance: float
    image: str | None = None
    loras: tuple[LoraSpec, ...] = ()

    def __post_init__(self):
        # Rebuilt from to_dict() (task parameters travel as JSON): LoRAs come back as dicts.
        object.__setattr__(self, "loras", tuple(
            lora if isinstance(lora, LoraSpec) else LoraSpec(**lora) for lora in self.loras))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loras": [dataclasses.asdict(lora) for lora in self.loras]}

    @property
    def image_to_video(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class RejectedRow:
    row: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        name = f" ({self.id})" if self.id else ""
        return f"row {self.row}{name}: {self.reason}"


@dataclass(frozen=True)
class PromptBatch:
    path: Path
    requests: list[RenderRequest]
    rejected: list[RejectedRow]


class RowError(ValueError):
    """One rule a row breaks; becomes a RejectedRow."""


def load_prompts(path: str | Path, default_loras: list[dict[str, Any]] | None = None) -> PromptBatch:
    """Read and check a prompt file. Raises PromptFileError only when the file itself is unreadable.

    ``default_loras`` (``[{"path": ..., "scale": ...}]``, paths relative to the working
    directory) go to every row without a ``loras`` column; a bad one is an InvalidOptionError.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    try:
        defaults = _loras(default_loras or [], Path.cwd())
    except RowError as exc:
        raise InvalidOptionError(f"default LoRAs: {exc}") from None
    requests: list[RenderRequest] = []
    rejected: list[RejectedRow] = []
    seen_ids: set[str] = set()
    for row_number, row in _read_rows(path):
        raw_id = row.get("id")
        try:
            request = parse_row(row, row_number, base_dir=path.parent, default_loras=defaults)
            if request.id in seen_ids:
                raise RowError(f"id {request.id!r} repeats an earlier row")
        except RowError as exc:
            rejected.append(RejectedRow(row_number, str(raw_id) if _present(raw_id) else None, str(exc)))
            continue
        seen_ids.add(request.id)
        requests.append(request)
    return PromptBatch(path=path, requests=requests, rejected=rejected)


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    raise PromptFileError(f"prompt file {path}: unknown format {suffix!r} (use .jsonl, .csv or .parquet)")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = _read_text(path).splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as exc:
            row = {"__error__": f"not valid JSON ({exc.msg} at column {exc.colno})"}
        if not isinstance(row, dict):
            row = {"__error__": f"expected a JSON object, got {type(row).__name__}"}
        yield line_number, row


def _json_int(literal: str) -> int | str:
    """JSON integers; an over-long one stays text, for its column's check to name."""
    return int(literal) if len(literal) <= MAX_NUMBER_CHARS else literal


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(_read_text(path).splitlines())
    if not reader.fieldnames:
        raise PromptFileError(f"prompt file {path}: no header row")
    for row_number, row in enumerate(reader, start=1):
        extra = row.pop(None, None)  # values past the header's last column
        if extra:
            row["__error__"] = f"{len(extra)} more values than the header has columns"
        # An empty CSV cell means "use the default", like a missing JSON key.
        yield row_number, {key: value for key, value in row.items() if value not in ("", None)}


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PromptFileError(f"prompt file {path}: not a readable Parquet file ({exc})") from exc
    for row_number, row in enumerate(table.to_pylist(), start=1):
        yield row_number, {key: value for key, value in row.items() if value is not None}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompt file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_row(row: dict[str, Any], row_number: int, base_dir: Path,
              default_loras: tuple[LoraSpec, ...] = ()) -> RenderRequest:
    """Check one row against every rule and build its request; RowError names the first broken rule."""
    if "__error__" in row:
        raise RowError(row["__error__"])
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise RowError(f"unknown column(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(COLUMNS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError("missing prompt (a non-empty text is required)")
    values = {**DEFAULTS, **row}
    request = RenderRequest(
        id=_render_id(values.get("id"), row_number),
        prompt=prompt,
        negative_prompt=_text(values["negative_prompt"], "negative_prompt"),
        seed=_integer(values["seed"], "seed", minimum=0, maximum=2**63 - 1),
        width=_side(values["width"], "width"),
        height=_side(values["height"], "height"),
        frames=_frame_count(values["frames"]),
        fps=_number(values["fps"], "fps", minimum=0.0, exclusive=True),
        steps=_integer(values["steps"], "steps", minimum=1, maximum=1000),
        guidance=_number(values["guidance"], "guidance", minimum=0.0),
        image=_conditioning_image(values["image"], base_dir),
        loras=_loras(row["loras"], base_dir) if "loras" in row else default_loras,
    )
    return request


def _present(value: Any) -> bool:
    return value is not None and value != ""


def _render_id(value: Any, row_number: int) -> str:
    if not _present(value):
        return f"row-{row_number:04d}"
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not SAFE_ID.match(text):
        raise RowError(
            f"id {_shown(value)} is not a safe file name (letters, digits, '.', '_', '-'; up to 128, "
            "starting with a letter or digit)"
        )
    return text


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{column} must be text, got {_shown(value)}")
    return value


def _integer(value: Any, column: str, minimum: int, maximum: int) -> int:
    number = _to_number(value, column)
    if isinstance(number, float):
        if not number.is_integer():
            raise RowError(f"{column} must be a whole number, got {_shown(value)}")
        number = int(number)
    if not minimum <= number <= maximum:
        raise RowError(f"{column} must be between {minimum} and {maximum}, got {number}")
    return number


def _number(value: Any, column: str, minimum: float, exclusive: bool = False) -> float:
    number = float(_to_number(value, column))
    too_small = number <= minimum if exclusive else number < minimum
    if not math.isfinite(number) or too_small:
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise RowError(f"{column} must be a finite number {bound}, got {_shown(value)}")
    return number


def _to_number(value: Any, column: str) -> int | float:
    if isinstance(value, bool):
        raise RowError(f"{column} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and len(value.strip()) > MAX_NUMBER_CHARS:
        raise RowError(f"{column} has {len(value.strip())} characters; a number has at most "
                       f"{MAX_NUMBER_CHARS}")
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                pass
    raise RowError(f"{column} must be a number, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A bad value for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _side(value: Any, column: str) -> int:
    side = _integer(value, column, minimum=SIDE_MULTIPLE, maximum=8192)
    if side % SIDE_MULTIPLE:
        raise RowError(f"{column} must be a multiple of {SIDE_MULTIPLE}, got {side}")
    return side


def _frame_count(value: Any) -> int:
    frames = _integer(value, "frames", minimum=1, maximum=100_000)
    if frames % FRAME_STEP != 1:
        below = frames - (frames - 1) % FRAME_STEP
        raise RowError(f"frames must be 8k+1 (e.g. {below} or {below + FRAME_STEP}), got {frames}")
    return frames


def _conditioning_image(value: Any, base_dir: Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"image must be a file path, got {_shown(value)}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file: truncated or corrupt images fail here
    except (OSError, SyntaxError, ValueError) as exc:
        raise RowError(f"image {value!r} is not a readable image ({type(exc).__name__}: {exc})") from None
    return str(path.resolve())


def _loras(value: Any, base_dir: Path) -> tuple[LoraSpec, ...]:
    """A list of ``{"path", "scale"}`` objects (JSON text in CSV); each file checked and hashed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"loras must be a JSON list of {{\"path\", \"scale\"}} objects "
                           f"({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, list):
        raise RowError(f"loras must be a list of {{\"path\", \"scale\"}} objects, got {value!r}")
    specs: list[LoraSpec] = []
    for index, item in enumerate(value):
        where = f"loras[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise RowError(f"{where} must be an object with a file path under \"path\", got {item!r}")
        if unknown := sorted(set(item) - {"path", "scale"}):
            raise RowError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                           "allowed: path, scale")
        scale = _number(item.get("scale", 1.0), f"{where}.scale", minimum=-math.inf)
        path = Path(item["path"]).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            lora = inspect_lora_file(path)
        except HLWQError as exc:
            raise RowError(f"{where}: {exc}") from None
        if any(spec.sha256 == lora.sha256 for spec in specs):
            raise RowError(f"{where}: {item['path']!r} repeats an earlier LoRA of the row "
                           "(give one entry its combined scale)")
        specs.append(LoraSpec(str(path.resolve()), lora.sha256, scale))
    return tuple(specs)


def lora_option(text: str) -> dict[str, Any]:
    """A command-line / environment LoRA, ``PATH`` or ``PATH:SCALE``, as ``{"path", "scale"}``."""
    path, separator, scale = text.rpartition(":")
    if separator and path:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass            # the ':' belongs to the path
    if not text:
        raise InvalidOptionError("LoRA option is empty; expected PATH or PATH:SCALE")
    return {"path": text, "scale": 1.0}


def request_key(request: RenderRequest, artifact_id: str) -> str:
    """Content key of a render: same key, same video. Covers every parameter, the image bytes,
    each LoRA's bytes (sha256) and scale, and the model."""
    fields = request.to_dict()
    if request.image is not None:
        fields["image"] = hashlib.sha256(Path(request.image).read_bytes()).hexdigest()
    fields.pop("loras")      # keys of renders without LoRAs stay what they were before LoRAs
    if request.loras:
        fields["loras"] = [[lora.sha256, lora.scale] for lora in request.loras]
    fields["artifact_id"] = artifact_id
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
