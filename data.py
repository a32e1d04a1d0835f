"""
Token shards and episode samplers for nanoMAML.

As a script it tokenizes text with tiktoken into uint16 token shards and then builds the SMLMT
occurrence index, in one command:

    python data.py --text ../shared/data/corpus/en_wikipedia.train.txt \
                   --val_text ../shared/data/corpus/en_wikipedia.valid.txt --out data/wiki
    python data.py --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb --max_tokens 2_000_000_000
    python data.py --reindex --out data/wiki --min_per_million 20  # only the index, other band

As a library it gives ShardReader (random next-token windows), SMLMTSampler (N-way K-shot masked-word
episodes) and LMTaskSampler (K chunks of a document as support, the next chunk as query).

One data directory holds:
    train_000000.bin ...   val_000000.bin ...  header of HEADER_INTS int32 [MAGIC, VERSION, n_tokens, 0, ...],
                                               then n_tokens uint16; whole documents, each followed by <|endoftext|>
    meta.json                                  tokenizer, vocab size, eot and mask ids, token counts, shard sizes,
                                               the command line, and a description of the index
    index_words.npy            (W,) int32      candidate word ids, shared by both splits
    index_{split}_offsets.npy  (W+1,) int64    occurrences of word i are positions[offsets[i]:offsets[i+1]]
    index_{split}_positions.npy (P,) int64     global positions into the concatenation of the split's shards
    index_{split}_docs.npy     (P,) int64      document (numbered within the split) of each position
"""

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

MAGIC = 20261122
VERSION = 1
HEADER_INTS = 256
SPLITS = ("train", "val")
DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIG = "sample-10BT"
# Candidate-word band in occurrences per million train tokens, for GPT-2 BPE: above it are function
# words (' the', ' and', ' was', ' for', ' with', ...), below it words too rare for varied windows.
# 10 and 300 per million are train counts 103.2 and 3097.0 on the 10M-token ../shared/data/corpus.
DEFAULT_MIN_PER_MILLION = 10.0
DEFAULT_MAX_PER_MILLION = 300.0
DEFAULT_MAX_OCCURRENCES = 1000
DEFAULT_CONTEXT = 512


def get_encoding(name="gpt2"):
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads its vocabulary on first use; offline that fails deep inside requests
        raise RuntimeError(f"cannot load tiktoken encoding {name!r} ({e}); offline, point TIKTOKEN_CACHE_DIR at a "
                           f"cache holding it (e.g. ../shared/data/tiktoken/cache)") from e


def atomic_write(path, write):
    """Write `path` through write(f) under a temporary name in the same directory, then rename it into place,
    so neither a crash nor an error ever leaves a half-written file or damages the file it replaces."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    """Every JSON file nanoMAML writes (meta.json, results, bench tables) goes through here."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _write_npy(path, arr):
    atomic_write(path, lambda f: np.save(f, arr))


def write_shard(path, tokens):
    """Write one shard: the header, then the tokens as uint16."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-d array, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {tokens.dtype}; nothing written")
    bad = tokens[(tokens < 0) | (tokens >= 2 ** 16)]
    if bad.size:
        raise ValueError(f"{path}: token id {bad[0]} does not fit in uint16 (shards hold ids 0..65535); "
                         f"nothing written")
    if len(tokens) >= 2 ** 31:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 header; write smaller shards")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16, copy=False).tobytes())
    atomic_write(path, write)


def load_shard(path):
    """Memory-map a shard's tokens -> (n_tokens,) uint16, after checking its header against its size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_INTS * 4}-byte header; truncated or "
                         f"not a shard")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: magic number {header[0]} != {MAGIC}; corrupted or not a nanoMAML shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this data.py reads version {VERSION}")
    n = int(header[2])
    if n < 0 or size != HEADER_INTS * 4 + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens ({HEADER_INTS * 4 + 2 * n} bytes) but the file has "
                         f"{size} bytes; truncated or corrupted")
    if n == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def list_shards(data_dir, split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}_{'[0-9]' * 6}.bin")))
    if not paths:
        raise FileNotFoundError(f"no {split}_NNNNNN.bin shards in {data_dir}")
    return paths


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; write shards with "
                                f"`python data.py --text ... --out {data_dir}`")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for key in ("tokenizer", "vocab_size", "eot_id", "mask_id", "train_tokens", "val_tokens", "shards"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def _load_split(data_dir, split, meta):
    """Memory-map a split's shards, checked against meta.json -> (shards, starts), where starts[i] (int64) is the
    global position of shard i's first token in the concatenation of the split's shards."""
    paths = list_shards(data_dir, split)
    recorded = meta["shards"].get(split, {})
    names = [os.path.basename(p) for p in paths]
    if names != list(recorded):
        raise ValueError(f"{data_dir}: {split} shards on disk {names} are not the ones meta.json records "
                         f"{list(recorded)}; the directory was changed after it was written")
    shards = [load_shard(p) for p in paths]
    for path, shard in zip(paths, shards):
        if len(shard) != recorded[os.path.basename(path)]:
            raise ValueError(f"{path}: {len(shard)} tokens but meta.json records {recorded[os.path.basename(path)]}; "
                             f"the shard was replaced after meta.json was written")
    starts = np.cumsum([0] + [len(s) for s in shards[:-1]]).astype(np.int64)
    return shards, starts


def _gather(shards, shard_starts, starts, length):
    """Windows of `length` tokens beginning at global positions `starts` (n,), each inside one shard -> (n, length)
    int64. One vectorized take per shard touched, no loop over windows."""
    sid = np.searchsorted(shard_starts, starts, side="right") - 1
    out = np.empty((len(starts), length), dtype=np.int64)
    for s in np.unique(sid):
        rows = np.flatnonzero(sid == s)
        out[rows] = shards[s][(starts[rows] - shard_starts[s])[:, None] + np.arange(length)]
    return out


def text_files(patterns):
    """Expand globs (sorted, each must match at least one file) -> list of paths, without duplicates."""
    paths = []
    for pattern in patterns:
        matched = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"text pattern {pattern!r} matches no file")
        paths += [p for p in matched if p not in paths]
    return paths


def iter_text_docs(paths, one_doc_per_file=False):
    """Yield the documents of local UTF-8 files. A document is a run of non-blank lines (joined with their newlines,
    the last one dropped); documents are separated by one or more blank lines, the format of ../shared/data/corpus.
    With one_doc_per_file each file's whole text, stripped, is one document. Files are read line by line, so their
    size does not matter. Raises if no file holds any document."""
    n_docs = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                if one_doc_per_file:
                    doc = f.read().strip()
                    if doc:
                        n_docs += 1
                        yield doc
                    continue
                lines = []
                for line in itertools.chain(f, [""]):  # the extra "" closes the file's last document
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        n_docs += 1
                        yield "".join(lines).rstrip("\n")
                        lines = []
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    if n_docs == 0:
        raise ValueError(f"no document in {paths}: every file is empty or blank")


def iter_hf_docs(name, config=None, split="train", text_column="text"):
    """Yield the texts of a Hugging Face dataset, streamed (nothing is downloaded up front)."""
    import datasets  # imported here: it is slow to import and only this path needs it
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    n_docs = 0
    for row in ds:
        if text_column not in row:
            raise ValueError(f"dataset {name} ({config}, {split}) has no column {text_column!r}; "
                             f"its columns: {list(row)}")
        if row[text_column].strip():
            n_docs += 1
            yield row[text_column]
    if n_docs == 0:
        raise ValueError(f"dataset {name} ({config}, {split}) yielded no non-empty {text_column!r}")


_worker_enc = None


def _init_worker(enc):
    global _worker_enc
    _worker_enc = enc


def _encode_batch(is_val, docs):
    """(in a worker) documents -> (is_val, tokens, doc_lens): tokens (n,) uint16 are every document followed by
    <|endoftext|>; doc_lens (n_docs,) int64 count each document's tokens including its <|endoftext|>. Converting to
    numpy here, in parallel, keeps the main process light and makes the result cheap to send back."""
    toks = _worker_enc.encode_ordinary_batch(docs, num_threads=1)  # parallelism comes from the processes
    eot = _worker_enc.eot_token
    for t in toks:
        t.append(eot)
    doc_lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    tokens = np.fromiter(itertools.chain.from_iterable(toks), dtype=np.uint16, count=int(doc_lens.sum()))
    return is_val, tokens, doc_lens


def _count_tokens(docs):
    """(in a worker) the raw-tiktoken baseline of bench_tokenize: encode and only count."""
    return sum(map(len, _worker_enc.encode_ordinary_batch(docs, num_threads=1)))


def _batches(docs, is_val, batch_chars):
    batch, n = [], 0
    for doc in docs:
        batch.append(doc)
        n += len(doc)
        if n >= batch_chars:
            yield is_val, batch
            batch, n = [], 0
    if batch:
        yield is_val, batch


def _pool(enc, num_proc):
    # fork: workers inherit the encoding and this module instead of re-importing torch (seconds per worker). The
    # pool is forked before the first document is read, so no reader thread of a streamed dataset exists yet.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ctx.Pool(num_proc, initializer=_init_worker, initargs=(enc,))


def _tokenized(tasks, enc, num_proc):
    """Encode (is_val, docs) tasks on num_proc processes -> results in input order. At most 2 * num_proc batches
    are in flight (Pool.imap would read a whole streamed dataset into memory ahead of the workers)."""
    if num_proc == 1:
        _init_worker(enc)
        yield from itertools.starmap(_encode_batch, tasks)
        return
    with _pool(enc, num_proc) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_batch, task))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _cut(tokens, doc_lens, n_wanted):
    """Split a batch after the first document whose end reaches n_wanted tokens (or keep it all)."""
    ends = np.cumsum(doc_lens)
    i = min(int(np.searchsorted(ends, n_wanted)), len(ends) - 1)
    return tokens[:ends[i]], doc_lens[:i + 1], tokens[ends[i]:], doc_lens[i + 1:]


class _SplitWriter:
    """Buffers whole documents of one split and writes {split}_NNNNNN.bin shards, each ending at the end of the
    document that brings it to shard_tokens (the last one may be shorter): every shard starts a document and ends
    with <|endoftext|>."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.parts, self.n_buffered, self.n_tokens, self.n_docs, self.shards = [], 0, 0, 0, {}

    def add(self, tokens, doc_lens):
        self.n_tokens += len(tokens)
        self.n_docs += len(doc_lens)
        # cut at the end of the document that fills the shard, so shard sizes do not depend on batching
        while len(tokens) and self.n_buffered + len(tokens) >= self.shard_tokens:
            head, _, tokens, doc_lens = _cut(tokens, doc_lens, self.shard_tokens - self.n_buffered)
            self.parts.append(head)
            self.n_buffered += len(head)
            self.flush()
        if len(tokens):
            self.parts.append(tokens)
            self.n_buffered += len(tokens)

    def flush(self):
        if self.n_buffered:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            write_shard(os.path.join(self.out_dir, name), np.concatenate(self.parts))
            self.shards[name] = self.n_buffered
            self.parts, self.n_buffered = [], 0


def _check_out_dir(out_dir, enc, overwrite):
    """Refuse an output directory holding shards of another tokenizer (or of an unknown one), and one holding
    shards of this tokenizer unless overwrite; before anything is tokenized."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    meta_path = os.path.join(out_dir, "meta.json")
    has_shards = any(glob.glob(os.path.join(glob.escape(out_dir), f"{s}_*.bin")) for s in SPLITS)
    if os.path.exists(meta_path):
        meta = read_meta(out_dir)
        if (meta["tokenizer"], meta["vocab_size"]) != (enc.name, enc.n_vocab):
            raise ValueError(f"{meta_path}: {out_dir} holds shards of tokenizer {meta['tokenizer']!r} (vocab "
                             f"{meta['vocab_size']}), not {enc.name!r} (vocab {enc.n_vocab}); refusing to mix them, "
                             f"choose another --out")
    elif has_shards:
        raise ValueError(f"{out_dir} holds shards but no meta.json, so their tokenizer is unknown; refusing to touch "
                         f"them, choose another --out")
    if (os.path.exists(meta_path) or has_shards) and not overwrite:
        raise ValueError(f"{out_dir} already holds {enc.name} shards; pass --overwrite to replace them (the new "
                         f"shards are written completely before any old file is replaced)")


def write_shards(docs, enc, out_dir, val_tokens=1_000_000, shard_tokens=100_000_000, num_proc=1, max_tokens=None,
                 val_docs=None, overwrite=False, command="", batch_chars=1 << 18, progress=True,
                 index_args=None):
    """Tokenize documents into train/val shards of out_dir and write meta.json -> meta.

    docs: iterable of str. The first val_tokens tokens (whole documents: the document that reaches val_tokens is
    kept whole) go to val, the rest to train. Or val_docs: an iterable of str that is the val split instead
    (then val_tokens must be 0). max_tokens: stop reading docs once this many of their tokens are written (at a
    document end). Every file is written under a temporary directory in out_dir first and renamed into place only
    once everything is written; an error leaves out_dir as it was. With overwrite, the old shards of the same
    tokenizer are replaced and the old index is dropped from meta.json (build_index writes a new one).
    index_args: keyword arguments of build_index, to build the index in that temporary directory
    too, so that a failing index (a band no word falls in) leaves out_dir as it was; without,
    meta["index"] is None.
    """
    if val_docs is not None and val_tokens:
        raise ValueError("give either val_docs or val_tokens > 0, not both")
    if num_proc < 1 or shard_tokens < 1:
        raise ValueError(f"num_proc and shard_tokens must be >= 1, got {num_proc} and {shard_tokens}")
    if enc.max_token_value >= 2 ** 16:
        raise ValueError(f"tokenizer {enc.name} has ids up to {enc.max_token_value}, which do not fit uint16 shards")
    _check_out_dir(out_dir, enc, overwrite)
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".write_shards-")
    try:
        train, val = _SplitWriter(staging, "train", shard_tokens), _SplitWriter(staging, "val", shard_tokens)
        tasks = _batches(docs, False, batch_chars)
        if val_docs is not None:
            tasks = itertools.chain(_batches(val_docs, True, batch_chars), tasks)
        t0, n_read = time.time(), 0
        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress)
        for is_val, tokens, doc_lens in _tokenized(tasks, enc, num_proc):
            bar.update(len(tokens))
            if is_val:
                val.add(tokens, doc_lens)
                continue
            done = max_tokens is not None and n_read + len(tokens) >= max_tokens
            if done:
                tokens, doc_lens, _, _ = _cut(tokens, doc_lens, max_tokens - n_read)
            n_read += len(tokens)
            if val.n_tokens < val_tokens:
                head, head_lens, tokens, doc_lens = _cut(tokens, doc_lens, val_tokens - val.n_tokens)
                val.add(head, head_lens)
            if len(tokens):
                train.add(tokens, doc_lens)
            if done:
                break
        bar.close()
        train.flush()
        val.flush()
        if train.n_tokens == 0:
            raise ValueError(f"all {val.n_tokens} tokens went to val (val_tokens={val_tokens}); nothing left for train")
        seconds = time.time() - t0
        meta = {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token, "mask_id": enc.n_vocab,
                "train_tokens": train.n_tokens, "val_tokens": val.n_tokens, "train_docs": train.n_docs,
                "val_docs": val.n_docs, "shards": {"train": train.shards, "val": val.shards}, "command": command,
                "seconds": round(seconds, 2), "index": None}
        write_json(os.path.join(staging, "meta.json"), meta)
        if index_args is not None:
            meta["index"] = build_index(staging, enc, **index_args)
        # everything is written: move it into place, drop old shards the new set does not replace,
        # and only then replace meta.json, which names the shards
        for name in sorted(os.listdir(staging)):
            if name != "meta.json":
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        for split, writer in (("train", train), ("val", val)):
            for path in glob.glob(os.path.join(glob.escape(out_dir), f"{split}_{'[0-9]' * 6}.bin")):
                if os.path.basename(path) not in writer.shards:
                    os.remove(path)
        os.replace(os.path.join(staging, "meta.json"), os.path.join(out_dir, "meta.json"))
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(out_dir):  # a failed first run leaves no empty --out behind
            os.rmdir(out_dir)


def _keep_lowest(keys, pos, k):
    """keys (n,) int64 = word << 32 | 32 random bits. Keep, per word, the k entries with the lowest random bits:
    a uniform sample without replacement that can be taken shard by shard, never holding every occurrence."""
    order = np.argsort(keys)
    keys, pos = keys[order], pos[order]
    words = keys >> 32
    keep = np.arange(len(keys)) - np.searchsorted(words, words, side="left") < k  # rank within the word's run
    return keys[keep], pos[keep]


def _check_band(min_per_million, max_per_million):
    if not 0 <= min_per_million <= max_per_million:  # also refuses NaN
        raise ValueError(f"need 0 <= --min_per_million <= --max_per_million, got {min_per_million} "
                         f"and {max_per_million}")


def build_index(data_dir, enc, min_per_million=DEFAULT_MIN_PER_MILLION,
                max_per_million=DEFAULT_MAX_PER_MILLION, max_occurrences=DEFAULT_MAX_OCCURRENCES,
                context=DEFAULT_CONTEXT, seed=0, source=None):
    """Write the SMLMT occurrence index of data_dir and record it in meta.json -> meta["index"].

    Candidate words: tokens that decode to a space and at least 3 letters (word-initial, so masking
    a token masks a word start), never special tokens, that occur in the TRAIN shards with a
    frequency in [min_per_million, max_per_million] occurrences per million train tokens. Both
    splits index the same candidates; for each candidate and split, up to max_occurrences positions
    chosen uniformly at random, only positions with at least context - 1 tokens before them in the
    same shard, so any window of up to `context` tokens ending at the occurrence lies inside one
    shard; and the document of each (documents end at <|endoftext|>), so that an episode can take a
    word from distinct documents. The files are written to a staging directory and renamed into
    place at the end, meta.json last, so a failure leaves the previous index as it was.
    source: what the train split was made from (input files, a dataset), for errors about the text.
    """
    meta = read_meta(data_dir)
    source = source or f"{data_dir} (train shards)"
    if (meta["tokenizer"], meta["vocab_size"]) != (enc.name, enc.n_vocab):
        raise ValueError(f"{os.path.join(data_dir, 'meta.json')}: shards of tokenizer {meta['tokenizer']!r}, "
                         f"index asked for with {enc.name!r}")
    _check_band(min_per_million, max_per_million)
    t0 = time.time()
    shards, _ = _load_split(data_dir, "train", meta)
    counts = np.zeros(enc.n_vocab, dtype=np.int64)
    for shard in shards:
        counts += np.bincount(shard, minlength=enc.n_vocab)[:enc.n_vocab]
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    words = []
    for t in np.flatnonzero(counts):
        try:
            s = enc.decode_single_token_bytes(int(t)).decode("utf-8")
        except (UnicodeDecodeError, KeyError):
            continue
        if t not in special and s[0] == " " and len(s) >= 4 and s[1:].isalpha():
            words.append(t)
    words = np.array(words, dtype=np.int32)  # (every word token that occurs in train,)
    # A band of frequencies, not of counts or ranks: frequency decides whether a word is a function
    # word or too rare, and it is the same for the same text at any size, while counts grow with the
    # corpus and ranks shift as a larger corpus brings more word types. (c / n is correctly rounded,
    # so the text repeated k times, kc / kn, gives the very same floats.)
    per_million = counts[words] / meta["train_tokens"] * 1e6  # (len(words),)
    in_band = (per_million >= min_per_million) & (per_million <= max_per_million)
    if not in_band.any():
        if len(words):
            found = (f"its {len(words):,} words occur {per_million.min():.3g} to "
                     f"{per_million.max():.3g} times per million; widen "
                     f"--min_per_million/--max_per_million")
        else:
            found = "it holds no word at all (a token of a space and 3+ letters); is it text?"
        raise ValueError(f"{source}: no candidate word occurs {min_per_million:g} to "
                         f"{max_per_million:g} times per million train tokens; {found}")
    words, per_million = words[in_band], per_million[in_band]
    by_freq = words[np.argsort(-per_million, kind="stable")]
    examples = [enc.decode([int(t)]) for t in  # 10 from the most to the least frequent
                by_freq[np.linspace(0, len(words) - 1, min(10, len(words))).astype(np.int64)]]
    is_word = np.zeros(2 ** 16, dtype=bool)  # indexed by uint16 tokens
    is_word[words] = True
    index = {"n_words": len(words), "words": "index_words.npy", "min_per_million": min_per_million,
             "max_per_million": max_per_million, "train_tokens": meta["train_tokens"],
             "examples": examples, "max_occurrences": max_occurrences, "context": context,
             "seed": seed}
    staging = tempfile.mkdtemp(dir=data_dir, prefix=".build_index-")
    try:
        _write_npy(os.path.join(staging, "index_words.npy"), words)
        for i, split in enumerate(SPLITS):
            if not meta["shards"].get(split):
                continue
            shards, _ = _load_split(data_dir, split, meta)
            rng = np.random.default_rng([seed, i])
            keys, pos, eots = np.zeros(0, np.int64), np.zeros(0, np.int64), []
            start = 0
            for shard in shards:
                p = np.flatnonzero(is_word[shard])
                p = p[p >= context - 1]
                new_keys = (shard[p].astype(np.int64) << 32) | rng.integers(0, 2 ** 32, len(p))
                keys, pos = _keep_lowest(np.concatenate([keys, new_keys]),
                                         np.concatenate([pos, p + start]), max_occurrences)
                eots.append(np.flatnonzero(shard == meta["eot_id"]) + start)
                start += len(shard)
            # sort by word, then position: word << 40 | position (a split holds < 2**40 tokens)
            by_word = np.sort(((keys >> 32) << 40) | pos)
            w_kept, p_kept = by_word >> 40, by_word & (2 ** 40 - 1)
            offsets = np.searchsorted(w_kept, words, side="left")
            offsets = np.append(offsets, len(w_kept)).astype(np.int64)
            docs = np.searchsorted(np.concatenate(eots), p_kept)  # (P,) the <|endoftext|>s before
            files = {"offsets": offsets, "positions": p_kept, "docs": docs}
            for key, arr in files.items():
                _write_npy(os.path.join(staging, f"index_{split}_{key}.npy"), arr)
            index[split] = {**{key: f"index_{split}_{key}.npy" for key in files},
                            "n_positions": len(p_kept), "shards": meta["shards"][split]}
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(data_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    index["seconds"] = round(time.time() - t0, 2)
    meta["index"] = index
    write_json(os.path.join(data_dir, "meta.json"), meta)
    return index


def _load_index(data_dir, meta, split, shards, starts):
    """Memory-map the index of one split -> (words (W,), offsets (W+1,), positions (P,), docs (P,)),
    after checking that it was built from exactly these shards; raises naming the index file
    otherwise."""
    index = meta.get("index")
    meta_path = os.path.join(data_dir, "meta.json")
    rebuild = f"build it with `python data.py --reindex --out {data_dir}`"
    if not index:
        raise FileNotFoundError(f"{meta_path}: no SMLMT index; {rebuild}")
    if split not in index:
        raise ValueError(f"{meta_path}: the SMLMT index has no {split} split")
    if "docs" not in index[split]:
        raise ValueError(f"{meta_path}: the SMLMT index has no document numbers (an older data.py "
                         f"wrote it); rebuild it with `python data.py --reindex --out {data_dir}`")
    words_path = os.path.join(data_dir, index["words"])
    offsets_path = os.path.join(data_dir, index[split]["offsets"])
    positions_path = os.path.join(data_dir, index[split]["positions"])
    docs_path = os.path.join(data_dir, index[split]["docs"])
    for path in (words_path, offsets_path, positions_path, docs_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"index file {path} does not exist; {rebuild}")
    if index[split]["shards"] != meta["shards"][split]:
        raise ValueError(f"{positions_path}: built for {split} shards {index[split]['shards']}, the directory has "
                         f"{meta['shards'][split]}; {rebuild}")
    words = np.load(words_path, mmap_mode="r")
    offsets = np.load(offsets_path, mmap_mode="r")
    positions = np.load(positions_path, mmap_mode="r")
    docs = np.load(docs_path, mmap_mode="r")
    n_tokens = int(starts[-1]) + len(shards[-1])
    if (len(words) != index["n_words"] or len(offsets) != len(words) + 1 or offsets[-1] != len(positions)
            or len(positions) != index[split]["n_positions"] or len(docs) != len(positions)
            or (len(positions) and positions.max() >= n_tokens)):
        raise ValueError(f"{positions_path}: index arrays do not agree with each other or with meta.json "
                         f"(words {len(words)}, offsets {len(offsets)}, positions "
                         f"{len(positions)}, docs {len(docs)}); {rebuild}")
    # spot-check that occurrences hold their word: catches an index of other shards with the same sizes
    check = np.linspace(0, len(positions) - 1, min(1000, len(positions))).astype(np.int64)
    if len(check):
        owner = np.searchsorted(offsets, check, side="right") - 1
        got = _gather(shards, starts, positions[check], 1)[:, 0]
        if not np.array_equal(got, words[owner]):
            raise ValueError(f"{positions_path}: occurrences do not hold their words in the {split} shards; the index "
                             f"belongs to other data; {rebuild}")
    return words, offsets, positions, docs


def _room(p, T):
    """Sorted positions p (m,) -> nxt, room, lists for the scalar loop of _apart. nxt[i] (m) is the
    first index whose window of T tokens does not overlap i's (position >= p[i] + T); room[i] (m+1)
    is the most pairwise non-overlapping windows among p[i:] (taking each next window as early as
    possible is optimal)."""
    nxt = np.searchsorted(p, p + T).tolist()
    room = [0] * (len(p) + 1)
    for i in range(len(p) - 1, -1, -1):
        room[i] = 1 + room[nxt[i]]
    return nxt, room


def _apart(nxt, room, n, rng):
    """n random indices of sorted positions whose windows pairwise do not overlap -> (n,) int64, in
    text order. Selection sampling: scanning left to right, take index i with probability (still
    wanted) / (indices left), as for a uniform sample, but surely where skipping it would leave too
    little room, and after taking it jump to nxt[i]. Needs room[0] >= n; then room[i] >= (still
    wanted) wherever the scan is, so it always ends with n."""
    u = rng.random(len(nxt)).tolist()
    picked, i = [], 0
    while len(picked) < n:
        wanted = n - len(picked)
        if room[i + 1] < wanted or u[i] * (len(nxt) - i) < wanted:
            picked.append(i)
            i = nxt[i]
        else:
            i += 1
    return np.array(picked, dtype=np.int64)


def _tensor(a):
    """numpy int64 -> contiguous CPU torch tensor (the model may .view() it)."""
    return torch.from_numpy(np.ascontiguousarray(a))


class ShardReader:
    """Random (B, T+1) windows of one split, sampled uniformly over every window that fits inside a shard (with
    replacement, no epochs), seeded from (seed, rank) so ranks draw different windows."""

    def __init__(self, data_dir, split, batch_size, seq_len, seed=0, rank=0):
        self.meta = read_meta(data_dir)
        self.shards, self.shard_starts = _load_split(data_dir, split, self.meta)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_starts = np.array([max(len(s) - seq_len, 0) for s in self.shards], dtype=np.int64)
        if self.n_starts.sum() == 0:
            raise ValueError(f"{data_dir}: every {split} shard is shorter than seq_len + 1 = {seq_len + 1} tokens")
        self.cum_starts = np.cumsum(self.n_starts)
        self.rng = np.random.default_rng([seed, rank, 0, SPLITS.index(split)])

    def next_batch(self, rng=None):
        """-> x (B, T), y (B, T) int64. rng: a numpy Generator to draw from instead of the reader's own (which it
        then leaves untouched), e.g. one seeded per eval batch so that evaluation is the same in every run."""
        rng = self.rng if rng is None else rng
        r = rng.integers(0, self.cum_starts[-1], self.batch_size)
        sid = np.searchsorted(self.cum_starts, r, side="right")
        starts = self.shard_starts[sid] + r - (self.cum_starts[sid] - self.n_starts[sid])
        w = _gather(self.shards, self.shard_starts, starts, self.seq_len + 1)  # (B, T+1)
        return _tensor(w[:, :-1]), _tensor(w[:, 1:])

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


@dataclass
class Episode:
    support_x: torch.Tensor    # (N*K, T) masked windows, class-major: rows c*K..c*K+K-1 are class c
    support_y: torch.Tensor    # (N*K,) labels 0..N-1
    query_x: torch.Tensor      # (N*Q, T)
    query_y: torch.Tensor      # (N*Q,)
    word_ids: torch.Tensor     # (N,) token id of each class's word; the meta head's class logits are these columns
    support_pos: torch.Tensor  # (N*K,) global position (in the split) of each window's last token, the occurrence
    query_pos: torch.Tensor    # (N*Q,)


class SMLMTSampler:
    """N-way K-shot subset-masked LM episodes (Bansal et al. 2020) from the occurrence index of data.py.

    An episode draws n_way distinct usable candidate words and, per word, k_shot + q_query
    occurrences: the first k_shot are support, the rest query. Each example is the window of seq_len
    tokens ENDING at the occurrence, with every token of the window equal to the word replaced by
    mask_id (so the last token is always mask_id); its label is the word's class 0..N-1.
    A word's occurrences come from k_shot + q_query distinct documents if its indexed occurrences in
    the split span that many, else from occurrences whose windows do not overlap; a word that allows
    neither is not usable. Otherwise the small val split, where a word's occurrences cluster in a
    few documents, gave easier episodes than train: queries that share their support's context.
    """

    def __init__(self, data_dir, n_way, k_shot, q_query, seq_len, seed=0, rank=0, split="train"):
        self.meta = read_meta(data_dir)
        self.n_way, self.k_shot, self.q_query, self.seq_len = n_way, k_shot, q_query, seq_len
        self.mask_id = self.meta["mask_id"]
        self.shards, self.shard_starts = _load_split(data_dir, split, self.meta)
        self.words, self.offsets, self.positions, docs = _load_index(data_dir, self.meta, split,
                                                                     self.shards, self.shard_starts)
        index_path = os.path.join(data_dir, self.meta["index"][split]["positions"])
        if seq_len > self.meta["index"]["context"]:
            raise ValueError(f"{index_path}: seq_len {seq_len} > the index's context {self.meta['index']['context']}; "
                             f"rebuild it with `python data.py --reindex --context {seq_len} --out {data_dir}`")
        n = k_shot + q_query
        self.counts = np.diff(self.offsets)  # (W,)
        # An episode takes n distinct groups of a word's occurrences, then one occurrence of each.
        # The groups are its documents (the index is sorted by word, then position); for a word in
        # fewer than n documents, its single occurrences, taken so that windows do not overlap.
        word_of = np.repeat(np.arange(len(self.words)), self.counts)  # (P,)
        new_doc = np.ones(len(docs), dtype=bool)
        new_doc[1:] = (docs[1:] != docs[:-1]) | (word_of[1:] != word_of[:-1])
        few_docs = np.bincount(word_of[new_doc], minlength=len(self.words)) < n  # (W,)
        self.group_starts = np.flatnonzero(new_doc | few_docs[word_of])  # (G,) into positions
        self.group_lens = np.diff(np.append(self.group_starts, len(docs)))  # (G,)
        self.group_offsets = np.searchsorted(self.group_starts, self.offsets)  # (W+1,)
        self.n_groups = np.diff(self.group_offsets)  # (W,)
        self.spread = {}  # word index -> _room of its positions, for usable words of few documents
        for c in np.flatnonzero(few_docs & (self.counts >= n)):
            nxt, room = _room(self.positions[self.offsets[c]:self.offsets[c + 1]], seq_len)
            if room[0] >= n:
                self.spread[c] = (nxt, room)
        spread = np.array(sorted(self.spread), dtype=np.int64)
        self.usable = np.union1d(np.flatnonzero(~few_docs), spread)  # indices into words
        self.n_words = len(self.usable)
        if n_way > self.n_words:
            raise ValueError(f"{index_path}: n_way {n_way} > {self.n_words} candidate words whose "
                             f"{split} occurrences give k_shot + q_query = {n} windows from "
                             f"distinct documents or windows that do not overlap")
        self.rng = np.random.default_rng([seed, rank, 1, SPLITS.index(split)])

    def sample(self, rng=None):
        """-> Episode. rng: as in ShardReader.next_batch."""
        rng = self.rng if rng is None else rng
        N, K, Q, T = self.n_way, self.k_shot, self.q_query, self.seq_len
        cls = rng.choice(self.usable, N, replace=False)  # (N,) class c is word self.words[cls[c]]
        picks = np.empty((N, K + Q), dtype=np.int64)  # K+Q of each class's groups
        for j, c in enumerate(cls):
            if c in self.spread:  # shuffled: _apart returns them in text order
                picks[j] = rng.permutation(_apart(*self.spread[c], K + Q, rng))
            else:
                picks[j] = rng.choice(self.n_groups[c], K + Q, replace=False)
        g = self.group_offsets[cls, None] + picks  # (N, K+Q) indices into the groups
        # one occurrence of each group, uniformly (u * len < len for u < 1): documents are drawn
        # uniformly, so one that repeats the word does not outweigh the others
        occ = self.group_starts[g] + (rng.random(g.shape) * self.group_lens[g]).astype(np.int64)
        pos = self.positions[occ]  # (N, K+Q) global positions of the occurrences
        # A window may hold an <|endoftext|> and the end of the document before it (wiki: 26% of
        # 128-token windows, 14% of 64-token ones). Kept: AR windows are packed across documents too
        # (nanoGPT-style), so the backbone learns <|endoftext|> as a context reset and an episode
        # window is the same kind of input as an AR window; cutting windows at the boundary would
        # need left padding and an attention mask, another input distribution without SDPA's causal
        # fast path.
        x = _gather(self.shards, self.shard_starts, pos.reshape(-1) - T + 1, T).reshape(N, K + Q, T)
        word_ids = self.words[cls].astype(np.int64)
        x[x == word_ids[:, None, None]] = self.mask_id
        labels = np.broadcast_to(np.arange(N)[:, None], (N, K + Q))
        return Episode(support_x=_tensor(x[:, :K].reshape(N * K, T)), support_y=_tensor(labels[:, :K].reshape(-1)),
                       query_x=_tensor(x[:, K:].reshape(N * Q, T)), query_y=_tensor(labels[:, K:].reshape(-1)),
                       word_ids=_tensor(word_ids), support_pos=_tensor(pos[:, :K].reshape(-1)),
                       query_pos=_tensor(pos[:, K:].reshape(-1)))

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


class LMTaskSampler:
    """LM-task episodes: (K+1)*T + 1 consecutive tokens of one document give K support chunks and the query chunk
    right after them, each with next-token targets.

    Short documents: a document (counting its closing <|endoftext|>) shorter than (K+1)*T + 1 tokens is never used,
    so no input token is ever <|endoftext|> and only the very last target can be the document's closing one. Spans
    are uniform over every start that fits in a long-enough document (long documents are drawn in proportion to
    their length). If no document is long enough, the constructor raises ValueError.
    """

    def __init__(self, data_dir, k_shot, seq_len, seed=0, rank=0, split="train"):
        self.meta = read_meta(data_dir)
        self.k_shot, self.seq_len = k_shot, seq_len
        self.span = (k_shot + 1) * seq_len + 1
        self.shards, self.shard_starts = _load_split(data_dir, split, self.meta)
        begins, n_spans, longest = [], [], 0
        for shard, start in zip(self.shards, self.shard_starts):
            ends = np.flatnonzero(shard == self.meta["eot_id"]) + 1  # a document ends after its <|endoftext|>
            if len(ends) == 0 or ends[-1] != len(shard):
                ends = np.append(ends, len(shard))
            doc_begins = np.concatenate([[0], ends[:-1]])
            doc_lens = ends - doc_begins
            longest = max(longest, int(doc_lens.max()))
            ok = doc_lens >= self.span
            begins.append(start + doc_begins[ok])
            n_spans.append(doc_lens[ok] - self.span + 1)
        self.doc_begins, self.n_spans = np.concatenate(begins), np.concatenate(n_spans)
        self.n_docs = len(self.doc_begins)  # documents long enough to be used
        if self.n_docs == 0:
            raise ValueError(f"{data_dir}: no {split} document has (k_shot + 1) * seq_len + 1 = {self.span} tokens "
                             f"(the longest has {longest}); lower k_shot or seq_len")
        self.cum_spans = np.cumsum(self.n_spans)
        self.rng = np.random.default_rng([seed, rank, 2, SPLITS.index(split)])

    def sample(self, rng=None):
        """-> support_x (K, T), support_y (K, T), query_x (1, T), query_y (1, T). rng: as in ShardReader.next_batch."""
        rng = self.rng if rng is None else rng
        K, T = self.k_shot, self.seq_len
        r = rng.integers(0, self.cum_spans[-1])
        d = np.searchsorted(self.cum_spans, r, side="right")
        start = self.doc_begins[d] + r - (self.cum_spans[d] - self.n_spans[d])
        span = _gather(self.shards, self.shard_starts, np.array([start]), self.span)[0]  # ((K+1)*T + 1,)
        x, y = span[:-1].reshape(K + 1, T), span[1:].reshape(K + 1, T)
        return _tensor(x[:K]), _tensor(y[:K]), _tensor(x[K:]), _tensor(y[K:])

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


def bench_tokenize(paths, enc, num_proc, repeats=3, batch_chars=1 << 18):
    """Tokens/s of the whole write_shards pipeline on local files (reading, tokenizing, writing shards) against
    raw tiktoken on the same documents with the same number of processes (num_proc processes calling
    enc.encode_ordinary_batch and only counting), and tiktoken's own threaded call with num_proc threads.
    The three alternate `repeats` times and each keeps its best, since a shared machine is noisy. -> dict."""
    docs = list(iter_text_docs(paths))
    best = {"pipeline_tok_s": 0.0, "raw_processes_tok_s": 0.0, "raw_threads_tok_s": 0.0}
    for _ in range(repeats):
        t0 = time.time()
        with _pool(enc, num_proc) as pool:
            n_tokens = sum(pool.imap(_count_tokens, (b for _, b in _batches(docs, False, batch_chars))))
        best["raw_processes_tok_s"] = max(best["raw_processes_tok_s"], n_tokens / (time.time() - t0))
        t0 = time.time()
        n_tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=num_proc)))
        best["raw_threads_tok_s"] = max(best["raw_threads_tok_s"], n_tokens / (time.time() - t0))
        with tempfile.TemporaryDirectory() as out_dir:
            t0 = time.time()
            meta = write_shards(iter_text_docs(paths), enc, out_dir, val_tokens=0, num_proc=num_proc,
                                batch_chars=batch_chars, progress=False)
            n_encoded = meta["train_tokens"] - meta["train_docs"]  # the same count as raw: without the <|endoftext|>s
            best["pipeline_tok_s"] = max(best["pipeline_tok_s"], n_encoded / (time.time() - t0))
    return {"num_proc": num_proc, "tokens": n_tokens, **best,
            "ratio_vs_raw_processes": best["pipeline_tok_s"] / best["raw_processes_tok_s"]}


def bench_sampler(data_dir, n_way=32, k_shot=4, q_query=4, seq_len=128, n_episodes=200, split="train"):
    """SMLMT episode sampling speed in this process -> dict with windows/s (support + query windows)."""
    sampler = SMLMTSampler(data_dir, n_way, k_shot, q_query, seq_len, split=split)
    sampler.sample()  # warm the page cache and numpy
    t0 = time.time()
    for _ in range(n_episodes):
        sampler.sample()
    seconds = time.time() - t0
    windows = n_episodes * n_way * (k_shot + q_query)
    return {"windows_s": windows / seconds, "episodes_s": n_episodes / seconds,
            "windows_per_episode": windows // n_episodes}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description="Tokenize text into uint16 token shards with tiktoken, then build the SMLMT occurrence index.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"real runs: python data.py --dataset {DEFAULT_DATASET} --name {DEFAULT_DATASET_CONFIG} "
               f"--out data/fineweb --max_tokens 1_000_000_000\n"
               f"offline:   python data.py --text corpus/en_wikipedia.train.txt "
               f"--val_text corpus/en_wikipedia.valid.txt --out data/wiki\n"
               f"An --out holding shards of another tokenizer is refused; one holding shards of the same tokenizer "
               f"is refused unless --overwrite.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", metavar="GLOB",
                        help="local UTF-8 files; documents separated by blank lines")
    source.add_argument("--dataset", metavar="NAME", help=f"Hugging Face dataset, streamed (e.g. {DEFAULT_DATASET})")
    source.add_argument("--reindex", action="store_true", help="only rebuild the SMLMT index of the shards in --out")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val_text", nargs="+", metavar="GLOB",
                        help="local files that are the val split (instead of --val_tokens)")
    parser.add_argument("--one_doc_per_file", action="store_true", help="each --text/--val_text file is one document")
    parser.add_argument("--name", default=None, help=f"dataset config (e.g. {DEFAULT_DATASET_CONFIG})")
    parser.add_argument("--split", default="train", help="dataset split to stream")
    parser.add_argument("--text_column", default="text", help="dataset column holding the text")
    parser.add_argument("--val_tokens", type=int, default=None,
                        help="the first N tokens (whole documents) go to val; default 1_000_000, 0 with --val_text")
    parser.add_argument("--max_tokens", type=int, default=None, help="stop after N input tokens (at a document end)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000,
                        help="tokens per shard (a shard ends with the document that reaches it)")
    # the CPUs this process may use (sched_getaffinity respects taskset and containers; macOS lacks it)
    n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--num_proc", type=int, default=n_cpus,
                        help="tokenizer processes (default: the CPUs this process may use)")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of the same tokenizer in --out")
    parser.add_argument("--min_per_million", type=float, default=DEFAULT_MIN_PER_MILLION,
                        help="candidate words: lowest train frequency, per million train tokens")
    parser.add_argument("--max_per_million", type=float, default=DEFAULT_MAX_PER_MILLION,
                        help="candidate words: highest train frequency, per million train tokens")
    parser.add_argument("--max_occurrences", type=int, default=DEFAULT_MAX_OCCURRENCES,
                        help="indexed occurrences per word and split")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="longest SMLMT window the index serves")
    parser.add_argument("--seed", type=int, default=0, help="seed of the index's occurrence sampling")
    args = parser.parse_args(argv)
    if not (args.text or args.dataset or args.reindex):
        parser.error("give --text GLOB, --dataset NAME or --reindex")
    if args.val_text and args.val_tokens:
        parser.error("give --val_text or --val_tokens, not both")
    val_tokens = 0 if args.val_text else (1_000_000 if args.val_tokens is None else args.val_tokens)
    index_args = dict(min_per_million=args.min_per_million, max_per_million=args.max_per_million,
                      max_occurrences=args.max_occurrences, context=args.context, seed=args.seed)
    try:
        _check_band(args.min_per_million, args.max_per_million)  # before any work
        if args.reindex:
            enc = get_encoding(read_meta(args.out)["tokenizer"])
            index = build_index(args.out, enc, **index_args)
        else:
            # inputs are checked before the tokenizer is loaded (which may need the network)
            text_paths = text_files(args.text) if args.text else None
            val_paths = text_files(args.val_text) if args.val_text else None
            enc = get_encoding(args.tokenizer)
            if text_paths:
                docs = iter_text_docs(text_paths, args.one_doc_per_file)
            else:
                docs = iter_hf_docs(args.dataset, args.name, args.split, args.text_column)
            val_docs = iter_text_docs(val_paths, args.one_doc_per_file) if val_paths else None
            # the index is built before anything is moved into --out, so a band no word of the text
            # falls in leaves --out as it was; its error names the text
            index_args["source"] = (f"--text {' '.join(args.text)}" if args.text else
                                    f"dataset {args.dataset}")
            meta = write_shards(docs, enc, args.out, val_tokens=val_tokens, shard_tokens=args.shard_tokens,
                                num_proc=args.num_proc, max_tokens=args.max_tokens, val_docs=val_docs,
                                overwrite=args.overwrite, index_args=index_args,
                                command=shlex.join(["python", "data.py"] + argv))
            index = meta["index"]
            for split in SPLITS:
                print(f"{split + ':':6s} {meta[split + '_tokens']:,} tokens, {meta[split + '_docs']:,} docs, "
                      f"{len(meta['shards'][split])} shards")
            # tokenizing and writing, not the index; meta.json rounds it to 0.01 s
            n, seconds = meta["train_tokens"] + meta["val_tokens"], max(meta["seconds"], 0.01)
            print(f"tokenized {n:,} tokens in {seconds:.1f}s ({n / seconds / 1e6:.2f}M tokens/s, "
                  f"{args.num_proc} processes) -> {args.out}")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"data.py: error: {e}")
    occurrences = ", ".join(f"{index[s]['n_positions']:,} {s}" for s in SPLITS if s in index)
    print(f"SMLMT index: {index['n_words']:,} candidate words ({args.min_per_million:g} to "
          f"{args.max_per_million:g} per million of {index['train_tokens']:,} train tokens), "
          f"{occurrences} occurrences, context {args.context}, {index['seconds']:.1f}s\n"
          f"  e.g., most to least frequent: {', '.join(map(repr, index['examples']))}")


if __name__ == "__main__":
    main()
