"""Resuming is exact or refused: a damaged, incomplete, non-finite or foreign checkpoint fails naming the file and the
checkpoint before any rollout; a new run never overwrites another run's work; an unwritable output_dir fails at
once."""

import json
import logging
import math
import re
import shutil

import pytest
import torch
from conftest import make_reference_dataset
from helpers import lora, make_trainer
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ddrl_trl.checkpoints.resume import check_same_run, run_info
from ddrl_trl.checkpoints.weight_files import CheckpointError
from ddrl_trl.core.data_beta import AdaptiveDataBeta
from ddrl_trl.monitoring.adaptive_beta import DataBetaControl
from ddrl_trl.testing import tiny_sdxl_pipeline


def run(tmp_path, reference_dataset, peft_config=None, **kw):
    """A 2-step run writing checkpoint-1 and checkpoint-2 into `tmp_path/out`."""
    values = dict(max_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=1)
    return make_trainer(tmp_path, reference_dataset, peft_config=peft_config, **{**values, **kw})


def resumed(tmp_path, reference_dataset, peft_config=None, **kw):
    """A trainer resuming the saved runs (checkpoint-2 of a 2-step run) for one more step: resuming a checkpoint saved
    at max_steps is refused, with nothing left to train."""
    return run(tmp_path, reference_dataset, peft_config, **{"max_steps": 3, **kw})


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """A LoRA run and a full fine-tuning run, each with its checkpoints and final weights (trained once per module)."""
    reference_dataset = make_reference_dataset()
    runs = {}
    for kind, peft_config in (("lora", lora()), ("full", None)):
        folder = tmp_path_factory.mktemp(kind)
        trainer = run(folder, reference_dataset, peft_config)
        trainer.train()
        runs[kind] = (folder / "out", trained_weights(trainer))
    return runs


def copy_run(saved_runs, kind, tmp_path):
    source, weights = saved_runs[kind]
    target = tmp_path / "out"
    shutil.copytree(source, target)
    return target, weights


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "kind, name",
    [
        ("lora", "pytorch_lora_weights.safetensors"),
        ("lora", "optimizer.pt"),
        ("lora", "scheduler.pt"),
        ("lora", "trainer_state.json"),
        ("lora", "rng_state.pth"),
        ("full", "unet/diffusion_pytorch_model.safetensors"),
    ],
)
def test_a_truncated_file_fails_resume_naming_the_file_and_the_checkpoint(
    tmp_path, reference_dataset, saved_runs, kind, name, no_rollouts
):
    out, _ = copy_run(saved_runs, kind, tmp_path)
    damaged = out / "checkpoint-2" / name
    truncate(damaged)
    trainer = resumed(tmp_path, reference_dataset, lora() if kind == "lora" else None)
    with pytest.raises(CheckpointError) as caught:
        trainer.train(resume_from_checkpoint=True)
    message = str(caught.value)
    assert str(damaged) in message and "checkpoint-2" in message, message
    assert re.search(r"unreadable .* truncated or corrupt|unreadable \(", message), message


@pytest.mark.parametrize(
    "name, what",
    [
        ("scheduler.pt", "the learning-rate schedule"),
        ("optimizer.pt", "the optimizer state"),
        ("pytorch_lora_weights.safetensors", "the trained weights"),
        ("trainer_state.json", None),
    ],
)
def test_an_incomplete_checkpoint_is_refused(tmp_path, reference_dataset, saved_runs, name, what, no_rollouts):
    """transformers would skip a missing optimizer/scheduler pair silently and resume with fresh Adam moments."""
    out, _ = copy_run(saved_runs, "lora", tmp_path)
    (out / "checkpoint-2" / name).unlink()
    trainer = resumed(tmp_path, reference_dataset, lora())
    expected = f"lacks {name} \\({what}\\)" if what else f"has no {name}"
    with pytest.raises(CheckpointError, match=rf"Checkpoint .*checkpoint-2 (is incomplete: it )?{expected}"):
        trainer.train(resume_from_checkpoint=True)


def test_a_missing_rng_state_is_reported_and_ddrl_still_resumes_exactly(
    tmp_path, reference_dataset, saved_runs, caplog
):
    """DDRL's own randomness (rollout noise, data order, LoRA init) is seeded without the global RNG state, so
    resuming checkpoint-1 without it still gives the straight run's step-2 weights; the warning says what differs."""
    out, straight = copy_run(saved_runs, "lora", tmp_path)
    (out / "checkpoint-1" / "rng_state.pth").unlink()
    trainer = run(tmp_path, reference_dataset, lora())
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert any(
        "has no rng_state.pth: the global random state is not restored" in r.getMessage() for r in caplog.records
    )
    for name, value in trained_weights(trainer).items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=0, msg=name)


def test_non_finite_weights_or_optimizer_state_in_a_checkpoint_are_refused(
    tmp_path, reference_dataset, saved_runs, no_rollouts
):
    out, _ = copy_run(saved_runs, "lora", tmp_path)
    weights_file = out / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights_file), framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(weights_file)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(weights_file), metadata=metadata)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(weights_file))} .* holds non-finite values .*{re.escape(key)}"
    ):
        resumed(tmp_path, reference_dataset, lora()).train(resume_from_checkpoint=True)

    optimizer_file = out / "checkpoint-1" / "optimizer.pt"
    state = torch.load(optimizer_file, weights_only=True)
    next(iter(state["state"].values()))["exp_avg"].fill_(math.inf)
    torch.save(state, optimizer_file)
    with pytest.raises(CheckpointError, match=r"optimizer state in checkpoint .*checkpoint-1 is non-finite"):
        run(tmp_path, reference_dataset, lora()).train(resume_from_checkpoint=str(out / "checkpoint-1"))


def test_a_checkpoint_of_another_model_or_adapter_is_refused_and_changed_settings_are_reported(
    tmp_path, reference_dataset, saved_runs, no_rollouts, caplog
):
    out, _ = copy_run(saved_runs, "lora", tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-2 was written by another run \(lora: checkpoint .*'r': 4"
        r".* this run .*'r': 8",
    ):
        resumed(tmp_path, reference_dataset, LoraConfig(r=8, lora_alpha=16)).train(resume_from_checkpoint=True)
    with pytest.raises(
        CheckpointError,
        match=r"another run \(pipeline: checkpoint 'StableDiffusionPipeline', this "
        r"run 'StableDiffusionXLPipeline'",
    ):
        resumed(tmp_path, reference_dataset, lora(), pipeline=tiny_sdxl_pipeline()).train(resume_from_checkpoint=True)
    # without the run record (an older checkpoint), the LoRA file's own config still catches a strength mismatch
    (out / "checkpoint-2" / "ddrl_run.json").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"holds a LoRA of another shape or strength .*lora_alpha: file 16, "
        r"trainer 8",
    ):
        resumed(tmp_path, reference_dataset, LoraConfig(r=4, lora_alpha=8)).train(resume_from_checkpoint=True)
    # the same model with other settings resumes, saying what changed
    no_rollouts.remove()
    out2, _ = copy_run(saved_runs, "lora", tmp_path / "again")
    with caplog.at_level(logging.WARNING):
        run(tmp_path / "again", reference_dataset, lora(), learning_rate=2e-2, max_steps=3).train(
            resume_from_checkpoint=True
        )
    message = next(r.getMessage() for r in caplog.records if "changed settings" in r.getMessage())
    assert "learning_rate 0.01 → 0.02" in message and "differ from an uninterrupted run" in message


def test_a_new_run_never_overwrites_another_runs_work(tmp_path, reference_dataset, saved_runs, no_rollouts, caplog):
    out, _ = copy_run(saved_runs, "lora", tmp_path)
    with caplog.at_level(logging.WARNING):
        trainer = run(tmp_path, reference_dataset, lora())  # said at once, before any long work...
    assert any(
        "already holds another run's work" in r.getMessage() and "train() will refuse" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(
        ValueError,
        match=rf"output_dir '{re.escape(str(out))}' already holds another run's work "
        r"\(checkpoint-1, checkpoint-2\).*resume_from_checkpoint=True.*"
        r"overwrite_output_dir=True",
    ):
        trainer.train()  # ...and refused when the run starts (resume_from_checkpoint is only known here)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match="holds no checkpoint-N folder to resume"):
        run(tmp_path / "empty", reference_dataset, lora()).train(resume_from_checkpoint=True)
    # overwrite_output_dir: the old checkpoints go before the new run starts, so `True` can never find them later
    no_rollouts.remove()
    trainer = run(tmp_path, reference_dataset, lora(), overwrite_output_dir=True, save_strategy="no", max_steps=1)
    trainer.train()
    assert not [p for p in out.iterdir() if p.name.startswith("checkpoint")]


def test_an_unwritable_output_dir_fails_at_construction(tmp_path, reference_dataset, observe):
    def forbidden(split):
        raise AssertionError("reference data were encoded before output_dir was checked")

    observe("reference_encoding", forbidden)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"output_dir '.*a-file/out' cannot be written .* Choose a folder"):
        make_trainer(tmp_path / "a-file", reference_dataset, peft_config=lora())


def test_run_record_names_the_model_adapter_and_settings(tmp_path, saved_runs):
    record = json.loads((saved_runs["lora"][0] / "checkpoint-2" / "ddrl_run.json").read_text())
    assert record["identity"]["pipeline"] == "StableDiffusionPipeline"
    assert record["identity"]["lora"]["r"] == 4 and record["identity"]["lora"]["lora_alpha"] == 16
    assert record["settings"]["learning_rate"] == 0.01 and record["settings"]["num_generations"] == 2


def test_a_damaged_or_hand_edited_run_record_is_refused_naming_the_file_and_the_checkpoint(
    tmp_path, reference_dataset, saved_runs, no_rollouts, caplog
):
    """ddrl_run.json of another shape (a list, an identity string, a controller state with a string, a negative or an
    unknown field) gave raw TypeError / AttributeError, or was ignored: each is now a CheckpointError naming the file
    and the checkpoint, before any rollout. Keys this version does not know are ignored with a warning (checked on
    the record alone: resuming the last checkpoint would roll out)."""
    out, _ = copy_run(saved_runs, "lora", tmp_path)
    record_file = out / "checkpoint-2" / "ddrl_run.json"
    record = json.loads(record_file.read_text())
    controller = AdaptiveDataBeta.starting_at(0.3, target=1.05, rate=0.05).state_dict()
    cases = [
        ([record], "its top level is a list, not an object"),
        ({**record, "identity": "StableDiffusionPipeline"}, "identity is a string, not an object"),
        ({k: v for k, v in record.items() if k != "identity"}, "it lacks identity"),
        ({**record, "identity": {**record["identity"], "lora": "r=4"}}, "identity.lora is a string ('r=4')"),
        ({**record, "settings": [1, 2]}, "settings is a list, not an object"),
        (
            {**record, "data_beta_controller": {**controller, "value": "0.3"}},
            "adaptive data_beta state (data_beta_controller) is invalid: the controller's value must be a number",
        ),
        ({**record, "data_beta_controller": {**controller, "value": -0.3}}, "must start > 0"),
        ({**record, "data_beta_controller": {**controller, "updates": -1}}, "updates must be a whole number ≥ 0"),
        ({**record, "data_beta_controller": {**controller, "gain": 2.0}}, "has unknown fields ['gain']"),
        ({**record, "data_beta_controller": [0.3]}, "must be an object of its fields, got list"),
    ]
    trainer = run(tmp_path, reference_dataset, lora())
    for damaged, expected in cases:
        record_file.write_text(json.dumps(damaged))
        with pytest.raises(CheckpointError) as caught:
            trainer.train(resume_from_checkpoint=True)
        message = str(caught.value)
        assert f"{record_file} in checkpoint {out / 'checkpoint-2'} is damaged or was edited by hand" in message
        assert expected in message, message
    # the adaptive controller refuses a damaged state the same way when it restores it
    control = DataBetaControl(AdaptiveDataBeta.starting_at(0.3, target=1.05, rate=0.05), None, None, None)
    with pytest.raises(
        CheckpointError, match=r"checkpoint-9/ddrl_run.json in checkpoint .*checkpoint-9 holds a damaged"
    ):
        control.load_state_dict({**controller, "value": "0.3"}, str(tmp_path / "checkpoint-9"))
    # unknown keys: ignored with a warning naming them (a later version may record more); the resume goes on
    record_file.write_text(json.dumps({**record, "recorded_later": 1, "identity": {**record["identity"], "vae": "x"}}))
    with caplog.at_level(logging.WARNING):
        saved = check_same_run(str(out / "checkpoint-2"), run_info(trainer))
    assert saved["recorded_later"] == 1
    warning = next(r.getMessage() for r in caplog.records if "keys this version does not know" in r.getMessage())
    assert f"{record_file} in checkpoint {out / 'checkpoint-2'}" in warning
    assert "(recorded_later, identity.vae): they are ignored" in warning


def test_resume_with_a_longer_run_says_so_and_rebuilds_the_lr_schedule(
    tmp_path, reference_dataset, saved_runs, caplog
):
    """The most common resume, "train 2 more steps": the first resumed step trains at the new schedule's rate, not
    at the old one's end (0 for the linear decay); the resume and the new length are said, and recorded."""
    out, _ = copy_run(saved_runs, "lora", tmp_path)  # saved at step 2 of max_steps=2
    with pytest.raises(ValueError, match=r"checkpoint-2 was saved at step 2, and max_steps is 2: there is nothing"):
        run(tmp_path, reference_dataset, lora()).train(resume_from_checkpoint=True)  # Trainer would train a step 3

    class LearningRates(TrainerCallback):
        rates = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.rates.append(optimizer.param_groups[0]["lr"])

    trainer = run(tmp_path, reference_dataset, lora(), max_steps=4, callbacks=[LearningRates()])
    with caplog.at_level(logging.INFO, logger="ddrl_trl"):
        trainer.train(resume_from_checkpoint="latest")
    # linear decay over 4 steps from 1e-2, no warm-up: steps 3 and 4 train at 1e-2 · 2/4 and 1e-2 · 1/4
    assert LearningRates.rates == pytest.approx([5e-3, 2.5e-3], rel=1e-6)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h and h["step"] > 2]
    assert logged == pytest.approx([5e-3, 2.5e-3], rel=1e-6)
    messages = [r.getMessage() for r in caplog.records]
    assert f"Resuming from {out / 'checkpoint-2'} (step 2 of max_steps=4)." in messages
    assert any("with max_steps=4; it was saved by a run of max_steps=2" in m for m in messages)
    assert not any("changed settings" in m for m in messages)  # the length is not a "changed setting"
    saved = json.loads((out / "checkpoint-4" / "ddrl_run.json").read_text())
    assert saved["settings"]["max_steps"] == 4


def test_resume_latest_starts_a_new_run_when_there_is_no_checkpoint(tmp_path, reference_dataset, caplog):
    """`latest` (restartable job scripts): no checkpoint yet → a new run, said in one line; `True` keeps refusing;
    a folder with another run's final weights but no checkpoint is refused as any new run there."""
    trainer = run(tmp_path, reference_dataset, lora(), max_steps=1, save_strategy="no")
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint="latest")
    assert trainer.state.global_step == 1
    assert any("no checkpoint-N in" in r.getMessage() and "starts a new run" in r.getMessage() for r in caplog.records)
    trainer.save_model()  # final weights, no checkpoint
    again = run(tmp_path, reference_dataset, lora(), max_steps=1, save_strategy="no")
    with pytest.raises(ValueError, match="already holds another run's work"):
        again.train(resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="holds no checkpoint-N folder to resume.*'latest'"):
        again.train(resume_from_checkpoint=True)
