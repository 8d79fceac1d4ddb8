"""Reference samples are read by what they hold: 16-bit, integer, float, channels-first, transparent and rotated
images come out as the picture they are (never white), anything ambiguous is refused naming the row and the fix;
images and videos share one upscaling rule; bad prompts are found at construction. Plain GRPO (data_beta=0) needs
prompts only; diffusers' `text` / `caption` columns are prompts; synthetic references come from a pipeline or a
folder."""

import io
import logging

import numpy as np
import pytest
import torch
from conftest import brightness_reward
from datasets import Dataset
from helpers import lora, make_args, make_trainer
from PIL import Image

from ddrl_trl import build_synthetic_reference_dataset
from ddrl_trl.data import load_image
from ddrl_trl.errors import ReferenceSampleError
from ddrl_trl.testing import tiny_sd_pipeline


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


GREY_16 = np.full((8, 8), 128 * 257, dtype=np.uint16)  # 16-bit mid-grey: 128 in 8 bits


def test_a_16_bit_png_is_grey_not_white():
    decoded = Image.open(io.BytesIO(png_bytes(Image.fromarray(GREY_16))))
    assert decoded.mode.startswith("I")  # PIL opens 16-bit greyscale as I;16 (its convert("RGB") clips to 255)
    assert (rgb(load_image(decoded)) == 128).all()
    assert (rgb(load_image(png_bytes(Image.fromarray(GREY_16)))) == 128).all()


@pytest.mark.parametrize(
    "array, expected",
    [
        (GREY_16, 128),  # uint16: 16-bit data
        (np.full((8, 8, 3), 100, dtype=np.int64), 100),  # other integers holding 0..255
        (np.full((8, 8), 200, dtype=np.int32), 200),
        (np.full((8, 8, 3), 0.5, dtype=np.float32), 128),  # floats in [0, 1]
        (np.full((8, 8, 3), 1.0004, dtype=np.float64), 255),  # within 1e-3 of the range: clipped
        (torch.full((3, 8, 8), 0.25), 64),  # a tensor, channels first
        (np.full((1, 8, 8), 0.25, dtype=np.float32), 64),
        (np.ones((8, 8), dtype=bool), 255),
        (np.full((8, 8, 3), 7, dtype=np.uint8), 7),
    ],
    ids=["uint16", "int64", "int32-grey", "float", "float-overshoot", "tensor-chw", "float-1hw", "bool", "uint8"],
)
def test_arrays_of_every_dtype_keep_their_values(array, expected):
    pixels = rgb(load_image(array))
    assert pixels.shape == (8, 8, 3) and (pixels == expected).all(), np.unique(pixels)


@pytest.mark.parametrize(
    "array, message",
    [
        (
            np.full((8, 8, 3), 100.0, dtype=np.float32),
            r"float image with values 100\.\.100: .*divide 0\.\.255 data by 255",
        ),
        (np.full((8, 8, 3), -0.5, dtype=np.float32), r"float images must lie in \[0, 1\].*\(x \+ 1\) / 2"),
        (np.full((8, 8), 300, dtype=np.int64), r"integer \(int64\) image with values 300\.\.300.*uint16"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"shape \(8, 8, 5\) is not an image"),
    ],
    ids=["float-0-255", "float-minus-one", "int-over-255", "nan", "five-channels"],
)
def test_ambiguous_arrays_are_refused_with_the_fix(array, message):
    with pytest.raises(ReferenceSampleError, match=message):
        load_image(array)


def test_pil_modes_transparency_and_orientation():
    assert (rgb(load_image(Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)))) == 64).all()  # mode F
    assert (rgb(load_image(Image.fromarray(np.full((8, 8), 200, dtype=np.int32)))) == 200).all()  # mode I, 8-bit
    with pytest.raises(ReferenceSampleError, match=r"integer \(int32\) image with values 32896\.\.32896.*uint16"):
        load_image(Image.fromarray(GREY_16.astype(np.int32)))  # mode I with 16-bit values: ambiguous, refused
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black: shows as the white page
    assert (rgb(load_image(transparent)) == 255).all()
    half = Image.new("LA", (8, 8), (0, 128))
    assert (rgb(load_image(half)) == 127).all()  # black at half opacity over white
    # a photo stored sideways with an EXIF orientation tag (3: rotate 180°) is read upright
    photo = Image.new("RGB", (16, 8), (0, 0, 0))
    photo.paste((255, 255, 255), (8, 0, 16, 8))  # right half white as stored
    exif = Image.Exif()
    exif[0x0112] = 3
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = rgb(load_image(buffer.getvalue())).astype(float)
    assert upright[:, :6].mean() > 200 and upright[:, 10:].mean() < 50  # white on the left once upright


def test_a_16_bit_reference_trains_on_the_same_latents_as_its_8_bit_twin(tmp_path):
    """What the data term anchors to: the encoded latents of a 16-bit PNG equal those of the same picture in 8 bits
    (before, the 16-bit one encoded a white image)."""
    gradient8 = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (40, 1))
    gradient16 = gradient8.astype(np.uint16) * 257
    datasets = {
        bits: Dataset.from_dict({"prompt": ["a red cat", "a blue dog"], "image": [png_bytes(Image.fromarray(a))] * 2})
        for bits, a in ((8, gradient8), (16, gradient16))
    }
    # a uint8 array column: `datasets` hands it back as nested lists of Python ints (int64 once an array again)
    datasets["array"] = Dataset.from_dict({"prompt": ["a red cat", "a blue dog"], "image": [gradient8] * 2})
    latents = {
        bits: torch.tensor(
            np.asarray(
                make_trainer(tmp_path / str(bits), data, peft_config=lora()).train_dataset[0]["ddrl_ref_latents"]
            )
        )
        for bits, data in datasets.items()
    }
    torch.testing.assert_close(latents[16], latents[8], rtol=0, atol=0)
    torch.testing.assert_close(latents["array"], latents[8], rtol=0, atol=0)


def test_a_bad_array_is_refused_at_construction_naming_the_row(tmp_path, reference_dataset):
    images = [np.asarray(im, dtype=np.float32) / 255 for im in reference_dataset["image"]]
    images[4] = images[4] * 255  # one row in 0..255
    data = Dataset.from_dict({"prompt": reference_dataset["prompt"], "image": images})
    with pytest.raises(
        ValueError,
        match=r"Row 4 of the training dataset, column 'image': a float image with values "
        r".*divide 0\.\.255 data by 255",
    ):
        make_trainer(tmp_path, data, peft_config=lora())


def test_small_images_follow_the_same_upscaling_rule_as_videos(tmp_path, caplog):
    """Upscaling is reported (one warning per dataset), and refused above max_reference_upscale (2 by default), as
    for reference videos (tests/test_video_data.py)."""
    rng = np.random.default_rng(0)

    def dataset(*sizes):
        images = [Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)) for s in sizes]
        return Dataset.from_dict(
            {"prompt": ["a red cat", "a blue dog", "a green bird"][: len(sizes)], "image": images}
        )

    with pytest.raises(
        ValueError,
        match=r"Row 1 of the training dataset, column 'image': it is 2x2 px, which would "
        r"be upscaled 16.00x to resolution=32 \(more than max_reference_upscale=2\)",
    ):
        make_trainer(tmp_path, dataset(40, 2), peft_config=lora())
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, dataset(40, 20, 24), peft_config=lora())
    warning = next(r.getMessage() for r in caplog.records if "upscaled" in r.getMessage())
    assert (
        "2 of 3 training reference images are smaller than resolution=32 and were upscaled (up to 1.60x, row 1)"
        in warning
    )
    with pytest.raises(ValueError, match=r"Row 1 .* upscaled 1.60x .*more than max_reference_upscale=1\)"):
        make_trainer(tmp_path, dataset(40, 20), peft_config=lora(), max_reference_upscale=1.0)


@pytest.mark.parametrize(
    "prompts, message",
    [
        (
            ["a red cat", None, "a green bird"],
            r"Row 1 of the training dataset: column 'prompt' holds None, not a "
            r"non-empty prompt \(1 such row\(s\) in all",
        ),
        (["a red cat", "a blue dog", ""], r"Row 2 .* holds '', not a non-empty prompt"),
        (
            ["   ", "a blue dog", "\t"],
            r"Row 0 .* holds '   '.*\(2 such row\(s\) in all, e.g. \[0, 2\]\).*dataset.filter",
        ),
        ([1, 2, 3], r"column 'prompt' holds int64 values \(row 0: 1\), not text"),
    ],
    ids=["none", "empty", "blank", "numbers"],
)
def test_bad_prompts_are_found_at_construction_before_any_encoding(
    tmp_path, reference_dataset, observe, prompts, message
):
    def forbidden(split):
        raise AssertionError("reference images were encoded before the prompts were checked")

    observe("reference_encoding", forbidden)
    data = Dataset.from_dict({"prompt": prompts, "image": reference_dataset["image"][:3]})
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, data, peft_config=lora())


# ---- what the data needs: prompts alone for plain GRPO, diffusers' column names, synthetic references from a folder


def test_plain_grpo_trains_on_prompts_alone_and_encodes_nothing(tmp_path, reference_dataset, observe):
    """data_beta=0 (plain GRPO, the README's baseline) reads no reference: prompt-only data train, the rewards are
    checked at construction on decoded random latents of the rollouts' shape, and a reference column that is there
    anyway is neither encoded nor passed to the rewards. Held-out data still need references (and are encoded)."""
    encoded = []
    observe("reference_encoding", lambda split: encoded.append(split))
    calls = []

    def reward(images, prompts, **columns):
        calls.append((tuple(images.shape), [c for c in ("label", "image") if c in columns]))
        return brightness_reward(images, prompts)

    prompt_only = reference_dataset.remove_columns("image")
    trainer = make_trainer(
        tmp_path, prompt_only, peft_config=lora(), reward=reward, data_beta=0.0, max_steps=1, num_inference_steps=2
    )
    assert calls == [((2, 3, 32, 32), ["label"])]  # the construction-time check, on images of the rollouts' size
    trainer.train()
    assert trainer.state.global_step == 1 and len(calls) == 2 and calls[1][0] == (4, 3, 32, 32)
    assert encoded == [] and trainer.train_dataset.column_names == ["prompt", "label"]

    with_images = make_trainer(tmp_path / "images", reference_dataset, peft_config=lora(), reward=reward, data_beta=0)
    assert encoded == [] and with_images.train_dataset.column_names == ["prompt", "label"]
    assert calls[-1] == ((2, 3, 32, 32), ["label"])  # the image column is not a reward column

    with pytest.raises(ValueError, match=r"evaluation dataset has no column 'image' .*held-out diffusion loss"):
        make_trainer(tmp_path / "eval", prompt_only, peft_config=lora(), data_beta=0, eval_dataset=prompt_only)
    held_out = make_trainer(
        tmp_path / "eval", prompt_only, peft_config=lora(), data_beta=0, eval_dataset=reference_dataset.select([0, 1])
    )
    assert encoded == ["evaluation"] and "ddrl_ref_latents" in held_out.eval_dataset.column_names


def test_the_data_term_without_references_names_every_fix(tmp_path, reference_dataset):
    with pytest.raises(ValueError) as info:
        make_trainer(tmp_path, reference_dataset.remove_columns("image"), peft_config=lora(), data_beta=0.3)
    message = str(info.value)
    for part in (
        "The training dataset has no column 'image' (its columns: ['prompt', 'label'])",
        "the data term (data_beta > 0) trains on them",
        "reference_column",
        "build_synthetic_reference_dataset(pipeline, prompts)",
        "--synthetic_references_per_prompt K",
        "set data_beta=0 for plain GRPO, which needs prompts only",
    ):
        assert part in message, message


@pytest.mark.parametrize("column", ["text", "caption"])
def test_diffusers_text_and_caption_columns_are_the_prompts(tmp_path, reference_dataset, caplog, column):
    """As diffusers' train_text_to_image.py reads `text` (its --caption_column default): with prompt_column left at
    "prompt" and no such column, the `text` or `caption` column holds the prompts, of the eval dataset too."""
    data = reference_dataset.rename_column("prompt", column)
    with caplog.at_level(logging.INFO, logger="ddrl_trl.data"):
        trainer = make_trainer(tmp_path, data, peft_config=lora(), eval_dataset=data.select([0, 1]))
    assert f"The training dataset has no 'prompt' column: using its {column!r} column as the prompts" in caplog.text
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch["prompts"]) <= {"a red cat", "a blue dog", "a green bird"}
    assert list(batch["columns"]) == ["label"]  # the prompts are not passed again as a reward column
    assert "ddrl_ref_latents" in trainer.eval_dataset.column_names


def test_a_missing_prompt_column_lists_the_columns_and_names_the_setting(tmp_path, reference_dataset):
    """An explicit prompt_column stays strict (no fallback to `text`); a missing one names prompt_column= and
    --prompt_column."""
    data = reference_dataset.rename_column("prompt", "text")
    with pytest.raises(
        ValueError,
        match=r"no column 'title' with the prompts \(its columns: \['text', 'image', 'label'\]\)\. Name the column "
        r"holding them with prompt_column= in DDRLConfig \(--prompt_column on the command line\), or rename it",
    ):
        make_trainer(tmp_path, data, peft_config=lora(), prompt_column="title")
    with pytest.raises(
        ValueError, match=r"no column 'prompt' .*prompt_column=.*'text' and 'caption' columns are read"
    ):
        make_trainer(tmp_path, reference_dataset.rename_column("prompt", "title"), peft_config=lora())


def test_synthetic_references_from_a_saved_pipeline_folder(tmp_path, monkeypatch):
    """`build_synthetic_reference_dataset` takes a folder (or Hub id) as the trainer does: loaded with
    `DiffusionPipeline.from_pretrained`, in the frozen parts' dtype of the config given (bf16 here), else float32; the
    same images as the pipeline object."""
    from diffusers import DiffusionPipeline

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    dtypes = []
    original = DiffusionPipeline.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        dtypes.append(kwargs.get("dtype"))  # diffusers 0.42: `dtype` (torch_dtype is deprecated)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(recording))
    prompts, kwargs = ["a red cat", "a blue dog"], dict(num_inference_steps=2, guidance_scale=1.0)
    from_folder = build_synthetic_reference_dataset(str(tmp_path / "pipe"), prompts, **kwargs)
    from_object = build_synthetic_reference_dataset(pipe, prompts, **kwargs)
    assert dtypes == [torch.float32] and from_folder["prompt"] == prompts
    assert [np.asarray(i).tolist() for i in from_folder["image"]] == [
        np.asarray(i).tolist() for i in from_object["image"]
    ]
    config = make_args(tmp_path, bf16=True, use_cpu=True, num_inference_steps=2)
    in_bf16 = build_synthetic_reference_dataset(tmp_path / "pipe", prompts[:1], config=config)
    assert dtypes[-1] == torch.bfloat16 and in_bf16[0]["image"].size == (32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts="a red cat"), r"got a single string as prompts \('a red cat'\).*pass a list of prompts"),
        (dict(prompts=["a red cat", "  ", ""]), r"prompt 1 is '  ', not a non-empty string \(2 such prompt"),
        (dict(prompts=["a red cat", None]), r"prompt 1 is None, not a non-empty string"),
        (dict(images_per_prompt=0), r"images_per_prompt must be a whole number ≥ 1, got 0"),
        (dict(images_per_prompt=float("nan")), r"images_per_prompt must be a whole number ≥ 1, got nan"),
        (dict(images_per_prompt=float("inf")), r"images_per_prompt must be a whole number ≥ 1, got inf"),
        (dict(images_per_prompt=1.5), r"images_per_prompt must be a whole number ≥ 1, got 1.5"),
    ],
    ids=["one-string", "blank", "none", "zero", "nan", "inf", "fraction"],
)
def test_synthetic_builder_refuses_bad_arguments_before_loading_or_sampling(kwargs, message):
    def never_called(**call_kwargs):
        raise AssertionError("the pipeline was called with bad arguments")

    for pipeline in (never_called, "no-such/pipeline"):  # a pipeline object, and a Hub id that is never loaded
        with pytest.raises(ValueError, match=message):
            build_synthetic_reference_dataset(**{"pipeline": pipeline, "prompts": ["a red cat"], **kwargs})
