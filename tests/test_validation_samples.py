"""Validation samples: fixed prompts and seeds give the same grid every time; evaluation rewards and diversity equal a
hand computation on those samples; grids on disk, at `validation_steps` and at the end; the hacking monitor's
validation signals; the model card's gallery; refusals before any work."""

import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import lora, make_trainer
from PIL import Image

from ddrl_trl import HackingMonitorCallback
from ddrl_trl.core.diversity import within_prompt_diversity
from ddrl_trl.rewards import brightness

PROMPTS = ["a red cat", "a blue dog"]


def test_within_prompt_diversity_by_hand():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])  # prompt 0: distance 5; prompt 1: identical
    assert within_prompt_diversity(z, 2).item() == pytest.approx((5 / 2**0.5 + 0) / 2)
    three = torch.tensor([[0.0], [1.0], [3.0]])  # pairs 1, 3, 2 over √1
    assert within_prompt_diversity(three, 3).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="≥ 2 samples per prompt"):
        within_prompt_diversity(three, 2)


def darkness(images, prompts, **kwargs):
    """An evaluation reward (not trained on): 1 − brightness; None for the second prompt's samples."""
    return [None if p == PROMPTS[1] else 1 - v for p, v in zip(prompts, brightness(images, prompts))]


def validating_trainer(tmp_path, **kw):
    values = dict(validation_prompts=PROMPTS, validation_images_per_prompt=3, per_device_eval_batch_size=4, **kw)
    return make_trainer(tmp_path, _dataset(), peft_config=lora(), eval_reward_funcs=[darkness], **values)


def _dataset(extra_column: bool = False):
    rng = np.random.default_rng(0)
    values = {
        "prompt": ["a red cat", "a blue dog", "a green bird", "a white house"],
        "image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)],
    }
    if extra_column:
        values["score"] = [0.25, 0.5, 0.75, 1.0]
    return Dataset.from_dict(values)


def test_fixed_seeds_reproduce_the_grid_and_rewards_equal_a_hand_computation(tmp_path):
    trainer = validating_trainer(tmp_path / "a", max_steps=2, learning_rate=1e-2)
    first = trainer.validate()
    images = trainer.reporter.last_validation.images
    assert images.shape[0] == 6 and trainer.validator.base.images.shape == images.shape
    # the LoRA starts as the identity: the step-0 samples are the base model's, on the same seeds
    torch.testing.assert_close(images, trainer.validator.base.images, rtol=0, atol=0)
    assert first["eval_diversity_ratio"] == pytest.approx(1.0) and first["eval_diversity"] > 0
    # evaluation rewards: the mean over the samples each reward scored, by hand
    by_hand = images.flatten(1).mean(dim=1)
    assert first["eval_rewards/brightness_reward"] == pytest.approx(by_hand.mean().item(), rel=1e-6)
    assert first["eval_rewards/darkness"] == pytest.approx(1 - by_hand[:3].mean().item(), rel=1e-6)
    # the same grid again, and from a fresh trainer with the same seed
    again = trainer.validate()
    assert again == first
    torch.testing.assert_close(trainer.reporter.last_validation.images, images, rtol=0, atol=0)
    other = validating_trainer(tmp_path / "b")
    other.validate()
    torch.testing.assert_close(other.reporter.last_validation.images, images, rtol=0, atol=0)
    # the grid on disk: 2 prompt rows of 3 samples (rollouts are 32 px here, upscaled 4× to 128 px), 4 px apart, each
    # row under an 18 px caption strip
    saved = Image.open(tmp_path / "a" / "out" / "validation" / "step-000000.png")
    assert saved.size == (3 * 128 + 4 * 4, 2 * (18 + 128 + 4) + 4)
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(trainer.reporter.last_validation.grid))
    # training moves the samples away from the base's, on the same seeds
    trainer.train()
    assert not torch.equal(trainer.reporter.last_validation.images, images)


def test_validation_every_k_steps_and_at_the_end_without_an_eval_dataset(tmp_path):
    trainer = validating_trainer(tmp_path, max_steps=3, validation_steps=2)
    trainer.train()
    validated = [h["step"] for h in trainer.state.log_history if "eval_diversity" in h]
    assert validated == [2, 3]
    # the validations at steps 2 and 3 left those steps' training logs in place
    assert [h["step"] for h in trainer.state.log_history if "loss" in h and "reward" in h] == [1, 2, 3]
    grids = sorted(p.name for p in (tmp_path / "out" / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000003.png"]


def test_validation_is_not_sampled_twice_when_an_evaluation_falls_on_the_same_step(tmp_path, reference_dataset):
    trainer = validating_trainer(
        tmp_path, max_steps=3, validation_steps=2, eval_strategy="steps", eval_steps=2, eval_dataset=reference_dataset
    )
    sampled = []
    run = trainer.validator.run

    def recording(policy, *args, **kwargs):
        sampled.append((trainer.state.global_step, "model" if policy is trainer.policy else "base"))
        return run(policy, *args, **kwargs)

    trainer.validator.run = recording
    trainer.train()
    validated = [h["step"] for h in trainer.state.log_history if "eval_diversity" in h]
    assert validated == [2, 3] and sampled == [(2, "base"), (2, "model"), (3, "model")]


def test_eval_dataset_rows_give_prompts_and_columns_to_the_rewards(tmp_path):
    seen = []

    def column_reward(images, prompts, score, **kwargs):
        seen.append((list(prompts), list(score)))
        return [float(s) for s in score]

    dataset = _dataset(extra_column=True)
    trainer = make_trainer(
        tmp_path,
        dataset,
        peft_config=lora(),
        eval_dataset=dataset,
        eval_reward_funcs=[column_reward],
        num_validation_prompts=2,
        validation_images_per_prompt=2,
    )
    metrics = trainer.evaluate()
    assert "eval_diffusion_loss_ratio" in metrics and metrics["eval_rewards/column_reward"] == pytest.approx(0.375)
    assert (["a red cat", "a red cat", "a blue dog", "a blue dog"], [0.25, 0.25, 0.5, 0.5]) in seen


def test_bad_validation_settings_fail_before_any_work(tmp_path, reference_dataset):
    with pytest.raises(ValueError, match="validation_steps is set but there is nothing to validate on"):
        make_trainer(tmp_path, reference_dataset, validation_steps=2)
    # a string is one prompt (a YAML scalar), never a list of one-character prompts; blank prompts are refused
    single = make_trainer(tmp_path, reference_dataset, validation_prompts="a red cat")
    assert single.validator.prompts.prompts == ["a red cat"]
    with pytest.raises(ValueError, match=r"validation_prompts must be non-blank strings; entry 1 is ' '"):
        make_trainer(tmp_path, reference_dataset, validation_prompts=["a cat", " "])
    with pytest.raises(ValueError, match="validation_images_per_prompt must be ≥ 2"):
        make_trainer(tmp_path, reference_dataset, validation_prompts=PROMPTS, validation_images_per_prompt=1)
    with pytest.raises(ValueError, match="Reward names must be distinct"):
        make_trainer(tmp_path, reference_dataset, eval_reward_funcs=["brightness", brightness])
    with pytest.raises(ValueError, match="eval_reward_funcs score the validation samples, but there are none"):
        make_trainer(tmp_path, reference_dataset, eval_reward_funcs=[darkness])
    with pytest.raises(ValueError, match="num_validation_prompts=2 takes the validation prompts from the eval"):
        make_trainer(tmp_path, reference_dataset, num_validation_prompts=2)

    def needs_column(images, prompts, score, **kwargs):
        return [0.0] * len(images)

    with pytest.raises(TypeError, match="validation_prompts carry no dataset columns"):
        make_trainer(tmp_path, reference_dataset, validation_prompts=PROMPTS, eval_reward_funcs=[needs_column])


def test_monitor_acts_on_falling_eval_rewards_and_collapsing_diversity(tmp_path, caplog):
    monitor = HackingMonitorCallback(watch=("eval_rewards", "diversity"), last_good_dir=None, stop_training=True)
    trainer = validating_trainer(tmp_path, callbacks=[monitor])
    metrics = trainer.validate()  # step 0: the base itself
    assert monitor.last_good_step == 0 and monitor.hacking_step is None
    args, state, control = trainer.args, trainer.state, trainer.control
    base = trainer.validator.base.rewards["darkness"]
    state.global_step = 5
    with caplog.at_level(logging.WARNING):
        monitor.on_evaluate(args, state, control, {**metrics, "eval_rewards/darkness": base * 0.95})
        assert monitor.hacking_step is None  # a 5 % fall is within max_eval_reward_drop
        monitor.on_evaluate(args, state, control, {**metrics, "eval_rewards/darkness": base * 0.8})
        assert monitor.hacking_step == 5 and control.should_training_stop
        monitor.on_evaluate(args, state, control, {**metrics, "eval_diversity_ratio": 0.3})
        # a judge that scored the base's samples but none of the model's: hacking, not "unmeasured"
        monitor.on_evaluate(args, state, control, {**metrics, "eval_rewards/darkness": float("nan")})
    # a validation without the held-out loss cannot show a run watched on both to be good
    both = HackingMonitorCallback(watch=("loss_ratio", "diversity"), last_good_dir=None)
    both.bind(validating_trainer(tmp_path / "both", eval_dataset=_dataset()))
    both.on_evaluate(args, state, control, {"eval_diversity_ratio": 0.9})
    assert both.last_good_step is None
    both.on_evaluate(args, state, control, {"eval_diversity_ratio": 0.9, "eval_diffusion_loss_ratio": 1.0})
    assert both.last_good_step == 5
    warnings = [r.getMessage() for r in caplog.records if "Reward hacking suspected" in r.getMessage()]
    assert "the evaluation reward 'darkness' fell to" in warnings[0] and "(more than 10%)" in warnings[0]
    assert "diversity is 0.30× the base model's (minimum 0.50)" in warnings[1]
    assert (
        f"the evaluation reward 'darkness' scored none of the model's validation samples (it scored the base model's: "
        f"{base:.4g})" in warnings[2]
    )
    assert not any("could not measure" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="no eval_reward_funcs"):
        make_trainer(
            tmp_path,
            _dataset(),
            validation_prompts=PROMPTS,
            callbacks=[HackingMonitorCallback(watch=["eval_rewards"])],
        )
    with pytest.raises(ValueError, match="watch must name one or more of"):
        HackingMonitorCallback(watch=["vibes"])


def test_model_card_shows_the_validation_gallery(tmp_path):
    trainer = validating_trainer(tmp_path, target_loss_ratio=1.05)
    trainer.validate()
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "widget:\n- text: a red cat\n  output:\n    url: image_0.png\n- text: a blue dog" in card
    assert "## Validation samples (step 0)" in card and "![validation samples](validation.png)" in card
    assert "data_beta adapted from 0.3 to 0.3 to hold the data loss ratio at 1.05" in card
    first = np.asarray(Image.open(tmp_path / "out" / "image_1.png"))
    np.testing.assert_array_equal(
        first, (trainer.reporter.last_validation.images[3].permute(1, 2, 0) * 255).round().byte().numpy()
    )


def test_a_failing_evaluation_reward_or_a_full_disk_never_costs_the_checkpoint(tmp_path, caplog, monkeypatch):
    """At the last step an evaluation reward raises, another returns the wrong count and the disk is full for the
    grid and the model card: every checkpoint is still written, the rewards log NaN with a warning naming them, the
    grid and the card a warning each, no `.tmp` stays."""

    def flaky(prompts, completions, trainer_state, **kwargs):
        if trainer_state.global_step == 2:
            raise RuntimeError("judge server down")
        return [0.5] * len(prompts)

    def short(prompts, completions, trainer_state, **kwargs):
        return [0.5] * (len(prompts) - (trainer_state.global_step == 2))

    save = Image.Image.save

    def full_disk(image, fp, *args, **kwargs):
        if isinstance(fp, str) and "step-000002.png" in fp:
            with open(fp, "wb") as file:
                file.write(b"\x89PNG half")
            raise OSError(28, "No space left on device", fp)
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    from matplotlib.figure import Figure

    def no_space(*args, **kwargs):  # the model card written with each checkpoint: its curves' image
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", no_space)
    trainer = make_trainer(
        tmp_path,
        _dataset(),
        peft_config=lora(),
        validation_prompts=PROMPTS,
        validation_images_per_prompt=2,
        eval_reward_funcs=[flaky, short],
        save_strategy="steps",
        save_steps=1,
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    last = [h for h in trainer.state.log_history if "eval_rewards/flaky" in h][-1]
    assert last["step"] == 2 and np.isnan(last["eval_rewards/flaky"]) and np.isnan(last["eval_rewards/short"])
    assert not np.isnan(last["eval_rewards/brightness_reward"])
    # the failures are logged as such (the hacking monitor reads them as unmeasured, not as a hacked judge)
    assert last["eval_rewards/flaky/failed"] == last["eval_rewards/short/failed"] == 1.0
    assert "eval_rewards/brightness_reward/failed" not in last
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "reward 'flaky' failed on the validation samples (RuntimeError: judge server down)" in messages
    assert "reward 'short' failed on the validation samples (ValueError" in messages
    assert f"Could not write the validation grid {out / 'validation' / 'step-000002.png'}" in messages
    assert f"Could not write the model card in {out} (OSError: [Errno 28] No space left on device)" in messages
    assert (out / "checkpoint-1").is_dir() and not list(out.glob("*.tmp"))
    assert sorted(p.name for p in (out / "validation").iterdir()) == []  # no half-written grid, no .tmp


def test_grids_upscale_small_tiles_keep_gaps_and_caption_each_row():
    from ddrl_trl.monitoring.tracking import image_grid

    images = torch.rand(5, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    captions = ["a red cat", "a red cat", "a blue dog", "a blue dog", "a blue dog"]
    grid = np.asarray(image_grid(images, cols=2, captions=captions))
    # 16 px tiles upscaled by 8 (the whole factor reaching 128 px) to 128 × 192; 3 rows; 4 px gaps; 18 px captions
    assert grid.shape == (3 * (18 + 128 + 4) + 4, 2 * 192 + 3 * 4, 3)
    tile = np.asarray(Image.fromarray((images[3].permute(1, 2, 0) * 255).round().byte().numpy()))
    top, left = 4 + (18 + 128 + 4) + 18, 4 + 192 + 4  # row 1, column 1: image 3
    np.testing.assert_array_equal(grid[top : top + 128 : 8, left : left + 192 : 8], tile)
    assert (grid[:, left - 4 : left] == 255).all()  # the gap between columns is white
    assert (grid[4 + 2 : 4 + 16, 4:200] < 128).any()  # row 0's caption is written...
    assert (grid[4 + 150 + 2 : 4 + 150 + 16, 4:400] < 128).any()  # ...and row 1's ("a red cat | a blue dog")
    assert (grid[2 * 150 + 4 + 18 :, left:] == 255).all()  # the sixth place, with no image, stays background
    plain = image_grid(torch.rand(4, 3, 256, 256))  # big tiles are not scaled, and no caption strip without captions
    assert plain.size == (2 * 256 + 3 * 4, 2 * (256 + 4) + 4)
