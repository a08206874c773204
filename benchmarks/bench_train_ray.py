"""Training throughput: the single-process engine against `psp train` on Ray with 1 and 2 workers,
same model, data and global batch (the Ray + DDP overhead as a ratio).

Ray figures are the `images_per_s` the run logs for its last logging window (steady state: the
first window holds start-up); the single-process figure leaves out the first step likewise.
With `--compile`, instead: `psp train` with 2 workers in bf16, eager, then `compile: true` twice with one
fresh cache folder (each run new Ray Train workers): the first run's workers compile cold, the second's
load every compiled graph from the cache, which it must leave as it found it.
Run: python benchmarks/bench_train_ray.py [--steps 12] [--global-batch 4] [--output-size 32] [--encoder-size 64]
     [--compile]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.pipelines import make_shards  # noqa: E402
from pipelines.stages.train import TrainConfig, resolve_paths, train  # noqa: E402
from psp_core import build_psp  # noqa: E402
from psp_core.data.presets import PresetTransform, get_preset  # noqa: E402
from psp_core.data.shards import iter_shard_batches, shard_paths  # noqa: E402
from psp_core.training.engine import Trainer, prepare_for_training  # noqa: E402
from psp_core.training.losses import PSPLoss  # noqa: E402


def single_process(cfg: TrainConfig, threads: int) -> float:
    """Images/s of the engine in this process, steps 2..N."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset = get_preset(cfg.preset).with_loss(**cfg.loss)
    net = build_psp(cfg.architecture(preset.input_nc))
    prepare_for_training(net, cfg.train_decoder)
    trainer = Trainer(net, PSPLoss(preset.loss, lpips_backbone="random"), cfg.training(),
                      batch_transform=PresetTransform(preset, cfg.encoder_input_size))
    batches = [torch.from_numpy(b.images).permute(0, 3, 1, 2)
               for b in iter_shard_batches(shard_paths(cfg.shards), cfg.batch_size, split="train")]
    batches = [b for b in batches if len(b) == cfg.batch_size]
    start = None
    for step in range(cfg.max_steps):
        images = batches[step % len(batches)]
        source, target = trainer.prepare_batch((images, images))
        trainer.train_step(source, target)
        if step == 0:
            start = time.perf_counter()
    return cfg.batch_size * (cfg.max_steps - 1) / (time.perf_counter() - start)


def ray_run(cfg: TrainConfig) -> float:
    """Steady-state images/s logged by a `psp train` run."""
    import ray

    summary = train(cfg)
    ray.shutdown()
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "images_per_s")
    return sorted(history, key=lambda m: m.step)[-1].value


def compiled_graphs(cache: Path) -> set[str]:
    """The compiled graphs inductor has stored in a cache folder (one entry per graph key)."""
    return {str(p.relative_to(cache)) for p in cache.glob("fxgraph/*/*/*")}


def compile_runs(base: dict, root: Path, global_batch: int, cpus: int) -> None:
    """2-worker bf16 `psp train`: eager, then compiled with a cold and with a warm cache folder; wall seconds,
    steady images/s and the compiled graphs in the cache after each run."""
    cache = root / "compile-cache"
    eager_rate = None
    for label, compiled in (("eager", False), ("compiled, cold cache", True), ("compiled, warm cache", True)):
        cfg = TrainConfig(**base, batch_size=global_batch // 2, num_workers=2, cpus_per_worker=cpus / 2,
                          precision="bf16", compile=compiled, compile_cache=str(cache), run_name=label.replace(" ", "-"))
        start = time.perf_counter()
        rate = ray_run(resolve_paths(cfg))
        seconds = time.perf_counter() - start
        eager_rate = eager_rate or rate
        print(f"psp train, 2 workers x {cpus // 2} CPU, bf16, {label}: {seconds:.0f} s wall, {rate:.2f} images/s "
              f"({rate / eager_rate:.2f} of eager), {len(compiled_graphs(cache))} compiled graphs in the cache",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--output-size", type=int, default=32)
    parser.add_argument("--encoder-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="time eager vs compiled (cold, then warm cache) runs")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    print(f"# {hardware()}\n# {command_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_shards(root, images=24, test_fraction=0.0)
        os.chdir(root)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        base = dict(preset="encode", loss={"id_lambda": 0.0}, shards=root / "shards", lpips_backbone="random",
                    output_size=args.output_size, encoder_input_size=args.encoder_size, train_decoder=True,
                    max_steps=args.steps, log_interval=args.steps // 2, image_interval=10 ** 6,
                    val_interval=10 ** 6, save_interval=args.steps, storage_path=str(root / "ray"))
        if args.compile:
            compile_runs(base, root, args.global_batch, cpus)
            return
        one = TrainConfig(**base, batch_size=args.global_batch)
        rate = single_process(resolve_paths(one), cpus)
        print(f"single process (engine, {cpus} threads, batch {args.global_batch}): {rate:.2f} images/s")
        results = {}
        for workers in (1, 2):
            cfg = TrainConfig(**base, batch_size=args.global_batch // workers, num_workers=workers,
                              cpus_per_worker=cpus / workers, run_name=f"bench-{workers}")
            results[workers] = ray_run(resolve_paths(cfg))
            print(f"psp train, {workers} worker(s) x {cpus // workers} CPU, batch {cfg.batch_size} each: "
                  f"{results[workers]:.2f} images/s ({results[workers] / rate:.2f} of single process)")
        print(f"2 workers / 1 worker: {results[2] / results[1]:.2f}")


if __name__ == "__main__":
    main()
