#!/usr/bin/env bash
# The GPU check (issue 12): one prepared script for a machine with a CUDA GPU, about 5-8 min on one H200.
#
#   bash benchmarks/gpu_check.sh [OUT] [WORK]
#
# Uses the machine's own python3 with PyTorch (nothing is downloaded; the project runs from src/ on PYTHONPATH,
# so its dependencies -- torch, timm, safetensors, scikit-image, tensorboard, matplotlib, tqdm --
# must be there). Writes into OUT (default gpu_check) a few files: gpu_check.md (everything, in order),
# memory.json, train_bf16.json (and train_bf16_ddp.json, with several GPUs), preload_throughput.json; scratch data
# goes to WORK (default /tmp/fpt_gpu_check).
# A smoke test of the script itself on a CPU: DEVICE=cpu ARCH=vit_tiny_patch16_224 SIZE=64 SYNTH="--train 8 --val 4
# --test 4" bash benchmarks/gpu_check.sh /tmp/gc (the CUDA tests are then skipped).
set -uo pipefail
. "$(dirname "$0")/gpu_setup.sh" gpu_check "$@"
REPORT="$OUT/gpu_check.md"
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-vit_base_patch16_384}
SIZE=${SIZE:-512}
SYNTH=${SYNTH:-}
GPUS=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
: >"$REPORT"

step() {  # step TITLE COMMAND...: run it, its output into the report; a failure is reported and the check goes on
    local title=$1
    shift
    printf '\n## %s\n\n```\n$ %s\n' "$title" "$*" >>"$REPORT"
    local started=$SECONDS
    "$@" >>"$REPORT" 2>&1
    local status=$?
    printf '```\nexit status %s, %s s\n' "$status" "$((SECONDS - started))" >>"$REPORT"
    echo "$title: exit $status, $((SECONDS - started)) s"
}

step "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import torch, timm; \
print(\"torch\", torch.__version__, \"timm\", timm.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
step "tests that need CUDA" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step "training memory, $ARCH, $SIZE px, batch 16 (measured: max_memory_allocated)" bash -c "$PY -m fpt bench memory \
    --backbone $ARCH --input-size $SIZE --batch-size 16 --methods full,lora,fpt,fpt+ --meters measured \
    --device $DEVICE --json | tee $OUT/memory.json"
rm -rf "$WORK/demo_data"
step "demo data" "$PY" -m fpt synth "$WORK/demo_data" $SYNTH
rm -rf "$WORK/run_bf16" "$WORK/cache_bf16"
step "FPT+, 2 epochs under bf16 autocast on the demo data" "$PY" -m fpt train "$WORK/demo_data" --backbone demo \
    --method fpt+ --epochs 2 --precision bf16 --device "$DEVICE" --run "$WORK/run_bf16" --cache "$WORK/cache_bf16"
cp "$WORK/run_bf16/results.json" "$OUT/train_bf16.json" 2>/dev/null
if [ "$GPUS" -gt 1 ]; then  # the same run on every GPU: torchrun shares each batch (same cache, so no preload)
    rm -rf "$WORK/run_bf16_ddp"
    step "FPT+, the same 2 epochs under torchrun on $GPUS GPUs" "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node "$GPUS" -m fpt train "$WORK/demo_data" --backbone demo --method fpt+ --epochs 2 \
        --precision bf16 --device "$DEVICE" --run-dir "$WORK/run_bf16_ddp" --cache "$WORK/cache_bf16"
    cp "$WORK/run_bf16_ddp/results.json" "$OUT/train_bf16_ddp.json" 2>/dev/null
fi
step "preload throughput, $ARCH at $SIZE px: 1 process and one per GPU ($GPUS)" "$PY" benchmarks/preload_throughput.py \
    "$WORK/demo_data" --arch "$ARCH" --input-size "$SIZE" --batch-size 32 --device "$DEVICE" \
    --processes "$(if [ "$GPUS" -gt 1 ]; then echo "1,$GPUS"; else echo 1; fi)" --repeats 2 --out "$OUT/preload_throughput.json"
echo "report: $REPORT"
