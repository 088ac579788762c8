"""Synthetic LTX-2.3 checkpoints built from the real diffusers and transformers classes.

Two fixtures:

``make_tiny_ltx23(out_dir)`` writes a complete LTX-2.3-architecture pipeline that renders on a
CPU in seconds: the real configs of :mod:`hlwq.store.ltx23_config` with widths shrunk (every flag
and block count kept), a 2-layer Gemma 3 text encoder, a word-level tokenizer trained here, the
scheduler, and the spatial latent upsampler.

- default: a diffusers folder (``model_index.json``, one subfolder per component, plus
  ``latent_upsampler/``) that ``LTX2Pipeline.from_pretrained`` loads;
- ``single_file=True``: the official layout::

      ltx-2.3-tiny.safetensors
          model.diffusion_model.*       transformer, and the video/audio embeddings connectors
          text_embedding_projection.*   the connectors' input projections
          vae.*  audio_vae.*  vocoder.*
          metadata "config"             JSON: each component's diffusers config
      ltx-2.3-spatial-upscaler-x2-tiny.safetensors   latent upsampler, its config in metadata
      text_encoder/  tokenizer/  scheduler/           what the official file does not carry

  read back by :func:`load_tiny_pipeline` (diffusers' own ``from_single_file`` cannot read
  LTX-2.3 files; see :mod:`hlwq.runtime.ltx23_models`).

``make_real_width_transformer(out_dir, layers)`` writes the LTX-2.3 transformer at its real
width with ``layers`` blocks (``real_width_transformer(layers)`` builds the same model in memory) as ``out_dir/transformer/`` (``config.json``, sharded
``diffusion_pytorch_model-0000k-of-0000n.safetensors`` and their index) plus a
``model_index.json`` naming only the transformer. Each tensor is generated and streamed to
disk in chunks, so memory stays at one chunk whatever the size (48 layers: 38 GB).

Weights look trained rather than Gaussian: Student-t(5) values (heavy tails) scaled to
1/sqrt(fan_in), and in every linear weight a few input columns (one per 512, at least two)
eight times louder, the outlier channels that make quantization hard. Norm scales sit near 1,
biases near 0, VAE latent statistics are positive where they divide. Every tensor is drawn
from its own generator seeded by (seed, component/name): the same seed gives the same bytes.
Both writers are idempotent (a complete output is reused) and atomic (a partial output never
sits at the final path); the real-width writer resumes after an interruption shard by shard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.synthetic import TensorSpec, synthetic_chunks, synthetic_tensor
from hlwq.quant.video_metrics import mel_filterbank
from hlwq.runtime.ltx23_models import (
    build_model,
    checkpoint_tensors,
    load_latent_upsampler,
    load_ltx23_pipeline,
    save_component_file,
    save_single_file,
)
from hlwq.store.atomic import atomic_path, atomic_write_text, fsync_tree, replace_directory
from hlwq.store.ltx23_config import (
    PIPELINE_CLASSES,
    SCHEDULER,
    real_width_transformer_config,
    tiny_config,
)

FIXTURE_VERSION = 1
MARKER_FILE = "hlwq_fixture.json"
SINGLE_FILE_NAME = "ltx-2.3-tiny.safetensors"
UPSAMPLER_FILE_NAME = "ltx-2.3-spatial-upscaler-x2-tiny.safetensors"
DEFAULT_SHARD_BYTES = 2048 * 2**20  # 2 GiB

# --------------------------------------------------------------------------- synthetic values


def tensor_kind(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> str:
    """How a trained checkpoint's values for this tensor look (drives the synthetic draw)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        if attr == "latents_std":
            return "positive"
        if attr == "latents_mean":
            return "small"
        return "stft" if attr in ("forward_basis", "inverse_basis", "mel_basis") else "keep"
    if attr == "bias":
        return "bias"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    if tensor.ndim == 1 and attr == "weight":
        # Gemma's RMSNorm multiplies by (1 + weight); every other norm by weight.
        return "norm_offset" if "Gemma" in type(module).__name__ else "norm"
    return "table" if tensor.ndim >= 2 else "small"


def _stft_buffers(vocoder) -> dict[str, torch.Tensor]:
    """Real values for the BWE vocoder's STFT and mel buffers (zeros after construction)."""
    cfg = vocoder.config
    n_fft, n_freqs = cfg.filter_length, cfg.filter_length // 2 + 1
    window = torch.zeros(n_fft, dtype=torch.float64)
    offset = (n_fft - cfg.window_length) // 2
    window[offset:offset + cfg.window_length] = torch.hann_window(cfg.window_length, periodic=True,
                                                                  dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(torch.arange(n_freqs), torch.arange(n_fft)) / n_fft
    fourier = torch.cat([torch.cos(angle), -torch.sin(angle)])          # (2F, N)
    forward = (fourier * window)[:, None, :]
    inverse = (torch.linalg.pinv(fourier).T * window)[:, None, :]
    return {"mel_stft.stft_fn.forward_basis": forward, "mel_stft.stft_fn.inverse_basis": inverse,
            "mel_stft.mel_basis": mel_filterbank(cfg.num_mel_channels, n_fft,
                                                 cfg.input_sampling_rate, area_normalized=True)}


@torch.no_grad()
def fill_synthetic_(model: torch.nn.Module, component: str, seed: int) -> torch.nn.Module:
    """Overwrite every stored tensor of ``model`` with its synthetic trained-looking values."""
    stft = _stft_buffers(model) if hasattr(model, "mel_stft") else {}
    for name, tensor in checkpoint_tensors(model):
        kind = tensor_kind(model, name, tensor)
        if kind == "keep":
            continue
        spec = TensorSpec(f"{component}/{name}", name, tuple(tensor.shape), kind)
        tensor.copy_(stft[name] if kind == "stft" else synthetic_tensor(spec, seed))
    return model


# --------------------------------------------------------------------------- tiny pipeline

PROMPT_CORPUS = (
    "a red fox runs through fresh snow at dawn while birds call in the distance",
    "a woman in a yellow raincoat walks her dog along a busy city street in the rain",
    "close up of a chef slicing tomatoes on a wooden board with a sharp knife",
    "waves crash on black volcanic rocks under a grey sky and the wind howls",
    "a drummer plays a fast rhythm on a stage lit by blue and purple lights",
    "an old man laughs and talks to a friend on a park bench in autumn",
    "a cat jumps from a sofa onto a table and knocks over a glass of water",
    "time lapse of clouds moving over green mountains and a quiet lake",
    "a child blows out candles on a birthday cake and everyone claps and cheers",
    "a train crosses a steel bridge over a river as its horn sounds twice",
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>")


def build_tokenizer():
    """A word-level tokenizer trained here on a small prompt corpus, Gemma's special ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(PROMPT_CORPUS,
                                  trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left", model_max_length=1024)


def _tiny_text_encoder_config(tokenizer) -> dict:
    config = tiny_config("text_encoder")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config["text_config"].update(vocab_size=len(tokenizer), pad_token_id=ids["<pad>"],
                                 bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    config.update(boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                  image_token_index=ids["<image_soft_token>"])
    return config


def build_tiny_components(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Every component of the tiny LTX-2.3 pipeline, plus ``latent_upsampler``, in memory."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = build_tokenizer()
    configs = {c: tiny_config(c) for c in ("transformer", "connectors", "vae", "audio_vae",
                                           "vocoder", "latent_upsampler")}
    configs["text_encoder"] = _tiny_text_encoder_config(tokenizer)
    with torch.random.fork_rng():  # module init draws from the global RNG; spare the caller's
        models = {c: build_model(c, config) for c, config in configs.items()}
    for component, model in models.items():
        _cast(fill_synthetic_(model, component, seed), dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return {**models, "tokenizer": tokenizer, "scheduler": scheduler}


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(dtype) without diffusers' warning about fp32-only modules (LTX-2 has none)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return model.to(dtype)
    finally:
        logging.set_verbosity(level)


def make_tiny_ltx23(out_dir: str | os.PathLike, single_file: bool = False, seed: int = 0) -> Path:
    """Write the tiny LTX-2.3 pipeline to ``out_dir`` (see the module docstring for layouts)."""
    marker = {"fixture": "ltx23-tiny", "layout": "single-file" if single_file else "diffusers",
              "seed": seed, "version": FIXTURE_VERSION}
    out_dir = Path(out_dir)
    if _holds_fixture(out_dir, marker):
        return out_dir
    with _staging_dir(out_dir) as staging:
        components = build_tiny_components(seed)
        upsampler = components.pop("latent_upsampler")
        if single_file:
            _write_tiny_single_file(staging, components, upsampler)
        else:
            from diffusers import LTX2Pipeline
            LTX2Pipeline(**components).save_pretrained(staging, safe_serialization=True)
            upsampler.save_pretrained(staging / "latent_upsampler", safe_serialization=True)
        atomic_write_text(staging / MARKER_FILE, json.dumps(marker, indent=2))
    return out_dir


def _write_tiny_single_file(staging: Path, components: dict, upsampler) -> None:
    save_single_file(staging / SINGLE_FILE_NAME, components, model_version="2.3-tiny")
    save_component_file(staging / UPSAMPLER_FILE_NAME, upsampler, model_version="2.3-tiny")
    for part in ("text_encoder", "tokenizer", "scheduler"):
        components[part].save_pretrained(staging / part, safe_serialization=True)


def load_tiny_pipeline(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """LTX2Pipeline from either tiny layout (diffusers folder or single-file folder)."""
    return load_ltx23_pipeline(path, dtype=dtype)


def load_tiny_upsampler(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    return load_latent_upsampler(path, dtype=dtype)


# --------------------------------------------------------------------------- real width


def make_real_width_transformer(out_dir: str | os.PathLike, layers: int, seed: int = 0,
                                shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the real-width LTX-2.3 transformer with ``layers`` blocks (synthetic BF16)."""
    return make_transformer_checkpoint(out_dir, real_width_transformer_config(layers),
                                       seed=seed, shard_bytes=shard_bytes)


@torch.no_grad()
def real_width_transformer(layers: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The transformer ``make_real_width_transformer(out, layers, seed)`` writes, built in
    memory instead: the same BF16 values (cast to ``dtype``), without the disk round trip
    (1.6 GB per block written, then read back)."""
    model = build_model("transformer", real_width_transformer_config(layers), device="meta")
    model = model.to_empty(device="cpu")
    if dtype != torch.float32:
        model = model.to(dtype)
    for name, tensor in checkpoint_tensors(model):
        spec = TensorSpec(f"transformer/{name}", name, tuple(tensor.shape),
                          tensor_kind(model, name, tensor))
        start = 0
        for chunk in synthetic_chunks(spec, seed):     # BF16 on disk: round the same way
            tensor[start:start + len(chunk)].copy_(chunk.to(torch.bfloat16))
            start += len(chunk)
    return model.eval().requires_grad_(False)


def make_transformer_checkpoint(out_dir: str | os.PathLike, config: dict, seed: int = 0,
                                shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Stream a synthetic LTX2VideoTransformer3DModel of any config to ``out_dir/transformer``."""
    if shard_bytes < 1:
        raise InvalidOptionError(f"shard_bytes={shard_bytes}: must be positive")
    model = build_model("transformer", config, device="meta")
    specs = [TensorSpec(f"transformer/{name}", name, tuple(t.shape), tensor_kind(model, name, t))
             for name, t in checkpoint_tensors(model)]
    marker = {"fixture": "ltx23-transformer", "config": json.loads(model.to_json_string()),
              "seed": seed, "shard_bytes": shard_bytes, "version": FIXTURE_VERSION}
    marker["config"].pop("_diffusers_version", None)
    out_dir = Path(out_dir)
    if _holds_fixture(out_dir, marker):
        return out_dir
    with _staging_dir(out_dir, resumable=marker) as staging:
        folder = staging / "transformer"
        folder.mkdir(exist_ok=True)
        _write_shards(folder, _plan_shards(specs, shard_bytes), seed)
        atomic_write_text(folder / "config.json", model.to_json_string())
        atomic_write_text(staging / "model_index.json", _transformer_model_index())
        atomic_write_text(staging / MARKER_FILE, json.dumps(marker, indent=2))
    return out_dir


def _transformer_model_index() -> str:
    import diffusers

    index = {"_class_name": "LTX2Pipeline", "_diffusers_version": diffusers.__version__,
             "transformer": list(PIPELINE_CLASSES["transformer"])}
    return json.dumps(index, indent=2)


def _plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in model order: a shard closes when the next tensor would pass shard_bytes."""
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    return shards + [current] if current else shards


def _write_shards(folder: Path, shards: list[list[TensorSpec]], seed: int) -> None:
    total = len(shards)
    weight_map, total_size = {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"diffusion_pytorch_model-{number:05d}-of-{total:05d}.safetensors"
        header = safetensors_header([(s.name, s.shape, "BF16") for s in shard])
        data_size = sum(math.prod(s.shape) * 2 for s in shard)
        path = folder / file_name
        if not (path.is_file() and path.stat().st_size == len(header) + data_size):
            write_safetensors_stream(path, header, shard,
                                     lambda spec: synthetic_chunks(spec, seed))
        weight_map.update({s.name: file_name for s in shard})
        total_size += data_size
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    atomic_write_text(folder / "diffusion_pytorch_model.safetensors.index.json",
                      json.dumps(index, indent=2))


def safetensors_header(entries: Iterable[tuple[str, tuple[int, ...], str]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file holding ``entries`` in order."""
    from hlwq.quant.sizes import DTYPE_BYTES

    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def write_safetensors_stream(path: Path, header: bytes, specs: list[TensorSpec],
                             chunks_of: Callable[[TensorSpec], Iterable[torch.Tensor]]) -> None:
    """Write a BF16 safetensors file tensor by tensor, chunk by chunk (atomic)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(header)
        for spec in specs:
            written = 0
            for chunk in chunks_of(spec):
                data = chunk.to(torch.bfloat16).contiguous().reshape(-1).view(torch.uint8)
                handle.write(data.numpy())
                written += data.numel()
            if written != math.prod(spec.shape) * 2:
                raise InvalidOptionError(f"{path}: tensor {spec.name} produced {written} bytes, "
                                         f"expected {math.prod(spec.shape) * 2}")


# --------------------------------------------------------------------------- output handling


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _holds_fixture(out_dir: Path, marker: dict) -> bool:
    """True when out_dir holds this very fixture; raises if it holds anything else."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    found = _read_marker(out_dir)
    if found == marker:
        return True
    what = f"a different fixture ({found.get('fixture')}, seed {found.get('seed')})" if found \
        else "other files"
    raise InvalidOptionError(f"{out_dir}: already holds {what}; choose an empty or new directory")


class _staging_dir:
    """A sibling staging folder renamed onto ``out_dir`` on success.

    ``resumable``: keep the staging folder after a failure and reuse it next time when it was
    started for the same marker (the real-width writer skips shards already complete).
    """

    def __init__(self, out_dir: Path, resumable: dict | None = None):
        self.out_dir = out_dir
        self.resumable = resumable
        suffix = "partial" if resumable else f"partial-{os.getpid()}"
        self.path = out_dir.parent / f".{out_dir.name}.{suffix}"

    def __enter__(self) -> Path:
        if self.path.exists() and (not self.resumable or
                                   _read_marker(self.path / ".started") != self.resumable):
            shutil.rmtree(self.path)
        (self.path / ".started").mkdir(parents=True, exist_ok=True)
        if self.resumable:
            atomic_write_text(self.path / ".started" / MARKER_FILE, json.dumps(self.resumable))
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self.resumable:
                shutil.rmtree(self.path, ignore_errors=True)
            return
        shutil.rmtree(self.path / ".started")
        fsync_tree(self.path)
        replace_directory(self.path, self.out_dir)  # an existing out_dir is empty (_holds_fixture)
