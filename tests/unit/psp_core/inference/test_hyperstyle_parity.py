"""HyperStyle's inversion loop against the reference's `run_inversion` (shared/parity `ref_hyperstyle256`): the released
checkpoint and its W encoder load strictly, and every iteration's image and weight offsets match.

The fixture network is the reference's at 256 px (a 512-channel generator, a ResNet-34 hypernetwork, a 512 MB shared
hypernetwork): its three iterations take about half a minute on two cores, the other tests here a few seconds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.parity import (  # no_grad, reference_form_only: this module's autouse fixtures
    DEVICE,
    HYPERSTYLE,
    fixture,
    fixture_meta,
    no_grad,  # noqa: F401
    on_device,
    parity_errors,
    reference_form_only,  # noqa: F401
    write_released_hyperstyle,
)
from psp_core import HyperStyle, load_psp
from psp_core.inference import InferenceModel, Inversion, hyperstyle_steps, initial_inversion


@pytest.fixture(scope="module")
def hyperstyle_file(tmp_path_factory):
    """The fixture's HyperStyle checkpoint, its W encoder beside it under the name its opts give."""
    folder = tmp_path_factory.mktemp("hyperstyle")
    return write_released_hyperstyle(folder / "hyperstyle_ffhq.pt", folder / "faces_w_encoder.pt")


@pytest.fixture(scope="module")
def net(hyperstyle_file) -> HyperStyle:
    with torch.no_grad():
        return load_psp(hyperstyle_file, DEVICE)


def step_pairs(steps, ref: dict[str, np.ndarray], layers: list[int], batch: slice = slice(None)):
    """(name, ours, ref) for each iteration's image and each tuned layer's offset norms and corners."""
    pairs = []
    for t, step in enumerate(steps):
        pairs.append((f"image_{t}", step.images, ref[f"image_{t}"][batch]))
        for j in layers:
            offsets = step.offsets[j]
            pairs += [(f"delta_{t}_{j}_norm", offsets.flatten(1).norm(dim=1), ref[f"delta_{t}_{j}_norm"][batch]),
                      (f"delta_{t}_{j}_corner", offsets[:, :4, :4], ref[f"delta_{t}_{j}_corner"][batch])]
    return pairs


def test_hyperstyle_every_iteration(net):
    """load_psp finds the W encoder beside the checkpoint; the W code, the codes, the initial image, then every
    iteration's image and accumulated offsets (norm and corner of each tuned layer) are the reference's."""
    ref, meta = fixture(HYPERSTYLE), fixture_meta(HYPERSTYLE)
    layers = [int(i) for i in meta["config"]["layers_to_tune"].split(",")]
    assert (net.arch.family, net.arch.encoder_type, net.arch.output_size) == ("hyperstyle",
                                                                              "SharedWeightsHyperNetResNet", 256)
    assert net.arch.layers_to_tune == tuple(layers) and net.arch.n_hypernet_outputs == meta["n_hypernet_outputs"]
    x = on_device(ref["input"])
    initial_image, codes = initial_inversion(net, x)
    pairs = [("w_encoder_out", net.w_encoder(x), ref["w_encoder_out"]), ("codes", codes, ref["codes"]),
             ("initial_image", initial_image, ref["initial_image"])]
    steps = hyperstyle_steps(net, x, meta["n_iters"])
    assert len(steps) == meta["n_iters"]
    assert all(torch.equal(step.latents, codes) for step in steps)   # the codes stay the W encoder's
    assert [j for j, offsets in enumerate(steps[0].offsets) if offsets is not None] == layers
    failures = parity_errors(pairs + step_pairs(steps, ref, layers))
    assert not failures, "; ".join(failures)


def test_offsets_forced_to_zero_fail_the_comparison(net, monkeypatch):
    """The comparison sees the offsets: with the hypernetwork's offsets zeroed, W * (1 + 0) is the plain generator,
    the first iteration's image is the initial image, and it is far outside the reference's image_0."""
    ref, meta = fixture(HYPERSTYLE), fixture_meta(HYPERSTYLE)
    layers = [int(i) for i in meta["config"]["layers_to_tune"].split(",")]
    real = HyperStyle.weight_offsets
    monkeypatch.setattr(HyperStyle, "weight_offsets", lambda self, x, last: [
        None if o is None else torch.zeros_like(o) for o in real(self, x, last)])
    x = on_device(ref["input"][:1])
    steps = hyperstyle_steps(net, x, 1)
    failures = parity_errors(step_pairs(steps, ref, layers, slice(0, 1)))
    assert any(f.startswith("image_0:") for f in failures), failures
    assert sum(f.startswith("delta_0_") for f in failures) == 2 * len(layers), failures
    assert not parity_errors([("initial_image", steps[0].images, ref["initial_image"][:1])])


def test_inference_model_inverts_and_decodes_with_the_offsets(net):
    """InferenceModel runs HyperStyle's iterations (the images the reference makes) and keeps the offsets, with which
    `decode` gives the same images back; without them, the W encoder's image."""
    ref = fixture(HYPERSTYLE)
    model = InferenceModel(net, preset="encode", device=DEVICE)
    assert model.iterative and model.n_styles == 14
    x = on_device(ref["input"][:1])
    inversions = model.invert(x, n_iters=1)
    assert len(inversions) == 1 and isinstance(inversions[0], Inversion)
    inversion = inversions[0]
    assert len(inversion.offsets) == 20 and inversion.offsets[14].shape == (1, 256, 512, 3, 3)
    failures = parity_errors([("image_0", inversion.images, ref["image_0"][:1]),
                              ("codes", inversion.latents, ref["codes"][:1])])
    assert not failures, "; ".join(failures)
    assert torch.equal(model.decode(inversion.latents, inversion.offsets), inversion.images)
    assert not parity_errors([("initial_image", model.decode(inversion.latents), ref["initial_image"][:1])])
    assert not InferenceModel(net, preset="encode", device=DEVICE, precision="bf16").channels_last, \
        "HyperStyle keeps the contiguous layout where the eager bf16 rule gives a pSp channels-last weights"
