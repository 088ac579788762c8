"""Small checkpoints and a minimal quantize step for the artifact tests.

Independent of the fixture and flow helpers on purpose: a diffusers-like
folder and an official-style single file with a few 2-D weights (in-features
a multiple of 128, plus one that needs padding) and fake configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.metrics import tensor_metrics
from hlwq.store.artifact import tensor_key
from hlwq.store.policy import load_policy
from hlwq.store.safetensors_io import read_header, read_tensor
from hlwq.store.staging import staged_key, write_staged

POLICY_TOML = """
name = "test-transformer"
min_numel = 0
[[rules]]
match = 're:.*\\.weight'
components = ["transformer"]
action = "quantize"
reason = "transformer weight"
"""


def _weights(seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        f"{prefix}transformer_blocks.0.attn1.to_q.weight": randn(64, 256),
        f"{prefix}transformer_blocks.0.attn1.to_k.weight": randn(32, 200),   # padded to 256
        f"{prefix}transformer_blocks.0.ff.net.2.weight": randn(48, 384),
        f"{prefix}transformer_blocks.0.norm1.weight": randn(256),           # 1-D: kept
        f"{prefix}scale_shift_table": randn(2, 256),                         # not a .weight
        f"{prefix}proj_out.bias": randn(16, dtype=torch.float32),
    }


def make_diffusers_source(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "LTX2Pipeline", "transformer": ["diffusers", "LTX2VideoTransformer3DModel"],
         "vae": ["diffusers", "AutoencoderKLLTX2Video"]}))
    (root / "README.md").write_text("# the source's own card\n")
    for component in ("transformer", "vae", "scheduler"):
        (root / component).mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps({"num_layers": 1}))
    save_file(_weights(seed), root / "transformer" / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})
    (root / "vae" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    g = torch.Generator().manual_seed(seed + 1)
    save_file({"decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g).bfloat16(),
               "decoder.conv_in.bias": torch.randn(8, generator=g).bfloat16()},
              root / "vae" / "diffusion_pytorch_model.safetensors")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 1.0}))
    return root


SINGLE_FILE_NAME = "ltx-2.3-tiny-dev.safetensors"
SINGLE_FILE_CONFIG = json.dumps({"transformer": {"num_layers": 1}, "vae": {"latent_channels": 4}})


def make_single_file_source(root: Path, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    tensors = _weights(seed, prefix="model.diffusion_model.")
    g = torch.Generator().manual_seed(seed + 1)
    tensors["vae.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g).bfloat16()
    tensors["vocoder.conv_post.weight"] = torch.randn(1, 8, 7, generator=g).bfloat16()
    save_file(tensors, root / SINGLE_FILE_NAME, metadata={"config": SINGLE_FILE_CONFIG})
    save_file({"up.weight": torch.randn(8, 8, generator=g).bfloat16()},
              root / "ltx-2.3-spatial-upscaler-x2.safetensors")
    return root


def write_policy(directory: Path) -> Path:
    path = directory / "policy.toml"
    path.write_text(POLICY_TOML)
    return path


def quantize_source(root: Path, staging: Path, bits: int = 5, group_size: int | None = None,
                    mode: str = "reference", policy: str | None = None):
    """Fetch, inventory and quantize ``root`` the way the flow does, without Prefect.

    ``reference`` mode by default: it is the fast encoder (the refined search costs
    about a second per small tensor on a loaded machine) and the format is the same.
    Returns (fetch result, inventory table, staged mapping, metrics rows)."""
    from hlwq.store.inventory import build_inventory
    from hlwq.tasks.sources import fetch_source

    fetched = fetch_source(str(root))
    policy = load_policy(policy or write_policy(staging.parent), bits=bits)
    inventory = build_inventory(fetched.root, policy, 128, group_size)
    staged, metrics = {}, []
    for row in inventory.to_pylist():
        if row["action"] != "quantize":
            continue
        path = fetched.root / row["file"]
        weight = read_tensor(path, read_header(path).tensors[row["tensor"]])
        packed = quantize_tensor(weight, bits=row["bits"], block_size=128, mode=mode,
                                 group_size=group_size, name=row["tensor"])
        key = tensor_key(row["component"], row["tensor"])
        digest = staged_key(fetched.lineage["commit_sha"], key, policy.name, row["bits"], 128,
                            group_size, mode, "test")
        staged[key] = write_staged(staging, digest, row["tensor"], packed)
        metrics.append({"tensor": row["tensor"], "component": row["component"],
                        "bits": row["bits"], **tensor_metrics(weight.float(), dequantize(packed))})
    return fetched, inventory, staged, metrics


def package_source(root: Path, out: Path, staging: Path, remove_staged: bool = False,
                   mode: str = "reference", policy: str | None = None, **options):
    from hlwq.store.package import package_artifact

    fetched, inventory, staged, metrics = quantize_source(root, staging, mode=mode, policy=policy)
    package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                     quantization={"bits": 5, "block_size": 128, "group_size": 128,
                                   "mode": mode, "policy": "test-transformer",
                                   "code_version": "test"},
                     metrics=metrics, validation={"tensor_gates": {"passed": True},
                                 "output_gates": {"skipped": "not a whole pipeline"}},
                     remove_staged=remove_staged, **options)
    return out


def all_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}
