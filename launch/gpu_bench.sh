#!/usr/bin/env bash
# One device call: the calibration yardstick and qgjt_jax.bench, JSON lines.
#
#   launch/gpu_bench.sh            # calibration, IR-50 with and without the
#                                  # QGFace extras, IR-100 (batch 256 = 512
#                                  # images), then the optional variants
#   STAGES=core launch/gpu_bench.sh   # only the four required runs
#   DRY_RUN=1 launch/gpu_bench.sh     # print the commands
#   launch/gpu_bench.sh --prepare     # on the machine with ../shared: copy
#                                     # what a bare device checkout lacks
#
# Run from the repository root, on one GPU, with the machine's own python3
# (jax, flax, optax, numpy; ml_collections, which reads configs/ms1m.py, is
# installed from .carry/wheels when missing). Each command has its own time
# limit (STEP_TIMEOUT, seconds) so a stuck compile cannot take the rest with
# it; a failure prints a {"failed": ...} line and the script goes on. With
# $OUT set, every line also goes to $OUT/bench.jsonl and the log to
# $OUT/bench.log.
#
# The yardstick is ../shared/bench/calib_step.py. A device machine gets the
# repository only: `--prepare` copies the yardstick to .carry/calib_step.py
# and downloads the ml_collections and PyYAML wheels (cp312) to
# .carry/wheels, and keeps .carry/ out of git; carry .carry with the call.
set -uo pipefail
export PYTHONUNBUFFERED=1

PY="${PYTHON:-python3}"
STAGES="${STAGES:-all}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
DRY="${DRY_RUN:-0}"
[[ "${1:-}" == "--dry_run" ]] && DRY=1

if [[ "${1:-}" == "--prepare" ]]; then
  run() { if [[ "$DRY" == "1" ]]; then printf '%q ' "$@" | sed 's/ $//'; echo
          else "$@"; fi; }
  run mkdir -p .carry/wheels
  run cp ../shared/bench/calib_step.py .carry/calib_step.py
  run "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --no-deps -d .carry/wheels \
      ml_collections pyyaml
  if [[ "$DRY" != "1" ]] && ! grep -qx '/.carry/' .git/info/exclude 2>/dev/null; then
    echo '/.carry/' >> .git/info/exclude
  fi
  exit 0
fi
CALIB="${CALIB:-}"
if [[ -z "$CALIB" ]]; then
  for c in ../shared/bench/calib_step.py .carry/calib_step.py; do
    [[ -f "$c" ]] && CALIB="$c" && break
  done
fi
CALIB="${CALIB:-.carry/calib_step.py}"
JSONL="${OUT:+$OUT/bench.jsonl}"
LOG="${OUT:+$OUT/bench.log}"

step() {  # step NAME CMD...: run with a time limit, keep the JSON lines.
  local name="$1"; shift
  if [[ "$DRY" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'; echo
    return 0
  fi
  echo "== $name: $*" >&2
  local out rc
  out=$(timeout "$STEP_TIMEOUT" "$@" 2> >(tee -a "${LOG:-/dev/null}" >&2))
  rc=$?
  local json
  json=$(printf '%s\n' "$out" | grep '^{' | tail -n 1)
  if [[ $rc -ne 0 || -z "$json" ]]; then
    json="{\"failed\": \"$name\", \"rc\": $rc}"
  fi
  echo "$json"
  [[ -n "$JSONL" ]] && echo "$json" >> "$JSONL"
  return 0
}

if [[ "$DRY" != "1" ]]; then
  if ! "$PY" -c 'import ml_collections' 2>/dev/null && [[ -d .carry/wheels ]]; then
    "$PY" -m pip install --quiet --no-index --find-links .carry/wheels \
        ml_collections pyyaml >&2
  fi
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm \
      --format=csv,noheader 2>/dev/null || true
  "$PY" -c 'import jax, flax, optax; print({"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "devices": [d.device_kind for d in jax.devices()]})'
fi

bench=("$PY" -m qgjt_jax.bench)
step calib_ir50 "$PY" "$CALIB" --arch=50 --batch=512
step qgface_ir50 "${bench[@]}" --config.global_batch_size=256
step plain_ir50 "${bench[@]}" --config.global_batch_size=256 --no_qgface
step qgface_ir100 "${bench[@]}" --config.global_batch_size=256 \
    --config.model.name=ir100
if [[ "$STAGES" == "all" ]]; then
  # What the tensor-core classifier matmul buys (numerics change: bf16 logits).
  step qgface_ir50_bf16_logits "${bench[@]}" --config.global_batch_size=256 \
      --config.head.logits_dtype=bfloat16
  step calib_ir100 "$PY" "$CALIB" --arch=100 --batch=512
fi
