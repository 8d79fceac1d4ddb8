"""Bad input fails at construction, before any rollout, with a message that names the problem and the fix."""

import pytest
import torch
from conftest import brightness_reward
from datasets import Dataset
from peft import LoraConfig

from ddrl_trl import DDRLConfig, DDRLTrainer, build_synthetic_reference_dataset, register_adapter
from ddrl_trl.adapters import StableDiffusionAdapter, get_adapter
from ddrl_trl.testing import tiny_sd_pipeline

#: Every test here refuses bad input before any rollout.
pytestmark = pytest.mark.usefixtures("no_rollouts")


def args(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4, report_to="none")
    values.update(kw)
    return DDRLConfig(**values)


def build(tmp_path, dataset, reward=brightness_reward, pipeline=None, **kw):
    return DDRLTrainer(
        model=pipeline or tiny_sd_pipeline(),
        reward_funcs=reward,
        args=args(tmp_path, **kw),
        train_dataset=dataset,
        peft_config=LoraConfig(r=2),
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_generations=1, per_device_train_batch_size=4), "num_generations must be at least 2"),
        (dict(num_generations=4, per_device_train_batch_size=6), "multiple of num_generations"),
        (dict(eta=0.0), r"eta must be in \(0, 1\]"),
        (dict(eta=1.5), r"eta must be in \(0, 1\].*would stop being DDIM"),
        (dict(flow_noise_level=0.0), "flow_noise_level must be > 0"),
        (dict(data_noise="fresh"), "data_noise must be one of"),
        (dict(train_step_indices=[0, 9], num_inference_steps=5), r"in \[0, 3\]"),
        (dict(scale_rewards="max"), "scale_rewards"),
        (dict(advantage_clip=0.0), "advantage_clip must be > 0"),
        (dict(advantage_clip=-1.0), "advantage_clip must be > 0"),
        (dict(reward_clip=-1.0), "reward_clip must be > 0"),
        (dict(reward_clip=0.0), "reward_clip must be > 0"),
        (dict(max_reference_upscale=0.5), "max_reference_upscale must be ≥ 1"),
        (dict(max_consecutive_nonfinite_steps=0), "max_consecutive_nonfinite_steps must be ≥ 1"),
        # NaN passes every comparison: each float field must be refused as non-finite, by name
        *[
            ({name: value}, f"{name} must be a finite number")
            for name in (
                "eta",
                "data_beta",
                "epsilon",
                "kl_beta",
                "flow_noise_level",
                "learning_rate",
                "advantage_clip",
                "reward_clip",
                "ema_decay",
                "max_grad_norm",
                "guidance_scale",
            )
            for value in (float("nan"), float("inf"), float("-inf"))
        ],
        (dict(reward_weights=[1.0, float("nan")]), "reward_weights must be a finite number"),
        (dict(reward_weights=[float("inf")]), "reward_weights must be a finite number"),
        (dict(reward_weights=[1.0, 1e39]), r"reward_weights must fit in float32"),
    ],
)
def test_config_errors(tmp_path, kwargs, message):
    base = dict(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=4, report_to="none")
    with pytest.raises(ValueError, match=message):
        DDRLConfig(**{**base, **kwargs})


def test_missing_columns(tmp_path, reference_dataset):
    with pytest.raises(ValueError, match="no column 'prompt'.*prompt_column"):  # "caption" would be read: diffusers'
        build(tmp_path, reference_dataset.rename_column("prompt", "title"))
    with pytest.raises(ValueError, match="no column 'image'.*build_synthetic_reference_dataset"):
        build(tmp_path, reference_dataset.remove_columns("image"))
    build(tmp_path, reference_dataset.rename_column("prompt", "title"), prompt_column="title")


def test_unreadable_image_names_the_row(tmp_path, reference_dataset):
    rows = reference_dataset.to_list()
    broken = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "image": [b"not an image"] * len(rows)})
    with pytest.raises(ValueError, match="Row 0 of the training dataset: column 'image' cannot be read"):
        build(tmp_path, broken)


def test_corrupt_file_in_image_feature_names_the_row(tmp_path, reference_dataset):
    from datasets import Image

    data = reference_dataset.cast_column("image", Image(decode=False)).to_dict()
    data["image"][3] = {"bytes": b"\x89PNG truncated", "path": None}
    broken = Dataset.from_dict(data).cast_column("image", Image())
    with pytest.raises(ValueError, match="Row 3 of the training dataset"):
        build(tmp_path, broken)


@pytest.mark.parametrize(
    "reward, error, message",
    [
        (lambda images, prompts, **kw: [1.0], ValueError, "returned 1 scores for 2 images"),
        (lambda images, prompts, **kw: ["good"] * len(prompts), TypeError, "returned 'good'"),
        (lambda images, prompts, **kw: 3.0, TypeError, "must return a list"),
    ],
)
def test_bad_reward_outputs(tmp_path, reference_dataset, reward, error, message):
    with pytest.raises(error, match=message):
        build(tmp_path, reference_dataset, reward=reward)


def test_reward_specs(tmp_path, reference_dataset):
    with pytest.raises(ValueError, match="Unknown reward 'aesthetics'"):
        build(tmp_path, reference_dataset, reward="aesthetics")
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1"):
        build(tmp_path, reference_dataset, reward_weights=[1.0, 2.0])
    trainer = build(tmp_path, reference_dataset, reward=["brightness", "conftest:brightness_reward"])
    assert trainer.reward_names == ["brightness", "brightness_reward"]


def test_resolution_not_supported_by_vae(tmp_path, reference_dataset):
    with pytest.raises(ValueError, match=r"resolution=18 is not supported.*multiple of 8 \(e.g. 16 or 24\)"):
        build(tmp_path, reference_dataset, resolution=18)
    build(tmp_path, reference_dataset, resolution=24)


def test_unsupported_pipeline_lists_supported_ones_and_registration_works(tmp_path, reference_dataset):
    class NotAPipeline:
        pass

    with pytest.raises(ValueError, match="no adapter for NotAPipeline.*StableDiffusionPipeline.*register_adapter"):
        get_adapter(NotAPipeline())

    class MyPipeline(type(tiny_sd_pipeline())):
        pass

    class MyAdapter(StableDiffusionAdapter):
        pipeline_classes = (MyPipeline,)

    assert type(get_adapter(MyPipeline(**tiny_sd_pipeline().components))) is StableDiffusionAdapter  # inherited
    register_adapter(MyAdapter)
    assert type(get_adapter(MyPipeline(**tiny_sd_pipeline().components))) is MyAdapter


def test_synthetic_reference_dataset_is_paired_and_seeded():
    pipe = tiny_sd_pipeline()
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0)
    first = build_synthetic_reference_dataset(pipe, ["a red cat", "a blue dog"], images_per_prompt=2, **kwargs)
    second = build_synthetic_reference_dataset(pipe, ["a red cat", "a blue dog"], images_per_prompt=2, **kwargs)
    assert first["prompt"] == ["a red cat", "a red cat", "a blue dog", "a blue dog"]
    assert first[0]["image"].size == (32, 32)
    assert first[0]["image"].tobytes() == second[0]["image"].tobytes()
    assert first[0]["image"].tobytes() != first[1]["image"].tobytes()


def test_synthetic_references_follow_the_runs_guidance(tmp_path):
    """With the run's config, references are sampled as its guided rollouts are: the same as calling the pipeline
    with that guidance scale, negative prompt and step count; not as the unguided pipeline."""
    import numpy as np

    pipe = tiny_sd_pipeline()
    config = DDRLConfig(
        output_dir=str(tmp_path), report_to="none", num_inference_steps=3, cfg_scale=5.0, negative_prompt="a blue dog"
    )
    prompts = ["a red cat", "a green bird"]
    data = build_synthetic_reference_dataset(pipe, prompts, seed=7, config=config)

    def direct(**kwargs):
        out = pipe(
            prompts, generator=torch.Generator().manual_seed(7), output_type="np", num_inference_steps=3, **kwargs
        )
        return (out.images * 255).round().astype(np.uint8)

    guided = direct(guidance_scale=5.0, negative_prompt=["a blue dog"] * 2)
    got = np.stack([np.asarray(image) for image in data["image"]])
    assert np.abs(got.astype(int) - guided.astype(int)).max() <= 1  # PIL's and our rounding of the same floats
    assert np.abs(got.astype(int) - direct(guidance_scale=1.0).astype(int)).max() > 10


def test_multi_process_launch_that_would_train_alone_is_refused(tmp_path):
    """WORLD_SIZE=2 without a distributed setup (a CPU launch without --use_cpu): each process would train alone."""
    import os
    import subprocess
    import sys

    code = (
        "from ddrl_trl import DDRLConfig; DDRLConfig(output_dir=r'%s', num_generations=2, "
        "per_device_train_batch_size=4, report_to='none')" % tmp_path
    )
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "WORLD_SIZE=2" in result.stderr and "use_cpu=True (--use_cpu)" in result.stderr
