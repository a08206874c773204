"""Task presets (the paper's loss weights) and the batched source/target transforms they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from psp_core.data.presets import PRESETS, PresetTransform, get_preset
from psp_core.data.transforms import (
    degrade_resolution,
    grayscale,
    one_hot_labels,
    random_hflip,
    resize_labels,
    sketch_from_photo,
    to_display,
)
from psp_core.training.losses import LossWeights

PAPER_WEIGHTS = {
    "encode": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=0.1),
    "frontalize": dict(l2_lambda=0.001, lpips_lambda=0.08, id_lambda=1, w_norm_lambda=0.005,
                       l2_lambda_crop=0.01, lpips_lambda_crop=0.8),
    "sketch_to_face": dict(l2_lambda=1, lpips_lambda=0.8, w_norm_lambda=0.005),
    "seg_to_face": dict(l2_lambda=1, lpips_lambda=0.8, w_norm_lambda=0.005),
    "super_resolution": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=0.1, w_norm_lambda=0.005),
    "toonify": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=1, w_norm_lambda=0.025),
    "restyle_encode": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=0.1),   # restyle-encoder's README command
    "e4e_encode": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=0.5, w_discriminator_lambda=0.1,
                       delta_norm_lambda=2e-4),   # encoder4editing's README command and option defaults
    "w_encode": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=0.5, w_discriminator_lambda=0.1),   # e4e's, in W
    "hyperstyle_encode": dict(l2_lambda=1, lpips_lambda=0.8, id_lambda=0.1),   # hyperstyle's README FFHQ command
}


def photos(n: int = 4, size: int = 96, seed: int = 0) -> torch.Tensor:
    """uint8 RGB batch."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(PAPER_WEIGHTS))
def test_preset_loss_weights_are_the_papers(name):
    """Each preset carries the lambdas of the released training command; all others are zero."""
    assert get_preset(name).loss == LossWeights(**{**{f: 0.0 for f in LossWeights.__dataclass_fields__},
                                                  **PAPER_WEIGHTS[name]})


def test_preset_lookup_and_overrides():
    assert set(PRESETS) == set(PAPER_WEIGHTS)
    with pytest.raises(ValueError, match="unknown task preset"):
        get_preset("colorize")
    tuned = get_preset("encode").with_loss(id_lambda=0.0, lpips_lambda=0.5)
    assert (tuned.loss.id_lambda, tuned.loss.lpips_lambda, tuned.loss.l2_lambda) == (0.0, 0.5, 1.0)
    assert get_preset("encode").loss.id_lambda == 0.1
    with pytest.raises(ValueError, match="unknown loss weights"):
        get_preset("encode").with_loss(gan_lambda=1.0)
    assert [get_preset(n).input_nc for n in ("encode", "sketch_to_face", "seg_to_face")] == [3, 1, 19]


def test_encode_transform_ranges_sizes_and_joint_flip():
    """Target 256 in [-1, 1], source at the encoder size; the same images are flipped in both."""
    raw = photos()
    transform = PresetTransform(get_preset("encode"), encoder_size=64)
    source, target = transform(raw, raw, torch.Generator().manual_seed(0))
    assert source.shape == (4, 3, 64, 64) and target.shape == (4, 3, 256, 256)
    assert float(target.min()) >= -1 and float(target.max()) <= 1
    plain_s, plain_t = PresetTransform(get_preset("encode"), 64, train=False)(raw, raw, torch.Generator())
    assert torch.equal(plain_s, F.interpolate(raw.float() / 255, size=64, mode="bilinear", antialias=True) * 2 - 1)
    target_flipped = ~torch.isclose(target, plain_t).flatten(1).all(1)
    source_flipped = ~torch.isclose(source, plain_s).flatten(1).all(1)
    assert 0 < int(target_flipped.sum()) < 4 and torch.equal(source_flipped, target_flipped)
    assert torch.equal(source[source_flipped], plain_s[source_flipped].flip(-1))


def test_frontalize_flips_source_and_target_independently():
    raw = photos(64, size=16)
    source, target = PresetTransform(get_preset("frontalize"), 16)(raw, raw, torch.Generator().manual_seed(1))
    plain_s, plain_t = PresetTransform(get_preset("frontalize"), 16, train=False)(raw, raw, torch.Generator())
    source_flipped = ~torch.isclose(source, plain_s).flatten(1).all(1)
    target_flipped = ~torch.isclose(target, plain_t).flatten(1).all(1)
    assert 0 < int(source_flipped.sum()) < 64 and 0 < int(target_flipped.sum()) < 64
    assert not torch.equal(source_flipped, target_flipped)
    assert torch.equal(source[source_flipped], plain_s[source_flipped].flip(-1))
    assert torch.equal(target[target_flipped], plain_t[target_flipped].flip(-1))


def test_random_hflip_is_deterministic_per_generator():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 3).repeat(8, 1, 1, 1)
    a, mask_a = random_hflip(x, torch.Generator().manual_seed(5))
    b, mask_b = random_hflip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert torch.equal(a[mask_a], x[mask_a].flip(-1)) and torch.equal(a[~mask_a], x[~mask_a])


def test_grayscale_matches_pillow():
    raw = photos(1, size=8)
    pil = np.asarray(Image.fromarray(raw[0].permute(1, 2, 0).numpy()).convert("L"), dtype=np.float32)
    ours = grayscale(raw.float())[0, 0].numpy()
    assert np.abs(ours - pil).max() <= 1.0


def test_sketch_from_photo_draws_dark_edges_on_white():
    """A flat photo gives a blank (white) sheet; a step edge gives dark pixels along it."""
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(sketch_from_photo(flat), torch.ones(1, 1, 32, 32))
    step = flat.clone()
    step[..., 16:] = 1.0
    sketch = sketch_from_photo(step)
    assert sketch.shape == (1, 1, 32, 32)
    assert float(sketch[0, 0, :, 15:17].min()) < 0.2 and float(sketch[0, 0, :, :10].min()) > 0.99
    source, _ = PresetTransform(get_preset("sketch_to_face"), 64)(photos(2), photos(2), torch.Generator())
    assert source.shape == (2, 1, 64, 64) and 0 <= float(source.min()) and float(source.max()) <= 1


def test_segmentation_labels_resize_nearest_and_one_hot():
    """Label ids survive resizing (no blended ids), one-hot has 19 channels summing to 1."""
    labels = torch.randint(0, 19, (2, 1, 50, 50), generator=torch.Generator().manual_seed(2))
    resized = resize_labels(labels, 64)
    assert set(resized.unique().tolist()) <= set(labels.unique().tolist())
    pil = np.asarray(Image.fromarray(labels[0, 0].numpy().astype(np.uint8)).resize((64, 64), Image.NEAREST))
    assert (resized[0, 0].numpy() == pil).mean() > 0.95
    source, target = PresetTransform(get_preset("seg_to_face"), 64)(labels, photos(2), torch.Generator())
    assert source.shape == (2, 19, 64, 64) and target.shape == (2, 3, 256, 256)
    assert torch.equal(source.sum(1), torch.ones(2, 64, 64))
    assert torch.equal(source.argmax(1), resized[:, 0])
    with pytest.raises(ValueError, match="label ids"):
        one_hot_labels(torch.full((1, 1, 2, 2), 19), 19)


def down_up(images: torch.Tensor, factor: int) -> torch.Tensor:
    """What a factor-`factor` degradation of square images is: anti-aliased bicubic down, bicubic back up."""
    size = images.shape[-1]
    if factor == 1:
        return images
    small = F.interpolate(images, size=size // factor, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def drawn_factors(degraded: torch.Tensor, raw: torch.Tensor, factors) -> list[int]:
    """For each image, the one factor whose degradation it is (fails if none or several fit)."""
    found = []
    for i in range(len(raw)):
        fits = [f for f in factors if torch.allclose(degraded[i:i + 1], down_up(raw[i:i + 1], f), atol=1e-5)]
        assert len(fits) == 1, (i, fits)
        found.append(fits[0])
    return found


def test_super_resolution_degrades_by_the_drawn_factor():
    """Each image is exactly its drawn factor's down-and-up copy; several factors are drawn in a batch, the
    draw follows the generator, and the target stays sharp."""
    raw = photos(16, size=256, seed=3).float() / 255
    factors = (1, 2, 8)
    degraded = degrade_resolution(raw, factors, torch.Generator().manual_seed(0))
    drawn = drawn_factors(degraded, raw, factors)
    assert set(drawn) == set(factors), drawn
    again = degrade_resolution(raw, factors, torch.Generator().manual_seed(0))
    assert torch.equal(again, degraded)
    other = drawn_factors(degrade_resolution(raw, factors, torch.Generator().manual_seed(1)), raw, factors)
    assert other != drawn
    blurry = degraded[[f > 1 for f in drawn]]
    assert float((blurry - F.avg_pool2d(blurry, 3, 1, 1)).abs().mean()) < 0.5 * float(
        (raw - F.avg_pool2d(raw, 3, 1, 1)).abs().mean())
    transform = PresetTransform(get_preset("super_resolution"), 64)
    source, target = transform(raw, raw, torch.Generator().manual_seed(0))
    assert source.shape == (16, 3, 64, 64) and torch.equal(target, raw * 2 - 1)
    preset_factors = get_preset("super_resolution").resize_factors
    expected_draw = drawn_factors(degrade_resolution(raw, preset_factors, torch.Generator().manual_seed(0)), raw,
                                  preset_factors)
    assert len(set(expected_draw)) >= 3
    for i, factor in enumerate(expected_draw):
        expected = F.interpolate(down_up(raw[i:i + 1], factor), size=64, mode="bilinear", antialias=True) * 2 - 1
        torch.testing.assert_close(source[i:i + 1], expected, rtol=0, atol=1e-5)


def test_to_display_gives_rgb_in_unit_range():
    for source in (torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8), one_hot_labels(torch.zeros(2, 8, 8), 19)):
        shown = to_display(source)
        assert shown.shape == (2, 3, 8, 8) and 0 <= float(shown.min()) and float(shown.max()) <= 1
