"""`ddrl-trl train` as its users see it: bad arguments give one line naming the command-line flag and exit code 2
(checked in-process, before any model loads), `--help` shows what applies to diffusion, the hacking monitor and
prompt-only data from the command line. One test trains (2 steps of the tiny SD pipeline)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from ddrl_trl.cli.families import FAMILY_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folders(tmp_path, reference_dataset):
    """A paired dataset saved to disk (with a test split), the same without a prompt column, prompts only, and an
    empty folder standing for the model (never loaded: every error below comes first)."""
    split = reference_dataset.train_test_split(test_size=2, seed=0)
    split.save_to_disk(str(tmp_path / "data"))
    reference_dataset.rename_column("prompt", "description").save_to_disk(str(tmp_path / "no-prompts"))
    (tmp_path / "pipe").mkdir()
    return tmp_path


def base_args(tmp_path: Path, *extra: str, reward: str = "brightness") -> list[str]:
    return [
        "--family",
        "sd",
        "--model_name_or_path",
        str(tmp_path / "pipe"),
        "--dataset_name",
        str(tmp_path / "data"),
        "--reward_funcs",
        reward,
        "--output_dir",
        str(tmp_path / "out"),
        "--report_to",
        "none",
        *extra,
    ]


def error_line(capsys, argv: list[str]) -> str:
    """Run `ddrl-trl train argv` in-process; it must exit with code 2 and one error line, no traceback."""
    from ddrl_trl.cli.command import main

    with pytest.raises(SystemExit) as exited:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("ddrl-trl train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "DDRLConfig." not in lines[0]
    return lines[0]


def test_bad_data_and_config_files_give_one_line_naming_the_flag(folders, capsys):
    tmp = folders
    no_data = [a for a in base_args(tmp) if a != str(tmp / "data")]
    no_data.remove("--dataset_name")
    assert "--dataset_name is required" in error_line(capsys, no_data)
    line = error_line(capsys, base_args(tmp, "--dataset_name", str(tmp / "no" / "such" / "data")))
    assert "--dataset_name " in line and "no such folder" in line
    # a Hub-looking id, offline (HF_HUB_OFFLINE, set in conftest): what failed, in one line
    line = error_line(capsys, base_args(tmp, "--dataset_name", "someone/no-such-dataset"))
    assert "--dataset_name someone/no-such-dataset: cannot load it" in line
    (tmp / "bad.yaml").write_text("learning_rate: [1e-4\n")
    (tmp / "list.yaml").write_text("- learning_rate\n- 1e-4\n")
    (tmp / "scalar.yaml").write_text("learning_rate\n")
    (tmp / "unknown.yaml").write_text("learning_rat: 1e-4\n")
    assert "is not valid YAML" in error_line(capsys, base_args(tmp, "--config", str(tmp / "bad.yaml")))
    assert "must hold a YAML mapping" in error_line(capsys, ["--config", str(tmp / "list.yaml")])  # family: config
    line = error_line(capsys, base_args(tmp, "--config", str(tmp / "scalar.yaml")))
    assert "--config" in line and "got a YAML scalar" in line
    assert "unknown argument(s) learning_rat" in error_line(
        capsys, base_args(tmp, "--config", str(tmp / "unknown.yaml"))
    )
    # DDRLConfig's own checks (__post_init__) and argparse's, named as flags
    assert "error: --num_generations must be" in error_line(capsys, base_args(tmp, "--num_generations", "1"))
    assert "--eta must be" in error_line(capsys, base_args(tmp, "--eta", "1.5"))
    assert "unrecognized arguments: --no_such_flag 3" in error_line(capsys, base_args(tmp, "--no_such_flag", "3"))
    assert "argument --family: invalid choice" in error_line(capsys, ["--family", "sd4"])
    # prompt-only data asked for, but the data have references: refused before the pipeline loads
    line = error_line(capsys, base_args(tmp, "--synthetic_references_per_prompt", "2"))
    assert "--synthetic_references_per_prompt 2: the training data already have reference samples" in line
    # a pipeline folder whose model_index.json names no pipeline class (the family cannot be inferred)
    (tmp / "pipe" / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    line = error_line(capsys, ["--model_name_or_path", str(tmp / "pipe"), "--reward_funcs", "brightness"])
    assert "names no pipeline class" in line and "_class_name" in line and "--family" in line


def test_resuming_a_finished_run_is_one_line_naming_max_steps(folders, capsys):
    """A restartable job run again after it finished: its newest checkpoint is at --max_steps, nothing is left to
    train (transformers would train one step past it): one line naming the flags, before the model loads."""
    checkpoint = folders / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4, "max_steps": 4}')
    line = error_line(capsys, base_args(folders, "--resume_from_checkpoint", "latest", "--max_steps", "4"))
    assert f"--resume_from_checkpoint: {checkpoint} was saved at step 4, and --max_steps is 4" in line
    assert "Raise --max_steps (e.g. to 8)" in line


def test_bad_rewards_give_one_line_naming_the_flag(folders, capsys):
    tmp = folders
    line = error_line(capsys, base_args(tmp, reward="no_such_module_xyz:f"))
    assert "--reward_funcs no_such_module_xyz:f: Cannot import" in line and "PYTHONPATH" in line
    validation = ["--validation_prompts", "a red cat", "a blue dog"]
    line = error_line(capsys, base_args(tmp, "--eval_reward_funcs", "brightness", *validation))
    assert "--reward_funcs and --eval_reward_funcs name rewards 'brightness' more than once" in line
    # evaluation rewards score validation samples: without validation prompts they would score nothing
    line = error_line(capsys, base_args(tmp, "--eval_reward_funcs", "jpeg_compressibility"))
    assert "--eval_reward_funcs" in line and "--validation_prompts" in line and "num_validation_prompts" in line
    assert " validation_prompts" not in line.replace("--validation_prompts", "")


def test_a_reward_module_in_the_current_folder_is_found_as_with_python_m(folders, capsys, monkeypatch):
    """`--reward_funcs mymod:f` from the folder holding mymod.py works (the `ddrl-trl` command's sys.path holds its
    bin folder, not the current one). Shown by the duplicate-name error, which needs the function imported."""
    tmp = folders
    (tmp / "cwd_reward_for_cli_test.py").write_text(
        "def shiny(images, prompts, **kwargs):\n    return [0.0] * len(prompts)\n"
    )
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp))])
    monkeypatch.delitem(sys.modules, "cwd_reward_for_cli_test", raising=False)
    spec = "cwd_reward_for_cli_test:shiny"
    try:
        args = base_args(
            tmp, "--eval_reward_funcs", spec, "--validation_prompts", "a red cat", "a blue dog", reward=spec
        )
        line = error_line(capsys, args)
    finally:
        sys.modules.pop("cwd_reward_for_cli_test", None)
    assert "name rewards 'shiny' more than once" in line


def test_a_missing_prompt_column_is_one_line_naming_prompt_column(folders, capsys):
    """The trainer's own check (at construction, before the model loads) reaches the user as one line."""
    line = error_line(capsys, base_args(folders, "--dataset_name", str(folders / "no-prompts")))
    assert "no column 'prompt'" in line and "--prompt_column" in line and "prompt_column=" not in line


def test_help_shows_the_diffusion_flags_and_every_family(capsys):
    from ddrl_trl.cli.command import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for flag in (
        "--reward_funcs",
        "--data_beta",
        "--hacking_monitor",
        "--hacking_watch",
        "--synthetic_references_per_prompt",
        "--learning_rate",
        "--max_steps",
        "--per_device_train_batch_size",
        "--save_steps",
        "--bf16",
        "--gradient_checkpointing",
        "--report_to",
        "--push_to_hub",
        "--resume_from_checkpoint",
    ):
        assert f"  {flag} " in shown, flag
    for hidden in ("--neftune_noise_alpha", "--use_liger_kernel", "CAUSAL_LM", "--lora_task_type", "--load_in_4bit"):
        assert hidden not in shown, hidden
    text = " ".join(shown.split())
    assert "None: the model family's default target modules" in text
    assert "`latest` for the newest one, or a new run when there is none yet" in text
    assert len(shown.splitlines()) < 400
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(family in top for family in FAMILY_DEFAULTS) and "sd|sd3|flux|wan" not in top
    # diffusers' LoRA dropout (0) for every family, not TRL's language-model 0.05
    from ddrl_trl.cli.train import make_parser

    assert all(defaults["lora_dropout"] == 0.0 for defaults in FAMILY_DEFAULTS.values())
    assert make_parser("sd").parse_args_and_config(args=[])[2].lora_dropout == 0.0


def test_a_real_exit_code_and_help_without_the_trainer(tmp_path):
    """One subprocess: `--help` does not import the trainer, and a bad command exits with code 2, one line."""
    code = (
        "import sys\nfrom ddrl_trl.cli.command import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
        "    pass\nprint('trainer imported:', 'ddrl_trl.trainer' in sys.modules)\n"
        "main(['train', '--model_name_or_path', 'owner/model', '--family', 'sd', '--reward_funcs', 'brightness', "
        "'--output_dir', 'out'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "trainer imported: False" in result.stdout, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("ddrl-trl train: error: --dataset_name is required")
    assert "Traceback" not in result.stderr


def test_a_single_process_accelerate_launch_that_asked_for_more_is_reported(folders, capsys, caplog, monkeypatch):
    """accelerate's simple launcher (`accelerate launch --num_processes 2` without --multi_gpu, e.g. on CPU) starts
    one process: it sets MASTER_ADDR / MASTER_PORT (only when more were asked for) but no WORLD_SIZE."""
    from ddrl_trl.cli.train import warn_if_accelerate_started_one_process

    for name, value in (("ACCELERATE_MIXED_PRECISION", "no"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level("WARNING", logger="ddrl_trl.cli.train"):
        error_line(capsys, base_args(folders, "--dataset_name", "/no/data"))  # said before main's checks
    said = [r.getMessage() for r in caplog.records if "accelerate launch started ONE process" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0]
    assert "accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no" in said[0]
    assert "--dynamo_backend no" in said[0] and "--use_cpu" in said[0]
    launched = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert warn_if_accelerate_started_one_process({**launched, "WORLD_SIZE": "2", "RANK": "0"}) is None  # torchrun
    assert warn_if_accelerate_started_one_process({"ACCELERATE_MIXED_PRECISION": "no"}) is None  # one asked for
    assert warn_if_accelerate_started_one_process({"MASTER_ADDR": "127.0.0.1"}) is None  # not accelerate


def test_hacking_monitor_flags_build_the_callback_main_passes_to_the_trainer(folders, capsys, monkeypatch):
    import ddrl_trl.trainer
    from ddrl_trl.cli.train import HACKING_SIGNALS, hacking_monitor, main, make_parser
    from ddrl_trl.monitoring.hacking_monitor import SIGNALS, HackingMonitorCallback

    assert HACKING_SIGNALS == SIGNALS  # the parser's choices are the callback's signals

    flags = ["--hacking_monitor", "--hacking_threshold", "1.2", "--hacking_watch", "loss_ratio", "diversity"]
    flags += ["--hacking_eval_steps", "7", "--hacking_stop_training", "--hacking_min_diversity_ratio", "0.4"]
    flags += ["--hacking_last_good_dir", "best-so-far"]
    parsed = make_parser("sd").parse_args_and_config(args=base_args(folders, *flags)[2:])
    monitor = hacking_monitor(parsed[-1])
    assert isinstance(monitor, HackingMonitorCallback)
    assert (monitor.threshold, monitor.eval_steps, monitor.stop_training) == (1.2, 7, True)
    assert monitor.watch == ("loss_ratio", "diversity") and monitor.min_diversity_ratio == 0.4
    assert monitor.last_good_dir == "best-so-far"
    assert hacking_monitor(make_parser("sd").parse_args_and_config(args=[])[-1]) is None  # off by default

    built = {}

    class Stop(Exception):
        pass

    def fake_trainer(**kwargs):  # records what main builds the trainer with, and ends the run there
        built.update(kwargs)
        raise Stop

    monkeypatch.setattr(ddrl_trl.trainer, "DDRLTrainer", fake_trainer)
    validated = base_args(folders, *flags, "--validation_prompts", "a red cat", "a blue dog")[2:]  # for diversity
    with pytest.raises(Stop):
        main(*make_parser("sd").parse_args_and_config(args=validated))
    (callback,) = built["callbacks"]
    assert isinstance(callback, HackingMonitorCallback) and callback.threshold == 1.2 and callback.stop_training
    assert built["eval_dataset"] is not None  # the test split, for the loss ratio (eval_strategy is "no")
    # bad values: one line, exit code 2, naming the flag
    assert "argument --hacking_threshold" in error_line(capsys, base_args(folders, "--hacking_threshold", "high"))
    line = error_line(capsys, base_args(folders, "--hacking_monitor", "--hacking_threshold", "0.9"))
    assert "--hacking_threshold must be" in line and "set e.g. --hacking_threshold 1.10" in line
    assert "--hacking_eval_steps must" in error_line(
        capsys, base_args(folders, "--hacking_monitor", "--hacking_eval_steps", "0")
    )
    assert "argument --hacking_watch" in error_line(capsys, base_args(folders, "--hacking_watch", "reward"))
    line = error_line(capsys, base_args(folders, "--hacking_stop_training"))
    assert "--hacking_stop_training set without --hacking_monitor" in line
    line = error_line(capsys, base_args(folders, "--hacking_monitor", "--hacking_watch", "diversity"))
    assert "--hacking_watch diversity" in line and "--validation_prompts" in line
    line = error_line(capsys, base_args(folders, "--hacking_monitor", "--dataset_name", str(folders / "no-prompts")))
    assert "--hacking_watch loss_ratio needs held-out data" in line and "--dataset_test_split" in line


def test_a_run_stopped_for_hacking_saves_and_pushes_its_last_good_weights(tmp_path, reference_dataset, hub, caplog):
    """A run the monitor stopped (full fine-tuning pushed to hack on purpose): the script's output, its model card and
    the Hub upload are the last good weights, not the final ones; a save of the final weights warns."""
    from helpers import hacking_trainer
    from safetensors.torch import load_file

    from ddrl_trl import HackingMonitorCallback
    from ddrl_trl.cli.train import save_output

    monitor = HackingMonitorCallback(threshold=1.15, eval_steps=1, stop_training=True)
    trainer = hacking_trainer(tmp_path, reference_dataset, monitor)
    trainer.train()
    out = tmp_path / "out"
    assert monitor.hacking_step == trainer.state.global_step and monitor.last_good_step == monitor.hacking_step - 1
    with caplog.at_level("WARNING", logger="ddrl_trl.checkpoints.saving"):
        trainer.save_model(str(tmp_path / "final"))  # the hacked final weights, saved on purpose: warned
    assert f"the last good weights (step {monitor.last_good_step}) are in {out / 'last-good'}" in caplog.text
    final = load_file(tmp_path / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    caplog.clear()
    with caplog.at_level("WARNING"):
        save_output(trainer, monitor, str(out))
        trainer.push_to_hub()  # transformers saves the model in memory again before uploading
    assert f"are the last good ones, of step {monitor.last_good_step}" in caplog.text
    assert "from after reward hacking was detected" not in caplog.text
    good = load_file(out / "last-good" / "unet" / "diffusion_pytorch_model.safetensors")
    for folder in (out, hub.capture_dir):
        saved = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in good), folder
    assert any(not torch.equal(final[k], good[k]) for k in good)  # the final weights were other
    card = (hub.capture_dir / "README.md").read_text()
    assert f"reward hacking suspected at step {monitor.hacking_step}" in card
    assert f"The weights here are those last good ones, of step {monitor.last_good_step}" in card


def test_prompt_only_data_train_on_synthetic_references(tmp_path, capsys, monkeypatch):
    """`--synthetic_references_per_prompt 2` on a dataset of prompts only: the base pipeline (loaded once) samples 2
    references per prompt, the run trains 2 steps and says where the weights are."""
    from datasets import load_from_disk

    from ddrl_trl.cli.train import train_command, with_synthetic_references
    from ddrl_trl.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    DatasetDict({"train": Dataset.from_dict({"prompt": ["a red cat", "a blue dog"], "label": [0, 1]})}).save_to_disk(
        str(tmp_path / "prompts")
    )
    trainer = train_command(
        [
            "--model_name_or_path",
            str(tmp_path / "pipe"),
            "--dataset_name",
            str(tmp_path / "prompts"),
            "--synthetic_references_per_prompt",
            "2",
            "--reward_funcs",
            "brightness",
            "--use_peft",
            "--lora_r",
            "4",
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--num_inference_steps",
            "3",
            "--max_steps",
            "2",
            "--report_to",
            "none",
            "--log_sample_images_steps",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert len(trainer.train_dataset) == 4 and trainer.state.global_step == 2  # 2 prompts × 2 references
    assert any("loss/data" in entry for entry in trainer.state.log_history)  # the data term trained on them
    assert f"weights saved to {tmp_path / 'out'}" in capsys.readouterr().out
    tiny_sd_pipeline().load_lora_weights(str(tmp_path / "out"))
    # sampled once (by the main process) and kept whole in output_dir: the other processes, and a resumed run, load
    # that copy instead of sampling again
    (kept,) = (tmp_path / "out" / "synthetic_references").iterdir()
    assert kept.name.startswith("training-") and len(load_from_disk(str(kept))) == 4
    import ddrl_trl.data

    def no_sampling(*args, **kwargs):
        raise AssertionError("the references were sampled again")

    monkeypatch.setattr(ddrl_trl.data, "build_synthetic_reference_dataset", no_sampling)
    prompts = Dataset.from_dict({"prompt": ["a red cat", "a blue dog"], "label": [0, 1]})
    again = with_synthetic_references(trainer.pipeline, prompts, 2, trainer.args, "training")
    assert again["prompt"] == ["a red cat", "a red cat", "a blue dog", "a blue dog"]
    assert [i.tobytes() for i in again["image"]] == [i.tobytes() for i in load_from_disk(str(kept))["image"]]


def test_model_revision_on_the_command_line_is_kept(monkeypatch, tmp_path):
    """`ddrl-trl train --model_revision R` reaches the parsed arguments (it was read to infer the family and then
    dropped, so the family's or "main" revision loaded instead)."""
    import ddrl_trl.cli.train as scripts

    seen = []
    monkeypatch.setattr(scripts, "main", lambda *parsed: seen.append(parsed))
    flags = ["--reward_funcs", "brightness", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    scripts.train_command(["--family", "cosmos", "--model_revision", "my-branch", *flags])
    assert seen[0][2].model_revision == "my-branch"
