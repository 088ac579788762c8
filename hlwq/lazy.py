"""Lazy package exports: a package names what it exports, and each name is imported on first
use (so importing the package costs no torch, numba or diffusers)."""

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package`` whose names live in ``exports``
    (name -> module)."""
    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
