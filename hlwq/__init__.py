"""hlwq-pipeline: quantize LTX-2.3 with HLWQ, validate it, package it, render from the packed weights.

The public API, imported lazily so that ``import hlwq`` costs nothing:

    from hlwq import load_pipeline, open_artifact
    pipe = load_pipeline("ltx23-hlwq-q5", device="cuda")

Subpackages: hlwq.quant (numerics), hlwq.store (on-disk formats), hlwq.runtime (inference),
hlwq.tasks / hlwq.flows / hlwq.deployments (Prefect), hlwq.cli (the `hlwq` command).
"""

from importlib import import_module

_EXPORTS = {
    "load_pipeline": "hlwq.runtime.loader",
    "load_component": "hlwq.runtime.loader",
    "quantize_tensor": "hlwq.quant.core",
    "dequantize": "hlwq.quant.core",
    "open_artifact": "hlwq.store.artifact",
    "verify_artifact": "hlwq.store.artifact",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hlwq' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
