#!/usr/bin/env bash
# How configs/finetune.py's contrastive weight was chosen (docs/RESULTS.md):
# on people the measurement never tests on. Fine-tuned on ORL s1-s14,
# validated on s15-s20 (both inside the measurement's training people
# s1-s20), at each contrastive weight and without the branch.
#
#   launch/orl_select.sh ../shared/fixtures OUT [WEIGHTS] [SEEDS]
#
# As launch/orl_finetune.sh, whose runs these are; OUT/test_photos holds
# the validation people.
ORL_TUNED=14 ORL_PEOPLE=20 ORL_WEIGHTS="${3:-1.0 0.3}" \
    exec "$(dirname "$0")/orl_finetune.sh" "$1" "$2" "${4:-0}"
