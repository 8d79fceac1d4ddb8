"""The embedded default: the shipped digits model, its judge, and a short run of the comparison end to end."""

import json

import pytest
import torch
from PIL import Image

from ddrl_trl.demo import __main__ as demo
from ddrl_trl.demo.digits import (
    ASSET_DIR,
    DigitsEvaluator,
    build_digits_pipeline,
    digit_prompt,
    digits_dataset,
    evaluate_digits_pipeline,
    ink_reward,
    load_digits_pipeline,
    prompt_label,
)


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


def test_dataset_is_real_paired_digits():
    train, test = digits_dataset("train"), digits_dataset("test")
    assert len(train) + len(test) == 1797 and len(test) > 300
    row = train[0]
    assert row["image"].size == (16, 16) and row["prompt"] == digit_prompt(row["label"])
    assert prompt_label(row["prompt"]) == row["label"]


def test_shipped_model_draws_the_prompted_digits(evaluator):
    assert (ASSET_DIR / "model_index.json").is_file(), "the shipped digits pipeline is missing"
    assert evaluator.test_accuracy() > 0.9
    pipe = load_digits_pipeline()
    result = evaluate_digits_pipeline(pipe, evaluator, num_inference_steps=10, per_digit=5)
    assert result["accuracy"] >= 0.85


def test_ink_reward_is_mean_brightness():
    images = torch.zeros(2, 3, 4, 4)
    images[1, :, :2] = 1.0
    assert ink_reward(images, ["a", "b"]) == [0.0, 0.5]


def test_build_script_trains_a_loadable_pipeline(tmp_path):
    build_digits_pipeline(tmp_path / "pipe", vae_steps=2, unet_steps=2, batch_size=8, log=lambda *_: None)
    pipe = load_digits_pipeline(tmp_path / "pipe")
    out = pipe(["a handwritten digit one"], num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("cfg_scale", ["1", "2"])
def test_demo_comparison_runs_end_to_end(tmp_path, capsys, cfg_scale):
    """Both runs, the table, the verdict and the files; guided (--cfg-scale 2), with the guided held-out ratio in the
    history, the table and the verdict, and the guided default data_beta."""
    code = demo.main(
        [
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--per-digit",
            "1",
            "--eval-size",
            "8",
            "--validation-per-digit",
            "2",
            "--prompts-per-step",
            "1",
            "--cfg-scale",
            cfg_scale,
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code in (0, 1)  # two steps are too few to hack; the verdict lines must still be printed
    out = capsys.readouterr().out
    assert "baseline (data_beta=0)" in out and "DDRL (data_beta=" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [h["step"] for h in results["ddrl"]["history"]] == [0, 1, 2]
    guided = cfg_scale == "2"
    assert results["baseline"]["data_beta"] == 0.0
    assert results["ddrl"]["data_beta"] == pytest.approx(1.5 if guided else 0.3, rel=1e-12)
    final = results["ddrl"]["history"][-1]
    assert ("guided_diffusion_loss_ratio" in final) == guided
    assert ("guided ratio" in out) == guided and ("higher of conditional and guided" in out) == guided
    if guided:
        watched = max(final["diffusion_loss_ratio"], final["guided_diffusion_loss_ratio"])
        assert f"(higher of conditional and guided) {watched:.3f}" in out
    for name in ("report.png", "grid_before.png", "grid_after_ddrl.png", "grid_after_baseline.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    # the validation grid (a row per digit, fixed seeds) at each evaluation, its diversity and judge in the history
    for run in ("baseline", "ddrl"):
        grids = sorted(p.name for p in (tmp_path / run / "validation").iterdir())
        assert grids == ["step-000000.png", "step-000001.png", "step-000002.png"], grids
        grid = Image.open(tmp_path / run / "validation" / "step-000002.png")
        # --validation-per-digit 2 columns, a captioned row per digit; 16 px digits enlarged 8× to 128 px, 4 px apart
        assert grid.size == (2 * 128 + 3 * 4, 10 * (18 + 128 + 4) + 4)
        assert results[run]["history"][0]["diversity_ratio"] == pytest.approx(1.0)  # step 0: the base itself
        assert 0 <= results[run]["history"][-1]["validation_judge"] <= 1
    assert "diversity" in out


def test_demo_rolls_out_guided_with_the_guided_anchor_unless_told_otherwise():
    assert demo.parse_args([]).data_beta == 0.3
    assert demo.parse_args(["--cfg-scale", "2"]).data_beta == pytest.approx(1.5, rel=1e-12)
    assert demo.parse_args(["--cfg-scale", "2", "--data-beta", "0.5"]).data_beta == 0.5
