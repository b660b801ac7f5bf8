#!/usr/bin/env bash
# Issue 10's fair accuracy benchmark, prepared for a machine with a CUDA GPU: every method on the demo's data with
# the demo LPM, each at its best of a small grid of learning rates around its own default (chosen on validation),
# test metrics at that rate (`fpt bench accuracy --lr-scales`). On this project's 2-core CPU the methods that
# train through the LPM take about 6 h; on a GPU the run is minutes.
#
#   bash benchmarks/gpu_accuracy.sh [OUT] [WORK]
#
# Uses the machine's own python3 with PyTorch, the project from src/ on PYTHONPATH (as benchmarks/gpu_check.sh);
# writes OUT/accuracy.md and OUT/accuracy.json (default OUT gpu_accuracy), scratch data into WORK. Finished runs
# are reused, so a run cut short continues when started again with the same OUT. Settings can be narrowed for a
# short session: SCALES (default 0.3,1,3), METHODS (default every method), EPOCHS (default 20), PRECISION (bf16).
# A smoke test on a CPU: DEVICE=cpu PRECISION=fp32 METHODS=linear,fpt+ SCALES=1 EPOCHS=1 SYNTH="--train 8 --val 4
# --test 4" bash benchmarks/gpu_accuracy.sh /tmp/ga
set -euo pipefail
. "$(dirname "$0")/gpu_setup.sh" gpu_accuracy "$@"
METHODS=${METHODS:-full,linear,vpt-deep,lora,adapter,side-only,fpt,fpt+}
[ -f "$WORK/demo_data/labels.csv" ] || "$PY" -m fpt synth "$WORK/demo_data" ${SYNTH:-}
"$PY" -m fpt bench accuracy "$WORK/demo_data" --backbone demo --input-size 512 --methods "$METHODS" \
    --lr-scales "${SCALES:-0.3,1,3}" --epochs "${EPOCHS:-20}" --device "${DEVICE:-cuda}" \
    --precision "${PRECISION:-bf16}" --cache "$WORK/cache" --out "$OUT"
echo "results: $OUT/accuracy.md"
