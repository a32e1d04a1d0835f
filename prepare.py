"""
Prepare a nanoMAML data directory: tokenize text with tiktoken into uint16 token shards, then build
the SMLMT occurrence index, in one command (data.py describes the files and reads them):

    python prepare.py --text corpus/train.txt --val_text corpus/valid.txt --out data/wiki
    python prepare.py --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb \\
                      --max_tokens 2_000_000_000
    python prepare.py --reindex --out data/wiki --min_per_million 20  # only the index, other band
"""
import argparse
import glob
import itertools
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import deque

import numpy as np
from tqdm import tqdm

import common
from data import HEADER_INTS, MAGIC, SPLITS, VERSION, load_split, read_meta, shard_crc32

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIG = "sample-10BT"
# Candidate-word band in occurrences per million train tokens, for GPT-2 BPE: above it are function
# words (' the', ' and', ' was', ' for', ' with', ...), below it words too rare for varied windows.
# 10 and 300 per million are train counts 103.2 and 3097.0 on 10M tokens of English Wikipedia.
DEFAULT_MIN_PER_MILLION = 10.0
DEFAULT_MAX_PER_MILLION = 300.0
DEFAULT_MAX_OCCURRENCES = 1000
DEFAULT_CONTEXT = 512
BEGINS_WORD, ENDS_IN_WORD = 1, 2  # index_token_kinds.npy's bits


def write_shard(path, tokens):
    """Write one shard: the header, then the tokens as uint16 -> their CRC-32 (data.py checks it
    against meta.json)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-d array, got shape {tokens.shape}")
    if len(tokens) > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 header; write smaller "
                         f"shards")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {tokens.dtype}; nothing "
                         f"written")
    bad = tokens[(tokens < 0) | (tokens >= 2 ** 16)]
    if bad.size:
        raise ValueError(f"{path}: token id {bad[0]} does not fit in uint16 (shards hold ids "
                         f"0..65535); nothing written")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    tokens = tokens.astype(np.uint16, copy=False)

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    common.atomic_write(path, write)
    return shard_crc32(tokens)


def text_files(patterns):
    """Expand globs (sorted, each must match at least one file) -> list of paths, without
    duplicates."""
    paths = []
    for pattern in patterns:
        matched = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"text pattern {pattern!r} matches no file")
        paths += [p for p in matched if p not in paths]
    return paths


def iter_text_docs(paths, one_doc_per_file=False):
    """Yield the documents of local UTF-8 files. A document is a run of non-blank lines (joined with
    their newlines, the last one dropped); documents are separated by one or more blank lines.
    With one_doc_per_file each file's whole text, stripped, is one document. Files are read line by
    line, so their size does not matter. Raises if no file holds any document."""
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
                for line in itertools.chain(f, [""]):  # the extra "" closes the last document
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
    n_docs = 0
    try:
        for row in datasets.load_dataset(name, config, split=split, streaming=True):
            if text_column not in row:
                raise ValueError(f"dataset {name} ({config}, {split}) has no column "
                                 f"{text_column!r}; its columns: {list(row)}")
            if row[text_column].strip():
                n_docs += 1
                yield row[text_column]
    except ValueError:
        raise
    except Exception as e:  # no network, no such dataset or config: the hub's many error types
        raise RuntimeError(f"cannot stream dataset {name} ({config}, {split}): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                           f"offline, give local text with --text FILES") from None
    if n_docs == 0:
        raise ValueError(f"dataset {name} ({config}, {split}) yielded no non-empty "
                         f"{text_column!r}")


_worker_enc = None


def _init_worker(enc):
    global _worker_enc
    _worker_enc = enc


def _encode_batch(is_val, docs):
    """(in a worker) documents -> (is_val, tokens, doc_lens): tokens (n,) uint16 are every document
    followed by <|endoftext|>; doc_lens (n_docs,) int64 count each document's tokens including its
    <|endoftext|>. Converting to numpy here, in parallel, keeps the main process light and makes
    the result cheap to send back."""
    # parallelism comes from the processes
    toks = _worker_enc.encode_ordinary_batch(docs, num_threads=1)
    eot = _worker_enc.eot_token
    for t in toks:
        t.append(eot)
    doc_lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    tokens = np.fromiter(itertools.chain.from_iterable(toks), dtype=np.uint16,
                         count=int(doc_lens.sum()))
    return is_val, tokens, doc_lens


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
    # fork: workers inherit the encoding and this module instead of re-importing torch (seconds per
    # worker). The pool is forked before the first document is read, so no reader thread of a
    # streamed dataset exists yet.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ctx.Pool(num_proc, initializer=_init_worker, initargs=(enc,))


def _tokenized(tasks, enc, num_proc):
    """Encode (is_val, docs) tasks on num_proc processes -> results in input order. At most
    2 * num_proc batches are in flight (Pool.imap would read a whole streamed dataset into memory
    ahead of the workers)."""
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
    """Buffers whole documents of one split and writes {split}_NNNNNN.bin shards, each ending at the
    end of the document that brings it to shard_tokens (the last one may be shorter): every shard
    starts a document and ends with <|endoftext|>."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.parts, self.n_buffered, self.n_tokens, self.n_docs, self.shards = [], 0, 0, 0, {}
        self.crc32 = {}

    def add(self, tokens, doc_lens):
        self.n_tokens += len(tokens)
        self.n_docs += len(doc_lens)
        # cut at the end of the document that fills the shard, so shard sizes do not depend on
        # batching
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
            self.crc32[name] = write_shard(os.path.join(self.out_dir, name),
                                           np.concatenate(self.parts))
            self.shards[name] = self.n_buffered
            self.parts, self.n_buffered = [], 0


def _check_out_dir(out_dir, enc, overwrite):
    """Refuse an output directory holding shards of another tokenizer (or of an unknown one), and
    one holding shards of this tokenizer unless overwrite; before anything is tokenized."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    meta_path = os.path.join(out_dir, "meta.json")
    has_shards = any(glob.glob(os.path.join(glob.escape(out_dir), f"{s}_*.bin")) for s in SPLITS)
    if os.path.exists(meta_path):
        meta = read_meta(out_dir)
        if (meta["tokenizer"], meta["vocab_size"]) != (enc.name, enc.n_vocab):
            raise ValueError(f"{meta_path}: {out_dir} holds shards of tokenizer "
                             f"{meta['tokenizer']!r} (vocab {meta['vocab_size']}), not "
                             f"{enc.name!r} (vocab {enc.n_vocab}); refusing to mix them, choose "
                             f"another --out")
    elif has_shards:
        raise ValueError(f"{out_dir} holds shards but no meta.json, so their tokenizer is unknown; "
                         f"refusing to touch them, choose another --out")
    if (os.path.exists(meta_path) or has_shards) and not overwrite:
        raise ValueError(f"{out_dir} already holds {enc.name} shards; pass --overwrite to replace "
                         f"them (the new shards are written completely before any old file is "
                         f"replaced)")


def _remove_stale_staging(out_dir):
    """A prepare.py killed mid-write (kill -9 runs no cleanup) leaves its staging folder, at scale
    gigabytes; the next run into the same --out removes it. Called with --out's lock held, so no
    live run's staging folder is among them."""
    for path in glob.glob(os.path.join(glob.escape(out_dir), ".write_shards-*")) + glob.glob(
            os.path.join(glob.escape(out_dir), ".build_index-*")):
        shutil.rmtree(path, ignore_errors=True)


def write_shards(docs, enc, out_dir, val_tokens=1_000_000, shard_tokens=100_000_000, num_proc=1,
                 max_tokens=None, val_docs=None, overwrite=False, command="", batch_chars=1 << 18,
                 progress=True, index_args=None):
    """Tokenize documents into train/val shards of out_dir and write meta.json -> meta.

    docs: iterable of str. The first val_tokens tokens (whole documents: the document that reaches
    val_tokens is kept whole) go to val, the rest to train. Or val_docs: an iterable of str that is
    the val split instead (then val_tokens must be 0). max_tokens: stop reading docs once this many
    of their tokens are written (at a document end). Every file is written under a temporary
    directory in out_dir first and renamed into place only once everything is written; an error
    leaves out_dir as it was. With overwrite, the old shards of the same tokenizer are replaced and
    the old index is dropped from meta.json (build_index writes a new one).
    index_args: keyword arguments of build_index, to build the index in that temporary directory
    too, so that a failing index (a band no word falls in) leaves out_dir as it was; without,
    meta["index"] is None.
    """
    if val_docs is not None and val_tokens:
        raise ValueError("give either val_docs or val_tokens > 0, not both")
    if num_proc < 1 or shard_tokens < 1:
        raise ValueError(f"num_proc and shard_tokens must be >= 1, got {num_proc} and "
                         f"{shard_tokens}")
    if enc.max_token_value >= 2 ** 16:
        raise ValueError(f"tokenizer {enc.name} has ids up to {enc.max_token_value}, which do not "
                         f"fit uint16 shards")
    _check_out_dir(out_dir, enc, overwrite)
    created = not os.path.exists(out_dir)
    common.make_dir(out_dir, "--out")
    lock = common.lock_dir(out_dir, f"--out {out_dir}", "prepare.py", "choose another --out")
    _remove_stale_staging(out_dir)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".write_shards-")
    try:
        train = _SplitWriter(staging, "train", shard_tokens)
        val = _SplitWriter(staging, "val", shard_tokens)
        tasks = _batches(docs, False, batch_chars)
        if val_docs is not None:
            tasks = itertools.chain(_batches(val_docs, True, batch_chars), tasks)
        t0, n_read = time.time(), 0
        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing",
                   disable=not progress)
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
                head, head_lens, tokens, doc_lens = _cut(tokens, doc_lens,
                                                         val_tokens - val.n_tokens)
                val.add(head, head_lens)
            if len(tokens):
                train.add(tokens, doc_lens)
            if done:
                break
        bar.close()
        train.flush()
        val.flush()
        if train.n_tokens == 0:
            raise ValueError(f"all {val.n_tokens} tokens went to val (val_tokens={val_tokens}); "
                             f"nothing left for train")
        seconds = time.time() - t0
        meta = {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
                "mask_id": enc.n_vocab, "train_tokens": train.n_tokens,
                "val_tokens": val.n_tokens, "train_docs": train.n_docs, "val_docs": val.n_docs,
                "shards": {"train": train.shards, "val": val.shards},
                "shard_crc32": {**train.crc32, **val.crc32}, "command": command,
                "seconds": round(seconds, 2), "index": None}
        common.write_json(os.path.join(staging, "meta.json"), meta)
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
        if created and os.listdir(out_dir) == [".lock"]:  # a failed first run leaves no --out
            os.remove(os.path.join(out_dir, ".lock"))
            try:
                os.rmdir(out_dir)
            except OSError:  # another prepare.py came in meanwhile: it holds the folder now
                pass
        lock.close()


def _keep_lowest(keys, pos, k):
    """keys (n,) int64 = word << 32 | 32 random bits. Keep, per word, the k entries with the lowest
    random bits: a uniform sample without replacement that can be taken shard by shard, never
    holding every occurrence."""
    order = np.argsort(keys)
    keys, pos = keys[order], pos[order]
    words = keys >> 32
    # rank within the word's run
    keep = np.arange(len(keys)) - np.searchsorted(words, words, side="left") < k
    return keys[keep], pos[keep]


def _check_band(min_per_million, max_per_million):
    if not 0 <= min_per_million <= max_per_million:  # also refuses NaN
        raise ValueError(f"need 0 <= --min_per_million <= --max_per_million, got {min_per_million} "
                         f"and {max_per_million}")


def _token_kinds(enc):
    """-> (n_vocab,) uint8 bit flags of every token: BEGINS_WORD where its first character is not a
    letter or digit (' cat', '.', '\\n', '–', special tokens), so it cannot continue the word
    before it; ENDS_IN_WORD where its last character is a letter (any script: 'caf' + 'é' is one
    word; a letter after '274' begins one). A token holding part of a character begins a word and
    does not end inside one, as the punctuation it mostly is."""
    kinds = np.zeros(enc.n_vocab, dtype=np.uint8)
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    for t in range(enc.n_vocab):
        if t in special:
            kinds[t] = BEGINS_WORD
            continue
        try:
            b = enc.decode_single_token_bytes(t)
        except KeyError:  # a gap in the ids
            continue
        try:
            s = b.decode("utf-8")  # '–' and '“' are punctuation, 'é' a letter
            kinds[t] = (0 if s[0].isalnum() else BEGINS_WORD) | (ENDS_IN_WORD if s[-1].isalpha()
                                                                 else 0)
        except UnicodeDecodeError:  # bytes of a character split over tokens ('“' often is)
            kinds[t] = BEGINS_WORD
    return kinds


def _spellings(enc, words):
    """Every spelling of each candidate word: the same letters in lower case, capitalised, upper
    case or as the candidate has them, with or without the leading space (' word', 'word',
    ' Word', 'WORD', ...). Candidates that differ only in case or spacing share their spellings
    (under the first of them) -> (single (n_vocab,) int32: the candidate, as an index into words,
    whose spelling a token is, or -1; multi (S, 1 + L) int32: rows [candidate, its tokens, -1
    padding], the spellings that take several tokens ('Orbit' = 'Or' + 'bit'))."""
    of_key, forms = {}, {}
    for i, t in enumerate(words):
        letters = enc.decode_single_token_bytes(int(t))[1:].decode()
        c = of_key.setdefault(letters.lower(), i)
        forms.setdefault(c, set()).update({letters, letters.lower(), letters.capitalize(),
                                           letters.upper()})
    single = np.full(enc.n_vocab, -1, dtype=np.int32)
    multi = []
    for c, spelt in forms.items():
        for s in sorted(spelt):
            for text in (" " + s, s):
                ids = enc.encode_ordinary(text)
                if len(ids) == 1:
                    single[ids[0]] = c
                else:
                    multi.append([c] + ids)
    width = max((len(m) for m in multi), default=1)
    multi = np.array([m + [-1] * (width - len(m)) for m in multi], dtype=np.int32)
    return single, multi.reshape(-1, width)


def _whole_word(shard, kinds):
    """(n,) bool: the token ends a word, i.e. the next token begins one or the shard ends."""
    out = np.ones(len(shard), dtype=bool)
    out[:-1] = (kinds[shard[1:]] & BEGINS_WORD) > 0
    return out


def _candidate_words(enc, counts, train_tokens, min_per_million, max_per_million, source):
    """The word tokens whose train frequency lies in the band -> (word ids (W,) int32 in id order,
    10 of them decoded, from the most to the least frequent)."""
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
    per_million = counts[words] / train_tokens * 1e6  # (len(words),)
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
    examples = [enc.decode([int(t)]) for t in
                by_freq[np.linspace(0, len(words) - 1, min(10, len(words))).astype(np.int64)]]
    return words, examples


def _index_split(shards, words, eot_id, max_occurrences, context, rng, kinds):
    """Up to max_occurrences random whole-word occurrences of each word in one split's shards
    (the next token begins a new word: ' res' in ' res judicata', not in ' research'), each with
    context - 1 tokens before it in its shard -> (offsets (W+1,), positions (P,), docs (P,))."""
    is_word = np.zeros(2 ** 16, dtype=bool)  # indexed by uint16 tokens
    is_word[words] = True
    keys, pos, eots = np.zeros(0, np.int64), np.zeros(0, np.int64), []
    start = 0
    for shard in shards:
        p = np.flatnonzero(is_word[shard] & _whole_word(shard, kinds))
        p = p[p >= context - 1]
        new_keys = (shard[p].astype(np.int64) << 32) | rng.integers(0, 2 ** 32, len(p))
        keys, pos = _keep_lowest(np.concatenate([keys, new_keys]),
                                 np.concatenate([pos, p + start]), max_occurrences)
        eots.append(np.flatnonzero(shard == eot_id) + start)
        start += len(shard)
    # sort by word, then position: word << 40 | position (a split holds < 2**40 tokens)
    by_word = np.sort(((keys >> 32) << 40) | pos)
    w_kept, p_kept = by_word >> 40, by_word & (2 ** 40 - 1)
    offsets = np.searchsorted(w_kept, words, side="left")
    offsets = np.append(offsets, len(w_kept)).astype(np.int64)
    docs = np.searchsorted(np.concatenate(eots), p_kept)  # (P,) the <|endoftext|>s before
    return offsets, p_kept, docs


def build_index(data_dir, enc, min_per_million=DEFAULT_MIN_PER_MILLION,
                max_per_million=DEFAULT_MAX_PER_MILLION, max_occurrences=DEFAULT_MAX_OCCURRENCES,
                context=DEFAULT_CONTEXT, seed=0, source=None):
    """Write the SMLMT occurrence index of data_dir and record it in meta.json -> meta["index"].

    Candidate words: tokens that decode to a space and at least 3 letters, never special tokens,
    that occur as a whole word (the next token begins a new word) in the TRAIN shards with a
    frequency in [min_per_million, max_per_million] occurrences per million train tokens. Both
    splits index the same candidates; for each candidate and split, up to max_occurrences
    whole-word positions chosen uniformly at random, only positions with at least context - 1
    tokens before them in the same shard, so any window of up to `context` tokens ending at the
    occurrence lies inside one shard; and the document of each (documents end at <|endoftext|>),
    so that an episode can take a word from distinct documents. For the sampler's masking, every
    token's kind (begins a word, ends inside one) and each candidate's single-token spellings in
    other cases and spacings. The files are written to a staging directory and renamed into
    place at the end, meta.json last, so a failure leaves the previous index as it was.
    source: what the train split was made from (input files, a dataset), for errors about the text.
    """
    meta = read_meta(data_dir)
    source = source or f"{data_dir} (train shards)"
    if (meta["tokenizer"], meta["vocab_size"]) != (enc.name, enc.n_vocab):
        raise ValueError(f"{os.path.join(data_dir, 'meta.json')}: shards of tokenizer "
                         f"{meta['tokenizer']!r}, index asked for with {enc.name!r}")
    _check_band(min_per_million, max_per_million)
    t0 = time.time()
    shards, _ = load_split(data_dir, "train", meta)
    kinds = _token_kinds(enc)
    counts = np.zeros(enc.n_vocab, dtype=np.int64)  # whole-word occurrences: what is indexed
    for shard in shards:
        counts += np.bincount(shard[_whole_word(shard, kinds)],
                              minlength=enc.n_vocab)[:enc.n_vocab]
    words, examples = _candidate_words(enc, counts, meta["train_tokens"], min_per_million,
                                       max_per_million, source)
    spellings, multi = _spellings(enc, words)
    index = {"n_words": len(words), "words": "index_words.npy", "spellings": "index_spellings.npy",
             "multi_spellings": "index_multi_spellings.npy", "token_kinds": "index_token_kinds.npy",
             "min_per_million": min_per_million,
             "max_per_million": max_per_million, "train_tokens": meta["train_tokens"],
             "examples": examples, "max_occurrences": max_occurrences, "context": context,
             "seed": seed}
    _remove_stale_staging(data_dir)
    staging = tempfile.mkdtemp(dir=data_dir, prefix=".build_index-")
    try:
        for name, arr in (("words", words), ("spellings", spellings),
                          ("multi_spellings", multi), ("token_kinds", kinds)):
            common.atomic_write(os.path.join(staging, f"index_{name}.npy"),
                                lambda f: np.save(f, arr))
        for i, split in enumerate(SPLITS):
            if not meta["shards"].get(split):
                continue
            shards, _ = load_split(data_dir, split, meta)
            offsets, positions, docs = _index_split(shards, words, meta["eot_id"],
                                                    max_occurrences, context,
                                                    np.random.default_rng([seed, i]), kinds)
            files = {"offsets": offsets, "positions": positions, "docs": docs}
            for key, arr in files.items():
                common.atomic_write(os.path.join(staging, f"index_{split}_{key}.npy"),
                                    lambda f: np.save(f, arr))
            index[split] = {**{key: f"index_{split}_{key}.npy" for key in files},
                            "n_positions": len(positions), "shards": meta["shards"][split]}
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(data_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    index["seconds"] = round(time.time() - t0, 2)
    meta["index"] = index
    common.write_json(os.path.join(data_dir, "meta.json"), meta)
    return index


def get_args(argv):
    parser = common.ArgumentParser(
        description="Tokenize text into uint16 token shards with tiktoken, then build the SMLMT "
                    "occurrence index.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"real runs: python prepare.py --dataset {DEFAULT_DATASET} --name "
               f"{DEFAULT_DATASET_CONFIG} --out data/fineweb --max_tokens 2_000_000_000\n"
               f"offline:   python prepare.py --text corpus/train.txt --val_text corpus/valid.txt "
               f"--out data/wiki\n"
               f"An --out holding shards of another tokenizer is refused; one holding shards of "
               f"the same tokenizer is refused unless --overwrite.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", metavar="GLOB",
                        help="local UTF-8 files; documents separated by blank lines")
    source.add_argument("--dataset", metavar="NAME",
                        help=f"Hugging Face dataset, streamed (e.g. {DEFAULT_DATASET})")
    source.add_argument("--reindex", action="store_true",
                        help="only rebuild the SMLMT index of the shards in --out")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val_text", nargs="+", metavar="GLOB",
                        help="local files that are the val split (instead of --val_tokens)")
    parser.add_argument("--one_doc_per_file", action="store_true",
                        help="each --text/--val_text file is one document")
    parser.add_argument("--name", default=None,
                        help=f"dataset config (e.g. {DEFAULT_DATASET_CONFIG})")
    parser.add_argument("--split", default="train", help="dataset split to stream")
    parser.add_argument("--text_column", default="text", help="dataset column holding the text")
    parser.add_argument("--val_tokens", type=int, default=None,
                        help="the first N tokens (whole documents) go to val; default 1_000_000, "
                             "0 with --val_text")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="stop after N input tokens (at a document end)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000,
                        help="tokens per shard (a shard ends with the document that reaches it)")
    parser.add_argument("--num_proc", type=int, default=common.n_cpus(),
                        help="tokenizer processes (default: the CPUs this process may use)")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards of the same tokenizer in --out")
    parser.add_argument("--min_per_million", type=float, default=DEFAULT_MIN_PER_MILLION,
                        help="candidate words: lowest train frequency, per million train tokens")
    parser.add_argument("--max_per_million", type=float, default=DEFAULT_MAX_PER_MILLION,
                        help="candidate words: highest train frequency, per million train tokens")
    parser.add_argument("--max_occurrences", type=int, default=DEFAULT_MAX_OCCURRENCES,
                        help="indexed occurrences per word and split")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                        help="longest SMLMT window the index serves")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the index's occurrence sampling")
    args = parser.parse_args(argv)
    if not (args.text or args.dataset or args.reindex):
        parser.error("give --text GLOB, --dataset NAME or --reindex")
    if args.val_text and args.val_tokens:
        parser.error("give --val_text or --val_tokens, not both")
    return args


def check_args(args):
    """The numbers on the command line, before any work; each error names its flag."""
    least = {"--shard_tokens": (args.shard_tokens, 1), "--num_proc": (args.num_proc, 1),
             "--context": (args.context, 1),
             # an episode takes k_shot + q_query >= 2 occurrences of each word
             "--max_occurrences": (args.max_occurrences, 2)}
    if args.max_tokens is not None:
        least["--max_tokens"] = (args.max_tokens, 1)
    if not args.val_text and not args.reindex:  # training reads the val split: it needs one
        least["--val_tokens"] = (1_000_000 if args.val_tokens is None else args.val_tokens, 1)
    for flag, (value, low) in least.items():
        if value < low:
            why = " (training reads a val split)" if flag == "--val_tokens" else ""
            fix = "; or give --val_text FILES" if flag == "--val_tokens" else ""
            raise ValueError(f"{flag} must be at least {low}{why}, got {value}{fix}")
    if args.max_tokens is not None and not args.val_text and not args.reindex:
        val_tokens = args.val_tokens or 1_000_000
        if args.max_tokens <= val_tokens:
            raise ValueError(f"--max_tokens {args.max_tokens} leaves no train tokens after the "
                             f"{val_tokens} val tokens (--val_tokens"
                             f"{'' if args.val_tokens else ', its default'}); raise --max_tokens "
                             f"or lower --val_tokens")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    val_tokens = 0 if args.val_text else (1_000_000 if args.val_tokens is None else args.val_tokens)
    index_args = dict(min_per_million=args.min_per_million, max_per_million=args.max_per_million,
                      max_occurrences=args.max_occurrences, context=args.context, seed=args.seed)
    try:
        check_args(args)
        _check_band(args.min_per_million, args.max_per_million)  # before any work
        if args.reindex:
            enc = common.get_encoding(read_meta(args.out)["tokenizer"])
            with common.lock_dir(args.out, f"--out {args.out}", "prepare.py",
                                 "choose another --out"):  # write_shards takes its own
                index = build_index(args.out, enc, **index_args)
        else:
            # inputs are checked before the tokenizer is loaded (which may need the network)
            text_paths = text_files(args.text) if args.text else None
            val_paths = text_files(args.val_text) if args.val_text else None
            enc = common.get_encoding(args.tokenizer)
            if text_paths:
                docs = iter_text_docs(text_paths, args.one_doc_per_file)
            else:
                docs = iter_hf_docs(args.dataset, args.name, args.split, args.text_column)
            val_docs = iter_text_docs(val_paths, args.one_doc_per_file) if val_paths else None
            # the index is built before anything is moved into --out, so a band no word of the text
            # falls in leaves --out as it was; its error names the text
            index_args["source"] = (f"--text {' '.join(args.text)}" if args.text else
                                    f"dataset {args.dataset}")
            meta = write_shards(docs, enc, args.out, val_tokens=val_tokens,
                                shard_tokens=args.shard_tokens, num_proc=args.num_proc,
                                max_tokens=args.max_tokens, val_docs=val_docs,
                                overwrite=args.overwrite, index_args=index_args,
                                command=shlex.join(["python", "prepare.py"] + argv))
            index = meta["index"]
            for split in SPLITS:
                print(f"{split + ':':6s} {meta[split + '_tokens']:,} tokens, "
                      f"{meta[split + '_docs']:,} docs, {len(meta['shards'][split])} shards")
            # tokenizing and writing, not the index; meta.json rounds it to 0.01 s
            n, seconds = meta["train_tokens"] + meta["val_tokens"], max(meta["seconds"], 0.01)
            print(f"tokenized {n:,} tokens in {seconds:.1f}s ({n / seconds / 1e6:.2f}M tokens/s, "
                  f"{args.num_proc} processes) -> {args.out}")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"prepare.py: error: {e}")
    occurrences = ", ".join(f"{index[s]['n_positions']:,} {s}" for s in SPLITS if s in index)
    print(f"SMLMT index: {index['n_words']:,} candidate words ({args.min_per_million:g} to "
          f"{args.max_per_million:g} per million of {index['train_tokens']:,} train tokens), "
          f"{occurrences} occurrences, context {args.context}, {index['seconds']:.1f}s\n"
          f"  e.g., most to least frequent: {', '.join(map(repr, index['examples']))}")


if __name__ == "__main__":
    main()
