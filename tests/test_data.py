import glob
import io
import os
import random
import shutil
import sys
import types

import numpy as np
import pytest
import tiktoken
import torch

import data
from conftest import TINY_WORDS

EOT = "<|endoftext|>"
CONTEXT = 16  # the index context of the shared test dataset; windows of up to 16 tokens


def make_docs(n, seed, min_words=3, max_words=40):
    """Documents of tiny-vocabulary words plus text the tiny encoding can only spell in bytes (capitals, digits,
    punctuation, non-ASCII), one to three lines each."""
    rng = random.Random(seed)
    vocab = TINY_WORDS + ["Zebra,", "42", "café", "x.y", "(tree)"]
    return ["\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(min_words, max_words)))
                      for _ in range(rng.randint(1, 3))) for _ in range(n)]


def write_text(path, docs, sep="\n\n"):
    with open(path, "w", encoding="utf-8") as f:
        f.write(sep.join(docs) + "\n")
    return str(path)


def split_stream(data_dir, split):
    return np.concatenate([data.load_shard(p) for p in data.list_shards(data_dir, split)]).astype(np.int64)


def contains(haystack, needle):
    """Whether the 1-d array needle occurs contiguously in haystack."""
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == needle).all(axis=1).any())


def check_shard_sizes(data_dir, enc, shard_tokens):
    """Each train shard but the last ends with the document that brings it to shard_tokens."""
    for path in data.list_shards(data_dir, "train")[:-1]:
        tokens = data.load_shard(path)
        last_doc = enc.decode(tokens.tolist()).split(EOT)[-2]
        assert len(tokens) >= shard_tokens > len(tokens) - len(enc.encode_ordinary(last_doc)) - 1


def dir_snapshot(d):
    return {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(d, "*")))}


@pytest.fixture(scope="module")
def docs():
    return make_docs(300, seed=0)


@pytest.fixture(scope="module")
def ds(tmp_path_factory, tiny_enc, docs):
    """A data directory: two input files, 2000 val tokens carved off, several train shards, an index."""
    d = tmp_path_factory.mktemp("ds")
    paths = [write_text(d / "a.txt", docs[:150]), write_text(d / "b.txt", docs[150:], sep="\n\n\n  \n")]
    out = str(d / "out")
    data.write_shards(data.iter_text_docs(data.text_files([str(d / "*.txt")])), tiny_enc, out, val_tokens=2000,
                      shard_tokens=5000, num_proc=1, progress=False)
    data.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6, max_occurrences=300,
                     context=CONTEXT)
    assert sorted(paths) == data.text_files([str(d / "*.txt")])
    return out


def test_shards_decode_to_documents(ds, tiny_enc, docs):
    tokens = np.concatenate([split_stream(ds, "val"), split_stream(ds, "train")])
    assert tiny_enc.decode(tokens.tolist()) == "".join(doc + EOT for doc in docs)
    meta = data.read_meta(ds)
    assert len(meta["shards"]["train"]) > 1
    assert meta["train_tokens"] == sum(meta["shards"]["train"].values()) == len(split_stream(ds, "train"))
    assert meta["train_docs"] + meta["val_docs"] == len(docs)
    assert (meta["tokenizer"], meta["vocab_size"]) == ("tiny", tiny_enc.n_vocab)
    assert (meta["eot_id"], meta["mask_id"]) == (tiny_enc.eot_token, tiny_enc.n_vocab)
    for split in ("train", "val"):
        for path in data.list_shards(ds, split):
            header = np.fromfile(path, dtype=np.int32, count=data.HEADER_INTS)
            assert list(header[:3]) == [data.MAGIC, data.VERSION, meta["shards"][split][os.path.basename(path)]]
            assert not header[3:].any()
            assert os.path.getsize(path) == 4 * data.HEADER_INTS + 2 * header[2]
            assert data.load_shard(path)[-1] == tiny_enc.eot_token  # shards hold whole documents
    check_shard_sizes(ds, tiny_enc, 5000)


def test_val_split_is_whole_leading_documents(ds, tiny_enc, docs):
    val = split_stream(ds, "val")
    val_docs = tiny_enc.decode(val.tolist()).split(EOT)[:-1]
    m = len(val_docs)
    assert val_docs == docs[:m]
    assert len(val) >= 2000  # the document that reaches val_tokens stays whole in val ...
    assert len(val) - len(tiny_enc.encode_ordinary(docs[m - 1])) - 1 < 2000  # ... and is the last one there
    assert tiny_enc.decode(split_stream(ds, "train").tolist()).startswith(docs[m] + EOT)


def test_parallel_output_identical_and_val_docs_and_max_tokens(tmp_path, tiny_enc, docs):
    a, b = write_text(tmp_path / "train.txt", docs[:100]), write_text(tmp_path / "valid.txt", docs[100:120])
    kw = dict(val_tokens=0, shard_tokens=3000, batch_chars=400, progress=False)
    m1 = data.write_shards(data.iter_text_docs([a]), tiny_enc, tmp_path / "p1", num_proc=1,
                           val_docs=data.iter_text_docs([b]), **kw)
    m2 = data.write_shards(data.iter_text_docs([a]), tiny_enc, tmp_path / "p2", num_proc=2,
                           val_docs=data.iter_text_docs([b]), **kw)
    assert m1["shards"] == m2["shards"] and len(m1["shards"]["train"]) > 1
    check_shard_sizes(tmp_path / "p1", tiny_enc, 3000)
    for name in list(m1["shards"]["train"]) + list(m1["shards"]["val"]):
        assert open(tmp_path / "p1" / name, "rb").read() == open(tmp_path / "p2" / name, "rb").read()
    assert tiny_enc.decode(split_stream(tmp_path / "p1", "val").tolist()) == "".join(d + EOT for d in docs[100:120])
    assert tiny_enc.decode(split_stream(tmp_path / "p1", "train").tolist()) == "".join(d + EOT for d in docs[:100])
    # max_tokens stops at the end of the document that reaches it
    m3 = data.write_shards(data.iter_text_docs([a]), tiny_enc, tmp_path / "p3", max_tokens=1000, **kw)
    n = [len(tiny_enc.encode_ordinary(d)) + 1 for d in docs[:100]]
    k = int(np.searchsorted(np.cumsum(n), 1000))
    assert m3["train_tokens"] == sum(n[:k + 1]) and m3["train_docs"] == k + 1
    with pytest.raises(ValueError, match="not both"):
        data.write_shards(data.iter_text_docs([a]), tiny_enc, tmp_path / "p4", val_tokens=10,
                          val_docs=data.iter_text_docs([b]), progress=False)


def test_text_reader_formats(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("\n\nfirst doc\n  second line \n\n\n \t\nsecond doc\n\nthird", encoding="utf-8")
    assert list(data.iter_text_docs([str(p)])) == ["first doc\n  second line ", "second doc", "third"]
    assert list(data.iter_text_docs([str(p)], one_doc_per_file=True)) == [p.read_text().strip()]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\n\xff\xfe broken")
    with pytest.raises(ValueError, match="bad.txt"):
        list(data.iter_text_docs([str(tmp_path / "bad.txt")]))


def test_missing_and_empty_input(tmp_path, tiny_enc):
    with pytest.raises(FileNotFoundError, match="nomatch"):
        data.text_files([str(tmp_path / "nomatch*.txt")])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="blank.txt"):
        data.write_shards(data.iter_text_docs(data.text_files([str(tmp_path / "*.txt")])), tiny_enc, out,
                          progress=False)
    assert not glob.glob(str(out / "*")) and not glob.glob(str(out / ".*"))  # nothing written, no temp left
    with pytest.raises(SystemExit, match="nomatch"):
        data.main(["--text", str(tmp_path / "nomatch*"), "--out", str(out)])


def test_everything_to_val_refused(tmp_path, tiny_enc, docs):
    a = write_text(tmp_path / "a.txt", docs[:5])
    with pytest.raises(ValueError, match="nothing left for train"):
        data.write_shards(data.iter_text_docs([a]), tiny_enc, tmp_path / "out", val_tokens=10 ** 6, progress=False)
    assert not os.path.exists(tmp_path / "out")  # not even an empty --out is left behind


def test_shard_header_checks(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    data.write_shard(path, np.arange(1000))
    assert np.array_equal(data.load_shard(path), np.arange(1000))
    good = open(path, "rb").read()

    def corrupt(raw):
        with open(path, "wb") as f:
            f.write(raw)
    corrupt(good[:-2])
    with pytest.raises(ValueError, match="train_000000.bin.*truncated"):
        data.load_shard(path)
    corrupt(good[:100])
    with pytest.raises(ValueError, match="train_000000.bin.*header"):
        data.load_shard(path)
    corrupt(b"\x00\x00\x00\x00" + good[4:])
    with pytest.raises(ValueError, match="train_000000.bin.*magic"):
        data.load_shard(path)
    corrupt(good[:4] + np.int32(data.VERSION + 1).tobytes() + good[8:])
    with pytest.raises(ValueError, match="train_000000.bin.*version"):
        data.load_shard(path)
    with pytest.raises(FileNotFoundError, match="val_000000.bin"):
        data.load_shard(str(tmp_path / "val_000000.bin"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.list_shards(str(tmp_path), "val")


def test_token_ids_must_fit_uint16(tmp_path, tiny_enc):
    path = str(tmp_path / "train_000000.bin")
    data.write_shard(path, [1, 2, 3])
    before = open(path, "rb").read()
    for bad in ([1, 65536], [1, -1]):
        with pytest.raises(ValueError, match="train_000000.bin.*uint16"):
            data.write_shard(path, bad)
    with pytest.raises(ValueError, match="train_000000.bin.*integers"):
        data.write_shard(path, [1.5])
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["train_000000.bin"]
    data.write_shard(path, [65535])
    assert data.load_shard(path)[0] == 65535
    # a tokenizer whose ids do not fit is refused before anything is written
    big = tiktoken.Encoding(name="big", pat_str=tiny_enc._pat_str, mergeable_ranks=tiny_enc._mergeable_ranks,
                            special_tokens={EOT: 70000})
    with pytest.raises(ValueError, match="uint16"):
        data.write_shards(["a doc"], big, tmp_path / "out", val_tokens=0, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_out_dir_of_other_tokenizer_refused(tmp_path, ds, tiny_enc, docs):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    before = dir_snapshot(out)
    other = tiktoken.Encoding(name="other", pat_str=tiny_enc._pat_str, mergeable_ranks=tiny_enc._mergeable_ranks,
                              special_tokens=tiny_enc._special_tokens)
    with pytest.raises(ValueError, match="meta.json.*'tiny'.*'other'"):
        data.write_shards(docs, other, out, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="--overwrite"):  # same tokenizer: refused unless overwrite
        data.write_shards(docs, tiny_enc, out, progress=False)
    assert dir_snapshot(out) == before and not glob.glob(os.path.join(out, ".*"))
    # overwrite: the new shards replace the old, surplus old shards go, and the index must be rebuilt
    data.write_shards(docs[:20], tiny_enc, out, val_tokens=0, overwrite=True, progress=False)
    assert [os.path.basename(p) for p in glob.glob(os.path.join(out, "*.bin"))] == ["train_000000.bin"]
    assert tiny_enc.decode(split_stream(out, "train").tolist()) == "".join(d + EOT for d in docs[:20])
    with pytest.raises(FileNotFoundError, match="no SMLMT index"):
        data.SMLMTSampler(out, 2, 1, 1, 8)
    # shards without a meta.json: tokenizer unknown, refused even with overwrite
    os.remove(os.path.join(out, "meta.json"))
    with pytest.raises(ValueError, match="no meta.json"):
        data.write_shards(docs, tiny_enc, out, overwrite=True, progress=False)


def test_index_that_does_not_match_shards_rejected(tmp_path, ds):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    data.SMLMTSampler(out, 4, 2, 2, CONTEXT)  # loads
    positions = np.load(os.path.join(out, "index_train_positions.npy"))
    np.save(os.path.join(out, "index_train_positions.npy"), positions + 1)  # same sizes, wrong places
    with pytest.raises(ValueError, match="index_train_positions.npy"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    np.save(os.path.join(out, "index_train_positions.npy"), positions[:-5])
    with pytest.raises(ValueError, match="index_train_positions.npy"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    np.save(os.path.join(out, "index_train_positions.npy"), positions)
    # a shard rewritten with other tokens of the same length: meta.json agrees, the index does not
    shard = data.list_shards(out, "train")[0]
    data.write_shard(shard, np.roll(np.asarray(data.load_shard(shard)), 1))
    with pytest.raises(ValueError, match="index_train_positions.npy"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    # a shard of another length: caught against meta.json, naming the shard
    data.write_shard(shard, np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="train_000000.bin"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)


def test_smlmt_episode(ds):
    N, K, Q, T = 5, 3, 2, CONTEXT
    sampler = data.SMLMTSampler(ds, N, K, Q, T)
    stream = split_stream(ds, "train")
    assert sampler.mask_id == data.read_meta(ds)["mask_id"] and sampler.n_words >= N
    for _ in range(20):
        ep = sampler.sample()
        assert ep.support_x.shape == (N * K, T) and ep.query_x.shape == (N * Q, T)
        assert ep.support_y.shape == ep.support_pos.shape == (N * K,)
        assert ep.query_y.shape == ep.query_pos.shape == (N * Q,) and ep.word_ids.shape == (N,)
        assert all(t.dtype == torch.int64 for t in vars(ep).values())
        assert len(set(ep.word_ids.tolist())) == N
        assert torch.equal(torch.bincount(ep.support_y, minlength=N), torch.full((N,), K))
        assert torch.equal(torch.bincount(ep.query_y, minlength=N), torch.full((N,), Q))
        for c in range(N):  # support and query occurrences of a class are distinct
            s, q = ep.support_pos[ep.support_y == c].tolist(), ep.query_pos[ep.query_y == c].tolist()
            assert len(set(s) | set(q)) == K + Q
        for x, y, pos in ((ep.support_x, ep.support_y, ep.support_pos), (ep.query_x, ep.query_y, ep.query_pos)):
            assert (x[:, -1] == sampler.mask_id).all()
            for row, label, p in zip(x.numpy(), y.tolist(), pos.tolist()):
                word = ep.word_ids[label].item()
                original = stream[p - T + 1:p + 1]
                assert original[-1] == word  # the window ends at an occurrence of the labelled word
                assert word not in row  # ... no unmasked copy of it is left
                assert np.array_equal(row, np.where(original == word, sampler.mask_id, original))


def test_smlmt_val_split_and_errors(ds):
    ep = data.SMLMTSampler(ds, 3, 2, 2, 8, split="val").sample()
    stream = split_stream(ds, "val")
    assert all(stream[p] == ep.word_ids[y] for p, y in zip(ep.query_pos.tolist(), ep.query_y.tolist()))
    n_words = data.SMLMTSampler(ds, 2, 2, 2, 8).n_words
    with pytest.raises(ValueError, match="index_train_positions.npy.*n_way"):
        data.SMLMTSampler(ds, n_words + 1, 2, 2, 8)
    with pytest.raises(ValueError, match="index_train_positions.npy.*context"):
        data.SMLMTSampler(ds, 2, 2, 2, CONTEXT + 1)


def test_smlmt_classes_from_distinct_documents_or_apart(tmp_path, tiny_enc):
    T, n = 8, 4  # window, k_shot + q_query
    spaced_dog = " dog" + " of" * (T - 1)  # the next ' dog' is T tokens after this one
    text = ([" of to is" * 10]  # enough tokens before any occurrence
            + [" of to cat is of tree to"] * 6 + [" cat" * 30]  # cat: 7 documents, 30 times in one
            + [spaced_dog * 3 + " dog" * 6, spaced_dog * 2]  # dog: 2 documents, 6 windows apart
            + [" bird" * 6])  # bird: 6 occurrences, but no 2 windows apart
    out = str(tmp_path / "out")
    data.write_shards(text, tiny_enc, out, val_tokens=0, progress=False)
    data.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6, context=16)
    stream = split_stream(out, "train")
    doc_of = np.cumsum(stream == tiny_enc.eot_token) - (stream == tiny_enc.eot_token)  # (n_tokens,)
    sampler = data.SMLMTSampler(out, 3, 2, 2, T)
    cat, tree, dog = (tiny_enc.encode_single_token(" " + w) for w in ("cat", "tree", "dog"))
    assert sorted(sampler.words[sampler.usable].tolist()) == sorted([cat, tree, dog])
    dog_sets, dog_mixed = set(), False
    for _ in range(50):
        ep = sampler.sample()
        for c, word in enumerate(ep.word_ids.tolist()):
            s, q = ep.support_pos[ep.support_y == c].numpy(), ep.query_pos[ep.query_y == c].numpy()
            p = np.concatenate([s, q])
            assert (stream[p] == word).all()
            if word == dog:  # in 2 documents only: windows that do not overlap
                assert (np.diff(np.sort(p)) >= T).all()
                dog_sets.add(frozenset(p.tolist()))
                dog_mixed |= q.min() < s.max()
            else:
                assert len(set(doc_of[p])) == n
    assert len(dog_sets) > 1 and dog_mixed  # at random, support not always before query
    with pytest.raises(ValueError, match="index_train_positions.npy.*n_way 4 > 3"):
        data.SMLMTSampler(out, 4, 2, 2, T)  # bird is not usable


def test_index_without_documents_refused(tmp_path, ds):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    meta = data.read_meta(out)
    for split in ("train", "val"):  # as the index of the old data.py
        os.remove(os.path.join(out, meta["index"][split].pop("docs")))
    data.write_json(os.path.join(out, "meta.json"), meta)
    with pytest.raises(ValueError, match=r"meta.json.*document.*python data.py --reindex --out"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)


def make_reader(kind, ds, seed=0, rank=0, split="train"):
    if kind == "shard":
        return data.ShardReader(ds, split, 4, 8, seed=seed, rank=rank)
    if kind == "smlmt":
        return data.SMLMTSampler(ds, 4, 2, 2, 8, seed=seed, rank=rank, split=split)
    return data.LMTaskSampler(ds, 2, 8, seed=seed, rank=rank, split=split)


def draw(reader, rng=None):
    out = reader.next_batch(rng) if isinstance(reader, data.ShardReader) else reader.sample(rng)
    return list(vars(out).values()) if isinstance(out, data.Episode) else list(out)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["shard", "smlmt", "lm"])
def test_seeding_and_exact_resume(ds, kind):
    a, b = make_reader(kind, ds), make_reader(kind, ds)
    assert same(draw(a), draw(b))  # same (seed, rank): same data
    assert not same(draw(make_reader(kind, ds, rank=1)), draw(make_reader(kind, ds)))
    assert not same(draw(make_reader(kind, ds, seed=1)), draw(make_reader(kind, ds)))
    assert not same(draw(make_reader(kind, ds, split="val")), draw(make_reader(kind, ds)))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # the state goes into checkpoints
    expected = [draw(a) for _ in range(3)]
    c = make_reader(kind, ds, seed=123, rank=7)
    c.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert all(same(e, draw(c)) for e in expected)
    # an explicit rng gives the draws of a reader in that state, and leaves the reader's own state alone
    rng = np.random.default_rng(99)
    d = make_reader(kind, ds)
    d.rng = np.random.default_rng(99)
    state = c.state_dict()
    assert same(draw(c, rng), draw(d)) and c.state_dict() == state


def test_shard_reader_windows(ds):
    reader = data.ShardReader(ds, "train", batch_size=64, seq_len=12)
    shards = [np.asarray(data.load_shard(p)).astype(np.int64) for p in data.list_shards(ds, "train")]
    hits = set()
    for _ in range(5):
        x, y = reader.next_batch()
        assert x.shape == y.shape == (64, 12) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for xr, yr in zip(x.numpy(), y.numpy()):
            window = np.concatenate([xr, yr[-1:]])
            found = [i for i, shard in enumerate(shards) if contains(shard, window)]
            assert found  # a real window of one shard
            hits.update(found)
    assert len(hits) > 1  # windows come from every shard, not only the first


def test_lm_task_episode(ds, tiny_enc):
    K, T = 3, 8
    sampler = data.LMTaskSampler(ds, K, T)
    stream = split_stream(ds, "train")
    for _ in range(50):
        sx, sy, qx, qy = sampler.sample()
        assert sx.shape == sy.shape == (K, T) and qx.shape == qy.shape == (1, T)
        x = torch.cat([sx.flatten(), qx.flatten()])  # ((K+1)*T,) the query chunk right after the support chunks
        y = torch.cat([sy.flatten(), qy.flatten()])
        assert torch.equal(y[:-1], x[1:])
        assert contains(stream, np.append(x.numpy(), y[-1].item()))
        # no <|endoftext|> inside: one document (only the last target may be the document's closing one)
        assert tiny_enc.eot_token not in x.tolist()


def test_lm_task_short_documents(tmp_path, tiny_enc):
    # K=2, T=4 needs 3*4 + 1 = 13 tokens; "a cat ... cat" (1 + 11 tokens, then <|endoftext|>) has exactly 13
    exact = "a" + " cat" * 11
    path = write_text(tmp_path / "a.txt", [" dog" * 5, exact, " bird" * 11, " fish" * 3])
    out = str(tmp_path / "out")
    data.write_shards(data.iter_text_docs([path]), tiny_enc, out, val_tokens=0, progress=False)
    sampler = data.LMTaskSampler(out, 2, 4)
    assert sampler.n_docs == 1  # shorter documents are skipped, never spliced across <|endoftext|>
    tokens = tiny_enc.encode_ordinary(exact) + [tiny_enc.eot_token]
    for _ in range(3):
        sx, sy, qx, qy = sampler.sample()
        assert torch.cat([sx.flatten(), qx.flatten()]).tolist() == tokens[:-1]
        assert torch.cat([sy.flatten(), qy.flatten()]).tolist() == tokens[1:]  # the last target closes the doc
    with pytest.raises(ValueError, match="no train document.*13"):
        data.LMTaskSampler(out, 3, 4)


def test_index_sampling(tmp_path, ds, tiny_enc):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    shards = [np.asarray(data.load_shard(p)).astype(np.int64) for p in data.list_shards(out, "train")]
    starts = np.cumsum([0] + [len(s) for s in shards[:-1]])
    stream = np.concatenate(shards)
    # every occurrence with CONTEXT - 1 tokens before it in its shard is eligible
    eligible = np.concatenate([st + np.arange(CONTEXT - 1, len(s)) for s, st in zip(shards, starts)])

    def index(seed):
        data.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6,
                         max_occurrences=10, context=CONTEXT, seed=seed)
        return [np.load(os.path.join(out, f"index_{a}.npy"))
                for a in ("words", "train_offsets", "train_positions", "train_docs")]

    words, offsets, positions, docs = index(0)
    assert np.array_equal(positions, index(0)[2])  # deterministic
    assert not np.array_equal(positions, index(1)[2])
    # an occurrence's document number counts the <|endoftext|>s before it in the split
    eots = np.flatnonzero(stream == tiny_enc.eot_token)
    assert np.array_equal(docs, np.searchsorted(eots, positions))
    assert len(data.list_shards(out, "train")) > 1 and docs.max() > 100  # numbered across shards
    for i, w in enumerate(words):
        p = positions[offsets[i]:offsets[i + 1]]
        all_p = eligible[stream[eligible] == w]
        assert len(p) == min(10, len(all_p)) and np.all(np.diff(p) > 0) and np.isin(p, all_p).all()
        if len(all_p) > 100:
            assert not np.array_equal(p, all_p[:10])  # a random sample, not the first ones


def test_band_is_a_frequency_not_a_count(tmp_path, tiny_enc, docs):
    # train is exactly the text, or exactly the text 3 times (val given apart): the same candidates
    outs = [str(tmp_path / "x1"), str(tmp_path / "x3")]
    for out, times in zip(outs, (1, 3)):
        data.write_shards(docs[:100] * times, tiny_enc, out, val_tokens=0, val_docs=docs[250:],
                          progress=False)
    stream = split_stream(outs[0], "train")
    per_million = np.bincount(stream, minlength=tiny_enc.n_vocab) / len(stream) * 1e6
    ids = [tiny_enc.encode_single_token(" " + w) for w in TINY_WORDS if len(w) >= 3]
    rates = sorted(per_million[ids])
    lo, hi = (rates[1] + rates[2]) / 2, (rates[-3] + rates[-2]) / 2  # a band cutting both ends
    expected = sorted(i for i in ids if lo <= per_million[i] <= hi)
    assert 0 < len(expected) < len(ids) - 3
    for out in outs:
        index = data.build_index(out, tiny_enc, min_per_million=lo, max_per_million=hi, context=8)
        assert np.load(os.path.join(out, "index_words.npy")).tolist() == expected
        assert (index["min_per_million"], index["max_per_million"]) == (lo, hi)
        assert index["train_tokens"] == data.read_meta(out)["train_tokens"]
    assert data.read_meta(outs[1])["train_tokens"] == 3 * len(stream)
    for bad in ((-1, 10), (5, 1), (float("nan"), 10)):
        with pytest.raises(ValueError, match="0 <= --min_per_million <= --max_per_million"):
            data.build_index(outs[0], tiny_enc, *bad)


def test_cli_end_to_end(tmp_path, tiny_enc, docs, monkeypatch, capsys):
    monkeypatch.setattr(data, "get_encoding", lambda name="gpt2": tiny_enc)
    train, valid = write_text(tmp_path / "t.txt", docs[:200]), write_text(tmp_path / "v.txt", docs[200:])
    out = str(tmp_path / "out")
    args = ["--text", train, "--val_text", valid, "--out", out, "--num_proc", "1",
            "--min_per_million", "1000", "--max_per_million", "1e6", "--context", "16"]
    data.main(args)
    printed = capsys.readouterr().out
    meta = data.read_meta(out)
    assert meta["val_docs"] == 100 and meta["train_docs"] == 200 and "--val_text" in meta["command"]
    assert f"{meta['index']['n_words']:,} candidate words" in printed and "tokens/s" in printed
    word_ids = np.load(os.path.join(out, "index_words.npy"))
    words = [tiny_enc.decode([int(w)]) for w in word_ids]
    assert " cat" in words and " of" not in words and " is" not in words  # at least 3 letters
    # the printed sample: decoded candidates from the most to the least frequent
    counts = np.bincount(split_stream(out, "train"), minlength=tiny_enc.n_vocab)
    examples = meta["index"]["examples"]
    assert ", ".join(map(repr, examples)) in printed and set(examples) <= set(words)
    assert examples[0] == tiny_enc.decode([int(word_ids[np.argmax(counts[word_ids])])])
    assert examples[-1] == tiny_enc.decode([int(word_ids[np.argmin(counts[word_ids])])])
    assert data.SMLMTSampler(out, 4, 2, 2, 16, split="val").sample().query_x.shape == (8, 16)
    with pytest.raises(SystemExit, match="--overwrite"):
        data.main(args)
    # --reindex with a band that keeps only some of the tiny words: exactly those, never ' of' (2 letters)
    per_million = counts / meta["train_tokens"] * 1e6
    tiny_ids = {w: tiny_enc.encode_single_token(" " + w) for w in TINY_WORDS}
    lo, hi = sorted(float(per_million[i]) for i in tiny_ids.values())[5:7]
    data.main(["--reindex", "--out", out, "--min_per_million", repr(lo), "--max_per_million",
               repr(hi), "--context", "8"])
    index = data.read_meta(out)["index"]
    assert index["context"] == 8 and index["max_per_million"] == hi
    expected = sorted(i for w, i in tiny_ids.items() if len(w) >= 3 and lo <= per_million[i] <= hi)
    assert 0 < len(expected) < 10 and np.load(os.path.join(out, "index_words.npy")).tolist() == expected
    with pytest.raises(SystemExit) as e:
        data.main(args + ["--val_tokens", "100"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        data.main(["--help"])
    assert e.value.code == 0


def test_failed_build_leaves_out_as_it_was(tmp_path, tiny_enc, docs, monkeypatch):
    monkeypatch.setattr(data, "get_encoding", lambda name="gpt2": tiny_enc)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\0" * 1000)  # one document, and not a single word
    out = tmp_path / "out"
    cmd = ["--out", str(out), "--val_tokens", "0", "--num_proc", "1", "--overwrite"]
    with pytest.raises(SystemExit, match=f"--text {nul}: .*no word at all"):
        data.main(["--text", str(nul)] + cmd)
    assert not out.exists()
    good = write_text(tmp_path / "good.txt", docs[:50])
    data.main(["--text", good, "--min_per_million", "0", "--max_per_million", "1e6"] + cmd)
    before = dir_snapshot(out)
    with pytest.raises(SystemExit, match=f"--text {nul}: .*no word at all"):
        data.main(["--text", str(nul)] + cmd)
    assert dir_snapshot(out) == before and not glob.glob(str(out / ".*"))
    # a band none of the words falls in: named, with what to change
    with pytest.raises(SystemExit, match=f"--text {good}: no candidate word occurs 500000 to "
                                         f"1e\\+06 .*widen --min_per_million/--max_per_million"):
        data.main(["--text", good, "--min_per_million", "5e5", "--max_per_million", "1e6"] + cmd)
    with pytest.raises(SystemExit, match="0 <= --min_per_million"):
        data.main(["--text", good, "--min_per_million", "-1"] + cmd)
    assert dir_snapshot(out) == before and not glob.glob(str(out / ".*"))


def test_failed_reindex_leaves_old_index(tmp_path, ds, tiny_enc, monkeypatch):
    monkeypatch.setattr(data, "get_encoding", lambda name="gpt2": tiny_enc)
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    before = dir_snapshot(out)
    with pytest.raises(SystemExit, match=f"{out} \\(train shards\\): no candidate word.*widen"):
        data.main(["--reindex", "--out", out, "--min_per_million", "5e5",
                   "--max_per_million", "1e6"])
    assert dir_snapshot(out) == before
    # a failure once the train index is written (a val shard that no longer matches meta.json)
    data.write_shard(data.list_shards(out, "val")[0], np.zeros(10, dtype=np.int64))
    before = dir_snapshot(out)
    with pytest.raises(SystemExit, match="val_000000.bin"):
        data.main(["--reindex", "--out", out, "--seed", "1", "--min_per_million", "0",
                   "--max_per_million", "1e6", "--context", str(CONTEXT)])
    assert dir_snapshot(out) == before and not glob.glob(os.path.join(out, ".*"))
    data.SMLMTSampler(out, 4, 2, 2, CONTEXT)  # the old train index still loads


def test_dataset_reader(tmp_path, tiny_enc, docs, monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):  # stands in for datasets.load_dataset: no network in tests
        calls.append((name, config, split, streaming))
        return iter([{"text": d, "id": i} for i, d in enumerate(docs[:30])] + [{"text": " \n", "id": 30}])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(data, "get_encoding", lambda name="gpt2": tiny_enc)
    out = str(tmp_path / "out")
    data.main(["--dataset", "org/set", "--name", "cfg", "--out", out, "--val_tokens", "100", "--num_proc", "1",
               "--min_per_million", "0", "--max_per_million", "1e6", "--context", "8"])
    assert calls == [("org/set", "cfg", "train", True)]
    tokens = np.concatenate([split_stream(out, "val"), split_stream(out, "train")])
    assert tiny_enc.decode(tokens.tolist()) == "".join(d + EOT for d in docs[:30])  # the blank row is skipped
    with pytest.raises(ValueError, match="no column 'body'"):
        list(data.iter_hf_docs("org/set", text_column="body"))
