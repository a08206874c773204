"""How far the fast paths (bf16 autocast, torch.compile) move outputs from fp32 eager, on the parity
fixtures' networks (weights by the fixtures' rule, inputs from the fixtures).

For each network and mode: max and mean absolute image difference, the latent's relative error
(||latent - latent_fp32|| / ||latent_fp32||), and whether the images and latents stay within the
parity fixtures' tolerance of fp32 eager (max|diff| <= 1e-4 * max(1, max|fp32|)). ReStyle networks
run the fixtures' 4 refinement iterations; the last is compared (errors grow along the loop).
Run: python benchmarks/bench_accuracy.py [--networks ...] [--modes bf16 compiled_fp32 compiled_bf16] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from common import command_line, hardware, write_json  # noqa: E402

from helpers.parity import (  # noqa: E402
    FIXTURES,
    HYPERSTYLE,
    rule_state_dict,
    write_released_family,
    write_released_hyperstyle,
    write_released_psp,
)
from psp_core import Generator, load_psp, refine, refine_hyperstyle  # noqa: E402
from psp_core.inference import compile_networks  # noqa: E402
from psp_core.runtime.devices import autocast, compile_model, use_ieee_fp32  # noqa: E402

NETWORKS = ("ref_stylegan2_64", "ref_gradual64", "ref_e4e64", "ref_restyle_psp64", "ref_restyle_e4e64", HYPERSTYLE)
MODES = {"bf16": ("bf16", False), "compiled_fp32": ("fp32", True), "compiled_bf16": ("bf16", True)}
"""Mode name -> (precision, compiled)."""
RESTYLE_ITERATIONS = 4
HYPERSTYLE_ITERATIONS = 3

Run = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""One forward of a fixture network on the fixture's input: (images [N, 3, 64, 64], latents [N, 10, 512])."""


def fixture_run(name: str, device: torch.device, compiled: bool, folder: Path, cache_dir: Path | None) -> Run:
    """The fixture network `name` on `device` (its encoder and generator compiled when `compiled`), as a
    call on the fixture's own input."""
    inputs = np.load(FIXTURES / f"{name}.npz")
    if name == "ref_stylegan2_64":
        generator = Generator(64, 512, 8).eval()
        generator.load_state_dict(rule_state_dict(name))
        generator = generator.to(device)
        model = compile_model(generator, cache_dir) if compiled else generator
        z = torch.from_numpy(inputs["z"]).to(device)
        return lambda: model([z], randomize_noise=False, return_latents=True)
    path = folder / f"{name}.pt"
    if name == HYPERSTYLE:
        write_released_hyperstyle(path, folder / "faces_w_encoder.pt")
    elif name == "ref_gradual64":
        write_released_psp(path)
    else:
        write_released_family(name, path)
    net = load_psp(path, device)
    if compiled:
        compile_networks(net, cache_dir)
    x = torch.from_numpy(inputs["input"]).to(device)
    if name == HYPERSTYLE:
        return lambda: refine_hyperstyle(net, x, HYPERSTYLE_ITERATIONS)[-1]
    if name.startswith("ref_restyle"):
        return lambda: refine(net, x, RESTYLE_ITERATIONS)[-1]
    return lambda: net(x, resize=False, randomize_noise=False, return_latents=True)


def run_in(run: Run, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`run` under `precision` autocast, outputs as fp32 on the CPU."""
    with torch.inference_mode(), autocast(device, precision):
        image, latent = run()
    return image.float().cpu(), latent.float().cpu()


def within_parity(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """The fixtures' tolerance, with fp32 eager as the reference."""
    return float((ours - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def accuracy_row(name: str, mode: str, fp32: tuple[torch.Tensor, torch.Tensor],
                 ours: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The errors of `ours` (image, latent) against fp32 eager."""
    (ref_image, ref_latent), (image, latent) = fp32, ours
    diff = (image - ref_image).abs()
    return {"network": name, "mode": mode, "image_max_abs": float(diff.max()), "image_mean_abs": float(diff.mean()),
            "image_range": [float(ref_image.min()), float(ref_image.max())],
            "latent_rel_error": float((latent - ref_latent).norm() / ref_latent.norm()),
            "within_parity_tolerance": within_parity(image, ref_image) and within_parity(latent, ref_latent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="compile cache folder (default: the project's, see psp_core.runtime.devices.compile_cache_dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    use_ieee_fp32()
    print(f"# {hardware()}; device {device}\n# {command_line()}")
    print(f"{'network':18s} {'mode':14s} {'image max':>10s} {'image mean':>10s} {'latent rel':>10s}  parity tol  image range")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.networks:
            fp32 = run_in(fixture_run(name, device, False, Path(tmp), None), device, "fp32")
            for mode in args.modes:
                precision, compiled = MODES[mode]
                ours = run_in(fixture_run(name, device, compiled, Path(tmp), args.compile_cache), device, precision)
                row = accuracy_row(name, mode, fp32, ours)
                rows.append(row)
                low, high = row["image_range"]
                print(f"{name:18s} {mode:14s} {row['image_max_abs']:10.2e} {row['image_mean_abs']:10.2e} "
                      f"{row['latent_rel_error']:10.2e}  {'yes' if row['within_parity_tolerance'] else 'no':10s}  "
                      f"[{low:.2f}, {high:.2f}]", flush=True)
                torch.compiler.reset()   # each compiled network starts from a clean slate (the disk cache stays)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
