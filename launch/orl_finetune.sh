#!/usr/bin/env bash
# The measurement of docs/RESULTS.md: insightface's buffalo_s recogniser
# fine-tuned on ORL people s1-s20 and tested on the unseen s21-s30, clean
# and with one face of each pair shrunk to 12 and 8 px; QGFace fine-tuning
# and the same recipe without its contrastive branch, three seeds each.
#
#   launch/orl_finetune.sh ../shared/fixtures OUT [SEEDS]
#
# FIXTURES holds faces/orl (s1-s12), faces/orl_more (s13-s30) and
# pretrained/w600k_mbf.onnx (insightface's file: non-commercial research
# licence; it is read, never copied). Every command is the one a user types;
# each run's wall time goes to OUT/times.txt, and the last step prints the
# table (launch/orl_table.py: every run, each method's mean over seeds).
#
# Other splits and settings (launch/orl_select.sh uses them): ORL_TUNED=N
# tunes on s1..sN and tests on the rest of s1..s$ORL_PEOPLE (default 20 of
# 30); ORL_WEIGHTS="W ..." runs QGFace at each contrastive weight
# (qgface_wW_SEED) instead of the recipe's own (qgface_SEED). ORL_FLAGS adds
# flags to every fine-tune; ORL_BASELINE=0 leaves out the AdaFace-only runs
# (for a flag that does not change them).
set -euo pipefail
fixtures=$(cd "$1" && pwd)
out=$2
seeds=${3:-"0 1 2"}
tuned=${ORL_TUNED:-20}
people=${ORL_PEOPLE:-30}
weights=${ORL_WEIGHTS:-}
baseline=${ORL_BASELINE:-1}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# One folder of photos per split, one sub-folder per person.
for i in $(seq 1 "$people"); do
  person="$fixtures/faces/orl/s$i"
  [ -d "$person" ] || person="$fixtures/faces/orl_more/s$i"
  split=$([ "$i" -le "$tuned" ] && echo train_photos || echo test_photos)
  mkdir -p "$out/$split"
  [ -d "$out/$split/s$i" ] || cp -r "$person" "$out/$split/s$i"
done

timed() {  # name, command...
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start)) s" >> "$out/times.txt"
}

set_name=orl_s1_s$tuned
[ -d "$out/tfds" ] || timed prepare python -m qgjt_jax.data.prepare \
    --format=image_folder --src="$out/train_photos" --align=detect \
    --image_size=112 --data_dir="$out/tfds" --name="$set_name"
[ -d "$out/w600k_mbf/checkpoints" ] || timed convert python -m qgjt_jax.convert \
    --src="$fixtures/pretrained/w600k_mbf.onnx" --workdir="$out/w600k_mbf"

evaluation=(--config.eval.folders="('$out/test_photos',)"
            --config.eval.align=detect --config.eval.low_res="(12, 8)")
[ -d "$out/w600k_mbf/eval" ] || timed pretrained python -m qgjt_jax.main \
    --workdir="$out/w600k_mbf" --mode=eval "${evaluation[@]}"

finetune=(--config=configs/finetune.py --config.init_from="$out/w600k_mbf"
          --config.data.tfds_name="face_image_folder/$set_name"
          --config.data.tfds_data_dir="$out/tfds" "${evaluation[@]}")
read -r -a extra <<< "${ORL_FLAGS:-}"
finetune+=("${extra[@]}")
for seed in $seeds; do
  if [ -z "$weights" ]; then
    [ -d "$out/qgface_$seed/eval" ] || timed "qgface_$seed" python -m \
        qgjt_jax.main "${finetune[@]}" --workdir="$out/qgface_$seed" \
        --config.seed="$seed"
  fi
  for weight in $weights; do
    run="qgface_w${weight}_$seed"
    [ -d "$out/$run/eval" ] || timed "$run" python -m qgjt_jax.main \
        "${finetune[@]}" --workdir="$out/$run" --config.seed="$seed" \
        --config.contrastive.weight="$weight"
  done
  [ "$baseline" = 0 ] || [ -d "$out/adaface_$seed/eval" ] || timed "adaface_$seed" python -m \
      qgjt_jax.main "${finetune[@]}" --workdir="$out/adaface_$seed" \
      --config.seed="$seed" --config.queue.kind=none \
      --config.contrastive.weight=0.0
done

python "$(dirname "$0")/orl_table.py" "$out"
