"""Loading a checkpoint: `load_psp` (the network built on the meta device, the file's tensors made its own) against
the same file loaded the usual way (the network built with its random initialisation, then the file's tensors copied
in), in one process. Both load the same file, written once (a default-architecture pSp: 1024 px generator, 256 px
GradualStyleEncoder, 1.2 GB) into a temporary folder.

Run: python benchmarks/bench_load.py [--iters 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, time_per_call  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psp_core import PSPArchitecture, load_psp  # noqa: E402
from psp_core.nets.checkpoint_io import read_checkpoint, sub_state  # noqa: E402
from psp_core.nets.checkpoints import save_psp  # noqa: E402
from psp_core.nets.psp import PSP  # noqa: E402


def initialise_then_copy(path: Path) -> PSP:
    """The baseline: a randomly initialised network, the file's tensors copied into it."""
    ckpt = read_checkpoint(path)
    net = PSP(PSPArchitecture.from_opts(ckpt["opts"], has_latent_avg=True))
    net.encoder.load_state_dict(sub_state(ckpt["state_dict"], "encoder"))
    net.decoder.load_state_dict(sub_state(ckpt["state_dict"], "decoder"))
    net.set_latent_avg(ckpt["latent_avg"])
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=5, help="timed loads of each kind (median reported)")
    args = parser.parse_args()
    print(f"# {hardware()}\n# {command_line()}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "psp.pt"
        with torch.no_grad():
            net = PSP(PSPArchitecture())
            net.set_latent_avg(torch.zeros(512))
        save_psp(net, path)
        expected = net.state_dict()
        del net
        loaded = load_psp(path)
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items()), "load_psp changed a tensor"
        del loaded, expected
        size_gb = path.stat().st_size / 1e9
        baseline = time_per_call(lambda: initialise_then_copy(path), args.iters)
        ours = time_per_call(lambda: load_psp(path), args.iters)
    print(f"{'file':>8} {'initialise + copy':>18} {'load_psp':>9} {'ratio':>6}")
    print(f"{size_gb:6.2f}GB {baseline:16.2f} s {ours:7.2f} s {baseline / ours:5.1f}x")


if __name__ == "__main__":
    main()
