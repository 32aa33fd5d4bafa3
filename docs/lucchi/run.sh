#!/usr/bin/env bash
# Reproduces the Lucchi++ table of docs/lucchi.md: three tiny-cpu variants, same seed and
# budget, each trained on slices 0-129 and validated on 130-164 once at the end.
#   docs/lucchi/run.sh [DATA.h5] [OUT_DIR]
# Two variants run at a time, one thread each (the machine has 2 cores).
set -euo pipefail
data=${1:-../shared/data/lucchi_pp_train.h5}
out=${2:-runs/lucchi}
here=$(cd "$(dirname "$0")" && pwd)
stt=${STT:-stt}
train() {
  OMP_NUM_THREADS=1 $stt train --config "$here/$1.yaml" --image "$data:image" --label "$data:label" \
    --val-z 130:165 --minutes 30 --out "$out/$1" > "$out/$1.log" 2>&1
}
mkdir -p "$out"
train baseline & train sst-fgbg & wait
train sst
python "$here/table.py" "$out"
