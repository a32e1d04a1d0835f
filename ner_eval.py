"""
Universal NER evaluation of a nanoMAML checkpoint: fine-tune a token-tagging head on UNER training
sets, then score entity-level F1 on every UNER test set (other languages = cross-lingual transfer).

Two regimes, as in the paper: `head` freezes the backbone and trains a linear head on its final
hidden states (the features are computed once, so an epoch costs only the head); `full` trains every
weight. Defaults follow the paper: AdamW, lr 3e-5, batch 16, 10 epochs, linear decay, no warm-up.
For the head regime 3e-5 is very small (a linear probe on frozen features barely moves in 10
epochs); --head_lr sets its own, e.g. 1e-3. A word's label sits on its first sub-token, as in the
paper; under causal attention that token has not seen the rest of the word (in Chinese it is often
a byte fragment), so --label_subtoken last puts it on the last sub-token instead. The tables show
next to each test set's F1 how many of its gold entities the cut at --max_len puts out of reach.

    # train on all nine training sets together, test on every UNER test set, both regimes
    python ner_eval.py out/11m/ckpt.pt --data_dir path/to/uner
    # CPU-sized (about 3 minutes a checkpoint on one core): two languages, capped sentence counts,
    # and larger lrs, without which a few-million-parameter model scores about 0 in 10 epochs
    python ner_eval.py out/cpu-meta --data_dir path/to/uner --train_sets en_ewt da_ddt \\
        --test_sets en_ewt da_ddt --max_train_sentences 2000 --max_eval_sentences 500 \\
        --lr 1e-3 --head_lr 1e-3 --threads 1
    # two checkpoints side by side, with the difference
    python ner_eval.py --compare out/vanilla/ckpt.pt out/meta/ckpt.pt --data_dir path/to/uner

Without --data_dir the .iob2 files are downloaded from github.com/UniversalNER into --cache_dir.
The data is CC BY-SA: credit UNER (Mayhew et al., NAACL 2024) and the UD treebanks.
"""
import argparse
import copy
import glob
import hashlib
import io
import math
import os
import random
import re
import time
import urllib.request
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from model import Llama, ModelArgs

TYPES = ("PER", "ORG", "LOC")
LABELS = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]  # O, B-PER, I-PER, B-ORG, ...
LABEL_ID = {tag: i for i, tag in enumerate(LABELS)}
IGNORE = -100  # label of positions the loss skips: later sub-tokens of a word, padding

# The paper's training sets; `all` is their concatenation. Every other set is test-only.
TRAIN_SETS = ["da_ddt", "en_ewt", "hr_set", "pt_bosque", "sk_snk", "sr_set", "sv_talbanken",
              "zh_gsd", "zh_gsdsimp"]
# Universal NER v1: dataset name -> its repository github.com/UniversalNER/<repo>
UNER_REPOS = {
    "da_ddt": "UNER_Danish-DDT", "en_ewt": "UNER_English-EWT", "hr_set": "UNER_Croatian-SET",
    "pt_bosque": "UNER_Portuguese-Bosque", "sk_snk": "UNER_Slovak-SNK",
    "sr_set": "UNER_Serbian-SET", "sv_talbanken": "UNER_Swedish-Talbanken",
    "zh_gsd": "UNER_Chinese-GSD", "zh_gsdsimp": "UNER_Chinese-GSDSIMP",
    "en_pud": "UNER_English-PUD", "de_pud": "UNER_German-PUD", "pt_pud": "UNER_Portuguese-PUD",
    "ru_pud": "UNER_Russian-PUD", "sv_pud": "UNER_Swedish-PUD", "zh_pud": "UNER_Chinese-PUD",
    "ceb_gja": "UNER_Cebuano-GJA", "tl_trg": "UNER_Tagalog-TRG",
    "tl_ugnayan": "UNER_Tagalog-Ugnayan",
}
# languages written without spaces between words (the dataset name starts with the language code)
NO_SPACE_LANGS = {"zh", "ja", "th"}


def read_iob2(path):
    """Sentences of a UNER .iob2 file as (words, tags) pairs.
    Token lines are split on TAB only (a few tokens contain a space, e.g. Swedish 's k'); the token
    is column 2, the tag column 3, columns 4-5 are upstream bookkeeping. '#' lines are comments and
    a blank line ends a sentence. OTH (Croatian/Serbian only) is read as O, giving the usual three
    types. Any other tag is kept as written: a stray I-X stays I-X and get_spans reads it as B-X."""
    sents, words, tags = [], [], []
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
    # newline=None: \n, \r\n and \r all end a line, as when reading the file in text mode
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):
        line = line.rstrip("\n")
        if line.startswith("#"):
            continue
        if not line.strip():
            if words:
                sents.append((words, tags))
                words, tags = [], []
            continue
        cols = line.split("\t")
        if len(cols) < 3 or not cols[0].isdigit() or not cols[1]:
            raise ValueError(f"{path}:{lineno}: expected TAB-separated columns 'position, "
                             f"token, tag, ...', got {line!r}")
        tag = cols[2]
        prefix, _, typ = tag.partition("-")
        if typ == "OTH" and prefix in ("B", "I"):
            tag = "O"
        elif tag not in LABEL_ID:
            raise ValueError(f"{path}:{lineno}: tag {tag!r} is not O, B-X or I-X with X in "
                             f"{', '.join(TYPES)} (or OTH, read as O)")
        words.append(cols[1])
        tags.append(tag)
    if words:  # a file need not end with a blank line
        sents.append((words, tags))
    return sents


def find_datasets(data_dir):
    """{name: {split: path}} for every <data_dir>/UNER_*/<name>-ud-<split>.iob2."""
    found = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(data_dir, "UNER_*", "*-ud-*.iob2"))):
        m = re.fullmatch(r"(.+)-ud-(train|dev|test)\.iob2", os.path.basename(path))
        if m:
            found[m[1]][m[2]] = path
    return dict(found)


def download_uner(cache_dir, names):
    """Fetch the .iob2 files of the named datasets from their GitHub repositories into cache_dir,
    laid out as --data_dir expects; files already there are kept."""
    for name in names:
        if name not in UNER_REPOS:
            raise SystemExit(f"unknown UNER dataset {name!r}; known: {', '.join(UNER_REPOS)}")
        repo = UNER_REPOS[name]
        for split in ("train", "dev", "test") if name in TRAIN_SETS else ("test",):
            fname = f"{name}-ud-{split}.iob2"
            path = os.path.join(cache_dir, repo, fname)
            if os.path.exists(path):
                continue
            # HEAD is each repository's default branch (some use main, some master)
            url = f"https://raw.githubusercontent.com/UniversalNER/{repo}/HEAD/{fname}"
            print(f"downloading {url}")
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "nanoMAML ner_eval"})
                with urllib.request.urlopen(request, timeout=60) as r:
                    raw = r.read()
            except OSError as e:
                raise SystemExit(f"could not download {url}: {e}\n"
                                 f"pass --data_dir with a local copy of the UNER files instead")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # write, then rename: an interrupted fetch leaves no half file behind
            common.atomic_write(path, lambda f: f.write(raw))


def get_spans(tags):
    """Entity spans (type, start, end), end exclusive, of one IOB2 tag sequence. As in conlleval and
    seqeval's default mode, an I-X that does not continue an X span starts one (read as B-X)."""
    spans, typ, start = [], None, 0
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel O closes a span at the sentence end
        prefix, _, t = tag.partition("-")
        if typ is not None and (prefix != "I" or t != typ):
            spans.append((typ, start, i))
            typ = None
        if prefix in ("B", "I") and typ is None:
            typ, start = t, i
    return spans


def prf(correct, predicted, gold):
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "correct": correct, "predicted": predicted,
            "gold": gold}


def span_f1(gold, pred):
    """Micro precision / recall / F1 over exact (type, start, end) spans, and the same per type.
    gold, pred: lists of tag sequences, one per sentence. Nothing to score gives 0 (as seqeval)."""
    counts = defaultdict(lambda: [0, 0, 0])  # type -> [correct, predicted, gold]
    for g, p in zip(gold, pred, strict=True):
        if len(g) != len(p):
            raise ValueError(f"gold has {len(g)} tags but prediction {len(p)}")
        gs, ps = set(get_spans(g)), set(get_spans(p))
        for span in ps & gs:
            counts[span[0]][0] += 1
        for span in ps:
            counts[span[0]][1] += 1
        for span in gs:
            counts[span[0]][2] += 1
    total = [sum(c[k] for c in counts.values()) for k in range(3)]
    return {**prf(*total), "per_type": {t: prf(*counts[t]) for t in sorted(counts)}}


def uses_spaces(name):
    return name.split("_")[0] not in NO_SPACE_LANGS


def encode_sentence(words, tags, enc, max_len, spaces=True, subtoken="first"):
    """Tokenize one sentence word by word. With spaces, every word gets a leading space (GPT-2 BPE
    codes a word differently at the start of a text; ' word' is how it appears inside running
    text, and this way a word has the same tokens wherever it stands); Chinese words are coded as
    written. The label sits on a word's first sub-token (the paper's), or with subtoken 'last' on
    its last, which under causal attention is the only one that has seen the whole word; the
    other sub-tokens get IGNORE.
    Returns ids and labels (both at most max_len long), the gold tags of the whole sentence, the
    number of words that kept their label, whether the sentence was cut at max_len, its gold
    entities and how many of them the cut puts out of reach."""
    ids, labels = [], []
    for word, tag in zip(words, tags):
        toks = enc.encode_ordinary(" " + word if spaces else word)
        ids += toks
        rest = [IGNORE] * (len(toks) - 1)
        labels += [LABEL_ID[tag]] + rest if subtoken == "first" else rest + [LABEL_ID[tag]]
    cut = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    n_words = sum(label != IGNORE for label in labels)
    # the words that kept their label are the first n_words; the others are predicted O, so an
    # entity ending past them can never be found
    spans = get_spans(tags)
    return {"ids": ids, "labels": labels, "tags": tags, "n_words": n_words, "cut": cut,
            "entities": len(spans), "cut_entities": sum(end > n_words for _, _, end in spans)}


def encode_sentences(sents, enc, max_len, spaces=True, subtoken="first"):
    return [encode_sentence(words, tags, enc, max_len, spaces, subtoken) for words, tags in sents]


def word_features(model, batch, ctx):
    """Final hidden states at the labelled positions (one sub-token a word) of a batch of encoded
    sentences: features (N, C) and label ids (N,), N = labelled words in the batch, in order."""
    device = model.tok_embeddings.weight.device
    T = max(len(e["ids"]) for e in batch)
    # right padding needs no attention mask: attention is causal, so pads never reach real tokens
    idx = torch.zeros(len(batch), T, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(batch):
        idx[b, :len(e["ids"])] = torch.tensor(e["ids"])
        labels[b, :len(e["labels"])] = torch.tensor(e["labels"])
    idx, labels = idx.to(device), labels.to(device)
    with ctx:
        hidden = model.hidden(idx)  # (B, T, C), without the vocabulary projection
    keep = labels != IGNORE
    return hidden[keep].float(), labels[keep]  # (N, C), (N,)


def by_length(examples, batch_size):
    """Batches of example indices, similar lengths together: little padding when scoring."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def cache_features(model, examples, cache, args, ctx):
    """Frozen-backbone features of every example not yet in cache (keyed by id(example)): each
    sentence runs through the backbone once per checkpoint, however many epochs and heads use it."""
    todo = [e for e in examples if id(e) not in cache]
    todo = list({id(e): e for e in todo}.values())  # `all` shares its examples with each language
    model.eval()
    for batch in tqdm(by_length(todo, args.eval_batch_size), desc="features", leave=False,
                      disable=None):
        feats, _ = word_features(model, [todo[i] for i in batch], ctx)
        for i, f in zip(batch, feats.split([todo[i]["n_words"] for i in batch])):
            cache[id(todo[i])] = f


@torch.no_grad()
def predict(model, head, examples, args, ctx, cache=None):
    """Predicted tag sequence of every example, as long as its gold tags (words that max_len cut
    off are predicted O, so a cut sentence loses recall instead of leaving the score)."""
    model.eval()
    preds = [None] * len(examples)
    for batch in tqdm(by_length(examples, args.eval_batch_size), desc="predict", leave=False,
                      disable=None):
        exs = [examples[i] for i in batch]
        if cache is not None:
            feats = torch.cat([cache[id(e)] for e in exs])
        else:
            feats, _ = word_features(model, exs, ctx)
        label_ids = head(feats).argmax(-1).tolist()
        for i, e in zip(batch, exs):
            tags = [LABELS[k] for k in label_ids[:e["n_words"]]]
            label_ids = label_ids[e["n_words"]:]
            preds[i] = tags + ["O"] * (len(e["tags"]) - len(tags))
    return preds


def score(model, head, examples, args, ctx, cache=None):
    return span_f1([e["tags"] for e in examples], predict(model, head, examples, args, ctx, cache))


def lr_at(step, total_steps, peak, args):
    """lr of an optimizer step, as Hugging Face's linear schedule: a linear warm-up over the first
    warmup_ratio of the steps (the paper: none), then linear decay to 0 (--decay none: constant)."""
    warmup = int(args.warmup_ratio * total_steps)
    if step < warmup:
        return peak * step / warmup
    if args.decay == "none":
        return peak
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def run_seed(*key):
    """A seed from what a run is (the str of each part), the same in every process: Python's
    hash() of a str changes from one process to the next."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch or numpy seed


def fine_tune(model, train, dev, tests, regime, args, ctx=nullcontext(), cache=None, name="ner"):
    """Train a linear tag head on the train examples, with the backbone frozen (regime 'head') or
    training too (regime 'full', which changes model in place). Reports the mean training loss and
    dev F1 after every epoch, and the test F1 of the final model and of the best-dev epoch.
    tests: {name: examples}. cache: frozen-backbone features to reuse across calls (regime head)."""
    if not train:
        raise ValueError(f"{name}: no training sentences")
    t0 = time.time()
    device = model.tok_embeddings.weight.device
    full = regime == "full"
    # every draw (head init, batch order) comes from generators keyed by what the run is, never
    # from the process's global RNG: a run gives the same numbers alone or after others in one
    # command (--compare, several training sets). The checkpoint is not part of the key: A and B
    # of a comparison start from the same head and see the same batches.
    seed = run_seed(name, regime, args.seed)
    rng = random.Random(seed)  # batch order
    head = nn.utils.skip_init(nn.Linear, model.args.dim, len(LABELS))
    bound = 1 / math.sqrt(model.args.dim)  # nn.Linear's default init, from our own generator
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    head = head.to(device)
    model.requires_grad_(full)
    model.output.requires_grad_(False)  # the vocabulary projection is not used for tagging
    if not full:
        cache = {} if cache is None else cache
        cache_features(model, train + dev + [e for exs in tests.values() for e in exs], cache,
                       args, ctx)
    else:
        cache = None  # the features change as the backbone trains
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    # The paper uses one lr, 3e-5, for both regimes, so that is the default. It suits fine-tuning
    # every weight; a linear probe on frozen features moves little at 3e-5 in 10 epochs (on the
    # synthetic task of tests/test_ner_eval.py: F1 9 at 3e-5, 34 at 3e-4, 97 at 1e-3), so
    # --head_lr gives the head regime its own.
    lr = args.lr if full or args.head_lr is None else args.head_lr
    # fused: one kernel for all parameters, far faster on a CPU than the per-tensor loop
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.beta1, args.beta2), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=True)
    total_steps = args.epochs * math.ceil(len(train) / args.batch_size)
    step, history, best = 0, [], None
    for epoch in range(1, args.epochs + 1):
        model.train(full)
        order = list(range(len(train)))
        rng.shuffle(order)
        losses = []
        for i in tqdm(range(0, len(order), args.batch_size), desc=f"{name} epoch {epoch}",
                      leave=False, disable=None):
            batch = [train[j] for j in order[i:i + args.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, lr, args)
            if full:
                feats, y = word_features(model, batch, ctx)
            else:
                feats = torch.cat([cache[id(e)] for e in batch])
                y = torch.tensor([k for e in batch for k in e["labels"] if k != IGNORE],
                                 device=device)
            loss = F.cross_entropy(head(feats), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        dev_f1 = score(model, head, dev, args, ctx, cache)["f1"]
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "dev_f1": dev_f1})
        print(f"{name} epoch {epoch}/{args.epochs}: train loss {history[-1]['train_loss']:.4f}, "
              f"dev F1 {100 * dev_f1:.1f} ({time.time() - t0:.0f}s)")
        if best is None or dev_f1 > best["dev_f1"]:
            # a copy of what trained: the head, and for `full` the backbone too (on the CPU)
            state = {"head": copy.deepcopy(head.state_dict())}
            if full:
                state["model"] = {k: v.detach().to("cpu", copy=True)
                                  for k, v in model.state_dict().items()}
            best = {"epoch": epoch, "dev_f1": dev_f1, "state": state}
    test = {t: {"final": score(model, head, exs, args, ctx, cache)} for t, exs in tests.items()}
    if best["epoch"] == args.epochs:
        for t in test:
            test[t]["best"] = test[t]["final"]
    else:
        head.load_state_dict(best["state"]["head"])
        if full:
            model.load_state_dict(best["state"]["model"])
        for t, exs in tests.items():
            test[t]["best"] = score(model, head, exs, args, ctx, cache)
    return {"regime": regime, "lr": lr, "train_sentences": len(train), "dev_sentences": len(dev),
            "steps": total_steps, "epochs": history, "best_epoch": best["epoch"],
            "best_dev_f1": best["dev_f1"], "test": test, "seconds": time.time() - t0}


def cap(sents, n, key):
    """At most n sentences: a random sample, the same one for every checkpoint and seed (the files
    are sorted by document, so their first n sentences would come from a few documents only)."""
    if not n or len(sents) <= n:
        return sents
    keep = sorted(random.Random(key).sample(range(len(sents)), n))
    return [sents[i] for i in keep]


def load_uner(args):
    """What a run needs, read once for every checkpoint: {"runs": [(train name, source sets)],
    "tests": [test set names], "sents": {name: {split: (capped) sentences}},
    "total": {name: {split: sentences before the cap}}}."""
    runs = []
    for t in args.train_sets:
        if t == "paper":
            runs += [(n, [n]) for n in TRAIN_SETS] + [("all", TRAIN_SETS)]
        elif t == "all":
            runs.append(("all", TRAIN_SETS))
        else:
            runs.append((t, [t]))
    runs = list({name: (name, sources) for name, sources in runs}.values())
    sources = list(dict.fromkeys(n for _, s in runs for n in s))
    where = args.data_dir or args.cache_dir
    if args.data_dir is None:
        names = sources + (args.test_sets or list(UNER_REPOS))
        download_uner(args.cache_dir, list(dict.fromkeys(names)))
    elif not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data_dir {args.data_dir}: no such directory")
    found = find_datasets(where)
    if not found:
        layout = os.path.join(where, "UNER_<Language>-<Treebank>", "<name>-ud-<split>.iob2")
        raise SystemExit(f"no UNER files under {where}: expected {layout}")
    trainable = [n for n in found if {"train", "dev"} <= set(found[n])]
    for n in sources:
        missing = [f"{n}-ud-{s}.iob2" for s in ("train", "dev") if s not in found.get(n, {})]
        if missing:
            raise SystemExit(f"training set {n!r}: no {' or '.join(missing)} under {where}/UNER_*/;"
                             f" training sets there: {' '.join(trainable) or 'none'}")
    # default: every test file present, the training sets' own first, then test-only ones (PUD, ...)
    testable = sorted((n for n in found if "test" in found[n]),
                      key=lambda n: (n not in TRAIN_SETS, n))
    tests = args.test_sets or testable
    for n in tests:
        if n not in testable:
            raise SystemExit(f"test set {n!r}: no {n}-ud-test.iob2 under {where}/UNER_*/; test "
                             f"sets there: {' '.join(testable) or 'none'}")
    needed = [(n, s) for n in sources for s in ("train", "dev")] + [(n, "test") for n in tests]
    uner = {"runs": runs, "tests": tests, "sents": defaultdict(dict), "total": defaultdict(dict)}
    for n, split in needed:
        path = found[n][split]
        try:
            sents = read_iob2(path)
        except ValueError as e:  # its message names the file and line: no traceback needed
            raise SystemExit(str(e)) from None
        # an error, not a warning: an empty test set would score 0 and pull the mean down, and
        # leaving it out silently would change which sets the mean covers
        if not sents:
            fix = ("leave the set out with --test_sets" if split == "test"
                   else "choose other --train_sets")
            raise SystemExit(f"{path}: no sentences (empty, or only comments and blank lines); "
                             f"fix the file or {fix}")
        limit = args.max_train_sentences if split == "train" else args.max_eval_sentences
        uner["sents"][n][split] = cap(sents, limit, f"{n}-{split}")
        uner["total"][n][split] = len(sents)
    return uner


def checkpoint_path(path):
    """common.checkpoint_path, checked before any long work."""
    file = common.checkpoint_path(path)
    if not os.path.isfile(file):
        raise SystemExit(f"checkpoint {file} not found")
    return file


def load_checkpoint(path, tokenizer=None):
    """The checkpoint dict and its tiktoken encoding (tokenizer: a name that overrides its own)."""
    try:
        return common.checkpoint_and_encoding(path, tokenizer, need=("model_args", "model"))
    except common.CheckpointError as e:
        raise SystemExit(str(e)) from None


def evaluate_checkpoint(path, uner, args):
    """Every (train set, regime) run on one checkpoint: a dict with every number and settings."""
    path = checkpoint_path(path)
    ckpt, enc = load_checkpoint(path, args.tokenizer)
    model_args = ModelArgs(**ckpt["model_args"])
    if enc.n_vocab > model_args.vocab_size:
        raise SystemExit(f"{path}: tokenizer {enc.name} has {enc.n_vocab} tokens but the model "
                         f"{model_args.vocab_size}; name the checkpoint's with --tokenizer")
    max_len = min(args.max_len, model_args.max_seq_len)
    try:
        env = common.init_device(args.device)
    except common.ConfigError as e:
        raise SystemExit(str(e)) from None
    ctx, bf16 = common.autocast(args.dtype, env.type)
    examples, sentences = defaultdict(dict), defaultdict(dict)
    for n, splits in uner["sents"].items():
        for split, sents in splits.items():
            exs = encode_sentences(sents, enc, max_len, uses_spaces(n), args.label_subtoken)
            examples[n][split] = exs
            sentences[n][split] = {"used": len(exs), "total": uner["total"][n][split],
                                   "cut": sum(e["cut"] for e in exs),
                                   "entities": sum(e["entities"] for e in exs),
                                   "cut_entities": sum(e["cut_entities"] for e in exs)}
    tests = {t: examples[t]["test"] for t in uner["tests"]}
    cache = {}  # frozen-backbone features, shared by every head-regime run of this checkpoint
    runs = {}
    for train_name, sources in uner["runs"]:
        train = [e for n in sources for e in examples[n]["train"]]
        dev = [e for n in sources for e in examples[n]["dev"]]
        # the F1-vs-examples curve: the first n of one fixed shuffle, so that every size holds
        # the smaller ones' sentences and every checkpoint sees the same
        order = random.Random(f"{train_name}-sizes").sample(range(len(train)), len(train))
        for size in args.train_sizes or [None]:
            subset = train if size is None else [train[i] for i in sorted(order[:size])]
            name = train_name if size is None else f"{train_name}@{len(subset)}"
            for regime in args.regime:
                key = f"{name}/{regime}"
                model = Llama.from_checkpoint(ckpt, env.dev)  # every run from the checkpoint
                runs[key] = {"train": train_name, "sources": sources, **fine_tune(
                    model, subset, dev, tests, regime, args, ctx, cache, key)}
    return {"checkpoint": path, "step": ckpt.get("step"), "model_args": ckpt["model_args"],
            "params": sum(v.numel() for v in ckpt["model"].values()), "tokenizer": enc.name,
            "max_len": max_len, "device": env.dev, "dtype": "bfloat16" if bf16 else "float32",
            "settings": vars(args), "test_sets": uner["tests"],
            "sentences": sentences, "runs": runs}


def format_settings(args, res):
    n = res["sentences"]
    used = sum(c["used"] for splits in n.values() for c in splits.values())
    cut = sum(c["cut"] for splits in n.values() for c in splits.values())
    lines = [f"{res['checkpoint']} (step {res['step']}, {res['params']:,} parameters, "
             f"tokenizer {res['tokenizer']})",
             f"epochs {args.epochs}, batch {args.batch_size}, lr {args.lr:g} (full) / "
             f"{args.head_lr or args.lr:g} (head), warm-up {args.warmup_ratio:g}, "
             f"{args.decay} decay, weight decay {args.weight_decay:g}, seed {args.seed}",
             f"sentences per file: train <= {args.max_train_sentences or 'all'}, dev and test <= "
             f"{args.max_eval_sentences or 'all'}; {cut} of {used} cut at {res['max_len']} tokens; "
             f"labels on each word's {args.label_subtoken} sub-token",
             f"{'sentences':<14}{'train':>14}{'dev':>14}{'test':>14}{'cut':>6}"]
    for name, splits in n.items():
        cells = [f"{splits[s]['used']}/{splits[s]['total']}" if s in splits else "-"
                 for s in ("train", "dev", "test")]
        cut = sum(c["cut"] for c in splits.values())
        lines.append(f"{name:<14}" + "".join(f"{c:>14}" for c in cells) + f"{cut:>6}")
    return "\n".join(lines)


def unreachable(res, test):
    """'cut/gold': the test set's gold entities that the cut at max_len puts out of reach."""
    n = res["sentences"][test]["test"]
    return f"{n['cut_entities']}/{n['entities']}"


def unreachable_note(max_len):
    return (f"unreachable: gold entities with a word that lost its label to the cut at {max_len} "
            f"tokens (recall <= 1 - unreachable/gold)")


def format_table(res, which):
    """Test F1 x 100: rows test sets, columns train set/regime, then the entities the cut at
    max_len puts out of reach; which = 'final' or 'best'."""
    runs, tests = res["runs"], res["test_sets"]
    w = max([12] + [len(c) + 2 for c in runs])

    def row(label, cells, cut=""):
        return (f"{label:<14}" + "".join(f"{c:>{w}}" for c in cells) + f"{cut:>13}").rstrip()

    f1 = {c: [r["test"][t][which]["f1"] for t in tests] for c, r in runs.items()}
    title = {"final": "final model", "best": "model of the best-dev epoch"}[which]
    lines = [f"test F1 x100, {title}", row("test set", runs, "unreachable")]
    lines += [row(t, [f"{100 * f1[c][i]:.1f}" for c in runs], unreachable(res, t))
              for i, t in enumerate(tests)]
    lines.append(row("mean", [f"{100 * sum(f1[c]) / len(tests):.1f}" for c in runs]))
    if which == "final":
        lines.append(row("minutes", [f"{r['seconds'] / 60:.1f}" for r in runs.values()]))
    else:
        lines.append(row("dev F1", [f"{100 * r['best_dev_f1']:.1f}" for r in runs.values()]))
        lines.append(row("best epoch", [r["best_epoch"] for r in runs.values()]))
    lines.append(unreachable_note(res["max_len"]))
    return "\n".join(lines)


def format_compare(a, b):
    """Per train set/regime: rows test sets; test F1 x 100 of A, B and B - A, final and best-dev."""
    def f1(res, key, test, which):  # test 'mean': the mean over the test sets
        tests = res["test_sets"] if test == "mean" else [test]
        return sum(res["runs"][key]["test"][t][which]["f1"] for t in tests) / len(tests)
    # the same for A and B unless their tokenizers or max_len differ
    pairs = {t: (unreachable(a, t), unreachable(b, t)) for t in a["test_sets"]}
    cut = {t: ua if ua == ub else f"{ua.split('/')[0]}|{ub}" for t, (ua, ub) in pairs.items()}
    heads = ("A final", "B final", "B-A", "A best", "B best", "B-A")
    out = [f"A = {a['checkpoint']} (step {a['step']})", f"B = {b['checkpoint']} (step {b['step']})"]
    for key in a["runs"]:
        out += ["", f"{key}: test F1 x100", f"{'test set':<14}" + "".join(f"{h:>9}" for h in heads)
                + f"{'unreachable':>14}"]
        for t in a["test_sets"] + ["mean"]:
            cells = []
            for which in ("final", "best"):
                fa, fb = f1(a, key, t, which), f1(b, key, t, which)
                cells += [fa, fb, fb - fa]
            out.append((f"{t:<14}" + "".join(f"{100 * x:>9.1f}" for x in cells)
                        + f"{cut.get(t, ''):>14}").rstrip())
        out.append(f"{'minutes':<14}" + "".join(f"{r['runs'][key]['seconds'] / 60:>9.1f}"
                                                   for r in (a, b)))
    max_len = a["max_len"] if a["max_len"] == b["max_len"] else f"{a['max_len']}|{b['max_len']}"
    same = all(ua == ub for ua, ub in pairs.values())
    out += ["", unreachable_note(max_len) + ("" if same else "; A|B where the two differ")]
    return "\n".join(out)


def get_args(argv=None):
    p = common.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint file, or a run directory (uses its ckpt.pt)")
    p.add_argument("--compare", nargs=2, metavar=("CKPT_A", "CKPT_B"),
                   help="evaluate two checkpoints with the same settings; print them side by side")
    p.add_argument("--data_dir", help="folder of UNER_<Lang>-<Treebank>/<name>-ud-<split>.iob2 "
                   "(e.g. path/to/uner); default: download into --cache_dir")
    p.add_argument("--cache_dir", default="data/uner", help="where downloaded UNER files go")
    p.add_argument("--train_sets", nargs="+", default=["all"], metavar="NAME",
                   help=f"one model per name: any of {' '.join(TRAIN_SETS)} (or another set with "
                   "train and dev files), 'all' (the concatenation of those nine), 'paper' (each "
                   "of the nine, and all)")
    p.add_argument("--test_sets", nargs="+", metavar="NAME",
                   help="test sets (default: every set with a test file, PUD and other test-only "
                   "sets included)")
    p.add_argument("--regime", nargs="+", choices=["head", "full"], default=["head", "full"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=16, help="sentences per step")
    p.add_argument("--lr", type=float, default=3e-5, help="peak lr (the paper's, both regimes)")
    p.add_argument("--head_lr", type=float,
                   help="peak lr of regime head instead of --lr; a linear probe wants more than "
                   "3e-5, e.g. 1e-3")
    p.add_argument("--warmup_ratio", type=float, default=0.0,
                   help="fraction of the steps with a linear warm-up (the paper: 0)")
    p.add_argument("--decay", choices=["linear", "none"], default="linear",
                   help="after warm-up: linear decay to 0 (the paper), or a constant lr")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW's; 0 as in Hugging Face's Trainer")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW's")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW's")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0: off")
    p.add_argument("--max_len", type=int, default=128, help="tokens per sentence; longer are cut")
    p.add_argument("--label_subtoken", choices=["first", "last"], default="first",
                   help="the sub-token of a word that carries its label: first (the paper's) or "
                   "last, which with a causal backbone is the only one that has seen the whole "
                   "word (a first sub-token of Chinese is often a byte fragment)")
    p.add_argument("--train_sizes", type=int, nargs="+", metavar="N",
                   help="fine-tune on the first N sentences of a fixed shuffle of each training "
                   "set, for each N: an F1-vs-examples curve (e.g. 10 100 1000)")
    p.add_argument("--max_train_sentences", type=int, default=0,
                   help="cap per training file, a fixed random sample; 0: all (for CPU runs)")
    p.add_argument("--max_eval_sentences", "--max_test_sentences", type=int, default=0,
                   help="cap per dev and per test file, a fixed random sample; 0: all")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokenizer", help="tiktoken encoding name (default: the checkpoint's)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=common.CHOICES["dtype"], default="auto",
                   help="auto: bfloat16 autocast on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: torch's default, one per core); on a busy machine 1 is "
                   "often faster, as the small matmuls here gain little from more and waiting "
                   "threads stall every step")
    p.add_argument("--out", help="results JSON (default: ner_<checkpoint name>.json next to each "
                   "checkpoint; with --compare, PATH holds both)")
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.compare):
        p.error("give one checkpoint, or --compare CKPT_A CKPT_B")
    for key in ("epochs", "batch_size", "eval_batch_size", "max_len"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1")
    if args.train_sizes and min(args.train_sizes) < 1:
        p.error("--train_sizes must be at least 1")
    for key in ("max_train_sentences", "max_eval_sentences"):
        if getattr(args, key) < 0:
            p.error(f"--{key} must be 0 (no cap) or more")
    if not 0 <= args.warmup_ratio <= 1:
        p.error("--warmup_ratio must lie in [0, 1]")
    for key in ("lr", "head_lr", "weight_decay", "grad_clip", "threads"):
        if getattr(args, key) is not None and not getattr(args, key) >= 0:  # also refuses nan
            p.error(f"--{key} must be at least 0, got {getattr(args, key)}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(args, key) < 1:
            p.error(f"--{key} must lie in [0, 1), got {getattr(args, key)}")
    return args


def write_results(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    common.write_json(path, obj)
    print(f"wrote {path}")


def main(argv=None):
    args = get_args(argv)
    paths = [checkpoint_path(p) for p in args.compare or [args.ckpt]]  # before any long work
    if args.out:  # written after every fine-tuning run: a bad path must not lose them
        try:
            common.check_out_file(args.out, "--out")
        except common.ConfigError as e:
            raise SystemExit(f"ner_eval.py: error: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    uner = load_uner(args)
    results = []
    for path in paths:
        res = evaluate_checkpoint(path, uner, args)
        results.append(res)
        if not args.out:  # at once: a crash in the second checkpoint keeps the first's numbers
            stem = os.path.splitext(os.path.basename(res["checkpoint"]))[0]
            write_results(os.path.join(os.path.dirname(res["checkpoint"]), f"ner_{stem}.json"), res)
    if args.out:
        write_results(args.out, {"a": results[0], "b": results[1]} if args.compare else results[0])
    for res in results:
        print("\n" + format_settings(args, res))
    if args.compare:
        print("\n" + format_compare(*results))
    else:
        print("\n" + format_table(results[0], "final") + "\n\n" + format_table(results[0], "best"))


if __name__ == "__main__":
    main()
