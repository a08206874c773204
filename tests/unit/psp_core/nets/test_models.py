"""The networks' structure and behaviour beyond the parity fixtures."""
from __future__ import annotations

import pytest
import torch

from psp_core import Generator, IRSEBackbone, PSPArchitecture
from psp_core.nets.encoders import (
    BackboneEncoderUsingLastLayerIntoW,
    BackboneEncoderUsingLastLayerIntoWPlus,
    GradualStyleEncoder,
)
from psp_core.nets.ops import upfirdn2d
from psp_core.nets.psp import PSP, mix_styles
from psp_core.options import n_styles_for


@pytest.mark.parametrize("size", [16, 32, 128, 1024])
def test_generator_layout_for_every_size(size):
    g = Generator(size, channel_multiplier=2)
    n_latent = 2 * (size.bit_length() - 1) - 2
    assert g.n_latent == n_latent == n_styles_for(size)
    assert len(g.to_rgbs) == size.bit_length() - 3
    if size == 1024:
        # config-f at 1024: the public checkpoint's parameter count
        assert sum(p.numel() for p in g.parameters()) == 30_370_060


def test_generator_output_and_noise_modes():
    torch.manual_seed(0)
    g = Generator(32).eval()
    for conv in g.convs:
        torch.nn.init.ones_(conv.noise.weight)
    z = torch.randn(2, 512)
    with torch.no_grad():
        fixed_a, _ = g([z], randomize_noise=False)
        fixed_b, _ = g([z], randomize_noise=False)
        random_a, _ = g([z])
    assert fixed_a.shape == (2, 3, 32, 32)
    assert torch.equal(fixed_a, fixed_b)
    assert not torch.allclose(fixed_a, random_a)


def test_truncation_one_is_identity_and_zero_gives_the_truncation_latent():
    torch.manual_seed(0)
    g = Generator(16).eval()
    z = torch.randn(3, 512)
    mean = g.mean_latent(64)
    with torch.no_grad():
        plain, _ = g([z], randomize_noise=False)
        same, _ = g([z], truncation=1.0, truncation_latent=mean, randomize_noise=False)
        collapsed, latent = g([z], truncation=0.0, truncation_latent=mean, randomize_noise=False, return_latents=True)
    assert torch.equal(plain, same)
    assert torch.allclose(latent, mean.expand(3, g.n_latent, 512))
    assert torch.allclose(collapsed[0], collapsed[1], atol=1e-5)


def test_style_mixing_splits_layers_at_inject_index():
    torch.manual_seed(0)
    g = Generator(16).eval()
    z1, z2 = torch.randn(1, 512), torch.randn(1, 512)
    with torch.no_grad():
        _, latent = g([z1, z2], inject_index=2, return_latents=True)
        w1, w2 = g.get_latent(z1), g.get_latent(z2)
    assert torch.allclose(latent[0, :2], w1.expand(2, 512))
    assert torch.allclose(latent[0, 2:], w2.expand(g.n_latent - 2, 512))


def test_mean_latent_is_the_average_w_of_seeded_z():
    """mean_latent == the mapping network applied to the seeded z, averaged (computed here directly)."""
    torch.manual_seed(0)
    g = Generator(16)
    a = g.mean_latent(128, generator=torch.Generator().manual_seed(3))
    b = g.mean_latent(128, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 512) and torch.equal(a, b)
    z = torch.randn(128, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w = g.style(z)
    torch.testing.assert_close(a, w.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    other_seed = g.mean_latent(128, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(a, other_seed)
    assert float((a - other_seed).abs().max()) < float((w - a).abs().max())  # both near the mean, unlike one w


def test_upfirdn2d_matches_explicit_upsample_and_filter():
    """Zero insertion + padding + flipped-kernel convolution, written out by hand on a tiny map."""
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    kernel = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = upfirdn2d(x, kernel, up=2, pad=(1, 0))
    up = torch.zeros(1, 1, 4, 4)
    up[..., ::2, ::2] = x
    padded = torch.nn.functional.pad(up, (1, 0, 1, 0))
    expected = torch.zeros(1, 1, 4, 4)
    for i in range(4):
        for j in range(4):   # true convolution: out[i,j] = sum k[a,b] * in[i+1-a, j+1-b]
            expected[0, 0, i, j] = sum(kernel[a, b] * padded[0, 0, i + 1 - a, j + 1 - b]
                                       for a in range(2) for b in range(2))
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("input_nc", [1, 3, 19])
def test_gradual_encoder_shapes_for_any_channels(input_nc):
    enc = GradualStyleEncoder(input_nc=input_nc, n_styles=12, input_size=64).eval()
    with torch.no_grad():
        assert enc(torch.randn(2, input_nc, 64, 64)).shape == (2, 12, 512)


def test_gradual_encoder_reference_pyramid_at_256():
    enc = GradualStyleEncoder(n_styles=18, input_size=256)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in s.convs) for s in enc.styles]
    assert convs == [4] * 3 + [5] * 4 + [6] * 11     # 16, 32 and 64 px maps pooled to 1x1
    assert enc.taps == [6, 20, 23]


def test_single_layer_encoders():
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert BackboneEncoderUsingLastLayerIntoW().eval()(x).shape == (2, 512)
        assert BackboneEncoderUsingLastLayerIntoWPlus(n_styles=10).eval()(x).shape == (2, 10, 512)


@pytest.mark.parametrize("layers,mode", [(100, "ir"), (152, "ir_se")])
def test_deeper_backbones(layers, mode):
    net = IRSEBackbone(112, layers, mode).eval()
    expected_units = {100: 49, 152: 50}[layers]
    assert len(net.body) == expected_units
    with torch.no_grad():
        out = net(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, 512) and torch.allclose(out.norm(), torch.tensor(1.0))


def test_psp_learn_in_w_and_input_code():
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(encoder_type="BackboneEncoderUsingLastLayerIntoW", learn_in_w=True,
                              output_size=16, encoder_input_size=32)).eval()
    net.set_latent_avg(torch.randn(512))
    assert net.latent_avg.shape == (1, 512)
    with torch.no_grad():
        images, latents = net(torch.randn(2, 3, 32, 32), resize=False, return_latents=True, randomize_noise=False)
        assert images.shape == (2, 3, 16, 16)
        assert torch.allclose(latents[:, 0], latents[:, -1])      # one w broadcast to every layer
        z = torch.randn(2, 512)
        from_code = net(z, input_code=True, resize=False, randomize_noise=False)
        from_decoder, _ = net.decoder([z], randomize_noise=False)
    assert torch.equal(from_code, from_decoder)                 # input_code: codes go in as z
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3, 256, 256)


def test_mix_styles_semantics():
    codes, inject = torch.zeros(1, 4, 2), torch.ones(1, 4, 2)
    assert mix_styles(codes, [1], inject, 0.25)[0, :, 0].tolist() == [0, 0.25, 0, 0]
    assert mix_styles(codes, [2, 3], inject, None)[0, :, 0].tolist() == [0, 0, 1, 1]
    assert mix_styles(inject, [0], None, None)[0, :, 0].tolist() == [0, 1, 1, 1]
    assert codes.sum() == 0       # the input is not modified in place


def test_architecture_validation():
    with pytest.raises(ValueError, match="unknown encoder_type"):
        PSPArchitecture(encoder_type="Nope")
    with pytest.raises(ValueError, match="learn_in_w"):
        PSPArchitecture(learn_in_w=True)
    with pytest.raises(ValueError, match="power of two"):
        Generator(48)
