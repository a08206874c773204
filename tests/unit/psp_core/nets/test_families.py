"""The ReStyle-pSp, ReStyle-e4e and e4e families: read from released opts, strict loading, exact round
trips of our own checkpoints, the ResNet-34 variants, and refine()'s loop (numbers: test_parity.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.parity import e4e_training_state
from psp_core import CheckpointError, InputError, PSPArchitecture, load_psp, refine, save_psp
from psp_core.nets.encoders import ENCODERS
from psp_core.nets.psp import PSP
from psp_core.options import ENCODER_TYPES

TINY = {"output_size": 16, "encoder_input_size": 32}   # 6 styles; 32 px encoder input


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch):
    """Every torchvision weight fetch fails here: the ResNet-34 encoders must build without one."""
    import torchvision.models

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder asked torchvision for pretrained weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def tiny_net(encoder_type: str, family: str, seed: int = 0) -> PSP:
    input_nc = 6 if family.startswith("restyle") else 3
    torch.manual_seed(seed)
    net = PSP(PSPArchitecture(encoder_type=encoder_type, family=family, input_nc=input_nc, **TINY))
    with torch.no_grad():   # non-trivial batch-norm statistics (a lost buffer shows) and noise strengths
        for name, buffer in net.encoder.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
        for name, parameter in net.decoder.named_parameters():
            if name.endswith("noise.weight"):
                parameter.fill_(0.5)
    net.set_latent_avg(0.1 * torch.randn(net.n_styles, 512))
    return net.eval()


NEW_ENCODERS = [("GradualStyleEncoder", "restyle_psp"), ("BackboneEncoder", "restyle_psp"),
                ("ResNetGradualStyleEncoder", "restyle_psp"), ("ResNetBackboneEncoder", "restyle_psp"),
                ("ProgressiveBackboneEncoder", "restyle_e4e"), ("ResNetProgressiveBackboneEncoder", "restyle_e4e"),
                ("Encoder4Editing", "e4e")]


def test_encoder_registry_matches_the_options():
    assert tuple(ENCODERS) == ENCODER_TYPES
    assert {t for t, _ in NEW_ENCODERS} | {"BackboneEncoderUsingLastLayerIntoW", "BackboneEncoderUsingLastLayerIntoWPlus",
                                           "WEncoder"} == set(ENCODER_TYPES)


@pytest.mark.parametrize("opts,expected", [
    ({"encoder_type": "GradualStyleEncoder", "input_nc": 3, "output_size": 1024},
     ("psp", "GradualStyleEncoder", 1024, 3)),
    ({"encoder_type": "GradualStyleEncoder", "input_nc": 6, "output_size": 512, "n_iters_per_batch": 5},
     ("restyle_psp", "GradualStyleEncoder", 512, 6)),
    ({"encoder_type": "BackboneEncoder", "input_nc": 6, "output_size": 1024, "n_iters_per_batch": 5},
     ("restyle_psp", "BackboneEncoder", 1024, 6)),
    ({"encoder_type": "ResNetBackboneEncoder", "input_nc": 6, "output_size": 512},
     ("restyle_psp", "ResNetBackboneEncoder", 512, 6)),
    ({"encoder_type": "ResNetGradualStyleEncoder", "input_nc": 6, "output_size": 256},
     ("restyle_psp", "ResNetGradualStyleEncoder", 256, 6)),
    ({"encoder_type": "ProgressiveBackboneEncoder", "input_nc": 6, "output_size": 1024, "n_iters_per_batch": 5},
     ("restyle_e4e", "ProgressiveBackboneEncoder", 1024, 6)),
    ({"encoder_type": "ResNetProgressiveBackboneEncoder", "input_nc": 6, "output_size": 512},
     ("restyle_e4e", "ResNetProgressiveBackboneEncoder", 512, 6)),
    ({"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": True},
     ("e4e", "Encoder4Editing", 1024, 3)),
    ({"encoder_type": "Encoder4Editing", "stylegan_size": 256, "output_size": 512},   # output_size wins
     ("e4e", "Encoder4Editing", 512, 3)),
])
def test_family_is_read_from_released_opts(opts, expected):
    arch = PSPArchitecture.from_opts(opts)
    assert (arch.family, arch.encoder_type, arch.output_size, arch.input_nc) == expected
    assert (arch.encoder_input_size, arch.encoder_num_layers, arch.learn_in_w) == (256, 50, False)


def test_restyle_always_starts_from_latent_avg():
    """The ReStyle reference adds latent_avg at the first iteration whatever its (unused) option says."""
    opts = {"encoder_type": "BackboneEncoder", "input_nc": 6, "output_size": 64, "start_from_latent_avg": False}
    assert PSPArchitecture.from_opts(opts).start_from_latent_avg is True
    e4e = {"encoder_type": "Encoder4Editing", "stylegan_size": 64, "start_from_latent_avg": False}
    assert PSPArchitecture.from_opts(e4e).start_from_latent_avg is False


def test_family_and_encoder_must_agree():
    with pytest.raises(InputError, match="encoder_type BackboneEncoder is not a psp encoder"):
        PSPArchitecture(encoder_type="BackboneEncoder", input_nc=6)
    with pytest.raises(InputError, match="unknown family 'restyle'"):
        PSPArchitecture(family="restyle")
    with pytest.raises(InputError, match=r"input_nc > 3"):
        PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=3)


@pytest.mark.parametrize("encoder_type,family", NEW_ENCODERS)
def test_our_checkpoints_round_trip_exactly(encoder_type, family, tmp_path):
    """save_psp writes opts that name the family; load_psp rebuilds the same layout and function."""
    net = tiny_net(encoder_type, family)
    path = save_psp(net, tmp_path / f"{encoder_type}.pt")
    ckpt = torch.load(path, weights_only=True)
    assert (ckpt["opts"]["family"], ckpt["opts"]["encoder_type"]) == (family, encoder_type)
    assert ckpt["latent_avg"].shape == (net.n_styles, 512)
    loaded = load_psp(path)
    assert loaded.arch == net.arch and type(loaded.encoder) is type(net.encoder)
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded.latent_avg, net.latent_avg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if family == "e4e":
            before = net(x, resize=False, randomize_noise=False, return_latents=True)
            after = loaded(x, resize=False, randomize_noise=False, return_latents=True)
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        else:
            before, after = refine(net, x, 2), refine(loaded, x, 2)
            assert all(torch.equal(a, b) for pair_a, pair_b in zip(before, after) for a, b in zip(pair_a, pair_b))


def test_e4e_opts_carry_stylegan_size_for_the_reference_loader(tmp_path):
    opts = tiny_net("Encoder4Editing", "e4e").opts
    assert opts["stylegan_size"] == 16 and opts["start_from_latent_avg"] is True
    assert "stylegan_size" not in tiny_net("BackboneEncoder", "restyle_psp").opts


def released_layout(net: PSP) -> dict:
    """`net` as the reference code saves it (opts without our keys), so load_psp must infer everything."""
    reference_opts = {"encoder_type": net.arch.encoder_type, "dataset_type": "ffhq_encode"}
    if net.arch.family == "e4e":
        reference_opts |= {"stylegan_size": net.arch.output_size, "start_from_latent_avg": True}
    else:
        reference_opts |= {"input_nc": net.arch.input_nc, "output_size": net.arch.output_size, "n_iters_per_batch": 5}
    reference_opts["encoder_input_size"] = net.arch.encoder_input_size   # ours: only to keep the test small
    return {"state_dict": net.state_dict(), "opts": reference_opts, "latent_avg": net.latent_avg}


def test_released_e4e_with_training_state_loads(tmp_path):
    """Entries beside the model (latent discriminator, optimisers, step) are not part of it."""
    net = tiny_net("Encoder4Editing", "e4e")
    torch.save({**released_layout(net), **e4e_training_state()}, tmp_path / "e4e.pt")
    loaded = load_psp(tmp_path / "e4e.pt")
    assert loaded.arch == net.arch
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())


def test_released_restyle_gradual_encoder_with_six_channels_loads(tmp_path):
    net = tiny_net("GradualStyleEncoder", "restyle_psp")
    torch.save(released_layout(net), tmp_path / "restyle_gradual.pt")
    loaded = load_psp(tmp_path / "restyle_gradual.pt")
    assert loaded.arch == net.arch and loaded.arch.family == "restyle_psp"


@pytest.mark.parametrize("claimed,held", [
    (("BackboneEncoder", "restyle_psp"), ("GradualStyleEncoder", "restyle_psp")),            # extra latlayers
    (("GradualStyleEncoder", "restyle_psp"), ("BackboneEncoder", "restyle_psp")),            # missing latlayers
    (("ResNetBackboneEncoder", "restyle_psp"), ("BackboneEncoder", "restyle_psp")),          # another body
    (("ProgressiveBackboneEncoder", "restyle_e4e"), ("ResNetProgressiveBackboneEncoder", "restyle_e4e")),
])
def test_wrong_encoder_layout_is_one_line_error(claimed, held, tmp_path):
    ckpt = released_layout(tiny_net(*held))
    ckpt["opts"]["encoder_type"] = claimed[0]
    torch.save(ckpt, tmp_path / "liar.pt")
    with pytest.raises(CheckpointError) as err:
        load_psp(tmp_path / "liar.pt")
    message = str(err.value)
    assert "liar.pt encoder does not match the architecture" in message and "\n" not in message
    assert "missing" in message or "unexpected" in message


def test_one_missing_or_extra_key_is_refused(tmp_path):
    ckpt = released_layout(tiny_net("Encoder4Editing", "e4e"))
    del ckpt["state_dict"]["encoder.styles.5.linear.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 missing: styles\.5\.linear\.bias$"):
        load_psp(tmp_path / "missing.pt")
    ckpt = released_layout(tiny_net("ResNetBackboneEncoder", "restyle_psp"))
    ckpt["state_dict"]["encoder.fc.weight"] = torch.zeros(1000, 512)    # torchvision's classifier
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected: fc\.weight$"):
        load_psp(tmp_path / "extra.pt")


def test_restyle_checkpoint_without_latent_avg_is_refused(tmp_path):
    ckpt = released_layout(tiny_net("BackboneEncoder", "restyle_psp"))
    del ckpt["latent_avg"]
    torch.save(ckpt, tmp_path / "no_avg.pt")
    with pytest.raises(CheckpointError, match="restyle_psp model that starts from latent_avg, but the file has no"):
        load_psp(tmp_path / "no_avg.pt")


def test_resnet34_encoders_have_the_reference_layout():
    """conv1/bn1/relu stem and torchvision's 16 basic blocks as body.0..15, built untrained (the
    autouse fixture fails any weight fetch)."""
    for encoder_type in ("ResNetGradualStyleEncoder", "ResNetBackboneEncoder", "ResNetProgressiveBackboneEncoder"):
        encoder = ENCODERS[encoder_type](input_nc=6, n_styles=18)
        keys = set(encoder.state_dict())
        assert {"conv1.weight", "bn1.running_var", "relu.weight", "body.15.bn2.weight"} <= keys
        assert encoder.conv1.weight.shape == (64, 6, 7, 7)
        assert {k.split(".")[1] for k in keys if ".downsample." in k} == {"3", "7", "13"}
        assert len(encoder.body) == 16 and encoder.taps == [6, 12, 15]
        assert not any(k.startswith(("fc.", "layer", "input_layer")) for k in keys)
        assert encoder(torch.randn(1, 6, 256, 256)).shape == (1, 18, 512)


def test_progressive_encoders_add_deltas_to_the_first_style():
    """e4e's head: w (style 0) on every layer plus style i's output on layer i (all deltas at inference)."""
    torch.manual_seed(0)
    for progressive, plain in (("ProgressiveBackboneEncoder", "BackboneEncoder"),
                               ("Encoder4Editing", "GradualStyleEncoder")):
        a = ENCODERS[progressive](input_nc=3, n_styles=10, input_size=32).eval()
        b = ENCODERS[plain](input_nc=3, n_styles=10, input_size=32).eval()
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            codes, styles = a(x), b(x)
        assert torch.equal(codes[:, 0], styles[:, 0])
        assert torch.equal(codes[:, 1:], styles[:, :1] + styles[:, 1:])


def test_refine_is_restyles_loop():
    """refine() against the loop written out with the model's parts: average image from latent_avg
    (stored noise, pooled to the input size), then encoder residuals added to latent_avg, then to the
    last code, each pass seeing the last output."""
    net = tiny_net("ProgressiveBackboneEncoder", "restyle_e4e")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        results = refine(net, x, 3)
        avg, _ = net.decoder([net.latent_avg[None]], input_is_latent=True, randomize_noise=False)
        last_image, latent = F.adaptive_avg_pool2d(avg, (32, 32)).expand(2, -1, -1, -1), net.latent_avg
        for images, latents in results:
            latent = net.encoder(torch.cat([x, last_image], 1)) + latent
            image, _ = net.decoder([latent], input_is_latent=True, randomize_noise=False)
            assert torch.equal(latents, latent) and torch.equal(images, image)
            last_image = F.adaptive_avg_pool2d(image, (32, 32))
        assert images.shape == (2, 3, 16, 16) and latents.shape == (2, 6, 512)
        resized = refine(net, x, 3, resize=True)
        assert all(torch.equal(r, F.adaptive_avg_pool2d(i, (256, 256))) for (r, _), (i, _) in zip(resized, results))
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resized, results))
        noisy = refine(net, x, 1, randomize_noise=True)[0][0]
        assert not torch.allclose(noisy, results[0][0])


def test_refine_refuses_models_and_inputs_it_cannot_run():
    with pytest.raises(InputError, match="refine needs a ReStyle model"):
        refine(tiny_net("Encoder4Editing", "e4e"), torch.randn(1, 3, 32, 32), 2)
    net = tiny_net("BackboneEncoder", "restyle_psp")
    with pytest.raises(InputError, match=r"must be \[N, 3, H, W\], got \[1, 6, 32, 32\]"):
        refine(net, torch.randn(1, 6, 32, 32), 2)
    with pytest.raises(InputError, match="n_iters must be >= 1"):
        refine(net, torch.randn(1, 3, 32, 32), 0)


@pytest.mark.parametrize("encoder_type,family", [("GradualStyleEncoder", "psp"), ("Encoder4Editing", "e4e"),
                                                 ("BackboneEncoder", "restyle_psp"),
                                                 ("ProgressiveBackboneEncoder", "restyle_e4e")])
def test_inference_core_runs_every_family_as_the_reference_does(encoder_type, family):
    """The stages' inference core: one pass through the model's call for pSp and e4e (n_iters ignored),
    `refine`'s steps for ReStyle; images scored at 256, clamped."""
    from psp_core.inference import InferenceModel, scored

    net = tiny_net(encoder_type, family)
    model = InferenceModel(net, "encode")
    pixels = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    source, target = model.prepare(pixels, pixels)
    assert source.shape == (2, 3, 32, 32) and target.shape == (2, 3, 256, 256)
    steps = model.invert(source, n_iters=3)
    with torch.no_grad():
        if family.startswith("restyle"):
            expected = refine(net, source, 3)
        else:
            expected = [net(source, resize=False, randomize_noise=False, return_latents=True)]
    assert len(steps) == len(expected) == (3 if model.iterative else 1)
    for step, (images, latents) in zip(steps, expected):
        torch.testing.assert_close(step.latents, latents, rtol=0, atol=1e-6)
        torch.testing.assert_close(scored(step.images), F.adaptive_avg_pool2d(images, 256).clamp(-1, 1))
    with pytest.raises(InputError, match="3-channel images; preset sketch_to_face gives 1"):
        InferenceModel(net, "sketch_to_face")
