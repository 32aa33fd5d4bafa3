#!/usr/bin/env bash
# Reproduces the Lucchi++ table of docs/lucchi.md: three tiny-cpu variants, same seed and
# budget, each trained on slices 0-129 and validated on 130-164 once at the end.
#   docs/lucchi/run.sh [DATA.h5] [OUT_DIR]
# One variant at a time, each with the whole machine (2 threads: the machine has 2 cores).
set -euo pipefail
data=${1:-../shared/data/lucchi_pp_train.h5}
out=${2:-runs/lucchi}
here=$(cd "$(dirname "$0")" && pwd)
stt=${STT:-stt}
train() {
  OMP_NUM_THREADS=${THREADS:-2} $stt train --config "$here/$1.yaml" --image "$data:image" --label "$data:label" \
    --val-z 130:165 --minutes 30 --out "$out/$1" > "$out/$1.log" 2>&1
}
mkdir -p "$out"
train baseline
train sst
train sst-fgbg
python "$here/table.py" "$out"
