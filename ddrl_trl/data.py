"""Reference data for the DDRL data term: checks, one-off VAE encoding, group sampling and collation.

Every prompt comes with its **paired** reference sample x̃0 (real data, or synthetic data made by the base model for
that prompt; never a random image). Images are loaded, resized and centre-cropped to the training resolution and
VAE-encoded once, before training; steps only read the cached latents. Videos (for video pipelines) are checked for
their frame count and size, then cropped and encoded the same way.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image, ImageSequence

REF_LATENTS_COLUMN = "ddrl_ref_latents"


def check_columns(dataset: Dataset, prompt_column: str, image_column: str, split: str) -> None:
    """Fail early, naming the fix, when a dataset lacks the prompt or paired image column."""
    missing = [c for c in (prompt_column, image_column) if c not in dataset.column_names]
    if missing:
        hint = (
            " DDRL needs a paired reference image per prompt for its data term; for prompt-only data, build one with "
            "ddrl_trl.build_synthetic_reference_dataset(pipeline, prompts)."
            if image_column in missing
            else ""
        )
        raise ValueError(
            f"The {split} dataset has no column {', '.join(repr(m) for m in missing)} (its columns: "
            f"{dataset.column_names}). Rename your columns or set prompt_column / image_column in DDRLConfig.{hint}"
        )
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")


def load_image(value) -> Image.Image:
    """Open a reference image given as PIL image, path, bytes, `{"bytes"|"path": ...}` dict or HWC array."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        array = np.asarray(value)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    else:
        raise TypeError(f"expected a PIL image, a path, bytes or an array, got {type(value).__name__}")
    image.load()  # decode now, so a truncated file fails here and not mid-training
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop a square, return `(3, R, R)` float in [−1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


class ReferenceSampleError(ValueError):
    """A reference sample that can be read but does not fit the training setup (frame count, frame size)."""


def load_video_frames(value) -> list[Image.Image]:
    """Frames of a reference video given as a list of frames (anything `load_image` reads), a `(F, H, W, 3)` array,
    or a video file (path or `{"path": ...}` dict; MP4 and the like need `pip install "ddrl-trl[video]"`, GIF not)."""
    if isinstance(value, dict) and value.get("bytes"):
        return _frames_from_bytes(value["bytes"], value.get("path"))
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        from diffusers.utils import load_video

        try:
            return [load_image(frame) for frame in load_video(os.fspath(value))]  # GIF frames come as palette images
        except ImportError as err:
            raise ImportError(
                f"Reading video files needs imageio with its ffmpeg plugin: pip install \"ddrl-trl[video]\" ({err})."
            ) from err
    if isinstance(value, (np.ndarray, torch.Tensor)) and np.asarray(value).ndim == 4:
        return [load_image(frame) for frame in np.asarray(value)]
    if isinstance(value, (list, tuple)):
        return [load_image(frame) for frame in value]
    kind = "a single image" if isinstance(value, (Image.Image, np.ndarray, torch.Tensor)) else type(value).__name__
    raise ReferenceSampleError(
        f"expected a video (a list of frames, an (F, H, W, 3) array or a video file), got {kind}"
    )


def _frames_from_bytes(data: bytes, name: str | None) -> list[Image.Image]:
    """Frames of an encoded file held in memory: animated images through PIL, other formats through a temp file."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 — not an image format PIL knows: try it as a video file
        import tempfile

        suffix = os.path.splitext(name or "")[1] or ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix) as file:
            file.write(data)
            file.flush()
            return load_video_frames(file.name)
    if getattr(image, "n_frames", 1) == 1:
        raise ReferenceSampleError(
            "expected a video (a list of frames, an (F, H, W, 3) array or a video file), got a single image"
        )
    return [load_image(frame.copy()) for frame in ImageSequence.Iterator(image)]


def video_to_tensor(frames: list[Image.Image], resolution: int, num_frames: int) -> torch.Tensor:
    """`(F, 3, R, R)` in [−1, 1] from `frames`, after checking they fit: exactly `num_frames` frames, one frame size,
    no side shorter than `resolution` (upscaled reference videos would pull the model toward blur)."""
    if len(frames) != num_frames:
        raise ReferenceSampleError(
            f"the video has {len(frames)} frames but num_frames={num_frames}: trim or resample the reference videos to "
            f"{num_frames} frames, or set num_frames in DDRLConfig to their length (4k + 1 for Wan)"
        )
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ReferenceSampleError(f"the video's frames differ in size ({sizes}); every frame must have the same size")
    width, height = sizes[0]
    if min(width, height) < resolution:
        raise ReferenceSampleError(
            f"the frames are {width}x{height} px, smaller than resolution={resolution}: use reference videos whose "
            f"short side is at least {resolution} px, or lower resolution in DDRLConfig"
        )
    return torch.stack([resize_center_crop(frame, resolution) for frame in frames])


def encode_reference_dataset(
    dataset: Dataset,
    encode,
    resolution: int,
    column: str,
    batch_size: int,
    split: str,
    num_frames: int | None = None,
) -> Dataset:
    """Add the column `ddrl_ref_latents`: the VAE latents of each row's reference sample, computed once.

    Images are resized and centre-cropped to `resolution`. With `num_frames` the samples are videos, checked by
    `video_to_tensor` and encoded `batch_size // num_frames` (at least one) at a time. A sample that cannot be read
    or does not fit raises a `ValueError` naming the row, the column and the fix, before any training work.
    """
    kind = "video" if num_frames else "image"
    if isinstance(dataset.features.get(column), ImageFeature):
        # Decode rows ourselves, so a corrupt file is reported with its row index instead of deep inside `datasets`.
        dataset = dataset.cast_column(column, ImageFeature(decode=False))

    def to_pixels(value) -> torch.Tensor:
        if num_frames:
            return video_to_tensor(load_video_frames(value), resolution, num_frames)
        return resize_center_crop(load_image(value), resolution)

    def encode_batch(batch, indices):
        pixels = []
        for value, row in zip(batch[column], indices):
            try:
                pixels.append(to_pixels(value))
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
        latents = encode(torch.stack(pixels))
        return {REF_LATENTS_COLUMN: latents.float().cpu().numpy()}

    from datasets.fingerprint import Hasher

    fingerprint = Hasher.hash(
        (dataset._fingerprint, REF_LATENTS_COLUMN, resolution, num_frames, column, id(encode))
    )
    encoded = dataset.map(
        encode_batch,
        batched=True,
        batch_size=max(1, batch_size // num_frames) if num_frames else batch_size,
        with_indices=True,
        keep_in_memory=True,  # latents depend on VAE weights the fingerprint cannot see: never reuse a disk cache
        new_fingerprint=fingerprint,
        desc=f"Encoding {split} reference {kind}s",
    )
    return encoded.remove_columns(column)


class RepeatSampler(torch.utils.data.Sampler[int]):
    """Yields each dataset index `repeats` times in a row, in a seeded random order (a fresh one per epoch).

    With a batch size that is a multiple of `repeats`, every batch holds whole groups: prompt k at rows k·N … k·N+N−1.
    """

    def __init__(self, num_rows: int, repeats: int, seed: int = 0, shuffle: bool = True):
        self.num_rows, self.repeats, self.seed, self.shuffle = num_rows, repeats, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch, for a new, still reproducible order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = range(self.num_rows)
        for index in order:
            yield from [index] * self.repeats

    def __len__(self) -> int:
        return self.num_rows * self.repeats


class DDRLCollator:
    """Batches rows into `{"prompts": [...], "ref_latents": (B, ...), "columns": {name: [...]}}`.

    `columns` holds every other dataset column, passed on to the reward functions.
    """

    def __init__(self, prompt_column: str):
        self.prompt_column = prompt_column

    def __call__(self, rows: Sequence[dict]) -> dict:
        latents = torch.stack([torch.as_tensor(np.asarray(r[REF_LATENTS_COLUMN]), dtype=torch.float32) for r in rows])
        extra = [k for k in rows[0] if k not in (self.prompt_column, REF_LATENTS_COLUMN)]
        return {
            "prompts": [r[self.prompt_column] for r in rows],
            "ref_latents": latents,
            "columns": {k: [r[k] for r in rows] for k in extra},
        }


@torch.no_grad()
def build_synthetic_reference_dataset(
    pipeline,
    prompts: Sequence[str],
    images_per_prompt: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    **pipeline_kwargs,
) -> Dataset:
    """Pair prompt-only data with reference images made by the base pipeline itself (the paper's synthetic data).

    Runs `pipeline(prompt, generator=..., **pipeline_kwargs)` (so its usual guidance and step count apply) with a
    seeded generator per batch, and returns a `Dataset` with `prompt` and `image` (PIL) columns.
    """
    if not prompts:
        raise ValueError("build_synthetic_reference_dataset needs at least one prompt.")
    rows = [p for p in prompts for _ in range(images_per_prompt)]
    images: list[Image.Image] = []
    device = getattr(pipeline, "device", torch.device("cpu"))
    for start in range(0, len(rows), batch_size):
        generator = torch.Generator(device=device).manual_seed(seed + start)
        out = pipeline(list(rows[start : start + batch_size]), generator=generator, output_type="pil", **pipeline_kwargs)
        images.extend(out.images)
    return Dataset.from_dict({"prompt": rows, "image": images}).cast_column("image", ImageFeature())
