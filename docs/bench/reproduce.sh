#!/usr/bin/env bash
# Every table and plot of the README's "Benchmarks and tuned defaults" and of docs/bench, in one command:
#   bash docs/bench/reproduce.sh [OUT]      (default results/bench; about 70 min on a quiet 2-core machine)
# Run it with nothing else on the machine: the rows are compared within a run, but noise widens every range.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-results/bench}"
BENCH=(.venv/bin/hvdkit bench)
mkdir -p "$OUT"
"${BENCH[@]}" allreduce --rounds 3 --out "$OUT"                                  # allreduce.*
for i in 1 2 3; do                                                             # the CNN, three runs
  "${BENCH[@]}" train --rounds "$([ "$i" = 1 ] && echo 3 || echo 2)" --out "$OUT/cnn-run$i"
done
cp "$OUT"/cnn-run1/train.* "$OUT"/                                             # train.*: the first run
"${BENCH[@]}" combine --out "$OUT" "$OUT"/cnn-run1 "$OUT"/cnn-run2 "$OUT"/cnn-run3   # train-runs.*
TORCH=hvdkit-torch,hvdkit-torch-horovodrun,raw-horovod-torch,torch-ddp,torch-nocomm
for i in 1 2 3; do                                                             # the wide MLP, three runs
  "${BENCH[@]}" train --model mlp --modes "$TORCH" --rounds 2 --out "$OUT/mlp-run$i"
done
cp "$OUT"/mlp-run1/train-mlp.* "$OUT"/
"${BENCH[@]}" combine --model mlp --out "$OUT" "$OUT"/mlp-run1 "$OUT"/mlp-run2 "$OUT"/mlp-run3   # train-mlp-runs.*
LEVERS=(--variant hvdkit-torch:HOROVOD_CYCLE_TIME=1 --variant hvdkit-torch:HOROVOD_CYCLE_TIME=5
        --variant hvdkit-torch:HOROVOD_CACHE_CAPACITY=0 --variant hvdkit-torch:HOROVOD_FUSION_THRESHOLD=134217728)
for model in mlp cnn; do                                                       # levers-*.md
  "${BENCH[@]}" train --model "$model" --modes hvdkit-torch,torch-ddp --workers 2 --rounds 3 "${LEVERS[@]}" \
    --out "$OUT/levers-$model"
  name=$([ "$model" = cnn ] && echo train || echo train-mlp)
  cp "$OUT/levers-$model/$name.md" "$OUT/levers-$model.md"
  cp "$OUT/levers-$model/$name.json" "$OUT/levers-$model.json"
done
"${BENCH[@]}" zero --rounds 2 --out "$OUT"                                       # zero.*
"${BENCH[@]}" overhead --rounds 9 --out "$OUT"                                   # overhead.*: the kit at 1 worker
echo "bench: everything in $OUT"
