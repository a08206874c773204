"""e4e's training objective (32 px encoder input, 16 px generator: 6 styles, CPU): the progressive schedule, the
encoder at a stage, the delta regulariser, the discriminator's losses and R1 against hand computations, the code
pool, and the engine training, checkpointing (reference layout) and resuming an e4e run exactly."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.pipelines import noisy_psp, smooth_images
from helpers.training import (
    Recorder,
    assert_same_metrics,
    assert_same_weights,
    perturbed,
    scramble_rngs,
    shuffled_epochs,
)
from psp_core import (
    HyperStyleArchitecture,
    InputError,
    LatentDiscriminator,
    PSPArchitecture,
    discriminator_terms,
    e4e_encoder_terms,
    load_psp,
    r1_penalty,
)
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.nets.checkpoint_io import load_strict
from psp_core.nets.checkpoints import read_checkpoint
from psp_core.nets.encoders import WEncoder
from psp_core.nets.hyperstyle_checkpoints import read_w_encoder
from psp_core.nets.psp import PSP
from psp_core.training.e4e import LatentCodesPool, progressive_steps, stage_at
from psp_core.training.engine import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, TrainingConfig
from psp_core.training.losses import LossWeights, PSPLoss

TINY_E4E = PSPArchitecture(encoder_type="Encoder4Editing", family="e4e", output_size=16, encoder_input_size=32)
N_STYLES = TINY_E4E.n_styles   # 6
E4E_L2 = LossWeights(l2_lambda=1.0, lpips_lambda=0.0, w_discriminator_lambda=0.1, delta_norm_lambda=2e-4)


@pytest.fixture(scope="module")
def e4e_model() -> PSP:
    return noisy_psp(TINY_E4E)


def codes(n: int = 4, layers: int = N_STYLES, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, layers, 512, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the schedule and the encoder

def test_progressive_schedule_is_the_reference_coachs():
    """[0, start, start + every, ...], one entry per style; step k runs at the last stage begun at or before k."""
    steps = progressive_steps(18, 20000, 2000)
    assert steps == [0, 20000] + [20000 + 2000 * i for i in range(1, 17)] and len(steps) == 18
    assert [stage_at(k, steps) for k in (0, 19999, 20000, 21999, 22000, 54000, 10**6)] == [0, 0, 1, 1, 2, 17, 17]
    assert stage_at(5, None) is None


def test_encoder_at_a_stage_adds_only_the_deltas_of_layers_up_to_it(e4e_model):
    """At stage s layers 1..s carry their deltas, layers above are copies of w (their heads not run, so no
    gradient); stage None and the last stage add every delta; a bad stage is refused."""
    net = copy.deepcopy(e4e_model).train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    net.encoder.set_progressive_stage(None)
    full = net.encoder(x)
    for stage in (0, 2, N_STYLES - 1):
        net.zero_grad(set_to_none=True)
        net.encoder.set_progressive_stage(stage)
        out = net.encoder(x)
        out.sum().backward()
        torch.testing.assert_close(out[:, stage + 1:], out[:, :1].expand(-1, N_STYLES - stage - 1, -1))
        torch.testing.assert_close(out[:, :stage + 1], full[:, :stage + 1])
        for i in range(1, stage + 1):
            assert (out[:, i] - out[:, 0]).abs().max() > 1e-3
        heads_with_grad = [i for i, head in enumerate(net.encoder.styles) if head.linear.weight.grad is not None]
        assert heads_with_grad == list(range(stage + 1))
    torch.testing.assert_close(out, full)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="progressive stage"):
            net.encoder.set_progressive_stage(bad)


# ----------------------------------------------------------------------------- the terms against hand computations

@pytest.mark.parametrize("p", [2, 1])
def test_delta_regulariser_is_the_mean_p_norm_of_each_layers_offset_from_layer_zero(p):
    latent = codes()
    terms = e4e_encoder_terms(latent, stage=3, discriminator=None, delta_norm=p)
    w = latent.double().numpy()
    hand = [np.mean(np.sum(np.abs(w[:, i] - w[:, 0]) ** p, axis=1) ** (1 / p)) for i in (1, 2, 3)]
    assert sorted(terms) == ["delta1_loss", "delta2_loss", "delta3_loss", "total_delta_loss"]
    for i, value in enumerate(hand, start=1):
        assert float(terms[f"delta{i}_loss"]) == pytest.approx(value, rel=1e-5)
    assert float(terms["total_delta_loss"]) == pytest.approx(sum(hand), rel=1e-5) and sum(hand) > 1
    same = latent[:, :1].repeat(1, N_STYLES, 1)      # no deltas at all: the regulariser is exactly zero
    assert float(e4e_encoder_terms(same, 3, None)["total_delta_loss"]) == 0
    assert e4e_encoder_terms(latent, None, None) == {}   # the inference stage: no regulariser


def softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x))


def test_adversarial_terms_and_r1_match_hand_computations():
    """The encoder's term averages softplus(-D) over layers 0..stage; the discriminator's are softplus(-D(real))
    and softplus(D(fake)); R1 is the batch mean of |dD/dw|^2: |a|^2 for a linear D(w) = a.w + b, and the
    per-sample gradients (torch.func) for the MLP."""
    torch.manual_seed(0)
    discriminator = LatentDiscriminator()
    latent, real, fake = codes(seed=1), codes(6, 1, seed=2)[:, 0], codes(5, 1, seed=3)[:, 0]
    with torch.no_grad():
        logits = discriminator(latent.reshape(-1, 512)).reshape(4, N_STYLES).double().numpy()
        real_logits, fake_logits = discriminator(real).double().numpy(), discriminator(fake).double().numpy()
    terms = e4e_encoder_terms(latent, stage=2, discriminator=discriminator)
    assert float(terms["encoder_discriminator_loss"].detach()) == pytest.approx(softplus(-logits[:, :3]).mean(), rel=1e-5)
    everywhere = e4e_encoder_terms(latent, stage=None, discriminator=discriminator)
    assert float(everywhere["encoder_discriminator_loss"]) == pytest.approx(softplus(-logits).mean(), rel=1e-5)
    d = discriminator_terms(discriminator, real, fake)
    assert float(d["d_real_loss"]) == pytest.approx(softplus(-real_logits).mean(), rel=1e-5)
    assert float(d["d_fake_loss"]) == pytest.approx(softplus(fake_logits).mean(), rel=1e-5)
    assert float(d["discriminator_loss"]) == pytest.approx(float(d["d_real_loss"] + d["d_fake_loss"]), rel=1e-6)

    linear = nn.Linear(512, 1)
    assert float(r1_penalty(linear, real)) == pytest.approx(float(linear.weight.pow(2).sum()), rel=1e-5)
    per_sample = torch.func.vmap(torch.func.grad(lambda w: discriminator(w[None]).sum()))(real)
    assert float(r1_penalty(discriminator, real)) == pytest.approx(float(per_sample.pow(2).sum(1).mean()), rel=1e-5)
    assert float(r1_penalty(discriminator, real)) > 0

    constant = LatentDiscriminator()   # the no-op discriminator: every code scores the same, nothing to learn
    for layer in constant.mlp:
        if isinstance(layer, nn.Linear):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, 0.5)
    flat = discriminator_terms(constant, real, fake)
    assert float(flat["d_real_loss"]) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert float(r1_penalty(constant, real)) == 0
    assert abs(float(flat["d_real_loss"]) - float(d["d_real_loss"])) > 1e-3


def test_code_pool_fills_then_swaps_half_the_time_and_replays_under_its_seed():
    """Until full the pool returns (and keeps) its input; then about half the codes come back as a stored code
    that the input replaces; a [N, n, 512] query uses one random layer per code; size 0 returns the input."""
    def run(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], LatentCodesPool]:
        pool = LatentCodesPool(4, seed=seed)
        inputs, outputs = [], []
        for k in range(100):
            code = torch.full((1, 512), float(k))
            inputs.append(code[0])
            outputs.append(pool.query(code)[0])
        return inputs, outputs, pool

    inputs, outputs, pool = run(seed=0)
    assert all(torch.equal(o, i) for o, i in zip(outputs[:4], inputs[:4]))
    swapped = [k for k in range(4, 100) if not torch.equal(outputs[k], inputs[k])]
    assert 30 <= len(swapped) <= 66          # p = 0.5 over 96 draws
    for k in swapped:                          # a swap returns an earlier input, stored until then
        assert float(outputs[k][0]) < k
    assert len(pool.codes) == 4 and {float(c[0]) for c in pool.codes} <= set(range(100))
    again = run(seed=0)[1]
    assert all(torch.equal(a, b) for a, b in zip(outputs, again))
    assert not all(torch.equal(a, b) for a, b in zip(outputs, run(seed=1)[1]))

    layered = LatentCodesPool(8, seed=0).query(torch.arange(4 * 3, dtype=torch.float).reshape(4, 3, 1).expand(4, 3, 512))
    assert layered.shape == (4, 512)
    assert all(3 * n <= float(layered[n, 0]) < 3 * n + 3 for n in range(4))
    batch = codes(3, 1)[:, 0]
    assert LatentCodesPool(0, seed=0).query(batch) is batch


# ----------------------------------------------------------------------------- the engine

def run(model: PSP, max_steps: int, data, val, checkpoint_dir=None, resume_from=None,
        before_resume=None, **overrides) -> tuple[Trainer, Recorder]:
    """A resumable e4e run: progressive from step 2 (a stage a step), R1 every 2 steps, a 2-code pool."""
    config = TrainingConfig(**{"max_steps": max_steps, "learning_rate": 1e-3, "val_interval": 2,
                               "save_interval": 2, "image_interval": 100, "log_interval": 1, "seed": 3,
                               "optimizer": "adam", "progressive_start": 2, "progressive_step_every": 1,
                               "d_reg_every": 2, "w_pool_size": 2, "w_discriminator_lr": 1e-3, **overrides})
    preset = get_preset("e4e_encode")
    recorder = Recorder()
    trainer = Trainer(copy.deepcopy(model), PSPLoss(E4E_L2), config, checkpoint_dir=checkpoint_dir,
                      batch_transform=PresetTransform(preset, encoder_size=32),
                      val_transform=PresetTransform(preset, encoder_size=32, train=False), callback=recorder)
    if before_resume is not None:
        before_resume(trainer)
    if resume_from is not None:
        trainer.resume(resume_from)
    trainer.fit(data, val)
    return trainer, recorder


@pytest.fixture(scope="module")
def data():
    images = [smooth_images(2, seed=s) for s in range(3)]
    batches = [(image, image) for image in images]
    return shuffled_epochs(batches), [batches[0]]


def test_an_e4e_run_logs_every_term_in_its_stage_and_trains_the_discriminator(e4e_model, data, tmp_path):
    """Steps 0..4 run at stages 0, 0, 1, 2, 3; each logs the discriminator's losses (R1 on even steps), the
    adversarial term and the deltas of its stage, all finite; the discriminator learns, the checkpoint carries
    the reference coach's entries and opts, and its discriminator loads strictly."""
    train, val = data
    trainer, log = run(e4e_model, 5, train, val, checkpoint_dir=tmp_path)
    stages = [m["progressive_stage"] for _, m in log.steps]
    assert stages == [0, 0, 1, 2, 3]
    for (step, metrics), stage in zip(log.steps, stages):
        expected = {"d_real_loss", "d_fake_loss", "discriminator_loss", "encoder_discriminator_loss",
                    "total_delta_loss", "loss_l2", "loss"} | {f"delta{i}_loss" for i in range(1, int(stage) + 1)}
        expected |= {"discriminator_r1_loss"} if (step - 1) % 2 == 0 else set()
        assert set(metrics) - {"progressive_stage"} == expected, step
        assert all(math.isfinite(v) for v in metrics.values())
    assert log.steps[0][1]["total_delta_loss"] == 0 and log.steps[-1][1]["delta3_loss"] > 0
    assert {"d_real_loss", "encoder_discriminator_loss", "total_delta_loss"} <= set(log.validations[-1][1])

    ckpt = read_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert {"state_dict", "opts", "latent_avg", "global_step", "optimizer", "best_val_loss",
            "discriminator_state_dict", "discriminator_optimizer_state_dict"} <= set(ckpt)
    assert ckpt["global_step"] == 4 and "optimizer" not in ckpt["training_state"]
    opts = ckpt["opts"]
    assert (opts["encoder_type"], opts["stylegan_size"], opts["start_from_latent_avg"]) == ("Encoder4Editing", 16, True)
    assert opts["progressive_steps"] == [0, 2, 3, 4, 5, 6] and opts["w_discriminator_lambda"] == 0.1
    assert (opts["delta_norm"], opts["delta_norm_lambda"], opts["r1"], opts["d_reg_every"]) == (2.0, 2e-4, 10.0, 2)
    assert (opts["use_w_pool"], opts["w_pool_size"], opts["lpips_lambda"]) == (True, 2, 0.0)
    discriminator = LatentDiscriminator()
    discriminator.load_state_dict(ckpt["discriminator_state_dict"])   # strict: the reference keys, nothing else
    torch.manual_seed(0)
    assert not torch.equal(discriminator.mlp[0].weight, LatentDiscriminator().mlp[0].weight)
    assert "discriminator_state_dict" in read_checkpoint(tmp_path / BEST_CHECKPOINT)
    assert load_psp(tmp_path / LAST_CHECKPOINT).arch.family == "e4e"


def test_the_discriminator_moves_the_encoder_and_a_constant_one_does_not(e4e_model):
    """The adversarial term's gradient reaches the encoder through the discriminator; with a constant
    discriminator (no signal) the encoder's step is the one without the term."""
    images = smooth_images(2, seed=5)
    source, target = F.interpolate(images, size=32, mode="area") * 2 - 1, images * 2 - 1

    def step(weights: LossWeights, constant: bool) -> torch.Tensor:
        config = TrainingConfig(optimizer="adam", learning_rate=1e-3, seed=1)
        trainer = Trainer(copy.deepcopy(e4e_model), PSPLoss(weights), config)
        if constant and trainer.e4e.discriminator is not None:
            for layer in trainer.e4e.discriminator.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.zeros_(layer.weight)
                    nn.init.constant_(layer.bias, 0.5)
            trainer.e4e.optimizer = torch.optim.SGD(trainer.e4e.discriminator.parameters(), lr=0.0)
        torch.manual_seed(7)
        trainer.train_step(source, target)
        return trainer.module.encoder.styles[1].linear.weight.detach().clone()

    without = step(LossWeights(l2_lambda=1.0, lpips_lambda=0.0), constant=False)
    adversarial = LossWeights(l2_lambda=1.0, lpips_lambda=0.0, w_discriminator_lambda=10.0)
    assert (step(adversarial, constant=False) - without).abs().max() > 1e-6
    torch.testing.assert_close(step(adversarial, constant=True), without)


def test_a_resumed_e4e_run_equals_an_uninterrupted_one_across_a_stage_boundary(e4e_model, data, tmp_path):
    """Stop after step 2 (stage 0), resume from other weights and RNG states: step 3 starts stage 1, and losses,
    discriminator terms (R1, pools, real-code draws) and weights equal the straight run's."""
    train, val = data
    straight, straight_log = run(e4e_model, 4, train, val)
    run(e4e_model, 2, train, val, checkpoint_dir=tmp_path)
    resumed, resumed_log = run(perturbed(e4e_model), 4, train, val, resume_from=tmp_path / LAST_CHECKPOINT,
                               before_resume=scramble_rngs)
    assert [m["progressive_stage"] for _, m in resumed_log.steps] == [1, 2]
    assert_same_metrics([m for _, m in resumed_log.steps], [m for _, m in straight_log.steps[2:]])
    assert_same_weights(resumed.module.state_dict(), straight.module.state_dict())
    assert_same_weights(resumed.e4e.discriminator.state_dict(), straight.e4e.discriminator.state_dict())


def test_e4e_options_are_refused_for_other_families():
    pSp = noisy_psp(PSPArchitecture(output_size=16, encoder_input_size=32))
    with pytest.raises(InputError, match="trains e4e encoders and W encoders; this is a psp encoder"):
        Trainer(pSp, PSPLoss(LossWeights(lpips_lambda=0.0, w_discriminator_lambda=0.1)), TrainingConfig())
    with pytest.raises(InputError, match="train e4e encoders' per-style deltas"):
        Trainer(pSp, PSPLoss(LossWeights(lpips_lambda=0.0)), TrainingConfig(progressive_start=10))


# ----------------------------------------------------------------------------- a W encoder, the e4e way

TINY_W = PSPArchitecture(encoder_type="WEncoder", family="w_encoder", output_size=16, encoder_input_size=32)


def test_a_w_encoder_trains_against_the_discriminator_alone_into_hyperstyles_w_encoder_file(data, tmp_path):
    """preset w_encode on a WEncoder: every step trains the discriminator and logs the adversarial term, with no
    progressive stage or delta (one code: every style the same); the checkpoint has e4e's entries and is the W
    encoder file HyperStyle reads (its `encoder.*` load strictly into a 256 px HyperStyle's WEncoder)."""
    train, val = data
    preset = get_preset("w_encode")
    config = TrainingConfig(max_steps=3, learning_rate=1e-3, val_interval=3, save_interval=3, image_interval=100,
                            log_interval=1, seed=3, optimizer="adam", d_reg_every=2, w_pool_size=2)
    recorder = Recorder()
    trainer = Trainer(noisy_psp(TINY_W), PSPLoss(preset.with_loss(lpips_lambda=0.0, id_lambda=0.0).loss), config,
                      checkpoint_dir=tmp_path, batch_transform=PresetTransform(preset, encoder_size=32),
                      val_transform=PresetTransform(preset, encoder_size=32, train=False), callback=recorder)
    before = copy.deepcopy(trainer.e4e.discriminator.state_dict())
    trainer.fit(train, val)
    for step, metrics in recorder.steps:
        expected = {"d_real_loss", "d_fake_loss", "discriminator_loss", "encoder_discriminator_loss", "loss_l2", "loss"}
        assert set(metrics) == expected | ({"discriminator_r1_loss"} if (step - 1) % 2 == 0 else set()), step
        assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.e4e.discriminator.state_dict().items())
    codes = trainer.module.encode(smooth_images(2, seed=9) * 2 - 1)
    assert torch.equal(codes, codes[:, :1].expand_as(codes))

    ckpt = read_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert {"discriminator_state_dict", "global_step"} <= set(ckpt) and ckpt["global_step"] == 2
    assert (ckpt["opts"]["encoder_type"], ckpt["opts"]["stylegan_size"]) == ("WEncoder", 16)
    assert ckpt["opts"]["progressive_steps"] is None and ckpt["opts"]["w_discriminator_lambda"] == 0.1
    hyperstyles = WEncoder(n_styles=HyperStyleArchitecture(output_size=256).n_styles)
    load_strict(hyperstyles, read_w_encoder(tmp_path / LAST_CHECKPOINT), "the trained W encoder")
    assert_same_weights(hyperstyles.state_dict(), trainer.module.encoder.state_dict())
    assert load_psp(tmp_path / LAST_CHECKPOINT).arch.family == "w_encoder"


def test_deltas_and_progressive_stages_are_refused_for_a_w_encoder():
    w_encoder = noisy_psp(TINY_W)
    with pytest.raises(InputError, match="per-style deltas; this is a w_encoder encoder"):
        Trainer(w_encoder, PSPLoss(LossWeights(lpips_lambda=0.0, delta_norm_lambda=2e-4)), TrainingConfig())
    with pytest.raises(InputError, match="per-style deltas"):
        Trainer(w_encoder, PSPLoss(LossWeights(lpips_lambda=0.0)), TrainingConfig(progressive_start=10))
