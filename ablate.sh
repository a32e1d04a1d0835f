#!/usr/bin/env bash
# The ablation table: configs/cpu.py for STEPS steps (default 1000) five ways, then the speedup
# against vanilla, adaptation to new text and en_ewt NER of every final checkpoint.
#   bash ablate.sh                       # after run_cpu.sh has built DATA (default data/cpu)
#   STEPS=500 RUNS="vanilla smlmt smlmt-inner0 positions" UNER=path/to/uner bash ablate.sh
#                                        # RESULTS.md's table (about 25 min on 2 cores)
# Results go to OUT (default out/ablate). A rerun skips what is done; a rerun with a larger STEPS
# extends the finished runs exactly (the lr does not decay to max_steps) and redoes the results.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/ablate}
DATA=${DATA:-data/cpu}
STEPS=${STEPS:-1000}
PY=.venv/bin/python
# RUNS picks some of them: RUNS="vanilla lm-adamw" bash ablate.sh
ALL="vanilla smlmt smlmt-inner0 positions lm-adamw"
read -r -a ORDER <<< "${RUNS:-$ALL}"
for name in "${ORDER[@]}"; do  # a typo would train the default (SMLMT) run under its name
  if [[ " $ALL " != *" $name "* ]]; then
    echo "ablate.sh: unknown run '$name' in RUNS; valid: $ALL" >&2
    exit 1
  fi
done
if [[ ! "$STEPS" =~ ^[1-9][0-9]*$ ]]; then
  echo "ablate.sh: STEPS must be a positive whole number, got '$STEPS'" >&2
  exit 1
fi
keys() {  # the config keys of each run
  case $1 in
    vanilla) echo "--meta_ratio=0" ;;
    smlmt) echo "" ;;
    smlmt-inner0) echo "--inner_steps=0" ;;  # multitask: the extra supervision, no adaptation
    # the paper code's shape: 8 sequences x 4 support positions = 32 classes at most, so none
    # is dropped; 2 episodes of 8 sequences read what an AR step of 16 does
    positions) echo "--meta_task=positions --n_way=32" ;;
    lm-adamw) echo "--meta_task=lm --inner_params=all --inner_optimizer=adamw --inner_lr=1e-3
                    --inner_lr_schedule=cosine --inner_warmup_steps=2" ;;
  esac
}
# these runs compare the paper's episode (the table predates configs/cpu.py's well-posed keys)
PAPER_EPISODE=(--meta_read=mask --meta_features=raw --inner_lr=0.1 --meta_loss_weight=1.0)
# the proposal's inner loop for the adaptation test, the same for every checkpoint; 8 documents,
# 1 or 4 support chunks, 0 or 5 steps keep it to minutes for five checkpoints on 2 cores
ADAPT=(--inner_optimizer=adamw --inner_lr=1e-3 --inner_lr_schedule=cosine --inner_warmup_steps=2
       --docs 8 --ks 1 4 --steps 0 5)
if [ ! -x "$PY" ] || [ ! -e "$DATA/meta.json" ]; then
  echo "ablate.sh: no $PY or no $DATA/meta.json: run bash run_cpu.sh first (it makes both)" >&2
  exit 1
fi
final=ckpt_$(printf %06d "$STEPS").pt
for name in "${ORDER[@]}"; do
  run=$OUT/$name
  if [ -e "$run/$final" ]; then echo "== $name: done"; continue; fi
  resume=False
  if compgen -G "$run/ckpt*.pt" > /dev/null; then resume=True; fi
  echo "== $name"
  # shellcheck disable=SC2046
  $PY meta_train.py configs/cpu.py --data_dir="$DATA" --out_dir="$run" --max_steps="$STEPS" \
    --eval_interval=100 --save_interval=100 --resume=$resume "${PAPER_EPISODE[@]}" $(keys "$name")
done
runs=("${ORDER[@]/#/$OUT/}")
current() {  # current FILE RUN...: FILE is newer than every run's last checkpoint
  local f=$1 r
  shift
  for r in "$@"; do [ "$f" -nt "$r/ckpt.pt" ] || return 1; done
}
current "$OUT/compare.txt" "${runs[@]}" ||
  $PY analyze.py --compare "${runs[@]}" --out "$OUT" > /dev/null
if ! current "$OUT/adapt.txt" "${runs[@]}"; then
  $PY adapt_eval.py "${runs[@]}" "${ADAPT[@]}" --out "$OUT/adapt.json" > "$OUT/adapt.txt.tmp"
  mv "$OUT/adapt.txt.tmp" "$OUT/adapt.txt"
fi
uner=()
if [ -n "${UNER:-}" ]; then uner=(--data_dir "$UNER"); fi
for name in "${ORDER[@]}"; do
  current "$OUT/ner_$name.json" "$OUT/$name" && continue
  $PY ner_eval.py "$OUT/$name" ${uner[@]+"${uner[@]}"} --train_sets en_ewt --test_sets en_ewt \
    --regime full --max_train_sentences 2000 --max_eval_sentences 500 --lr 1e-3 --threads 1 \
    --out "$OUT/ner_$name.json" > /dev/null
done
$PY - "$OUT" "${ORDER[@]}" <<'EOF'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
compare = open(os.path.join(out, "compare.txt")).read()
adapt = json.load(open(os.path.join(out, "adapt.json")))
k, s = max(adapt["ks"]), max(adapt["steps"])
print(f"{'run':14s} {'val loss':>8s} {'meta query acc':>14s} {'AR+meta tokens':>14s} {'FLOPs':>8s}"
      f" {'time s':>7s} {'adapt s=0':>9s} {f'k={k} s={s}':>9s} {'NER F1':>7s}")
for name in names:
    rows = [json.loads(l) for l in open(os.path.join(out, name, "log.jsonl"))]
    last = [r for r in rows if r["val_loss"] is not None][-1]
    run = next(v for key, v in adapt["runs"].items()
               if os.path.basename(os.path.dirname(key)) == name)
    mean = lambda v: sum(v) / len(v)
    a0, a1 = mean(run["curves"][str(k)]["0"]), mean(run["curves"][str(k)][str(s)])
    ner = json.load(open(os.path.join(out, f"ner_{name}.json")))
    f1 = ner["runs"]["en_ewt/full"]["test"]["en_ewt"]["final"]["f1"]
    acc = f"{last['val_query_acc']:.3f}" if last["val_query_acc"] is not None else "-"
    print(f"{name:14s} {last['val_loss']:8.4f} {acc:>14s} "
          f"{last['ar_tokens'] + last['meta_tokens']:>14,} {last['flops']:8.3g} {last['time']:7.0f}"
          f" {a0:9.4f} {a1:9.4f} {100 * f1:7.1f}")
print()
print(compare)
print(open(os.path.join(out, "adapt.txt")).read())
EOF
