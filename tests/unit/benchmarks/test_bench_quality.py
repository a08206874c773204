"""The quality benchmark's settings (benchmarks/bench_quality.py): HyperStyle's row runs only where it can, at 256 px
after the W encoder it is built on, and a setting that cannot run is one line and exit 2 from its command line.
(The benchmark's training path itself runs in tests/e2e/test_quality.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_quality  # noqa: E402

from psp_core.errors import InputError  # noqa: E402

HYPERSTYLE = {"size": 256, "encoder_size": 256, "encoders": ("restyle_psp", "w_encoder", "hyperstyle")}


def test_hyperstyle_runs_at_256_px_after_its_w_encoder():
    cfg = bench_quality.QualityConfig(**HYPERSTYLE, channel_multiplier=1)
    assert cfg.encoders.index("w_encoder") < cfg.encoders.index("hyperstyle")
    assert bench_quality.REFINING == ("restyle_psp", "hyperstyle")
    with pytest.raises(InputError, match="list w_encoder before it"):
        bench_quality.QualityConfig(**{**HYPERSTYLE, "encoders": ("hyperstyle", "w_encoder")})
    with pytest.raises(InputError, match="needs --size 256 and --encoder-size 256"):
        bench_quality.QualityConfig(**{**HYPERSTYLE, "size": 64})
    with pytest.raises(InputError, match="needs --size 256 and --encoder-size 256"):
        bench_quality.QualityConfig(**{**HYPERSTYLE, "encoder_size": 64})
    with pytest.raises(InputError, match="--channel-multiplier must be >= 1"):
        bench_quality.QualityConfig(**HYPERSTYLE, channel_multiplier=0)
    assert "hyperstyle" not in bench_quality.QualityConfig().encoders   # the default run stays at 32 px


def test_a_setting_that_cannot_run_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), "--encoders", "hyperstyle",
                           "--json", str(tmp_path / "q.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--encoders hyperstyle needs --size 256" in done.stderr
    assert not (tmp_path / "q.json").exists()
