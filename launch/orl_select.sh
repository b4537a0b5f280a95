#!/usr/bin/env bash
# How configs/finetune.py's contrastive weight was chosen: people the
# measurement of docs/RESULTS.md never tests on. Fine-tuned on ORL s1-s14,
# validated on s15-s20 (both inside RESULTS.md's training people s1-s20),
# once for each contrastive weight and once without the branch.
#
#   launch/orl_select.sh ../shared/fixtures OUT [WEIGHTS] [SEEDS]
#
# FIXTURES as in launch/orl_finetune.sh (the pretrained file is read, never
# copied). Each run's wall time goes to OUT/times.txt; the last step prints
# the table.
set -euo pipefail
fixtures=$(cd "$1" && pwd)
out=$2
weights=${3:-"1.0 0.3 0.1"}
seeds=${4:-"0"}
mkdir -p "$out"
out=$(cd "$out" && pwd)

for i in $(seq 1 20); do
  person="$fixtures/faces/orl/s$i"
  [ -d "$person" ] || person="$fixtures/faces/orl_more/s$i"
  split=$([ "$i" -le 14 ] && echo tune_photos || echo validation_photos)
  mkdir -p "$out/$split"
  [ -d "$out/$split/s$i" ] || cp -r "$person" "$out/$split/s$i"
done

timed() {  # name, command...
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start)) s" >> "$out/times.txt"
}

[ -d "$out/tfds" ] || timed prepare python -m qgjt_jax.data.prepare \
    --format=image_folder --src="$out/tune_photos" --align=detect \
    --image_size=112 --data_dir="$out/tfds" --name=orl_s1_s14
[ -d "$out/w600k_mbf/checkpoints" ] || timed convert python -m qgjt_jax.convert \
    --src="$fixtures/pretrained/w600k_mbf.onnx" --workdir="$out/w600k_mbf"

evaluation=(--config.eval.folders="('$out/validation_photos',)"
            --config.eval.align=detect --config.eval.low_res="(12, 8)")
[ -d "$out/w600k_mbf/eval" ] || timed pretrained python -m qgjt_jax.main \
    --workdir="$out/w600k_mbf" --mode=eval "${evaluation[@]}"

finetune=(--config=configs/finetune.py --config.init_from="$out/w600k_mbf"
          --config.data.tfds_name=face_image_folder/orl_s1_s14
          --config.data.tfds_data_dir="$out/tfds" "${evaluation[@]}")
for seed in $seeds; do
  for weight in $weights; do
    [ -d "$out/qgface_w${weight}_$seed/eval" ] || timed "qgface_w${weight}_$seed" \
        python -m qgjt_jax.main "${finetune[@]}" \
        --workdir="$out/qgface_w${weight}_$seed" --config.seed="$seed" \
        --config.contrastive.weight="$weight"
  done
  [ -d "$out/adaface_$seed/eval" ] || timed "adaface_$seed" python -m \
      qgjt_jax.main "${finetune[@]}" --workdir="$out/adaface_$seed" \
      --config.seed="$seed" --config.queue.kind=none \
      --config.contrastive.weight=0.0
done

python "$(dirname "$0")/orl_table.py" "$out" validation_photos
