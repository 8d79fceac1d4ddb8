"""Synthetic references: prompt-only data paired with images the base pipeline makes for each prompt (the
paper's synthetic data), sampled as the rollouts are."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

logger = logging.getLogger(__name__)


@torch.no_grad()
def build_synthetic_reference_dataset(
    pipeline,
    prompts: Sequence[str],
    images_per_prompt: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    config=None,
    **pipeline_kwargs,
) -> Dataset:
    """Pair prompt-only data with reference images made by the base pipeline itself (the paper's synthetic data).

    Runs `pipeline(prompt=prompts, generator=..., **pipeline_kwargs)` with a seeded generator per batch, and returns a
    `Dataset` with `prompt` and `image` (PIL) columns: `images_per_prompt` rows per prompt, in the prompts' order.

    Args:
        pipeline: a diffusers pipeline, or a local folder / Hub id, loaded with `DiffusionPipeline.from_pretrained`
            (with a `config`, as the trainer loads its model, `adapters.preparation.load_pipeline`: the frozen parts
            in bf16 / fp16 under mixed precision, with its `model_init_kwargs`, on its device; without one, in
            float32 on the GPU if there is one).
        prompts: a list (or any sequence) of non-empty prompt strings; a single string is refused, not read as one
            prompt per character.
        images_per_prompt, batch_size: whole numbers ≥ 1.
        config: the run's `DDRLConfig`: the references are then sampled as its rollouts are (steps, resolution,
            classifier-free guidance `cfg_scale` and negative prompt; `PipelineAdapter.pipeline_call_kwargs`), so the
            data anchors the model to images like the ones the rewards judge. Without it the pipeline's own defaults
            apply (SD 1.5: 50 steps, guidance 7.5). `pipeline_kwargs` override either.
    """
    rows = _synthetic_rows(prompts, images_per_prompt, batch_size)
    if isinstance(pipeline, (str, os.PathLike)):
        from ..adapters.preparation import load_pipeline

        device = config.device if config is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = load_pipeline(pipeline, config, device)  # as the trainer loads its model
    images: list[Image.Image] = []
    device = getattr(pipeline, "device", torch.device("cpu"))
    adapter = None
    if config is not None:
        from ..adapters import get_adapter

        adapter = get_adapter(pipeline)
        adapter.configure(config)
        if adapter.num_frames is not None:
            raise ValueError(
                f"build_synthetic_reference_dataset makes images, and {type(pipeline).__name__} is configured for "
                f"videos of {adapter.num_frames} frames: sample reference videos with the pipeline yourself and pass "
                "them as a `video` column (or set num_frames=1 where the pipeline has an image mode, as Cosmos)."
            )
    for start in range(0, len(rows), batch_size):
        generator = torch.Generator(device=device).manual_seed(seed + start)
        batch = list(rows[start : start + batch_size])
        kwargs = adapter.pipeline_call_kwargs(config, len(batch)) if adapter is not None else {}
        # `prompt=` by name: some pipelines (FLUX.2, Cosmos) take an image first.
        out = pipeline(prompt=batch, generator=generator, output_type="pil", **{**kwargs, **pipeline_kwargs})
        images.extend(_single_images(out))
    return Dataset.from_dict({"prompt": rows, "image": images}).cast_column("image", ImageFeature())


def _synthetic_rows(prompts, images_per_prompt, batch_size) -> list[str]:
    """The prompt of every synthetic reference row, after checking the builder's arguments (before any loading)."""
    name = "build_synthetic_reference_dataset"
    if isinstance(prompts, (str, bytes)):
        raise ValueError(
            f"{name} got a single string as prompts ({prompts[:60]!r}), which would be read one character at a "
            f"time: pass a list of prompts, e.g. [{prompts[:30]!r}]."
        )
    for setting, value in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: {setting} must be a whole number ≥ 1, got {value!r}.")
    try:
        prompts = list(prompts)
    except TypeError:
        raise ValueError(
            f"{name}: prompts must be a list of prompts, got {type(prompts).__name__}: pass a list of prompts."
        ) from None
    if not prompts:
        raise ValueError(f"{name} needs at least one prompt: pass a list of prompts.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(
            f"{name}: prompt {bad[0]} is {prompts[bad[0]]!r}, not a non-empty string ({len(bad)} such prompt(s) in "
            f"all, e.g. {bad[:5]}): drop or fix them; a reference must show its prompt."
        )
    return [p for p in prompts for _ in range(int(images_per_prompt))]


def _single_images(output) -> list[Image.Image]:
    """The images of a pipeline output: `.images`, or the one frame of each one-frame video in `.frames` (Cosmos'
    text-to-image mode)."""
    if hasattr(output, "images"):
        return list(output.images)
    videos = list(output.frames)
    if any(len(video) != 1 for video in videos):
        raise ValueError(
            "build_synthetic_reference_dataset makes images, and the pipeline returned videos of "
            f"{len(videos[0])} frames: call it with num_frames=1 where it has an image mode (e.g. Cosmos), or sample "
            "reference videos yourself."
        )
    return [video[0] for video in videos]
