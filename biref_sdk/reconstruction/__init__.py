"""Reconstructions behind one call: ``reconstruct(acquisition, method=...) -> Volume``.

Every method is a :class:`Reconstructor` (whole acquisitions, or incremental sessions fed view by
view). Methods are looked up by name in a registry and imported only when first asked for, so
``import biref_sdk.reconstruction`` stays light:

- ``"formula"``: formula-based dielectric tensor tomography (:mod:`.formula`), no training needed;
- ``"model"``: the paper's trained network (:mod:`.model`), needs ``model=PATH``.
"""
from __future__ import annotations

import importlib

from .base import ReconstructionSession, Reconstructor

# method name -> (module, class); the class is called with the method's options as keywords
_METHODS: dict[str, tuple[str, str]] = {
    "formula": ("biref_sdk.reconstruction.formula", "FormulaReconstructor"),
    "model": ("biref_sdk.reconstruction.model", "ModelReconstructor"),
}

__all__ = ["ReconstructionSession", "Reconstructor", "available_methods", "get_reconstructor", "reconstruct",
           "register_method"]


def available_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def register_method(name: str, module: str, class_name: str) -> None:
    """Make ``get_reconstructor(name)`` build ``module.class_name`` (e.g. a vendor's own engine)."""
    if not name or not name.isidentifier():
        raise ValueError(f"method name must be an identifier, got {name!r}")
    _METHODS[name] = (module, class_name)


def get_reconstructor(method: str, **options) -> Reconstructor:
    """A ready :class:`Reconstructor` for ``method`` built with ``options`` (keywords of its class:
    for ``"formula"`` ``device`` and the fields of ``FormulaOptions``; for ``"model"`` ``model``
    and ``device``)."""
    try:
        module_name, class_name = _METHODS[method]
    except KeyError:
        raise ValueError(f"unknown reconstruction method {method!r}; choose one of {', '.join(_METHODS)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**options)


def reconstruct(acquisition, method: str = "formula", **options):
    """Reconstruct an :class:`~biref_sdk.files.Acquisition` with ``method``; returns a Volume."""
    return get_reconstructor(method, **options).reconstruct(acquisition)
