"""Evaluation metrics against independent computations: L2, MS-SSIM, LPIPS, ArcFace and dlib identity, grid."""
import logging
import math
import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ms_ssim
from skimage import data

from helpers.parity import rule_state_dict
from psp_core import load_irse50
from psp_core.data.align import FaceFinder, align_face
from psp_core.evaluation.metrics import (
    ArcFaceIdentity,
    DlibIdentity,
    MetricSuite,
    MetricTable,
    identity_backend,
    l2_per_image,
    lpips_network,
    ms_ssim_per_image,
)
from psp_core.viz import reconstruction_grid


def signed(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def lpips_net() -> lpips.LPIPS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def aligned_astronaut() -> torch.Tensor:
    photo = data.astronaut()
    face = FaceFinder(upsample=1, threshold=0.3).find(photo)[0]
    aligned, _ = align_face(Image.fromarray(photo), face.landmarks, output_size=256)
    return signed(np.asarray(aligned))


@pytest.fixture(scope="module")
def dlib_identity() -> DlibIdentity:
    return DlibIdentity()


def test_l2_is_zero_for_identical_images_and_the_hand_computed_mse_for_a_known_change():
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(l2_per_image(target, target), torch.zeros(2))
    output = target.clone()
    output[1, 0, :16] += 0.5  # a quarter-square error on 1 of 3 channels, half of the rows
    assert torch.allclose(l2_per_image(output, target), torch.tensor([0.0, 0.25 / 6]), atol=1e-7)


def test_ms_ssim_matches_pytorch_msssim_on_the_mapped_images():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 176, 176, generator=g) * 2 - 1
    output = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    expected = ms_ssim((output + 1) / 2, (target + 1) / 2, data_range=1.0, size_average=False)
    assert torch.allclose(ms_ssim_per_image(output, target), expected, atol=1e-6)
    assert torch.allclose(ms_ssim_per_image(target, target), torch.ones(2), atol=1e-5)


def test_ms_ssim_upsamples_small_images_to_256_bilinear():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    output = (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(-1, 1)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate((x + 1) / 2, size=(256, 256), mode="bilinear", align_corners=False)

    expected = ms_ssim(up(output), up(target), data_range=1.0, size_average=False)
    assert torch.allclose(ms_ssim_per_image(output, target), expected, atol=1e-6)
    assert torch.allclose(ms_ssim_per_image(target, target), torch.ones(2), atol=1e-5)


def test_lpips_v01_heads_come_from_the_wheel_and_the_suite_matches_the_package(lpips_net):
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(lpips_net.state_dict()[k], v) for k, v in heads.items())
    assert all(torch.equal(lpips_network("random").state_dict()[k], v) for k, v in heads.items())

    g = torch.Generator().manual_seed(2)
    target = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    output = (target + 0.3 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    suite = MetricSuite(lpips_net, identity=lambda o, t: torch.full((len(o),), math.nan))
    values = suite(output, target)
    assert set(values) == {"l2", "lpips", "ms_ssim", "id_similarity"}
    assert all(v.shape == (3,) for v in values.values())
    with torch.no_grad():
        expected = lpips_net(output, target).flatten()
    assert torch.allclose(values["lpips"], expected, atol=1e-6)
    assert torch.allclose(suite(target, target)["lpips"], torch.zeros(3), atol=1e-6)


def test_arcface_identity_from_the_parity_rule_weights_matches_a_direct_computation(tmp_path):
    path = tmp_path / "model_ir_se50.pth"
    torch.save(rule_state_dict("ref_id_irse50"), path)
    identity = identity_backend(path)
    assert isinstance(identity, ArcFaceIdentity) and identity.name == "arcface_ir_se50"

    g = torch.Generator().manual_seed(3)
    target = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    output = torch.cat([(target[:1] + 0.5 * torch.randn(target[:1].shape, generator=g)).clamp(-1, 1), target[1:]])
    net = load_irse50(path)

    def features(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(net(F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112)), dim=1)

    with torch.no_grad():
        out_features, target_features = features(torch.cat([output[:1], target[:1]]))
        expected = (out_features * target_features).sum().reshape(1)
    similarity = identity(output, target)
    assert torch.allclose(similarity[:1], expected, atol=1e-5)
    assert similarity[1] == pytest.approx(1.0, abs=1e-5)
    assert expected[0] < 0.999  # the perturbation is visible to the network


def test_identity_falls_back_to_dlib_loudly_without_the_irse50_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="psp_core.evaluation.metrics"):
        identity = identity_backend(tmp_path / "model_ir_se50.pth")
    assert isinstance(identity, DlibIdentity) and identity.name == "dlib_resnet_v1"
    assert "dlib_resnet_v1" in caplog.text


def test_dlib_identity_on_a_real_face(aligned_astronaut, dlib_identity):
    face = aligned_astronaut
    mirrored = face.flip(-1)
    shifted = torch.roll(face, shifts=(8, -6), dims=(2, 3))
    noise = torch.rand(face.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    small = F.interpolate(face, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    outputs = torch.cat([face, mirrored, shifted, noise])
    similarity = dlib_identity(outputs, face.expand(4, -1, -1, -1))
    # Measured: self 1.0, mirrored 0.990, shifted (8, -6) px 0.9995; noise has no face.
    assert similarity[0] > 0.99
    assert similarity[1] > 0.8 and similarity[2] > 0.8
    assert math.isnan(similarity[3])
    # A 64x64 reconstruction is upsampled to 256 and still found (measured 0.98).
    assert dlib_identity(F.interpolate(small, size=(256, 256), mode="bilinear"), face)[0] > 0.8
    assert dlib_identity(small, small)[0] > 0.99

    table = MetricTable()
    table.add({"id_similarity": similarity}, ids=["self", "mirror", "shift", "noise"])
    summary = table.summary()
    assert summary["n_images"] == 4 and summary["id_similarity_missing"] == 1
    assert summary["id_similarity"] == pytest.approx(float(similarity[:3].mean()), abs=1e-6)


def test_metric_table_accumulates_batches_with_ids_and_nan_aware_means():
    table = MetricTable()
    table.add({"l2": torch.tensor([1.0, 3.0]), "id_similarity": torch.tensor([math.nan, 0.5])}, ids=["a", "b"])
    table.add({"l2": torch.tensor([5.0]), "id_similarity": torch.tensor([0.7])})
    assert [row["id"] for row in table.rows()] == ["a", "b", None]
    assert table.summary() == pytest.approx(
        {"n_images": 3, "l2": 3.0, "l2_missing": 0, "id_similarity": 0.6, "id_similarity_missing": 1}
    )
    with pytest.raises(ValueError):
        table.add({"l2": torch.tensor([1.0, 2.0]), "id_similarity": torch.tensor([1.0])})
    with pytest.raises(ValueError):
        table.add({"l2": torch.tensor([1.0])})


def test_reconstruction_grid_puts_inputs_over_outputs():
    inputs = torch.rand(3, 1, 32, 32)  # sketches in [0, 1], smaller than the outputs
    outputs = torch.full((3, 3, 64, 64), -1.0)
    grid = reconstruction_grid(inputs, outputs, max_images=8, padding=2)
    assert grid.mode == "RGB" and grid.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    pixels = np.asarray(grid)
    assert (pixels[2 + 64 + 2:2 + 64 + 2 + 64, 2:2 + 64] == 0).all()  # an output tile: black
    assert reconstruction_grid(inputs, outputs, max_images=2).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
