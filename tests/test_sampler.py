"""The DDIM SDE sampler against diffusers' DDIMScheduler and the closed-form Gaussian density."""

import pytest
import torch
from diffusers import DDIMScheduler

from ddrl_trl.samplers import DDIMSDESampler

SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_matches_diffusers_ddim_and_log_prob_is_exact(prediction_type, eta):
    config = DDIMScheduler(**SD_CONFIG, prediction_type=prediction_type).config
    sampler = DDIMSDESampler(config, num_inference_steps=10, eta=eta)
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(10)
    torch.testing.assert_close(sampler.timesteps, reference.timesteps)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    for step_index in (0, 4, 8):
        model_output = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        t = reference.timesteps[step_index]
        expected = reference.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        mean = reference.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(noise)).prev_sample
        std = eta * reference._get_variance(t, t - 100).sqrt()
        next_sample, log_prob = sampler.step(model_output, step_index, sample, noise)
        torch.testing.assert_close(next_sample, expected, rtol=1e-5, atol=1e-5)
        closed_form = torch.distributions.Normal(mean.double(), std.double()).log_prob(next_sample.double())
        torch.testing.assert_close(log_prob.double(), closed_form.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
        recomputed, _ = sampler.log_prob(model_output, step_index, sample, next_sample)
        torch.testing.assert_close(recomputed, log_prob, rtol=0, atol=0)
        assert log_prob.dtype == torch.float32


def test_forward_process_and_targets_match_diffusers():
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDIMScheduler(**SD_CONFIG, prediction_type=prediction_type)
        sampler = DDIMSDESampler(scheduler.config, num_inference_steps=4, eta=1.0)
        x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
        t = torch.tensor([0, 500, 999])
        torch.testing.assert_close(sampler.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t))
        expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        torch.testing.assert_close(sampler.training_target(x0, noise, t), expected)


def test_final_deterministic_step_has_zero_std_and_no_log_prob():
    config = DDIMScheduler(**{**SD_CONFIG, "set_alpha_to_one": True}).config
    sampler = DDIMSDESampler(config, num_inference_steps=5, eta=1.0)
    assert sampler.stds[-1].item() == 0.0 and sampler.is_stochastic == [True] * 4 + [False]
    _, log_prob = sampler.step(torch.zeros(2, 1, 2, 2), 4, torch.zeros(2, 1, 2, 2), torch.randn(2, 1, 2, 2))
    assert log_prob.tolist() == [0.0, 0.0]


def test_invalid_sampler_settings_are_rejected():
    config = DDIMScheduler(**SD_CONFIG).config
    with pytest.raises(ValueError, match="eta must be > 0"):
        DDIMSDESampler(config, 10, eta=0.0)
    with pytest.raises(ValueError, match="sample"):
        DDIMSDESampler(DDIMScheduler(**SD_CONFIG, prediction_type="sample").config, 10, eta=1.0)
