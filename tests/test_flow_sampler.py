"""The rectified-flow SDE sampler against hand-computed values, diffusers' Euler scheduler and the Gaussian density."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from ddrl_trl.samplers import FlowSDESampler


def config(**kw):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kw).config


def test_step_mean_and_std_hand_values():
    sampler = FlowSDESampler(config(shift=1.0), num_inference_steps=4, noise_level=0.7)
    j = 1
    t, s = sampler.sigmas[j].item(), sampler.sigmas[j + 1].item()
    delta, sde_sigma = t - s, 0.7 * math.sqrt(t / (1 - t))
    x, v = 1.0, 2.0
    expected_mean = x - delta * (v + sde_sigma**2 / (2 * t) * (x + (1 - t) * v))
    mean = sampler.step_mean(torch.full((1, 1), v), j, torch.full((1, 1), x))
    assert mean.item() == pytest.approx(expected_mean, rel=1e-6)
    assert sampler.stds[j].item() == pytest.approx(sde_sigma * math.sqrt(delta), rel=1e-6)
    # t = 1 at the first step: the denominator uses the next sigma (Flow-GRPO's guard), so σ stays finite
    assert sampler.sigmas[0].item() == 1.0
    expected_first = 0.7 * math.sqrt(1.0 / (1 - sampler.sigmas[1].item()))
    assert sampler.sde_sigmas[0].item() == pytest.approx(expected_first, rel=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_vanishing_noise_gives_diffusers_euler_step(shift):
    sampler = FlowSDESampler(config(shift=shift), num_inference_steps=6, noise_level=1e-8)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config(shift=shift))
    reference.set_timesteps(6)
    torch.testing.assert_close(sampler.timesteps, reference.timesteps)
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for j in range(5):
        reference._step_index = j
        expected = reference.step(v, reference.timesteps[j], x).prev_sample
        torch.testing.assert_close(sampler.step_mean(v, j, x), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_is_the_exact_gaussian_density_and_recomputes_identically():
    sampler = FlowSDESampler(config(shift=3.0), num_inference_steps=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=gen)
    for j in range(4):
        v, z = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
        nxt, log_prob = sampler.step(v, j, x, z)
        mean = sampler.step_mean(v, j, x)
        closed = torch.distributions.Normal(mean.double(), sampler.stds[j].double()).log_prob(nxt.double())
        torch.testing.assert_close(log_prob.double(), closed.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
        again, _ = sampler.log_prob(v, j, x, nxt)
        torch.testing.assert_close(again, log_prob, rtol=0, atol=0)
        x = nxt


def test_forward_process_matches_diffusers_scale_noise_and_velocity_target():
    sampler = FlowSDESampler(config(shift=3.0), num_inference_steps=5)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config(shift=3.0))
    reference.set_timesteps(5)
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    for j in range(5):
        t = sampler.timesteps[j : j + 1]
        torch.testing.assert_close(sampler.add_noise(x0, noise, t), reference.scale_noise(x0, t, noise))
    torch.testing.assert_close(sampler.training_target(x0, noise, t), noise - x0)


def test_dynamic_shift_uses_mu_and_bad_noise_level_is_rejected():
    dynamic = config(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    low, high = FlowSDESampler(dynamic, 4, mu=0.5), FlowSDESampler(dynamic, 4, mu=1.15)
    assert (high.sigmas[1:-1] > low.sigmas[1:-1]).all()  # a larger shift keeps more noise at each step
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        FlowSDESampler(config(), 4, noise_level=0.0)


def test_random_training_timesteps_carry_the_schedulers_shift():
    gen = torch.Generator().manual_seed(0)
    base = 1 - torch.rand(64, generator=torch.Generator().manual_seed(0))
    static = FlowSDESampler(config(shift=3.0), num_inference_steps=4).sample_timesteps(64, gen)
    torch.testing.assert_close(static, 3 * base / (1 + 2 * base) * 1000)
    dynamic = FlowSDESampler(config(use_dynamic_shifting=True), num_inference_steps=4, mu=0.8)
    drawn = dynamic.sample_timesteps(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(drawn, math.exp(0.8) / (math.exp(0.8) + (1 / base - 1)) * 1000)
    assert 0 < drawn.min() and drawn.max() <= 1000


def test_custom_base_sigmas_and_non_flow_schedulers():
    from diffusers import DDIMScheduler

    sampler = FlowSDESampler(config(shift=1.0), num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(sampler.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="DDIMScheduler is not a flow-matching scheduler"):
        FlowSDESampler(DDIMScheduler(), num_inference_steps=4)


def test_first_step_guard_covers_flow_dpm_solver_starting_at_one_minus_one_thousandth():
    """SANA's DPM-Solver flow sigmas start at 1 − 1/1000 with flow_shift 1: without the guard the first step's noise
    would be ~30× the next one's (√(t / (1 − t)) ≈ 31.6)."""
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction")
    sampler = FlowSDESampler(scheduler, num_inference_steps=10, noise_level=0.7)
    assert sampler.sigmas[0].item() == pytest.approx(0.999, abs=1e-6)
    expected_first = 0.7 * math.sqrt(sampler.sigmas[0].item() / (1 - sampler.sigmas[1].item()))
    assert sampler.sde_sigmas[0].item() == pytest.approx(expected_first, rel=1e-5)
    assert sampler.stds[0] < 2 * sampler.stds[1]
