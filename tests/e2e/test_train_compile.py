"""The compiled training step on a tiny pSp (16 px generator, 64 px encoder input) on CPU: the `compile` switch
and its `auto` rule, compiled steps that match eager (fp32: bf16 never compiles on a CPU), and exact resume of a
compiled run. The encoder is the smallest (one W code from the IR-50 body, without the squeeze-excitation blocks):
what is tested does not depend on it, and its graph compiles in two thirds of the default encoder's time (the test
alone: 125 s against 177 s), and without the SE blocks in about half again (a cold compile and 2 steps: 56 s against
102 s with them, 2026-12-08). (A Ray
Train run with compile, cold and from the cache: benchmarks/bench_train_ray.py --compile; a cold compile of a 256 px
model takes minutes, too long for the suite.)"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from helpers.pipelines import noisy_psp, smooth_images
from psp_core import PSPArchitecture
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.errors import InputError
from psp_core.options import W_ENCODER
from psp_core.runtime.devices import MEASURED_TRAINING_PAYOFF, CompilePayoff
from psp_core.training.engine import LAST_CHECKPOINT, Trainer, TrainingConfig, training_compiles
from psp_core.training.losses import LossWeights, PSPLoss

TINY = PSPArchitecture(output_size=16, encoder_input_size=64, encoder_type=W_ENCODER, learn_in_w=True,
                       encoder_mode="ir")


@pytest.fixture(scope="module")
def tiny_model():
    return noisy_psp(TINY)   # non-zero noise strengths: the (compiled) noise draws matter to every step


def trainer_for(model, max_steps: int, compile_: bool, precision: str = "fp32", checkpoint_dir=None) -> Trainer:
    """A Trainer with the encode preset's augmentation and an L2 + w-norm loss (no loss network: it compiles faster)."""
    config = TrainingConfig(max_steps=max_steps, learning_rate=1e-3, save_interval=max_steps, image_interval=100,
                            log_interval=100, seed=3, precision=precision, compile=compile_)
    loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0, w_norm_lambda=0.005))
    return Trainer(copy.deepcopy(model), loss, config, checkpoint_dir=checkpoint_dir,
                   batch_transform=PresetTransform(get_preset("encode"), encoder_size=64))


def test_compile_switch_is_validated_and_off_by_default():
    assert TrainingConfig().compile is False, "the library compiles only when asked (the pipeline's params say auto)"
    with pytest.raises(InputError, match="compile must be auto, true or false"):
        TrainingConfig(compile="yes")


def test_auto_compiles_when_the_run_repays_the_measured_compile(monkeypatch):
    """auto counts max_steps x batch forward passes (x n_iters_per_batch for ReStyle) at the generator's size."""
    monkeypatch.setitem(MEASURED_TRAINING_PAYOFF, "cpu",
                        CompilePayoff(compile_seconds=64.0, seconds_saved_per_image=1.0, output_size=1024))
    # at 256 px an image saves 1/16 s: 1024 images repay 64 s
    arch = PSPArchitecture(output_size=256)
    assert training_compiles(TrainingConfig(max_steps=512, compile="auto", precision="fp32"), arch, 2, "cpu")
    assert not training_compiles(TrainingConfig(max_steps=511, compile="auto", precision="fp32"), arch, 2, "cpu")
    restyle = PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=6, output_size=256)
    assert training_compiles(TrainingConfig(max_steps=103, compile="auto", n_iters_per_batch=5, precision="fp32"), restyle, 2, "cpu")
    assert not training_compiles(TrainingConfig(max_steps=10**6, compile=False), arch, 2, "cpu")
    assert training_compiles(TrainingConfig(max_steps=1, compile=True, precision="fp32"), arch, 1, "cpu")
    assert not training_compiles(TrainingConfig(max_steps=10**9, compile="auto"), arch, 2, "meta"), \
        "no measurement for the device type: no compile"


def test_bf16_training_on_a_cpu_never_compiles():
    """Inductor turned a 4-step compiled bf16 run's weights NaN on this CPU (eager bf16 and compiled fp32 stay
    finite): auto stays eager, an explicit compile is one line."""
    arch = PSPArchitecture(output_size=256)
    assert not training_compiles(TrainingConfig(max_steps=10**9, compile="auto", precision="bf16"), arch, 8, "cpu")
    with pytest.raises(InputError, match="compile=true with bf16 training on a CPU is refused"):
        training_compiles(TrainingConfig(max_steps=1, compile=True, precision="bf16"), arch, 1, "cpu")


def test_the_trainer_decides_at_its_first_batch(tiny_model, monkeypatch):
    """`compile: auto` is settled with the first batch's size; an eager trainer keeps the plain model."""
    monkeypatch.setitem(MEASURED_TRAINING_PAYOFF, "cpu",
                        CompilePayoff(compile_seconds=1e9, seconds_saved_per_image=1.0, output_size=1024))
    trainer = trainer_for(tiny_model, 4, compile_=False)
    trainer.config = TrainingConfig(max_steps=4, compile="auto")
    assert trainer.compiled is None
    trainer.decide_compile(batch_size=2)
    assert trainer.compiled is False and trainer.forward_model is trainer.model


@pytest.mark.slow
def test_compiled_resume_equals_uninterrupted_compiled_run(tiny_model, tmp_path):
    """Compiled (fp32: bf16 never compiles on a CPU): 2 steps, save, resume in a fresh trainer (other weights, other RNG states) and run 2 more
    == 4 straight compiled steps, bit for bit; and the compiled step tracks the eager one.

    Bitwise equality holds because inductor's random draws (the generator's noise) take their seeds from
    torch's global generator, which checkpoints save and resume restores, and the same compiled kernels run."""
    batches = [(smooth_images(2, seed=s), smooth_images(2, seed=s)) for s in range(2)]

    straight = trainer_for(tiny_model, 4, compile_=True)
    straight.fit(batches)
    assert straight.compiled is True and straight.precision == "fp32"
    assert isinstance(straight.forward_model, torch._dynamo.eval_frame.OptimizedModule)

    first = trainer_for(tiny_model, 2, compile_=True, checkpoint_dir=tmp_path)
    first.fit(batches)
    resumed = trainer_for(tiny_model, 4, compile_=True)
    with torch.no_grad():
        for p in resumed.module.parameters():
            p.add_(0.01)
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    resumed.augment_rng.manual_seed(54321)
    resumed.resume(tmp_path / LAST_CHECKPOINT)
    resumed.fit(batches)

    assert resumed.step == straight.step == 4
    a, b = straight.module.state_dict(), resumed.module.state_dict()
    differing = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differing, f"a resumed compiled run must continue bit for bit: {len(differing)} of {len(a)} " \
                          f"tensors differ, by up to {max(differing.values()):.3g}"
    assert not all(torch.equal(a[k], first.module.state_dict()[k]) for k in a)
    assert torch.equal(resumed.augment_rng.get_state(), straight.augment_rng.get_state())

    # compiled vs eager, same step from the same state: the compiled kernels compute the same step
    eager = trainer_for(tiny_model, 1, compile_=False)
    compiled = trainer_for(tiny_model, 1, compile_=True)
    source, target = batches[0][0][:, :, ::4, ::4] * 2 - 1, batches[0][1] * 2 - 1
    eager_metrics = None
    for trainer in (eager, compiled):
        torch.manual_seed(7)
        metrics, _ = trainer.train_step(source, target)
        eager_metrics = eager_metrics or metrics
    assert compiled.compiled is True and eager.compiled is False
    for name, value in eager_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=0.05, abs=1e-3), name
