"""Each pSp loss term against an independent computation: L2, LPIPS (the lpips package), W-norm, identity, MoCo."""

from __future__ import annotations

import logging
import socket

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from helpers.parity import FIXTURES, rule_state_dict
from psp_core.nets.checkpoints import CheckpointError
from psp_core.training.losses import (
    ALEXNET_CACHE_FILE,
    IdentityLoss,
    LossWeights,
    LPIPSLoss,
    MocoLoss,
    PSPLoss,
    w_norm_loss,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def alexnet_cache(tmp_path, monkeypatch):
    """A torch hub cache (TORCH_HOME) holding AlexNet weights (random, seeded) under torchvision's file name."""
    torch.manual_seed(3)
    path = tmp_path / "hub" / "checkpoints" / ALEXNET_CACHE_FILE
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return path


@pytest.fixture(scope="module")
def irse50_file(tmp_path_factory):
    """`model_ir_se50.pth` with the parity-rule weights."""
    path = tmp_path_factory.mktemp("irse") / "model_ir_se50.pth"
    torch.save(rule_state_dict("ref_id_irse50"), path)
    return path


def images(n: int = 2, size: int = 256, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_l2_is_mean_squared_error():
    """loss_l2 is the mean of squared pixel differences, and the total is l2_lambda times it."""
    out, target = images(seed=1), images(seed=2)
    loss = PSPLoss(LossWeights(l2_lambda=2.0, lpips_lambda=0.0))
    total, logs = loss(out, target, out, torch.zeros(2, 4, 512), None)
    expected = float(((out.double() - target.double()) ** 2).sum() / out.numel())
    assert logs["loss_l2"] == pytest.approx(expected, rel=1e-6)
    assert float(total) == pytest.approx(2.0 * expected, rel=1e-6)
    assert set(logs) == {"loss_l2", "loss"}


def test_l2_crop_uses_reference_face_crop():
    """loss_l2_crop only sees rows 35:223 and columns 32:220; differences outside it do not count."""
    out, target = images(seed=1), images(seed=1).clone()
    target[:, :, :35] += 1.0
    target[:, :, :, 220:] -= 1.0
    target[:, :, 100, 100] += 0.5
    loss = PSPLoss(LossWeights(l2_lambda=0.0, lpips_lambda=0.0, l2_lambda_crop=1.0))
    _, logs = loss(out, target, out, torch.zeros(2, 4, 512), None)
    assert logs["loss_l2_crop"] == pytest.approx(2 * 3 * 0.25 / (2 * 3 * 188 * 188), rel=1e-4)


def test_lpips_equals_lpips_package_and_never_downloads(alexnet_cache, no_network):
    """Our LPIPS (AlexNet from the torch hub cache) equals `lpips.LPIPS(net='alex')` reading the same cache."""
    ours = LPIPSLoss("pretrained")
    reference = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
    out, target = images(seed=4), images(seed=5)
    with torch.no_grad():
        expected = reference(out, target).mean()
        crop_expected = reference(out[:, :, 35:223, 32:220], target[:, :, 35:223, 32:220]).mean()
        assert torch.allclose(ours(out, target), expected, rtol=1e-6, atol=1e-7)
        weights = LossWeights(l2_lambda=0.0, lpips_lambda=0.8, lpips_lambda_crop=0.5)
        total, logs = PSPLoss(weights)(out, target, out, torch.zeros(2, 4, 512), None)
    assert logs["loss_lpips"] == pytest.approx(float(expected), rel=1e-6)
    assert logs["loss_lpips_crop"] == pytest.approx(float(crop_expected), rel=1e-6)
    assert float(total) == pytest.approx(0.8 * float(expected) + 0.5 * float(crop_expected), rel=1e-6)


def test_lpips_stays_frozen_in_eval_mode(alexnet_cache):
    """.train() on the loss keeps LPIPS (dropout heads) in eval mode, with no trainable parameters."""
    loss = PSPLoss(LossWeights())
    loss.train()
    assert not any(m.training for m in loss.lpips.modules())
    assert not any(p.requires_grad for p in loss.parameters())


def test_lpips_missing_backbone_says_where(tmp_path, monkeypatch, no_network):
    """Without the AlexNet file the error names the path it expects; `random` works and warns."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints/alexnet-owt-7be5be79\.pth"):
        LPIPSLoss("pretrained")


def test_lpips_random_backbone_warns(caplog, no_network):
    """`backbone: random` is allowed only loudly."""
    with caplog.at_level(logging.WARNING, logger="psp_core.training.losses"):
        LPIPSLoss("random")
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in caplog.records)


def test_w_norm_is_frobenius_norm_of_offset_not_squared():
    """Batch mean of sqrt(sum over styles and channels of (w - w_avg)^2); against zero without an average."""
    g = torch.Generator().manual_seed(6)
    latent, latent_avg = torch.randn(3, 6, 512, generator=g), torch.randn(6, 512, generator=g)
    per_sample = [float(np.sqrt(((latent[i] - latent_avg).double().numpy() ** 2).sum())) for i in range(3)]
    assert float(w_norm_loss(latent, latent_avg)) == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert float(w_norm_loss(latent, None)) == pytest.approx(
        np.mean([float(np.sqrt((latent[i].double().numpy() ** 2).sum())) for i in range(3)]), rel=1e-6)
    loss = PSPLoss(LossWeights(l2_lambda=0.0, lpips_lambda=0.0, w_norm_lambda=0.005))
    total, logs = loss(images(3, 8), images(3, 8), images(3, 8), latent, latent_avg)
    assert logs["loss_w_norm"] == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert float(total) == pytest.approx(0.005 * np.mean(per_sample), rel=1e-6)


def test_identity_features_match_reference_crop(irse50_file):
    """IR-SE50 on the reference 112x112 face crop reproduces the parity fixture's features."""
    ref = dict(np.load(FIXTURES / "ref_id_irse50.npz"))
    identity = IdentityLoss.from_file(irse50_file)
    with torch.no_grad():
        feats = identity.embed(torch.from_numpy(ref["input"]))
    assert float((feats - torch.from_numpy(ref["features"])).abs().max()) <= 1e-4


def test_identity_loss_and_improvement(irse50_file):
    """loss = mean(1 - <f(out), f(target)>); id_improve = mean(<f(out), f(target)> - <f(target), f(source)>)."""
    ref = dict(np.load(FIXTURES / "ref_id_irse50.npz"))
    x, f = torch.from_numpy(ref["input"]), torch.from_numpy(ref["features"]).double()
    out, target, source = x.clone().requires_grad_(True), x.flip(0), x.flip(0)
    cross = float(f[0] @ f[1])
    loss = PSPLoss(LossWeights(l2_lambda=0.0, lpips_lambda=0.0, id_lambda=0.1), irse50_path=irse50_file)
    total, logs = loss(out, target, source, torch.zeros(2, 10, 512), None)
    assert logs["loss_id"] == pytest.approx(1 - cross, abs=1e-4)
    assert logs["id_improve"] == pytest.approx(cross - 1.0, abs=1e-4)
    assert float(total.detach()) == pytest.approx(0.1 * (1 - cross), abs=1e-5)
    total.backward()
    assert out.grad is not None and float(out.grad.abs().sum()) > 0
    sims = loss.identity.similarities(x, x.flip(0))
    assert sims.shape == (2,) and float(sims[0]) == pytest.approx(cross, abs=1e-4)


def test_identity_missing_weights(tmp_path):
    """id_lambda > 0 without the file names the file; id_lambda = 0 needs no file."""
    with pytest.raises(FileNotFoundError, match="model_ir_se50.pth"):
        PSPLoss(LossWeights(id_lambda=0.1), lpips_backbone="random", irse50_path=tmp_path / "model_ir_se50.pth")
    with pytest.raises(FileNotFoundError, match="IR-SE50"):
        PSPLoss(LossWeights(id_lambda=0.1), lpips_backbone="random")
    assert PSPLoss(LossWeights(id_lambda=0.0), lpips_backbone="random").identity is None


def test_id_and_moco_are_mutually_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        LossWeights(id_lambda=0.1, moco_lambda=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(l2_lambda=-1.0)


def test_moco_loads_public_layout_and_matches_resnet50(tmp_path):
    """A `{'state_dict': {'module.encoder_q.*'}}` file (with its MLP head) loads into a resnet50 trunk;
    the loss equals 1 - cosine of torchvision resnet50 features of the 224-resized images."""
    torch.manual_seed(7)
    resnet = torchvision.models.resnet50(weights=None).eval()
    state = {f"module.encoder_q.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(2048, 2048), "module.encoder_q.fc.0.bias": torch.zeros(2048),
                  "module.encoder_q.fc.2.weight": torch.randn(128, 2048), "module.encoder_q.fc.2.bias": torch.zeros(128),
                  "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7)})
    path = tmp_path / "moco_v2_800ep_pretrain.pt"
    torch.save({"state_dict": state, "epoch": 800, "arch": "resnet50"}, path)
    resnet.fc = torch.nn.Identity()
    out, target = images(seed=8), images(seed=9)
    with torch.no_grad():
        fo = F.normalize(resnet(F.interpolate(out, size=224)), dim=1)
        ft = F.normalize(resnet(F.interpolate(target, size=224)), dim=1)
        loss = PSPLoss(LossWeights(l2_lambda=0.0, lpips_lambda=0.0, moco_lambda=0.5), moco_path=path)
        total, logs = loss(out, target, target, torch.zeros(2, 4, 512), None)
    expected = float((1 - (fo * ft).sum(1)).mean())
    assert isinstance(loss.identity, MocoLoss)
    assert logs["loss_moco"] == pytest.approx(expected, abs=1e-5)
    assert logs["id_improve"] == pytest.approx(float((fo * ft).sum(1).mean()) - 1.0, abs=1e-5)
    assert float(total) == pytest.approx(0.5 * expected, abs=1e-5)


def test_moco_wrong_file_is_a_clear_error(tmp_path):
    """A file without the MoCo layout fails with CheckpointError naming the problem, not a KeyError."""
    path = tmp_path / "not_moco.pt"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="missing"):
        MocoLoss.from_file(path)
    torch.save({"g_ema": {}}, path)
    with pytest.raises(CheckpointError, match="state_dict"):
        MocoLoss.from_file(path)
