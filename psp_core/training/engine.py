"""The pSp training engine: steps, validation, best-model selection, image grids and exactly resumable checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psp_core.errors import InputError
from psp_core.inference import average_image, refinement_step
from psp_core.nets.checkpoints import CheckpointError, load_strict, read_checkpoint, save_psp
from psp_core.nets.hyperstyle import HyperStyle
from psp_core.nets.hyperstyle_checkpoints import load_hyperstyle_weights, save_hyperstyle
from psp_core.nets.psp import POOLED_SIZE, PSP
from psp_core.nets.stylegan2 import use_exact_modulation
from psp_core.options import (
    E4E_OBJECTIVE_FAMILIES,
    REFINING_FAMILIES,
    HyperStyleArchitecture,
    PSPArchitecture,
    TrainingConfig,
)
from psp_core.runtime.devices import (
    MEASURED_TRAINING_PAYOFF,
    autocast,
    compile_model,
    keep_freed_memory,
    resolve_compile,
    resolve_precision,
)
from psp_core.training.callbacks import NullCallback, TrainingCallback
from psp_core.training.e4e import E4EObjective
from psp_core.training.hyperstyle import hyperstyle_passes, prepare_hyperstyle
from psp_core.training.losses import PSPLoss
from psp_core.training.optim import build_optimizer
from psp_core.training.state import rng_state, seed_everything, set_rng_state
from psp_core.viz import comparison_grid

logger = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
"""A training batch: (source [N, C, H, W] for the encoder, target [N, 3, 256, 256] in [-1, 1])."""

BatchSource = Iterable[Batch] | Callable[[int], Iterable[Batch]]
"""Training data: a re-iterable of batches, or `epoch -> batches` (the caller seeds the epoch's order from it)."""

BatchTransform = Callable[[Tensor, Tensor, torch.Generator], Batch]
"""Per-batch augmentation `(source, target, generator) -> (source, target)`, drawing only from `generator`."""

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best_model.pt"


def prepare_for_training(model: PSP | HyperStyle, train_decoder: bool) -> list[nn.Parameter]:
    """Freeze the decoder unless it trains (call before wrapping in DDP); return the trainable parameters.

    The mapping network stays frozen either way: pSp feeds W+ codes straight to the synthesis
    network, so it gets no gradient (and DDP would stall waiting for one). HyperStyle: `prepare_hyperstyle`.
    """
    if isinstance(model, HyperStyle):
        return prepare_hyperstyle(model, train_decoder)
    model.encoder.requires_grad_(True)
    model.decoder.requires_grad_(train_decoder)
    model.decoder.style.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def training_compiles(config: TrainingConfig, arch: PSPArchitecture | HyperStyleArchitecture, batch_size: int,
                      device: torch.device | str) -> bool:
    """Whether a training process compiles its forward: `config.compile` when explicit; `auto` when the passes
    it will run (max_steps x its batch, x n_iters_per_batch for ReStyle and HyperStyle) repay a training compile at the
    generator's size on `device` (`psp_core.runtime.devices.MEASURED_TRAINING_PAYOFF`). Never bf16 on a CPU."""
    if torch.device(device).type == "cpu" and resolve_precision(config.precision, device) == "bf16":
        if config.compile is True:
            raise InputError("compile=true with bf16 training on a CPU is refused: torch's inductor turned the "
                             "weights of a 4-step run NaN (377 of 494 tensors; eager bf16 and compiled fp32 stay "
                             "finite); set precision fp32 or compile false")
        return False
    passes_per_image = config.n_iters_per_batch if arch.family in REFINING_FAMILIES else 1
    return resolve_compile(config.compile, config.max_steps * batch_size * passes_per_image, device, arch.output_size,
                           MEASURED_TRAINING_PAYOFF)


def mean_metrics(batches: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the batches that report it."""
    keys = {k for metrics in batches for k in metrics}
    return {k: float(np.mean([m[k] for m in batches if k in m])) for k in sorted(keys)}


class Trainer:
    """Trains a pSp encoder with the pSp objective; the model may arrive wrapped (DDP), `module` is always the PSP
    (or HyperStyle). A ReStyle model trains as its reference coach: `n_iters_per_batch` refinement iterations per
    batch; HyperStyle as its coach too (`psp_core.training.hyperstyle`: the hypernetwork alone, its iterations'
    losses each back-propagated), its checkpoints in the released layout; an e4e model as its reference coach too:
    progressive stages, the delta regulariser and the latent discriminator (`psp_core.training.e4e.E4EObjective`),
    its checkpoints in the reference's training layout; a W encoder as an e4e with one code (the discriminator alone).

    Construction seeds the global RNGs from `config.seed` (noise draws use them); `resume` restores them instead.
    On a CPU the process keeps freed memory for the next step (`psp_core.runtime.devices.keep_freed_memory`; a process
    that calls it before building its models gets all of the gain). The generator's modulated convolutions run their
    fused form in float32 too (`use_exact_modulation(model, False)`): the reference's operation order is for parity,
    not for training, and costs a 16 px generator's pass 2.3-6.6x (batch 2-8, benchmarks/bench_modconv.py).
    Whether to compile is decided at the first batch (`compile: auto` needs its size, see `training_compiles`);
    compiled or not, the weights, optimiser and RNG streams are the same objects, so checkpoints and resume are too.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: PSPLoss,
        config: TrainingConfig,
        *,
        checkpoint_dir: str | Path | None = None,
        batch_transform: BatchTransform | None = None,
        val_transform: BatchTransform | None = None,
        callback: TrainingCallback | None = None,
        is_main_process: bool = True,
    ) -> None:
        self.model = model
        self.module: PSP | HyperStyle = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        use_exact_modulation(self.module, False)
        self.device = self.module.decoder.input.input.device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.loss = loss.to(self.device)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.batch_transform = batch_transform
        self.val_transform = val_transform
        self.callback = callback or NullCallback()
        self.is_main_process = is_main_process
        self.precision = resolve_precision(config.precision, self.device)   # fp16 (a GradScaler) only on CUDA
        self.optimizer = build_optimizer(
            config.optimizer, prepare_for_training(self.module, config.train_decoder), config.learning_rate
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.augment_rng = torch.Generator().manual_seed(config.seed)
        seed_everything(config.seed)
        family = self.module.arch.family
        if family != "e4e" and (loss.weights.delta_norm_lambda > 0 or config.progressive_start is not None):
            raise InputError(f"delta_norm_lambda and progressive_start train e4e encoders' per-style deltas; this is "
                             f"a {family} encoder")
        if family not in E4E_OBJECTIVE_FAMILIES and loss.weights.w_discriminator_lambda > 0:
            raise InputError(f"w_discriminator_lambda trains e4e encoders and W encoders; this is a {family} encoder")
        self.e4e = (E4EObjective(config, loss.weights, self.module.n_styles, self.device)
                    if family in E4E_OBJECTIVE_FAMILIES else None)
        self.step = 0
        self.epoch = 0
        self.batches_done = 0
        self.best_val_loss = math.inf
        self.cached_average_image: Tensor | None = None
        self.compiled: bool | None = None
        self.forward_model: nn.Module = model

    def autocast(self):
        """Mixed-precision context for the configured precision (a no-op for fp32)."""
        return autocast(self.device, self.precision)

    def decide_compile(self, batch_size: int) -> None:
        """At the first batch: decide whether to compile (`training_compiles`) and, if so, route the pSp forward
        through torch.compile with the persistent cache (`config.compile_cache`). The loss networks stay eager:
        they are under a tenth of a 256 px step, and compiling them too (IR-SE50 and LPIPS, forward and
        backward) took minutes more and, in bf16, ~20 GB of host memory on CPU. A DDP model is
        compiled as a whole, wrapper included, as PyTorch's DDP + compile guidance has it: Dynamo splits the
        graph at DDP's bucket boundaries so gradient all-reduce still overlaps the backward."""
        if self.compiled is not None:
            return
        self.compiled = training_compiles(self.config, self.module.arch, batch_size, self.device)
        if self.compiled:
            self.forward_model = compile_model(self.model, self.config.compile_cache)

    def set_train_mode(self) -> None:
        """Encoder in train mode; decoder too only when it trains; loss networks (and HyperStyle's W encoder) eval."""
        self.module.train()
        self.module.decoder.train(self.config.train_decoder)
        if isinstance(self.module, HyperStyle):
            self.module.w_encoder.eval()
        self.loss.eval()

    def prepare_batch(self, batch: Batch) -> Batch:
        """Move to the device, then apply the batch transform with the engine's resumable generator."""
        source, target = (t.to(self.device, non_blocking=True) for t in batch)
        if self.batch_transform is not None:
            source, target = self.batch_transform(source, target, self.augment_rng)
        return source, target

    def train_step(self, source: Tensor, target: Tensor) -> tuple[dict[str, float], Tensor]:
        """One optimisation step: the batch's losses back-propagated (every ReStyle iteration's), then one
        optimiser step. Returns the loss terms and the detached output images [N, 3, 256, 256]."""
        self.set_train_mode()
        adversary = self.train_discriminator(source) if self.e4e is not None else {}
        self.optimizer.zero_grad(set_to_none=True)
        metrics, output = self.batch_losses(source, target, backward=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {**adversary, **metrics}, output

    def train_discriminator(self, source: Tensor) -> dict[str, float]:
        """e4e, before the encoder's step: move the encoder to this step's progressive stage, then one update of
        the latent discriminator on the generator's mapped codes against the encoder's (no encoder gradient)."""
        stage = self.e4e.stage(self.step)
        if self.e4e.steps is not None:
            self.module.encoder.set_progressive_stage(stage)
        logs = {} if stage is None else {"progressive_stage": float(stage)}
        if self.e4e.discriminator is not None:
            with torch.no_grad(), self.autocast():
                fake = self.module.encode(source).float()
            logs.update(self.e4e.discriminator_step(self.step, self.module.decoder.get_latent, fake, stage))
        return logs

    def batch_losses(self, source: Tensor, target: Tensor, backward: bool) -> tuple[dict[str, float], Tensor]:
        """The loss terms of one batch and its detached output [N, 3, 256, 256]: one forward pass, or ReStyle's or
        HyperStyle's refinement iterations; with `backward`, each pass's loss is back-propagated."""
        self.decide_compile(source.shape[0])
        if self.module.arch.family in REFINING_FAMILIES:
            return self.refinement_losses(source, target, backward)
        with self.autocast():
            output, latent = self.forward_model(source, return_latents=True)
            total, metrics = self.loss(output.float(), target, source, latent.float(), self.module.latent_avg)
        if self.e4e is not None:
            stage = self.module.encoder.progressive_stage if self.e4e.steps is not None else None
            e4e_total, e4e_terms = self.e4e.encoder_loss(latent.float(), stage)
            total = total + e4e_total
            metrics = {**metrics, **e4e_terms, "loss": float(total.detach())}
            if not backward:
                metrics.update(self.e4e.discriminator_losses(self.module.decoder.get_latent, latent.float(), stage))
        if backward:
            self.scaler.scale(total).backward()
        return metrics, output.detach()

    def refinement_losses(self, source: Tensor, target: Tensor, backward: bool) -> tuple[dict[str, float], Tensor]:
        """ReStyle's or HyperStyle's iterations on one batch, as their reference coaches train them (`restyle_passes`,
        `hyperstyle_passes`): every iteration's loss is computed and, with `backward`, back-propagated (under DDP
        gradients are all-reduced once, at the last). Metrics: the last iteration's terms plus `loss_iter{i}`,
        iteration i's total loss; the output is the last iteration's."""
        n_iters = self.config.n_iters_per_batch
        passes = (hyperstyle_passes(self.forward_model, self.module, source) if isinstance(self.module, HyperStyle)
                  else self.restyle_passes(source))
        per_iteration: dict[str, float] = {}
        for index in range(n_iters):
            with self.gradient_sync(index == n_iters - 1 or not backward):
                with self.autocast():
                    output, latent = next(passes)
                    total, metrics = self.loss(output.float(), target, source, latent.float(), self.module.latent_avg)
                if backward:
                    self.scaler.scale(total).backward()
            per_iteration[f"loss_iter{index}"] = metrics["loss"]
        return {**metrics, **per_iteration}, output.detach()

    def restyle_passes(self, source: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """ReStyle's passes as its reference coach runs them: the first encodes the source [N, C, H, W] beside the
        average image and starts from latent_avg, each later one beside the last output and from the last latent
        (both detached in between). Yields (output pooled to 256, latent) per pass taken."""
        image, latent = self.average_image(source.shape[-2:]), None
        while True:
            image, latent = refinement_step(self.forward_model, source, image, latent, randomize_noise=True)
            yield F.adaptive_avg_pool2d(image, (POOLED_SIZE, POOLED_SIZE)), latent
            image, latent = image.detach(), latent.detach()

    def average_image(self, size: tuple[int, int]) -> Tensor:
        """ReStyle's first "last output": the generator's image of latent_avg pooled to `size`, [1, 3, *size]
        float32 without gradient; computed once unless the decoder trains (then every batch)."""
        cached = self.cached_average_image
        if cached is None or self.config.train_decoder or tuple(cached.shape[-2:]) != tuple(size):
            with torch.no_grad():
                cached = average_image(self.module, tuple(size)).float()
            self.cached_average_image = cached
        return cached

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """The context of one backward pass: under DDP, gradients accumulate locally unless `sync` (then the
        accumulated sum is all-reduced); without DDP, nothing."""
        if sync or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def validate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Mean loss terms over the test batches (ReStyle: the last iteration's, and `loss_iter{i}`), with fixed
        random draws that leave the training RNG untouched."""
        self.module.eval()
        collected: list[dict[str, float]] = []
        transform_rng = torch.Generator().manual_seed(self.config.seed)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.config.seed)
            for index, (source, target) in enumerate(batches):
                if self.config.max_val_batches is not None and index >= self.config.max_val_batches:
                    break
                source, target = source.to(self.device), target.to(self.device)
                if self.val_transform is not None:
                    source, target = self.val_transform(source, target, transform_rng)
                metrics, output = self.batch_losses(source, target, backward=False)
                collected.append(metrics)
                if index == 0 and self.is_main_process:
                    self.callback.on_images(self.step, "test", self.grid(source, target, output))
        if not collected:
            raise ValueError("validation data yielded no batches")
        return mean_metrics(collected)

    def grid(self, source: Tensor, target: Tensor, output: Tensor) -> Tensor:
        """The comparison grid, with per-image identity similarity when the loss has an identity network."""
        similarities = None
        if self.loss.identity is not None:
            with torch.no_grad():
                similarities = self.loss.identity.similarities(output.float(), target).cpu()
        return comparison_grid(source, target, output, similarities)

    def epoch_batches(self, data: BatchSource) -> Iterable[Batch]:
        """The current epoch's batches, resuming after the ones already consumed."""
        batches = data(self.epoch) if callable(data) else data
        seen = 0
        for seen, batch in enumerate(batches, start=1):
            if seen > self.batches_done:
                self.batches_done = seen
                yield batch
        if seen == 0:
            raise ValueError(f"training data yielded no batches in epoch {self.epoch}")

    def fit(self, train_data: BatchSource, val_data: Iterable[Batch] | None = None) -> dict[str, float]:
        """Train until `max_steps`, validating, logging, and checkpointing on the configured intervals."""
        cfg = self.config
        last_val: dict[str, float] = {}
        while self.step < cfg.max_steps:
            for batch in self.epoch_batches(train_data):
                source, target = self.prepare_batch(batch)
                metrics, output = self.train_step(source, target)
                final = self.step == cfg.max_steps
                if self.is_main_process and (self.step % cfg.log_interval == 0 or final):
                    self.callback.on_step(self.step, metrics)
                if self.is_main_process and (self.step % cfg.image_interval == 0 or final):
                    self.callback.on_images(self.step, "train", self.grid(source, target, output))
                if val_data is not None and (self.step % cfg.val_interval == 0 or final):
                    last_val = self.validate(val_data)
                    if self.is_main_process:
                        self.callback.on_validation(self.step, last_val)
                    if last_val["loss"] < self.best_val_loss:
                        self.best_val_loss = last_val["loss"]
                        self.save(BEST_CHECKPOINT, is_best=True)
                if self.step % cfg.save_interval == 0 or final:
                    self.save(LAST_CHECKPOINT, is_best=False)
                if final:
                    break
            else:
                self.epoch += 1
                self.batches_done = 0
        return last_val

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs to continue identically."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "best_val_loss": self.best_val_loss,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "augment_rng": self.augment_rng.get_state(),
            "rng": rng_state(self.device),
        }

    def save(self, name: str, is_best: bool) -> Path | None:
        """Write a pSp-layout checkpoint into checkpoint_dir (main process only); the best model
        carries only weights and step, the others also the `training_state` needed to resume.
        An e4e checkpoint also has the reference coach's entries (`e4e_checkpoint_entries`)."""
        e4e_state = self.e4e.state_dict() if self.e4e is not None and not is_best else None   # every rank's
        if self.checkpoint_dir is None or not self.is_main_process:
            return None
        extra: dict[str, Any] = {"step": self.step, "best_val_loss": self.best_val_loss}
        if not is_best:
            extra["training_state"] = self.training_state()
        if self.e4e is not None:
            extra.update(self.e4e_checkpoint_entries(extra.get("training_state"), e4e_state))
        if isinstance(self.module, HyperStyle):
            path = save_hyperstyle(self.module, self.checkpoint_dir / name, extra=extra)
        else:
            path = save_psp(self.module, self.checkpoint_dir / name, extra=extra)
        self.callback.on_checkpoint(self.step, path, is_best)
        return path

    def e4e_checkpoint_entries(self, training_state: dict[str, Any] | None,
                               e4e_state: dict[str, Any] | None) -> dict[str, Any]:
        """What e4e's reference coach saves and resumes from: its training `opts`, `global_step` (the 0-based
        index of the last step done: it resumes at the next), the encoder `optimizer` (moved here from the
        training state, not stored twice) and the discriminator with its optimiser; the training state gets
        every rank's pools and real-code generator (`e4e_state`)."""
        entries = {"opts": {**self.module.opts, **dataclasses.asdict(self.loss.weights), **self.e4e.reference_opts(),
                            "learning_rate": self.config.learning_rate, "optim_name": self.config.optimizer,
                            "max_steps": self.config.max_steps, "train_decoder": self.config.train_decoder},
                   "global_step": self.step - 1, **self.e4e.checkpoint_entries()}
        if training_state is not None:
            entries["optimizer"] = training_state.pop("optimizer")
            training_state["e4e"] = e4e_state
        return entries

    def resume(self, path: str | Path) -> None:
        """Load weights and training state from a checkpoint written by `save`, to continue where it stopped."""
        self.load_training_checkpoint(read_checkpoint(path), path)

    def try_resume(self, path: str | Path) -> bool:
        """`resume` from `path` if it reads whole; a missing, partial or damaged file (a copy stopped mid-way) is
        passed over with a warning and False, so the caller falls back to an earlier checkpoint."""
        try:
            ckpt = read_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as err:
            logger.warning("not resuming from %s: %s", path, err)
            return False
        self.load_training_checkpoint(ckpt, path)
        return True

    def load_training_checkpoint(self, ckpt: Any, path: str | Path) -> None:
        """Restore weights and training state from `ckpt`, a checkpoint `save` wrote (read from `path`)."""
        if not isinstance(ckpt, dict) or "training_state" not in ckpt:
            raise ValueError(f"{path}: no training_state; it is a model checkpoint, not a resumable one")
        if isinstance(self.module, HyperStyle):
            load_hyperstyle_weights(self.module, ckpt, path)
        else:
            load_strict(self.module, ckpt["state_dict"], str(path))
            self.module.set_latent_avg(ckpt.get("latent_avg"))
        self.cached_average_image = None
        state = ckpt["training_state"]
        self.optimizer.load_state_dict(state["optimizer"] if "optimizer" in state else ckpt["optimizer"])
        if self.e4e is not None:
            self.e4e.load(ckpt, state["e4e"], self.device)
        self.scaler.load_state_dict(state["scaler"])
        self.augment_rng.set_state(state["augment_rng"])
        set_rng_state(state["rng"], self.device)
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.best_val_loss = state["best_val_loss"]
