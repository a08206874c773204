#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes, on a CUDA machine with the project's requirements
# installed. It runs
#   1. the parity tests on the GPU (PSP_TEST_DEVICE=cuda; fp32 in IEEE precision, not TF32),
#   2. the forward benchmark at 1024 px, batch 8: fp32 and bf16, contiguous and channels-last, eager;
#      then bf16 eager against bf16 compiled (a cold compile, then a warm one from its cache),
#   3. a 20-step `psp train` with use_gpu=true on one GPU (Ray Train's DDP over NCCL) on synthetic shards,
# and prints one summary table. Each step has a time limit; a step that fails or runs out of time is a
# row of the table, and the exit status is non-zero. Without a CUDA device it stops at once, exit 1.
#
# Usage (from anywhere): bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#   PYTHON=...  the interpreter to use (default: .venv/bin/python when present, else python3)
# Logs, the benchmarks' JSON rows and the training run (MLflow store, Ray results) go to
# OUTPUT_FOLDER (default: a new temporary folder), not in the repository.
set -uo pipefail
OUT=${1:-$(mktemp -d -t psp-gpu-check-XXXXXX)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: FAILED: no CUDA device is visible to torch (python: $PY); this check needs a CUDA machine" >&2
    exit 1
fi
echo "gpu_check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)'); output in $OUT"

: > "$OUT/steps.tsv"
# run_step NAME SECONDS COMMAND...: run with a time limit, output to the terminal and NAME.log, status to steps.tsv
run_step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
}

# 1. Parity on the GPU (under a minute on a fast CPU: most of it builds the fixtures' weights).
run_step parity 100 env PSP_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/unit/psp_core/nets/test_parity.py

# 2. Forward throughput at 1024 px, batch 8.
run_step forward_eager 95 "$PY" benchmarks/bench_forward.py --sizes 1024 --batches 8 --precisions fp32 bf16 \
    --channels-last --iters 10 --json "$OUT/forward_eager.json"
run_step forward_compiled 170 "$PY" benchmarks/bench_forward.py --sizes 1024 --batches 8 --precisions bf16 \
    --compile --iters 10 --json "$OUT/forward_compiled.json"

# 3. A 20-step training run on one GPU: 32 random 256x256 images in 8 identity folders, sharded.
"$PY" - "$OUT/images" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for i in range(32):
    folder = Path(sys.argv[1]) / f"person-{i % 8}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
EOF
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
run_step train 105 bash -c '"$0" -m pipelines.cli shard input_dir="$1/images" output_dir="$1/shards" \
        report="$1/shard.json" test_fraction=0.25 &&
    "$0" -m pipelines.cli train use_gpu=true num_workers=1 max_steps=20 batch_size=8 log_interval=5 \
        image_interval=10 val_interval=10 save_interval=10 shards="$1/shards" storage_path="$1/ray_results" \
        report="$1/train.json"' "$PY" "$OUT"

# The summary table.
"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n=== gpu_check summary")
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    verdict = "ok" if status == "0" else ("TIMED OUT" if status in ("124", "137") else f"FAILED (exit {status})")
    print(f"step {name:17s} {verdict:18s} {seconds:>4s} s")
tail = [l for l in (out / "parity.log").read_text().splitlines() if " passed" in l or " failed" in l]
print(f"parity on cuda: {tail[-1].strip('= ') if tail else 'no pytest summary (see parity.log)'}")

rows = [r for name in ("forward_eager", "forward_compiled") if (out / f"{name}.json").is_file()
        for r in json.loads((out / f"{name}.json").read_text())]
print("\noutput  batch  precision  compile  channels_last  images/s  compile_s  warm_s  peak_gpu_mb  TFLOP/s  of_peak")
for r in rows:
    if r["error"]:
        print(f"{r['output']:6d}  {r['batch']:5d}  {r['precision']:9s}  {str(r['compile']):7s}  "
              f"{str(r['channels_last']):13s}  failed: {r['error']}")
        continue
    cells = [f"{v:.1f}" if v is not None else "-" for v in (r["compile_seconds"], r["warm_compile_seconds"])]
    cells.append(f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] is not None else "-")
    print(f"{r['output']:6d}  {r['batch']:5d}  {r['precision']:9s}  {str(r['compile']):7s}  {str(r['channels_last']):13s}  "
          f"{r['images_per_s']:8.1f}  {cells[0]:>9s}  {cells[1]:>6s}  {cells[2]:>11s}  "
          f"{r['achieved_gflops'] / 1000:7.2f}  {r['fraction_of_peak']:7.0%}")

report = out / "train.json"
if report.is_file():
    import mlflow

    summary = json.loads(report.read_text())
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "images_per_s")
    rate = f"{history[-1].value:.1f} images/s (last logged window)" if history else "no images_per_s logged"
    print(f"\npsp train, 1 GPU worker (NCCL), {summary['steps']} steps: {rate}; registered {summary['model_uri']}")
else:
    print("\npsp train: no report (see train.log)")
EOF
if awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad }' "$OUT/steps.tsv"; then
    echo "gpu_check: all steps passed"
else
    echo "gpu_check: FAILED: see the table above and the logs in $OUT" >&2
    exit 1
fi
