"""The inference model's own behaviour beside its families' (tests/unit/psp_core/nets/test_families.py): a generator
that decodes in place of the model's own is made ready as the model's is; the weight layout follows the measured
rule (channels-last for eager bf16 on a CPU only) and leaves the function as it was."""
from __future__ import annotations

import copy

import torch
from torch._dynamo.eval_frame import OptimizedModule

from psp_core import PSP, PSPArchitecture
from psp_core.inference import InferenceModel
from psp_core.nets.stylegan2 import Generator
from psp_core.runtime.devices import inference_channels_last


def conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The 4-D parameters whose two layouts differ (a 1x1 kernel or a single channel is laid out alike in both)."""
    return [p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


def all_channels_last(module: torch.nn.Module) -> bool:
    weights = conv_weights(module)
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                 for w in weights)


def test_the_weight_layout_is_channels_last_for_eager_bf16_on_a_cpu_only():
    assert inference_channels_last("cpu", "bf16", compiled=False)
    assert not inference_channels_last("cpu", "bf16", compiled=True)
    assert not inference_channels_last("cpu", "fp32", compiled=False)
    assert not inference_channels_last("cuda", "bf16", compiled=False)

    torch.manual_seed(0)
    net = PSP(PSPArchitecture(output_size=16, encoder_input_size=32))
    net.set_latent_avg(torch.randn(512) * 0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    chosen = InferenceModel(copy.deepcopy(net), device="cpu", precision="bf16")
    assert chosen.channels_last and all_channels_last(chosen.net.encoder) and all_channels_last(chosen.net.decoder)
    other = chosen.prepared_generator(Generator(16))
    assert all_channels_last(other), "a replacement generator takes the model's layout"
    contiguous = InferenceModel(copy.deepcopy(net), device="cpu", precision="bf16", channels_last=False)
    fp32 = InferenceModel(copy.deepcopy(net), device="cpu", precision="fp32")
    for model in (contiguous, fp32):
        assert not model.channels_last and all(w.is_contiguous() for w in conv_weights(model.net))
    # the same function in either layout: bf16 rounding apart, the images agree
    a, b = chosen.invert(x)[0].images.float(), contiguous.invert(x)[0].images.float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max(), float((a - b).abs().max())


def test_a_replacement_generator_decodes_in_eval_mode_and_is_compiled_when_the_model_is(tmp_path, monkeypatch):
    """Domain adaptation decodes the model's codes with another generator: `prepared_generator` puts it in eval mode
    on the model's device (its codes then decode as the generator itself makes them, not as the model's), and a
    compiled model compiles it too, as `compile_networks` does the model's own networks."""
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(output_size=16, encoder_input_size=32))
    other = Generator(16).train()
    codes = torch.randn(2, net.n_styles, 512)

    eager = InferenceModel(net, preset=None)
    prepared = eager.prepared_generator(copy.deepcopy(other))
    assert not prepared.training and not isinstance(prepared, OptimizedModule)
    with torch.no_grad():
        expected, _ = other.eval()([codes], input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(eager.decode(codes, generator=prepared), expected)
    assert not torch.allclose(eager.decode(codes), expected)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))   # compile_model sets it: restored after
    compiled = InferenceModel(copy.deepcopy(net), preset=None, compile=True, compile_cache=tmp_path / "inductor")
    assert isinstance(compiled.net.decoder, OptimizedModule)
    replacement = compiled.prepared_generator(copy.deepcopy(other))
    assert isinstance(replacement, OptimizedModule) and not replacement._orig_mod.training
