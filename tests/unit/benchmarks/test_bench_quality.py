"""The quality benchmark's HyperStyle row (benchmarks/bench_quality.py): it runs only after the W encoder it is built
on, HyperStyle is built on that W encoder's file (at the run's sizes) and scored on its codes, and a setting that
cannot run is one line and exit 2. (pSp's and ReStyle's training through the benchmark: tests/e2e/test_quality.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_quality  # noqa: E402

from psp_core.errors import InputError  # noqa: E402
from psp_core.inference import InferenceModel  # noqa: E402
from psp_core.nets.checkpoints import save_psp  # noqa: E402

HYPERSTYLE = {"size": 64, "encoder_size": 64, "encoders": ("restyle_psp", "w_encoder", "hyperstyle")}


def test_hyperstyle_runs_after_its_w_encoder():
    cfg = bench_quality.QualityConfig(**HYPERSTYLE, channel_multiplier=1)
    assert [name for name in cfg.encoders if bench_quality.refines(name)] == ["restyle_psp", "hyperstyle"]
    with pytest.raises(InputError, match="list w_encoder before it"):
        bench_quality.QualityConfig(**{**HYPERSTYLE, "encoders": ("hyperstyle", "w_encoder")})
    with pytest.raises(InputError, match="--size must be one of 16, 32, 64, 256 for the seeded generator, got 128"):
        bench_quality.QualityConfig(**{**HYPERSTYLE, "size": 128})
    with pytest.raises(InputError, match="--channel-multiplier must be >= 1"):
        bench_quality.QualityConfig(**HYPERSTYLE, channel_multiplier=0)
    with pytest.raises(InputError, match="--channel-multiplier must be at most 4"):
        bench_quality.QualityConfig(**HYPERSTYLE, channel_multiplier=5)
    with pytest.raises(InputError, match="--restyle-iters at most 20"):
        bench_quality.QualityConfig(**HYPERSTYLE, restyle_iters=21)
    assert "hyperstyle" not in bench_quality.QualityConfig().encoders   # the default run stays at 32 px


def test_hyperstyle_is_built_on_the_w_encoders_file_and_scored_on_its_codes(tmp_path):
    """A 64 px generator of channel multiplier 1, a W encoder saved as the benchmark saves it, HyperStyle built on
    both (at the run's 64 px input): at each of its 2 iterations it decodes the W encoder's own codes, so the codes'
    figures are the W encoder's and the images differ by the offsets."""
    cfg = bench_quality.QualityConfig(**HYPERSTYLE, channel_multiplier=1, val_images=2)
    known = bench_quality.known_generator(cfg.size, seed=0, checkpoint=None, channel_multiplier=1)
    generator = bench_quality.write_generator(known, tmp_path / "generator.pt")
    torch.manual_seed(0)
    spec = bench_quality.ENCODERS["w_encoder"]
    w_net = bench_quality.build_encoder(spec, bench_quality.benchmark_preset(spec), cfg, generator, tmp_path / "none")
    save_psp(w_net, tmp_path / "w_encoder.pt")
    spec = bench_quality.ENCODERS["hyperstyle"]
    net = bench_quality.build_encoder(spec, bench_quality.benchmark_preset(spec), cfg, generator,
                                      tmp_path / "w_encoder.pt")
    assert net.w_encoder_file == "w_encoder.pt" and net.arch.encoder_input_size == 64

    pixels = bench_quality.to_uint8(bench_quality.render(known, bench_quality.sample_codes(known, 2, 1, False)))
    codes = bench_quality.sample_codes(known, 2, 1, False)
    evaluation = bench_quality.evaluate(InferenceModel(net, spec.preset, "cpu", "fp32"), pixels, codes, n_iters=2)
    w_only = bench_quality.evaluate(InferenceModel(w_net, "w_encode", "cpu", "fp32"), pixels, codes, n_iters=1)
    assert len(evaluation.per_iter) == 2
    for scores in evaluation.per_iter:
        for key in ("latent_mse", "style_variance", "edit_transfer"):
            assert scores[key] == pytest.approx(w_only.last[key], rel=1e-5), key
    assert not torch.equal(evaluation.previews[0], w_only.previews[0])   # the offsets change the image


def test_a_setting_that_cannot_run_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), "--encoders", "hyperstyle",
                           "--json", str(tmp_path / "q.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "hyperstyle refines a trained W encoder's codes; list w_encoder before it" in done.stderr
    assert not (tmp_path / "q.json").exists()
