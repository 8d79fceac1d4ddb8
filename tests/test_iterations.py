"""Several optimiser steps per rollout batch (`num_iterations`, GRPO's μ): rollouts reused with their old log-probs,
the PPO clip acting, exact resume between the iterations; and the per-step timing metrics."""

import os

import pytest
import torch
from test_trainer import lora, make_trainer

import ddrl_trl.trainer as trainer_module
from ddrl_trl.data import RepeatSampler
from ddrl_trl.weight_files import CheckpointError


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_the_sampler_repeats_each_optimiser_steps_rows_per_iteration():
    plain = list(RepeatSampler(6, repeats=2, seed=3))
    assert list(RepeatSampler(6, repeats=2, seed=3, groups_per_step=2)) == plain  # no iterations: the same order
    repeated = list(RepeatSampler(6, repeats=2, seed=3, iterations=3, groups_per_step=2))
    assert len(repeated) == len(RepeatSampler(6, 2, iterations=3)) == 36
    steps = [plain[i : i + 4] for i in range(0, 12, 4)]  # 2 groups of 2 rows per optimiser step
    assert repeated == [row for step in steps for _ in range(3) for row in step]


def test_rollouts_are_reused_and_the_clip_acts_from_the_second_iteration(tmp_path, reference_dataset, monkeypatch):
    calls, ratios = [], []
    original_rollout, original_loss = trainer_module.rollout_and_score, trainer_module.clipped_policy_loss

    def counting_rollout(*args, **kwargs):
        calls.append(trainer.state.global_step)
        return original_rollout(*args, **kwargs)

    def recording_loss(*args, **kwargs):
        out = original_loss(*args, **kwargs)
        ratios.append((trainer.state.global_step, out[1]))
        return out

    monkeypatch.setattr(trainer_module, "rollout_and_score", counting_rollout)
    monkeypatch.setattr(trainer_module, "clipped_policy_loss", recording_loss)
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


def test_resuming_between_the_iterations_of_a_batch_is_exact(tmp_path, reference_dataset):
    straight = make_trainer(
        tmp_path / "straight",
        reference_dataset,
        peft_config=lora(),
        num_iterations=2,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
    )
    straight.train()
    out = tmp_path / "straight" / "out"
    assert (out / "checkpoint-1" / "rollout_buffer_0.pt").is_file()  # between the two iterations of batch 1
    assert not (out / "checkpoint-2" / "rollout_buffer_0.pt").exists()  # the next step rolls out afresh
    resumed = make_trainer(
        tmp_path / "resumed", reference_dataset, peft_config=lora(), num_iterations=2, max_steps=4, learning_rate=1e-2
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    expected = lora_weights(straight)
    for name, value in lora_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    os.remove(out / "checkpoint-3" / "rollout_buffer_0.pt")
    again = make_trainer(tmp_path / "again", reference_dataset, peft_config=lora(), num_iterations=2, max_steps=4)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-3 is incomplete: it lacks rollout_buffer_0.pt \(this "
        r"process's rollout batch: the checkpoint is between the "
        r"num_iterations=2 steps",
    ):
        again.train(resume_from_checkpoint=str(out / "checkpoint-3"))


def test_one_iteration_logs_timings_every_step(tmp_path, reference_dataset):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora())
    trainer.train()
    for log in [h for h in trainer.state.log_history if "loss" in h]:
        assert log["time/rollout"] > 0 and log["time/train"] > 0 and log["time/reward"] >= 0
        assert log["images_per_second"] > 0
