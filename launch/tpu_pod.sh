#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=ID] [--setup] \
#       [--dry_run] -- --config=configs/ms1m.py --workdir=gs://BUCKET/run1 \
#       --config.data.kind=tfds --config.data.tfds_name=insightface_rec/ms1mv2 \
#       --config.data.tfds_data_dir=gs://BUCKET/tfds
#
# --setup first copies this checkout to every worker (~/qgjt_jax) and installs
# it with jax[tpu]; without it only the training command runs (workers set up
# before). Everything after `--` goes to `python -m qgjt_jax.main`.
# Every worker runs one process; QGJT_DISTRIBUTED=1 makes each call
# jax.distributed.initialize(), which reads the slice's topology from the TPU
# metadata. The workdir and the data must be on storage every worker reads
# (gs://...): orbax writes each checkpoint from all workers together.
#
# DRY_RUN=1 or --dry_run prints the gcloud commands instead of running them.
set -euo pipefail

TPU="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
SETUP=0
DRY="${DRY_RUN:-0}"
REMOTE_DIR="${REMOTE_DIR:-qgjt_jax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --setup) SETUP=1 ;;
    --dry_run) DRY=1 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (training flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "usage: $0 --tpu=NAME --zone=ZONE [--project=ID] [--setup] [--dry_run] -- MAIN_FLAGS..." >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "no training flags after -- (at least --config and --workdir)" >&2
  exit 2
fi

# Prints (dry run) or runs one command, quoted so it can be pasted back.
run() {
  if [[ "$DRY" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && where+=(--project="$PROJECT")

# The training flags, quoted once more for the remote shell.
main_flags=$(printf '%q ' "$@")
train_cmd="cd ~/${REMOTE_DIR} && QGJT_DISTRIBUTED=1 python3 -m qgjt_jax.main ${main_flags% }"

if [[ "$SETUP" == "1" ]]; then
  repo_root=$(cd "$(dirname "$0")/.." && pwd)
  run "${gcloud_tpu[@]}" ssh "$TPU" "${where[@]}" --worker=all \
      --command="rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR}"
  run "${gcloud_tpu[@]}" scp --recurse "$repo_root/qgjt_jax" \
      "$repo_root/configs" "$repo_root/pyproject.toml" "$repo_root/setup.cfg" \
      "$repo_root/README.md" \
      "$TPU:~/${REMOTE_DIR}/" "${where[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "$TPU" "${where[@]}" --worker=all \
      --command="cd ~/${REMOTE_DIR} && python3 -m pip install -q -U '${JAX_SPEC}' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && python3 -m pip install -q -e ."
fi
run "${gcloud_tpu[@]}" ssh "$TPU" "${where[@]}" --worker=all \
    --command="$train_cmd"
