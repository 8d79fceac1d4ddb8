"""Video reference data for video pipelines (Wan): the forms it may take, and clear errors when it does not fit —
all raised at construction, before any rollout."""

import numpy as np
import pytest
import torch
from conftest import brightness_reward
from datasets import Dataset
from diffusers.utils import export_to_video
from peft import LoraConfig
from PIL import Image

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.data import load_video_frames, video_to_tensor
from ddrl_trl.testing import tiny_wan_pipeline

#: Every test here refuses bad input before any rollout.
pytestmark = pytest.mark.usefixtures("no_rollouts")


def frames(count, height=20, width=24, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def build(tmp_path, videos, pipeline=None, **kw):
    values = dict(
        output_dir=str(tmp_path),
        num_generations=2,
        per_device_train_batch_size=4,
        report_to="none",
        resolution=16,
        num_frames=9,
        reference_column="video",
        max_sequence_length=16,
    )
    values.update(kw)
    dataset = Dataset.from_dict({"prompt": ["a red cat", "a blue dog"][: len(videos)], "video": videos})
    return DDRLTrainer(
        model=pipeline or tiny_wan_pipeline(),
        reward_funcs=brightness_reward,
        args=DDRLConfig(**values),
        train_dataset=dataset,
        peft_config=LoraConfig(r=2),
    )


def test_frames_arrays_and_video_files_all_load_to_the_same_frame_count(tmp_path):
    clip = frames(9, 32, 48)  # multiples of 16: ffmpeg's macro blocks, so the MP4 keeps the size
    array = np.stack([np.asarray(f) for f in clip])
    gif = tmp_path / "clip.gif"
    clip[0].save(gif, save_all=True, append_images=clip[1:])
    mp4 = export_to_video(clip, str(tmp_path / "clip.mp4"), fps=8)
    for value in (clip, array, str(gif), {"path": mp4, "bytes": None}):
        loaded = load_video_frames(value)
        assert len(loaded) == 9 and loaded[0].size == (48, 32)
    assert np.array_equal(np.asarray(load_video_frames(array)[4]), array[4])
    # a GIF of few colours is lossless: its frames decode exactly, as RGB
    solid = [Image.new("RGB", (24, 20), (40 * i, 255 - 40 * i, 128)) for i in range(5)]
    solid[0].save(tmp_path / "solid.gif", save_all=True, append_images=solid[1:])
    in_memory = {"bytes": (tmp_path / "solid.gif").read_bytes(), "path": None}
    for decoded in (load_video_frames(str(tmp_path / "solid.gif")), load_video_frames(in_memory)):
        assert [np.asarray(f).tolist() for f in decoded] == [np.asarray(f).tolist() for f in solid]
    pixels = video_to_tensor(clip, resolution=16, num_frames=9)
    assert pixels.shape == (9, 3, 16, 16) and -1 <= pixels.min() and pixels.max() <= 1


def test_video_file_column_trains_the_latents_of_its_frames(tmp_path):
    clip = [Image.new("RGB", (24, 20), (25 * i, 200 - 20 * i, 90)) for i in range(9)]  # few colours: lossless GIF
    gif = tmp_path / "clip.gif"
    clip[0].save(gif, save_all=True, append_images=clip[1:])
    from_files = build(tmp_path / "a", [str(gif), str(gif)])
    from_frames = build(tmp_path / "b", [clip, clip])
    latents = torch.tensor(np.asarray(from_files.train_dataset[0]["ddrl_ref_latents"]))
    assert latents.shape == (16, 3, 2, 2)
    torch.testing.assert_close(latents, torch.tensor(np.asarray(from_frames.train_dataset[0]["ddrl_ref_latents"])))


@pytest.mark.parametrize(
    "videos, message",
    [
        (
            [frames(9), frames(12)],
            r"Row 1 of the training dataset, column 'video': the video has 12 frames but num_frames=9",
        ),
        (
            [frames(9, 6, 6), frames(9)],
            r"Row 0 .* 6x6 px, which would be upscaled 2.67x to resolution=16 \(more than "
            r"max_reference_upscale=2\)",
        ),
        ([frames(4) + frames(5, 24, 24), frames(9)], r"Row 0 .*frames differ in size"),
        ([frames(1)[0], frames(1)[0]], r"Row 0 .*expected a video .* got a single image"),
    ],
    ids=["frame-count", "too-small", "mixed-sizes", "image-not-video"],
)
def test_videos_that_do_not_fit_are_rejected_naming_row_and_fix(tmp_path, videos, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, videos)


def test_missing_video_file_names_the_row(tmp_path):
    clip = frames(9)
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:])
    with pytest.raises(ValueError, match=r"Row 1 of the training dataset: column 'video' cannot be read as a video"):
        build(tmp_path, [str(tmp_path / "clip.gif"), str(tmp_path / "missing.mp4")])


def test_num_frames_must_fit_the_temporal_compression(tmp_path):
    with pytest.raises(ValueError, match=r"num_frames=10 does not fit Wan's VAE.*4k \+ 1 \(e.g. 9 or 13\)"):
        build(tmp_path, [frames(10), frames(10)], num_frames=10)


def test_two_expert_wan_is_refused_with_the_way_out(tmp_path):
    pipe = tiny_wan_pipeline()
    pipe.register_to_config(boundary_ratio=0.875)
    with pytest.raises(ValueError, match="two expert transformers.*transformer_2=None and boundary_ratio=None"):
        build(tmp_path, [frames(9), frames(9)], pipeline=pipe)


def test_small_videos_are_upscaled_with_a_warning_like_images(tmp_path, caplog):
    """One rule for images and videos: up to max_reference_upscale (2) a smaller reference is upscaled and reported."""
    import logging

    with caplog.at_level(logging.WARNING):
        build(tmp_path, [frames(9, 12, 12), frames(9)])
    assert any(
        "1 of 2 training reference videos are smaller than resolution=16 and were upscaled (up to 1.33x, row 0)"
        in r.getMessage()
        for r in caplog.records
    )
