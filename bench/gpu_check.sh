#!/usr/bin/env bash
# GPU check (issue 14, item 7): DiT-S/4 at 32x32 trained for a few hundred steps in fp32, tf32 and bf16,
# each eager and with torch.compile; 64 samples drawn from each run (`--config-name sample`);
# bench/precision_compile.py --device cuda; one results file with steps/s, samples/s, peak GPU memory
# and the final loss per setting.
#
#   bash bench/gpu_check.sh          # one GPU; writes bench/results/gpu_check-<date>.md (aimed at < 8 min)
#   bash bench/gpu_check.sh --dry    # the CPU, tiny: fp32 eager only, 4 steps; results in the work dir
#
# Data: data=folder over 32x32 RGB PNGs written first from scikit-learn's digits (1797 images,
# 10 classes, upscaled and tinted per class): offline, 3 channels at CIFAR-10's size, so the network
# and step cost are CIFAR-10's; the images themselves are not CIFAR-10's, so the losses are not comparable.
# Settings (environment): STEPS (300), BATCH (128), WORK (a new temporary directory), PYTHON (python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="${WORK:-$(mktemp -d -t gpu_check-XXXXXX)}"
DATE="$(date -u +%Y-%m-%d)"
if [[ "${1:-}" == "--dry" ]]; then
  DEVICE=cpu STEPS="${STEPS:-4}" BATCH="${BATCH:-8}" LOG_EVERY=2 PRECISIONS="fp32" COMPILES="false"
  RESULTS="$WORK/gpu_check-$DATE.md"
  PC_ARGS=(--device cpu --archs "dit_s_4:hidden_size=32,depth=1,num_heads=2" --resolution 8 --batch 8
    --modes eager --repeats 1 --warmup 1)
  WORKERS=0
else
  DEVICE=cuda STEPS="${STEPS:-300}" BATCH="${BATCH:-128}" LOG_EVERY=50 PRECISIONS="fp32 tf32 bf16" COMPILES="false true"
  RESULTS="$REPO/bench/results/gpu_check-$DATE.md"
  PC_ARGS=(--device cuda --archs dit_s_4 --precisions fp32 tf32 bf16 --repeats 5)
  WORKERS=4
fi
mkdir -p "$WORK/data" "$WORK/runs"
echo "gpu_check: device $DEVICE, $STEPS steps at batch $BATCH, work dir $WORK" >&2

# -- the data: 32x32 RGB PNGs in class subfolders ------------------------------------------------
"$PYTHON" - "$WORK/data" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

root = Path(sys.argv[1])
digits = load_digits()
tints = np.random.default_rng(0).uniform(0.3, 1.0, size=(10, 3))
for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    gray = Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
    rgb = (np.asarray(gray, dtype=np.float32)[..., None] * tints[label]).astype(np.uint8)
    (root / str(label)).mkdir(exist_ok=True)
    Image.fromarray(rgb, "RGB").save(root / str(label) / f"{i:04d}.png")
EOF

# -- train and sample each setting -----------------------------------------------------------------
cd "$WORK"
for precision in $PRECISIONS; do
  for compile in $COMPILES; do
    name="$precision-compile_$compile"
    run="$WORK/runs/$name"
    mem="$WORK/runs/$name.mem"
    echo "gpu_check: training $name" >&2
    poller=""
    if [[ "$DEVICE" == cuda ]] && command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" &
      poller=$!
    fi
    status=0
    timeout 240 "$PYTHON" "$REPO/launch.py" arch=dit_s_4 data=folder "data.root=$WORK/data" data.resolution=32 \
      "data.num_workers=$WORKERS" "train.device=$DEVICE" "train.precision=$precision" "train.compile=$compile" \
      "train.steps=$STEPS" "train.batch_size=$BATCH" "train.log_every=$LOG_EVERY" "train.ckpt_every=$STEPS" \
      eval.every=0 eval.n_samples=64 "eval.steps=[1]" eval.batch_size=64 tracking.enabled=false \
      "hydra.run.dir=$run" >"$run.out" 2>&1 || status=$?
    [[ -n "$poller" ]] && kill "$poller" 2>/dev/null && wait "$poller" 2>/dev/null || true
    echo "$status" >"$run.rc"
    if [[ "$status" == 0 ]]; then
      timeout 120 "$PYTHON" "$REPO/launch.py" --config-name sample "ckpt=$run" n=64 steps=1 "device=$DEVICE" \
        "out=$run/samples" "compare_steps=[1,2]" tracking.enabled=false >"$run.sample.out" 2>&1 \
        || echo "gpu_check: sampling $name failed (see $run.sample.out)" >&2
    else
      echo "gpu_check: training $name failed with status $status (see $run.out)" >&2
    fi
  done
done

# -- bench/precision_compile.py ------------------------------------------------------------------
echo "gpu_check: bench/precision_compile.py ${PC_ARGS[*]}" >&2
pc_status=0
timeout 240 "$PYTHON" "$REPO/bench/precision_compile.py" "${PC_ARGS[@]}" --out "$WORK/precision_compile.json" \
  >"$WORK/precision_compile.out" 2>"$WORK/precision_compile.err" || pc_status=$?

# -- one results file --------------------------------------------------------------------------------
"$PYTHON" - "$WORK" "$RESULTS" "$DEVICE" "$STEPS" "$BATCH" "$pc_status" <<'EOF'
import re
import statistics
import sys
from pathlib import Path

work, results, device, steps, batch, pc_status = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
line = re.compile(r"step (\d+)/\d+ loss ([-\d.e+naif]+) .* ([\d.]+) samples/s")
rows = []
for out in sorted((work / "runs").glob("*.out")):
    if out.name.endswith(".sample.out"):
        continue
    name = out.stem
    run = work / "runs" / name
    found = line.findall(out.read_text())
    rates = [float(r) for _, _, r in found]
    sps = statistics.median(rates[1:] or rates) if rates else None  # the first line includes compilation
    mem_file = work / "runs" / f"{name}.mem"
    mem = [int(v) for v in mem_file.read_text().split() if v.isdigit()] if mem_file.is_file() else []
    rc = (work / "runs" / f"{name}.rc").read_text().strip()
    rows.append(
        [
            name,
            "ok" if rc == "0" else f"failed ({rc}): {out}",
            f"{sps / int(batch):.2f}" if sps else "n/a",
            f"{sps:.0f}" if sps else "n/a",
            f"{(max(mem) - min(mem)) / 1024:.2f}" if mem else "n/a",
            found[-1][1] if found else "n/a",
            "yes" if (run / "samples" / "samples.png").is_file() else "no",
        ]
    )
head = ["setting", "status", "steps/s", "samples/s", "peak GPU memory GiB", "final loss", "samples.png"]
table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
pc = (work / "precision_compile.out").read_text() if (work / "precision_compile.out").is_file() else ""
text = [
    f"# GPU check, {device}",
    "",
    f"`bash bench/gpu_check.sh` (DiT-S/4, 32x32 RGB PNGs from scikit-learn's digits via data=folder, {steps} steps"
    f" at batch {batch}). steps/s and samples/s: the median of the trainer's log lines after the first"
    " (which includes compilation); peak GPU memory: nvidia-smi's memory.used, its maximum minus its minimum"
    " during the run (so it includes the CUDA context); final loss: the last log line's.",
    "",
    *table,
    "",
    f"## bench/precision_compile.py (status {pc_status})",
    "",
    pc.strip() or "no output: see precision_compile.err in the work directory",
    "",
]
results.parent.mkdir(parents=True, exist_ok=True)
results.write_text("\n".join(text))
print("\n".join(table))
print(f"gpu_check: results in {results}", file=sys.stderr)
EOF
