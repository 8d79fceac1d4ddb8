"""HackingMonitorCallback: periodic held-out loss ratio, a warning past the threshold, optional stop, last good
weights."""

import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import HACKING_THRESHOLD as THRESHOLD
from helpers import assert_reloads_to_trained_outputs, hacking_trainer, lora, make_trainer
from safetensors.torch import load_file

from ddrl_trl import HackingMonitorCallback
from ddrl_trl.testing import tiny_sd_pipeline


def test_stops_at_the_first_hacked_evaluation_and_keeps_the_last_good_weights(tmp_path, reference_dataset, caplog):
    monitor = HackingMonitorCallback(threshold=THRESHOLD, eval_steps=1, stop_training=True)
    trainer = hacking_trainer(tmp_path, reference_dataset, monitor)
    snapshots = {}
    original_save = trainer.save_model

    def recording_save(output_dir=None, _internal_call=False):
        snapshots[trainer.state.global_step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        return original_save(output_dir, _internal_call)

    trainer.save_model = recording_save
    with caplog.at_level(logging.WARNING):
        trainer.train()
    ratios = [h["eval_diffusion_loss_ratio"] for h in trainer.state.log_history if "eval_diffusion_loss_ratio" in h]
    assert ratios[-1] > THRESHOLD and all(r <= THRESHOLD for r in ratios[:-1])
    assert monitor.hacking_step == trainer.state.global_step == len(ratios) < 8  # stopped right there
    assert monitor.last_good_step == monitor.hacking_step - 1
    warning = next(r.getMessage() for r in caplog.records if "Reward hacking suspected" in r.getMessage())
    assert f"step {monitor.hacking_step}" in warning and "Stopping training" in warning
    assert f"step {monitor.last_good_step} are in {tmp_path / 'out' / 'last-good'}" in warning
    # last-good holds the weights of the last good step, not the final (hacked) ones
    saved = load_file(tmp_path / "out" / "last-good" / "unet" / "diffusion_pytorch_model.safetensors")
    good, final = snapshots[monitor.last_good_step], trainer.model.state_dict()
    for key in ("conv_in.weight", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"):
        torch.testing.assert_close(saved[key], good[key], rtol=0, atol=0)
        assert not torch.equal(saved[key], final[key])
    logged = [h for h in trainer.state.log_history if "hacking/detected" in h]
    assert [h["hacking/detected"] for h in logged] == [0.0] * (len(ratios) - 1) + [1.0]


def test_warns_but_keeps_training_without_stop(tmp_path, reference_dataset, caplog):
    monitor = HackingMonitorCallback(threshold=THRESHOLD, eval_steps=2, stop_training=False)
    trainer = hacking_trainer(tmp_path, reference_dataset, monitor)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 8
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_diffusion_loss_ratio" in h]
    assert evaluated == [2, 4, 6, 8]
    assert any("Training goes on" in r.getMessage() for r in caplog.records)


def test_needs_held_out_data_and_sane_settings(tmp_path, reference_dataset, observe):
    def forbidden(split):
        raise AssertionError("reference data were encoded before the input was checked")

    observe("reference_encoding", forbidden)
    with pytest.raises(ValueError, match="needs held-out data: pass eval_dataset"):
        make_trainer(tmp_path, reference_dataset, peft_config=lora(), callbacks=[HackingMonitorCallback()])
    with pytest.raises(ValueError, match="threshold must be > 1"):
        HackingMonitorCallback(threshold=0.9)


def test_last_good_lora_reloads_in_plain_diffusers_at_its_trained_strength(tmp_path, reference_dataset):
    """The last good weights of a LoRA with alpha ≠ r and rank/alpha patterns carry their config: a plain
    `load_lora_weights` of `last-good/` gives the model as it was at that evaluation (here the last step)."""
    monitor = HackingMonitorCallback(threshold=100.0, eval_steps=1)
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(patterns=True),
        eval_dataset=reference_dataset,
        learning_rate=1e-2,
        max_steps=2,
        callbacks=[monitor],
    )
    trainer.train()
    assert monitor.last_good_step == 2
    plain = tiny_sd_pipeline()
    plain.load_lora_weights(str(tmp_path / "out" / "last-good"))
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.adapter.encode_prompts(["a red cat", "a blue dog"])
    assert_reloads_to_trained_outputs(trainer, plain, (x, torch.tensor([900, 400]), cond))


def test_under_guidance_the_guided_ratio_alone_can_flag_hacking(tmp_path, reference_dataset, caplog):
    """Guided hacking shows in the guided output's ratio while the conditional one stays flat (docs/concepts.md):
    the monitor acts on the higher of the two and says which it was."""
    monitor = HackingMonitorCallback(threshold=THRESHOLD, eval_steps=1, stop_training=True, last_good_dir=None)
    trainer = make_trainer(
        tmp_path, reference_dataset, eval_dataset=reference_dataset, cfg_scale=2.0, callbacks=[monitor]
    )
    metrics = trainer.evaluate()
    assert metrics["eval_guided_diffusion_loss_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert monitor.last_good_step == 0 and monitor.hacking_step is None
    args, state, control = trainer.args, trainer.state, trainer.control
    with caplog.at_level(logging.WARNING):
        monitor.on_evaluate(
            args, state, control, {"eval_diffusion_loss_ratio": 1.01, "eval_guided_diffusion_loss_ratio": 1.02}
        )
        assert monitor.hacking_step is None and not control.should_training_stop
        state.global_step = 3
        monitor.on_evaluate(
            args, state, control, {"eval_diffusion_loss_ratio": 1.01, "eval_guided_diffusion_loss_ratio": 1.31}
        )
    assert monitor.hacking_step == 3 and control.should_training_stop
    warning = next(r.getMessage() for r in caplog.records if "Reward hacking suspected" in r.getMessage())
    assert "the held-out guided diffusion loss is 1.310× the base model's" in warning
    # a NaN ratio is the worst, whichever of the two it is
    nan_monitor = HackingMonitorCallback(threshold=THRESHOLD, last_good_dir=None)
    nan_monitor.bind(trainer)
    nan = {"eval_diffusion_loss_ratio": 1.0, "eval_guided_diffusion_loss_ratio": float("nan")}
    nan_monitor.on_evaluate(args, state, control, nan)
    assert nan_monitor.hacking_step == 3


def test_settings_that_would_switch_the_monitor_off_are_refused_naming_the_argument():
    """NaN/inf and fractional eval_steps, an infinite threshold, a non-finite drop or ratio, and a watch that is no
    signal name were accepted (the monitor then never acted, or failed with a bare TypeError): each is a ValueError
    naming the argument; an integral float eval_steps (10.0 from YAML) is taken as 10."""
    for bad in (math.nan, math.inf, 2.5, 0, "10", True):
        with pytest.raises(ValueError, match=r"eval_steps must be a whole number ≥ 1 .* set e\.g\. eval_steps=50"):
            HackingMonitorCallback(eval_steps=bad)
    monitor = HackingMonitorCallback(eval_steps=10.0)
    assert monitor.eval_steps == 10 and isinstance(monitor.eval_steps, int)
    for bad in (math.inf, math.nan, "1.2"):
        with pytest.raises(ValueError, match=r"threshold must be > 1 and finite \(a ratio"):
            HackingMonitorCallback(threshold=bad)
    for bad in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match=r"max_eval_reward_drop must be a finite number > 0"):
            HackingMonitorCallback(max_eval_reward_drop=bad)
    for bad in (math.nan, math.inf, 1.0):
        with pytest.raises(ValueError, match=r"min_diversity_ratio must be a number in \(0, 1\)"):
            HackingMonitorCallback(min_diversity_ratio=bad)
    assert HackingMonitorCallback(watch={"diversity", "loss_ratio"}).watch == ("loss_ratio", "diversity")
    for bad in (None, 123, {"loss_ratio": 1}):
        with pytest.raises(
            ValueError, match=r"watch must name one or more of \('loss_ratio', 'eval_rewards', 'diversity'\)"
        ):
            HackingMonitorCallback(watch=bad)
    for bad in ("", ".", 5):
        with pytest.raises(ValueError, match=r"last_good_dir must name a folder under output_dir"):
            HackingMonitorCallback(last_good_dir=bad)


def test_an_unwritable_last_good_dir_fails_when_the_trainer_is_built(tmp_path, reference_dataset):
    """Before, the monitor failed at its first good evaluation, mid-run; now building the trainer fails, naming the
    folder and last_good_dir. A writable one is checked without leaving a folder behind."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last-good").write_text("a file where the folder should go")
    with pytest.raises(
        ValueError,
        match=rf"last_good_dir '{re.escape(str(tmp_path / 'out' / 'last-good'))}' cannot be written .* "
        r"HackingMonitorCallback's last good weights would be lost at the first good evaluation\. Choose a folder you "
        r"can write to for last_good_dir \(--hacking_last_good_dir\), under output_dir \(now 'last-good'\), or None "
        r"to not keep them\.",
    ):
        make_trainer(
            tmp_path,
            reference_dataset,
            peft_config=lora(),
            eval_dataset=reference_dataset,
            callbacks=[HackingMonitorCallback(last_good_dir="last-good")],
        )
    fine = tmp_path / "fine"
    make_trainer(
        fine,
        reference_dataset,
        peft_config=lora(),
        eval_dataset=reference_dataset,
        callbacks=[HackingMonitorCallback(last_good_dir="kept/last-good")],
    )
    assert not (fine / "out" / "kept").exists()


def never_scores(images, prompts, **kwargs):
    """An evaluation reward that scores nothing (a judge returning None for every sample)."""
    return [None] * len(prompts)


class _StubTrainer:
    """What `HackingMonitorCallback.assess` / `on_evaluate` read of a trainer: the evaluation rewards' names, the base
    model's validation rewards, and `log`."""

    def __init__(self, base_rewards):
        self.eval_reward_names = list(base_rewards)
        self.validator = SimpleNamespace(base=SimpleNamespace(rewards=dict(base_rewards)))
        self.logged = []

    def log(self, logs, *, measurement=False):
        assert measurement  # the monitor's verdict is a measurement: it must not drain the step's training metrics
        self.logged.append(logs)


def test_a_judge_that_scored_the_base_but_none_of_the_models_samples_trips_the_eval_rewards_signal(caplog):
    """Unit level, no model. Before, an evaluation reward that scored the base model's validation samples but none of
    the model's only counted as unmeasured; a judge that can no longer score the policy's images is itself a sign of
    hacking, so now the signal trips, naming the reward and the base's score. Without a base score there is nothing to
    compare with: still unmeasured, warned about, never good."""
    monitor = HackingMonitorCallback(watch="eval_rewards", last_good_dir=None)
    monitor.trainer = _StubTrainer({"judge": 0.93, "other": 0.5})
    reasons, measured, unmeasured = monitor.assess({"eval_rewards/judge": math.nan, "eval_rewards/other": 0.5})
    assert reasons == [
        "the evaluation reward 'judge' scored none of the model's validation samples (it scored the base "
        "model's: 0.93)"
    ]
    assert measured == {"eval_rewards"} and unmeasured == []
    reasons, _, unmeasured = monitor.assess({"eval_rewards/judge": math.inf, "eval_rewards/other": 0.5})
    assert reasons == [
        "the evaluation reward 'judge' is inf on the model's validation samples (not a finite number; the base "
        "model's: 0.93)"
    ]
    assert unmeasured == []
    # a judge that failed (raised: an outage, not a verdict; validation logs NaN and `/failed`) is unmeasured
    failed = {"eval_rewards/judge": math.nan, "eval_rewards/judge/failed": 1.0, "eval_rewards/other": 0.5}
    reasons, measured, unmeasured = monitor.assess(failed)
    assert reasons == [] and measured == set()
    assert unmeasured == ["eval_rewards: 'judge' failed on the validation samples (see the warning naming it)"]
    # the base unmeasured: nothing to compare with, whatever the model scored
    monitor.trainer.validator.base.rewards["judge"] = math.nan
    for now, whose in ((0.9, "none of the base model's"), (math.nan, "neither the model's nor the base model's")):
        reasons, measured, unmeasured = monitor.assess({"eval_rewards/judge": now, "eval_rewards/other": 0.5})
        assert reasons == [] and measured == set()
        assert unmeasured == [
            f"eval_rewards: 'judge' scored {whose} validation samples (every score None, NaN or ±inf)"
        ]
    # through on_evaluate: the trip is logged as detected and stops a monitor that stops
    stopper = HackingMonitorCallback(watch="eval_rewards", last_good_dir=None, stop_training=True)
    stopper.trainer = _StubTrainer({"judge": 0.93})
    state, control = SimpleNamespace(global_step=4), SimpleNamespace(should_training_stop=False)
    with caplog.at_level(logging.WARNING):
        stopper.on_evaluate(None, state, control, {"eval_rewards/judge": math.nan})
    assert stopper.hacking_step == 4 and control.should_training_stop and stopper.last_good_step is None
    assert stopper.trainer.logged == [
        {"hacking/detected": 1.0, "hacking/unmeasured": 0.0, "hacking/last_good_step": -1.0}
    ]
    assert "scored none of the model's validation samples (it scored the base model's: 0.93)" in caplog.text


def test_the_last_good_dir_write_check_names_the_setting_and_its_flag_and_leaves_no_folder(tmp_path):
    """Unit level: the monitor reuses `resume.check_output_dir_writable`, whose message names the setting and its CLI
    flag; `keep_created=False` removes again every folder it created, output_dir's own default keeps it."""
    from ddrl_trl.checkpoints.resume import check_output_dir_writable

    check_output_dir_writable(str(tmp_path / "a" / "b" / "c"), keep_created=False)
    assert list(tmp_path.iterdir()) == []
    check_output_dir_writable(str(tmp_path / "out"))
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(
        ValueError,
        match=r"^output_dir '.*a-file/out' cannot be written \(.*\): checkpoints and weights would be lost at the "
        r"first save\. Choose a folder you can write to for output_dir \(--output_dir\)\.$",
    ):
        check_output_dir_writable(str(tmp_path / "a-file" / "out"))
    monitor = HackingMonitorCallback(last_good_dir="a-file/last-good", watch="diversity")
    trainer = SimpleNamespace(
        eval_dataset=None,
        validator=object(),
        eval_reward_names=[],
        args=SimpleNamespace(output_dir=str(tmp_path), should_save=True),
    )
    with pytest.raises(
        ValueError, match=r"^last_good_dir '.*a-file/last-good' cannot be written .*\(--hacking_last_good"
    ):
        monitor.bind(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "out"]


def test_a_watched_signal_that_cannot_be_measured_is_warned_about_logged_and_never_good(
    tmp_path, reference_dataset, caplog
):
    """watch=("eval_rewards",) with a judge that scores no sample, the base model's neither: before, nothing was logged
    and nothing warned (the run looked watched). Now the evaluation warns naming the signal and why, logs
    hacking/unmeasured, and does not become the last good one; likewise a diversity ratio that is NaN because the base
    model had no diversity. A judge that scored the base's samples but none of the model's trips the signal."""
    monitor = HackingMonitorCallback(watch=("eval_rewards",), eval_steps=1)
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        validation_prompts=["a red cat", "a blue dog"],
        validation_images_per_prompt=2,
        eval_reward_funcs=[never_scores],
        callbacks=[monitor],
    )
    with caplog.at_level(logging.WARNING):
        metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_rewards/never_scores"])
    warning = next(r.getMessage() for r in caplog.records if "could not measure" in r.getMessage())
    assert (
        "could not measure a watched signal at step 0: eval_rewards: 'never_scores' scored neither the model's nor "
        "the base model's validation samples (every score None, NaN or ±inf)" in warning
    )
    assert "not counted as good" in warning
    logged = [{k: v for k, v in h.items() if k.startswith("hacking/")} for h in trainer.state.log_history]
    assert [h for h in logged if h] == [
        {"hacking/detected": 0.0, "hacking/unmeasured": 1.0, "hacking/last_good_step": -1.0}
    ]
    assert monitor.last_good_step is None and monitor.unmeasured_steps == [0]
    assert not (tmp_path / "out" / "last-good").exists()
    # the base scored, the model did not: the judge can no longer score the policy's images, which trips the signal
    trainer.validator.base.rewards["never_scores"] = 0.5
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        monitor.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
    assert any(
        "Reward hacking suspected at step 0: the evaluation reward 'never_scores' scored none of the model's "
        "validation samples (it scored the base model's: 0.5)" in r.getMessage()
        for r in caplog.records
    )
    assert not any("could not measure" in r.getMessage() for r in caplog.records)
    assert monitor.last_good_step is None and monitor.hacking_step == 0
    assert trainer.state.log_history[-1]["hacking/detected"] == 1.0
    # diversity: NaN ratio because the base's samples had none
    diversity = HackingMonitorCallback(watch="diversity", last_good_dir=None)
    diversity.bind(trainer)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        diversity.on_evaluate(
            trainer.args, trainer.state, trainer.control, {"eval_diversity": 0.2, "eval_diversity_ratio": math.nan}
        )
    assert any(
        "diversity: the base model's validation samples have no within-prompt diversity" in r.getMessage()
        for r in caplog.records
    )
    assert diversity.last_good_step is None
    assert trainer.state.log_history[-1]["hacking/unmeasured"] == 1.0
