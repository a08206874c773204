"""`psp import-generator`: a StyleGAN2-ADA pickle becomes a generator file with its provenance beside it, never
over an existing file; every unusable pickle is one line and exit 2 with nothing written; a `.pkl` generator
setting is converted once per machine."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from helpers.ada import ada_generator, stylegan3_generator, write_network_pickle
from pipelines.cli import main
from pipelines.services.storage import converted as converted_module
from pipelines.services.storage.converted import converted_generator
from pipelines.services.storage.files import file_digest
from psp_core.nets.ada_generator import read_ada_generator
from psp_core.nets.checkpoints import read_generator_checkpoint


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_network_pickle(tmp_path_factory.mktemp("ada") / "network-snapshot-000200.pkl", ada_generator(seed=7))


def test_writes_the_generator_and_its_sidecar_and_never_overwrites(snapshot, tmp_path, capsys):
    out = tmp_path / "afhq.pt"
    assert main(["import-generator", str(snapshot), str(out)]) == 0
    assert "64 px, channel_base 16384, 10 styles, conv_clamp 256" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) == {"g_ema", "latent_avg", "conv_clamp"}
    expected = read_ada_generator(snapshot)
    assert all(torch.equal(ckpt["g_ema"][k], v) for k, v in expected.generator.state_dict().items())
    assert torch.equal(read_generator_checkpoint(out).latent_avg, expected.latent_avg)
    sidecar = json.loads((tmp_path / "afhq.pt.json").read_text())
    assert sidecar["source_sha256"] == file_digest(snapshot) and sidecar["network"] == "G_ema"
    assert sidecar["output_sha256"] == file_digest(out)
    assert sidecar["config"]["channel_base"] == 16384 and sidecar["config"]["conv_clamp"] == 256.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afhq.pt", "afhq.pt.json"]

    written = out.read_bytes()
    assert main(["import-generator", str(snapshot), str(out)]) == 2
    error = capsys.readouterr().err
    assert error == f"psp import-generator: error: {out} exists; pass --force to replace it\n"
    assert out.read_bytes() == written
    assert main(["import-generator", str(snapshot), str(out), "--force", "--network", "G"]) == 0
    assert json.loads((tmp_path / "afhq.pt.json").read_text())["network"] == "G"


def _pickle_of(kind: str, folder):
    path = folder / f"{kind}.pkl"
    small = dict(channel_base=1024, w_dim=8, mapping_layers=1)
    if kind == "truncated":
        full = write_network_pickle(folder / "full.pkl", ada_generator(**small))
        path.write_bytes(full.read_bytes()[:5000])
        full.unlink()
    elif kind == "other kind":
        path.write_bytes(pickle.dumps({"state_dict": {"w": [0.0] * 4}}))
    elif kind == "code":
        path.write_bytes(pickle.dumps({"G_ema": OpensAFile(folder / "created")}))
    elif kind == "stylegan3":
        write_network_pickle(path, stylegan3_generator())
    else:
        write_network_pickle(path, ada_generator(c_dim=10, **small))
    return path


class OpensAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated or not a network pickle"),
    ("other kind", "not a StyleGAN2-ADA network pickle: no 'G_ema' entry (found ['state_dict'])"),
    ("code", f"refuses to load global {open.__module__}.open"),
    ("stylegan3", "a StyleGAN3 (or other non-StyleGAN2) generator"),
    ("conditional", "a conditional generator (c_dim=10, class labels as input)"),
])
def test_an_unusable_pickle_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, kind, message):
    source = tmp_path / "in"
    source.mkdir()
    path = _pickle_of(kind, source)
    out = tmp_path / "out" / "g.pt"
    assert main(["import-generator", str(path), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"psp import-generator: error: {path}: {message}"), error
    assert error.count("\n") == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert sorted(p.name for p in source.iterdir()) == [path.name]      # the payload created nothing


def test_a_pkl_generator_setting_is_converted_once_per_machine(snapshot, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = converted_generator(snapshot, cache_dir=cache)
    assert first.suffix == ".pt" and first.is_relative_to(cache)
    assert torch.equal(read_generator_checkpoint(first).latent_avg, read_ada_generator(snapshot).latent_avg)
    monkeypatch.setattr(converted_module, "read_ada_generator",
                        lambda *a, **k: pytest.fail("converted again instead of reusing the cached file"))
    assert converted_generator(snapshot, cache_dir=cache) == first
    assert converted_generator(first, cache_dir=cache) == first          # a generator file passes as it is
