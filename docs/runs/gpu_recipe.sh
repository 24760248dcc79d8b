#!/usr/bin/env bash
# Issue 15 on one GPU: epoch times before and after the fast step, then the paper's full
# MNIST recipe (`python mnist.py`, every default, 1000 epochs) and --infer on its model.
# Made for the device tool's two calls (15 minutes of device time in all, start included):
#
#   here, once:    bash docs/runs/gpu_recipe.sh prepare
#                  (copies the MNIST files into runs/data/mnist, which .gitignore skips)
#   device call 1: bash docs/runs/gpu_recipe.sh start     timeout_s 330, carry ["runs/data"]
#                  the fast step's CUDA tests; epoch times before (--no-fast-step
#                  --checkpoint-every 0: the eager step, a checkpoint every epoch) and after
#                  (every default) for MNIST at full width on the real data and for each
#                  ConvNet on synthetic data of the real sizes; then the full MNIST run,
#                  started under setsid, which goes on after the call returns
#   device call 2: bash docs/runs/gpu_recipe.sh finish    timeout_s 600, carry ["runs/data"]
#                  (at once, on the same warm machine) waits for the full run, at most
#                  FINISH_WAIT seconds (default 560), then runs --infer on the GPU and the
#                  CPU and packs the weights' signs; call it again if the run is unfinished
#   any device call: bash docs/runs/gpu_recipe.sh convnets  timeout_s 240 (issue 18 on the GPU)
#                  the CUDA kernel and 1-bit ConvNet tests; one tiny epoch of cifar10.py and
#                  svhn.py on files in the data sets' formats (random pixels), then --infer
#                  --device cuda --limit 1000 on each: the 1-bit pass against cuDNN's float pass
#
# Everything the closing note needs comes back in $OUT (8 files at most a call):
#   start:  timings.txt (the table), cuda_tests.log, timing_runs.tar.gz (metrics and logs)
#   finish: summary.txt, mnist.jsonl, mnist.png, mnist.log, infer.log, infer.json,
#           mnist_signs.npz (each binarized weight as its sign, the rest as trained; --infer reads it)
#   convnets: convnet_tests.log, convnet_infer.log, cifar10_infer.json, svhn_infer.json
# Every run is float32 throughout (TF32 off, binary_net.main sets it). SMOKE_ARGS, appended
# to every run's flags, makes a quick rehearsal on the CPU, e.g.
#   OUT=runs/smoke SMOKE_ARGS="--limit 200 --hidden-units 16 --epochs 2" bash docs/runs/gpu_recipe.sh start
set -u
cd "$(dirname "$0")/../.."
W=runs/gpu                 # the work folder on the device machine, kept between calls
DATA=runs/data/mnist
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1

stamp() {  # prefix each line with the time it was printed, for the wall time between epochs
    python3 -c 'import sys, time
for line in sys.stdin:
    print(f"{time.time():.3f} {line}", end="", flush=True)'
}

timed() {  # timed NAME SCRIPT ARGS...: one timing run, metrics and stamped log in $W/timing
    local name=$1 script=$2
    shift 2
    echo "== $name: python $script $*"
    timeout "${RUN_LIMIT:-150}" python3 "$script" --no-progress --save-path "$W/timing/$name.npz" \
        --metrics "$W/timing/$name.jsonl" "$@" ${SMOKE_ARGS:-} 2>&1 | stamp > "$W/timing/$name.log"
    tail -n 2 "$W/timing/$name.log"
}

summarize_timings() {
    python3 - "$W/timing" <<'EOF'
import json, statistics, sys
from pathlib import Path
folder = Path(sys.argv[1])
steps = {"mnist": 50_000 // 100, "cifar10": 45_000 // 50, "svhn": 598_388 // 50}
epochs = {"mnist": 1000, "cifar10": 500, "svhn": 200}
print("median over epochs 2 on; wall = time between two epochs' reports (checkpoints and plots included)")
print("| run | device | epochs | steps/epoch timed | train s | epoch s | wall s | projected epoch s (wall) | projected recipe |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ["mnist_before", "mnist_after", "cifar10_before", "cifar10_after", "svhn_before", "svhn_after"]:
    path = folder / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if len(rows) < 2:
        print(f"| {name} | - | {len(rows)} | - | - | - | - | - | (did not run 2 epochs: see its log) |")
        continue
    stamps = [float(line.split()[0]) for line in (folder / f"{name}.log").read_text().splitlines()
              if " Epoch " in line and " took " in line]
    later = rows[1:]
    train = statistics.median(r["train_seconds"] for r in later)
    epoch = statistics.median(r["seconds"] for r in later)
    wall = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    bench = name.split("_")[0]
    timed_steps = int(json.loads((folder / f"{name}.steps").read_text())) if (folder / f"{name}.steps").exists() \
        else steps[bench]
    scale = steps[bench] / timed_steps  # SVHN: a tenth of the training set timed, scaled up
    projected = train * scale + (wall - train)
    total = projected * epochs[bench]
    print(f"| {name} | {rows[0]['device']} | {len(rows)} | {timed_steps} | {train:.3f} | {epoch:.3f} | {wall:.3f} | "
          f"{projected:.3f} | {epochs[bench]} epochs: {total / 60:.1f} min ({total / 3600:.2f} h) |")
EOF
}

prepare() {
    local src=${MNIST_SRC:-../shared/data/mnist}
    mkdir -p "$DATA" && cp -f "$src"/*-ubyte* "$DATA"/ && ls -l "$DATA"
}

start() {
    mkdir -p "$W/timing"
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'; } | tee "$OUT/timings.txt"
    python3 -m pytest -q tests/test_cuda_step.py > "$OUT/cuda_tests.log" 2>&1
    local rc=$?
    tail -n 3 "$OUT/cuda_tests.log"
    if [ $rc -ne 0 ]; then
        echo "the fast step failed its tests (cuda_tests.log): no timings, no full run"
        return 1
    fi
    if [ -z "${SKIP_BEFORE:-}" ]; then
        timed mnist_before mnist.py --data-dir "$DATA" --epochs 3 --no-fast-step --checkpoint-every 0
    fi
    timed mnist_after mnist.py --data-dir "$DATA" --epochs 6
    if [ -z "${SKIP_BEFORE:-}" ]; then
        timed cifar10_before cifar10.py --synthetic --epochs 2 --no-fast-step --checkpoint-every 0
    fi
    timed cifar10_after cifar10.py --synthetic --epochs 3
    for run in svhn_before svhn_after; do echo $((60000 / 50)) > "$W/timing/$run.steps"; done
    if [ -z "${SKIP_BEFORE:-}" ]; then
        timed svhn_before svhn.py --synthetic --limit 60000 --epochs 2 --no-fast-step --checkpoint-every 0
    fi
    timed svhn_after svhn.py --synthetic --limit 60000 --epochs 3
    summarize_timings | tee -a "$OUT/timings.txt"
    tar czf "$OUT/timing_runs.tar.gz" -C "$W" --exclude '*.npz' --exclude '*.ckpt' timing
    # the paper's recipe, every default: 1000 epochs, 4096 units, the fast step, a checkpoint every 10 minutes
    rm -f "$W/mnist.jsonl" "$W/mnist.png" "$W/mnist_parameters.npz" "$W/mnist_parameters.ckpt"
    setsid nohup python3 mnist.py --data-dir "$DATA" --metrics "$W/mnist.jsonl" --save-path "$W/mnist_parameters.npz" \
        ${SMOKE_ARGS:-} < /dev/null > "$W/mnist.log" 2>&1 &
    echo $! > "$W/mnist.pid"
    date +%s > "$W/mnist.start"
    echo "full run started (pid $(cat "$W/mnist.pid")): now call: bash docs/runs/gpu_recipe.sh finish"
}

finish() {
    local deadline=$((SECONDS + ${FINISH_WAIT:-560})) pid
    pid=$(cat "$W/mnist.pid")
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 5; done
    cp "$W/mnist.jsonl" "$OUT/" 2>/dev/null
    tail -c 15000000 "$W/mnist.log" > "$OUT/mnist.log"
    local running=""
    kill -0 "$pid" 2>/dev/null && running=yes
    { echo "wall time since the start: $(( $(date +%s) - $(cat "$W/mnist.start") )) s"
      python3 - "$W/mnist.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
if rows:
    last = rows[-1]
    print(f"epochs: {len(rows)} on {last['device']}; median epoch {statistics.median(r['seconds'] for r in rows):.3f} s, "
          f"median training {statistics.median(r['train_seconds'] for r in rows):.3f} s, "
          f"sum of epochs {sum(r['seconds'] for r in rows):.0f} s")
    print(f"best validation error {last['best_val_err']:.2f}% at epoch {last['best_epoch']}: "
          f"test error {last['test_err']:.2f}% (paper 0.96%, the reference code's run 0.93%)")
EOF
    } | tee "$OUT/summary.txt"
    if [ -n "$running" ]; then
        echo "the full run is still going (see mnist.log): call finish again"
        return 3
    fi
    cp "$W/mnist.png" "$OUT/" 2>/dev/null
    tail -n 12 "$W/mnist.log"
    # the paper's inference on the best-validation model, on the CPU and on the GPU (both by default)
    python3 binary_ops.py --infer "$W/mnist_parameters.npz" --data-dir "$DATA" --json "$OUT/infer.json" \
        > "$OUT/infer.log" 2>&1
    cat "$OUT/infer.log"
    python3 - "$W/mnist_parameters.npz" "$OUT/mnist_signs.npz" <<'EOF'
import sys
import numpy as np
# The 147 MB of parameters do not come back whole: each binarized weight as its sign
# (+1 for w >= 0; all that either forward pass reads of it), in float32, which compresses
# to about 9 MB and which --infer reads as it is; the rest as trained.
with np.load(sys.argv[1]) as f:
    out = {k: (np.where(f[k] >= 0, 1, -1).astype(np.float32) if k.endswith(".weight") and f[k].ndim > 1 else f[k])
           for k in f.files}
np.savez_compressed(sys.argv[2], **out)
EOF
    ls -l "$OUT"
}

convnets() {
    python3 -m pytest -q tests/test_cuda_kernels.py tests/test_infer_convnet.py > "$OUT/convnet_tests.log" 2>&1
    tail -n 3 "$OUT/convnet_tests.log"
    for net in cifar10 svhn; do
        python3 -c 'import sys; from pathlib import Path; sys.path[:0] = ["tests", "."]
from test_infer_convnet import write_data
write_data(Path(sys.argv[1]), sys.argv[2], n_test=1000)' "$W/$net" "$net"
        timeout 120 python3 "$net.py" --epochs 1 --limit 200 --data-dir "$W/$net" --no-progress \
            --save-path "$W/$net.npz" > "$W/$net.train.log" 2>&1 || tail -n 3 "$W/$net.train.log"
        python3 binary_ops.py --infer "$W/$net.npz" --data-dir "$W/$net" --limit 1000 --device cuda \
            --json "$OUT/${net}_infer.json" 2>&1 | tee -a "$OUT/convnet_infer.log"
    done
}

case "${1:-}" in
    prepare | start | finish | convnets) "$1" ;;
    *) echo "usage: bash docs/runs/gpu_recipe.sh prepare|start|finish|convnets" >&2; exit 2 ;;
esac
