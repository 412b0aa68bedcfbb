#!/usr/bin/env bash
# The quickstart's training speed before and after a change, interleaved in one run:
#   bash benchmarks/small_data_before_after.sh BEFORE_COMMIT AFTER_COMMIT [ROUNDS]
# Each round trains the quickstart config for 400 steps (no evaluation until the end, no
# checkpoint until the end) once per commit, from clones under /tmp, with this checkout's
# Python; prints each run's wall time and its median images/s over the log lines after the
# first (compilation).
set -euo pipefail
before=$1 after=$2 rounds=${3:-2}
python=${PYTHON:-python}
repo=$(git rev-parse --show-toplevel)
for name in before after; do
  rm -rf "/tmp/small_data_$name" && git clone -q "$repo" "/tmp/small_data_$name"
  git -C "/tmp/small_data_$name" checkout -q "${!name}"
done
for round in $(seq "$rounds"); do
  for name in before after; do
    workdir=$(mktemp -d)
    start=$(date +%s.%N)
    (cd "/tmp/small_data_$name" && "$python" -m train --config train/configs/quickstart.py \
      --workdir "$workdir" --config.num_train_steps=400 --config.eval_every_steps=0 \
      --config.checkpoint_every_steps=0 >/dev/null 2>&1)
    end=$(date +%s.%N)
    "$python" - "$name" "$round" "$start" "$end" "$workdir/metrics.jsonl" <<'PY'
import json, statistics, sys
name, round_, start, end, path = sys.argv[1:]
rates = [r['images_per_sec'] for r in map(json.loads, open(path)) if 'images_per_sec' in r]
print(f'{name} round {round_}: wall {float(end) - float(start):.1f} s, median images/s '
      f'{statistics.median(rates[1:]):.0f}')
PY
    rm -rf "$workdir"
  done
done
