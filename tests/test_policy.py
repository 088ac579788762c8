import pytest
import torch

from hlwq.quant.errors import InvalidOptionError, PolicyError
from hlwq.store.policy import Decision, builtin_policies, load_policy

ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn",
              "video_to_audio_attn")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARDS = ("ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
OFFICIAL = "model.diffusion_model."


def block_linears(block: int, prefix: str = "") -> list[str]:
    names = [f"{attn}.{proj}" for attn in ATTENTIONS for proj in PROJECTIONS] + list(FEED_FORWARDS)
    return [f"{prefix}transformer_blocks.{block}.{name}.weight" for name in names]


@pytest.fixture(scope="module")
def ltx23():
    return load_policy("ltx23")


def test_builtins_are_data_files():
    assert {"ltx23", "generic"} <= set(builtin_policies())


@pytest.mark.parametrize("prefix", ["", OFFICIAL], ids=["diffusers", "official"])
def test_ltx23_quantizes_the_28_block_linears(ltx23, prefix):
    names = block_linears(47, prefix)
    assert len(names) == len(set(names)) == 28
    for name in names:
        decision = ltx23.decide(name, (4096, 4096), "BF16", "transformer")
        assert (decision.action, decision.bits) == ("quantize", 5), name


KEPT = {
    "transformer_blocks.0.attn1.to_q.bias": "bias",
    "transformer_blocks.0.attn1.norm_q.weight": "normalization",
    f"{OFFICIAL}transformer_blocks.0.attn1.q_norm.weight": "normalization",
    "transformer_blocks.0.scale_shift_table": "scale-shift table",
    f"{OFFICIAL}transformer_blocks.0.scale_shift_table_a2v_ca_video": "scale-shift table",
    "transformer_blocks.0.attn1.to_gate_logits.weight": "gate logits",
    "time_embed.linear.weight": "AdaLN / timestep",
    f"{OFFICIAL}adaln_single.linear.weight": "AdaLN / timestep",
    "av_cross_attn_video_scale_shift.linear.weight": "AdaLN / timestep",
    f"{OFFICIAL}av_ca_a2v_gate_adaln_single.linear.weight": "AdaLN / timestep",
    "prompt_adaln.linear.weight": "AdaLN / timestep",
    "caption_projection.linear_1.weight": "caption projection",
    "proj_in.weight": "input / output projection",
    f"{OFFICIAL}patchify_proj.weight": "input / output projection",
    "audio_proj_out.weight": "input / output projection",
    "transformer_blocks.0.attn1.to_q.lora_A.weight": "not one of the 28",
}


@pytest.mark.parametrize("name", KEPT)
def test_ltx23_keeps_other_transformer_tensors_with_a_reason(ltx23, name):
    shape = (64,) if name.endswith("bias") or "norm" in name else (4096, 4096)
    decision = ltx23.decide(name, shape, "BF16", "transformer")
    assert decision.action == "keep" and decision.bits is None
    assert KEPT[name] in decision.reason


def test_ltx23_keeps_other_components(ltx23):
    decision = ltx23.decide("decoder.conv_in.conv.weight", (128, 128), "BF16", "vae")
    assert decision == Decision("keep", None, "vae: only the transformer blocks are quantized")
    # the block-linear pattern alone is not enough: it must be in the transformer
    name = "transformer_blocks.0.attn1.to_q.weight"
    assert ltx23.decide(name, (64, 64), "BF16", "connectors").action == "keep"


def test_only_2d_float_tensors_are_quantized(ltx23):
    name = "transformer_blocks.0.attn1.to_q.weight"
    assert ltx23.decide(name, (64, 64), "F32", "transformer").action == "quantize"
    for shape, dtype in [((64, 64, 1), "BF16"), ((64,), "BF16"), ((64, 64), "I8"),
                         ((64, 64), "F8_E4M3")]:
        decision = ltx23.decide(name, shape, dtype, "transformer")
        assert decision.action == "keep" and "2-D floating-point" in decision.reason


def test_every_tensor_of_a_real_ltx2_transformer(ltx23):
    """The real diffusers class with LTX-2.3's flags, in both namings: 28 quantized weights
    per block, and a specific reason for every kept tensor."""
    from diffusers import LTX2VideoTransformer3DModel

    from hlwq.store.ltx23_config import diffusers_to_official_key

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(
            num_layers=2, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
            audio_num_attention_heads=2, audio_attention_head_dim=32, audio_cross_attention_dim=64,
            caption_channels=64, gated_attn=True, cross_attn_mod=True, audio_gated_attn=True,
            audio_cross_attn_mod=True)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    namings = {"": lambda name: name,
               OFFICIAL: lambda name: diffusers_to_official_key("transformer", name)}
    for prefix, rename in namings.items():
        decisions = {rename(name): ltx23.decide(rename(name), shape, "BF16", "transformer")
                     for name, shape in shapes.items()}
        quantized = {name for name, decision in decisions.items() if decision.action == "quantize"}
        assert quantized == set(block_linears(0, prefix) + block_linears(1, prefix))
        assert not [name for name, decision in decisions.items()
                    if decision.reason == ltx23.default_reason]


def test_generic_policy():
    generic = load_policy("generic", bits=4)
    assert generic.decide("layers.0.mlp.up.weight", (256, 256), "F16", "model") == \
        Decision("quantize", 4, "2-D floating-point weight with >= 65,536 elements")
    small = generic.decide("layers.0.mlp.up.weight", (255, 256), "F16", "model")
    assert small.action == "keep" and "65,280 elements, below" in small.reason
    for name in ("model.embed_tokens.weight", "transformer.wte.weight",
                 "embeddings.word_embeddings.weight"):
        assert generic.decide(name, (50000, 512), "BF16", "model").reason == "embedding table"
    assert generic.decide("layers.0.mlp.up.bias", (65536,), "F32", "model").action == "keep"
    assert generic.decide("conv.weight", (64, 64, 3, 3), "F32", "model").action == "keep"


def test_include_exclude_and_bits(ltx23):
    policy = load_policy("ltx23", bits=4, include=["proj_in.weight"],
                         exclude=["re:transformer_blocks\\.0\\..*"])
    assert policy.decide("proj_in.weight", (256, 256), "BF16", "transformer").action == "quantize"
    kept = policy.decide("transformer_blocks.0.ff.net.2.weight", (256, 256), "BF16", "transformer")
    assert kept.action == "keep" and "excluded" in kept.reason
    assert policy.decide("transformer_blocks.1.ff.net.2.weight", (256, 256), "BF16",
                         "transformer").bits == 4
    with pytest.raises(InvalidOptionError, match="bits=9"):
        load_policy("ltx23", bits=9)


OVERRIDES_TOML = """
exclude = ["*.attn2.*"]
[bits]
"*.ff.net.*" = 6
"re:.*audio_attn1\\\\..*" = 3
"""
OVERRIDES_YAML = """
exclude: ["*.attn2.*"]
bits:
  "*.ff.net.*": 6
  're:.*audio_attn1\\..*': 3
"""


@pytest.mark.parametrize("suffix,text", [(".toml", OVERRIDES_TOML), (".yaml", OVERRIDES_YAML)])
def test_override_files(tmp_path, suffix, text):
    path = tmp_path / f"overrides{suffix}"
    path.write_text(text)
    policy = load_policy("ltx23", overrides_file=path)

    def decide(name):
        return policy.decide(f"transformer_blocks.3.{name}.weight", (256, 256), "BF16", "transformer")

    assert decide("ff.net.2").bits == 6
    assert decide("audio_ff.net.2").bits == 5     # "*.ff.net.*" needs a dot before ff
    assert decide("audio_attn1.to_q").bits == 3
    assert decide("attn1.to_q").bits == 5
    # The reason names the file, not its local path (nothing local enters an artifact).
    reason = decide("attn2.to_q").reason
    assert decide("attn2.to_q").action == "keep" and path.name in reason and str(path) not in reason


def test_policy_file_in_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmin_numel: 10\nrules:\n"
                    "  - {match: '*.weight', action: quantize, bits: 3, reason: weights}\n")
    policy = load_policy(path)
    assert policy.name == "mine"
    assert policy.decide("a.weight", (4, 4), "F32", "model") == Decision("quantize", 3, "weights")
    assert policy.decide("a.bias", (4, 4), "F32", "model").reason == "matched no rule of the policy"


BAD_FILES = {
    "unknown key": ("p.toml", 'rules = [{match = "*", action = "keep", reason = "x", colour = 1}]',
                    "rule 1: unknown keys \\['colour'\\]"),
    "bad action": ("p.toml", 'rules = [{match = "*", action = "squash", reason = "x"}]',
                   "rule 1: action='squash'"),
    "bits out of range": ("p.toml", 'rules = [{match = "*", action = "quantize", bits = 12, reason = "x"}]',
                          "rule 1: bits=12"),
    "keep with bits": ("p.toml", 'rules = [{match = "*", action = "keep", bits = 4, reason = "x"}]',
                       "a 'keep' rule cannot set bits"),
    "bad regex": ("p.toml", 'rules = [{match = "re:(", action = "keep", reason = "x"}]',
                  "rule 1: pattern 're:\\(' is not a valid regular expression"),
    "no reason": ("p.yaml", "rules:\n  - {match: '*', action: keep}\n", "rule 1: needs a 'reason'"),
    "no match": ("p.yaml", "rules:\n  - {action: keep, reason: x}\n", "rule 1: match"),
    "no rules": ("p.toml", 'name = "x"', "non-empty list 'rules'"),
    "second rule bad": ("p.yaml", "rules:\n  - {match: a, action: keep, reason: x}\n  - 7\n",
                        "rule 2: must be a table"),
    "not a mapping": ("p.yaml", "- 1\n- 2\n", "mapping at the top level"),
    "toml syntax": ("p.toml", "rules = [", "cannot be read as a policy file"),
    "yaml syntax": ("p.yaml", "rules: [\n", "cannot be read as a policy file"),
    "wrong suffix": ("p.json", "{}", "must end in .toml, .yaml or .yml"),
    "bad min_numel": ("p.toml", 'min_numel = -1\nrules = [{match = "*", action = "keep", reason = "x"}]',
                      "min_numel=-1"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_policy_files_name_file_and_problem(tmp_path, case):
    file_name, text, problem = BAD_FILES[case]
    path = tmp_path / file_name
    path.write_text(text)
    with pytest.raises(PolicyError, match=problem) as info:
        load_policy(path)
    assert str(path) in str(info.value)


def test_bad_overrides_and_unknown_policy(tmp_path):
    path = tmp_path / "o.toml"
    path.write_text('[bits]\n"*.ff.*" = 1\n')
    with pytest.raises(PolicyError, match=r"o.toml: bits\['\*.ff.\*'\]: bits=1"):
        load_policy("ltx23", overrides_file=path)
    path.write_text('includes = ["x"]\n')
    with pytest.raises(PolicyError, match="unknown keys \\['includes'\\]"):
        load_policy("ltx23", overrides_file=path)
    with pytest.raises(PolicyError, match="'ltx99': not a built-in policy \\(generic, ltx23"):
        load_policy("ltx99")


# --------------------------------------------------------------------------- ltx23-full


@pytest.fixture(scope="module")
def ltx23_full():
    return load_policy("ltx23-full")


@pytest.fixture(scope="module")
def package_rows():
    from hlwq.runtime.ltx23_models import ltx23_22b_package_rows

    return ltx23_22b_package_rows()


def decisions(policy, rows, component):
    return [(row["tensor"], policy.decide(row["tensor"], row["shape"], row["dtype"], component))
            for row in rows if row["component"] == component]


def test_ltx23_full_extends_ltx23_for_the_transformer(ltx23, ltx23_full, package_rows):
    full = decisions(ltx23_full, package_rows, "transformer")
    assert full == decisions(ltx23, package_rows, "transformer")
    assert sum(d.action == "quantize" for _, d in full) == 1344


def test_ltx23_full_packs_connectors_and_language_model(ltx23_full, package_rows):
    connectors = decisions(ltx23_full, package_rows, "connectors")
    packed = {n for n, d in connectors if d.action == "quantize"}
    # 2 streams x 8 blocks x 6 linears, plus the two input projections
    assert len(packed) == 98 and {"video_text_proj_in.weight", "audio_text_proj_in.weight"} <= packed
    assert not any("gate_logits" in n or "registers" in n for n in packed)
    text = decisions(ltx23_full, package_rows, "text_encoder")
    packed = [n for n, d in text if d.action == "quantize"]
    assert len(packed) == 48 * 7 and all(n.startswith("model.language_model.layers.") for n in packed)
    reasons = dict(text)
    assert "row lookup" in reasons["model.language_model.embed_tokens.weight"].reason
    assert "vision tower" in reasons["model.vision_tower.post_layernorm.weight"].reason
    assert "RMSNorm" in reasons["model.language_model.norm.weight"].reason


@pytest.mark.parametrize("name, component", [
    (f"{OFFICIAL}video_embeddings_connector.transformer_1d_blocks.3.attn1.to_q.weight", "connectors"),
    (f"{OFFICIAL}audio_embeddings_connector.transformer_1d_blocks.0.ff.net.2.weight", "connectors"),
    ("text_embedding_projection.video_aggregate_embed.weight", "connectors"),
    ("language_model.model.layers.47.mlp.down_proj.weight", "text_encoder"),   # as published
    ("model.language_model.layers.0.self_attn.o_proj.weight", "text_encoder"),
])
def test_ltx23_full_matches_every_layout(ltx23_full, name, component):
    assert ltx23_full.decide(name, (256, 256), "BF16", component).action == "quantize"


@pytest.mark.parametrize("component, words", [
    ("vae", "video VAE"), ("audio_vae", "audio VAE"), ("vocoder", "vocoder"),
    ("latent_upsampler", "latent_upsampler: convolutions"), ("other", "other"),
])
def test_ltx23_full_says_why_each_component_is_kept(ltx23_full, component, words):
    decision = ltx23_full.decide("decoder.conv_in.weight", (128, 128), "BF16", component)
    assert decision.action == "keep" and words in decision.reason


def test_extends_needs_a_builtin_policy(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "nope"\n[[rules]]\nmatch = "*"\naction = "keep"\nreason = "r"\n')
    with pytest.raises(PolicyError, match="extends='nope' must name a built-in policy"):
        load_policy(path)
    path.write_text('extends = "ltx23"\n[[rules]]\nmatch = "x.weight"\naction = "quantize"\n'
                    'reason = "mine"\n')
    policy = load_policy(path, bits=4)
    assert policy.decide("x.weight", (8, 8), "BF16", "vae") == Decision("quantize", 4, "mine")
    assert policy.decide("transformer_blocks.0.attn1.to_q.weight", (8, 8), "BF16",
                         "transformer").bits == 4
