#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes, that measures what the lent device machine can run. That machine
# has its own Python 3.12, torch and torchvision, and no package registry: psp_core's other dependencies come in the
# wheelhouse `.whl/` carried with the working tree (benchmarks/wheelhouse.py, under 64 MiB). Steps:
#   0. packages:         unpack the wheels of the packages the interpreter lacks (its own copies win);
#   1. parity:           the parity tests on the device (fp32 in IEEE precision, not TF32), without the suite's
#                        conftest (it imports the pipelines' storage layer, which needs pyarrow);
#   2. forward_eager:    the forward benchmark through the inference core at 256 and 1024 px, batch 8: fp32 and
#                        bf16, contiguous and channels-last;
#   3. forward_compiled: bf16 eager against compiled at both sizes (a cold compile, then a warm one);
#   4. train_step:       the library's trainer (Trainer.train_step: pSp forward, the four-term loss, backward,
#                        Ranger) on one device, 1024 px output from 256 px input, batch 8, fp32 and bf16, with
#                        images/s and each step's peak device memory;
#   5. ray_train:        `psp train` on Ray Train with one GPU worker, only where ray, mlflow, pydantic and pyarrow import
#                        (the device image has none of them, and Ray's wheel alone is larger than a call carries:
#                        the step is then skipped, with that reason in the table);
# then one summary table. Each step has a time limit (together 8 minutes on a GPU); a step that fails or runs out of
# time is a row of the table, and the exit status is non-zero.
#
# Usage (from anywhere):
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [OUTPUT_FOLDER]
#     --device cuda   (default) the check; without a CUDA device it stops at once, exit 1
#     --device cpu    a dry run of every step on this machine's CPU at small sizes (64 px forward, the 16 px
#                     trainer, 2 training steps), with the same wheelhouse and table: the script checked end to
#                     end before device time is spent on it
#   PYTHON=...        the interpreter (default: .venv/bin/python when present, else python3)
# Build the wheelhouse first, where the registry is reachable: python benchmarks/wheelhouse.py build
# Logs, the benchmarks' JSON rows and the training run go to OUTPUT_FOLDER (default: a new temporary folder).
set -uo pipefail
DEVICE=cuda
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) DEVICE=${2:-}; shift $(( $# >= 2 ? 2 : 1 )) ;;
        --device=*) DEVICE=${1#--device=}; shift ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [[ $DEVICE != cuda && $DEVICE != cpu ]]; then
    echo "gpu_check: error: --device must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
fi
OUT=${1:-$(mktemp -d -t psp-gpu-check-XXXXXX)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$OUT/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DEVICE == cuda ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: FAILED: no CUDA device is visible to torch (python: $PY); run it on a CUDA machine," \
             "or --device cpu for a dry run" >&2
        exit 1
    fi
    # sizes and time limits of the check; the limits add up to 8 minutes
    SIZES="256 1024" BATCH=8 ITERS=10 TRAIN_CONFIG=ffhq TRAIN_BATCH=8 TRAIN_STEPS=5 RAY_STEPS=20 RAY_SIZES=()
    LIMITS=(packages=20 parity=70 forward_eager=100 forward_compiled=150 train_step=80 ray_train=60)
    NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
else
    SIZES="64" BATCH=2 ITERS=1 TRAIN_CONFIG=tiny TRAIN_BATCH=2 TRAIN_STEPS=1 RAY_STEPS=2
    RAY_SIZES=(output_size=16 encoder_input_size=32 train_decoder=false)
    LIMITS=(packages=20 parity=300 forward_eager=200 forward_compiled=300 train_step=200 ray_train=300)
    NAME="CPU dry run"
fi
declare -A LIMIT
for entry in "${LIMITS[@]}"; do LIMIT[${entry%%=*}]=${entry#*=}; done
echo "gpu_check: $NAME | $("$PY" -c 'import sys, torch; print("Python", sys.version.split()[0], "| torch", torch.__version__)'); output in $OUT"

: > "$OUT/steps.tsv"
# run_step NAME COMMAND...: run with NAME's time limit, output to the terminal and NAME.log, status to steps.tsv
run_step() {
    local name=$1 start=$SECONDS
    shift
    echo "=== $name (limit ${LIMIT[$name]}s): $*"
    timeout --kill-after=15 "${LIMIT[$name]}" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.tsv"
}
# skip_step NAME REASON: a row of the table that says why the step did not run
skip_step() {
    echo "=== $1: skipped: $2"
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"
}

# 0. The packages psp_core needs beyond torch and torchvision.
run_step packages "$PY" benchmarks/wheelhouse.py unpack .whl "$OUT/site"

# 1. Parity on the device.
run_step parity env PSP_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider --noconftest \
    tests/unit/psp_core/nets/test_parity.py

# 2-3. Forward throughput through the inference core.
run_step forward_eager "$PY" benchmarks/bench_forward.py --device "$DEVICE" --sizes $SIZES --batches $BATCH \
    --precisions fp32 bf16 --channels-last --iters $ITERS --json "$OUT/forward_eager.json"
run_step forward_compiled "$PY" benchmarks/bench_forward.py --device "$DEVICE" --sizes $SIZES --batches $BATCH \
    --precisions bf16 --compile --iters $ITERS --json "$OUT/forward_compiled.json"

# 4. The library's training step.
run_step train_step "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --configs $TRAIN_CONFIG \
    --precisions fp32 bf16 --batch-size $TRAIN_BATCH --steps $TRAIN_STEPS --json "$OUT/train_step.json"

# 5. psp train on Ray Train: 32 random 256x256 images in 8 identity folders, sharded, then a short run.
if ! missing=$("$PY" -c '
import importlib.util, sys
gone = [m for m in ("ray", "mlflow", "pydantic", "pyarrow") if importlib.util.find_spec(m) is None]
print(", ".join(gone)); sys.exit(1 if gone else 0)'); then
    skip_step ray_train "no $missing in this Python (the pipelines need them; Ray's wheel alone is over 64 MiB)"
else
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
    USE_GPU=$([[ $DEVICE == cuda ]] && echo true || echo false)
    run_step ray_train bash -c '"$0" -m pipelines.cli shard input_dir="$1/images" output_dir="$1/shards" \
            report="$1/shard.json" test_fraction=0.25 &&
        "$0" -m pipelines.cli train use_gpu="$2" num_workers=1 max_steps="$3" batch_size=8 log_interval=1 \
            image_interval="$3" val_interval="$3" save_interval="$3" shards="$1/shards" \
            storage_path="$1/ray_results" report="$1/train.json" "${@:4}"' \
        "$PY" "$OUT" "$USE_GPU" "$RAY_STEPS" "${RAY_SIZES[@]}"
fi

# The summary table.
"$PY" - "$OUT" "$NAME" <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from bench_forward import layout_cell

out, name = Path(sys.argv[1]), sys.argv[2]
print(f"\n=== gpu_check summary ({name})")
for line in (out / "steps.tsv").read_text().splitlines():
    step, status, seconds, *reason = line.split("\t")
    verdict = {"0": "ok", "124": "TIMED OUT", "137": "TIMED OUT", "skipped": "skipped"}.get(status, f"FAILED (exit {status})")
    print(f"step {step:17s} {verdict:18s} {seconds:>4s} s  {' '.join(reason)}".rstrip())
parity = [l for l in (out / "parity.log").read_text().splitlines() if " passed" in l or " failed" in l]
print(f"parity: {parity[-1].strip('= ') if parity else 'no pytest summary (see parity.log)'}")


def rows(name: str) -> list[dict]:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else []


print("\nforward (inference core)")
print("output  batch  precision  compile  channels_last  images/s  compile_s  warm_s  peak_dev_mb  TFLOP/s  of_peak")
for r in rows("forward_eager") + rows("forward_compiled"):
    head = f"{r['output']:6d}  {r['batch']:5d}  {r['precision']:9s}  {str(r['compile']):7s}  {layout_cell(r):13s}"
    if r["error"]:
        print(f"{head}  failed: {r['error']}")
        continue
    cells = [f"{v:.1f}" if v is not None else "-" for v in (r["compile_seconds"], r["warm_compile_seconds"])]
    cells.append(f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] is not None else "-")
    print(f"{head}  {r['images_per_s']:8.2f}  {cells[0]:>9s}  {cells[1]:>6s}  {cells[2]:>11s}  "
          f"{r['achieved_gflops'] / 1000:7.2f}  {r['fraction_of_peak']:7.0%}")

print("\ntraining step (Trainer.train_step)")
print("output  enc_in  batch  precision  images/s  x_fp32  step_s  step_peak_dev_mb")
for r in rows("train_step"):
    peak = f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] is not None else "-"
    print(f"{r['output']:6d}  {r['encoder_input']:6d}  {r['batch']:5d}  {r['precision']:9s}  {r['images_per_s']:8.2f}"
          f"  {r['vs_eager_fp32']:6.2f}  {r['step_seconds']:6.3f}  {peak:>16s}")

report = out / "train.json"
if report.is_file():
    import mlflow

    summary = json.loads(report.read_text())
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "images_per_s")
    rate = f"{history[-1].value:.1f} images/s (last logged window)" if history else "no images_per_s logged"
    print(f"\npsp train on Ray Train, 1 worker, {summary['steps']} steps: {rate}; registered {summary['model_uri']}")
EOF
summary=$?
if [[ $summary -eq 0 ]] && awk -F'\t' '$2 != 0 && $2 != "skipped" { bad = 1 } END { exit bad }' "$OUT/steps.tsv"; then
    echo "gpu_check: all steps passed"
else
    echo "gpu_check: FAILED: see the table above and the logs in $OUT" >&2
    exit 1
fi
