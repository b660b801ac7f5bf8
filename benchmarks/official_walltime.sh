#!/bin/sh
# A short FPT+ training from a feature cache, fpt against the official code (issue 12): wall time of the whole
# command and, for fpt, the training steps alone (metrics.jsonl's seconds_per_step).
#
#   sh benchmarks/official_walltime.sh OFFICIAL_DIR OFFICIAL_PYTHON OUT [REPEATS]
#
# OFFICIAL_DIR: a checkout of the official FPT code; OFFICIAL_PYTHON: a Python with its requirements (hydra-core,
# torcheval, transformers 4.x, torch). Both train FPT+ (ViT-B/16 with random weights, saved once as a Hugging Face
# directory, 512 px, layers 6-11, 16 prompts, token ratio 0.2, batch 16, lr 1e-4, 2 epochs, 2 loader workers) on
# the same 64 synthetic images (`fpt synth`: 48 training, 8 validation, 8 test), each from its own float32 cache of
# them, built once first and not timed. The runs are interleaved, REPEATS times (default 2); a last line gives
# both medians, their ratio, the median of the pairs' ratios and how many pairs fpt won. Results go to
# OUT/walltime.txt.
set -eu
OFFICIAL=$(cd "$1" && pwd)
OFFICIAL_PYTHON=$2
mkdir -p "$3"
OUT=$(cd "$3" && pwd)
REPEATS=${4:-2}
FPT=${FPT:-fpt}
PYTHON=${PYTHON:-python}
COMMON="base.device=cpu train.num_workers=2 train.batch_size=16 base.random_seed=0 base.progress=false"
DATASET="dataset=customized ++dataset.data_path=$OUT/data ++dataset.num_classes=4 ++dataset.input_size=512"
DATASET="$DATASET ++dataset.mean=[0.5,0.5,0.5] ++dataset.std=[0.5,0.5,0.5] ++network.pretrained_path=$OUT/vitb"

[ -d "$OUT/data" ] || "$FPT" synth "$OUT/data" --train 48 --val 8 --test 8
[ -d "$OUT/vitb" ] || "$PYTHON" -c "
import torch, transformers
torch.manual_seed(0)
config = transformers.ViTConfig(image_size=384, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                num_attention_heads=12, intermediate_size=3072)
transformers.ViTModel(config, add_pooling_layer=False).save_pretrained('$OUT/vitb')"
if [ ! -d "$OUT/official_cache" ]; then
  (cd "$OFFICIAL" && "$OFFICIAL_PYTHON" preload.py $DATASET $COMMON "++dataset.preload_path=$OUT/official_cache" \
    "hydra.run.dir=$OUT/hydra/preload")
fi
"$FPT" preload "$OUT/data" --backbone "$OUT/vitb" --method fpt+ --input-size 512 --cache "$OUT/fpt_cache" \
  --cache-dtype float32 --batch-size 16 --workers 2 --device cpu

echo "run seconds" > "$OUT/walltime.txt"
repeat=1
while [ "$repeat" -le "$REPEATS" ]; do
  start=$(date +%s.%N)
  (cd "$OFFICIAL" && "$OFFICIAL_PYTHON" main.py $DATASET $COMMON "++dataset.preload_path=$OUT/official_cache" \
    "++dataset.save_path=$OUT/official_run_$repeat" train.epochs=2 base.overwrite=true \
    "hydra.run.dir=$OUT/hydra/run_$repeat") > "$OUT/official_run_$repeat.log" 2>&1
  end=$(date +%s.%N)
  echo "official_$repeat $("$PYTHON" -c "print(round($end - $start, 1))")" >> "$OUT/walltime.txt"

  rm -rf "$OUT/fpt_run_$repeat"
  start=$(date +%s.%N)
  "$FPT" train "$OUT/data" --run "$OUT/fpt_run_$repeat" --backbone "$OUT/vitb" --method fpt+ --input-size 512 \
    --cache "$OUT/fpt_cache" --cache-dtype float32 --epochs 2 --batch-size 16 --workers 2 --device cpu \
    --lr 1e-4 --seed 0 > "$OUT/fpt_run_$repeat.log" 2>&1
  end=$(date +%s.%N)
  echo "fpt_$repeat $("$PYTHON" -c "print(round($end - $start, 1))")" >> "$OUT/walltime.txt"
  "$PYTHON" -c "
import json
lines = [json.loads(line) for line in open('$OUT/fpt_run_$repeat/metrics.jsonl')]
steps = 3  # 48 training images in batches of 16
print('fpt_${repeat}_training_steps', round(sum(line['seconds_per_step'] * steps for line in lines), 1),
      'seconds_per_step', [round(line['seconds_per_step'], 3) for line in lines])" >> "$OUT/walltime.txt"
  repeat=$((repeat + 1))
done
"$PYTHON" -c "
import re, statistics
text = open('$OUT/walltime.txt').read()
official, fpt = ([float(x) for x in re.findall(rf'^{name}_\d+ ([\d.]+)$', text, re.M)] for name in ('official', 'fpt'))
ratios = [mine / theirs for mine, theirs in zip(fpt, official)]
print('medians official', round(statistics.median(official), 2), 'fpt', round(statistics.median(fpt), 2),
      'fpt/official', round(statistics.median(fpt) / statistics.median(official), 3),
      'median_pair_ratio', round(statistics.median(ratios), 3), 'fpt_faster_pairs', sum(r < 1 for r in ratios), 'of', len(ratios))
" >> "$OUT/walltime.txt"
cat "$OUT/walltime.txt"
