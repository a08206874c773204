"""StyleGAN2-ADA network pickles, read as data: the converted generator computes what NVIDIA's computes (against
the NVIDIA-style reference of `helpers.ada`), nothing in a pickle runs, and every foreign or unsupported pickle
is one line naming what was found."""
from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from helpers.ada import (
    EXECUTED_MARKER,
    ada_generator,
    reference_mapping,
    reference_synthesis,
    stylegan3_generator,
    write_network_pickle,
)
from psp_core import CheckpointError, PSPArchitecture, build_psp, load_generator, load_psp, save_psp
from psp_core.editing.directions import SefaEdit, sefa_directions
from psp_core.nets.ada_generator import read_ada_generator
from psp_core.nets.ada_pickle import PickledModule, is_network_pickle, read_network_pickle
from psp_core.nets.checkpoints import read_generator_checkpoint, save_generator
from psp_core.viz import edit_grid


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The parity rule: max|ours - ref| <= 1e-4 * max(1, max|ref|)."""
    error, scale = (ours - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert error <= 1e-4 * scale, f"max error {error:.3g} for max |ref| {scale:.3g}"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A 64 px snapshot (channel_base 16384, num_fp16_res 2, conv_clamp 256): G_ema from seed 0, G from seed 1."""
    g_ema, g = ada_generator(seed=0), ada_generator(seed=1)
    path = write_network_pickle(tmp_path_factory.mktemp("ada") / "network-snapshot-000100.pkl", g_ema, g)
    return path, g_ema, g


@pytest.fixture(scope="module")
def converted(snapshot):
    return read_ada_generator(snapshot[0])


def test_mapping_synthesis_and_latent_avg_match_nvidias(snapshot, converted):
    path, g_ema, _ = snapshot
    z = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))
    ws = reference_mapping(g_ema, z)                                          # [2, 10, 512]
    generator = converted.generator
    assert generator.n_latent == ws.shape[1] == 10
    with torch.no_grad():
        assert_close(generator.style(z), ws[:, 0])
        codes = ws + 0.7 * torch.randn(ws.shape, generator=torch.Generator().manual_seed(4))   # a style per layer
        image, _ = generator([codes], input_is_latent=True, randomize_noise=False)
    assert_close(image, reference_synthesis(g_ema, codes))
    assert torch.equal(converted.latent_avg, g_ema.mapping.w_avg)
    config = converted.config
    assert (config.resolution, config.channel_base, config.channel_multiplier, config.num_fp16_res,
            config.conv_clamp, config.resample_taps) == (64, 16384, 1, 2, 256.0, (1.0, 3.0, 3.0, 1.0))
    assert is_network_pickle(path)
    ckpt = read_generator_checkpoint(path)
    assert torch.equal(ckpt.latent_avg, g_ema.mapping.w_avg) and ckpt.generator.conv_clamp == 256.0
    assert type(load_generator(path)).__name__ == "Generator"


def test_g_on_request(snapshot, converted):
    path, g_ema, g = snapshot
    other = read_ada_generator(path, network="G")
    z = torch.randn(2, 512, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(other.generator.style(z), reference_mapping(g, z)[:, 0])
    assert torch.equal(other.generator.conv1.conv.weight[0], g.synthesis.b4.conv1.weight)
    assert not torch.equal(other.generator.conv1.conv.weight, converted.generator.conv1.conv.weight)
    with pytest.raises(CheckpointError, match="network must be one of G_ema, G"):
        read_ada_generator(path, network="D")


def test_the_clamp_acts_as_nvidias(tmp_path):
    """conv_clamp 0.5 clamps most activations (so the test sees the clamp work), with the mapping at 2 layers
    to keep it small; the generator file keeps the clamp."""
    g_ema = ada_generator(seed=2, conv_clamp=0.5, mapping_layers=2, num_fp16_res=0)
    path = write_network_pickle(tmp_path / "clamped.pkl", g_ema)
    generator = read_ada_generator(path).generator
    codes = torch.randn(1, 10, 512, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        image, _ = generator([codes], input_is_latent=True, randomize_noise=False)
        reference = reference_synthesis(g_ema, codes)
        assert_close(image, reference)
        generator.set_conv_clamp(None)
        unclamped, _ = generator([codes], input_is_latent=True, randomize_noise=False)
    assert (unclamped - reference).abs().max() > 0.1                     # the clamp changed the image
    generator.set_conv_clamp(0.5)
    saved = save_generator(generator, None, tmp_path / "clamped.pt")
    assert set(torch.load(saved, weights_only=True)) == {"g_ema", "conv_clamp"}
    assert read_generator_checkpoint(saved).generator.conv_clamp == 0.5


def test_records_are_data_and_the_module_source_never_runs(snapshot):
    path = snapshot[0]
    loaded = read_network_pickle(path)
    assert set(loaded) == {"training_set_kwargs", "G", "D", "G_ema", "augment_pipe"}
    g = loaded["G_ema"]
    assert isinstance(g, PickledModule) and g.class_name == "Generator" and g.version == 6
    assert "write_text" in g.module_src                                # kept as text ...
    assert not (path.parent / EXECUTED_MARKER).exists()                # ... never executed
    assert g.init_kwargs["synthesis_kwargs"]["conv_clamp"] == 256
    layer = g.child("synthesis").child("b8").child("conv0")
    assert layer.attributes["up"] == 2 and isinstance(layer.attributes["act_gain"], float)
    assert layer.tensor("weight").shape == (512, 512, 3, 3)
    assert loaded["augment_pipe"].attributes["imgfilter_bands"] == [1, 1, 1, 1]


class OpensAFile:
    """A payload whose unpickling would create a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


class RunsAShell:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("payload, refused", [("open", f"{open.__module__}.open"),
                                               ("system", f"{os.system.__module__}.system")])
def test_a_pickle_that_would_run_code_is_refused_and_creates_nothing(tmp_path, payload, refused):
    target = tmp_path / "created-by-the-pickle"
    path = tmp_path / "network.pkl"
    evil = OpensAFile(target) if payload == "open" else RunsAShell()
    path.write_bytes(pickle.dumps({"G_ema": evil}))
    with pytest.raises(CheckpointError) as err:
        load_generator(path)
    assert str(err.value).startswith(f"{path}: refuses to load global {refused}")
    assert "\n" not in str(err.value)
    assert not target.exists()


def test_a_pickle_cannot_alter_the_loader_or_claim_memory_it_does_not_hold(snapshot, tmp_path):
    """BUILD on a class the loader hands out (an attribute set on it would last for the next file) is refused;
    so is a zero-stride tensor claiming a million values over one stored value; the next file loads as before."""
    alters = tmp_path / "alters.pkl"
    alters.write_bytes(b"\x80\x02cdnnlib.util\nEasyDict\nN}X\x0c\x00\x00\x00__setstate__K\x01s\x86b.")
    claims = tmp_path / "claims.pkl"
    claims.write_bytes(pickle.dumps({"G_ema": torch.zeros(1).expand(1_000_000)}))
    for path, message in ((alters, "a pickle that modifies the loader's class PickledEasyDict"),
                          (claims, "a tensor of 1000000 values over a storage of 1")):
        with pytest.raises(CheckpointError, match=message):
            read_network_pickle(path)
    assert read_network_pickle(snapshot[0])["training_set_kwargs"]["resolution"] == 64


def test_truncated_foreign_and_tensorflow_pickles_are_one_line(snapshot, tmp_path):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(snapshot[0].read_bytes()[:100_000])
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(os.urandom(256))
    tensorflow = tmp_path / "stylegan2-ffhq-config-f.pkl"
    tensorflow.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\n)\x81}b.")
    for path, message in ((truncated, "truncated or not a network pickle"),
                          (other, "not a StyleGAN2-ADA network pickle: no 'G_ema' entry (found ['weights'])"),
                          (garbage, "truncated or not a network pickle"),
                          (tensorflow, "a TensorFlow network pickle")):
        with pytest.raises(CheckpointError) as err:
            load_generator(path)
        assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kind, message", [
    ("stylegan3", "a StyleGAN3 (or other non-StyleGAN2) generator: synthesis holds L0_36_4, input"),
    ("conditional", "a conditional generator (c_dim=10"),
    ("resnet", "synthesis architecture resnet; only 'skip'"),
    ("channels", "channels per resolution {4: 256, 8: 128, 16: 64, 32: 32, 64: 16} are neither"),
    ("resolution", "a 32 px generator; supported: 64, 128"),
])
def test_unsupported_generators_are_refused_by_name(tmp_path, kind, message):
    small = dict(channel_base=1024, w_dim=8, mapping_layers=1)
    g = {"stylegan3": lambda: stylegan3_generator(),
         "conditional": lambda: ada_generator(c_dim=10, **small),
         "resnet": lambda: ada_generator(architecture="resnet", **small),
         "channels": lambda: ada_generator(**small),
         "resolution": lambda: ada_generator(resolution=32, **small)}[kind]()
    path = write_network_pickle(tmp_path / f"{kind}.pkl", g)
    with pytest.raises(CheckpointError) as err:
        read_ada_generator(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_a_torch_file_named_pkl_still_loads_the_ordinary_way(converted, tmp_path):
    path = save_generator(converted.generator, converted.latent_avg, tmp_path / "g.pkl")
    assert not is_network_pickle(path)
    ckpt = read_generator_checkpoint(path)
    assert torch.equal(ckpt.latent_avg, converted.latent_avg) and ckpt.generator.conv_clamp == 256.0


def test_a_sefa_edit_grid_from_the_imported_generator(converted):
    generator = converted.generator
    _, vectors = sefa_directions(generator, [0, 1, 2])
    codes = converted.latent_avg.expand(1, generator.n_latent, 512).clone()           # [1, 10, 512]
    edited = SefaEdit(vectors[0], (0, 1, 2))(codes, [-3.0, 0.0, 3.0])                 # [3, 1, 10, 512]
    with torch.no_grad():
        images, _ = generator([edited.flatten(0, 1)], input_is_latent=True, randomize_noise=False)
    assert not torch.allclose(images[0], images[1])
    grid = edit_grid(images.view(3, 1, 3, 64, 64).transpose(0, 1), tile=32)
    assert grid.size == (3 * 34 + 2, 34 + 2)


def test_a_psp_builds_on_the_imported_generator_and_trains(snapshot, converted):
    """build_psp reads the .pkl as `generator_path`: the decoder is the converted generator (clamp included),
    latent_avg is w_avg, and a training step moves the encoder."""
    torch.manual_seed(0)
    arch = PSPArchitecture(output_size=64, encoder_input_size=32, stylegan_channel_multiplier=1)
    net = build_psp(arch, generator_path=snapshot[0])
    decoder = net.decoder
    assert decoder.conv_clamp == 256.0
    assert all(torch.equal(v, converted.generator.state_dict()[k]) for k, v in decoder.state_dict().items())
    assert torch.equal(net.latent_avg[0], converted.latent_avg)
    decoder.requires_grad_(False)                                       # train_decoder: false, as with real weights
    before = copy.deepcopy(net.encoder.state_dict())
    optimizer = torch.optim.Adam(net.encoder.parameters(), lr=1e-3)
    target = torch.rand(1, 3, 64, 64) * 2 - 1
    images = net(torch.nn.functional.interpolate(target, size=32), resize=False, randomize_noise=False)
    loss = torch.nn.functional.mse_loss(images, target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(v, net.encoder.state_dict()[k]) for k, v in before.items())
    with pytest.raises(CheckpointError, match="channel multiplier 1 .* wants stylegan_channel_multiplier=2"):
        build_psp(PSPArchitecture(output_size=64, encoder_input_size=32), generator_path=snapshot[0])



def test_a_psp_checkpoint_keeps_its_generators_clamp(snapshot, tmp_path):
    """The clamp is not a tensor: a pSp written on a converted generator records it in `opts`, and `load_psp`
    puts it back (a file without the key loads unclamped)."""
    torch.manual_seed(0)
    net = build_psp(PSPArchitecture(output_size=64, encoder_input_size=32, stylegan_channel_multiplier=1),
                    generator_path=snapshot[0])
    assert load_psp(save_psp(net, tmp_path / "clamped.pt")).decoder.conv_clamp == 256.0
    net.decoder.set_conv_clamp(None)
    assert load_psp(save_psp(net, tmp_path / "plain.pt")).decoder.conv_clamp is None
