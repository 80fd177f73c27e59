"""Teacher families: one adapter per family, picked from the checkpoint's config (`model_type`).

A new family is one new file defining a [`TeacherAdapter`] subclass, registered here with [`register_adapter`].
"""

from __future__ import annotations

from torch import nn

from .base import TeacherAdapter
from .clip import CLIPAdapter
from .open_clip import OpenCLIPAdapter
from .siglip import SiglipAdapter
from .siglip2 import Siglip2Adapter
from .xclip import XCLIPAdapter

ADAPTERS: list[type[TeacherAdapter]] = []


def register_adapter(adapter: type[TeacherAdapter]) -> type[TeacherAdapter]:
    """Adds a teacher family (usable as a class decorator); later registrations take precedence."""
    ADAPTERS.insert(0, adapter)
    return adapter


for _adapter in (CLIPAdapter, XCLIPAdapter, SiglipAdapter, Siglip2Adapter, OpenCLIPAdapter):
    register_adapter(_adapter)


def adapter_for(model: nn.Module) -> TeacherAdapter:
    """The adapter of `model`'s family, chosen by its config's `model_type`.

    Raises:
        `ValueError`: naming the model's class and `model_type` and the supported ones.
    """
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types or a.hf_classes)})" for a in reversed(ADAPTERS))
    raise ValueError(
        f"Unsupported teacher {type(model).__name__} (model_type={model_type!r}): the teacher must be a dual-encoder "
        f"of a supported family: {supported}."
    )


__all__ = [
    "ADAPTERS",
    "CLIPAdapter",
    "OpenCLIPAdapter",
    "Siglip2Adapter",
    "SiglipAdapter",
    "TeacherAdapter",
    "XCLIPAdapter",
    "adapter_for",
    "register_adapter",
]
