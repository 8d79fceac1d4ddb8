"""`accelerate launch examples/train_sd.py` on a local tiny pipeline and a dataset saved to disk."""

import os
import subprocess
import sys
from pathlib import Path

from ddrl_trl.tiny_pipelines import tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]


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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "examples" / "train_sd.py"), "--config", str(tmp_path / "ddrl.yaml"),
        "--max_steps", "2", "--output_dir", str(tmp_path / "out"),  # CLI overrides the YAML
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert "'train_runtime'" in result.stdout or "train_runtime" in result.stderr
    assert "2/2" in result.stderr  # max_steps from the command line won over the YAML's 5

    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(tmp_path / "out"))
