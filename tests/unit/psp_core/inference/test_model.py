"""The inference model's own behaviour beside its families' (tests/unit/psp_core/nets/test_families.py): a generator
that decodes in place of the model's own is made ready as the model's is."""
from __future__ import annotations

import copy

import torch
from torch._dynamo.eval_frame import OptimizedModule

from psp_core import PSP, PSPArchitecture
from psp_core.inference import InferenceModel
from psp_core.nets.stylegan2 import Generator


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
