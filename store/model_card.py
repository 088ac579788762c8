"""The generated model card (README.md) and the quality summary `hlwq inspect` shows too.

Everything comes from the manifest and the metrics table: sizes are the
manifest's (quant.sizes arithmetic, the same numbers `hlwq plan` prints),
quality is a distribution over quantized tensors, never a single average.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import PurePosixPath

import yaml

from hlwq.quant.sizes import format_bytes

WORST_SHOWN = 10
LIBRARY_NAME = "hlwq"
LICENSE_KEYS = ("license", "license_name", "license_link")
MODEL_FAMILIES = {"ltx23": "ltx-video"}   # bit-policy name prefix -> the family's Hub tag


def quality_summary(metrics) -> dict | None:
    """Worst, worst-1 % and median of per-tensor cosine and relative MSE, plus the worst tensors.

    ``metrics``: an Arrow table or row dicts with ``cosine`` and ``rel_mse``
    (``tensor``/``component`` name them). None when there are no metrics.
    """
    if metrics is None:
        return None
    rows = metrics.to_pylist() if hasattr(metrics, "to_pylist") else list(metrics)
    rows = [r for r in rows if r.get("cosine") is not None and r.get("rel_mse") is not None]
    if not rows:
        return None
    cosines = sorted(r["cosine"] for r in rows)
    errors = sorted(r["rel_mse"] for r in rows)
    worst = sorted(rows, key=lambda r: (-r["rel_mse"], r.get("component") or "", r.get("tensor") or ""))
    return {
        "tensors": len(rows),
        "cosine": {"worst": cosines[0], "worst_1pct": _rank(cosines, 0.01), "median": _median(cosines)},
        "rel_mse": {"worst": errors[-1], "worst_1pct": _rank(errors, 0.99), "median": _median(errors)},
        "worst_tensors": [{"component": r.get("component"), "tensor": r.get("tensor"),
                           "cosine": r["cosine"], "rel_mse": r["rel_mse"]}
                          for r in worst[:WORST_SHOWN]],
    }


def _rank(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ascending values."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _median(ordered: list[float]) -> float:
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def size_rows(manifest: dict) -> list[list[str]]:
    """Rows of the per-component size table, then the total."""
    sizes = manifest["sizes"]
    rows = []
    for name, c in sorted(sizes["components"].items()):
        rows.append([name, f"{c['tensors']:,}", f"{c.get('quantized_tensors', 0):,}",
                     f"{c['params']:,}", format_bytes(c["original_bytes"]),
                     format_bytes(c["packed_bytes"]), f"{c['bits_per_weight']:.3f}"])
    params = sum(c["params"] for c in sizes["components"].values())
    packed = sizes["total_packed_bytes"]
    rows.append(["**total**", f"{sum(c['tensors'] for c in sizes['components'].values()):,}",
                 f"{sizes['quantized_tensors']:,}", f"{params:,}",
                 format_bytes(sizes["total_original_bytes"]), format_bytes(packed),
                 f"{8 * packed / params:.3f}" if params else "0"])
    return rows


SIZE_HEADER = ["component", "tensors", "quantized", "parameters", "original", "packed",
               "bits/weight"]


def quality_rows(quality: dict) -> list[list[str]]:
    return [["cosine", f"{quality['cosine']['worst']:.6f}", f"{quality['cosine']['worst_1pct']:.6f}",
             f"{quality['cosine']['median']:.6f}"],
            ["relative MSE", f"{quality['rel_mse']['worst']:.3e}",
             f"{quality['rel_mse']['worst_1pct']:.3e}", f"{quality['rel_mse']['median']:.3e}"]]


QUALITY_HEADER = ["metric", "worst", "worst 1 %", "median"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_model_card(manifest: dict, quality: dict | None) -> str:
    source, settings = manifest["source"], manifest["quantization"]
    repo = source.get("repo")
    title = repo or PurePosixPath(str(source.get("source") or "checkpoint")).name
    bits = settings.get("bits")
    parts = [front_matter(manifest), f"# {title}: HLWQ Q{bits}" if bits else f"# {title}: HLWQ",
             _INTRO.format(format=manifest["format"], version=manifest["format_version"]),
             "## Sizes", markdown_table(SIZE_HEADER, size_rows(manifest)), _SIZE_NOTE,
             "## Quality"]
    if quality:
        intro = f"Per quantized tensor ({quality['tensors']:,} tensors), error against the source:"
        parts += [intro, markdown_table(QUALITY_HEADER, quality_rows(quality)),
                  "Worst tensors by relative MSE:",
                  markdown_table(["tensor", "component", "cosine", "relative MSE"],
                                 [[f"`{w['tensor']}`", str(w["component"]), f"{w['cosine']:.6f}",
                                   f"{w['rel_mse']:.3e}"] for w in quality["worst_tensors"]])]
    else:
        parts.append("No per-tensor metrics were recorded.")
    validated = manifest["validation"].get("validated")
    parts.append(f"Validation gates: **{'passed' if validated else 'not passed or skipped'}** "
                 "(details in `manifest.json`, `validation`).")
    parts += ["## Lineage", "\n".join(_lineage_lines(source, settings)),
              "## How to use", _USAGE]
    return "\n\n".join(parts) + "\n"


def front_matter(manifest: dict) -> str:
    """The card's Hub metadata: the base model (repo and commit, from the lineage) and that
    this is its quantization, the library, tags (hlwq, the model family, the bit widths the
    tensors use) and the source's license."""
    source = manifest["source"]
    metadata: dict = {"library_name": LIBRARY_NAME}
    if source.get("repo"):
        metadata |= {"base_model": [source["repo"]], "base_model_relation": "quantized"}
        if source.get("commit_sha"):
            metadata["base_model_revision"] = source["commit_sha"]
    metadata |= source.get("license") or {}
    family = model_family(manifest)
    bits = sorted({e["bits"] for e in manifest["tensors"].values() if e.get("action") == "quantize"})
    metadata["tags"] = ["hlwq", "quantized", *([family] if family else []),
                        *(f"{b}-bit" for b in bits)]
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---"


def model_family(manifest: dict) -> str | None:
    """The Hub tag of the quantized model's family, from the layout or the bit policy's name."""
    if manifest["source"].get("layout") == "ltx23-single":
        return MODEL_FAMILIES["ltx23"]
    policy = manifest["quantization"].get("policy")
    name = policy.get("name") if isinstance(policy, dict) else policy
    return next((tag for prefix, tag in MODEL_FAMILIES.items() if str(name).startswith(prefix)),
                None)


def card_license(card_text: str) -> dict | None:
    """The license fields of a model card's front matter (``license``, ``license_name``,
    ``license_link``); None when it declares none or its front matter does not parse."""
    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", card_text, re.DOTALL)
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    if not isinstance(metadata, dict):
        return None
    found = {key: metadata[key] for key in LICENSE_KEYS if isinstance(metadata.get(key), str)}
    return found or None


def _lineage_lines(source: dict, settings: dict) -> list[str]:
    name = source.get("source") or source.get("repo")
    lines = [f"- source: `{name}` ({source.get('kind')}), layout `{source['layout']}`"]
    if source.get("revision"):
        lines.append(f"- revision: `{source['revision']}`")
    if source.get("commit_sha"):
        lines.append(f"- {source.get('commit_sha_kind') or 'commit sha'}: `{source['commit_sha']}`")
    lines.append(f"- source files: {len(source.get('files', []))}, sha256 of each in "
                 "`manifest.json`")
    for key in sorted(settings):
        value = settings[key]
        shown = value if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)
        lines.append(f"- {key.replace('_', ' ')}: `{shown}`")
    return lines


_INTRO = ("Hadamard-Lloyd weight quantization (HLWQ) of the source checkpoint: the selected "
          "linear weights are stored as packed codes, block scales and a per-tensor codebook; "
          "every other tensor and file is kept exactly as in the source. "
          "Format: `{format}` version {version} (docs/FORMAT.md).")
_SIZE_NOTE = ("Bytes of tensor data computed from shapes, dtypes and bit widths (the same "
              "arithmetic `hlwq plan` prints); configs and tokenizer files are not counted.")
_USAGE = """With the `hlwq-pipeline` package installed:

```bash
hlwq verify .                      # hashes, shards and tensor entries
hlwq inspect .                     # size and quality tables
hlwq render --artifact . --prompts prompts.jsonl --out renders/
hlwq export-dequantized . ../bf16  # a plain checkpoint for other tools
```

```python
from hlwq.runtime.loader import load_pipeline
pipe = load_pipeline("path/to/this/artifact")   # packed weights stay packed
```"""
