"""ClusterSTM: cluster-wise spatio-temporal masking for efficient video-language pretraining.

With ``import clusterstm``, the transformers Auto classes (``AutoModel``, ``AutoProcessor``, ...) load ClusterSTM
folders without ``trust_remote_code``. The registration is lazy so that importing the package (and
``clusterstm --help``) does not import torch: it happens as soon as ``transformers`` is imported (at once if it
already is). Public names are resolved lazily too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_LAZY_IMPORTS: dict[str, str] = {
    # algorithms
    "dpc_knn": "models.masking_clusterstm",
    "temporal_density": "models.masking_clusterstm",
    "cluster_wise_mask": "models.masking_clusterstm",
    "random_mask": "models.masking_clusterstm",
    "tube_mask": "models.masking_clusterstm",
    "attention_guided_mask": "models.masking_clusterstm",
    "num_visible_tokens": "models.masking_clusterstm",
    "build_mask": "models.masking_clusterstm",
    "MASK_STRATEGIES": "models.masking_clusterstm",
    "generate_relevance": "teacher.relevance",
    "CLIPWindowPooler": "teacher.relevance",
    "SiglipWindowPooler": "teacher.relevance",
    "build_window_pooler": "teacher.relevance",
    # configuration and models
    "ClusterSTMConfig": "models.configuration_clusterstm",
    "ClusterSTMVisionConfig": "models.configuration_clusterstm",
    "ClusterSTMTextConfig": "models.configuration_clusterstm",
    "ClusterSTMPreTrainedModel": "models.modeling_clusterstm",
    "ClusterSTMVisionModel": "models.modeling_clusterstm",
    "ClusterSTMTextModel": "models.modeling_clusterstm",
    "ClusterSTMModel": "models.modeling_clusterstm",
    "ClusterSTMForPreTraining": "models.modeling_clusterstm",
    "ClusterSTMForVideoTextRetrieval": "models.modeling_clusterstm",
    "ClusterSTMForVideoQuestionAnswering": "models.modeling_clusterstm",
    "ClusterSTMForVideoCaptioning": "models.modeling_clusterstm",
    # processing
    "ClusterSTMVideoProcessor": "models.video_processing_clusterstm",
    "ClusterSTMProcessor": "models.processing_clusterstm",
    # teacher hook
    "ClusterSTMTeacher": "teacher.teacher",
    "compute_teacher_targets": "teacher.targets",
    "TeacherTargets": "teacher.targets",
    "check_teacher_compatibility": "teacher.compatibility",
}

__all__ = sorted(_LAZY_IMPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_IMPORTS:
        module = importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


# Module paths before the package was split into folders (0.1.0); kept as aliases for one release.
_MOVED_MODULES: dict[str, str] = {
    "configuration_clusterstm": "models.configuration_clusterstm",
    "modeling_clusterstm": "models.modeling_clusterstm",
    "processing_clusterstm": "models.processing_clusterstm",
    "video_processing_clusterstm": "models.video_processing_clusterstm",
    "masking_clusterstm": "models.masking_clusterstm",
    "relevance_clusterstm": "teacher.relevance",
    "teacher_clusterstm": "teacher.teacher",
    "teacher_training": "training.teacher_training",
    "pretraining": "training.pretraining",
    "finetuning": "training.finetuning",
    "synthetic": "data.synthetic",
    "tokenization": "data.tokenization",
    "checkpoint": "hub.export",
    "model_card": "hub.model_card",
    "metrics": "tasks.metrics",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves ``clusterstm.<old module>`` to its new home, so ``import clusterstm.checkpoint`` keeps working."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, leaf = fullname.partition(".")
        if prefix != __name__ or leaf not in _MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(f"{__name__}.{_MOVED_MODULES[leaf]}"))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:
        pass


sys.meta_path.append(_MovedModuleFinder())


class _LoaderWithCallback(importlib.abc.Loader):
    """Wraps a module's real loader and calls ``callback`` once the module has finished executing."""

    def __init__(self, loader: importlib.abc.Loader, callback: Any):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._callback(finished=module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _RegisterWhenImportedFinder(importlib.abc.MetaPathFinder):
    """Runs the Auto class registration after ``transformers`` (or one of our own modules) finishes importing.

    Why our own modules too: when a ClusterSTM module is what imports transformers, registering right then would
    re-enter that half-imported module, so the registration waits until no ClusterSTM module is mid-import.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if _registration["done"] or not (fullname == "transformers" or fullname.startswith(f"{__name__}.")):
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _MovedModuleFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderWithCallback(spec.loader, _register_if_ready)
                return spec
        return None


_registration = {"done": False, "running": False}


def _clusterstm_module_initializing(finished: str | None = None) -> bool:
    """Whether a ClusterSTM submodule other than ``finished`` is mid-import (importlib marks its spec
    ``_initializing`` until its loader returns, so the module that just finished still carries the mark)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(f"{__name__}.") and name != finished:
            spec = getattr(module, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False):
                return True
    return False


def _register_if_ready(finished: str | None = None) -> None:
    """Registers ClusterSTM with the Auto classes once transformers is imported and no ClusterSTM import is open."""
    state = _registration
    if (
        state["done"]
        or state["running"]
        or "transformers" not in sys.modules
        or _clusterstm_module_initializing(finished)
    ):
        return
    state["running"] = True
    try:
        from .hub.export import register_auto_classes

        register_auto_classes()
        state["done"] = True
    finally:
        state["running"] = False
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterWhenImportedFinder)]


if "transformers" in sys.modules:
    _register_if_ready()
if not _registration["done"]:
    sys.meta_path.insert(0, _RegisterWhenImportedFinder())
