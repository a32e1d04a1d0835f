#!/usr/bin/env bash
# The main job in one command, about 18 minutes on 2 CPU cores with local data: set up, build the
# data, train the vanilla and the meta run of configs/cpu.py, read their learning dynamics, compare
# them, fine-tune both on Universal NER, test how fast each adapts to new text, sample from both,
# and report.
#
#   bash run_cpu.sh                          # online: streams the corpus, downloads BPE and UNER
#   TEXT=corpus/ UNER=uner/ bash run_cpu.sh  # offline: local text and UNER files
#   FORCE=1 bash run_cpu.sh                  # redo every stage
#
# A rerun skips a stage whose output is newer than what it reads (an interrupted training run
# resumes). TEXT: a folder with *train*.txt and *valid*.txt (documents separated by blank lines),
# or one file (its first 500k tokens become val). Without TEXT the corpus is the first 10M tokens
# of HuggingFaceFW/fineweb-edu (sample-10BT), streamed; licence ODC-By 1.0. Offline, point
# TIKTOKEN_CACHE_DIR at a cache holding the GPT-2 BPE. UNER: a folder of UNER_*/ (else ner_eval.py
# downloads the two sets it needs). OUT (default out/cpu) and DATA (default data/cpu) set where
# everything goes.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/cpu}
DATA=${DATA:-data/cpu}
FORCE=${FORCE:-0}
PY=.venv/bin/python
t_all=$(date +%s)

stage() {  # stage NAME OUTPUT INPUT COMMAND...: run COMMAND unless OUTPUT is newer than INPUT
  local name=$1 output=$2 input=$3 t0  # INPUT "": OUTPUT existing is enough
  shift 3
  if [ "$FORCE" != 1 ] && [ -e "$output" ] && { [ -z "$input" ] || [ "$output" -nt "$input" ]; }
  then
    echo "== $name: done before ($output; FORCE=1 redoes it)"
    return
  fi
  echo "== $name"
  t0=$(date +%s)
  "$@"
  echo "== $name: $(( $(date +%s) - t0 )) s"
}

setup() {
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  touch .venv/.installed
}
stage "environment (.venv)" .venv/.installed requirements.txt setup

if ! err=$($PY -c "import tiktoken; tiktoken.get_encoding('gpt2')" 2>&1); then
  echo "cannot load the GPT-2 BPE (${err##*$'\n'}): tiktoken downloads it on first use, which" \
       "needs the network; offline, set TIKTOKEN_CACHE_DIR to a folder that caches it" >&2
  exit 1
fi

make_data() {
  local args
  if [ -n "${TEXT:-}" ] && [ -d "$TEXT" ]; then
    args=(--text "$TEXT"/*train*.txt --val_text "$TEXT"/*valid*.txt)
  elif [ -n "${TEXT:-}" ]; then
    args=(--text "$TEXT" --val_tokens 500000)
  else
    args=(--dataset HuggingFaceFW/fineweb-edu --name sample-10BT --max_tokens 10000000
          --val_tokens 500000)
  fi
  $PY prepare.py "${args[@]}" --out "$DATA" --overwrite
}
stage "data -> $DATA" "$DATA/meta.json" "" make_data
# an index written before SMLMT classes became whole words (no "spellings") is rebuilt (seconds);
# the runs that used it are then redone, as their data changed
if ! grep -q '"spellings"' "$DATA/meta.json"; then
  $PY prepare.py --reindex --out "$DATA"
fi

train() {  # train RUN KEY=VALUE...: a fresh run, or the rest of an interrupted one
  local run=$OUT/$1 resume=False
  shift
  if [ "$FORCE" = 1 ]; then rm -rf "$run"; fi
  if compgen -G "$run/ckpt*.pt" > /dev/null; then resume=True; fi
  $PY meta_train.py configs/cpu.py --data_dir="$DATA" --out_dir="$run" --resume=$resume "$@"
}
final=ckpt_000400.pt  # the checkpoint of configs/cpu.py's max_steps: the run is finished
stage "train vanilla -> $OUT/vanilla" "$OUT/vanilla/$final" "$DATA/meta.json" \
  train vanilla --meta_ratio=0
stage "train meta -> $OUT/meta" "$OUT/meta/$final" "$DATA/meta.json" train meta
last=$OUT/meta/ckpt.pt  # the newest of what the stages below read
if [ "$OUT/vanilla/ckpt.pt" -nt "$last" ]; then last=$OUT/vanilla/ckpt.pt; fi

dynamics() {
  $PY analyze.py "$OUT/vanilla" > /dev/null
  $PY analyze.py "$OUT/meta" > /dev/null
}
stage "learning dynamics" "$OUT/meta/analysis/summary.txt" "$last" dynamics
stage "comparison" "$OUT/compare/compare.txt" "$last" \
  $PY analyze.py --compare "$OUT/vanilla" "$OUT/meta" --out "$OUT/compare"

ner() {
  local uner=()
  if [ -n "${UNER:-}" ]; then uner=(--data_dir "$UNER"); fi
  $PY ner_eval.py --compare "$OUT/vanilla/ckpt.pt" "$OUT/meta/ckpt.pt" ${uner[@]+"${uner[@]}"} \
    --train_sets en_ewt da_ddt --test_sets en_ewt da_ddt --max_train_sentences 2000 \
    --max_eval_sentences 500 --lr 1e-3 --head_lr 1e-3 --threads 1 --out "$OUT/ner.json" \
    > "$OUT/ner.txt.tmp"
  mv "$OUT/ner.txt.tmp" "$OUT/ner.txt"
}
stage "NER (en_ewt, da_ddt; head and full)" "$OUT/ner.txt" "$last" ner

adapt() {  # the proposal's inner loop (AdamW, warm-up then cosine), the same for both runs
  $PY adapt_eval.py "$OUT/vanilla" "$OUT/meta" --inner_optimizer=adamw --inner_lr=1e-3 \
    --inner_lr_schedule=cosine --inner_warmup_steps=2 --docs 8 --ks 1 4 --steps 0 5 \
    --out "$OUT/adapt.json" > "$OUT/adapt.txt.tmp"
  mv "$OUT/adapt.txt.tmp" "$OUT/adapt.txt"
}
stage "adaptation to new text" "$OUT/adapt.txt" "$last" adapt

samples() {
  { $PY sample.py "$OUT/vanilla" --prompt "The river"
    $PY sample.py "$OUT/meta" --prompt "The river"; } > "$OUT/samples.txt.tmp"
  mv "$OUT/samples.txt.tmp" "$OUT/samples.txt"
}
stage "samples" "$OUT/samples.txt" "$last" samples

echo
echo "== report ($(( $(date +%s) - t_all )) s in all)"
$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
need = ["vanilla/log.jsonl", "meta/log.jsonl", "compare/compare.txt", "ner.json", "adapt.txt",
        "samples.txt"]
missing = [p for p in need if not os.path.exists(os.path.join(out, p))]
if missing:
    sys.exit(f"missing {', '.join(missing)} in {out}: rerun run_cpu.sh")
for name in ("vanilla", "meta"):
    rows = [json.loads(l) for l in open(os.path.join(out, name, "log.jsonl"))]
    last = [r for r in rows if r["val_loss"] is not None][-1]
    acc = "".join(f", {k[4:].replace('_', ' ')} {last[k]:.3f} +- {last[k + '_se']:.3f}"
                  for k in ("val_query_acc", "val_query_acc0", "val_centroid_acc")
                  if last.get(k) is not None)
    print(f"{name:8s} step {last['step']}: val loss {last['val_loss']:.4f}{acc}; "
          f"{last['flops']:.3g} FLOPs, {last['time']:.0f} s of training")
print()
print(open(os.path.join(out, "compare", "compare.txt")).read().split("\n\n", 1)[1])
ner = json.load(open(os.path.join(out, "ner.json")))
print("NER test F1 x100 of the final model (vanilla / meta):")
for key in ner["a"]["runs"]:
    f1 = lambda r, t: 100 * r["runs"][key]["test"][t]["final"]["f1"]
    print(f"  {key:14s} " + "   ".join(f"{t} {f1(ner['a'], t):.1f} / {f1(ner['b'], t):.1f}"
                                       for t in ner["a"]["test_sets"]))
print()
print(open(os.path.join(out, "adapt.txt")).read().strip().split("\n\n")[-1])
print()
print(open(os.path.join(out, "samples.txt")).read().strip())
print(f"\nplots: {out}/vanilla/analysis/*.png, {out}/meta/analysis/*.png, "
      f"{out}/compare/compare.png, {out}/adapt.png")
EOF
