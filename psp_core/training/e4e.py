"""e4e's training objective beside pSp's (Tov et al. 2021, as its reference coach computes it): progressive
stages that add one layer's delta at a time, the delta regulariser that keeps the deltas small, and a
latent discriminator that keeps the encoder's codes in W."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from psp_core.nets.discriminator import LatentDiscriminator
from psp_core.options import LossWeights, TrainingConfig


def progressive_steps(n_styles: int, start: int, every: int) -> list[int]:
    """The step at which each progressive stage begins: stage 0 (w alone) at 0, stage i >= 1 (deltas of
    layers 1..i) at `start + (i - 1) * every`; one entry per style."""
    return [0] + [start + i * every for i in range(n_styles - 1)]


def stage_at(step: int, steps: list[int] | None) -> int | None:
    """The progressive stage that optimiser step `step` (0-based) runs at; None (inference: every delta)
    without a schedule."""
    if steps is None:
        return None
    return max(i for i, first in enumerate(steps) if first <= step)


def e4e_encoder_terms(latent: Tensor, stage: int | None, discriminator: nn.Module | None,
                      delta_norm: float = 2) -> dict[str, Tensor]:
    """e4e's encoder terms, unweighted, on the W+ code the generator receives (latent_avg included) [N, n, 512]:
    `encoder_discriminator_loss`, the non-saturating adversarial loss averaged over the discriminated layers
    0..stage (every layer at the inference stage, None), when there is a discriminator; and while progressive
    (stage not None) `delta{i}_loss` = mean over the batch of ||latent[:, i] - latent[:, 0]||_p for i = 1..stage
    and their sum `total_delta_loss`."""
    terms: dict[str, Tensor] = {}
    layers = range(latent.shape[1]) if stage is None else range(stage + 1)
    if discriminator is not None:
        adversarial = sum(F.softplus(-discriminator(latent[:, i])).mean() for i in layers)
        terms["encoder_discriminator_loss"] = adversarial / len(layers)
    if stage is not None:
        deltas = [torch.norm(latent[:, i] - latent[:, 0], p=delta_norm, dim=1).mean() for i in range(1, stage + 1)]
        terms.update({f"delta{i}_loss": delta for i, delta in enumerate(deltas, start=1)})
        terms["total_delta_loss"] = sum(deltas, latent.new_zeros(()))
    return terms


def discriminator_terms(discriminator: nn.Module, real_w: Tensor, fake_w: Tensor) -> dict[str, Tensor]:
    """The discriminator's non-saturating losses on real [N, 512] and fake [M, 512] codes: `d_real_loss`
    softplus(-D(real)), `d_fake_loss` softplus(D(fake)), both means, and their sum `discriminator_loss`."""
    real = F.softplus(-discriminator(real_w)).mean()
    fake = F.softplus(discriminator(fake_w)).mean()
    return {"d_real_loss": real, "d_fake_loss": fake, "discriminator_loss": real + fake}


def r1_penalty(discriminator: nn.Module, real_w: Tensor) -> Tensor:
    """R1: the batch mean of the squared norm of dD/dw at the real codes [N, 512], unscaled, differentiable."""
    real_w = real_w.detach().requires_grad_(True)
    grad, = torch.autograd.grad(discriminator(real_w).sum(), real_w, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


class LatentCodesPool:
    """A buffer of earlier codes fed to the discriminator (CycleGAN's image pool, for W codes): each query
    code (one random layer of a [n, 512] code) fills the pool until it holds `size`, then half the time
    is swapped with a random stored code, which is returned in its place. Draws come from a seeded generator."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.codes: list[Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, codes: Tensor) -> Tensor:
        """Codes [N, 512] or [N, n, 512] -> [N, 512], each the input's or a stored one."""
        if self.size == 0:
            return codes
        out = []
        for code in codes:
            if code.ndim == 2:
                code = code[self.randint(code.shape[0])]
            if len(self.codes) < self.size:
                self.codes.append(code)
                out.append(code)
            elif torch.rand((), generator=self.generator) > 0.5:
                index = self.randint(self.size)
                out.append(self.codes[index].clone())
                self.codes[index] = code
            else:
                out.append(code)
        return torch.stack(out)

    def randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"codes": [code.detach().cpu() for code in self.codes], "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.codes = [code.to(device) for code in state["codes"]]
        self.generator.set_state(state["generator"])


def average_gradients(module: nn.Module) -> None:
    """Average `module`'s gradients over the process group (the discriminator is trained outside DDP,
    whose hooks cannot carry R1's double backward); nothing without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


class E4EObjective:
    """What e4e trains beside the pSp loss: the progressive schedule, the weighted encoder terms, and the latent
    discriminator with its Adam, R1 and code pools. On several processes every rank holds the same
    discriminator (broadcast from rank 0, gradients averaged) and draws its own real codes."""

    def __init__(self, config: TrainingConfig, weights: LossWeights, n_styles: int, device: torch.device) -> None:
        self.config, self.weights = config, weights
        self.rank = rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.steps = (None if config.progressive_start is None else
                      progressive_steps(n_styles, config.progressive_start, config.progressive_step_every))
        self.discriminator: LatentDiscriminator | None = None
        if weights.w_discriminator_lambda > 0:
            self.discriminator = LatentDiscriminator().to(device).requires_grad_(False)
            if dist.is_available() and dist.is_initialized():
                for tensor in self.discriminator.state_dict().values():
                    dist.broadcast(tensor, 0)
            self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=config.w_discriminator_lr)
            self.z_generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank)
            pool_size = config.w_pool_size if config.use_w_pool else 0
            self.real_pool = LatentCodesPool(pool_size, seed=2 * (config.seed * 1000 + rank))
            self.fake_pool = LatentCodesPool(pool_size, seed=2 * (config.seed * 1000 + rank) + 1)

    def stage(self, step: int) -> int | None:
        """The progressive stage of optimiser step `step` (0-based)."""
        return stage_at(step, self.steps)

    def discriminator_step(self, step: int, mapping: Callable[[Tensor], Tensor], fake_codes: Tensor,
                           stage: int | None) -> dict[str, float]:
        """One discriminator update before the encoder's step `step` (0-based): real codes are the mapping of
        z ~ N(0, I) (as many as the batch), fake codes the encoder's [N, n, 512] (latent_avg included) on
        the discriminated layers 0..stage, both through the pools; R1 every `d_reg_every` steps."""
        if self.discriminator is None:
            return {}
        cfg, device = self.config, fake_codes.device
        with torch.no_grad():
            real_w = mapping(torch.randn(fake_codes.shape[0], fake_codes.shape[-1], device=device,
                                         generator=self.z_generator))
            fake_w = fake_codes if stage is None else fake_codes[:, :stage + 1]
            real_w, fake_w = self.real_pool.query(real_w), self.fake_pool.query(fake_w)
            if fake_w.ndim == 3:
                fake_w = fake_w[:, 0]
        self.discriminator.requires_grad_(True)
        terms = discriminator_terms(self.discriminator, real_w, fake_w)
        self.optimizer.zero_grad(set_to_none=True)
        terms["discriminator_loss"].backward()
        average_gradients(self.discriminator)
        self.optimizer.step()
        logs = {name: float(value.detach()) for name, value in terms.items()}
        if step % cfg.d_reg_every == 0:
            r1 = cfg.r1 / 2 * r1_penalty(self.discriminator, real_w) * cfg.d_reg_every
            self.optimizer.zero_grad(set_to_none=True)
            r1.backward()
            average_gradients(self.discriminator)
            self.optimizer.step()
            logs["discriminator_r1_loss"] = float(r1.detach())
        self.discriminator.requires_grad_(False)
        return logs

    def encoder_loss(self, latent: Tensor, stage: int | None) -> tuple[Tensor, dict[str, float]]:
        """The weighted e4e encoder terms on the W+ code [N, n, 512] (latent_avg included) and their logs."""
        terms = e4e_encoder_terms(latent, stage, self.discriminator, self.config.delta_norm)
        total = latent.new_zeros(())
        if "encoder_discriminator_loss" in terms:
            total = total + self.weights.w_discriminator_lambda * terms["encoder_discriminator_loss"]
        if "total_delta_loss" in terms:
            total = total + self.weights.delta_norm_lambda * terms["total_delta_loss"]
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def discriminator_losses(self, mapping: Callable[[Tensor], Tensor], fake_codes: Tensor,
                             stage: int | None) -> dict[str, float]:
        """The discriminator's losses without an update (validation): fresh real codes from the global RNG."""
        if self.discriminator is None:
            return {}
        with torch.no_grad():
            real_w = mapping(torch.randn(fake_codes.shape[0], fake_codes.shape[-1], device=fake_codes.device))
            fake_w = (fake_codes if stage is None else fake_codes[:, :stage + 1])[:, 0]
            return {name: float(value) for name, value in
                    discriminator_terms(self.discriminator, real_w, fake_w).items()}

    def checkpoint_entries(self) -> dict[str, Any]:
        """The reference checkpoint's discriminator entries (absent without a discriminator)."""
        if self.discriminator is None:
            return {}
        return {"discriminator_state_dict": {k: v.detach().cpu() for k, v in self.discriminator.state_dict().items()},
                "discriminator_optimizer_state_dict": self.optimizer.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond `checkpoint_entries`: each rank's pools and real-code generator, gathered
        from every rank (a collective under a process group: every rank calls it)."""
        if self.discriminator is None:
            return {}
        local = {"real_pool": self.real_pool.state_dict(), "fake_pool": self.fake_pool.state_dict(),
                 "z_generator": self.z_generator.get_state().cpu()}
        if not (dist.is_available() and dist.is_initialized()):
            return {"ranks": [local]}
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load(self, entries: dict[str, Any], state: dict[str, Any], device: torch.device) -> None:
        """Restore from a checkpoint's `checkpoint_entries` and the training state's `state_dict` (this rank's
        part; a rank the saved run did not have keeps its fresh pools and generator)."""
        if self.discriminator is None:
            return
        self.discriminator.load_state_dict(entries["discriminator_state_dict"])
        self.optimizer.load_state_dict(entries["discriminator_optimizer_state_dict"])
        if self.rank < len(state["ranks"]):
            mine = state["ranks"][self.rank]
            self.real_pool.load_state_dict(mine["real_pool"], device)
            self.fake_pool.load_state_dict(mine["fake_pool"], device)
            self.z_generator.set_state(mine["z_generator"])

    def reference_opts(self) -> dict[str, Any]:
        """The e4e options of the reference's training `opts`, for the checkpoint."""
        cfg, w = self.config, self.weights
        return {"progressive_start": cfg.progressive_start, "progressive_step_every": cfg.progressive_step_every,
                "progressive_steps": self.steps, "w_discriminator_lambda": w.w_discriminator_lambda,
                "w_discriminator_lr": cfg.w_discriminator_lr, "r1": cfg.r1, "d_reg_every": cfg.d_reg_every,
                "use_w_pool": cfg.use_w_pool, "w_pool_size": cfg.w_pool_size, "delta_norm": cfg.delta_norm,
                "delta_norm_lambda": w.delta_norm_lambda}
