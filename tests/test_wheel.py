"""The built wheel is enough: installed into a fresh venv, `ddrl-trl train` trains a tiny local pipeline, and the
package data (accelerate configs, the demo's model) is in it — no clone of the repository needed."""

import glob
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from safetensors.torch import load_file

from ddrl_trl.testing import tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_the_built_wheel_runs_ddrl_trl_train_in_a_fresh_venv(tmp_path, reference_dataset):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = glob.glob(str(tmp_path / "dist" / "ddrl_trl-*.whl"))[0]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The dependencies come from this environment (a plain path entry: the editable install's finder here is not
    # run, so ddrl_trl can only come from the wheel), saving a ~2-minute install of torch, diffusers and the rest.
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )

    tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    reference_dataset.save_to_disk(str(tmp_path / "data"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import ddrl_trl; print(ddrl_trl.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert located.startswith(site), located  # the wheel's copy, not the repository's
    for data_file in (
        "ddrl_trl/accelerate_configs/deepspeed_zero2.yaml",
        "ddrl_trl/demo/assets/digits-sd/model_index.json",
    ):
        assert Path(site, data_file).is_file(), data_file
    result = subprocess.run(
        [
            str(venv / "bin" / "ddrl-trl"),
            "train",
            "--model_name_or_path",
            str(tmp_path / "pipe"),  # family: inferred
            "--dataset_name",
            str(tmp_path / "data"),
            "--reward_funcs",
            "brightness",
            "--use_peft",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--num_generations",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--num_inference_steps",
            "3",
            "--max_steps",
            "1",
            "--report_to",
            "none",
            "--log_sample_images_steps",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    printed = subprocess.run(
        [str(venv / "bin" / "ddrl-trl"), "accelerate-config", "--name", "multi_gpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert "distributed_type: MULTI_GPU" in printed
