"""The training engine on a tiny pSp (16 px generator, 32 px encoder input) on CPU: overfit, resume, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers.pipelines import noisy_psp, smooth_images
from helpers.training import (
    RESUME_RTOL,
    Recorder,
    assert_same_metrics,
    assert_same_weights,
    perturbed,
    scramble_rngs,
    shuffled_epochs,
)
from psp_core import PSPArchitecture, load_psp
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.nets.stylegan2 import ModulatedConv2d
from psp_core.training.engine import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    Trainer,
    TrainingConfig,
    prepare_for_training,
)
from psp_core.training.losses import LossWeights, PSPLoss
from psp_core.viz import comparison_grid

TINY = PSPArchitecture(output_size=16, encoder_input_size=32)


@pytest.fixture(scope="module")
def tiny_model():
    return noisy_psp(TINY)


def test_overfits_a_fixed_batch(tiny_model):
    """20 Ranger steps on one batch (L2 + LPIPS on a random backbone + W-norm) halve the total loss."""
    images = smooth_images(2, seed=1)
    transform = PresetTransform(get_preset("encode"), encoder_size=32, train=False)
    recorder = Recorder()
    loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.8, w_norm_lambda=0.005), lpips_backbone="random")
    config = TrainingConfig(max_steps=20, learning_rate=1e-3, log_interval=1, image_interval=100)
    trainer = Trainer(copy.deepcopy(tiny_model), loss, config, batch_transform=transform, callback=recorder)
    trainer.fit(lambda epoch: [(images, images)])
    losses = [metrics["loss"] for _, metrics in recorder.steps]
    assert len(losses) == 20
    assert losses[-1] <= 0.5 * losses[0], losses


def run(model, max_steps: int, data, val, checkpoint_dir: Path | None = None, resume_from: Path | None = None,
        before_resume=None) -> tuple[Trainer, Recorder]:
    """A small resumable run: joint flips from the engine's generator, validation every 3 steps.
    `before_resume(trainer)` runs between construction and `resume` (to disturb what resume must restore)."""
    config = TrainingConfig(max_steps=max_steps, learning_rate=1e-3, val_interval=3, save_interval=max_steps,
                            image_interval=100, log_interval=1, seed=3)
    loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0, w_norm_lambda=0.005))
    transform = PresetTransform(get_preset("encode"), encoder_size=32)
    recorder = Recorder()
    trainer = Trainer(copy.deepcopy(model), loss, config, checkpoint_dir=checkpoint_dir, batch_transform=transform,
                      val_transform=PresetTransform(get_preset("encode"), encoder_size=32, train=False),
                      callback=recorder)
    if before_resume is not None:
        before_resume(trainer)
    if resume_from is not None:
        trainer.resume(resume_from)
    trainer.fit(data, val)
    return trainer, recorder


def test_resume_equals_uninterrupted_run(tiny_model, tmp_path):
    """3 steps, stop mid-epoch, resume to 6 (an epoch end, a Lookahead sync at 6) == 6 straight steps
    (to float32 rounding: see helpers.training).

    The resumed trainer starts from other weights and other RNG states, so only what `resume` restores
    (weights, optimizer, step/epoch/batch position, global and augmentation RNGs) can make it match."""
    batches = [(smooth_images(2, seed=s), smooth_images(2, seed=s)) for s in range(2)]
    data, val = shuffled_epochs(batches), [batches[0]]
    straight, straight_log = run(tiny_model, 6, data, val)
    straight_rng = torch.get_rng_state()
    first, first_log = run(tiny_model, 3, data, val, checkpoint_dir=tmp_path)
    resumed, resumed_log = run(perturbed(tiny_model), 6, data, val, resume_from=tmp_path / LAST_CHECKPOINT,
                               before_resume=scramble_rngs)
    resumed_rng = torch.get_rng_state()
    assert [s for s, _ in first_log.steps] == [1, 2, 3]
    assert [s for s, _ in resumed_log.steps] == [4, 5, 6], "the resumed run must run steps 4..6 only"
    assert_same_metrics([m for _, m in resumed_log.steps], [m for _, m in straight_log.steps[3:]])
    assert first.step == 3 and resumed.step == straight.step == 6
    assert (resumed.epoch, resumed.batches_done) == (straight.epoch, straight.batches_done)
    a = straight.module.state_dict()
    assert_same_weights(resumed.module.state_dict(), a)
    assert not all(torch.equal(a[k], first.module.state_dict()[k]) for k in a)
    assert torch.equal(resumed.module.latent_avg, straight.module.latent_avg)
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, rel=RESUME_RTOL)
    assert torch.equal(resumed.augment_rng.get_state(), straight.augment_rng.get_state())
    assert torch.equal(resumed_rng, straight_rng)


def test_checkpoints_and_reports(tiny_model, tmp_path):
    """last.pt / best_model.pt load with load_psp; the decoder stays frozen; reports arrive on their intervals."""
    images = smooth_images(2, seed=4)
    recorder = Recorder()
    loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0))
    config = TrainingConfig(max_steps=3, val_interval=3, save_interval=3, image_interval=2, log_interval=2)
    model = copy.deepcopy(tiny_model)
    decoder_before = copy.deepcopy(model.decoder.state_dict())
    trainer = Trainer(model, loss, config, checkpoint_dir=tmp_path, callback=recorder,
                      batch_transform=PresetTransform(get_preset("encode"), encoder_size=32))
    trainer.fit([(images, images)], [(F.interpolate(images, size=32) * 2 - 1, images * 2 - 1)])
    assert [s for s, _ in recorder.steps] == [2, 3]
    assert [s for s, _ in recorder.validations] == [3]
    assert [(s, name) for s, name, _ in recorder.images] == [(2, "train"), (3, "train"), (3, "test")]
    assert sorted((s, p.name, best) for s, p, best in recorder.checkpoints) == [
        (3, BEST_CHECKPOINT, True), (3, LAST_CHECKPOINT, False)]
    assert all(not p.requires_grad for p in model.decoder.parameters())
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder_before.items())
    trainer.set_train_mode()
    assert not model.decoder.training and model.encoder.training and not trainer.loss.training
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        reloaded = load_psp(tmp_path / name)
        assert reloaded.n_styles == model.n_styles
    last = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert last["training_state"]["step"] == 3 and "training_state" not in torch.load(
        tmp_path / BEST_CHECKPOINT, weights_only=True)
    grid = recorder.images[0][2]
    assert grid.shape == (3, 2 + 2 * 258, 2 + 3 * 258) and 0 <= float(grid.min()) and float(grid.max()) <= 1


def test_bf16_step_and_fp16_refused_on_cpu(tiny_model):
    """bf16 autocast trains on CPU: the convolutions really compute in bf16 and the loss lands near, not on,
    the fp32 loss of the same step (same weights, same noise draws); fp16 (GradScaler) is CUDA-only."""
    images = smooth_images(2, seed=5)
    source, target = F.interpolate(images, size=32) * 2 - 1, images * 2 - 1
    loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0))
    results = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(copy.deepcopy(tiny_model), loss, TrainingConfig(max_steps=1, precision=precision))
        seen: list[torch.dtype] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
                 for m in (trainer.module.encoder.input_layer[0], trainer.module.decoder.conv1.conv)]
        metrics, output = trainer.train_step(source, target)
        for hook in hooks:
            hook.remove()
        results[precision] = (metrics["loss"], seen)
        assert torch.isfinite(torch.tensor(metrics["loss"])) and output.shape == (2, 3, 256, 256)
    (fp32_loss, fp32_dtypes), (bf16_loss, bf16_dtypes) = results["fp32"], results["bf16"]
    assert fp32_dtypes == [torch.float32, torch.float32]
    assert bf16_dtypes == [torch.bfloat16, torch.bfloat16], "the bf16 step must compute in bf16"
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=0.02)
    with pytest.raises(ValueError, match="fp16"):
        Trainer(copy.deepcopy(tiny_model), loss, TrainingConfig(precision="fp16"))


def test_float32_training_runs_the_fused_modulated_convolution(tiny_model, monkeypatch):
    """The trainer switches the generator to the fused form: a float32 step that reached the reference's grouped
    form fails here; the same network out of the trainer (a copy) still runs the reference's form."""
    def refuse(self, x, style):
        raise AssertionError("this form of the modulated convolution must not run here")

    images = smooth_images(2, seed=5)
    untouched = copy.deepcopy(tiny_model)
    trainer = Trainer(copy.deepcopy(tiny_model), PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0)),
                      TrainingConfig(max_steps=1, precision="fp32"))
    convs = [m for m in trainer.module.modules() if isinstance(m, ModulatedConv2d)]
    assert convs and not any(conv.exact for conv in convs)
    with monkeypatch.context() as patch:
        patch.setattr(ModulatedConv2d, "grouped", refuse)
        metrics, _ = trainer.train_step(F.interpolate(images, size=32) * 2 - 1, images * 2 - 1)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(ModulatedConv2d, "fused", refuse)
        untouched.decoder([torch.randn(1, untouched.n_styles, 512)], input_is_latent=True, randomize_noise=False)


def test_comparison_grid_shows_any_input_kind():
    """Sketch (1 channel) and one-hot (19 channel) inputs are drawn as RGB tiles beside target and output:
    each input tile is the input (grey levels, or each class's palette colour) blown up 2x by pixel repetition."""
    from psp_core.data.transforms import SEGMENTATION_PALETTE

    target = output = torch.zeros(2, 3, 32, 32)
    sketch = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(19, (2, 16, 16), generator=torch.Generator().manual_seed(8))
    one_hot = F.one_hot(labels, 19).permute(0, 3, 1, 2).float()
    expected_tiles = (sketch.expand(2, 3, 16, 16), SEGMENTATION_PALETTE[labels].permute(0, 3, 1, 2))
    for source, expected in zip((sketch, one_hot), expected_tiles):
        grid = comparison_grid(source, target, output, torch.tensor([0.5, 0.9]))
        assert grid.shape == (3, 2 + 2 * 34, 2 + 3 * 34)
        for row in range(2):
            top = 2 + row * 34
            tile = grid[:, top:top + 32, 2:34]
            blown_up = expected[row].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
            torch.testing.assert_close(tile, blown_up, rtol=0, atol=1e-6)
            torch.testing.assert_close(grid[:, top:top + 32, 36:68], torch.full((3, 32, 32), 0.5))  # target 0 -> grey


def test_accepts_a_ddp_wrapped_model(tiny_model, tmp_path):
    """Under DistributedDataParallel (one gloo process) the engine steps through the wrapper and saves the bare PSP."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = copy.deepcopy(tiny_model)
        prepare_for_training(model, train_decoder=False)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0))
        trainer = Trainer(wrapped, loss, TrainingConfig(max_steps=1), checkpoint_dir=tmp_path)
        assert trainer.module is model
        images = smooth_images(2, seed=6)
        trainer.fit([(F.interpolate(images, size=32) * 2 - 1, images * 2 - 1)])
    finally:
        dist.destroy_process_group()
    assert load_psp(tmp_path / LAST_CHECKPOINT).n_styles == model.n_styles
