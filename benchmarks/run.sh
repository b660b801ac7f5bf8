#!/usr/bin/env sh
# The commands behind BENCHMARKS.md. Run from the repository root with the project's venv active
# (`make test` or `make demo` creates .venv): `sh benchmarks/run.sh [OUT]`.
set -eu
OUT=${1:-benchmark-results}
mkdir -p "$OUT"

# 0. Start-up of the command line (`fpt --help` and every command's help, 5 fresh interpreters each).
python benchmarks/cli_startup.py 5 | tee "$OUT/cli_startup.md"

# 1. Training memory, ViT-B/16 geometry at 512 px, batch 16: every method, both meters (about 10 min on
#    2 CPU cores; full fine-tuning's measured step needs about 10.5 GiB).
fpt bench memory --backbone vit_base_patch16_384 --input-size 512 --batch-size 16 --plot --out "$OUT" \
    | tee "$OUT/memory_512.md"

# 2. Resolution sweep, simulated meter (the measured one cannot hold full fine-tuning at 1024 px and up
#    in 24 GiB, nor run the baselines at 2048 px on a CPU in reasonable time).
fpt bench memory --backbone vit_base_patch16_384 --batch-size 16 --sweep-input-size 224,512,1024,2048 \
    --meters simulated --out "$OUT" | tee "$OUT/memory_sweep.md"

# 3. Accuracy on the demo data (the demo's 460 synthetic fundus images) with the demo's LPM, identical
#    settings for every method (about 75 min on 2 CPU cores).
fpt synth "$OUT/demo_data"
fpt bench accuracy "$OUT/demo_data" --backbone demo --input-size 512 --epochs 8 --lr 1e-3 --warmup-epochs 1 \
    --batch-size 16 --methods full,linear,vpt-deep,lora,adapter,side-only,fpt,fpt+ --out "$OUT/accuracy" \
    --cache "$OUT/cache"

# 4. The same for full fine-tuning and FPT+ at lr 1e-4 (lr 1e-3 is too high for full fine-tuning).
fpt bench accuracy "$OUT/demo_data" --backbone demo --input-size 512 --epochs 8 --lr 1e-4 --warmup-epochs 1 \
    --batch-size 16 --methods full,fpt+ --out "$OUT/accuracy_lr1e-4" --cache "$OUT/cache"

# 5. Issue 10: the panel, and the demo's data as one more task (each FPT+ run 2-5 min on 2 CPU cores; runs
#    that finished are reused, so this can be stopped and rerun).
python benchmarks/panel.py "$OUT/panel"
fpt synth "$OUT/panel/demo"
TASKS=binary-imbalanced-small,multigrade-small
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks $TASKS --seeds 0 \
    --variant "paper=--recipe paper" --variant "lr1e-3=--lr 1e-3" --variant "lr1e-3-balanced=--lr 1e-3 --balanced" \
    --variant "lr1e-3-steps1000=--lr 1e-3 --min-steps 1000"
RAW="--feature-norm none"  # the probe before it standardised its embedding
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods linear --tasks $TASKS,demo --seeds 0,1,2 \
    --variant "lr1e-3=$RAW --lr 1e-3" --variant "lr1e-2=$RAW --lr 1e-2" --variant "lr1e-1=$RAW --lr 1e-1" \
    --variant "lr1=$RAW --lr 1" --test --best-of-variants
PREVIOUS="--prompt-dropout 0.5 --side-attention-init trunc_normal"  # the defaults before the third screening
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks $TASKS,demo --seeds 0,1,2 \
    --variant "paper=--recipe paper" --variant "default=$PREVIOUS" --variant "v2=" --test
# the third screening (a few epochs per change; CHANGE from benchmarks/screen_start.py, or none with OPTIONS)
python benchmarks/screen_start.py --change head-zero --epochs-shown 8 -- train "$OUT/panel/multigrade-small" \
    --backbone demo --input-size 512 --seed 0 --cache "$OUT/ablation/cache/multigrade-small/fpt+" \
    --run "$OUT/screen/head-zero" $PREVIOUS
# each of the two changes alone, on full runs (validation)
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks multigrade-small,demo --seeds 0,1,2 \
    --variant "default=$PREVIOUS" --variant "v2-dropout0.5=--prompt-dropout 0.5" \
    --variant "v2-trunc-normal=--side-attention-init trunc_normal" --variant "v2="
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt --tasks demo,multigrade-small --seeds 0,1,2 \
    --variant "v2=" --test
# multigrade-imbalanced-768 (FPT+ at its defaults; the raw probe over its lr grid), and binary-large with one shared
# LPM pass for both caches (`--shared-preload`)
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks multigrade-imbalanced-768 --seeds 0,1,2 \
    --variant "v2=" --test
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods linear --tasks multigrade-imbalanced-768 \
    --seeds 0,1,2 --variant "lr1e-3=$RAW --lr 1e-3" --variant "lr1e-2=$RAW --lr 1e-2" --variant "lr1e-1=$RAW --lr 1e-1" \
    --variant "lr1=$RAW --lr 1" --test --best-of-variants
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+,linear --tasks binary-large --seeds 0 \
    --variant "v2=" --shared-preload --test

# the probe standardised (today's default) over its lr grid on all five tasks, and a converged logistic
# regression on the same cached embeddings as a reference
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods linear \
    --tasks binary-imbalanced-small,multigrade-small,demo,multigrade-imbalanced-768,binary-large --seeds 0,1,2 \
    --variant "std-lr1e-3=--lr 1e-3" --variant "std-lr1e-2=--lr 1e-2" --variant "std-lr1e-1=--lr 1e-1" \
    --variant "std-lr1=--lr 1" --test --best-of-variants
python benchmarks/probe_reference.py "$OUT/panel" "$OUT/ablation/cache" binary-imbalanced-small multigrade-small demo \
    multigrade-imbalanced-768 binary-large | tee "$OUT/probe_reference.txt"
# the step minimum (the default since: at least 500 steps for FPT, FPT+, side-only and the probe; "epochs20" is the
# schedule before it; the "v2=" and "default=" variants above ran before it too)
for METHOD in fpt+ linear; do
  python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods $METHOD \
      --tasks binary-imbalanced-small,multigrade-small,multigrade-imbalanced-768,demo --seeds 0,1,2 \
      --variant "epochs20=--min-steps 0" --variant "steps500=" --variant "steps1000=--min-steps 1000" --test
done
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt --tasks binary-imbalanced-small --seeds 0,1,2 \
    --variant "epochs20=--min-steps 0" --variant "steps500=" --test

# the token selection, the schedule's decay and a higher learning rate (none became a default), binary-large's seeds;
# the defaults keep the variant names of the runs above ("steps500", "v2"; BENCHMARKS.md calls them "today"), so the
# runs that finished there are reused
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks binary-imbalanced-small \
    --seeds 0,1,2,3,4 --variant "steps500=" --variant "ratio1=--token-ratio 1" \
    --variant "decay0.3=--decay-fraction 0.3" --variant "lr3e-3=--lr 3e-3" --test
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks multigrade-small --seeds 0,1,2 \
    --variant "steps500=" --variant "decay0.3=--decay-fraction 0.3" --test
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt --tasks binary-imbalanced-small,multigrade-small \
    --seeds 0,1,2 --variant "steps500=" --variant "lr3e-3=--lr 3e-3" --test
python benchmarks/ablate.py "$OUT/panel" "$OUT/ablation" --methods fpt+ --tasks binary-large --seeds 0,1,2 \
    --variant "v2=" --test
# each cached method at its best of 0.3x, 1x and 3x its own default learning rate (chosen on validation)
for TASK in demo:512 multigrade-small:512 binary-imbalanced-small/labels.csv:512 \
    multigrade-imbalanced-768/labels.csv:768; do
  DATA=${TASK%:*}
  fpt bench accuracy "$OUT/panel/$DATA" --backbone demo --input-size "${TASK#*:}" \
      --methods linear,side-only,fpt,fpt+ --lr-scales 0.3,1,3 --cache "$OUT/accuracy_lr/cache/${DATA%%/*}" \
      --out "$OUT/accuracy_lr/${DATA%%/*}"
done

# 6. Issue 11: what the cache's content hashes and record checksums cost (on against off, interleaved)
fpt synth "$OUT/vc120" --train 80 --val 20 --test 20
python benchmarks/verification_cost.py "$OUT/vc120" --repeats 3 --epochs 3 | tee "$OUT/verification_cost.md"

# 7. Issue 12: preload throughput, one process and two (torchrun, gloo on this CPU), against a bare forward of the
#    same backbone (ViT-B/16 with random weights) on the same images; on a CUDA machine, benchmarks/gpu_check.sh
fpt synth "$OUT/tp64" --train 48 --val 8 --test 8
python benchmarks/preload_throughput.py "$OUT/tp64" --processes 1,2 --repeats 2 --out "$OUT/preload_throughput.json"
