"""pSp forward throughput (encoder + generator, images/s) per output size x batch x precision x
compile x memory format, against the machine's convolution peak measured in the same run.

It times what `psp invert` runs: the model is written to a checkpoint file, and each configuration loads it
with the inference core (`InferenceModel.load`: strict load, `keep_freed_memory` on a CPU, the precision and
compile switches) and times `InferenceModel.invert` on a batch the preset's transform prepared. Each
configuration runs in its own process, so its peak RSS (and peak GPU memory) is its own and a compile starts
from nothing but the cache. The model's FLOPs come from torch's FlopCounterMode (counted on fake tensors, so
counting costs no compute); the peak is the best rate of a large 3x3 convolution (512 -> 512 channels, 64x64)
in the same precision, contiguous or channels-last. A compiled configuration compiles into a fresh, empty cache
(compile_seconds: a cold compile, as the first process on a machine pays it), then a second process compiles
it again from that cache (warm_compile_seconds). The compile costs are the first call's seconds less one
steady call.
With the default layout each row runs as the product would (`inference_channels_last`: eager bf16 on a CPU
channels-last), so a compiled row's break-even is against that eager row.
Run: python benchmarks/bench_forward.py [--sizes 256 1024] [--batches 1 8] [--precisions fp32 bf16]
         [--compile] [--channels-last] [--iters 3] [--device cpu|cuda] [--compile-cache DIR] [--json PATH]
         [--reference CLONE_OF_PIXEL2STYLE2PIXEL]
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import command_line, hardware, time_per_call, write_json  # noqa: E402

from psp_core import PSP, PSPArchitecture, save_psp  # noqa: E402
from psp_core.inference import InferenceModel  # noqa: E402
from psp_core.runtime.devices import autocast, inference_channels_last, use_ieee_fp32  # noqa: E402

ENCODER_INPUT = 256
PEAK_SECONDS = 0.5   # each timed round of the peak convolution lasts at least this long


def build(size: int) -> PSP:
    """The benchmarked model: GradualStyleEncoder (IR-SE50, input 256) + a `size` px generator, random weights."""
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(output_size=size))
    net.set_latent_avg(torch.randn(512) * 0.1)
    return net.eval()


def forward_flops_per_image(size: int, precision: str) -> int:
    """FLOPs of one image's forward (FlopCounterMode: a multiply-add is 2), counted on fake tensors
    under `precision` (bf16 and fp16 take the fused modulated convolution, fp32 the grouped one)."""
    with FakeTensorMode():
        net = build(size).requires_grad_(False)
        x = torch.zeros(1, 3, ENCODER_INPUT, ENCODER_INPUT)
        fused = "fp32" if precision == "fp32" else "bf16"   # fp16 takes bf16's path; CPU autocast has no fp16
        with FlopCounterMode(display=False) as counter, autocast("cpu", fused):
            net(x, resize=False, randomize_noise=False)
    return counter.get_total_flops()


def conv_peak_gflops(device: torch.device, precision: str) -> float:
    """The machine's convolution rate in `precision`: the best of 3 timed rounds of a 512 -> 512
    3x3 convolution on [4, 512, 64, 64], contiguous and channels-last; GFLOP/s."""
    conv = torch.nn.Conv2d(512, 512, 3, padding=1, bias=False).to(device).eval()
    x = torch.randn(4, 512, 64, 64, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        conv(x)
    flops, best = counter.get_total_flops(), 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        layer = conv.to(memory_format=memory_format)
        inp = x.contiguous(memory_format=memory_format)

        def call() -> torch.Tensor:
            with torch.inference_mode(), autocast(device, precision):
                return layer(inp)

        calls = max(1, round(PEAK_SECONDS / time_per_call(call, iters=1, warmup=1)))
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            sync()
            best = max(best, flops * calls / (time.perf_counter() - start) / 1e9)
    return best


def measure(config: dict) -> dict:
    """Run one configuration in this process, as `psp invert` runs it: load the checkpoint with the inference core,
    prepare a batch of uint8 photos with the preset's transform, time `invert`. Returns throughput, compile
    seconds and peak memory (or, with `first_call_only`, only the first call's seconds: a warm compile's cost)."""
    device = torch.device(config["device"])
    use_ieee_fp32()
    if config.get("reference"):
        return measure_reference(config)
    model = InferenceModel.load(config["checkpoint"], device=config["device"], precision=config["precision"],
                                compile=config["compile"], compile_cache=config["cache_dir"],
                                channels_last=config["channels_last"])
    photos = torch.randint(0, 256, (config["batch"], 3, ENCODER_INPUT, ENCODER_INPUT), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    x, _ = model.prepare(photos, photos)   # [N, 3, 256, 256] in [-1, 1] on the device; invert gives it the layout

    def step() -> torch.Tensor:
        return model.invert(x)[-1].images

    first_call = time_per_call(step, iters=1, warmup=0)
    if config["first_call_only"]:
        return {"first_call_seconds": first_call}
    seconds = time_per_call(step, iters=config["iters"], warmup=1)
    peak_device = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_s": config["batch"] / seconds, "seconds_per_call": seconds, "first_call_seconds": first_call,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_device_mb": peak_device,
            "channels_last": model.channels_last}


def measure_reference(config: dict) -> dict:
    """The reference pSp's forward at the configuration's size and batch (fp32, eager: it has no other), from the
    clone `config["reference"]` names (bench_reference.py: checked against psp_core's function first). The process
    does not keep freed memory, as the reference does not; the inference core's rows do, as `psp invert` does."""
    from bench_reference import ReferencePSP, check_against_psp_core, import_reference, reference_step

    net = ReferencePSP(import_reference(Path(config["reference"])), config["output"]).eval()
    check_against_psp_core(net, config["output"])
    seconds = time_per_call(reference_step(net, config["batch"]), iters=config["iters"], warmup=1)
    # no peak memory: the check held psp_core's copy of the network in this process too
    return {"images_per_s": config["batch"] / seconds, "seconds_per_call": seconds, "peak_rss_mb": None,
            "peak_device_mb": None}


def measure_in_subprocess(config: dict) -> dict:
    """`measure(config)` in a fresh Python process; a process that fails (out of memory) gives its error."""
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(config)], capture_output=True, text=True)
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"exit code {done.returncode}{killed}: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_configuration(config: dict, cache_dir: Path) -> dict:
    """One row: the configuration measured in its own process (compiled ones twice: cold, then warm)."""
    result = measure_in_subprocess({**config, "cache_dir": str(cache_dir), "first_call_only": False})
    row = {key: config[key] for key in ("output", "batch", "precision", "compile", "device")}
    chosen = config["channels_last"]
    if chosen is None:   # the product's rule, also for a row whose process failed before reporting its layout
        chosen = inference_channels_last(config["device"], config["precision"], config["compile"])
    row.update(implementation="reference" if config.get("reference") else "psp_core", layout=config["channels_last"],
               channels_last=result.get("channels_last", chosen))
    row.update(images_per_s=result.get("images_per_s"), compile_seconds=None, warm_compile_seconds=None,
               peak_rss_mb=result.get("peak_rss_mb"), peak_device_mb=result.get("peak_device_mb"),
               error=result.get("error"))
    if config["compile"] and "error" not in result:
        row["compile_seconds"] = result["first_call_seconds"] - result["seconds_per_call"]
        warm = measure_in_subprocess({**config, "cache_dir": str(cache_dir), "first_call_only": True})
        if "error" not in warm:
            row["warm_compile_seconds"] = warm["first_call_seconds"] - result["seconds_per_call"]
    return row


TABLE_HEADER = ("output  batch  precision  compile  channels_last  images/s  compile_s  warm_s  peak_rss_mb"
                "  GFLOP/s  of_peak")


def layout_cell(row: dict) -> str:
    """The channels_last column: the layout the row ran, `(auto)` where the product's rule chose it."""
    return f"{row['channels_last']} (auto)" if row["layout"] is None else str(row["channels_last"])


def table_line(row: dict) -> str:
    """One row of the printed table (under TABLE_HEADER)."""
    reference = row["implementation"] == "reference"
    head = (f"{row['output']:6d}  {row['batch']:5d}  {row['precision']:9s}  {'-' if reference else str(row['compile']):7s}  "
            f"{'reference pSp' if reference else layout_cell(row):13s}")
    if row["error"]:
        return f"{head}  failed: {row['error']}"
    seconds = [f"{v:.1f}" if v is not None else "-" for v in (row["compile_seconds"], row["warm_compile_seconds"])]
    rss = "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"
    return (f"{head}  {row['images_per_s']:8.2f}  {seconds[0]:>9s}  {seconds[1]:>6s}  {rss:>11s}  "
            f"{row['achieved_gflops']:7.0f}  {row['fraction_of_peak']:7.0%}")


def print_against_reference(rows: list[dict]) -> None:
    """Each row's throughput over the reference pSp's at the same output size and batch, measured in this run."""
    reference = {(r["output"], r["batch"]): r for r in rows if r["implementation"] == "reference" and r["images_per_s"]}
    for row in rows:
        base = reference.get((row["output"], row["batch"]))
        if row["implementation"] == "reference" or base is None or not row["images_per_s"]:
            continue
        mode = ("compiled" if row["compile"] else "eager") + (", channels-last" if row["channels_last"] else "")
        print(f"# against the reference pSp (fp32, eager, this run) at output {row['output']}, batch {row['batch']}: "
              f"{row['precision']} {mode} {row['images_per_s'] / base['images_per_s']:.1f}x "
              f"({row['images_per_s']:.3f} against {base['images_per_s']:.3f} images/s)")


def print_break_even(rows: list[dict]) -> None:
    """For each compiled row with an eager twin: the images after which its cold compile has paid."""
    eager = {(r["output"], r["batch"], r["precision"], r["layout"]): r for r in rows
             if not r["compile"] and r["implementation"] == "psp_core"}
    for row in rows:
        twin = eager.get((row["output"], row["batch"], row["precision"], row["layout"]))
        if not row["compile"] or twin is None or not (row["images_per_s"] and twin["images_per_s"]):
            continue
        saved = 1 / twin["images_per_s"] - 1 / row["images_per_s"]
        verdict = (f"saves {saved:.3f} s/image, repays the {row['compile_seconds']:.1f} s cold compile after "
                   f"{row['compile_seconds'] / saved:.0f} images" if saved > 0 else "no faster than eager")
        print(f"# compile at output {row['output']}, batch {row['batch']}, {row['precision']}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="generator output sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also run each configuration compiled")
    parser.add_argument("--channels-last", action="store_true",
                        help="run each configuration in both weight layouts, contiguous and channels-last (default: "
                             "the layout the product picks, `inference_channels_last`)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per configuration (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="compile cache folder (default: a fresh, empty one per configuration)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a clone of eladrich/pixel2style2pixel: also time the reference pSp (fp32) at each size "
                             "and batch, and print every row's ratio to it (bench_reference.py)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)   # internal: run one configuration, print its JSON
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    device = torch.device(args.device)
    if args.reference and device.type != "cpu":
        parser.error("--reference runs the reference on the CPU (its CUDA kernels are not built here): "
                     "use it with --device cpu")
    use_ieee_fp32()
    print(f"# {hardware()}; device {device}\n# {command_line()}")
    peaks = {p: conv_peak_gflops(device, p) for p in args.precisions}
    print("# conv peak (512->512 3x3, [4, 512, 64, 64]): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()), flush=True)
    flops = {(s, p): forward_flops_per_image(s, p) for s in args.sizes for p in args.precisions}
    print("# forward FLOPs per image: " + ", ".join(f"{s} px {p} {f / 1e9:.1f} GFLOP" for (s, p), f in flops.items()))
    print(TABLE_HEADER)
    configs = [{"output": size, "batch": batch, "precision": "fp32", "compile": False, "channels_last": False,
                "reference": str(args.reference)} for size in args.sizes for batch in args.batches if args.reference]
    configs += [{"output": size, "batch": batch, "precision": precision, "compile": compiled,
                 "channels_last": channels_last} for size, batch, precision, compiled, channels_last in itertools.product(
                     args.sizes, args.batches, args.precisions, (False, True) if args.compile else (False,),
                     (False, True) if args.channels_last else (None,))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {size: save_psp(build(size), Path(tmp) / f"psp{size}.pt") for size in args.sizes}
        for i, config in enumerate(configs):
            size, precision = config["output"], config["precision"]
            config.update(device=str(device), iters=args.iters, checkpoint=str(checkpoints[size]))
            row = run_configuration(config, args.compile_cache or Path(tmp) / f"cache-{i}")
            if (size, precision) not in flops:   # the reference's fp32 where the run measures only bf16
                flops[size, precision] = forward_flops_per_image(size, precision)
            if precision not in peaks:
                peaks[precision] = conv_peak_gflops(device, precision)
            rate = row["images_per_s"] or 0.0
            row["gflop_per_image"] = flops[size, precision] / 1e9
            row["achieved_gflops"] = rate * row["gflop_per_image"]
            row["fraction_of_peak"] = row["achieved_gflops"] / peaks[precision]
            rows.append(row)
            print(table_line(row), flush=True)
            if args.json:
                write_json(args.json, rows)   # after every row: a run stopped early keeps what it measured
    print_break_even(rows)
    print_against_reference(rows)


if __name__ == "__main__":
    main()
