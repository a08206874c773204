"""Ranger against an independent RAdam + Lookahead + gradient-centralisation computation, and its resume."""

import math

import pytest
import torch

from psp_core.training.optim import Ranger, build_optimizer, centralize_gradient


def reference_ranger(params, grads_per_step, lr, betas, eps, alpha, k):
    """Plain-tensor Ranger (as in the pSp reference): GC, rectified Adam, Lookahead with slow weights."""
    beta1, beta2 = betas
    params = [p.clone().double() for p in params]
    slow = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    rho_inf = 2 / (1 - beta2) - 1
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            if g.dim() > 1:
                g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
            if rho_t > 5:
                rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                adaptive = math.sqrt(1 - beta2**t) / (v[i].sqrt() + eps)
                params[i] = params[i] - lr * m_hat * rect * adaptive
            else:
                params[i] = params[i] - lr * m_hat
            if t % k == 0:
                slow[i] = slow[i] + alpha * (params[i] - slow[i])
                params[i] = slow[i].clone()
    return params


def test_centralize_gradient_removes_mean_over_inputs_but_not_bias():
    """Weights lose their per-output mean; vectors (biases) are left as they are."""
    weight = torch.randn(4, 3, 2, 2)
    centralize_gradient(weight)
    assert torch.allclose(weight.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6)
    bias = torch.randn(4)
    before = bias.clone()
    centralize_gradient(bias)
    assert torch.equal(bias, before)


def test_ranger_matches_independent_computation():
    """Twenty steps (unrectified steps 1-5, rectified from step 6; three Lookahead syncs) agree."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 3))
    bias = torch.nn.Parameter(torch.randn(5))
    start = [weight.detach().clone(), bias.detach().clone()]
    grads = [[torch.randn(5, 3), torch.randn(5)] for _ in range(20)]
    opt = Ranger([weight, bias], lr=1e-2)
    for step_grads in grads:
        weight.grad, bias.grad = (g.clone() for g in step_grads)
        opt.step()
    expected = reference_ranger(start, grads, lr=1e-2, betas=(0.95, 0.999), eps=1e-5, alpha=0.5, k=6)
    assert torch.allclose(weight.detach().double(), expected[0], atol=1e-5)
    assert torch.allclose(bias.detach().double(), expected[1], atol=1e-5)


def test_ranger_rectified_phase_matches():
    """With beta2 = 0.9 (a different rectification schedule) and a 3-d weight it still agrees."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(4, 2, 3))
    start = [weight.detach().clone()]
    grads = [[torch.randn(4, 2, 3)] for _ in range(15)]
    opt = Ranger([weight], lr=1e-2, betas=(0.9, 0.9))
    for (g,) in grads:
        weight.grad = g.clone()
        opt.step()
    expected = reference_ranger(start, grads, lr=1e-2, betas=(0.9, 0.9), eps=1e-5, alpha=0.5, k=6)
    assert torch.allclose(weight.detach().double(), expected[0], atol=1e-5)


def test_ranger_state_dict_round_trip_resumes_exactly():
    """Stopping after 7 steps and resuming from the state dict gives bit-identical weights at step 14."""
    torch.manual_seed(2)
    grads = [torch.randn(3, 4) for _ in range(14)]
    init = torch.randn(3, 4)

    straight = torch.nn.Parameter(init.clone())
    opt = Ranger([straight])
    for g in grads:
        straight.grad = g.clone()
        opt.step()

    first = torch.nn.Parameter(init.clone())
    opt_first = Ranger([first])
    for g in grads[:7]:
        first.grad = g.clone()
        opt_first.step()
    saved_param, saved_state = first.detach().clone(), opt_first.state_dict()

    resumed = torch.nn.Parameter(saved_param)
    opt_resumed = Ranger([resumed])
    opt_resumed.load_state_dict(saved_state)
    for g in grads[7:]:
        resumed.grad = g.clone()
        opt_resumed.step()
    assert torch.equal(resumed, straight)


def test_build_optimizer_names():
    """`ranger` gives Ranger with the pSp defaults, `adam` gives Adam, anything else is refused."""
    p = [torch.nn.Parameter(torch.zeros(2))]
    ranger = build_optimizer("ranger", p, lr=3e-4)
    assert isinstance(ranger, Ranger)
    group = ranger.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["alpha"], group["k"]) == (3e-4, (0.95, 0.999), 1e-5, 0.5, 6)
    assert type(build_optimizer("adam", p)) is torch.optim.Adam
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("sgd", p)
