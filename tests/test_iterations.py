"""Several optimiser steps per rollout batch (`num_iterations`, GRPO's μ): rollouts reused with their old log-probs,
the PPO clip acting, exact resume between the iterations; and the per-step timing metrics."""

import os
import time

import pytest
import torch
from helpers import lora, make_trainer

from ddrl_trl.checkpoints.weight_files import CheckpointError
from ddrl_trl.data import RepeatSampler


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_the_sampler_repeats_each_optimiser_steps_rows_per_iteration():
    plain = list(RepeatSampler(6, repeats=2, seed=3))
    assert list(RepeatSampler(6, repeats=2, seed=3, groups_per_step=2)) == plain  # no iterations: the same order
    repeated = list(RepeatSampler(6, repeats=2, seed=3, iterations=3, groups_per_step=2))
    assert len(repeated) == len(RepeatSampler(6, 2, iterations=3)) == 36
    steps = [plain[i : i + 4] for i in range(0, 12, 4)]  # 2 groups of 2 rows per optimiser step
    assert repeated == [row for step in steps for _ in range(3) for row in step]


def test_rollouts_are_reused_and_the_clip_acts_from_the_second_iteration(tmp_path, reference_dataset, observe):
    calls, ratios = [], []
    observe("rollout_start", lambda rows: calls.append(trainer.state.global_step))
    observe("step_terms", lambda terms, **_: ratios.append((trainer.state.global_step, terms.ratio)))
    trainer = make_trainer(
        tmp_path, reference_dataset, peft_config=lora(), num_iterations=2, max_steps=4, learning_rate=3e-2
    )
    trainer.train()
    assert calls == [0, 2]  # one rollout per two optimiser steps
    deviation = {step: max((r - 1).abs().max().item() for s, r in ratios if s == step) for step in range(4)}
    assert deviation[0] < 1e-5 and deviation[2] < 1e-5  # on-policy at each fresh batch
    assert deviation[1] > 1e-4 and deviation[3] > 1e-4  # the policy moved since the rollout
    logs = {h["step"]: h for h in trainer.state.log_history if "clip_fraction" in h}
    assert logs[1]["clip_fraction"] == 0.0 and logs[2]["clip_fraction"] > 0 and logs[4]["clip_fraction"] > 0
    # timings: every step trains; only the steps that rolled out report rollout, reward and throughput
    assert all(logs[s]["time/train"] > 0 for s in logs)
    assert {s for s in logs if "time/rollout" in logs[s]} == {1, 3}
    assert all(
        logs[s]["time/rollout"] > 0 and logs[s]["time/reward"] >= 0 and logs[s]["images_per_second"] > 0
        for s in (1, 3)
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resuming_between_the_iterations_of_a_batch_is_exact(tmp_path, reference_dataset, accumulation):
    """With gradient accumulation the saved batch holds one rollout batch per micro-step."""
    reference_dataset = reference_dataset.select(range(3 if accumulation == 1 else 6))
    straight = make_trainer(
        tmp_path / "straight",
        reference_dataset,
        peft_config=lora(),
        num_iterations=2,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
        gradient_accumulation_steps=accumulation,
    )
    straight.train()
    out = tmp_path / "straight" / "out"
    saved = torch.load(out / "checkpoint-1" / "rollout_buffer_0.pt", weights_only=True)  # between batch 1's iterations
    assert sorted(saved) == list(range(accumulation))  # one rollout batch per micro-step
    assert not (out / "checkpoint-2" / "rollout_buffer_0.pt").exists()  # the next step rolls out afresh
    resumed = make_trainer(
        tmp_path / "resumed",
        reference_dataset,
        peft_config=lora(),
        num_iterations=2,
        max_steps=4,
        learning_rate=1e-2,
        gradient_accumulation_steps=accumulation,
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    expected = lora_weights(straight)
    for name, value in lora_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    os.remove(out / "checkpoint-3" / "rollout_buffer_0.pt")
    again = make_trainer(
        tmp_path / "again",
        reference_dataset,
        peft_config=lora(),
        num_iterations=2,
        max_steps=4,
        gradient_accumulation_steps=accumulation,
    )
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-3 is incomplete: it lacks rollout_buffer_0.pt \(this "
        r"process's rollout batch: the checkpoint is between the "
        r"num_iterations=2 steps",
    ):
        again.train(resume_from_checkpoint=str(out / "checkpoint-3"))


def test_the_clip_acts_according_to_how_far_the_policy_moved(tmp_path, reference_dataset):
    """With ε = 1e-3 the second iteration is clipped after a large step, and not after a tiny one."""
    fractions = {}
    for lr in (1e-7, 3e-2):
        trainer = make_trainer(
            tmp_path / str(lr), reference_dataset, peft_config=lora(), num_iterations=2, max_steps=2, epsilon=1e-3,
            learning_rate=lr,
        )  # fmt: skip
        trainer.train()
        fractions[lr] = [h["clip_fraction"] for h in trainer.state.log_history if "clip_fraction" in h]
    assert fractions[1e-7] == [0.0, 0.0] and fractions[3e-2][0] == 0.0 and fractions[3e-2][1] > 0


def test_timings_are_logged_every_step_and_the_reward_wait_includes_scoring(tmp_path, reference_dataset):
    def slow_reward(images, prompts, **kwargs):
        time.sleep(0.2)
        return images.float().flatten(1).mean(1).tolist()

    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), reward=slow_reward)
    trainer.train()
    for log in [h for h in trainer.state.log_history if "loss" in h]:
        assert log["time/rollout"] > 0 and log["time/train"] > 0 and log["time/reward"] >= 0.2
        assert log["images_per_second"] > 0


def test_epochs_that_end_on_a_partial_step_drop_it_and_go_on(tmp_path, reference_dataset):
    """5 prompts, 2 per optimiser step, 2 iterations: each epoch has two whole steps (four optimiser steps); the fifth
    prompt is left out, as TRL's sampler does. Before, the partial step's copies were batched together and the next
    epoch's first reuse failed."""
    five = reference_dataset.select(range(5))
    trainer = make_trainer(tmp_path, five, peft_config=lora(), num_iterations=2, max_steps=8)
    sampler = trainer._get_train_sampler()
    assert len(sampler) == 4 * 2 * 2 and all(len(set(list(sampler)[i : i + 4])) == 2 for i in range(0, 16, 4))
    trainer.train()
    assert trainer.state.global_step == 8 and trainer.state.epoch > 1  # into the second epoch
    with pytest.raises(
        ValueError,
        match=r"num_iterations=2 reuses whole optimiser steps of 4 prompts, but the "
        r"training dataset has 3: lower per_device_train_batch_size",
    ):
        make_trainer(
            tmp_path / "small",
            reference_dataset.select(range(3)),
            peft_config=lora(),
            num_iterations=2,
            gradient_accumulation_steps=2,
        )
