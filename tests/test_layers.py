"""The layering holds: each layer imports only the layers below it, and numerics stay light.

Layers, lowest first: quant -> store -> runtime -> tasks -> flows -> deployments -> cli.
`testing` (fixtures) sits beside cli: production layers never import it. `benchmarks` may
import anything; the CLI reaches it only through its lazy command table.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ("quant", "store", "runtime", "tasks", "flows", "deployments", "cli")
RANK = {layer: rank for rank, layer in enumerate(ORDER)}
RANK["testing"] = RANK["cli"]
RANK["benchmarks"] = RANK["cli"] + 1
GENERIC_NAMES = (*RANK, "benchmarks")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "hlwq" and len(parts) > 1 and parts[1] in RANK else None


def source_files(layer: str) -> list[Path]:
    return sorted((REPO / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", [*ORDER, "testing"])
def test_each_layer_imports_only_layers_below_it(layer):
    upward = []
    for path in source_files(layer):
        for module in imported_modules(path):
            target = layer_of(module)
            if target is None or target == layer:
                continue
            production = layer in ORDER[:-1]
            if RANK[target] > RANK[layer] or (production and target == "testing"):
                upward.append(f"{path.relative_to(REPO)} imports {module}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("layer", [*ORDER, "testing", "benchmarks"])
def test_no_code_imports_the_old_top_level_names(layer):
    stray = [f"{path.relative_to(REPO)} imports {module}"
             for path in source_files(layer) for module in imported_modules(path)
             if module.split(".")[0] in GENERIC_NAMES]
    assert not stray, "\n".join(stray)


def test_importing_the_numerics_loads_no_orchestration_or_network_stack():
    modules = sorted(f"hlwq.quant.{path.stem}" for path in (REPO / "quant").glob("*.py")
                     if path.stem != "__init__")
    heavy = ("prefect", "dask", "distributed", "diffusers", "transformers", "requests",
             "httpx", "urllib3", "huggingface_hub", "aiohttp")
    code = (f"import sys, json\nfor m in {modules!r}: __import__(m)\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    assert json.loads(out.stdout) == []


def test_the_store_loads_no_prefect_dask_or_http_client():
    modules = sorted(f"hlwq.store.{path.stem}" for path in (REPO / "store").glob("*.py")
                     if path.stem != "__init__")
    heavy = ("prefect", "dask", "distributed", "requests", "httpx", "huggingface_hub", "aiohttp")
    code = (f"import sys, json\nfor m in {modules!r}: __import__(m)\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    assert json.loads(out.stdout) == []
