"""Ray Data inversion throughput against a plain in-process loop over the same rows, model and batch size.

Both paths run the stage's own `Inverter` (decode, encode, generate, L2/LPIPS, PNG encode) on the
same shard rows. Warm throughput is marginal: each path runs on a small and a large set of rows,
and (large - small) rows / (large - small) seconds cancels the one-off costs (Ray Data start-up,
actor start, model load), which the cold end-to-end figures include. The loop's process is warmed
once first (the Ray actor is a new process on every run, so both of its runs pay the same warm-up).
Then the same warm loop with a ReStyle-pSp encoder for each `--iters` (refinement steps), the cost
of ReStyle's quality per image.
Both paths use the stage's `precision` and `compile` switches; with `--compile true` the loop's warm-up
compiles (and fills the persistent compile cache) and the Ray actor loads the compiled graphs from it.
Run: python benchmarks/bench_invert.py [--small 16] [--large 80] [--batch-size 8] [--output-size 64]
     [--encoder-size 64] [--precision auto] [--compile auto] [--iters 1 3 5]
     e.g. at 1024 px, compiled bf16: --output-size 1024 --encoder-size 256 --batch-size 2 --small 4 --large 20
     --precision bf16 --compile true --iters
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware  # noqa: E402

from pipelines.params.schema import InvertConfig  # noqa: E402
from pipelines.services.ray.cluster import ResourceRequest, connect  # noqa: E402
from pipelines.services.storage import StageInput  # noqa: E402
from pipelines.stages.invert import input_units, inverted  # noqa: E402
from pipelines.stages.invert_actor import Inverter, read_unit  # noqa: E402
from pipelines.stages.shard import ShardConfig, write_shards  # noqa: E402
from psp_core import PSP, PSPArchitecture, save_psp  # noqa: E402
from psp_core.runtime.devices import keep_freed_memory  # noqa: E402


def make_inputs(root: Path, images: int, rows_per_shard: int) -> Path:
    """`images` random 256x256 PNGs in shards of `rows_per_shard` rows."""
    folder = root / f"aligned-{images}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
        (folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
    shards = root / f"shards-{images}"
    write_shards(ShardConfig(input_dir=str(folder), output_dir=str(shards), report=str(root / "shard.json"),
                             rows_per_shard=rows_per_shard, test_fraction=0.0))
    return shards


def loop_seconds(cfg: InvertConfig, checkpoint: Path) -> float:
    """Load the model and invert every row in a plain loop over batches, in this process."""
    start = time.perf_counter()
    inverter = Inverter(str(checkpoint), cfg.model_dump(mode="json"), "bench")
    for path in sorted(cfg.input.glob("*.parquet")):
        item = pa.table({"unit": [path.stem], "paths": [[str(path)]]})
        table = read_unit(item, shards=True, split=None, columns=["id", "image", "source_path", "split"])
        for offset in range(0, table.num_rows, cfg.batch_size):
            inverter(table.slice(offset, cfg.batch_size))
    return time.perf_counter() - start


def ray_seconds(cfg: InvertConfig, checkpoint: Path) -> float:
    """The stage's Ray Data pipeline over every row (actor pool of one), consumed to the end."""
    start = time.perf_counter()
    source = StageInput.of(cfg.input)
    for _ in inverted(cfg, source, input_units(cfg, source), checkpoint, "bench"):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--large", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-size", type=int, default=64)
    parser.add_argument("--encoder-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="torch threads of the loop and of the one Ray actor")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="the stage's precision")
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto", help="the stage's compile")
    parser.add_argument("--iters", type=int, nargs="*", default=[1, 3, 5],
                        help="ReStyle refinement steps to time (none: skip the ReStyle rows)")
    args = parser.parse_args()
    keep_freed_memory()   # as a stage's process has it before its first model (this one builds the test model first)
    print(f"# {hardware()}; load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}\n# {command_line()}")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        net = PSP(PSPArchitecture(output_size=args.output_size, encoder_input_size=args.encoder_size))
        net.set_latent_avg(torch.randn(512) * 0.1)
        checkpoint = save_psp(net, root / "model.pt")
        torch.set_num_threads(args.cpus)
        connect(ResourceRequest("invert", 1, args.cpus, 0))   # the stage's own Ray start (the workers' environment included)
        seconds = {}
        switches = {"precision": args.precision, "compile": args.compile if args.compile == "auto" else args.compile == "true"}
        warmup = InvertConfig(model=str(checkpoint), input=make_inputs(root, args.batch_size, 100),
                              output_dir=root / "out", batch_size=args.batch_size, lpips_backbone="random", **switches)
        loop_seconds(warmup, checkpoint)   # oneDNN primitives are cached per process: warm the loop's first
        for n in (args.small, args.large):
            cfg = InvertConfig(model=str(checkpoint), input=make_inputs(root, n, 100), output_dir=root / "out",
                               batch_size=args.batch_size, cpus_per_actor=args.cpus, lpips_backbone="random",
                               **switches)
            seconds[n] = {"loop": loop_seconds(cfg, checkpoint), "ray": ray_seconds(cfg, checkpoint)}
            print(f"{n:4d} images: loop {seconds[n]['loop']:.1f} s ({n / seconds[n]['loop']:.2f} images/s cold), "
                  f"Ray Data {seconds[n]['ray']:.1f} s ({n / seconds[n]['ray']:.2f} images/s cold)", flush=True)
        ray.shutdown()
        extra = args.large - args.small
        warm = {k: extra / (seconds[args.large][k] - seconds[args.small][k]) for k in ("loop", "ray")}
        print(f"warm (marginal {extra} images): plain loop {warm['loop']:.2f} images/s, "
              f"Ray Data {warm['ray']:.2f} images/s, ratio Ray / loop {warm['ray'] / warm['loop']:.2f}")
        if args.iters:
            refinement_rates(args, root)


def refinement_rates(args: argparse.Namespace, root: Path) -> None:
    """Warm images/s of the in-process loop with a ReStyle-pSp encoder (BackboneEncoder, 6 channels)
    at each number of refinement steps, and the ratio to one step."""
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=6,
                              output_size=args.output_size, encoder_input_size=args.encoder_size))
    net.set_latent_avg(torch.randn(net.n_styles, 512) * 0.1)
    checkpoint = save_psp(net, root / "restyle.pt")
    inputs = {n: root / f"shards-{n}" for n in (args.small, args.large)}
    rates = {}
    for n_iters in args.iters:
        cfgs = {n: InvertConfig(model=str(checkpoint), input=path, output_dir=root / "out", n_iters=n_iters,
                                batch_size=args.batch_size, lpips_backbone="random") for n, path in inputs.items()}
        seconds = {n: loop_seconds(cfg, checkpoint) for n, cfg in cfgs.items()}
        rates[n_iters] = (args.large - args.small) / (seconds[args.large] - seconds[args.small])
        print(f"ReStyle-pSp, {n_iters} refinement step(s): {rates[n_iters]:.2f} images/s warm "
              f"({rates[n_iters] / rates[args.iters[0]]:.2f}x of {args.iters[0]} step)", flush=True)


if __name__ == "__main__":
    main()
