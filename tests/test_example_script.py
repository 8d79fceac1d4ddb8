"""`accelerate launch examples/train_*.py` on local tiny pipelines and datasets saved to disk."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddrl_trl.testing import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "examples" / script),
        *args,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_train_sd_example_with_yaml_and_cli_overrides(tmp_path, reference_dataset):
    tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    reference_dataset.train_test_split(test_size=2, seed=0).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "ddrl.yaml").write_text(
        f"model_name_or_path: {tmp_path / 'pipe'}\n"
        f"dataset_name: {tmp_path / 'data'}\n"
        "reward_funcs: [brightness]\nuse_peft: true\nlora_r: 4\nlora_alpha: 4\n"
        "num_generations: 2\nper_device_train_batch_size: 2\nnum_inference_steps: 3\n"
        "max_steps: 5\nreport_to: none\nwarmup_steps: 0\nlog_sample_images_steps: 0\ncfg_scale: 3.0\n"
    )
    result = launch(
        "train_sd.py",
        "--config",
        str(tmp_path / "ddrl.yaml"),
        "--max_steps",
        "2",
        "--output_dir",
        str(tmp_path / "out"),  # CLI overrides the YAML
        "--negative_prompt",
        "a blurry photo",
        "--data_prompt_dropout",
        "0.3",
        "--validation_prompts",
        "a red cat",
        "a blue dog",
        "--validation_images_per_prompt",
        "2",
        "--eval_reward_funcs",
        "jpeg_compressibility",
        "--target_loss_ratio",
        "1.05",
        "--data_beta_adapt_rate",
        "0.2",
    )
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    # validation at the end of training: the grid (2 captioned prompt rows of 2 samples, 32 px enlarged to 128, 4 px
    # apart), the evaluation reward in the logs
    grid = Image.open(tmp_path / "out" / "validation" / "step-000002.png")
    assert grid.size == (2 * 128 + 3 * 4, 2 * (18 + 128 + 4) + 4)
    assert "'eval_rewards/jpeg_compressibility'" in result.stdout and "'eval_diversity_ratio'" in result.stdout
    run = json.loads((tmp_path / "out" / "ddrl_run.json").read_text())
    assert run["data_beta_controller"]["updates"] == 2 and run["data_beta_controller"]["rate"] == 0.2
    assert "2/2" in result.stderr  # max_steps from the command line won over the YAML's 5
    used = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)  # what the trainer ran with
    assert (used.cfg_scale, used.negative_prompt, used.data_prompt_dropout) == (3.0, "a blurry photo", 0.3)
    assert (used.validation_prompts, used.target_loss_ratio) == (["a red cat", "a blue dog"], 1.05)
    assert used.data_beta == pytest.approx(0.15 * (3.0**2 / 0.7 + 2.0**2 / 0.3), rel=1e-12)  # the guided default
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(tmp_path / "out"))


@pytest.mark.parametrize("script", ["train_sd3.py", "train_wan.py"])
def test_flow_family_examples_train_with_their_defaults(script, tmp_path, reference_dataset, reference_videos):
    """The SD3 and Wan scripts with their own defaults (LoRA, bf16, gradient checkpointing), sized down on the CLI."""
    builder, dataset, size = (
        (tiny_wan_pipeline, reference_videos, ["--resolution", "16", "--num_frames", "9"])
        if script == "train_wan.py"
        else (tiny_sd3_pipeline, reference_dataset, ["--resolution", "32"])
    )
    builder().save_pretrained(tmp_path / "pipe")
    dataset.save_to_disk(str(tmp_path / "data"))
    launch(
        script,
        "--model_name_or_path",
        str(tmp_path / "pipe"),
        "--dataset_name",
        str(tmp_path / "data"),
        *size,
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--num_inference_steps",
        "3",
        "--max_sequence_length",
        "16",
        "--lora_r",
        "4",
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--reward_funcs",
        "ddrl_trl.rewards.builtin.brightness",  # TRL's dotted import form
        "--log_sample_images_steps",
        "0",
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",  # transformers allows bf16 on CPU only when told it is on CPU
    )
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert {v.dtype for v in weights.values()} == {torch.float32}  # bf16 training keeps float32 LoRA weights
    assert torch.load(tmp_path / "out" / "training_args.bin", weights_only=False).bf16  # the script's default
    pipe = builder()
    pipe.load_lora_weights(str(tmp_path / "out"))


def test_reward_funcs_is_required_and_output_dir_is_checked_before_loading_anything(tmp_path):
    """No default reward (the old default, brightness, trains toward white); these checks run before the model loads
    (the model path here does not exist, and the errors are not about it)."""
    from ddrl_trl.cli.train import train_command

    base = [
        "--family",
        "sd",
        "--model_name_or_path",
        str(tmp_path / "no-such-pipeline"),
        "--dataset_name",
        str(tmp_path / "no-data"),
        "--report_to",
        "none",
    ]
    with pytest.raises(
        ValueError,
        match=r"--reward_funcs is required.*built-in name \(brightness.*'package\.module:"
        r"function' or 'package\.module\.function'.*Hub repo id",
    ):
        train_command([*base, "--output_dir", str(tmp_path / "a")])
    (tmp_path / "b" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(
        ValueError,
        match=r"output_dir '.*/b' already holds another run's work \(checkpoint-4\).*"
        r"--resume_from_checkpoint true.*--overwrite_output_dir",
    ):
        train_command([*base, "--output_dir", str(tmp_path / "b"), "--reward_funcs", "brightness"])
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"output_dir '.*/file/out' cannot be written"):
        train_command([*base, "--output_dir", str(tmp_path / "file" / "out"), "--reward_funcs", "brightness"])
    # flags TRL's argument classes parse that mean nothing for a diffusion pipeline: refused, never ignored
    for flags, message in (
        (["--load_in_4bit", "true"], "--load_in_4bit True: not supported for diffusion pipelines"),
        (["--dataset_streaming", "true"], "--dataset_streaming True: not supported"),
        (["--dtype", "bfloat16"], "--dtype bfloat16: the trainer chooses dtypes itself.*--bf16"),
    ):
        with pytest.raises(ValueError, match=message):
            train_command([*base, "--output_dir", str(tmp_path / "c"), "--reward_funcs", "brightness", *flags])
    with pytest.raises(ValueError, match=r"Cannot read .*no-such-pipeline's model_index.json .*pass --family"):
        train_command(base[2:] + ["--reward_funcs", "brightness", "--output_dir", str(tmp_path / "d")])


def test_resume_argument_forms():
    from ddrl_trl.cli.train import resume_argument

    assert [resume_argument(v) for v in (None, "true", "True", "latest", "false", "", "out/checkpoint-2")] == [
        None,
        True,
        True,
        "latest",  # the newest checkpoint, or a new run when there is none (restartable jobs)
        None,
        None,
        "out/checkpoint-2",
    ]


def test_interrupted_scripted_run_resumes_through_the_script_to_identical_weights(tmp_path, reference_dataset):
    """`examples/train_sd.py` killed in step 3 (after checkpoint-2), then run again with `--resume_from_checkpoint
    latest`, ends with the weights of the same run done in one go: the flag reaches `trainer.train`."""
    tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    reference_dataset.save_to_disk(str(tmp_path / "data"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }

    def command(out, *extra):
        return [
            sys.executable,
            str(ROOT / "examples" / "train_sd.py"),
            "--model_name_or_path",
            str(tmp_path / "pipe"),
            "--dataset_name",
            str(tmp_path / "data"),
            "--reward_funcs",
            "remote_rewards.brightness_until_flagged",
            "--use_peft",
            "--lora_r",
            "4",
            "--lora_alpha",
            "16",
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--num_inference_steps",
            "3",
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_steps",
            "1",
            "--learning_rate",
            "1e-2",
            "--report_to",
            "none",
            "--log_sample_images_steps",
            "0",
            "--output_dir",
            str(out),
            *extra,
        ]

    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        command(killed),
        env={**env, "DDRL_TEST_HANG_WHEN": str(killed / "checkpoint-2")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-2").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # into step 3, which hangs in its reward
    process.kill()
    process.wait()
    assert not (killed / "pytorch_lora_weights.safetensors").exists() and not (killed / "checkpoint-4").exists()
    calls = tmp_path / "calls.log"
    resumed = subprocess.run(
        command(killed, "--resume_from_checkpoint", "latest"),
        env={**env, "DDRL_TEST_CALL_LOG": str(calls)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the construction check, then steps 3 and 4 only: a fresh run (the flag dropped) would roll out 4 steps
    assert calls.read_text().split() == ["2", "2", "2"]
    straight = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    after_resume = load_file(killed / "pytorch_lora_weights.safetensors")
    assert straight.keys() == after_resume.keys() and straight
    for key in straight:
        torch.testing.assert_close(after_resume[key], straight[key], rtol=0, atol=0, msg=key)


def test_script_help_lists_every_accepted_reward_form():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_sd.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    text = " ".join(result.stdout.split())
    for form in (
        "--reward_funcs",
        "Required",
        "brightness, jpeg_compressibility, jpeg_incompressibility",
        "'package.module:function'",
        "'package.module.function'",
        "run",
        "local folder",
        "Hub repo id",
        "--resume_from_checkpoint",
        "--overwrite_output_dir",
    ):
        assert form in text, form


def test_accelerate_configs_are_package_data_and_printable():
    from ddrl_trl.cli.command import ACCELERATE_CONFIGS, main

    result = subprocess.run(
        [sys.executable, "-m", "ddrl_trl.cli", "accelerate-config", "--name", "deepspeed_zero2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout == (ACCELERATE_CONFIGS / "deepspeed_zero2.yaml").read_text()
    listed = subprocess.run(
        [sys.executable, "-m", "ddrl_trl.cli", "accelerate-config", "--list"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    assert listed == ["deepspeed_zero2", "deepspeed_zero3", "fsdp", "multi_gpu"]
    with pytest.raises(SystemExit) as exited:
        main(["accelerate-config", "--name", "zero9"])
    assert exited.value.code == 2


def test_ddrl_trl_train_explains_family_infers_it_and_keeps_tracebacks_of_runs(tmp_path, capsys):
    from ddrl_trl.cli.command import main
    from ddrl_trl.cli.train import infer_family

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    assert infer_family(str(tmp_path / "sd3")) == "sd3"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert (
        "--family {cosmos,flux,flux2,flux2-klein,qwenimage,sana,sd,sd3,wan,zimage}" in shown
        and "usage: ddrl-trl train" in shown
        and "--reward_funcs" in shown
    )
    # the model named in --config decides the family (here a folder with no model_index.json: said in one line)
    (tmp_path / "run.yaml").write_text(f"model_name_or_path: {tmp_path / 'nothing'}\n")
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", str(tmp_path / "run.yaml"), "--reward_funcs", "brightness"])
    assert exited.value.code == 2
    assert "ddrl-trl train: error: Cannot read" in capsys.readouterr().err
