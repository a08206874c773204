"""Ray Data inversion throughput against a plain in-process loop over the same rows, model and batch size.

Both paths run the stage's own `Inverter` (decode, encode, generate, L2/LPIPS, PNG encode) on the
same shard rows; "warm" throughput leaves out the first batch of each (actor start, model load).
Run: python benchmarks/bench_invert.py [--images 96] [--batch-size 8] [--output-size 64] [--encoder-size 64]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware  # noqa: E402

from pipelines.invert import InvertConfig, Inverter, input_units, inverted, rows_dataset, tag_shard_unit  # noqa: E402
from pipelines.shard import ShardConfig, write_shards  # noqa: E402
from psp_core import PSP, PSPArchitecture, save_psp  # noqa: E402


def make_inputs(root: Path, images: int) -> Path:
    folder = root / "aligned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
    write_shards(ShardConfig(input_dir=str(folder), output_dir=str(root / "shards"),
                             report=str(root / "shard.json"), rows_per_shard=images, test_fraction=0.0))
    return root / "shards"


def warm_rate(batches, rows_of) -> tuple[float, int]:
    """Images/s after the first batch, and the rows counted."""
    start, rows = None, 0
    for batch in batches:
        if start is None:
            start = time.perf_counter()
            continue
        rows += rows_of(batch)
    return rows / (time.perf_counter() - start), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-size", type=int, default=64)
    parser.add_argument("--encoder-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="torch threads of the loop and of the one Ray actor")
    args = parser.parse_args()
    print(f"# {hardware()}\n# {command_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_inputs(root, args.images)
        torch.manual_seed(0)
        net = PSP(PSPArchitecture(output_size=args.output_size, encoder_input_size=args.encoder_size))
        net.set_latent_avg(torch.randn(512) * 0.1)
        checkpoint = save_psp(net, root / "model.pt")
        cfg = InvertConfig(model=str(checkpoint), input=shards, output_dir=root / "out", batch_size=args.batch_size,
                           cpus_per_actor=args.cpus, lpips_backbone="random", reconstructions=True)

        torch.set_num_threads(args.cpus)
        inverter = Inverter(str(checkpoint), cfg.model_dump(mode="json"), "bench")
        table = tag_shard_unit(pq.read_table(sorted(shards.glob("*.parquet")))
                               .append_column("path", pa.array([str(shards / "shard-00000.parquet")] * args.images)))
        loop_batches = (inverter(table.slice(i, args.batch_size)) for i in range(0, table.num_rows, args.batch_size))
        loop_rate, loop_rows = warm_rate(loop_batches, lambda t: t.num_rows)
        print(f"plain loop (Inverter in-process, {args.cpus} threads): {loop_rate:.2f} images/s over {loop_rows} warm rows")

        import ray

        ray.init(num_cpus=args.cpus + 2, include_dashboard=False, log_to_driver=False)
        dataset = inverted(cfg, rows_dataset(cfg, input_units(cfg)), checkpoint, "bench")
        ray_rate, ray_rows = warm_rate(dataset.iter_batches(batch_size=args.batch_size, batch_format="pyarrow"),
                                       lambda t: t.num_rows)
        ray.shutdown()
        print(f"Ray Data (1 actor, {args.cpus} CPUs, ActorPoolStrategy): {ray_rate:.2f} images/s over {ray_rows} warm rows")
        print(f"ratio Ray / loop: {ray_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
