"""
Reading nanoMAML's token shards: ShardReader (random next-token windows), SMLMTSampler (N-way
K-shot masked-word episodes) and LMTaskSampler (K chunks of a document as support, the next chunk
as query). Every draw comes from the numpy Generator the caller passes. prepare.py writes the data.

One data directory holds:
    train_000000.bin ...   val_000000.bin ...
        header of HEADER_INTS int32 [MAGIC, VERSION, n_tokens, 0, ...], then n_tokens uint16;
        whole documents, each followed by <|endoftext|>
    meta.json
        tokenizer, vocab size, eot and mask ids, token counts, shard sizes, the command line,
        and a description of the index
    index_words.npy (W,) int32
        candidate word ids, shared by both splits
    index_spellings.npy (V,) int32
        for every token, the candidate (index into words) it spells in another case or spacing
        (' Word', 'word', 'WORD' ...; the candidate itself too), or -1
    index_multi_spellings.npy (S, 1 + L) int32
        spellings of several tokens ('Orbit' = 'Or' + 'bit'): rows [candidate, tokens, -1 padding]
    index_token_kinds.npy (V,) uint8
        bit 1: the token begins a word (first character not a letter or digit); bit 2: it ends
        inside one (last character a letter)
    index_{split}_offsets.npy (W+1,) int64
        the occurrences of word i are positions[offsets[i]:offsets[i+1]]
    index_{split}_positions.npy (P,) int64
        global positions into the concatenation of the split's shards
    index_{split}_docs.npy (P,) int64
        document (numbered within the split) of each position
"""
import glob
import json
import os
import sys
import time
import zlib
from dataclasses import KW_ONLY, dataclass

import numpy as np
import torch

MAGIC = 20261122
VERSION = 1
HEADER_INTS = 256
SPLITS = ("train", "val")


def load_shard(path):
    """Memory-map a shard's tokens -> (n_tokens,) uint16, after checking its header against its
    size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_INTS * 4}-byte header; "
                         f"truncated or not a shard")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: magic number {header[0]} != {MAGIC}; corrupted or not a "
                         f"nanoMAML shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this data.py reads version "
                         f"{VERSION}")
    n = int(header[2])
    if n < 0 or size != HEADER_INTS * 4 + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens ({HEADER_INTS * 4 + 2 * n} bytes) but "
                         f"the file has {size} bytes; truncated or corrupted")
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
                                f"`python prepare.py --text ... --out {data_dir}`")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for key in ("tokenizer", "vocab_size", "eot_id", "mask_id", "train_tokens", "val_tokens",
                "shards"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def load_split(data_dir, split, meta):
    """Memory-map a split's shards, checked against meta.json -> (shards, starts), where starts[i]
    (int64) is the global position of shard i's first token in the concatenation of the split's
    shards."""
    paths = list_shards(data_dir, split)
    recorded = meta["shards"].get(split, {})
    names = [os.path.basename(p) for p in paths]
    if names != list(recorded):
        raise ValueError(f"{data_dir}: {split} shards on disk {names} are not the ones meta.json "
                         f"records {list(recorded)}; the directory was changed after it was "
                         f"written")
    shards = [load_shard(p) for p in paths]
    for path, shard in zip(paths, shards):
        if len(shard) != recorded[os.path.basename(path)]:
            raise ValueError(f"{path}: {len(shard)} tokens but meta.json records "
                             f"{recorded[os.path.basename(path)]}; the shard was replaced after "
                             f"meta.json was written")
    _check_crc32(data_dir, meta, paths, shards)
    starts = np.cumsum([0] + [len(s) for s in shards[:-1]]).astype(np.int64)
    return shards, starts


# (path, size, mtime) of the shards this process has checksummed, and the data dirs without
# checksums it has given its notice about
_checked = set()


def shard_crc32(tokens):
    """The checksum meta.json records for a shard: CRC-32 of its uint16 tokens (cheap next to
    reading them)."""
    return zlib.crc32(np.ascontiguousarray(tokens, dtype=np.uint16))


def _check_crc32(data_dir, meta, paths, shards):
    """Compare each shard's tokens with the CRC-32 meta.json records for it (once per process and
    file version): token counts alone miss a shard replaced by other tokens of the same length. A
    meta.json from before checksums gets a notice once and is read as before."""
    recorded = meta.get("shard_crc32")
    if recorded is None:
        if data_dir not in _checked:
            _checked.add(data_dir)
            print(f"note: {os.path.join(data_dir, 'meta.json')} records no shard checksums (an "
                  f"older prepare.py wrote it): shards are checked by size only; rebuilding the "
                  f"directory with prepare.py --overwrite adds them", file=sys.stderr)
        return
    rebuild = meta.get("command") or f"python prepare.py --text ... --out {data_dir}"
    rebuild += "" if "--overwrite" in rebuild else " --overwrite"
    for path, shard in zip(paths, shards):
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key in _checked:
            continue
        want, got = recorded.get(os.path.basename(path)), shard_crc32(shard)
        if want != got:
            raise ValueError(f"{path}: CRC-32 {got:08x} but meta.json records "
                             + (f"{want:08x}" if want is not None else "none")
                             + f"; the shard was replaced or damaged after it was written: rebuild "
                               f"the directory (`{rebuild}`)")
        _checked.add(key)


def _gather(shards, shard_starts, starts, length):
    """Windows of `length` tokens beginning at global positions `starts` (n,), each inside one
    shard -> (n, length) int64. One vectorized take per shard touched, no loop over windows."""
    sid = np.searchsorted(shard_starts, starts, side="right") - 1
    out = np.empty((len(starts), length), dtype=np.int64)
    for s in np.unique(sid):
        rows = np.flatnonzero(sid == s)
        out[rows] = shards[s][(starts[rows] - shard_starts[s])[:, None] + np.arange(length)]
    return out


def _load_index(data_dir, meta, split, shards, starts):
    """Memory-map the index of one split -> (words (W,), offsets (W+1,), positions (P,), docs (P,)),
    after checking that it was built from exactly these shards; raises naming the index file
    otherwise."""
    index = meta.get("index")
    meta_path = os.path.join(data_dir, "meta.json")
    rebuild = f"build it with `python prepare.py --reindex --out {data_dir}`"
    if not index:
        raise FileNotFoundError(f"{meta_path}: no SMLMT index; {rebuild}")
    if split not in index:
        raise ValueError(f"{meta_path}: the SMLMT index has no {split} split")
    if "docs" not in index[split] or "spellings" not in index:
        raise ValueError(f"{meta_path}: the SMLMT index has no document numbers or word spellings "
                         f"(an older version wrote it, of word-initial tokens, not whole words); "
                         f"rebuild it with `python prepare.py --reindex --out {data_dir}`")
    for key in ("spellings", "multi_spellings", "token_kinds"):
        path = os.path.join(data_dir, index[key])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"index file {path} does not exist; {rebuild}")
        if key != "multi_spellings" and len(np.load(path, mmap_mode="r")) != meta["vocab_size"]:
            raise ValueError(f"{path}: not one entry per token of the vocabulary "
                             f"({meta['vocab_size']}); {rebuild}")
    words_path = os.path.join(data_dir, index["words"])
    offsets_path = os.path.join(data_dir, index[split]["offsets"])
    positions_path = os.path.join(data_dir, index[split]["positions"])
    docs_path = os.path.join(data_dir, index[split]["docs"])
    for path in (words_path, offsets_path, positions_path, docs_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"index file {path} does not exist; {rebuild}")
    if index[split]["shards"] != meta["shards"][split]:
        raise ValueError(f"{positions_path}: built for {split} shards {index[split]['shards']}, "
                         f"the directory has {meta['shards'][split]}; {rebuild}")
    words = np.load(words_path, mmap_mode="r")
    offsets = np.load(offsets_path, mmap_mode="r")
    positions = np.load(positions_path, mmap_mode="r")
    docs = np.load(docs_path, mmap_mode="r")
    n_tokens = int(starts[-1]) + len(shards[-1])
    if (len(words) != index["n_words"] or len(offsets) != len(words) + 1
            or offsets[-1] != len(positions) or len(positions) != index[split]["n_positions"]
            or len(docs) != len(positions) or (len(positions) and positions.max() >= n_tokens)):
        raise ValueError(f"{positions_path}: index arrays do not agree with each other or with "
                         f"meta.json (words {len(words)}, offsets {len(offsets)}, positions "
                         f"{len(positions)}, docs {len(docs)}); {rebuild}")
    # spot-check that occurrences hold their word: catches an index of other shards of equal sizes
    check = np.linspace(0, len(positions) - 1, min(1000, len(positions))).astype(np.int64)
    if len(check):
        owner = np.searchsorted(offsets, check, side="right") - 1
        got = _gather(shards, starts, positions[check], 1)[:, 0]
        if not np.array_equal(got, words[owner]):
            raise ValueError(f"{positions_path}: occurrences do not hold their words in the "
                             f"{split} shards; the index belongs to other data; {rebuild}")
    return words, offsets, positions, docs


def _tensor(a):
    """numpy int64 -> contiguous CPU torch tensor (the model may .view() it) of its own writable
    memory: a read-only view (an episode's labels with k_shot or q_query 1 are views of one
    broadcast array) would give tensors that share it."""
    return torch.from_numpy(np.require(a, requirements=("C", "W")))


class ShardReader:
    """Random (B, T+1) windows of one split, sampled uniformly over every window that fits inside a
    shard (with replacement, no epochs)."""

    def __init__(self, data_dir, split, batch_size, seq_len):
        self.meta = read_meta(data_dir)
        self.mask_id = self.meta["mask_id"]
        self.shards, self.shard_starts = load_split(data_dir, split, self.meta)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_starts = np.array([max(len(s) - seq_len, 0) for s in self.shards], dtype=np.int64)
        if self.n_starts.sum() == 0:
            raise ValueError(f"{data_dir}: every {split} shard is shorter than seq_len + 1 = "
                             f"{seq_len + 1} tokens (the longest has "
                             f"{max(map(len, self.shards))}); lower seq_len")
        self.cum_starts = np.cumsum(self.n_starts)

    def next_batch(self, rng):
        """-> x (B, T), y (B, T) int64, drawn from rng, a numpy Generator: training keys one by
        (seed, step, slot), so a batch does not depend on what was drawn before it."""
        r = rng.integers(0, self.cum_starts[-1], self.batch_size)
        sid = np.searchsorted(self.cum_starts, r, side="right")
        starts = self.shard_starts[sid] + r - (self.cum_starts[sid] - self.n_starts[sid])
        w = _gather(self.shards, self.shard_starts, starts, self.seq_len + 1)  # (B, T+1)
        return _tensor(w[:, :-1]), _tensor(w[:, 1:])


@dataclass
class Episode:
    """One episode, as every sampler returns it: support and query token windows (rows, T) and the
    labels of the examples read from them. Where an example is read depends on the task:
    SMLMT (SMLMTSampler): at each window's last position, the masked occurrence; y (rows,) the
        class 0..N-1, rows class-major (support rows c*K..c*K+K-1 are class c); support_pos and
        query_pos (rows,): each window's last position in the split's token stream.
    positions (PositionsSampler): at positions support_at (K,) and query_at (1,) of each of the B
        windows; support_y (B*K,) and query_y (B,) in (window, position) order, -1: left out.
    LM task (LMTaskSampler): at every position, the next token: y (rows, T); no classes.
    word_ids (N,): each class's token id, whose columns of the meta head give the class logits."""
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    _: KW_ONLY  # the rest by name only: a positional mix-up would go unnoticed
    word_ids: torch.Tensor = None
    support_at: torch.Tensor = None
    query_at: torch.Tensor = None
    support_pos: torch.Tensor = None
    query_pos: torch.Tensor = None


class SMLMTSampler:
    """N-way K-shot subset-masked LM episodes (Bansal et al. 2020) from the occurrence index that
    prepare.py writes.

    An episode draws n_way distinct usable candidate words and, per word, k_shot + q_query
    whole-word occurrences: the first k_shot are support, the rest query. Each example is the
    window of seq_len tokens ENDING at the occurrence, in which every word that begins with a
    spelling of the class word (' Word', 'word', 'WORD', 'Or' + 'bit' for ' orbit', ...) is
    masked whole: every token of it and every token that continues the word (' President' + 'ial'
    -> [MASK][MASK]), so neither a [MASK] followed by the rest of its word nor another spelling
    gives the class away. The last token is always mask_id; the label is the word's class 0..N-1.
    A word's occurrences come from k_shot + q_query distinct documents, or where it has fewer, from
    occurrences whose windows do not overlap (OccurrenceGroups); windows from distinct documents
    can still overlap where one reaches back across a document boundary (rarely).
    """

    def __init__(self, data_dir, n_way, k_shot, q_query, seq_len, split="train"):
        self.meta = read_meta(data_dir)
        self.n_way, self.k_shot, self.q_query, self.seq_len = n_way, k_shot, q_query, seq_len
        self.mask_id = self.meta["mask_id"]
        self.shards, self.shard_starts = load_split(data_dir, split, self.meta)
        self.words, self.offsets, self.positions, docs = _load_index(data_dir, self.meta, split,
                                                                     self.shards, self.shard_starts)
        index = self.meta["index"]
        # token tables indexed by any token id, mask_id and padding ids included
        self.spelling = np.full(2 ** 16 + 1, -1, dtype=np.int64)  # (V',) candidate spelled, or -1
        V = self.meta["vocab_size"]
        self.spelling[:V] = np.load(os.path.join(data_dir, index["spellings"]))
        kinds = np.zeros(2 ** 16 + 1, dtype=np.uint8)
        kinds[:V] = np.load(os.path.join(data_dir, index["token_kinds"]))
        self.begins_word, self.ends_in_word = (kinds & 1) > 0, (kinds & 2) > 0
        self.begins_word[V:] = True
        multi = np.load(os.path.join(data_dir, index["multi_spellings"])).astype(np.int64)
        self.multi_of, self.multi = multi[:, 0], multi[:, 1:]  # (S,), (S, L) -1 padded
        index_path = os.path.join(data_dir, self.meta["index"][split]["positions"])
        if seq_len > self.meta["index"]["context"]:
            raise ValueError(f"{index_path}: seq_len {seq_len} > the index's context "
                             f"{self.meta['index']['context']}; rebuild it with "
                             f"`python prepare.py --reindex --context {seq_len} --out {data_dir}`")
        n = k_shot + q_query
        self.groups = OccurrenceGroups(self.offsets, self.positions, docs, n, seq_len)
        self.usable = self.groups.usable  # (U,) indices into words
        self.n_words = len(self.usable)
        self.spelled = self.spelling[self.words]  # (W,) the candidate whose spellings word i masks
        n_distinct = len(np.unique(self.spelled[self.usable]))
        if n_way > n_distinct:
            raise ValueError(f"{index_path}: n_way {n_way} > {n_distinct} candidate words (up to "
                             f"case and spacing) whose {split} occurrences give k_shot + q_query = "
                             f"{n} windows from distinct documents or windows that do not "
                             f"overlap; lower n_way, k_shot or q_query")

    def sample(self, rng):
        """-> Episode, drawn from rng, a numpy Generator (as in ShardReader.next_batch)."""
        N, K, Q, T = self.n_way, self.k_shot, self.q_query, self.seq_len
        cls = rng.choice(self.usable, N, replace=False)  # (N,) class c is word self.words[cls[c]]
        while len(np.unique(self.spelled[cls])) < N:  # two spellings of one word (' City', ' city')
            cls = rng.choice(self.usable, N, replace=False)
        pos = self.groups.draw(cls, rng)  # (N, K+Q) global positions of the occurrences
        # A window may reach back across an <|endoftext|> into the document before it. Kept: AR
        # windows are packed across documents too (nanoGPT-style), so an episode window is the
        # same kind of input; cutting it at the boundary would need padding and an attention mask.
        starts = pos.reshape(-1) - T + 1
        x = _gather(self.shards, self.shard_starts, starts, T).reshape(N, K + Q, T)
        word_ids = self.words[cls].astype(np.int64)
        x[self._masked(x, self.spelled[cls])] = self.mask_id
        labels = np.broadcast_to(np.arange(N)[:, None], (N, K + Q))
        return Episode(support_x=_tensor(x[:, :K].reshape(N * K, T)),
                       support_y=_tensor(labels[:, :K].reshape(-1)),
                       query_x=_tensor(x[:, K:].reshape(N * Q, T)),
                       query_y=_tensor(labels[:, K:].reshape(-1)),
                       word_ids=_tensor(word_ids), support_pos=_tensor(pos[:, :K].reshape(-1)),
                       query_pos=_tensor(pos[:, K:].reshape(-1)))

    def _masked(self, x, spelled):
        """x (N, M, T) windows, spelled (N,) the candidate whose spellings class n masks ->
        (N, M, T) bool: the tokens of every word that begins with such a spelling. A word begins
        where a token begins one, or follows a token that does not end inside one ('(' + 'word'),
        or at the window's start; it goes on through the tokens that do neither."""
        N, M, T = x.shape
        starts = self.begins_word[x]
        starts[..., 1:] |= ~self.ends_in_word[x[..., :-1]]
        starts[..., 0] = True
        # words that begin with a single-token spelling: (h,) class, window, position each
        n, m, t = np.nonzero(starts & (self.spelling[x] == spelled[:, None, None]))
        rows = np.flatnonzero(np.isin(self.multi_of, spelled))  # (R,) several-token spellings
        if len(rows):
            order = np.argsort(spelled)
            row_n = order[np.searchsorted(spelled, self.multi_of[rows], sorter=order)]  # (R,)
            seqs = self.multi[rows]  # (R, L), -1 padded
            # word starts that hold the first token of one of their class's rows
            first = np.zeros(len(self.begins_word), dtype=bool)
            first[seqs[:, 0]] = True
            cn, cm, ct = np.nonzero(first[x] & starts)
            V1 = len(self.begins_word)
            keys = row_n * V1 + seqs[:, 0]
            by_key = np.argsort(keys)
            lo = np.searchsorted(keys[by_key], cn * V1 + x[cn, cm, ct], side="left")
            cnt = np.searchsorted(keys[by_key], cn * V1 + x[cn, cm, ct], side="right") - lo
            # every (start, row) pair to compare: start j with each of its cnt[j] rows
            at = np.repeat(np.arange(len(cn)), cnt)
            r = by_key[np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt,
                                                                              cnt)]
            cn, cm, ct = cn[at], cm[at], ct[at]
            ok = np.ones(len(r), dtype=bool)
            for i in range(1, seqs.shape[1]):
                want = seqs[r, i]
                ok &= (want < 0) | ((ct + i < T) & (x[cn, cm, np.minimum(ct + i, T - 1)] == want))
            n, m, t = (np.concatenate(a) for a in ((n, cn[ok]), (m, cm[ok]), (t, ct[ok])))
        masked = np.zeros(x.shape, dtype=bool)
        masked[n, m, t] = True
        while len(t):  # on through the tokens that continue each word (rarely more than two)
            keep = t + 1 < T
            n, m, t = n[keep], m[keep], t[keep] + 1
            keep = ~starts[n, m, t]
            n, m, t = n[keep], m[keep], t[keep]
            masked[n, m, t] = True
        return masked


class OccurrenceGroups:
    """Where an episode's k_shot + q_query = n occurrences of a word come from. A word's
    occurrences are grouped by document (the index is sorted by word, then position); an episode
    takes n distinct groups of each class's word, then one occurrence of each group, uniformly,
    so that a document that repeats the word does not outweigh the others. A word in fewer than n
    documents is taken from single occurrences whose windows of seq_len tokens do not overlap
    (_apart), if it has n such; a word that allows neither is not usable."""

    def __init__(self, offsets, positions, docs, n, seq_len):
        self.positions, self.n = positions, n
        counts = np.diff(offsets)  # (W,)
        word_of = np.repeat(np.arange(len(counts)), counts)  # (P,)
        new_doc = np.ones(len(docs), dtype=bool)
        new_doc[1:] = (docs[1:] != docs[:-1]) | (word_of[1:] != word_of[:-1])
        few_docs = np.bincount(word_of[new_doc], minlength=len(counts)) < n  # (W,)
        # a word of few documents: each occurrence its own group
        self.starts = np.flatnonzero(new_doc | few_docs[word_of])  # (G,) into positions
        self.lens = np.diff(np.append(self.starts, len(docs)))  # (G,)
        self.offsets = np.searchsorted(self.starts, offsets)  # (W+1,) word i: groups offsets[i]..
        self.n_groups = np.diff(self.offsets)  # (W,)
        self.spread = {}  # word index -> _room of its positions, for usable words of few documents
        for c in np.flatnonzero(few_docs & (counts >= n)):
            nxt, room = _room(positions[offsets[c]:offsets[c + 1]], seq_len)
            if room[0] >= n:
                self.spread[c] = (nxt, room)
        spread = np.array(sorted(self.spread), dtype=np.int64)
        self.usable = np.union1d(np.flatnonzero(~few_docs), spread)  # (U,) indices into words

    def draw(self, words, rng):
        """n occurrences of each of the usable words (N,), drawn from rng -> (N, n) their global
        positions, in random order."""
        picks = np.empty((len(words), self.n), dtype=np.int64)  # n of each word's groups
        for j, c in enumerate(words):
            if c in self.spread:  # shuffled: _apart returns them in text order
                picks[j] = rng.permutation(_apart(*self.spread[c], self.n, rng))
            else:
                picks[j] = rng.choice(self.n_groups[c], self.n, replace=False)
        g = self.offsets[words, None] + picks  # (N, n) indices into the groups
        # one occurrence of each group, uniformly (u * len < len for u < 1)
        occ = self.starts[g] + (rng.random(g.shape) * self.lens[g]).astype(np.int64)
        return self.positions[occ]


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


class PositionsSampler:
    """The paper's own task construction (an ablation: meta_task "positions"), from one
    pretraining micro-batch of B sequences: K support positions and one query position, drawn once
    for all B sequences and never position 0 (it has no context). support_x is the batch with its
    K support positions masked, query_x the batch with only the query position masked; labels are
    the original tokens there, read out in (sequence, position) order. The classes are the batch's
    distinct support tokens, padded with random other vocabulary ids to n_way (a random n_way of
    them if more); the meta head's class logits are their columns.
    A label outside the class set is class 0 with unknown="class0", as the paper's code mapped it
    (a query is usually not among the support tokens, so this inflates the paper's query accuracy),
    or left out (label -1) with unknown="drop", the correct alternative; a batch whose queries
    would all be left out draws its positions again."""

    def __init__(self, data_dir, split, batch_size, seq_len, k_shot, n_way, unknown="class0"):
        self.reader = ShardReader(data_dir, split, batch_size, seq_len)
        self.k_shot, self.n_way, self.unknown = k_shot, n_way, unknown
        self.mask_id, self.vocab = self.reader.mask_id, self.reader.meta["vocab_size"]
        if n_way > self.vocab:  # an episode's classes are distinct token ids
            raise ValueError(f"n_way {n_way} > the {self.vocab} token ids of tokenizer "
                             f"{self.reader.meta['tokenizer']!r} ({data_dir}); lower n_way")
        if k_shot + 1 > seq_len - 1:
            raise ValueError(f"k_shot + 1 = {k_shot + 1} positions do not fit in positions "
                             f"1..{seq_len - 1} of a {seq_len}-token sequence")

    def sample(self, rng):
        """-> Episode, drawn from rng, a numpy Generator (as in ShardReader.next_batch)."""
        x = self.reader.next_batch(rng)[0].numpy()  # (B, T)
        return positions_episode(x, rng, self.k_shot, self.n_way, self.vocab, self.mask_id,
                                 self.unknown)


def positions_episode(x, rng, k_shot, n_way, vocab, mask_id, unknown):
    """PositionsSampler's episode of the batch x (B, T) of token ids."""
    K, N = k_shot, n_way
    while True:
        at = rng.choice(np.arange(1, x.shape[1]), K + 1, replace=False)  # K support, 1 query
        classes = np.unique(x[:, at[:K]])
        if len(classes) > N:
            classes = rng.choice(classes, N, replace=False)
        elif len(classes) < N:
            others = np.setdiff1d(np.arange(vocab), classes)
            classes = np.concatenate([classes, rng.choice(others, N - len(classes), replace=False)])
        lookup = np.full(vocab, 0 if unknown == "class0" else -1)
        lookup[classes] = np.arange(N)
        support_y, query_y = lookup[x[:, at[:K]]].reshape(-1), lookup[x[:, at[K]]]
        if unknown == "class0" or (query_y >= 0).any():
            break
    support_x, query_x = x.copy(), x.copy()
    support_x[:, at[:K]] = mask_id
    query_x[:, at[K]] = mask_id
    return Episode(support_x=_tensor(support_x), support_y=_tensor(support_y),
                   query_x=_tensor(query_x), query_y=_tensor(query_y),
                   word_ids=_tensor(classes.astype(np.int64)), support_at=_tensor(at[:K]),
                   query_at=_tensor(at[K:]))


class LMTaskSampler:
    """LM-task episodes: (K+1)*T + 1 consecutive tokens of one document give K support chunks and
    the query chunk right after them, each with next-token targets.

    Short documents: a document (counting its closing <|endoftext|>) shorter than (K+1)*T + 1
    tokens is never used, so no input token is ever <|endoftext|> and only the very last target can
    be the document's closing one. Spans are uniform over every start that fits in a long-enough
    document (long documents are drawn in proportion to their length). If no document is long
    enough, the constructor raises ValueError ending in `fix`, advice in the caller's own names
    for k_shot and seq_len.
    """

    def __init__(self, data_dir, k_shot, seq_len, split="train", fix="lower k_shot or seq_len"):
        self.meta = read_meta(data_dir)
        self.k_shot, self.seq_len = k_shot, seq_len
        self.span = (k_shot + 1) * seq_len + 1
        self.shards, self.shard_starts = load_split(data_dir, split, self.meta)
        begins, n_spans, longest = [], [], 0
        for shard, start in zip(self.shards, self.shard_starts):
            # a document ends after its <|endoftext|>
            ends = np.flatnonzero(shard == self.meta["eot_id"]) + 1
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
            raise ValueError(f"{data_dir}: no {split} document has the {self.span} tokens of "
                             f"{k_shot} + 1 chunks of {seq_len} and a target (the longest has "
                             f"{longest}); {fix}")
        self.cum_spans = np.cumsum(self.n_spans)

    def sample(self, rng):
        """-> Episode: support_x, support_y (K, T), query_x, query_y (1, T), drawn from rng, a
        numpy Generator (as in ShardReader.next_batch)."""
        K, T = self.k_shot, self.seq_len
        r = rng.integers(0, self.cum_spans[-1])
        d = np.searchsorted(self.cum_spans, r, side="right")
        start = self.doc_begins[d] + r - (self.cum_spans[d] - self.n_spans[d])
        # the (K+1)*T + 1 consecutive tokens of the episode
        span = _gather(self.shards, self.shard_starts, np.array([start]), self.span)[0]
        x, y = span[:-1].reshape(K + 1, T), span[1:].reshape(K + 1, T)
        return Episode(support_x=_tensor(x[:K]), support_y=_tensor(y[:K]),
                       query_x=_tensor(x[K:]), query_y=_tensor(y[K:]))


def audit(data_dir, enc, n_episodes=500, n_way=32, k_shot=4, q_query=4, seq_len=128):
    """What SMLMT episodes show of their labels -> dict: candidate words; prefix classes (train
    candidates followed by more of the same word in over half their occurrences; the index keeps
    only their whole-word occurrences); per window, the shares with a [MASK] followed by the rest
    of its word, with a single-token spelling of the class word at a word start, and whose text
    decoded with enc (masks as '#') shows the class word in any case as a whole word; episodes/s
    of sampling (CPU time). Targets: the three shares 0."""
    import re
    s = SMLMTSampler(data_dir, n_way, k_shot, q_query, seq_len)
    stream = np.concatenate(s.shards)
    is_word = np.zeros(len(s.begins_word), dtype=bool)
    is_word[s.words] = True
    p = np.flatnonzero(is_word[stream[:-1]])
    more = ~s.begins_word[stream[p + 1]]  # (P,) the occurrence goes on as the same word
    total = np.bincount(stream[p], minlength=len(is_word))[s.words]
    prefix = np.bincount(stream[p][more], minlength=len(is_word))[s.words] > total / 2  # (W,)
    rng = np.random.default_rng(0)
    t0 = time.process_time()
    episodes = [s.sample(rng) for _ in range(n_episodes)]
    seconds = time.process_time() - t0
    leaks, n = np.zeros(3), 0
    for ep in episodes:
        spelled = s.spelled[np.searchsorted(s.words, ep.word_ids.numpy())]  # (N,)
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            x, y = x.numpy(), y.numpy()
            masked = x == s.mask_id
            starts = s.begins_word[x]
            starts[:, 1:] |= ~s.ends_in_word[x[:, :-1]] | masked[:, :-1]
            leaks[0] += (masked[:, :-1] & ~masked[:, 1:] & ~s.begins_word[x[:, 1:]]).any(1).sum()
            leaks[1] += (starts & ~masked & (s.spelling[x] == spelled[y, None])).any(1).sum()
            for row, label in zip(x.tolist(), y.tolist()):
                word = enc.decode([int(ep.word_ids[label])]).strip()
                text = "".join("#" if t == s.mask_id else enc.decode([t]) for t in row)
                leaks[2] += bool(re.search(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", text,
                                           re.IGNORECASE))
            n += len(x)
    return {"candidates": len(s.words), "prefix_classes": int(prefix.sum()),
            "prefix_per_episode": float(np.mean([prefix[np.searchsorted(s.words,
                                                                        e.word_ids.numpy())].sum()
                                                 for e in episodes])),
            "windows": n, "mask_then_rest": leaks[0] / n, "spelling_shown": leaks[1] / n,
            "word_in_text": leaks[2] / n, "episodes_s": n_episodes / seconds}


def main(argv=None):
    """Check a data directory as training will read it (shards against meta.json, the index
    against the shards) and print what it holds: one line per split; with --audit N, what N
    SMLMT episodes of train show of their labels (audit())."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("data_dir")
    p.add_argument("--audit", type=int, default=0, metavar="N", help="episodes to audit")
    p.add_argument("--n_way", type=int, default=32)
    p.add_argument("--k_shot", type=int, default=4)
    p.add_argument("--q_query", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    args, unknown = p.parse_known_args(argv)
    if unknown:  # data.py once tokenized text itself: point the old command line to prepare.py
        raise SystemExit(f"data.py: error: unknown option {unknown[0]}: data.py only checks a "
                         f"data directory (python data.py DIR [--audit N]); to tokenize text run "
                         f"python prepare.py --text FILES --out DIR")
    data_dir = args.data_dir
    try:
        meta = read_meta(data_dir)
        for split in SPLITS:
            shards, starts = load_split(data_dir, split, meta)
            line = f"{split}: {sum(len(s) for s in shards):,} tokens in {len(shards)} shard(s)"
            if meta.get("index"):
                words, offsets, _, docs = _load_index(data_dir, meta, split, shards, starts)
                line += (f"; index: {len(words):,} words, {int(offsets[-1]):,} occurrences in "
                         f"{len(np.unique(docs)):,} documents")
            print(line)
        if args.audit:
            import common
            a = audit(data_dir, common.get_encoding(meta["tokenizer"]), args.audit, args.n_way,
                      args.k_shot, args.q_query, args.seq_len)
            print(f"SMLMT, {args.audit} episodes of {args.n_way}-way {args.k_shot}+"
                  f"{args.q_query} x {args.seq_len}: {a['candidates']:,} candidate words, "
                  f"{a['prefix_classes']:,} of them mostly prefixes ({a['prefix_per_episode']:.2f} "
                  f"an episode); of {a['windows']:,} windows {a['mask_then_rest']:.2%} show a "
                  f"[MASK] followed by the rest of its word, {a['spelling_shown']:.2%} a spelling "
                  f"of the word, {a['word_in_text']:.2%} the word in their text; "
                  f"{a['episodes_s']:,.0f} episodes/s (CPU time)")
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"data.py: error: {e}")


if __name__ == "__main__":
    main()
