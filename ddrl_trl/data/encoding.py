"""The one-off VAE encoding of the reference samples: every prompt comes with its **paired** reference sample x̃0
(real data, or synthetic data made by the base model for that prompt; never a random image), resized and
centre-cropped to the training resolution and encoded once, before training; steps only read the cached latents."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from datasets import Image as ImageFeature

from ..errors import ReferenceSampleError
from .columns import REF_LATENTS_COLUMN
from .media import load_image, load_video_frames, resize_center_crop, upscale_factor, video_to_tensor

if TYPE_CHECKING:
    from ..adapters import PipelineAdapter

logger = logging.getLogger(__name__)


def encode_reference_dataset(
    dataset: Dataset,
    adapter: PipelineAdapter,
    column: str,
    batch_size: int,
    split: str,
    max_upscale: float = 2.0,
) -> Dataset:
    """Add the column `ddrl_ref_latents`: the VAE latents (`adapter.encode_images`) of each row's reference sample,
    computed once.

    Images are resized and centre-cropped to the adapter's `resolution`. For a video family (`adapter.num_frames`)
    the samples are videos, checked by `video_to_tensor` and encoded `batch_size // num_frames` (at least one) at a
    time. A sample upscaled more than
    `max_upscale` times, unreadable, or otherwise unfit raises a `ValueError` naming the row, the column and the fix,
    before any training work; any upscaling at all is reported in one warning.
    """
    encode, resolution, num_frames = adapter.encode_images, adapter.resolution, adapter.num_frames
    kind = "video" if num_frames else "image"
    if isinstance(dataset.features.get(column), ImageFeature):
        # Decode rows ourselves, so a corrupt file is reported with its row index instead of deep inside `datasets`.
        dataset = dataset.cast_column(column, ImageFeature(decode=False))
    upscaled: list[tuple[int, float]] = []  # (row, factor) of every upscaled sample

    def to_pixels(value) -> tuple[torch.Tensor, float]:
        frames = load_video_frames(value) if num_frames else [load_image(value)]
        factor = upscale_factor(*frames[0].size, resolution, max_upscale)
        if num_frames:
            return video_to_tensor(frames, resolution, num_frames, max_upscale), factor
        return resize_center_crop(frames[0], resolution), factor

    def encode_batch(batch, indices):
        pixels = []
        for value, row in zip(batch[column], indices):
            try:
                sample, factor = to_pixels(value)
            except ReferenceSampleError as err:
                raise ValueError(f"Row {row} of the {split} dataset, column {column!r}: {err}.") from err
            except ImportError:
                raise
            except Exception as err:  # noqa: BLE001 — any decoding failure is the user's data, reported alike
                article = "a" if num_frames else "an"
                raise ValueError(
                    f"Row {row} of the {split} dataset: column {column!r} cannot be read as {article} {kind} ({err}). "
                    f"Fix or drop that row (e.g. dataset.filter) before training."
                ) from err
            pixels.append(sample)
            if factor > 1:
                upscaled.append((row, factor))
        latents = encode(torch.stack(pixels))
        return {REF_LATENTS_COLUMN: latents.float().cpu().numpy()}

    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash((dataset._fingerprint, REF_LATENTS_COLUMN, resolution, num_frames, column, id(encode)))
    encoded = dataset.map(
        encode_batch,
        batched=True,
        batch_size=max(1, batch_size // num_frames) if num_frames else batch_size,
        with_indices=True,
        keep_in_memory=True,  # latents depend on VAE weights the fingerprint cannot see: never reuse a disk cache
        new_fingerprint=fingerprint,
        desc=f"Encoding {split} reference {kind}s",
    )
    if upscaled:
        row, factor = max(upscaled, key=lambda item: item[1])
        logger.warning(
            "%d of %d %s reference %ss are smaller than resolution=%d and were upscaled (up to %.2fx, row %d): "
            "upscaled references pull the model toward blur. Prefer references at least %d px on their short side.",
            len(upscaled),
            len(dataset),
            split,
            kind,
            resolution,
            factor,
            row,
            resolution,
        )
    return encoded.remove_columns(column)
