"""`accelerate launch examples/train_*.py` on local tiny pipelines and datasets saved to disk."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddrl_trl.tiny_pipelines import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / script), *args,
    ]  # fmt: skip
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
        "max_steps: 5\nreport_to: none\nwarmup_steps: 0\nlog_sample_images_steps: 0\n"
    )
    result = launch(
        "train_sd.py", "--config", str(tmp_path / "ddrl.yaml"),
        "--max_steps", "2", "--output_dir", str(tmp_path / "out"),  # CLI overrides the YAML
    )  # fmt: skip
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert "2/2" in result.stderr  # max_steps from the command line won over the YAML's 5
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
        script, "--model_name_or_path", str(tmp_path / "pipe"), "--dataset_name", str(tmp_path / "data"), *size,
        "--num_generations", "2", "--per_device_train_batch_size", "2", "--num_inference_steps", "3",
        "--max_sequence_length", "16", "--lora_r", "4", "--max_steps", "2", "--report_to", "none",
        "--log_sample_images_steps", "0", "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "true",  # transformers allows bf16 on CPU only when told it is on CPU
    )  # fmt: skip
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert {v.dtype for v in weights.values()} == {torch.float32}  # bf16 training keeps float32 LoRA weights
    assert torch.load(tmp_path / "out" / "training_args.bin", weights_only=False).bf16  # the script's default
    pipe = builder()
    pipe.load_lora_weights(str(tmp_path / "out"))
