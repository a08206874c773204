"""Optimisers for pSp training: Ranger (RAdam + Lookahead + gradient centralisation) and Adam."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from psp_core.options import OptimizerName


def centralize_gradient(grad: Tensor) -> None:
    """Subtract from a weight gradient (ndim > 1) its mean over every axis but the output axis, in place."""
    if grad.dim() > 1:
        grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))


class Ranger(torch.optim.RAdam):
    """torch's RAdam with gradient centralisation and Lookahead (every `k` steps, slow += alpha * (fast - slow))."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        alpha: float = 0.5,
        k: int = 6,
        use_gc: bool = True,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.defaults.update(alpha=alpha, k=k, use_gc=use_gc)
        for group in self.param_groups:
            for key in ("alpha", "k", "use_gc"):
                group.setdefault(key, self.defaults[key])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Centralise gradients, take a RAdam step, then pull the weights to the slow copy every k-th step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first_weights: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_gc"]:
                    centralize_gradient(p.grad)
                if "slow_buffer" not in self.state[p]:
                    first_weights[p] = p.detach().clone()
        super().step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p in first_weights:
                    state["slow_buffer"] = first_weights[p]
                if int(state["step"]) % group["k"] != 0:
                    continue
                slow = state["slow_buffer"]
                slow.add_(p - slow, alpha=group["alpha"])
                p.copy_(slow)
        return loss


def build_optimizer(
    name: OptimizerName, params: Iterable[nn.Parameter], lr: float = 1e-4
) -> torch.optim.Optimizer:
    """The reference pSp choice: Ranger (default) or plain Adam, with the given learning rate."""
    if name == "ranger":
        return Ranger(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be 'ranger' or 'adam', got {name!r}")
