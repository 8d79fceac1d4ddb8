"""Sending rollout images to the experiment trackers the Trainer was configured with (`report_to`)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import make_image_grid
from PIL import Image
from transformers.integrations import TensorBoardCallback

from .rewards import to_pil


def still_images(images: torch.Tensor) -> torch.Tensor:
    """Images `(B, 3, H, W)` as they are; videos `(B, F, 3, H, W)` by their middle frame."""
    return images[:, images.shape[1] // 2] if images.ndim == 5 else images


def image_grid(images: torch.Tensor, cols: int | None = None) -> Image.Image:
    """A grid of `images` `(B, 3, H, W)` in [0, 1] (videos `(B, F, 3, H, W)` by their middle frame), `cols` wide
    (None: near-square), row by row."""
    pil = to_pil(still_images(images))
    cols = cols or math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / cols)
    pil += [pil[0].copy().point(lambda _: 0)] * (rows * cols - len(pil))  # pad with black tiles
    return make_image_grid(pil, rows=rows, cols=cols)


def log_image_grid(callbacks, grid: Image.Image, captions: list[str], step: int, tag: str = "samples") -> bool:
    """Log an image `grid` to TensorBoard and/or W&B (whichever `report_to` set up); returns whether any took it."""
    logged = False
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            callback.tb_writer.add_text(f"{tag}/prompts", " | ".join(captions), step)
            callback.tb_writer.flush()
            logged = True
        elif type(callback).__name__ == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
            run = callback._wandb.run
            if run is not None:
                run.log({tag: callback._wandb.Image(grid, caption=" | ".join(captions))}, commit=False)
                logged = True
    return logged


class TrackerFriendlyConfig(FrozenDict):
    """A diffusers config that also answers `to_dict()` / `to_json_string()`, as transformers' trackers expect.

    TensorBoard, MLflow and others log `model.config` through those methods of `PretrainedConfig`; a diffusers
    model's `FrozenDict` config lacks them and crashes `on_train_begin`.
    """

    def to_dict(self) -> dict:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def make_config_tracker_friendly(model: torch.nn.Module) -> None:
    """Swap `model.config` for an equal `TrackerFriendlyConfig` (still a `FrozenDict`, so diffusers is unaffected)."""
    config = getattr(model, "_internal_dict", None)
    if config is not None and not isinstance(config, TrackerFriendlyConfig):
        model._internal_dict = TrackerFriendlyConfig(config)
