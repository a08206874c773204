"""HyperStyle's networks and files: the generator's per-sample weight offsets, the hypernetwork's layers and heads at
every output and input size, strict loading (the shared hypernetwork's repeated copies, the W encoder found or refused
in one line), the separable variant, and the W encoder as a model of its own (numbers:
inference/test_hyperstyle_parity.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.parity import (
    HYPERSTYLE,
    fixture,
    fixture_meta,
    parity_errors,
    rule_w_encoder_state,
)
from psp_core import CheckpointError, HyperStyle, InputError, load_psp
from psp_core.inference import refine_hyperstyle
from psp_core.nets.hypernet import SHARED_LAYERS, LayerHead, SeparableKernel, SharedCodeHead
from psp_core.nets.hyperstyle_checkpoints import find_w_encoder, save_hyperstyle
from psp_core.nets.psp import PSP
from psp_core.nets.stylegan2 import Generator, ModulatedConv2d, use_exact_modulation
from psp_core.options import HyperStyleArchitecture

REFERENCE_LAYERS = [(3, 512, 512), (1, 512, 3), (3, 512, 512), (3, 512, 512), (1, 512, 3), (3, 512, 512),
                    (3, 512, 512), (1, 512, 3), (3, 512, 512), (3, 512, 512), (1, 512, 3), (3, 512, 512),
                    (3, 512, 512), (1, 512, 3), (3, 512, 256), (3, 256, 256), (1, 256, 3), (3, 256, 128),
                    (3, 128, 128), (1, 128, 3), (3, 128, 64), (3, 64, 64), (1, 64, 3), (3, 64, 32), (3, 32, 32),
                    (1, 32, 3)]
"""The reference's `PARAMETERS`: [kernel_size, in_channels, out_channels] of each layer HyperStyle can tune."""


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch):
    """Every torchvision weight fetch fails here: the hypernetwork's ResNet-34 body must build without one."""
    import torchvision.models

    def refuse(*args, **kwargs):
        raise AssertionError("the hypernetwork asked torchvision for pretrained weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


# ----------------------------------------------------------------------------- the generator's weight offsets

@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    g = Generator(16, 512, 2).eval()
    with torch.no_grad():
        for module in g.modules():
            if type(module).__name__ == "NoiseInjection":
                module.weight.fill_(0.5)
    return g


def offsets_for(g: Generator, per_sample: dict[int, list[float]]) -> list[torch.Tensor | None]:
    """Offsets of `per_sample[layer][n]` everywhere in sample n's weight of that layer, None on the other layers."""
    convs = g.modulated_convs()
    return [torch.tensor(per_sample[i], dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, *conv.weight.shape[1:])
            .clone() if i in per_sample else None for i, conv in enumerate(convs)]


def test_offsets_scale_the_weight_before_modulation_and_demodulation(generator):
    """W * (1 + delta), per sample (five samples of one code): zero offsets are the plain generator; a uniform offset
    on a demodulated layer is undone by the demodulation; on a toRGB (not demodulated) it scales that layer's
    contribution (+1 doubles it, -1 removes it); a sample's own offsets change its image alone."""
    codes = torch.randn(1, generator.n_latent, 512).repeat(5, 1, 1)
    plain, _ = generator([codes], input_is_latent=True, randomize_noise=False)
    last_rgb = len(generator.modulated_convs()) - 1
    offsets = offsets_for(generator, {0: [0, 0.7, 0, 0, 0], 1: [0] * 5, 2: [0, -0.3, 0, 0, 0], 3: [0] * 5,
                                      last_rgb: [0, 0, 1, -1, 0]})
    offsets[3][4].normal_(0, 0.5)
    out, _ = generator([codes], input_is_latent=True, randomize_noise=False, weight_offsets=offsets)
    assert torch.allclose(out[0], plain[0], atol=1e-5)                      # zeros
    assert torch.allclose(out[1], plain[1], atol=1e-4)                      # uniform, demodulated
    doubled, removed = out[2] - plain[2], plain[3] - out[3]                 # the last toRGB's contribution
    assert torch.allclose(doubled, removed, atol=1e-4) and doubled.abs().max() > 0.1
    assert (out[4] - plain[4]).abs().max() > 0.1                            # its own offsets


def test_offsets_take_the_grouped_form_even_when_the_fused_one_is_chosen(generator, monkeypatch):
    """A per-sample weight cannot be one ordinary convolution: with `exact` off, the layers given offsets still run
    grouped and the others fused, as before."""
    convs = generator.modulated_convs()
    fused_layers = []
    real_fused = ModulatedConv2d.fused
    def spy(self, x, style):
        fused_layers.append(convs.index(self))
        return real_fused(self, x, style)
    monkeypatch.setattr(ModulatedConv2d, "fused", spy)
    codes = torch.randn(2, generator.n_latent, 512)
    try:
        use_exact_modulation(generator, False)
        generator([codes], input_is_latent=True, randomize_noise=False,
                  weight_offsets=offsets_for(generator, {0: [0.2, 0.0], 3: [-0.1, 0.1]}))
        assert fused_layers == [1, 2, 4, 5, 6, 7]
        generator([codes], input_is_latent=True, randomize_noise=False,
                  weight_offsets=offsets_for(generator, {i: [0.0, 0.0] for i in range(len(convs))}))
        assert fused_layers == [1, 2, 4, 5, 6, 7]   # offsets everywhere: no fused layer
    finally:
        use_exact_modulation(generator, True)
    with pytest.raises(ValueError, match=r"weight_offsets has 3 entries, the generator 8 modulated convolutions"):
        generator([codes], input_is_latent=True, weight_offsets=[None] * 3)


# ----------------------------------------------------------------------------- architecture and hypernetwork

@pytest.mark.parametrize("size,outputs", [(16, 8), (64, 14), (256, 20), (512, 23), (1024, 26)])
def test_every_output_size_has_its_layers_and_offsets(size, outputs):
    """The released 256/512/1024 px and smaller generators: 20/23/26 (8/14 at 16/64 px) hypernetwork outputs with the
    reference's layer shapes; `layers_to_tune` empty tunes every layer (the 512->512 3x3 ones through the shared
    hypernetwork), and each offset has its layer's weight shape (shapes only, on the meta device)."""
    arch = HyperStyleArchitecture.from_opts({"encoder_type": "SharedWeightsHyperNetResNet", "output_size": size,
                                             "layers_to_tune": "", "input_nc": 6})
    assert (arch.n_hypernet_outputs, arch.n_styles, arch.layers_to_tune) == (outputs, 2 * size.bit_length() - 4,
                                                                             tuple(range(outputs)))
    assert arch.encoder_input_size == 256, "released opts do not name the input size: the reference's 256"
    with torch.device("meta"):
        net = HyperStyle(arch)
        offsets = net.hypernet(torch.empty(2, 6, 256, 256))
    convs = net.decoder.modulated_convs()
    assert [(c.kernel_size, c.in_channel, c.out_channel) for c in convs] == REFERENCE_LAYERS[:outputs]
    assert [tuple(o.shape) for o in offsets] == [(2, *c.weight.shape[1:]) for c in convs]
    shared = [int(n) for n, head in net.hypernet.refinement_blocks.items() if isinstance(head, SharedCodeHead)]
    assert shared == [layer for layer in SHARED_LAYERS if layer < outputs]


@pytest.mark.parametrize("input_size", [32, 64, 128, 512])
def test_the_heads_follow_the_bodys_map_at_every_input_size(input_size):
    """A hypernetwork at input S (not the reference's 256) sees [N, 6, S, S]; its body ends on an S/16 map and each
    head has one stride-2 conv per halving of it (a 3x3 layer's own head one fewer: it averages a 2x2 map), so every
    layer of a 64 px generator gets its weight's offset shape (shapes only, on the meta device)."""
    arch = HyperStyleArchitecture(output_size=64, encoder_input_size=input_size, layers_to_tune="",
                                  stylegan_channel_multiplier=1)
    with torch.device("meta"):
        net = HyperStyle(arch)
        offsets = net.hypernet(torch.empty(2, 6, input_size, input_size))
        with pytest.raises(AssertionError, match=rf"expected \[N, 6, {input_size}, {input_size}\]"):
            net.hypernet(torch.empty(2, 6, 2 * input_size, 2 * input_size))
    assert [tuple(o.shape) for o in offsets] == [(2, *c.weight.shape[1:]) for c in net.decoder.modulated_convs()]
    halvings = (input_size // 16).bit_length() - 1
    strides = {name: [m.stride[0] for m in head.convs if isinstance(m, torch.nn.Conv2d)]
               for name, head in net.hypernet.refinement_blocks.items()}
    assert strides["0"] == [1] + [2] * halvings                       # a shared layer's head
    assert strides["1"] == [2] * halvings                             # a toRGB's own head: down to 1x1
    assert strides["11"] == [2] * (halvings - 1)                      # a narrower 3x3 layer's own head: to 2x2


@pytest.mark.parametrize("opts,message", [
    ({"output_size": 96}, r"output_size must be a power of two in 16\.\.1024, got 96"),
    ({"encoder_input_size": 16}, r"encoder_input_size must be a power of two in 32\.\.1024, got 16"),
    ({"output_size": 256, "n_hypernet_outputs": 23}, r"n_hypernet_outputs 23: a 256 px generator has 20"),
    ({"layers_to_tune": "0,x"}, r"layers_to_tune must be a comma-separated list of layer indices, got '0,x'"),
    ({"input_nc": 3}, r"input_nc must be 6"),
    ({"dataset_type": "cars_encode"}, r"cars models crop their images"),
    ({"w_encoder_type": "Encoder4Editing"}, r"w_encoder_type 'Encoder4Editing'"),
])
def test_unusable_opts_are_one_line(tmp_path, opts, message):
    """Opts no HyperStyle network is built from: one line naming the option, before anything is built or read."""
    path = tiny_hyperstyle_file(tmp_path, opts)
    with pytest.raises(CheckpointError, match=message) as err:
        load_psp(path)
    assert str(err.value).startswith(f"{path}: unusable 'opts'") and "\n" not in str(err.value)


def test_layers_to_tune_reads_as_the_reference():
    """A comma list (spaces allowed), empty for every layer; indices past the last layer are ignored, as the
    reference's own default (for 1024 px) is with a 256 px generator."""
    assert HyperStyleArchitecture(output_size=256, layers_to_tune=" 5, 0,25").layers_to_tune == (0, 5)
    assert HyperStyleArchitecture(output_size=256).layers_to_tune == (0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18)
    with pytest.raises(InputError, match="no layer of a 256 px generator"):
        HyperStyleArchitecture(output_size=256, layers_to_tune=[20, 21])


# ----------------------------------------------------------------------------- files

FIXTURE_OPTS = {"encoder_type": "SharedWeightsHyperNetResNet", "input_nc": 6, "output_size": 256,
                "layers_to_tune": "0,14", "w_encoder_checkpoint_path": "pretrained_models/faces_w_encoder.pt"}


def tiny_hyperstyle_file(folder, opts=None, state=None):
    """A small file with HyperStyle's layout and opts (not a whole network: the checks under test come first)."""
    path = folder / "hyperstyle.pt"
    torch.save({"state_dict": state or {"hypernet.conv1.weight": torch.zeros(64, 6, 7, 7)},
                "opts": {**FIXTURE_OPTS, **(opts or {})}, "latent_avg": torch.zeros(14, 512)}, path)
    return path


def test_copies_of_the_shared_hypernetwork_must_be_equal(tmp_path):
    """The shared hypernetwork's tensors repeated under a shared layer's head are one tensor: a copy that differs
    is refused in one line naming both keys; equal copies pass on to the strict key check (here: the rest missing)."""
    shared = {"hypernet.shared_weight_hypernet.b1": torch.ones(4608)}
    (tmp_path / "faces_w_encoder.pt").write_bytes(b"")   # found beside: only its presence matters here
    equal = tiny_hyperstyle_file(tmp_path, state={**shared,
                                                  "hypernet.refinement_blocks.0.hypernet.b1": torch.ones(4608)})
    with pytest.raises(CheckpointError, match=r"hypernet does not match the architecture: \d+ missing") as err:
        load_psp(equal)
    assert "differs" not in str(err.value)
    altered = torch.ones(4608)
    altered[7] = 1.5
    differing = tiny_hyperstyle_file(tmp_path, state={**shared, "hypernet.refinement_blocks.0.hypernet.b1": altered})
    with pytest.raises(CheckpointError) as err:
        load_psp(differing)
    assert str(err.value) == (f"{differing}: hypernet.refinement_blocks.0.hypernet.b1 differs from "
                              "hypernet.shared_weight_hypernet.b1: the shared hypernetwork is one tensor, repeated "
                              "under every head that uses it")
    elsewhere = tiny_hyperstyle_file(tmp_path, state={**shared, "hypernet.refinement_blocks.14.hypernet.b1": altered})
    with pytest.raises(CheckpointError, match=r"unexpected: refinement_blocks\.14\.hypernet\.b1"):
        load_psp(elsewhere)   # layer 14 has its own head: no copy of the shared hypernetwork belongs there


def test_a_missing_w_encoder_is_one_line_naming_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models"
    folder.mkdir()
    path = tiny_hyperstyle_file(folder)
    with pytest.raises(CheckpointError) as err:
        load_psp(path)
    message = str(err.value)
    assert isinstance(err.value, InputError) and "\n" not in message   # the CLI's one line and exit status 2
    assert message.startswith(f"{path}: HyperStyle needs its W encoder faces_w_encoder.pt")
    assert str(folder / "faces_w_encoder.pt") in message and "pretrained_models/" in message
    with pytest.raises(CheckpointError, match=r"elsewhere\.pt: HyperStyle's W encoder file not found"):
        load_psp(path, w_encoder=tmp_path / "elsewhere.pt")


def test_the_w_encoder_is_found_by_name_beside_the_checkpoint_then_in_pretrained_models(tmp_path, monkeypatch):
    """The opts' path is the training machine's: only its file name is used."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "models").mkdir()
    checkpoint = tmp_path / "models" / "hyperstyle.pt"
    opts = {"w_encoder_checkpoint_path": "/train/pretrained_models/my_w.pt"}
    (tmp_path / "pretrained_models" / "my_w.pt").write_bytes(b"")
    assert find_w_encoder(checkpoint, opts, None) == Path("pretrained_models", "my_w.pt")
    (tmp_path / "models" / "my_w.pt").write_bytes(b"")
    assert find_w_encoder(checkpoint, opts, None) == tmp_path / "models" / "my_w.pt"
    assert find_w_encoder(checkpoint, {}, tmp_path / "models" / "my_w.pt") == tmp_path / "models" / "my_w.pt"
    with pytest.raises(CheckpointError, match="W encoder faces_w_encoder.pt"):   # no name in the opts: the reference's
        find_w_encoder(checkpoint, {}, None)


def test_a_w_encoder_file_is_refused_for_other_families(tmp_path):
    path = tmp_path / "psp.pt"
    torch.save({"state_dict": {}, "opts": {"encoder_type": "GradualStyleEncoder"}}, path)
    with pytest.raises(CheckpointError, match="a W encoder file is given, but this is not a HyperStyle checkpoint"):
        load_psp(path, w_encoder=path)


@pytest.fixture(scope="module")
def w_encoder_file(tmp_path_factory):
    """The HyperStyle fixture's W encoder in its released layout (`encoder.*`, `decoder.*`, pSp-style opts)."""
    path = tmp_path_factory.mktemp("w") / "faces_w_encoder.pt"
    ref = fixture(HYPERSTYLE)
    torch.save({"state_dict": rule_w_encoder_state(), "opts": dict(fixture_meta(HYPERSTYLE)["w_encoder"]["config"]),
                "latent_avg": torch.from_numpy(ref["latent_avg"])}, path)
    return path


def test_the_w_encoder_loads_as_a_model_of_its_own(w_encoder_file, tmp_path):
    """load_psp(W encoder file): the `w_encoder` family, its W code repeated on every style plus latent_avg, as the
    reference computes them; e4e-style opts (`stylegan_size`) read the same."""
    ref = fixture(HYPERSTYLE)
    net = load_psp(w_encoder_file)
    assert isinstance(net, PSP) and (net.arch.family, type(net.encoder).__name__, net.n_styles) == ("w_encoder",
                                                                                                  "WEncoder", 14)
    x = torch.from_numpy(ref["input"])
    failures = parity_errors([("w_encoder_out", net.encoder(x), ref["w_encoder_out"]),
                              ("codes", net.encode(x[:1]), ref["codes"][:1])])
    assert not failures, "; ".join(failures)
    ckpt = torch.load(w_encoder_file, weights_only=True)
    ckpt["opts"] = {"encoder_type": "WEncoder", "stylegan_size": 256, "start_from_latent_avg": False}
    torch.save(ckpt, tmp_path / "e4e_style.pt")
    e4e_style = load_psp(tmp_path / "e4e_style.pt")
    assert e4e_style.arch == net.arch   # start_from_latent_avg too: the reference always adds latent_avg
    assert all(torch.equal(a, b) for a, b in zip(e4e_style.state_dict().values(), net.state_dict().values()))


def test_separable_hypernetwork_loads_and_runs(tmp_path, w_encoder_file):
    """SharedWeightsHyperNetResNetSeparable in the released layout (copies of the shared hypernetwork stored apart,
    equal) with a W encoder file of e4e-style opts and no decoder (its sizes are HyperStyle's whatever its opts
    say): loads strictly, round-trips its weights, and runs an iteration with offsets of every tuned layer's shape.
    (Its numbers were checked against the reference code run on CPU: bit-identical over two iterations.)"""
    torch.manual_seed(0)
    arch = HyperStyleArchitecture(encoder_type="SharedWeightsHyperNetResNetSeparable", output_size=256,
                                  layers_to_tune="0,1,14")
    built = HyperStyle(arch)
    state = {k: v for k, v in built.state_dict().items() if not k.startswith("w_encoder.")}
    for name in ("w1", "b1", "w2", "b2"):
        copy = state[f"hypernet.shared_weight_hypernet.{name}"].clone()   # equal, stored apart
        state[f"hypernet.refinement_blocks.0.hypernet.{name}"] = copy
    assert "hypernet.refinement_blocks.14.output.0.make_kernel_in.weight" in state
    opts = {"encoder_type": arch.encoder_type, "input_nc": 6, "output_size": 256, "layers_to_tune": "0,1,14"}
    torch.save({"state_dict": state, "opts": opts, "latent_avg": torch.zeros(512)}, tmp_path / "separable.pt")
    w_ckpt = torch.load(w_encoder_file, weights_only=True)
    w_state = {k: v for k, v in w_ckpt["state_dict"].items() if k.startswith("encoder.")}
    torch.save({"state_dict": w_state, "opts": {"encoder_type": "WEncoder", "stylegan_size": 1024}},
               tmp_path / "w.pt")
    del built, state
    net = load_psp(tmp_path / "separable.pt", w_encoder=tmp_path / "w.pt")
    assert type(net.hypernet).__name__ == "SeparableHyperNetwork" and net.latent_avg.shape == (14, 512)
    assert torch.equal(net.hypernet.refinement_blocks["14"].output[0].make_kernel_in.weight,
                       torch.load(tmp_path / "separable.pt", weights_only=True)["state_dict"][
                           "hypernet.refinement_blocks.14.output.0.make_kernel_in.weight"])
    (images, latents), = refine_hyperstyle(net, torch.randn(1, 3, 256, 256), 1)
    assert images.shape == (1, 3, 256, 256) and latents.shape == (1, 14, 512) and torch.isfinite(images).all()
    offsets = net.hypernet(torch.randn(1, 6, 256, 256))
    assert [j for j, o in enumerate(offsets) if o is not None] == [0, 1, 14]
    assert [tuple(offsets[j].shape) for j in (0, 1, 14)] == [(1, 512, 512, 3, 3), (1, 3, 512, 1, 1),
                                                              (1, 256, 512, 3, 3)]


def test_separable_kernel_is_a_mixed_sum_of_outer_products():
    """SeparableKernel written out: per tap, out-vector x in-vector, then both channel mixes (an independent
    formulation of the reference's matmul / permute chain)."""
    torch.manual_seed(1)
    block = SeparableKernel(8, in_channels=5, out_channels=4, kernel_size=3)
    code = torch.randn(2, 8, 1, 1)
    k_in = block.make_kernel_in(code.flatten(1)).view(2, 3, 3, 5)
    k_out = block.make_kernel_out(code.flatten(1)).view(2, 3, 3, 4)
    outer = torch.einsum("nabo,nabi->naboi", k_out, k_in)
    mixed_in = torch.einsum("nabop,ip->nabio", outer, block.kernel_linear_in.weight)
    mixed_in = mixed_in + block.kernel_linear_in.bias[:, None]
    expected = torch.einsum("nabiq,oq->noiab", mixed_in, block.kernel_linear_out.weight)
    expected = expected + block.kernel_linear_out.bias[None, :, None, None, None]
    assert torch.allclose(block(code), expected, atol=1e-5)


def test_a_saved_hyperstyle_is_the_released_layout_and_loads_back(tmp_path):
    """`save_hyperstyle`: the shared hypernetwork's tensors repeated under every tuned shared layer's head (the
    reference's keys, which `load_psp` checks equal), opts naming the W encoder's file and the generator's clamp (a
    converted StyleGAN2-ADA generator's `conv_clamp`, not a tensor), latent_avg; `load_psp` with that file gives the
    same network back, clamp included, and the W encoder found beside it by that name."""
    torch.manual_seed(0)
    net = HyperStyle(HyperStyleArchitecture(output_size=256, layers_to_tune=(0, 1)))
    net.set_latent_avg(torch.randn(512))
    net.decoder.set_conv_clamp(256.0)
    net.w_encoder_file = "domain_w_encoder.pt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in net.w_encoder.state_dict().items()}},
               tmp_path / "domain_w_encoder.pt")
    path = save_hyperstyle(net, tmp_path / "trained.pt", extra={"step": 7})
    ckpt = torch.load(path, weights_only=True)
    shared = {k[len("hypernet.shared_weight_hypernet."):] for k in ckpt["state_dict"]
              if k.startswith("hypernet.shared_weight_hypernet.")}
    assert shared == {"w1", "b1", "w2", "b2"}
    assert all(torch.equal(ckpt["state_dict"][f"hypernet.refinement_blocks.0.hypernet.{k}"],
                           ckpt["state_dict"][f"hypernet.shared_weight_hypernet.{k}"]) for k in shared)
    assert not any(k.startswith("hypernet.refinement_blocks.1.hypernet.") for k in ckpt["state_dict"])
    assert ckpt["opts"]["layers_to_tune"] == "0,1" and ckpt["opts"]["w_encoder_checkpoint_path"] == "domain_w_encoder.pt"
    assert ckpt["step"] == 7 and ckpt["latent_avg"].shape == (14, 512) and ckpt["opts"]["conv_clamp"] == 256.0
    assert ckpt["opts"]["encoder_input_size"] == 256   # an opt the reference ignores (its input is always 256)
    loaded = load_psp(path)
    assert loaded.arch == net.arch and loaded.w_encoder_file == "domain_w_encoder.pt"
    assert loaded.decoder.conv_clamp == 256.0
    state = net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(loaded.latent_avg, net.latent_avg)


def test_a_generator_of_channel_multiplier_1_gives_its_narrower_layers_own_heads_and_saves_its_multiplier(tmp_path):
    """A HyperStyle over a StyleGAN2-ADA generator of channel_base 16384 (`stylegan_channel_multiplier=1`): the 64 px
    layers (11, 12) are not 512->512, so they get heads of their own while the 512->512 ones keep the shared
    hypernetwork; the file records the multiplier (an opt the reference ignores) and loads back; without it the
    generator's width is one line naming the option."""
    torch.manual_seed(0)
    net = HyperStyle(HyperStyleArchitecture(output_size=256, layers_to_tune=(0, 11, 12), stylegan_channel_multiplier=1))
    assert net.hypernet.shared_layers == (0, 2, 3, 5, 6, 8, 9)
    heads = {name: type(head) for name, head in net.hypernet.refinement_blocks.items()}
    assert heads == {"0": SharedCodeHead, "11": LayerHead, "12": LayerHead}
    offsets = net.hypernet(torch.randn(1, 6, 256, 256))
    assert offsets[11].shape == (1, 256, 512, 3, 3) and offsets[12].shape == (1, 256, 256, 3, 3)
    net.set_latent_avg(torch.randn(512))
    net.w_encoder_file = "w.pt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in net.w_encoder.state_dict().items()}}, tmp_path / "w.pt")
    path = save_hyperstyle(net, tmp_path / "narrow.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["opts"]["stylegan_channel_multiplier"] == 1 and "conv_clamp" not in ckpt["opts"]
    loaded = load_psp(path)
    assert loaded.arch == net.arch and all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.decoder.conv_clamp is None, "a file without the clamp loads unclamped"

    del ckpt["opts"]["stylegan_channel_multiplier"]   # read as a released file: config-f
    torch.save(ckpt, tmp_path / "unsaid.pt")
    with pytest.raises(CheckpointError, match=r"generator has channel multiplier 1 \(its 64 px layers' width\), the "
                                              r"opts' stylegan_channel_multiplier \(2 when absent\) is 2$"):
        load_psp(tmp_path / "unsaid.pt")
    with pytest.raises(InputError, match="stylegan_channel_multiplier must be in 1..4, got 0"):
        HyperStyleArchitecture(output_size=256, stylegan_channel_multiplier=0)

