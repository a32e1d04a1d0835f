#!/usr/bin/env bash
# The main job in one command, on a CPU in under an hour: set up, build the data, train the
# vanilla and the meta run of configs/cpu.py, read their learning dynamics, compare them, fine-tune
# both on Universal NER, test how fast each adapts to new text, sample from both, and report.
#
#   bash run_cpu.sh                          # online: streams the corpus, downloads BPE and UNER
#   TEXT=corpus/ UNER=uner/ bash run_cpu.sh  # offline: local text and UNER files
#   FORCE=1 bash run_cpu.sh                  # redo every stage (else a rerun skips finished ones)
#
# TEXT: a folder with *train*.txt and *valid*.txt (documents separated by blank lines), or one
# file (its first 500k tokens become val). Without TEXT the corpus is the first 10M tokens of
# HuggingFaceFW/fineweb-edu (sample-10BT), streamed; licence ODC-By 1.0. Offline, point
# TIKTOKEN_CACHE_DIR at a cache holding the GPT-2 BPE. UNER: a folder of UNER_*/ (else ner_eval.py
# downloads the two sets it needs). OUT (default out/cpu) and DATA (default data/cpu) set where
# everything goes.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/cpu}
DATA=${DATA:-data/cpu}
FORCE=${FORCE:-0}
t_all=$(date +%s)

stage() {  # stage NAME DONE-FILE COMMAND...: run COMMAND unless DONE-FILE exists
  local name=$1 done=$2 t0
  shift 2
  if [ "$FORCE" != 1 ] && [ -e "$done" ]; then
    echo "== $name: done before ($done exists; FORCE=1 redoes it)"
    return
  fi
  echo "== $name"
  t0=$(date +%s)
  "$@"
  echo "== $name: $(( $(date +%s) - t0 )) s"
}

if [ ! -x .venv/bin/python ]; then
  stage "environment (.venv)" .venv/bin/python bash -c \
    "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt"
fi
PY=.venv/bin/python

if ! $PY -c "import common; common.get_encoding('gpt2')" 2>/dev/null; then
  echo "cannot load the GPT-2 BPE: tiktoken downloads it on first use, which needs the network;" \
       "offline, set TIKTOKEN_CACHE_DIR to a folder that caches it" >&2
  exit 1
fi

if [ -n "${TEXT:-}" ] && [ -d "$TEXT" ]; then
  source_args=(--text "$TEXT"/*train*.txt --val_text "$TEXT"/*valid*.txt)
elif [ -n "${TEXT:-}" ]; then
  source_args=(--text "$TEXT" --val_tokens 500000)
else
  source_args=(--dataset HuggingFaceFW/fineweb-edu --name sample-10BT --max_tokens 10000000
               --val_tokens 500000)
fi
[ "$FORCE" = 1 ] && overwrite=(--overwrite) || overwrite=()
stage "data -> $DATA" "$DATA/meta.json" $PY prepare.py "${source_args[@]}" --out "$DATA" \
  "${overwrite[@]}"

train() {  # train RUN [KEY=VALUE...]: a fresh run, or the rest of an interrupted one
  local run=$OUT/$1
  shift
  local resume=False
  if [ "$FORCE" = 1 ]; then rm -rf "$run"; fi
  if [ -e "$run/ckpt.pt" ]; then resume=True; fi
  $PY meta_train.py configs/cpu.py --data_dir="$DATA" --out_dir="$run" --resume=$resume "$@"
}
stage "train vanilla -> $OUT/vanilla" "$OUT/vanilla/ckpt_000200.pt" train vanilla --meta_ratio=0
stage "train meta -> $OUT/meta" "$OUT/meta/ckpt_000200.pt" train meta

stage "learning dynamics" "$OUT/meta/analysis/summary.txt" bash -c \
  "$PY analyze.py $OUT/vanilla > /dev/null && $PY analyze.py $OUT/meta > /dev/null"
stage "comparison" "$OUT/compare/compare.txt" \
  $PY analyze.py --compare "$OUT/vanilla" "$OUT/meta" --out "$OUT/compare"

uner_args=()
if [ -n "${UNER:-}" ]; then uner_args=(--data_dir "$UNER"); fi
stage "NER (en_ewt, da_ddt; head and full)" "$OUT/ner.txt" bash -c \
  "$PY ner_eval.py --compare $OUT/vanilla/ckpt.pt $OUT/meta/ckpt.pt ${uner_args[*]:-} \
     --train_sets en_ewt da_ddt --test_sets en_ewt da_ddt --max_train_sentences 2000 \
     --max_eval_sentences 500 --lr 1e-3 --head_lr 1e-3 --threads 1 --out $OUT/ner.json \
     > $OUT/ner.txt.tmp && mv $OUT/ner.txt.tmp $OUT/ner.txt"
stage "adaptation to new text" "$OUT/adapt.txt" bash -c \
  "$PY adapt_eval.py $OUT/vanilla $OUT/meta --out $OUT/adapt.json > $OUT/adapt.txt.tmp \
     && mv $OUT/adapt.txt.tmp $OUT/adapt.txt"
stage "samples" "$OUT/samples.txt" bash -c \
  "{ $PY sample.py $OUT/vanilla --prompt 'The river' && $PY sample.py $OUT/meta \
     --prompt 'The river'; } > $OUT/samples.txt.tmp && mv $OUT/samples.txt.tmp $OUT/samples.txt"

echo
echo "== report ($(( $(date +%s) - t_all )) s in all)"
$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("vanilla", "meta"):
    rows = [json.loads(l) for l in open(os.path.join(out, name, "log.jsonl"))]
    last = [r for r in rows if r["val_loss"] is not None][-1]
    acc = f", val query acc {last['val_query_acc']:.3f}" if last["val_query_acc"] is not None else ""
    print(f"{name:8s} step {last['step']}: val loss {last['val_loss']:.4f}{acc}; "
          f"{last['flops']:.3g} FLOPs, {last['time']:.0f} s of training")
print()
print(open(os.path.join(out, "compare", "compare.txt")).read().split("\n\n", 1)[1])
ner = json.load(open(os.path.join(out, "ner.json")))
print("NER test F1 x100 of the final model (vanilla / meta):")
for key in ner["a"]["runs"]:
    cells = [f"{t} {100 * ner['a']['runs'][key]['test'][t]['final']['f1']:.1f} / "
             f"{100 * ner['b']['runs'][key]['test'][t]['final']['f1']:.1f}"
             for t in ner["a"]["test_sets"]]
    print(f"  {key:14s} " + "   ".join(cells))
print()
print(open(os.path.join(out, "adapt.txt")).read().strip().split("\n\n")[-1])
print()
print(open(os.path.join(out, "samples.txt")).read().strip())
print(f"\nplots: {out}/vanilla/analysis/*.png, {out}/meta/analysis/*.png, {out}/compare/compare.png,"
      f" {out}/adapt.png")
EOF
