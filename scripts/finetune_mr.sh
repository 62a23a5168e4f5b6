#!/usr/bin/env bash
# Fine-tuning the shipped CT weights on MR-like synthetic data (issue 13), as measured in
# docs/benchmarks.md, section "Fine-tuning on MR-like data".
#
#   scripts/finetune_mr.sh [WORK]        (default WORK: /tmp/pddnet-mr; nothing is written in the repo)
#
# Environment: ITERS (75), LR (0.01), DW (diffusion weight, 0.5), THREADS (2), CKPT (checkpoint
# every N iterations, 25), SUBJECTS (subjects of the training set, 10: its split gives 4 training
# subjects; 14 gives 8), PDDNET (the CLI; default .venv/bin/pddnet, else pddnet on PATH).
#
# 1. data: a training set of 10 MR-like subjects (seed 21; split 4 train / 2 val / 4 test, the
#    training split is what fine-tuning sees), a held-out test set of a fresh seed (23; its
#    4 test subjects = 12 pairs). A selection set (seed 22) is written too, for choosing settings
#    without touching the test pairs.
# 2. baselines on the held-out pairs: initial Dice and the shipped CT weights as they are.
# 3. fine-tune from the shipped weights with the mr intensity mode; wall clock in WORK/ft.time.
# 4. evaluate the fine-tuned checkpoint on the held-out pairs; export it with probabilities and
#    register one held-out pair with the torch-free runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/pddnet-mr}"
ITERS="${ITERS:-75}"; LR="${LR:-0.01}"; DW="${DW:-0.5}"; THREADS="${THREADS:-2}"; CKPT="${CKPT:-25}"
SUBJECTS="${SUBJECTS:-10}"
P="${PDDNET:-}"
if [[ -z "$P" ]]; then
  if [[ -x .venv/bin/pddnet ]]; then P=.venv/bin/pddnet; else P=pddnet; fi
fi
INIT=src/pddnet/weights/pddnet_small.pt
mkdir -p "$WORK"

synth() {  # OUT SUBJECTS SEED
  [[ -f "$WORK/$1/PddnetSynth_dataset.json" ]] || \
    "$P" data synth --out "$WORK/$1" --subjects "$2" --seed "$3" --preset small --contrast mr --no-progress
}
synth mr-train "$SUBJECTS" 21
synth mr-select 8 22
synth mr-test 8 23

"$P" evaluate --checkpoint "$INIT" --data "$WORK/mr-test" --split test --threads "$THREADS" \
    --out "$WORK/eval_shipped_test.json"

echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" > "$WORK/ft.time"
"$P" train --data "$WORK/mr-train" --init "$INIT" --intensity mr --threads "$THREADS" \
    --lr "$LR" --diffusion-weight "$DW" --iterations "$ITERS" --checkpoint-every "$CKPT" --seed 0 \
    --out "$WORK/ft_mr.pt"
echo "end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$WORK/ft.time"
cat "$WORK/ft.time"

"$P" evaluate --checkpoint "$WORK/ft_mr.pt" --data "$WORK/mr-test" --split test --threads "$THREADS" \
    --out "$WORK/eval_ft_test.json"

"$P" export "$WORK/ft_mr.pt" --out "$WORK/mr.onnx" --probs
T="$WORK/mr-test"
"$P" register --model "$WORK/mr.onnx" \
    --fixed "$T/imagesTr/PddnetSynth_0005_0000.nii.gz" --fixed-labels "$T/labelsTr/PddnetSynth_0005_0000.nii.gz" \
    --moving "$T/imagesTr/PddnetSynth_0006_0000.nii.gz" --moving-labels "$T/labelsTr/PddnetSynth_0006_0000.nii.gz" \
    --out "$WORK/reg_0005_0006"
