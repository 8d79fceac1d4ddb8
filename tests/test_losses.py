"""The DDRL loss terms against hand-computed values and torch.distributions."""

import math

import torch

from ddrl_trl.core import clipped_policy_loss, diffusion_loss, gaussian_log_prob, reverse_kl_loss


def test_gaussian_log_prob_hand_value_and_distribution():
    # x=1, μ=0, σ=2: −1/8 − log 2 − ½ log 2π
    value = gaussian_log_prob(torch.ones(1, 1), torch.zeros(1, 1), 2.0)
    assert abs(value.item() - (-0.125 - math.log(2) - 0.5 * math.log(2 * math.pi))) < 1e-6
    x, mu = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    expected = torch.distributions.Normal(mu, 0.3).log_prob(x).mean(dim=(1, 2, 3)).float()
    got = gaussian_log_prob(x.to(torch.bfloat16), mu.to(torch.bfloat16), torch.tensor(0.3))
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(gaussian_log_prob(x, mu, 0.3), expected, rtol=1e-5, atol=1e-5)


def test_clipped_policy_loss_hand_values():
    log_prob = torch.tensor([math.log(1.1), math.log(1.1), 0.0])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, ratio, clipped = clipped_policy_loss(log_prob, old, adv, epsilon=0.05)
    # A=1: max(−1.1, −1.05) = −1.05; A=−1: max(1.1, 1.05) = 1.1; ratio 1: −2
    assert abs(loss.item() - (-1.05 + 1.1 - 2.0) / 3) < 1e-6
    torch.testing.assert_close(ratio, torch.tensor([1.1, 1.1, 1.0]))
    assert clipped.tolist() == [True, True, False]


def test_policy_gradient_at_ratio_one_is_minus_advantage():
    log_prob = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    loss, _, _ = clipped_policy_loss(log_prob, torch.zeros(4), adv, epsilon=1e-4)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv / 4)


def test_reverse_kl_and_diffusion_loss_hand_values():
    mean = torch.tensor([[1.0, 3.0]])
    ref = torch.tensor([[0.0, 1.0]])
    # mean_d (1, 4) = 2.5; / (2 σ²) with σ = 0.5 → 5
    assert abs(reverse_kl_loss(mean, ref, 0.5).item() - 5.0) < 1e-6
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert abs(diffusion_loss(pred, target).item() - (2.5 + 1.0) / 2) < 1e-6
    assert abs(diffusion_loss(pred, target, weights=torch.tensor([2.0, 0.0])).item() - 2.5) < 1e-6
