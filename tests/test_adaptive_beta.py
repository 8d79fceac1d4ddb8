"""Adaptive data_beta (`target_loss_ratio`): the controller's update by hand, its direction on a synthetic signal, its
signal and β in the logs, its state across checkpoint and resume, and the config's refusals."""

import dataclasses
import json
import logging
import math

import pytest
import torch
from helpers import lora, make_args, make_trainer

from ddrl_trl.core.data_beta import AdaptiveDataBeta


def test_controller_update_by_hand():
    c = AdaptiveDataBeta(value=0.3, target=1.05, rate=0.05, smoothing=0.8, min_value=0.01, max_value=10.0)
    assert c.update(1.10) == pytest.approx(0.3 * math.exp(0.05))  # s = 1.10, e = +1
    assert c.update(1.10) == pytest.approx(0.3 * math.exp(0.10))
    # s = 0.8 · 1.10 + 0.2 · 1.00 = 1.08, e = (1.08 − 1.05) / 0.05 = 0.6
    assert c.update(1.00) == pytest.approx(0.3 * math.exp(0.10 + 0.05 * 0.6))
    assert c.signal == pytest.approx(1.08) and c.updates == 3
    before = c.state_dict()
    assert c.update(float("nan")) == before["value"] and c.update(0.0) == before["value"]  # ignored
    assert c.state_dict() == before


@pytest.mark.parametrize("ratio, direction", [(1.3, 1), (1.0, -1), (0.97, -1)])
def test_controller_moves_beta_the_right_way_and_stays_in_bounds(ratio, direction):
    c = AdaptiveDataBeta.starting_at(0.3, target=1.05, rate=0.2)
    values = [c.update(ratio) for _ in range(60)]
    steps = [b - a for a, b in zip([0.3, *values], values)]
    assert all(step * direction >= 0 for step in steps) and values[0] != 0.3
    assert values[-1] == pytest.approx(30.0 if direction > 0 else 0.003)  # clamped at 100× / ÷100


def test_controller_holds_still_at_the_target_and_round_trips_its_state():
    c = AdaptiveDataBeta.starting_at(0.3, target=1.05, rate=0.05)
    assert c.update(1.05) == pytest.approx(0.3)
    c.update(1.2)
    restored = AdaptiveDataBeta.starting_at(0.3, target=1.05, rate=0.05)
    restored.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert restored == c
    # resumed with another target and rate: where the controller was is restored, the new settings apply
    changed = AdaptiveDataBeta.starting_at(0.3, target=1.10, rate=0.2)
    changed.load_state_dict(c.state_dict())
    assert (changed.value, changed.signal, changed.updates) == (c.value, c.signal, 2)
    assert (changed.target, changed.rate) == (1.10, 0.2)
    with pytest.raises(ValueError, match="finite"):
        restored.load_state_dict({**c.state_dict(), "value": float("nan")})
    with pytest.raises(ValueError, match="> 1"):
        AdaptiveDataBeta(value=0.3, target=1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target_loss_ratio=1.0), "target_loss_ratio must be > 1"),
        (dict(target_loss_ratio=1.05, data_beta=0.0), "data_beta=0 turns the data term off"),
        (dict(target_loss_ratio=1.05, data_beta_adapt_rate=0.0), r"data_beta_adapt_rate must be in \(0, 1\]"),
        (dict(target_loss_ratio=float("inf")), "target_loss_ratio must be a finite number"),
    ],
)
def test_config_refuses_bad_adaptive_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def replay(log_history, start, target, rate):
    """β of each logged step, recomputed by hand from the logged signal of the steps before it."""
    controller = AdaptiveDataBeta.starting_at(start, target, rate)
    expected = []
    for entry in [h for h in log_history if "data_beta" in h]:
        expected.append(controller.value)
        controller.update(entry["data_beta/loss_ratio"])
    return expected


def shifted(output, by: float):
    """A `PolicyOutput` with every output moved by `by`."""
    extra = output.extra + by if output.extra is not None else None
    return dataclasses.replace(output, policy=output.policy + by, conditional=output.conditional + by, extra=extra)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_trainer_moves_data_beta_with_the_measured_signal(tmp_path, reference_dataset, direction):
    """A policy whose output is shifted away from the base's has a data loss ratio above the target, so β rises; a
    base shifted instead gives a ratio under 1, so β falls. Each logged β is the controller's update of the logged
    signals before it."""
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=3, target_loss_ratio=1.05)
    if direction == "up":  # every forward but the base model's (inside `reference.forward`) is shifted
        predict, base_forward, in_base = trainer.adapter.predict, trainer.reference.forward, []

        def base(*args, **kwargs):
            in_base.append(True)
            try:
                return base_forward(*args, **kwargs)
            finally:
                in_base.pop()

        trainer.reference.forward = base
        trainer.adapter.predict = lambda *a, **k: predict(*a, **k) + (0.0 if in_base else 1.0)
    else:
        forward = trainer.reference.forward
        trainer.reference.forward = lambda *a, **k: shifted(forward(*a, **k), 1.0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "data_beta" in h]
    ratios = [h["data_beta/loss_ratio"] for h in logged]
    betas = [h["data_beta"] for h in logged]
    assert len(logged) == 3 and betas[0] == pytest.approx(0.3)  # DDRLConfig's default data_beta is the start
    if direction == "up":
        assert all(r > 1.1 for r in ratios) and betas[0] < betas[1] < betas[2] < trainer.data_beta
    else:
        assert all(r < 1.0 for r in ratios) and betas[0] > betas[1] > betas[2] > trainer.data_beta
    assert betas == pytest.approx(replay(trainer.state.log_history, 0.3, 1.05, 0.05), rel=1e-6)


def test_signal_is_the_policys_data_loss_over_the_base_models_on_the_same_rows(tmp_path, reference_dataset):
    """With the base's output replaced by the policy's own, the ratio is exactly 1; the logged loss/data is the
    numerator."""
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1, target_loss_ratio=1.05)
    trainer.reference.forward = trainer.policy.forward
    trainer.train()
    (entry,) = [h for h in trainer.state.log_history if "data_beta" in h]
    assert entry["data_beta/loss_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert trainer.data_beta == pytest.approx(0.3 * math.exp(-0.05))  # ratio 1 is under the target: e = −1


@pytest.mark.parametrize("use_lora", [True, False])
def test_resume_restores_the_controller_and_continues_like_an_uninterrupted_run(tmp_path, reference_dataset, use_lora):
    """Full fine-tuning keeps a frozen copy of the base for the signal. The checkpoint's ddrl_run.json holds the
    controller's state after its step; resuming from it gives the uninterrupted run's β and weights."""

    def run(name, **kw):
        peft = lora() if use_lora else None
        kw = dict(max_steps=4, target_loss_ratio=1.05, data_beta_adapt_rate=0.5, **kw)
        return make_trainer(tmp_path / name, reference_dataset, peft_config=peft, **kw)

    straight = run("straight")
    if not use_lora:
        assert straight.reference.frozen_copy is not None
    straight.train()
    saved = run("saved", save_strategy="steps", save_steps=2)
    saved.train()
    info = json.loads((tmp_path / "saved" / "out" / "checkpoint-2" / "ddrl_run.json").read_text())
    assert info["data_beta_controller"]["updates"] == 2
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "saved" / "out" / "checkpoint-2"))
    assert resumed.data_beta_control.state_dict() == pytest.approx(straight.data_beta_control.state_dict())
    assert resumed.data_beta != 0.3
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_resuming_a_checkpoint_without_controller_state_warns_and_starts_from_data_beta(
    tmp_path, reference_dataset, caplog
):
    make_trainer(tmp_path, reference_dataset, peft_config=lora(), save_strategy="steps", save_steps=1).train()
    resumed = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=3, target_loss_ratio=1.05)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert "holds no adaptive data_beta state" in caplog.text
    assert resumed.data_beta_control.controller.updates == 1
