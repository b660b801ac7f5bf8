#!/usr/bin/env sh
# Issue 12: does the int8 cache cost accuracy? FPT+ with the defaults from a float16 and from an int8 cache of
# the same images, seeds 0, 1, 2; the test AUC of each run's best-validation checkpoint.
#
#   sh benchmarks/int8_accuracy.sh DATA OUT [INPUT_SIZE]     # DATA: `fpt synth DATA`, or a panel task's DATA
#
# Each dtype has its own cache under OUT (the first run of each fills it); finished runs are reused. Prints one
# line per run (dtype, seed, test AUC) and, per seed, the int8 - float16 difference.
set -eu
DATA=$1
OUT=$2
SIZE=${3:-512}
for SEED in 0 1 2; do
    for DTYPE in float16 int8; do
        RUN="$OUT/runs/$DTYPE/seed$SEED"
        if [ ! -f "$RUN/results.json" ]; then
            mkdir -p "$OUT/runs/$DTYPE"
            fpt train "$DATA" --backbone demo --input-size "$SIZE" --method fpt+ --seed "$SEED" \
                --cache "$OUT/cache-$DTYPE" --cache-dtype "$DTYPE" --run "$RUN" > "$RUN.log" 2>&1
        fi
    done
done
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
auc = {(dtype, seed): json.loads((out / "runs" / dtype / f"seed{seed}" / "results.json").read_text())["best"]["auc"]
       for dtype in ("float16", "int8") for seed in (0, 1, 2)}
for (dtype, seed), value in sorted(auc.items()):
    print(f"{dtype} seed {seed}: test AUC {value:.4f}")
diffs = [auc["int8", seed] - auc["float16", seed] for seed in (0, 1, 2)]
means = {dtype: statistics.mean(auc[dtype, seed] for seed in (0, 1, 2)) for dtype in ("float16", "int8")}
print(f"mean float16 {means['float16']:.4f}, int8 {means['int8']:.4f}, int8 - float16 {means['int8'] - means['float16']:+.4f}")
print("per seed int8 - float16: " + ", ".join(f"{d:+.4f}" for d in diffs))
PY
