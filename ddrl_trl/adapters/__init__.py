"""Model-family adapters and the registry that picks one for a pipeline."""

from __future__ import annotations

from typing import Any

from .base import (
    Conditioning,
    PipelineAdapter,
    concat_conditioning,
    repeat_conditioning,
    select_conditioning,
)
from .cosmos import CosmosPredict25Adapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .qwenimage import QwenImageAdapter
from .sana import SanaAdapter
from .sd3 import StableDiffusion3Adapter
from .stable_diffusion import StableDiffusionAdapter, StableDiffusionXLAdapter
from .wan import WanAdapter
from .zimage import ZImageAdapter

_REGISTRY: dict[type, type[PipelineAdapter]] = {}


def register_adapter(adapter_cls: type[PipelineAdapter], pipeline_cls: type | None = None) -> type[PipelineAdapter]:
    """Make `DDRLTrainer` use `adapter_cls` for `pipeline_cls` (default: every class in
    `adapter_cls.pipeline_classes`).

    Usable as a class decorator. A later registration for the same pipeline class wins, so users can override ours.
    """
    classes = (pipeline_cls,) if pipeline_cls is not None else adapter_cls.pipeline_classes
    if not classes:
        raise ValueError(f"{adapter_cls.__name__} names no pipeline class: set `pipeline_classes` or pass one.")
    for cls in classes:
        _REGISTRY[cls] = adapter_cls
    return adapter_cls


def supported_pipelines() -> list[str]:
    """Names of the pipeline classes an adapter is registered for."""
    return sorted(cls.__name__ for cls in _REGISTRY)


def adapter_class(pipeline_cls: type) -> type[PipelineAdapter] | None:
    """The adapter class registered for `pipeline_cls` or its nearest registered base class, or None."""
    return next((_REGISTRY[cls] for cls in pipeline_cls.__mro__ if cls in _REGISTRY), None)


def get_adapter(pipeline: Any) -> PipelineAdapter:
    """The adapter registered for `pipeline`'s class or its nearest registered base class."""
    found = adapter_class(type(pipeline))
    if found is not None:
        return found(pipeline)
    raise ValueError(
        f"DDRLTrainer has no adapter for {type(pipeline).__name__}. Supported pipelines: "
        f"{', '.join(supported_pipelines())}. For another pipeline, subclass ddrl_trl.adapters.PipelineAdapter and "
        f"call ddrl_trl.register_adapter(MyAdapter, {type(pipeline).__name__}) (see docs/adapters.md)."
    )


register_adapter(StableDiffusionAdapter)
register_adapter(StableDiffusionXLAdapter)
register_adapter(StableDiffusion3Adapter)
register_adapter(FluxAdapter)
register_adapter(WanAdapter)
register_adapter(CosmosPredict25Adapter)
register_adapter(QwenImageAdapter)
register_adapter(Flux2Adapter)
register_adapter(Flux2KleinAdapter)
register_adapter(ZImageAdapter)
register_adapter(SanaAdapter)

__all__ = [
    "Conditioning",
    "CosmosPredict25Adapter",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "PipelineAdapter",
    "QwenImageAdapter",
    "SanaAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "WanAdapter",
    "ZImageAdapter",
    "adapter_class",
    "concat_conditioning",
    "get_adapter",
    "register_adapter",
    "repeat_conditioning",
    "select_conditioning",
    "supported_pipelines",
]
