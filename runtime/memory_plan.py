"""Peak accelerator memory of an LTX-2.3 render, per offload mode and per stage.

Each prediction is the weights resident during the stage plus an activation estimate:

=============  ===================================  =======================================
stage          components                           activation estimate (dtype bytes b)
=============  ===================================  =======================================
text_encoding  text_encoder, connectors             the prompts' stacked Gemma hidden states
                                                    and their guidance concatenation,
                                                    ``2 B L d (n + 1)``, or the last
                                                    prompt's forward, ``B L d (n + 1) + 4 L d
                                                    + 2 L f + (h + 1) L^2``, the larger
denoising      transformer                          one block's working set per token for
                                                    both streams and per prompt token,
                                                    ``B (k N D + k_t L D)``, plus the
                                                    PackedLinear decode workspace
vae_decode     vae                                  the decoder's full-resolution stage,
                                                    ``k T (H/p) (W/p) C``, per tile when
                                                    tiling (at small sizes a floor of a few
                                                    conv weights), plus the video in fp32
audio_decode   audio_vae, vocoder                   ``k`` copies of the widest stage of the
                                                    vocoder's two generators (16 kHz, then
                                                    the bandwidth extension to 48 kHz)
=============  ===================================  =======================================

``B`` is 2 with classifier-free guidance, ``L`` the prompt length (1024 tokens, as
LTX2Pipeline pads), ``N`` the video or audio tokens. Weights resident per mode: ``none`` every
component; ``model`` the stage's largest component; ``group`` a component's tensors outside its
numbered blocks plus two blocks (the one running and the one prefetched on a side stream);
``sequential`` two of the largest tensors. The coefficients ``k`` come from peaks measured on
the CPU at LTX-2.3's real widths (benchmarks/memory_plan_check.py, recorded with the tiny
fixture's in benchmarks/results/memory-plan.json); the plan itself is a pure function of the
component configs, the weights' sizes and the render's shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hlwq.quant.errors import InvalidOptionError

MODES = ("none", "model", "sequential", "group")
AUTO_ORDER = ("none", "model", "group", "sequential")     # fastest first: what auto tries
STAGES = {"text_encoding": ("text_encoder", "connectors"), "denoising": ("transformer",),
          "vae_decode": ("vae",), "audio_decode": ("audio_vae", "vocoder")}
# CUDA context, cuBLAS workspaces and allocator fragmentation the plan does not model.
DEVICE_RESERVE_BYTES = 1 << 30
PROMPT_TOKENS = 1024
BLOCK_KEY = re.compile(r"^(.*?\.\d+)\.")        # "transformer_blocks.7.attn1..." -> block 7
DECODE_WORKSPACE_ELEMENTS = 1 << 24             # runtime.packed_linear.CHUNK_ELEMENTS
# Width-sized rows alive per token while a transformer block runs (attention, gates, the 4x
# FFN, the residual streams) and per prompt token (the context, its cross-attention keys and
# values); measured 17 and 7 on the real-width block (benchmarks/results/memory-plan.json).
TOKEN_ROWS = 18
TEXT_ROWS = 8
TEXT_LAYER_ROWS = 4         # width-sized rows of one Gemma layer besides its MLP
# Full-resolution feature maps alive in the decoder's last stage (measured 2.7-2.8 on the real
# VAE), and the floor small decodes show: copies of the largest convolution weight (measured 4.1).
VAE_WORKING_SET = 3
VAE_FLOOR_WEIGHTS = 4
# copies of the widest vocoder stage (three resblocks stacked, 2x anti-aliasing); measured 15
# on the real vocoder
VOCODER_WORKING_SET = 18
DEFAULT_TILE = (16, 512, 512)   # frames, height, width of diffusers' LTX-2 VAE tiles


@dataclass(frozen=True)
class RenderShape:
    width: int = 768
    height: int = 512
    frames: int = 121
    fps: float = 24.0
    guidance: bool = True           # classifier-free guidance doubles the batch
    vae_tiling: bool = False
    dtype_bytes: int = 2            # bfloat16
    packed: bool = True             # PackedLinear layers decode into a shared workspace

    @property
    def batch(self) -> int:
        return 2 if self.guidance else 1

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def parse_resolution(text: str) -> tuple[int, int]:
    """"768x512" -> (768, 512): width by height."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match:
        raise InvalidOptionError(f"--resolution {text!r}: expected WIDTHxHEIGHT, e.g. 768x512")
    return int(match[1]), int(match[2])


# --------------------------------------------------------------------------- weights


def component_weights(rows: Iterable[Mapping]) -> dict[str, dict]:
    """Per component: total, largest tensor, bytes outside numbered blocks, largest block.

    ``rows`` carry ``component``, ``tensor`` and ``packed_bytes`` (the size the runtime holds:
    packed for quantized tensors, the stored dtype for kept ones)."""
    totals: dict[str, dict] = {}
    blocks: dict[tuple[str, str], int] = {}
    for row in rows:
        entry = totals.setdefault(row["component"], {"bytes": 0, "largest_tensor": 0,
                                                     "outside_blocks": 0, "largest_block": 0})
        size = int(row["packed_bytes"])
        entry["bytes"] += size
        entry["largest_tensor"] = max(entry["largest_tensor"], size)
        match = BLOCK_KEY.match(row["tensor"])
        if match:
            key = (row["component"], match[1])
            blocks[key] = blocks.get(key, 0) + size
        else:
            entry["outside_blocks"] += size
    for (component, _), size in blocks.items():
        totals[component]["largest_block"] = max(totals[component]["largest_block"], size)
    return totals


def resident_weights(weights: Mapping[str, dict], mode: str, stage: str) -> int:
    """Weights on the device while ``stage`` runs under ``mode``."""
    present = [weights[c] for c in STAGES[stage] if c in weights]
    if not present:
        return 0
    if mode == "none":
        return sum(weights[c]["bytes"] for c in pipeline_components(weights))
    if mode == "model":
        return max(w["bytes"] for w in present)
    if mode == "group":
        return max(w["outside_blocks"] + 2 * w["largest_block"] for w in present)
    return max(2 * w["largest_tensor"] for w in present)


def pipeline_components(weights: Mapping[str, dict]) -> list[str]:
    return [c for components in STAGES.values() for c in components if c in weights]


# --------------------------------------------------------------------------- activations


def activation_bytes(stage: str, shape: RenderShape, configs: Mapping[str, dict]) -> int:
    return {"text_encoding": _text_activations, "denoising": _denoising_activations,
            "vae_decode": _vae_activations, "audio_decode": _audio_activations}[stage](
        shape, configs)


def video_tokens(shape: RenderShape, vae: Mapping) -> int:
    spatial = vae.get("spatial_compression_ratio", 32)
    temporal = vae.get("temporal_compression_ratio", 8)
    return ((shape.frames - 1) // temporal + 1) * (shape.height // spatial) * (shape.width // spatial)


def audio_tokens(shape: RenderShape, audio_vae: Mapping) -> int:
    mel_frames = shape.seconds * audio_vae.get("sample_rate", 16000) / audio_vae.get(
        "mel_hop_length", 160)
    downsample = 2 ** (len(audio_vae.get("ch_mult", (1, 2, 4))) - 1)
    return math.ceil(mel_frames / downsample)


def _text_activations(shape: RenderShape, configs: Mapping[str, dict]) -> int:
    """LTX2Pipeline encodes the prompt and the negative prompt one at a time, keeps each one's
    stacked hidden states, then concatenates them for guidance. The peak is the larger of the
    concatenation (every prompt's stack, twice) and the last prompt's forward (the earlier
    prompts' stacks, its own hidden states, one layer's MLP and attention scores)."""
    text = configs["text_encoder"].get("text_config", configs["text_encoder"])
    d, f, n = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    stack = PROMPT_TOKENS * d * (n + 1)                 # one prompt's stacked hidden states
    concatenated = 2 * shape.batch * stack
    layer = (TEXT_LAYER_ROWS * PROMPT_TOKENS * d + 2 * PROMPT_TOKENS * f
             + (text["num_attention_heads"] + 1) * PROMPT_TOKENS ** 2)
    return shape.dtype_bytes * max(concatenated, shape.batch * stack + layer)


def _denoising_activations(shape: RenderShape, configs: Mapping[str, dict]) -> int:
    t = configs["transformer"]
    video_width = t["num_attention_heads"] * t["attention_head_dim"]
    audio_width = t["audio_num_attention_heads"] * t["audio_attention_head_dim"]
    video, audio = video_tokens(shape, configs["vae"]), audio_tokens(shape, configs["audio_vae"])
    rows = (TOKEN_ROWS * (video * video_width + audio * audio_width)
            + TEXT_ROWS * PROMPT_TOKENS * video_width)
    workspace = DECODE_WORKSPACE_ELEMENTS if shape.packed else 0
    return shape.dtype_bytes * (shape.batch * rows + workspace)


def _vae_activations(shape: RenderShape, configs: Mapping[str, dict]) -> int:
    """The decoder's full-resolution stage (per tile when tiling), or at small sizes its floor,
    copies of its largest 3x3x3 convolution weight; plus the decoded video in float32."""
    vae = configs["vae"]
    frames, height, width = shape.frames, shape.height, shape.width
    if shape.vae_tiling:
        frames, height, width = (min(a, b) for a, b in zip((frames, height, width), DEFAULT_TILE))
    patch = vae.get("patch_size", 4)
    channels = vae.get("decoder_block_out_channels", vae.get("block_out_channels"))
    feature_maps = VAE_WORKING_SET * frames * (height // patch) * (width // patch) * channels[0]
    floor = VAE_FLOOR_WEIGHTS * 27 * max(channels) ** 2
    video_fp32 = 4 * shape.frames * shape.height * shape.width * 3
    return shape.dtype_bytes * max(feature_maps, floor) + video_fp32


def _audio_activations(shape: RenderShape, configs: Mapping[str, dict]) -> int:
    """The widest stage of the vocoder's two generators: the 16 kHz one, then the bandwidth
    extension to 48 kHz (LTX2VocoderWithBWE), which runs on the mel of the first one's output."""
    vocoder, audio_vae = configs["vocoder"], configs["audio_vae"]
    mel_frames = math.ceil(shape.seconds * audio_vae.get("sample_rate", 16000)
                           / audio_vae.get("mel_hop_length", 160))
    factors = vocoder["upsample_factors"]
    widest = _widest_stage(mel_frames, vocoder["hidden_channels"], factors)
    if "bwe_hidden_channels" in vocoder:
        bwe_frames = math.ceil(mel_frames * math.prod(factors) / vocoder.get("hop_length", 80))
        widest = max(widest, _widest_stage(bwe_frames, vocoder["bwe_hidden_channels"],
                                           vocoder["bwe_upsample_factors"]))
    return shape.dtype_bytes * VOCODER_WORKING_SET * widest


def _widest_stage(frames: int, channels: int, factors: Iterable[int]) -> int:
    """Elements of a generator's largest stage: each upsamples time and halves the channels."""
    widest = 0
    for factor in factors:
        frames, channels = frames * factor, channels // 2
        widest = max(widest, frames * channels)
    return widest


# --------------------------------------------------------------------------- the plan


def memory_plan(weights: Mapping[str, dict], configs: Mapping[str, dict], shape: RenderShape,
                device_memory: int | None = None) -> dict:
    """``modes: {mode: {stages: [...], peak_bytes}}``, and with ``device_memory`` ``fits`` and
    ``recommended`` (the fastest mode that fits: none, model, group, then sequential)."""
    activations = {stage: activation_bytes(stage, shape, configs) for stage in STAGES}
    modes = {}
    for mode in MODES:
        stages = [{"name": stage, "weights_bytes": resident_weights(weights, mode, stage),
                   "activation_bytes": activations[stage]} for stage in STAGES]
        for stage in stages:
            stage["peak_bytes"] = stage["weights_bytes"] + stage["activation_bytes"]
        modes[mode] = {"stages": stages, "peak_bytes": max(s["peak_bytes"] for s in stages)}
    plan = {"resolution": f"{shape.width}x{shape.height}", "frames": shape.frames,
            "video_tokens": video_tokens(shape, configs["vae"]),
            "audio_tokens": audio_tokens(shape, configs["audio_vae"]),
            "batch": shape.batch, "vae_tiling": shape.vae_tiling,
            "dtype_bytes": shape.dtype_bytes, "modes": modes}
    if device_memory is not None:
        peaks = {mode: entry["peak_bytes"] for mode, entry in modes.items()}
        plan["device_memory_bytes"] = device_memory
        plan["reserve_bytes"] = DEVICE_RESERVE_BYTES
        plan["fits"] = {mode: fits(peaks[mode], device_memory) for mode in MODES}
        plan["recommended"] = first_fitting(peaks, device_memory)
    return plan


def fits(peak_bytes: int, memory_bytes: int) -> bool:
    """Whether a predicted peak fits ``memory_bytes`` with the reserve the plan does not model."""
    return peak_bytes + DEVICE_RESERVE_BYTES <= memory_bytes


def first_fitting(peaks: Mapping[str, int], memory_bytes: int) -> str | None:
    """The fastest mode (AUTO_ORDER) whose peak fits ``memory_bytes``; None when none does."""
    return next((mode for mode in AUTO_ORDER if fits(peaks[mode], memory_bytes)), None)


def render_peaks(weights: Mapping[str, dict], configs: Mapping[str, dict],
                 shapes: Iterable[RenderShape]) -> dict[str, int]:
    """Per mode, the highest predicted peak over the renders of ``shapes`` (one pipeline,
    placed once, renders them all)."""
    plans = [memory_plan(weights, configs, shape) for shape in shapes]
    if not plans:
        raise InvalidOptionError("memory plan: no render shape to predict")
    return {mode: max(plan["modes"][mode]["peak_bytes"] for plan in plans) for mode in MODES}


def artifact_peaks(path, shapes: Iterable[RenderShape]) -> dict[str, int]:
    """:func:`render_peaks` of a packed artifact (its manifest's sizes, its configs)."""
    return render_peaks(*artifact_inputs(path), shapes)


# --------------------------------------------------------------------------- inputs

CONFIG_COMPONENTS = ("transformer", "vae", "audio_vae", "vocoder", "text_encoder")


def artifact_inputs(path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(component weights, component configs) of a packed artifact, from its manifest."""
    from hlwq.store.artifact import read_manifest

    manifest = read_manifest(path)
    rows = [{"component": e["component"], "tensor": e["name"], "packed_bytes": e["packed_bytes"]}
            for e in manifest["tensors"].values()]
    return component_weights(rows), folder_configs(path)


def folder_configs(path) -> dict[str, dict]:
    """Component configs of a pipeline folder (artifact or checkpoint): ``<component>/config.json``,
    else the single file's ``config`` metadata, else the real LTX-2.3 configs."""
    import json
    from pathlib import Path

    from hlwq.runtime.ltx23_models import CONFIG_METADATA_KEY, find_single_file

    path = Path(path)
    single = find_single_file(path) if path.is_dir() else None
    stored = {}
    if single is not None:
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            stored = json.loads((handle.metadata() or {}).get(CONFIG_METADATA_KEY, "{}"))
    configs = layout_configs()
    for component in CONFIG_COMPONENTS:
        config_file = path / component / "config.json"
        if config_file.is_file():    # over the real config: keys a config leaves out
            configs[component] = {**configs[component], **json.loads(config_file.read_text())}
        elif isinstance(stored.get(component), dict):
            configs[component] = {**configs[component], **stored[component]}
    return configs


def layout_configs() -> dict[str, dict]:
    from hlwq.store.ltx23_config import real_config

    return {component: real_config(component) for component in CONFIG_COMPONENTS}
