"""Training throughput of the encode preset (images/s, fp32 vs bf16, eager vs compiled) and where a step's time goes.

Runs the real engine step (`Trainer.train_step`: forward, the four-term loss, backward, Ranger) on
random weights (speed does not depend on their values), and, taking turns with it, each network
alone (forward plus backward at the same shapes) to give the share of the step spent in the
encoder, the generator, LPIPS and the identity network (the rest is the optimiser and glue).
With `--compile`, each precision also gets a compiled row (the engine's `compile: true`: the pSp
forward through torch.compile, the loss networks eager), timed in this same process after its
compile; every row's ratio is against the eager fp32 row of its configuration. The process's peak
resident memory (and on a GPU each row's peak device memory) is printed. `--modulation exact` times the
generator's modulated convolutions in the reference's grouped form instead of the fused one the trainer
switches to (the figure the fused form is measured against).

    python benchmarks/bench_train_step.py --configs tiny full --precisions fp32 bf16 --steps 3 --compile
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, write_json  # noqa: E402

from psp_core import IRSEBackbone, PSPArchitecture, build_psp  # noqa: E402
from psp_core.data.presets import PresetTransform, get_preset  # noqa: E402
from psp_core.nets.stylegan2 import use_exact_modulation  # noqa: E402
from psp_core.options import TrainingConfig  # noqa: E402
from psp_core.runtime.devices import autocast  # noqa: E402
from psp_core.training.engine import Trainer  # noqa: E402
from psp_core.training.losses import IdentityLoss, PSPLoss  # noqa: E402

CONFIGS = {
    "ffhq": PSPArchitecture(output_size=1024, encoder_input_size=256),   # the released FFHQ encoders' sizes
    "full": PSPArchitecture(output_size=256, encoder_input_size=256),
    "small": PSPArchitecture(output_size=64, encoder_input_size=64),
    "tiny": PSPArchitecture(output_size=16, encoder_input_size=64),
}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round_robin(fns: dict[str, Callable[[], object]], device: torch.device,
                      steps: int) -> tuple[dict[str, float], dict[str, float | None]]:
    """Median seconds of each function over `steps` rounds (after one warm-up round); the functions
    take turns within a round, so a change in machine load hits all of them alike. Also each function's peak
    GPU memory in MB above what was allocated when its call began (activations, gradients and optimiser
    temporaries; every row's networks stay resident together, so they are not counted); None off CUDA."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = {name: None for name in fns}
    for round_index in range(steps + 1):
        for name, fn in fns.items():
            synchronize(device)
            held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
            if round_index and device.type == "cuda":   # after the warm-up, which first allocates the optimiser state
                peaks[name] = max(peaks[name] or 0.0, (torch.cuda.max_memory_allocated(device) - held) / 2**20)
    return {name: statistics.median(values) for name, values in times.items()}, peaks


def step_functions(name: str, precision: str, compiled: bool, batch: int, device: torch.device,
                   exact: bool = False) -> dict[str, Callable[[], object]]:
    """The engine step of one configuration (`step_s`) and, eager only, each network's forward+backward alone
    at the step's shapes (`encoder`, `generator`, `lpips`, `identity`); `exact`: the generator in the reference's
    grouped modulation (the trainer itself takes the fused form)."""
    torch.manual_seed(0)
    arch = CONFIGS[name]
    net = build_psp(arch, mean_latent_samples=1000).to(device)
    preset = get_preset("encode")
    identity = IdentityLoss(IRSEBackbone().to(device))
    loss = PSPLoss(preset.loss, lpips_backbone="random", identity=identity).to(device)
    trainer = Trainer(net, loss, TrainingConfig(precision=precision, compile=compiled))
    use_exact_modulation(net, exact)
    photos = torch.rand(batch, 3, 256, 256)
    source, target = PresetTransform(preset, arch.encoder_input_size)(photos, photos, torch.Generator())
    source, target = source.to(device), target.to(device)
    step = {"step_s": lambda: trainer.train_step(source, target)}
    if compiled:
        return step
    with torch.no_grad():
        codes = net.encode(source)
        image = net(source)

    def encoder_pass():
        with autocast(device, precision):
            out = net.encoder(source)
        out.float().sum().backward()

    def generator_pass():
        latent = codes.clone().requires_grad_(True)
        with autocast(device, precision):
            out, _ = net.decoder([latent], input_is_latent=True)
            out = torch.nn.functional.adaptive_avg_pool2d(out, (256, 256))
        out.float().sum().backward()

    def lpips_pass():
        out = image.clone().requires_grad_(True)
        with autocast(device, precision):
            value = loss.lpips(out, target)
        value.float().backward()

    def identity_pass():
        out = image.clone().requires_grad_(True)
        with autocast(device, precision):
            value, _ = identity(out, target, source)
        value.float().backward()

    return {**step, "encoder": encoder_pass, "generator": generator_pass, "lpips": lpips_pass,
            "identity": identity_pass}


def main() -> None:
    """Parse options; per configuration, compile the compiled rows (timing each compile), then time every row
    in the same rounds, so the ratios against eager fp32 hold at whatever load the machine has; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "full"], choices=sorted(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--compile", action="store_true", help="also time each precision compiled")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modulation", choices=["fused", "exact"], default="fused",
                        help="the generator's modulated convolution: the trainer's fused form (default) or the "
                             "reference's grouped one")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    print("command:", command_line())
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"hardware: {hardware()}; device {device}; load average {load}")
    print("weights: random (LPIPS AlexNet, IR-SE50, encoder, generator); timing does not depend on them; "
          f"modulation: {args.modulation}")
    print(f"{'config':<6} {'enc in':>6} {'out':>4} {'prec':<5} {'mode':<8} {'batch':>5} {'img/s':>8} {'x fp32':>6} "
          f"{'step s':>8} {'step MB':>8}  share of step: encoder / generator / lpips / identity / rest | compile s")
    rows = [(precision, False) for precision in args.precisions]
    rows += [(precision, True) for precision in args.precisions] if args.compile else []
    if ("fp32", False) not in rows:
        rows.insert(0, ("fp32", False))   # the baseline every ratio is against
    table: list[dict] = []
    for name in args.configs:
        arch = CONFIGS[name]
        fns: dict[str, Callable[[], object]] = {}
        compile_s: dict[tuple[str, bool], float] = {}
        for precision, compiled in rows:
            row_fns = step_functions(name, precision, compiled, args.batch_size, device, args.modulation == "exact")
            if compiled:   # the first step compiles
                synchronize(device)
                start = time.perf_counter()
                row_fns["step_s"]()
                synchronize(device)
                compile_s[(precision, compiled)] = time.perf_counter() - start
            fns.update({f"{precision}/{compiled}/{part}": fn for part, fn in row_fns.items()})
        times, peaks = timed_round_robin(fns, device, args.steps)
        baseline = times["fp32/False/step_s"]
        for precision, compiled in rows:
            step_s = times[f"{precision}/{compiled}/step_s"]
            if compiled:
                detail = f"compiled in {compile_s[(precision, compiled)]:.0f} s"
            else:
                parts = [times[f"{precision}/{compiled}/{p}"] for p in ("encoder", "generator", "lpips", "identity")]
                detail = " / ".join(f"{100 * t / step_s:.0f}%" for t in [*parts, max(0.0, step_s - sum(parts))])
            peak = peaks[f"{precision}/{compiled}/step_s"]
            print(f"{name:<6} {arch.encoder_input_size:>6} {arch.output_size:>4} {precision:<5} "
                  f"{'compiled' if compiled else 'eager':<8} {args.batch_size:>5} {args.batch_size / step_s:>8.2f} "
                  f"{baseline / step_s:>6.2f} {step_s:>8.3f} {'-' if peak is None else f'{peak:.0f}':>8}  {detail}",
                  flush=True)
            table.append({"config": name, "encoder_input": arch.encoder_input_size, "output": arch.output_size,
                          "precision": precision, "compiled": compiled, "batch": args.batch_size,
                          "modulation": args.modulation, "device": str(device), "step_seconds": step_s,
                          "images_per_s": args.batch_size / step_s, "vs_eager_fp32": baseline / step_s,
                          "peak_device_mb": peak, "compile_seconds": compile_s.get((precision, compiled))})
            if args.json:
                write_json(args.json, table)
    print(f"load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
