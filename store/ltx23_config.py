"""The LTX-2.3 model family as data: real configs, tiny configs, and the official key names.

Sources of the real numbers (nothing here is downloaded; every value is written out):

- transformer, connectors, video VAE, audio VAE, vocoder, spatial latent upsampler:
  the ``version == "2.3"`` branches of diffusers' ``scripts/convert_ltx2_to_diffusers.py``
  (the config helpers it uses for ``Lightricks/LTX-2.3``), checked against the constructor
  signatures of diffusers 0.42.1 (``LTX2VideoTransformer3DModel``, ``LTX2TextConnectors``,
  ``AutoencoderKLLTX2Video``, ``AutoencoderKLLTX2Audio``, ``LTX2VocoderWithBWE``,
  ``LTX2LatentUpsamplerModel``). The video VAE's ``timestep_conditioning`` is a command-line
  switch of that script; LTX-2.3 is converted with the default (False).
- text encoder: Gemma 3 12B (``Gemma3ForConditionalGeneration``), the config published with
  ``google/gemma-3-12b-it`` that LTX-2.x loads (text: 48 layers, hidden 3840, MLP 15360,
  16 heads / 8 KV heads of 256, vocabulary 262,208, sliding window 1024, RoPE theta 1e6 with
  linear scaling x8 on the global layers and 1e4 on the local ones; vision: SigLIP,
  27 layers, hidden 1152, MLP 4304, 16 heads, 896 px, patch 14).
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with the LTX family's resolution-dependent
  shift (the same base/max shift and sequence lengths ``LTX2Pipeline`` falls back to).

The *tiny* configs keep every architecture flag and every block count of the real ones and
shrink only widths and depths, so key names and code paths are the real ones. Widths are
chosen so each of the 28 quantized linears of a transformer block has ``in_features`` a
multiple of 128 (video 2 heads x 128, audio 2 heads x 64: the real head sizes). Video and
audio keep equal head counts, as the real model must (its cross-modal RoPE assumes it).
LTX-2.3's connectors project the text encoder's stacked hidden states per modality
(``per_modality_projections``), so their widths equal the transformer's cross-attention
widths (256 / 128 here), and the text encoder's hidden size is only ``caption_channels``.

Official single-file names (``model.diffusion_model.*``, ``text_embedding_projection.*``,
``vae.*``, ``audio_vae.*``, ``vocoder.*``) map to (component, diffusers name) with
:func:`official_to_diffusers_key`; :func:`diffusers_to_official_key` is its inverse. The rules
are the renames of the conversion script above, written as one table per component.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

from hlwq.quant.errors import InvalidOptionError

# --------------------------------------------------------------------------- real configs

LTX23_TRANSFORMER: dict[str, Any] = {
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1,
    "num_attention_heads": 32, "attention_head_dim": 128, "cross_attention_dim": 4096,
    "vae_scale_factors": (8, 32, 32), "pos_embed_max_pos": 20,
    "base_height": 2048, "base_width": 2048,
    "gated_attn": True, "cross_attn_mod": True,
    "audio_in_channels": 128, "audio_out_channels": 128, "audio_patch_size": 1,
    "audio_patch_size_t": 1, "audio_num_attention_heads": 32, "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048, "audio_scale_factor": 4, "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000, "audio_hop_length": 160,
    "audio_gated_attn": True, "audio_cross_attn_mod": True,
    "num_layers": 48, "activation_fn": "gelu-approximate", "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 3840,
    "attention_bias": True, "attention_out_bias": True, "rope_theta": 10000.0,
    "rope_double_precision": True, "causal_offset": 1, "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000, "rope_type": "split",
    "use_prompt_embeddings": False, "perturbed_attn": True,
}

LTX23_CONNECTORS: dict[str, Any] = {
    "caption_channels": 3840, "text_proj_in_factor": 49,
    "video_connector_num_attention_heads": 32, "video_connector_attention_head_dim": 128,
    "video_connector_num_layers": 8, "video_connector_num_learnable_registers": 128,
    "video_gated_attn": True,
    "audio_connector_num_attention_heads": 32, "audio_connector_attention_head_dim": 64,
    "audio_connector_num_layers": 8, "audio_connector_num_learnable_registers": 128,
    "audio_gated_attn": True,
    "connector_rope_base_seq_len": 4096, "rope_theta": 10000.0, "rope_double_precision": True,
    "causal_temporal_positioning": False, "rope_type": "split",
    "per_modality_projections": True, "video_hidden_dim": 4096, "audio_hidden_dim": 2048,
    "proj_bias": True,
}

LTX23_VIDEO_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 1024),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 4,
    "decoder_block_out_channels": (256, 512, 512, 1024),
    "layers_per_block": (4, 6, 4, 2, 2), "decoder_layers_per_block": (4, 6, 4, 2, 2),
    "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True, True),
    "decoder_inject_noise": (False, False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
    "upsample_residual": (False, False, False, False), "upsample_factor": (2, 2, 1, 2),
    "timestep_conditioning": False, "patch_size": 4, "patch_size_t": 1,
    "resnet_norm_eps": 1e-6, "encoder_causal": True, "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "zeros",
    "spatial_compression_ratio": 32, "temporal_compression_ratio": 8,
}

LTX23_AUDIO_VAE: dict[str, Any] = {
    "base_channels": 128, "output_channels": 2, "ch_mult": (1, 2, 4), "num_res_blocks": 2,
    "attn_resolutions": None, "in_channels": 2, "resolution": 256, "latent_channels": 8,
    "norm_type": "pixel", "causality_axis": "height", "dropout": 0.0,
    "mid_block_add_attention": False, "sample_rate": 16000, "mel_hop_length": 160,
    "is_causal": True, "mel_bins": 64, "double_z": True,
}

LTX23_VOCODER: dict[str, Any] = {
    "in_channels": 128, "hidden_channels": 1536, "out_channels": 2,
    "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4], "upsample_factors": [5, 2, 2, 2, 2, 2],
    "resnet_kernel_sizes": [3, 7, 11], "resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "act_fn": "snakebeta", "leaky_relu_negative_slope": 0.1, "antialias": True,
    "antialias_ratio": 2, "antialias_kernel_size": 12, "final_act_fn": None, "final_bias": False,
    "bwe_in_channels": 128, "bwe_hidden_channels": 512, "bwe_out_channels": 2,
    "bwe_upsample_kernel_sizes": [12, 11, 4, 4, 4], "bwe_upsample_factors": [6, 5, 2, 2, 2],
    "bwe_resnet_kernel_sizes": [3, 7, 11],
    "bwe_resnet_dilations": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "bwe_act_fn": "snakebeta", "bwe_leaky_relu_negative_slope": 0.1, "bwe_antialias": True,
    "bwe_antialias_ratio": 2, "bwe_antialias_kernel_size": 12, "bwe_final_act_fn": None,
    "bwe_final_bias": False, "filter_length": 512, "hop_length": 80, "window_length": 512,
    "num_mel_channels": 64, "input_sampling_rate": 16000, "output_sampling_rate": 48000,
}

LTX23_LATENT_UPSAMPLER: dict[str, Any] = {
    "in_channels": 128, "mid_channels": 1024, "num_blocks_per_stage": 4, "dims": 3,
    "spatial_upsample": True, "temporal_upsample": False, "rational_spatial_scale": 2.0,
    "use_rational_resampler": False,
}

GEMMA3_12B_TEXT_ENCODER: dict[str, Any] = {
    "text_config": {
        "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "vocab_size": 262208, "sliding_window": 1024,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    },
    "vision_config": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
        "vision_use_head": False, "hidden_act": "gelu_pytorch_tanh",
    },
    "mm_tokens_per_image": 256, "boi_token_index": 255999, "eoi_token_index": 256000,
    "image_token_index": 262144, "tie_word_embeddings": True,
}

SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True,
    "base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024,
    "max_image_seq_len": 4096, "shift_terminal": 0.1,
}

# component -> (library, class): the model_index.json entries of a diffusers LTX-2.3 folder.
PIPELINE_CLASSES: dict[str, tuple[str, str]] = {
    "transformer": ("diffusers", "LTX2VideoTransformer3DModel"),
    "connectors": ("diffusers", "LTX2TextConnectors"),
    "vae": ("diffusers", "AutoencoderKLLTX2Video"),
    "audio_vae": ("diffusers", "AutoencoderKLLTX2Audio"),
    "vocoder": ("diffusers", "LTX2VocoderWithBWE"),
    "text_encoder": ("transformers", "Gemma3ForConditionalGeneration"),
    "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}
# Shipped beside the pipeline (its own file upstream), loaded by LTX2LatentUpsamplePipeline.
UPSAMPLER_CLASS = ("diffusers", "LTX2LatentUpsamplerModel")

REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": LTX23_TRANSFORMER, "connectors": LTX23_CONNECTORS, "vae": LTX23_VIDEO_VAE,
    "audio_vae": LTX23_AUDIO_VAE, "vocoder": LTX23_VOCODER,
    "latent_upsampler": LTX23_LATENT_UPSAMPLER, "text_encoder": GEMMA3_12B_TEXT_ENCODER,
}

# The 28 large linear weights of every transformer block: what the ltx23 bit policy quantizes.
BLOCK_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn",
                    "video_to_audio_attn")
BLOCK_LINEARS = tuple(f"{attn}.{proj}" for attn in BLOCK_ATTENTIONS
                      for proj in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
_BLOCK_LINEAR_NAMES = "|".join(re.escape(name) for name in BLOCK_LINEARS)
BLOCK_LINEAR_PATTERN = re.compile(rf"^transformer_blocks\.\d+\.(?:{_BLOCK_LINEAR_NAMES})\.weight$")

# --------------------------------------------------------------------------- tiny configs

TINY_TEXT_HIDDEN = 64
TINY_TEXT_LAYERS = 2
TINY_MEL_BINS = 16  # audio latent = 8 channels x 16/4 mel bins = 32 = audio VAE base channels

_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "transformer": {
        "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 128,
        "cross_attention_dim": 256, "audio_num_attention_heads": 2,
        "audio_attention_head_dim": 64, "audio_cross_attention_dim": 128,
        "audio_in_channels": 32, "audio_out_channels": 32, "caption_channels": TINY_TEXT_HIDDEN,
    },
    "connectors": {
        "caption_channels": TINY_TEXT_HIDDEN, "text_proj_in_factor": TINY_TEXT_LAYERS + 1,
        "video_connector_num_attention_heads": 2, "video_connector_num_layers": 1,
        "audio_connector_num_attention_heads": 2, "audio_connector_num_layers": 1,
        "video_hidden_dim": 256, "audio_hidden_dim": 128,
    },
    "vae": {
        "block_out_channels": (8, 16, 32, 32), "decoder_block_out_channels": (8, 16, 16, 32),
        "layers_per_block": (1, 1, 1, 1, 1), "decoder_layers_per_block": (1, 1, 1, 1, 1),
    },
    "audio_vae": {"base_channels": 32, "num_res_blocks": 1, "mel_bins": TINY_MEL_BINS},
    "vocoder": {
        "in_channels": 2 * TINY_MEL_BINS, "hidden_channels": 128,
        "bwe_in_channels": 2 * TINY_MEL_BINS, "bwe_hidden_channels": 64,
        "num_mel_channels": TINY_MEL_BINS,
    },
    "latent_upsampler": {"mid_channels": 64, "num_blocks_per_stage": 1},
}

TINY_GEMMA3 = {
    "text_config": {
        "hidden_size": TINY_TEXT_HIDDEN, "intermediate_size": 128,
        "num_hidden_layers": TINY_TEXT_LAYERS, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
        "sliding_window": 64, "max_position_embeddings": 1024,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "vision_use_head": False,
    },
    "mm_tokens_per_image": 4,
}


def real_config(component: str) -> dict[str, Any]:
    """A fresh copy of the real LTX-2.3 config of one component."""
    if component not in REAL_CONFIGS:
        raise InvalidOptionError(
            f"component {component!r}: unknown; expected one of {sorted(REAL_CONFIGS)}")
    return copy.deepcopy(REAL_CONFIGS[component])


def tiny_config(component: str) -> dict[str, Any]:
    """The real config of ``component`` with only sizes shrunk (flags and block counts kept)."""
    if component == "text_encoder":
        return copy.deepcopy(TINY_GEMMA3)
    return {**real_config(component), **copy.deepcopy(_TINY_OVERRIDES.get(component, {}))}


def real_width_transformer_config(num_layers: int) -> dict[str, Any]:
    """The real LTX-2.3 transformer config with ``num_layers`` blocks."""
    if num_layers < 1:
        raise InvalidOptionError(f"layers={num_layers}: must be at least 1")
    return {**real_config("transformer"), "num_layers": num_layers}


# --------------------------------------------------------------------------- key names

TRANSFORMER_PREFIX = "model.diffusion_model."
TEXT_PROJECTION_PREFIX = "text_embedding_projection."
_CONNECTOR_STREAMS = ("video_embeddings_connector.", "audio_embeddings_connector.")

# (official name segments, diffusers name segments): whole dot-separated segments, so
# "ups" never matches inside "upsample". Official -> diffusers, as in the conversion script.
_TRANSFORMER_RENAMES = (
    ("patchify_proj", "proj_in"),
    ("audio_patchify_proj", "audio_proj_in"),
    ("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
    ("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
    ("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
    ("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
    ("scale_shift_table_a2v_ca_video", "video_a2v_cross_attn_scale_shift_table"),
    ("scale_shift_table_a2v_ca_audio", "audio_a2v_cross_attn_scale_shift_table"),
    ("prompt_adaln_single", "prompt_adaln"),
    ("audio_prompt_adaln_single", "audio_prompt_adaln"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
)
# Only at the start of a name (elsewhere these words are parts of the names above).
_TRANSFORMER_PREFIXES = (("audio_adaln_single.", "audio_time_embed."),
                         ("adaln_single.", "time_embed."))

_CONNECTOR_RENAMES = (
    ("video_embeddings_connector", "video_connector"),
    ("audio_embeddings_connector", "audio_connector"),
    ("transformer_1d_blocks", "transformer_blocks"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
)
_TEXT_PROJECTIONS = (("video_aggregate_embed.", "video_text_proj_in."),
                     ("audio_aggregate_embed.", "audio_text_proj_in."))

_LATENT_STATS = (("per_channel_statistics.mean-of-means", "latents_mean"),
                 ("per_channel_statistics.std-of-means", "latents_std"))
_VAE_RENAMES = (
    ("last_time_embedder", "time_embedder"),
    ("last_scale_shift_table", "scale_shift_table"),
    ("res_blocks", "resnets"),
) + _LATENT_STATS
_VOCODER_RENAMES = (
    ("ups", "upsamplers"),
    ("resblocks", "resnets"),
    ("conv_pre", "conv_in"),
    ("conv_post", "conv_out"),
    ("act_post", "act_out"),
    ("downsample.lowpass", "downsample"),
)

# The official VAE counts encoder stages and their downsamplers as one flat list
# (down_blocks.0..7, then the mid block as 8); the decoder likewise (up_blocks.0 is the mid
# block, then upsampler/stage pairs). Four stages each, as in every LTX-2.x VAE.
_VAE_STAGES = 4


@functools.cache
def _renamer(pairs: tuple[tuple[str, str], ...], reverse: bool):
    table = {new if reverse else old: old if reverse else new for old, new in pairs}
    words = "|".join(re.escape(key) for key in sorted(table, key=len, reverse=True))
    pattern = re.compile(rf"(?<![^.])(?:{words})(?![^.])")  # whole segments only
    return lambda name: pattern.sub(lambda match: table[match.group(0)], name)


def _replace_all(name: str, pairs, reverse: bool = False) -> str:
    """Rename whole name segments, all rules at once (no rule sees another's output)."""
    return _renamer(pairs, reverse)(name)


def _swap_prefix(name: str, pairs, reverse: bool = False) -> str:
    for official, diffusers in pairs:
        old, new = (diffusers, official) if reverse else (official, diffusers)
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _vae_block_to_diffusers(name: str) -> str:
    def down(match: re.Match) -> str:
        index = int(match.group(1))
        if index == 2 * _VAE_STAGES:
            return "encoder.mid_block."
        stage, is_sampler = divmod(index, 2)
        return f"encoder.down_blocks.{stage}." + ("downsamplers.0." if is_sampler else "")

    def up(match: re.Match) -> str:
        index = int(match.group(1))
        if index == 0:
            return "decoder.mid_block."
        stage, is_stage = divmod(index - 1, 2)
        return f"decoder.up_blocks.{stage}." + ("" if is_stage else "upsamplers.0.")

    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.", down, name)
    return re.sub(r"^decoder\.up_blocks\.(\d+)\.", up, name)


def _vae_block_to_official(name: str) -> str:
    def down(match: re.Match) -> str:
        return f"encoder.down_blocks.{2 * int(match.group(1)) + bool(match.group(2))}."

    def up(match: re.Match) -> str:
        return f"decoder.up_blocks.{2 * int(match.group(1)) + 1 + (not match.group(2))}."

    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.(downsamplers\.0\.)?", down, name)
    name = re.sub(r"^encoder\.mid_block\.", f"encoder.down_blocks.{2 * _VAE_STAGES}.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.(upsamplers\.0\.)?", up, name)
    return re.sub(r"^decoder\.mid_block\.", "decoder.up_blocks.0.", name)


def official_to_diffusers_key(name: str) -> tuple[str, str]:
    """Map an official LTX-2.3 single-file tensor name to ``(component, diffusers name)``.

    Raises InvalidOptionError for a name outside the official prefixes.
    """
    if name.startswith(TRANSFORMER_PREFIX):
        inner = name[len(TRANSFORMER_PREFIX):]
        if inner.startswith(_CONNECTOR_STREAMS):
            return "connectors", _replace_all(inner, _CONNECTOR_RENAMES)
        return "transformer", _swap_prefix(_replace_all(inner, _TRANSFORMER_RENAMES),
                                           _TRANSFORMER_PREFIXES)
    if name.startswith(TEXT_PROJECTION_PREFIX):
        return "connectors", _swap_prefix(name[len(TEXT_PROJECTION_PREFIX):], _TEXT_PROJECTIONS)
    if name.startswith("vae."):
        inner = _vae_block_to_diffusers(name[len("vae."):])
        return "vae", _replace_all(inner, _VAE_RENAMES)
    if name.startswith("audio_vae."):
        return "audio_vae", _replace_all(name[len("audio_vae."):], _LATENT_STATS)
    if name.startswith("vocoder."):
        return "vocoder", _replace_all(name[len("vocoder."):], _VOCODER_RENAMES)
    raise InvalidOptionError(
        f"tensor {name!r}: not an official LTX-2.3 name (expected a prefix among "
        f"{TRANSFORMER_PREFIX!r}, {TEXT_PROJECTION_PREFIX!r}, 'vae.', 'audio_vae.', 'vocoder.')")


def diffusers_to_official_key(component: str, name: str) -> str:
    """Inverse of :func:`official_to_diffusers_key` for the single-file components."""
    if component == "transformer":
        inner = _swap_prefix(name, _TRANSFORMER_PREFIXES, reverse=True)
        return TRANSFORMER_PREFIX + _replace_all(inner, _TRANSFORMER_RENAMES, reverse=True)
    if component == "connectors":
        if name.startswith(("video_text_proj_in.", "audio_text_proj_in.")):
            return TEXT_PROJECTION_PREFIX + _swap_prefix(name, _TEXT_PROJECTIONS, reverse=True)
        return TRANSFORMER_PREFIX + _replace_all(name, _CONNECTOR_RENAMES, reverse=True)
    if component == "vae":
        inner = _replace_all(name, _VAE_RENAMES, reverse=True)
        return "vae." + _vae_block_to_official(inner)
    if component == "audio_vae":
        return "audio_vae." + _replace_all(name, _LATENT_STATS, reverse=True)
    if component == "vocoder":
        return "vocoder." + _replace_all(name, _VOCODER_RENAMES, reverse=True)
    raise InvalidOptionError(
        f"component {component!r}: not part of the official LTX-2.3 single file "
        "(transformer, connectors, vae, audio_vae, vocoder)")


SINGLE_FILE_COMPONENTS = ("transformer", "connectors", "vae", "audio_vae", "vocoder")
