"""ReStyle-pSp training with the engine (64 px encoder input, 16 px generator, CPU): the restyle_encode preset,
the reference coach's per-batch iterations (a backward per iteration, one optimiser step), the loss falling,
exact resume, DDP and the 6-channel IR-SE50 stem (`psp train preset=restyle_encode` on Ray: tests/e2e/test_train_ray.py)."""
from __future__ import annotations

import copy

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
from pipelines.params.loading import ConfigError, load_section
from pipelines.params.schema import TrainConfig
from psp_core import PSPArchitecture, build_psp, load_psp
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.nets.irse import IRSEBackbone
from psp_core.nets.psp import PSP
from psp_core.nets.stylegan2 import use_exact_modulation
from psp_core.training.engine import LAST_CHECKPOINT, Trainer, TrainingConfig, prepare_for_training
from psp_core.training.losses import LossWeights, PSPLoss

TINY_RESTYLE = PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=6, output_size=16,
                               encoder_input_size=64)


@pytest.fixture(scope="module")
def restyle_model() -> PSP:
    return noisy_psp(TINY_RESTYLE)


def batch(seed: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder input [n, 3, 64, 64], target [n, 3, 256, 256]) in [-1, 1]: the same smooth images."""
    images = smooth_images(n, seed)
    return F.interpolate(images, size=64, mode="area") * 2 - 1, images * 2 - 1


L2_WNORM = LossWeights(l2_lambda=1.0, lpips_lambda=0.0, w_norm_lambda=0.005)


def test_restyle_encode_preset_implies_the_family_and_six_channels(tmp_path):
    """restyle_encode: ReStyle's released FFHQ weights, an RGB transform, a restyle_psp encoder seeing 3 + 3
    channels; the params schema builds that architecture and refuses an encoder of another family in one line."""
    preset = get_preset("restyle_encode")
    assert preset.loss == LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.1)
    assert (preset.family, preset.input_nc, preset.encoder_input_nc) == ("restyle_psp", 3, 6)
    assert (get_preset("encode").family, get_preset("encode").encoder_input_nc) == ("psp", 3)
    assert TrainingConfig().n_iters_per_batch == 5

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  preset: restyle_encode\n  encoder_type: BackboneEncoder\n")
    cfg = load_section("train", TrainConfig, [], params)
    arch = cfg.architecture(preset.input_nc)
    assert (arch.family, arch.input_nc, arch.encoder_type) == ("restyle_psp", 6, "BackboneEncoder")
    assert cfg.training().n_iters_per_batch == 5
    assert load_section("train", TrainConfig, ["n_iters_per_batch=3"], params).training().n_iters_per_batch == 3
    with pytest.raises(ConfigError, match=r"^train: encoder_type BackboneEncoder is not a psp encoder") as err:
        load_section("train", TrainConfig, ["preset=encode"], params)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="BackboneEncoderUsingLastLayerIntoW is not a restyle_psp encoder"):
        load_section("train", TrainConfig, ["encoder_type=BackboneEncoderUsingLastLayerIntoW"], params)
    with pytest.raises(ConfigError, match="n_iters_per_batch must be >= 1"):
        load_section("train", TrainConfig, ["n_iters_per_batch=0"], params)


def coach_gradients(model: PSP, source: torch.Tensor, target: torch.Tensor, loss: PSPLoss, n_iters: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """The reference coach's gradients for one batch, written out here on the bare network: iteration 0 encodes
    cat(x, average image) from latent_avg, iteration i cat(x, pooled last output) from the last latent, both
    detached; each iteration's loss back-propagated into the same .grad; no optimiser step. The generator runs the
    trainer's (fused) form of the modulated convolution: the procedure is compared here, not the operation order."""
    model = use_exact_modulation(copy.deepcopy(model), False)
    prepare_for_training(model, train_decoder=False)
    model.train()
    model.decoder.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        average, _ = model.decoder([model.latent_avg[None]], input_is_latent=True, randomize_noise=False)
    last_image = F.adaptive_avg_pool2d(average, (64, 64)).expand(source.shape[0], -1, -1, -1)
    last_latent = model.latent_avg
    for _ in range(n_iters):
        latent = model.encoder(torch.cat([source, last_image], dim=1)) + last_latent
        image, _ = model.decoder([latent], input_is_latent=True, randomize_noise=True)
        total, _ = loss(F.adaptive_avg_pool2d(image, (256, 256)), target, source, latent, model.latent_avg)
        total.backward()
        last_image, last_latent = F.adaptive_avg_pool2d(image, (64, 64)).detach(), latent.detach()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_one_optimiser_step_per_batch_after_a_backward_per_iteration(restyle_model):
    """n_iters_per_batch=3: three backward passes reach the encoder's stem, then one Adam step; the gradients the
    step uses are the coach's (each iteration's loss on detached inputs, summed), not the last iteration's alone."""
    source, target = batch(seed=1)
    loss = PSPLoss(L2_WNORM)
    trainer = Trainer(copy.deepcopy(restyle_model), loss, TrainingConfig(optimizer="adam", n_iters_per_batch=3))
    stem = trainer.module.encoder.input_layer[0].weight
    backward_passes, steps, used = [], [], {}
    stem.register_hook(lambda grad: backward_passes.append(grad.clone()))
    trainer.optimizer.register_step_pre_hook(lambda *_: used.update(
        {name: p.grad.clone() for name, p in trainer.module.named_parameters() if p.grad is not None}))
    trainer.optimizer.register_step_post_hook(lambda *_: steps.append(trainer.step))
    torch.manual_seed(11)
    metrics, output = trainer.train_step(source, target)

    assert len(backward_passes) == 3 and steps == [0] and trainer.step == 1
    assert trainer.optimizer.state[stem]["step"] == 1
    assert set(metrics) >= {"loss", "loss_l2", "loss_w_norm", "loss_iter0", "loss_iter1", "loss_iter2"}
    assert metrics["loss"] == metrics["loss_iter2"] and len({metrics[f"loss_iter{i}"] for i in range(3)}) == 3
    assert output.shape == (2, 3, 256, 256) and not output.requires_grad
    expected = coach_gradients(restyle_model, source, target, loss, n_iters=3, seed=11)
    assert used.keys() == expected.keys() and any(k.startswith("encoder.") for k in used)
    for name in expected:
        torch.testing.assert_close(used[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(used["encoder.input_layer.0.weight"], sum(backward_passes), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(backward_passes[-1], used["encoder.input_layer.0.weight"], rtol=1e-2)


def test_loss_falls_on_a_fixed_batch(restyle_model):
    """10 Ranger steps of 2 iterations on one image (L2 + LPIPS on a random backbone): each iteration's loss and
    the total at least halve; the step metrics (what MLflow logs) carry each iteration's loss."""
    source, target = batch(seed=2, n=1)
    recorder = Recorder()
    loss = PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.8), lpips_backbone="random")
    config = TrainingConfig(max_steps=10, learning_rate=1e-3, log_interval=1, image_interval=100, n_iters_per_batch=2)
    trainer = Trainer(copy.deepcopy(restyle_model), loss, config, callback=recorder)
    trainer.fit(lambda epoch: [(source, target)])
    first, last = recorder.steps[0][1], recorder.steps[-1][1]
    assert len(recorder.steps) == 10
    for key in ("loss", "loss_iter0", "loss_iter1"):
        assert last[key] <= 0.5 * first[key], (key, [m[key] for _, m in recorder.steps])


def run(model: PSP, max_steps: int, data, val, checkpoint_dir=None, resume_from=None,
        before_resume=None) -> tuple[Trainer, Recorder]:
    """A resumable ReStyle run (2 iterations per batch): joint flips from the engine's generator, validation every
    2 steps; `before_resume(trainer)` runs between construction and `resume`."""
    config = TrainingConfig(max_steps=max_steps, learning_rate=1e-3, val_interval=2, save_interval=max_steps,
                            image_interval=100, log_interval=1, seed=3, n_iters_per_batch=2)
    preset = get_preset("restyle_encode")
    recorder = Recorder()
    trainer = Trainer(copy.deepcopy(model), PSPLoss(L2_WNORM), config, checkpoint_dir=checkpoint_dir,
                      batch_transform=PresetTransform(preset, encoder_size=64),
                      val_transform=PresetTransform(preset, encoder_size=64, train=False), callback=recorder)
    if before_resume is not None:
        before_resume(trainer)
    if resume_from is not None:
        trainer.resume(resume_from)
    trainer.fit(data, val)
    return trainer, recorder


def test_resume_equals_uninterrupted_run(restyle_model, tmp_path):
    """2 steps, save, resume (from other weights and RNG states) to 4 == 4 straight steps, bit for bit, per-iteration
    losses included (to float32 rounding, see helpers.training); validation reports every iteration's loss and the last iteration's terms."""
    images = [smooth_images(1, seed=s) for s in range(2)]
    batches = [(image, image) for image in images]
    data, val = shuffled_epochs(batches), [batches[0]]
    straight, straight_log = run(restyle_model, 4, data, val)
    first, _ = run(restyle_model, 2, data, val, checkpoint_dir=tmp_path)
    resumed, resumed_log = run(perturbed(restyle_model), 4, data, val, resume_from=tmp_path / LAST_CHECKPOINT,
                               before_resume=scramble_rngs)
    assert [s for s, _ in resumed_log.steps] == [3, 4]
    assert_same_metrics([m for _, m in resumed_log.steps], [m for _, m in straight_log.steps[2:]])
    assert_same_metrics([m for _, m in resumed_log.validations], [m for _, m in straight_log.validations[1:]])
    a = straight.module.state_dict()
    assert_same_weights(resumed.module.state_dict(), a)
    assert not all(torch.equal(a[k], first.module.state_dict()[k]) for k in a)
    validation = straight_log.validations[-1][1]
    assert {"loss_iter0", "loss_iter1", "loss_l2", "loss_w_norm"} <= set(validation)
    assert validation["loss"] == validation["loss_iter1"]
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, rel=RESUME_RTOL)
    reloaded = load_psp(tmp_path / LAST_CHECKPOINT)
    assert (reloaded.arch.family, reloaded.arch.input_nc) == ("restyle_psp", 6)


def test_ddp_all_reduces_at_the_last_iteration_only_and_trains_as_without_it(restyle_model, tmp_path):
    """Under DDP (one gloo process) a batch of 3 iterations accumulates gradients locally over the first two
    backward passes and all-reduces in the third's only; the step equals the unwrapped engine's."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    source, target = batch(seed=3)
    config = TrainingConfig(optimizer="adam", n_iters_per_batch=3)
    bare = Trainer(copy.deepcopy(restyle_model), PSPLoss(L2_WNORM), config)
    torch.manual_seed(5)
    bare.train_step(source, target)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = copy.deepcopy(restyle_model)
        prepare_for_training(model, train_decoder=False)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        forward_passes: list[int] = []
        model.encoder.register_forward_hook(lambda *_: forward_passes.append(1))
        reductions: list[int] = []   # the iteration (encoder forwards so far) whose backward all-reduced each bucket

        def counting_allreduce(state, bucket):
            reductions.append(len(forward_passes))
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_allreduce)
        trainer = Trainer(wrapped, PSPLoss(L2_WNORM), config)
        torch.manual_seed(5)
        trainer.train_step(source, target)
    finally:
        dist.destroy_process_group()
    assert len(forward_passes) == 3
    assert reductions and set(reductions) == {3}, reductions
    expected = bare.module.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(model.encoder.input_layer[0].weight, restyle_model.encoder.input_layer[0].weight)


def test_irse50_stem_widened_to_six_channels(tmp_path):
    """From an IR-SE50 file, a ReStyle encoder's stem convolution [64, 6, 3, 3] holds the released RGB filters
    on channels 0-2 exactly and N(0, 1) draws on 3-5 (the reference's torch.randn, seeded by the global RNG);
    the stem's batch norm and PReLU and the body are the file's; a pSp's 3-channel stem is the file's as is."""
    torch.manual_seed(21)
    irse = IRSEBackbone(112, 50, "ir_se")
    with torch.no_grad():
        for name, tensor in irse.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.uniform_(0.5, 1.5)
    released = irse.state_dict()
    torch.save(released, tmp_path / "model_ir_se50.pth")
    built = []
    for _ in range(2):
        torch.manual_seed(4)
        built.append(build_psp(TINY_RESTYLE, irse50_path=tmp_path / "model_ir_se50.pth", mean_latent_samples=64))
    stem = built[0].encoder.input_layer[0].weight.detach()
    assert stem.shape == (64, 6, 3, 3)
    assert torch.equal(stem[:, :3], released["input_layer.0.weight"])
    added = stem[:, 3:]
    assert 0.9 < float(added.std()) < 1.1 and abs(float(added.mean())) < 0.1, "N(0, 1), not the layer's own init"
    assert torch.equal(built[1].encoder.input_layer[0].weight, stem), "the draws come from the seeded global RNG"
    encoder = built[0].encoder.state_dict()
    for key in ("input_layer.1.weight", "input_layer.1.running_var", "input_layer.2.weight",
                "body.0.res_layer.1.weight", "body.20.res_layer.3.weight"):
        assert torch.equal(encoder[key], released[key]), key
    psp = build_psp(PSPArchitecture(output_size=16, encoder_input_size=64), irse50_path=tmp_path / "model_ir_se50.pth",
                    mean_latent_samples=64)
    assert torch.equal(psp.encoder.input_layer[0].weight, released["input_layer.0.weight"])
