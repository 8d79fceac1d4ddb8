"""Reference data for the DDRL data term: checks, one-off VAE encoding, group sampling and collation.

Every prompt comes with its **paired** reference sample x̃0 (real data, or synthetic data made by the base model for
that prompt; never a random image). Images are loaded, resized and centre-cropped to the training resolution and
VAE-encoded once, before training; steps only read the cached latents. Videos (for video pipelines) are checked for
their frame count and size, then cropped and encoded the same way.

Pixels are read by what they are, never guessed into white: 16-bit images (PIL modes `I;16*`, `uint16` arrays) are
scaled from 0..65535, other integer arrays must hold 0..255, float arrays must lie in [0, 1], transparent pixels are
composited over white and EXIF orientation is applied; anything else is refused naming the row and the fix.
Images and videos alike may be upscaled to the resolution by at most `max_upscale` (a warning reports any upscaling).
"""

from __future__ import annotations

import io
import logging
import numbers
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image, ImageOps, ImageSequence

logger = logging.getLogger(__name__)

REF_LATENTS_COLUMN = "ddrl_ref_latents"


#: Prompt columns of diffusers' text-to-image training data (its scripts' `--caption_column` defaults to "text"), read
#: as the prompts when `prompt_column` is left at its default and the dataset has no "prompt" column.
DIFFUSERS_PROMPT_COLUMNS = ("text", "caption")
DEFAULT_PROMPT_COLUMN = "prompt"


def reference_column_of(dataset: Dataset, configured: str | None, fallback: Dataset | None = None) -> str:
    """The column holding the paired reference samples: `configured`, else `"image"`, else `"video"` if present in
    `dataset`, else in `fallback` (the eval dataset, when the training data hold prompts only)."""
    if configured is not None:
        return configured
    for data in (dataset, fallback):
        found = next((name for name in ("image", "video") if data is not None and name in data.column_names), None)
        if found is not None:
            return found
    return "image"


def prompt_column_of(dataset: Dataset, configured: str) -> str:
    """The column holding the prompts: `configured`; or, when that is the default "prompt" and the dataset has none,
    diffusers' "text" or "caption" column (the first present). A `configured` name other than the default is kept,
    present or not (`check_columns` then names the fix)."""
    if configured != DEFAULT_PROMPT_COLUMN or configured in dataset.column_names:
        return configured
    return next((name for name in DIFFUSERS_PROMPT_COLUMNS if name in dataset.column_names), configured)


def with_prompt_column(dataset: Dataset, prompt_column: str, split: str) -> Dataset:
    """`dataset` with its prompts in `prompt_column`: diffusers' "text" / "caption" column renamed to it when the
    default "prompt" is missing (`prompt_column_of`), with an info log naming the column used."""
    found = prompt_column_of(dataset, prompt_column)
    if found == prompt_column:
        return dataset
    logger.info(
        "The %s dataset has no %r column: using its %r column as the prompts (as diffusers' training scripts do). "
        "Set prompt_column (--prompt_column) to use another column.",
        split,
        prompt_column,
        found,
    )
    return dataset.rename_column(found, prompt_column)


def check_columns(
    dataset: Dataset, prompt_column: str, reference_column: str, split: str, needs_references: bool = True
) -> None:
    """Fail early, naming the fix, when a dataset lacks the prompt column or, if `needs_references`, the paired
    reference column (the training data need it for the data term only, i.e. with data_beta > 0; held-out data always,
    for the held-out diffusion loss)."""
    columns = dataset.column_names
    if prompt_column_of(dataset, prompt_column) not in columns:
        found_too = (
            f" (diffusers' {' and '.join(repr(c) for c in DIFFUSERS_PROMPT_COLUMNS)} columns are read without it)"
            if prompt_column == DEFAULT_PROMPT_COLUMN
            else ""
        )
        raise ValueError(
            f"The {split} dataset has no column {prompt_column!r} with the prompts (its columns: {columns}). Name "
            f"the column holding them with prompt_column= in DDRLConfig (--prompt_column on the command line)"
            f"{found_too}, or rename it (dataset.rename_column)."
        )
    if needs_references and reference_column not in columns:
        if split == "training":
            why = "the data term (data_beta > 0) trains on them"
            off = "; or set data_beta=0 for plain GRPO, which needs prompts only"
        else:
            why = "the held-out diffusion loss (eval_diffusion_loss) is measured on them"
            off = "; or pass no eval_dataset (validation_prompts sample and score the model without references)"
        raise ValueError(
            f"The {split} dataset has no column {reference_column!r} (its columns: {columns}) with a paired reference "
            f"sample per prompt: {why}. Add them (images, or videos for video pipelines; if they are in another "
            f"column, set prompt_column / reference_column in DDRLConfig, --reference_column on the command line), or "
            f"build synthetic ones from the base model with ddrl_trl.build_synthetic_reference_dataset(pipeline, "
            f"prompts) (--synthetic_references_per_prompt K on the command line){off}."
        )
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")


class ReferenceSampleError(ValueError):
    """A reference sample that can be read but does not fit the training setup (pixel values, frame count, size)."""


def arrow_column(dataset: Dataset, name: str) -> pa.ChunkedArray:
    """Column `name` of `dataset` (its selected rows, in order) as Arrow, without building Python objects."""
    column = dataset.with_format("arrow")[name]
    return column.column(0) if isinstance(column, pa.Table) else column


def check_prompts(
    dataset: Dataset, prompt_column: str, split: str, allow_empty: bool = False, setting: str = "prompt_column"
) -> None:
    """Fail early, naming the first bad row, when a prompt is not a non-empty string (None, a number, blank).

    `allow_empty`: an empty string is valid (a negative prompt); `setting`: the `DDRLConfig` field naming the column.
    """
    column = arrow_column(dataset, prompt_column)
    kind = "string" if allow_empty else "non-empty string"
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(
            f"The {split} dataset's column {prompt_column!r} holds {column.type} values (row 0: "
            f"{dataset[0][prompt_column]!r}), "
            f"not text: every value must be a {kind}. Convert the column (e.g. dataset.map) or set "
            f"{setting} to the column holding the prompts."
        )
    invalid = pc.is_null(column)
    if not allow_empty:
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
        invalid = pc.or_kleene(invalid, blank)
    invalid = pc.fill_null(invalid, True)
    count = pc.sum(invalid).as_py() or 0
    if count:
        rows = np.flatnonzero(invalid.to_numpy(zero_copy_only=False))
        fix = f"bool(row[{prompt_column!r}] and row[{prompt_column!r}].strip())"
        raise ValueError(
            f"Row {rows[0]} of the {split} dataset: column {prompt_column!r} holds "
            f"{dataset[int(rows[0])][prompt_column]!r}, "
            f"not a {'string' if allow_empty else 'non-empty prompt'} "
            f"({count} such row(s) in all, e.g. {rows[:5].tolist()}). Fix or drop those rows, "
            f"e.g. dataset.filter(lambda row: {f'row[{prompt_column!r}] is not None' if allow_empty else fix})."
        )


def check_negative_prompts(
    dataset: Dataset, column: str, prompt_column: str, reference_column: str, split: str = "training"
) -> None:
    """Fail early when `negative_prompt_column` is missing from the `split` dataset, is the prompt or reference column,
    or holds anything but strings (empty ones are valid)."""
    if column in (prompt_column, reference_column):
        raise ValueError(
            f"negative_prompt_column={column!r} is the {'prompt' if column == prompt_column else 'reference'} column; "
            f"name the column holding the negative prompts."
        )
    if column not in dataset.column_names:
        raise ValueError(
            f"negative_prompt_column={column!r} is not a column of the {split} dataset (its columns: "
            f"{dataset.column_names})."
            + (
                " The guided held-out loss uses each row's negative prompt, as rollouts do: add the column to it."
                if split == "evaluation"
                else ""
            )
        )
    check_prompts(dataset, column, split, allow_empty=True, setting="negative_prompt_column")


def check_evaluation_dataset(dataset: Dataset, args, reference_column: str) -> None:
    """Fail early, naming the fix, when held-out data lack the prompt or reference column (unless already encoded),
    hold a non-prompt, or lack `negative_prompt_column`, whose rows the guided held-out loss uses as rollouts do."""
    if REF_LATENTS_COLUMN not in dataset.column_names:
        check_columns(dataset, args.prompt_column, reference_column, "evaluation")
    prompt_column = prompt_column_of(dataset, args.prompt_column)  # diffusers' "text" / "caption" too
    check_prompts(dataset, prompt_column, "evaluation")
    if args.negative_prompt_column is not None:
        column = args.negative_prompt_column
        check_negative_prompts(dataset, column, prompt_column, reference_column, "evaluation")


def load_image(value) -> Image.Image:
    """Open a reference image given as PIL image, path, bytes, `{"bytes"|"path": ...}` dict, array or nested list
    (how `datasets` returns an array column), as 8-bit RGB.

    Files are decoded now (a truncated one fails here, not mid-training) and turned upright by their EXIF
    orientation; 16-bit and float images, arrays and transparency are converted by `to_rgb`."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (np.ndarray, torch.Tensor, list, tuple)):  # `datasets` hands arrays back as nested lists
        return to_rgb(array_to_image(np.asarray(value) if isinstance(value, (list, tuple)) else value))
    else:
        raise TypeError(f"expected a PIL image, a path, bytes or an array, got {type(value).__name__}")
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def array_to_image(value) -> Image.Image:
    """An image array — `(H, W)`, `(H, W, C)` or a tensor's `(C, H, W)`, C in {1, 3, 4} — as an 8-bit PIL image.

    Values are read by dtype: uint8 as is; uint16 as 16-bit (0..65535); other integers must hold 0..255; floats must
    lie in [0, 1] (within 1e-3, then clipped); bool as black/white. Anything else raises `ReferenceSampleError`."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first, as tensors hold images
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ReferenceSampleError(
            f"an array of shape {array.shape} is not an image: expected (H, W), (H, W, 1|3|4) or (1|3|4, H, W)"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)  # 65535 / 257 = 255
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ReferenceSampleError(
                f"an integer ({array.dtype}) image with values {low}..{high}: integer images must hold 0..255; pass "
                f"16-bit data as uint16, or rescale it to uint8"
            )
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ReferenceSampleError("a float image holding NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ReferenceSampleError(
                f"a float image with values {low:.4g}..{high:.4g}: float images must lie in [0, 1]; divide 0..255 "
                f"data by 255, map [-1, 1] data with (x + 1) / 2, or pass uint8"
            )
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ReferenceSampleError(
            f"an array of dtype {array.dtype} is not an image; pass uint8, uint16 or floats in [0, 1]"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image: 16-bit (`I;16*`, scaled from 0..65535) and 32-bit modes (`I`, `F`: read as int32 /
    float32 arrays) by their values, through `array_to_image` (PIL's own conversion clips 16-bit values to 255, i.e.
    white); transparency composited over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return to_rgb(array_to_image(np.asarray(image).astype(np.uint16)))
    if image.mode in ("I", "F"):  # 32-bit integers or floats: read like an int32 / float32 array
        return to_rgb(array_to_image(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def upscale_factor(width: int, height: int, resolution: int, max_upscale: float) -> float:
    """How much a `width`×`height` sample is upscaled to reach `resolution` (≤ 1: not at all); raises
    `ReferenceSampleError` above `max_upscale`: upscaled references anchor the model to blur."""
    factor = resolution / min(width, height)
    if factor > max_upscale:
        raise ReferenceSampleError(
            f"it is {width}x{height} px, which would be upscaled {factor:.2f}x to resolution={resolution} (more than "
            f"max_reference_upscale={max_upscale:g}): use references whose short side is at least "
            f"{resolution / max_upscale:.0f} px, lower resolution, or raise max_reference_upscale"
        )
    return factor


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
                f'Reading video files needs imageio with its ffmpeg plugin: pip install "ddrl-trl[video]" ({err}).'
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


def video_to_tensor(
    frames: list[Image.Image], resolution: int, num_frames: int, max_upscale: float = 2.0
) -> torch.Tensor:
    """`(F, 3, R, R)` in [−1, 1] from `frames`, after checking they fit: exactly `num_frames` frames, one frame size,
    upscaled at most `max_upscale` times (`upscale_factor`, the same rule as images)."""
    if len(frames) != num_frames:
        raise ReferenceSampleError(
            f"the video has {len(frames)} frames but num_frames={num_frames}: trim or resample the reference videos "
            f"to {num_frames} frames, or set num_frames in DDRLConfig to their length (4k + 1 for Wan)"
        )
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ReferenceSampleError(f"the video's frames differ in size ({sizes}); every frame must have the same size")
    upscale_factor(*sizes[0], resolution, max_upscale)  # refuses above max_upscale
    return torch.stack([resize_center_crop(frame, resolution) for frame in frames])


def encode_reference_dataset(
    dataset: Dataset,
    encode,
    resolution: int,
    column: str,
    batch_size: int,
    split: str,
    num_frames: int | None = None,
    max_upscale: float = 2.0,
) -> Dataset:
    """Add the column `ddrl_ref_latents`: the VAE latents of each row's reference sample, computed once.

    Images are resized and centre-cropped to `resolution`. With `num_frames` the samples are videos, checked by
    `video_to_tensor` and encoded `batch_size // num_frames` (at least one) at a time. A sample upscaled more than
    `max_upscale` times, unreadable, or otherwise unfit raises a `ValueError` naming the row, the column and the fix,
    before any training work; any upscaling at all is reported in one warning.
    """
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


class RepeatSampler(torch.utils.data.Sampler[int]):
    """Yields each dataset index `repeats` times in a row, in a seeded random order (a fresh one per epoch).

    With a batch size that is a multiple of `repeats`, every batch holds whole groups: prompt k at rows k·N … k·N+N−1.
    With `iterations` > 1 (`DDRLConfig.num_iterations`), the rows of each optimiser step (`groups_per_step` groups)
    are yielded `iterations` times in a row, so that every iteration over a rollout batch sees the same prompts; an
    epoch's last prompts that cannot fill a whole step are then left out (as TRL's sampler does), since a partial step
    would shift every later step against its iterations.
    """

    def __init__(self, num_rows: int, repeats: int, seed: int = 0, iterations: int = 1, groups_per_step: int = 1):
        self.num_rows, self.repeats, self.seed = num_rows, repeats, seed
        self.iterations, self.groups_per_step = iterations, groups_per_step
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch, for a new, still reproducible order."""
        self.epoch = epoch

    def _steps(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        steps = [order[start : start + self.groups_per_step] for start in range(0, len(order), self.groups_per_step)]
        return [step for step in steps if len(step) == self.groups_per_step] if self.iterations > 1 else steps

    def __iter__(self) -> Iterator[int]:
        for step in self._steps():
            rows = [index for index in step for _ in range(self.repeats)]
            for _ in range(self.iterations):
                yield from rows

    def __len__(self) -> int:
        prompts = (
            self.num_rows if self.iterations == 1 else self.num_rows // self.groups_per_step * self.groups_per_step
        )
        return prompts * self.repeats * self.iterations


class DDRLCollator:
    """Batches rows into `{"prompts": [...], "ref_latents": (B, ...) or None, "columns": {name: [...]}}`.

    `ref_latents` is None for rows without encoded references (prompt-only data, trained with `data_beta=0`);
    `columns` holds every other dataset column, passed on to the reward functions.
    """

    def __init__(self, prompt_column: str):
        self.prompt_column = prompt_column

    def __call__(self, rows: Sequence[dict]) -> dict:
        latents = None
        if REF_LATENTS_COLUMN in rows[0]:
            latents = torch.stack(
                [torch.as_tensor(np.asarray(r[REF_LATENTS_COLUMN]), dtype=torch.float32) for r in rows]
            )
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
    config=None,
    **pipeline_kwargs,
) -> Dataset:
    """Pair prompt-only data with reference images made by the base pipeline itself (the paper's synthetic data).

    Runs `pipeline(prompt=prompts, generator=..., **pipeline_kwargs)` with a seeded generator per batch, and returns a
    `Dataset` with `prompt` and `image` (PIL) columns: `images_per_prompt` rows per prompt, in the prompts' order.

    Args:
        pipeline: a diffusers pipeline, or a local folder / Hub id, loaded with `DiffusionPipeline.from_pretrained`
            (with a `config`, in the dtype the trainer gives frozen parts, `model_setup.frozen_dtype`: bf16 / fp16
            under mixed precision, with its `model_init_kwargs`, on its device; without one, in float32 on the GPU
            if there is one).
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
        from .model_setup import load_pipeline

        device = config.device if config is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = load_pipeline(pipeline, config, device)  # as the trainer loads its model
    images: list[Image.Image] = []
    device = getattr(pipeline, "device", torch.device("cpu"))
    adapter = None
    if config is not None:
        from .adapters import get_adapter

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
