"""Non-finite numbers never reach the weights: ±inf rewards are invalid like NaN, a step with a non-finite loss or
gradient is skipped (and counted), too many in a row stop the run, and non-finite weights are never saved."""

import logging
import math
import os

import numpy as np
import pytest
import torch
from helpers import lora, make_trainer

from ddrl_trl.checkpoints.weight_files import NonFiniteWeightsError
from ddrl_trl.monitoring.guards import NonFiniteTrainingError


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_infinite_rewards_are_invalid_like_nan_and_the_logged_std_is_the_one_used(tmp_path, reference_dataset):
    """+inf / -inf scores are excluded exactly like NaN (same weights), counted as invalid, and `reward_std` is the
    std of the rewards the advantages used (invalid ones replaced by their group's mean), computed here by hand."""
    returned: dict[str, list] = {}

    def make_reward(bad):
        def reward(images, prompts, **kwargs):
            scores = images.float().flatten(1).mean(1).tolist()
            if len(prompts) == 4:  # training batches (one group of 4), not the construction check on 2 references
                scores[0], scores[3] = bad
            returned.setdefault(bad, []).append(scores)
            return scores

        reward.__name__ = "score"
        return reward

    weights, logs = {}, {}
    for bad in [(math.inf, -math.inf), (math.nan, math.nan)]:
        trainer = make_trainer(
            tmp_path / str(bad[0]),
            reference_dataset,
            peft_config=lora(),
            reward=make_reward(bad),
            max_steps=2,
            learning_rate=1e-2,
            num_generations=4,
        )
        trainer.train()
        weights[bad[0] == math.inf], logs[bad[0] == math.inf] = lora_weights(trainer), trainer.state.log_history
    for name, value in weights[True].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, weights[False][name], rtol=0, atol=0, msg=name)
    step_logs = [h for h in logs[True] if "rewards/score/invalid" in h]
    assert [h["rewards/score/invalid"] for h in step_logs] == [2.0, 2.0]
    assert all(math.isfinite(h["loss"]) and h["nonfinite_steps"] == 0.0 for h in step_logs)
    for scores, logged in zip(returned[(math.inf, -math.inf)][1:], step_logs):
        valid = [s for s in scores if math.isfinite(s)]
        filled = [s if math.isfinite(s) else np.mean(valid) for s in scores]  # [m, a, b, m] with m = (a + b) / 2
        assert logged["reward_std"] == pytest.approx(np.std(filled, ddof=1), rel=1e-5) != np.std(valid, ddof=1)
        assert logged["reward"] == pytest.approx(np.mean([s for s in scores if math.isfinite(s)]), rel=1e-5)


def test_a_step_with_a_non_finite_loss_is_skipped_counted_and_the_next_one_trains(
    tmp_path, reference_dataset, observe, caplog
):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=2, learning_rate=1e-2)
    initial = lora_weights(trainer)
    after_step = {}

    def nan_in_first_step(step_index, terms):  # a NaN loss, and NaN gradients through it
        if trainer.state.global_step == 0:
            terms.loss, terms.policy = terms.loss * math.nan, terms.policy * math.nan

    observe("step_terms", nan_in_first_step)
    original_log = trainer.log

    def log_and_snapshot(logs, *args, **kwargs):
        after_step.setdefault(trainer.state.global_step, lora_weights(trainer))
        return original_log(logs, *args, **kwargs)

    trainer.log = log_and_snapshot
    with caplog.at_level(logging.WARNING):
        trainer.train()
    for name, value in after_step[1].items():  # step 1 was skipped: not a single weight moved, no optimizer state
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0, msg=name)
    assert not any(
        trainer.optimizer.state[p].get("step", 0) == 2 for p in trainer.model.parameters() if p.requires_grad
    )
    assert any(not torch.equal(after_step[2][n], initial[n]) for n in initial)  # step 2 trained
    assert all(torch.isfinite(v).all() for v in after_step[2].values())
    logged = [h for h in trainer.state.log_history if "nonfinite_steps" in h and "loss" in h]
    assert [h["nonfinite_steps"] for h in logged] == [1.0, 1.0]
    assert any(
        "Step 1: non-finite (NaN or infinite) loss or gradients; the optimiser step is skipped" in r.getMessage()
        for r in caplog.records
    )


def test_non_finite_gradients_in_a_row_stop_training_and_no_diverged_checkpoint_is_written(
    tmp_path, reference_dataset
):
    """Finite losses, NaN gradients (a hook poisons one LoRA weight's gradient): every step is skipped, the run stops
    after max_consecutive_nonfinite_steps=3 with an error, and the checkpoints written hold the untouched weights."""
    trainer = make_trainer(
        tmp_path, reference_dataset, peft_config=lora(), max_steps=10, save_strategy="steps", save_steps=1
    )
    initial = lora_weights(trainer)
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    param.register_hook(lambda grad: grad * math.nan)
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimiser steps in a row \(up to step 3\) had non-finite"):
        trainer.train()
    written = sorted(os.listdir(tmp_path / "out"))
    assert [n for n in written if n.startswith(("checkpoint", ".tmp"))] == ["checkpoint-1", "checkpoint-2"]
    assert "README.md" in written  # the model card of the last checkpoint, as TRL writes it
    for name, value in lora_weights(trainer).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0, msg=name)


def test_non_finite_weights_are_never_saved_over_good_ones(tmp_path, reference_dataset):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1)
    trainer.train()
    trainer.save_model()
    saved = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    before = saved.read_bytes()
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad)[0, 0] = math.inf
    with pytest.raises(
        NonFiniteWeightsError, match=r"Refusing to save to .*/out: the weight .*lora.* holds NaN or ±inf"
    ):
        trainer.save_model()
    assert saved.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]


def test_a_run_whose_every_step_was_skipped_ends_with_an_error_not_a_success(tmp_path, reference_dataset):
    """Fewer steps than max_consecutive_nonfinite_steps (2 < 3), every one with NaN gradients: before, train()
    returned normally having trained nothing; it now ends with an error saying so (the weights are untouched)."""
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=2)
    initial = lora_weights(trainer)
    next(p for p in trainer.model.parameters() if p.requires_grad).register_hook(lambda grad: grad * math.nan)
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"Nothing was trained: all 2 optimiser step\(s\) of this train\(\) call \(steps 1 to 2\) had non-finite "
        r"\(NaN or infinite\) losses or gradients and were skipped",
    ):
        trainer.train()
    assert trainer.state.global_step == 2 and trainer.nonfinite_guard.skipped_steps == 2
    for name, value in lora_weights(trainer).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0, msg=name)
