"""hlwq-pipeline: quantize LTX-2.3 with HLWQ, validate it, package it, render from the packed weights.

The public API, imported lazily so that ``import hlwq`` costs nothing:

    from hlwq import load_pipeline, open_artifact
    pipe = load_pipeline("ltx23-hlwq-q5", device="cuda")

Subpackages: hlwq.quant (numerics), hlwq.store (on-disk formats), hlwq.runtime (inference),
hlwq.tasks / hlwq.flows / hlwq.deployments (Prefect), hlwq.cli (the `hlwq` command).
"""

from hlwq.lazy import lazy_exports

_EXPORTS = {
    "load_pipeline": "hlwq.runtime.loader",
    "load_component": "hlwq.runtime.loader",
    "quantize_tensor": "hlwq.quant.core",
    "dequantize": "hlwq.quant.core",
    "open_artifact": "hlwq.store.artifact",
    "verify_artifact": "hlwq.store.artifact",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
