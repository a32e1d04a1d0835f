"""data.py: the shard header checks, the index checks, and what the readers and samplers draw."""
import os
import shutil

import re

import numpy as np
import pytest
import tiktoken
import torch

import common
import data
import prepare
from conftest import (CONTEXT, GPT2_PAT, TINY_WORDS, boundary_shards, split_stream, write_data_dir,
                      write_text)


def contains(haystack, needle):
    """Whether the 1-d array needle occurs contiguously in haystack."""
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == needle).all(axis=1).any())


def test_shard_header_checks(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    prepare.write_shard(path, np.arange(1000))
    assert np.array_equal(data.load_shard(path), np.arange(1000))
    good = open(path, "rb").read()

    def corrupt(raw):
        with open(path, "wb") as f:
            f.write(raw)
    for raw in (good[:-2], good + b"\0\0"):  # two bytes short, two bytes too many
        corrupt(raw)
        with pytest.raises(ValueError, match="train_000000.bin.*truncated or corrupted"):
            data.load_shard(path)
    for n in (100, 1023):  # the header is 256 int32s: anything shorter has lost part of it
        corrupt(good[:n])
        with pytest.raises(ValueError, match=f"train_000000.bin: {n} bytes, shorter than the "
                                             f"1024-byte header"):
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


def test_index_that_does_not_match_shards_rejected(tmp_path, ds):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    data.SMLMTSampler(out, 4, 2, 2, CONTEXT)  # loads
    positions = np.load(os.path.join(out, "index_train_positions.npy"))
    # same sizes, wrong places
    np.save(os.path.join(out, "index_train_positions.npy"), positions + 1)
    with pytest.raises(ValueError, match="index_train_positions.npy"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    np.save(os.path.join(out, "index_train_positions.npy"), positions[:-5])
    with pytest.raises(ValueError, match="index_train_positions.npy"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    np.save(os.path.join(out, "index_train_positions.npy"), positions)
    # a shard rewritten with other tokens of the same length: its checksum in meta.json does not
    # agree; nor does the index, where meta.json has no checksums (an older prepare.py's)
    shard = data.list_shards(out, "train")[0]
    prepare.write_shard(shard, np.roll(np.asarray(data.load_shard(shard)), 1))
    with pytest.raises(ValueError, match="train_000000.bin: CRC-32"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    meta = data.read_meta(out)
    del meta["shard_crc32"]
    common.write_json(os.path.join(out, "meta.json"), meta)
    with pytest.raises(ValueError, match="index_train_positions.npy"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)
    # a shard of another length: caught against meta.json, naming the shard
    prepare.write_shard(shard, np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="train_000000.bin"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)


def corrupt_index(out, case):
    """Change one array of the train index (or its record in meta.json) so that exactly one of the
    loader's agreement checks can catch it."""
    meta = data.read_meta(out)
    path = lambda key: os.path.join(out, meta["index"]["train"][key])
    if case == "n_words":
        meta["index"]["n_words"] += 1
    elif case == "n_positions":
        meta["index"]["train"]["n_positions"] += 1
    elif case == "shards":
        meta["index"]["train"]["shards"] = {"train_000000.bin": 1}
    elif case == "no val":
        del meta["index"]["val"]
    elif case == "offsets":
        offsets = np.load(path("offsets"))
        np.save(path("offsets"), np.append(offsets, offsets[-1]))
    elif case == "docs":
        np.save(path("docs"), np.load(path("docs"))[:-1])
    elif case == "beyond":  # the last occurrence moved past the split's end
        positions = np.load(path("positions"))
        positions[-1] = meta["train_tokens"]
        np.save(path("positions"), positions)
    common.write_json(os.path.join(out, "meta.json"), meta)


@pytest.mark.parametrize("case, split, error, words", [
    ("n_words", "train", ValueError, "index_train_positions.npy: index arrays do not agree"),
    ("n_positions", "train", ValueError, "index_train_positions.npy: index arrays do not agree"),
    ("offsets", "train", ValueError, "index_train_positions.npy: index arrays do not agree"),
    ("docs", "train", ValueError, "index_train_positions.npy: index arrays do not agree"),
    ("beyond", "train", ValueError, "index_train_positions.npy: index arrays do not agree"),
    ("shards", "train", ValueError, "index_train_positions.npy: built for train shards"),
    ("no val", "val", ValueError, "meta.json: the SMLMT index has no val split"),
])
def test_index_arrays_that_disagree_are_refused(tmp_path, ds, case, split, error, words):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    corrupt_index(out, case)
    with pytest.raises(error) as e:
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT, split=split)
    assert words in str(e.value)
    assert case == "no val" or "python prepare.py --reindex" in str(e.value)  # what to do


def test_smlmt_episode(ds):
    N, K, Q, T = 5, 3, 2, CONTEXT
    sampler = data.SMLMTSampler(ds, N, K, Q, T)
    stream = split_stream(ds, "train")
    assert sampler.mask_id == data.read_meta(ds)["mask_id"] and sampler.n_words >= N
    rng = np.random.default_rng(0)
    for _ in range(20):
        ep = sampler.sample(rng)
        assert ep.support_x.shape == (N * K, T) and ep.query_x.shape == (N * Q, T)
        assert ep.support_y.shape == ep.support_pos.shape == (N * K,)
        assert ep.query_y.shape == ep.query_pos.shape == (N * Q,) and ep.word_ids.shape == (N,)
        assert all(t.dtype == torch.int64 for t in vars(ep).values() if t is not None)
        assert len(set(ep.word_ids.tolist())) == N
        assert torch.equal(torch.bincount(ep.support_y, minlength=N), torch.full((N,), K))
        assert torch.equal(torch.bincount(ep.query_y, minlength=N), torch.full((N,), Q))
        for c in range(N):  # support and query occurrences of a class are distinct
            s = ep.support_pos[ep.support_y == c].tolist()
            q = ep.query_pos[ep.query_y == c].tolist()
            assert len(set(s) | set(q)) == K + Q
        for x, y, pos in ((ep.support_x, ep.support_y, ep.support_pos),
                          (ep.query_x, ep.query_y, ep.query_pos)):
            assert (x[:, -1] == sampler.mask_id).all()
            for row, label, p in zip(x.numpy(), y.tolist(), pos.tolist()):
                word = ep.word_ids[label].item()
                original = stream[p - T + 1:p + 1]
                assert original[-1] == word  # the window ends at an occurrence of the labelled word
                assert word not in row  # ... no unmasked copy of it is left
                masked = row == sampler.mask_id  # (and its other spellings, whole words: below)
                assert (masked >= (original == word)).all()
                assert np.array_equal(row[~masked], original[~masked])


def test_smlmt_val_split_and_errors(ds):
    ep = data.SMLMTSampler(ds, 3, 2, 2, 8, split="val").sample(np.random.default_rng(0))
    stream = split_stream(ds, "val")
    assert all(stream[p] == ep.word_ids[y]
               for p, y in zip(ep.query_pos.tolist(), ep.query_y.tolist()))
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
            + [" bird" * 6]  # bird: 6 occurrences, but no 2 windows apart
            # fish: exactly n documents, three times apart in the first: documents, not windows
            + [(" fish" + " of" * (T - 1)) * 3, " to fish is", " is fish of", " of fish"])
    out = str(tmp_path / "out")
    prepare.write_shards(text, tiny_enc, out, val_tokens=0, progress=False)
    prepare.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6, context=16)
    stream = split_stream(out, "train")
    doc_of = np.cumsum(stream == tiny_enc.eot_token) - (stream == tiny_enc.eot_token)  # (n_tokens,)
    sampler = data.SMLMTSampler(out, 3, 2, 2, T)
    cat, tree, dog, fish = (tiny_enc.encode_single_token(" " + w)
                            for w in ("cat", "tree", "dog", "fish"))
    assert sorted(sampler.words[sampler.usable].tolist()) == sorted([cat, tree, dog, fish])
    dog_sets, dog_mixed, cat_in_doc_7 = set(), False, set()
    rng = np.random.default_rng(0)
    for _ in range(50):
        ep = sampler.sample(rng)
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
            if word == cat:
                cat_in_doc_7.update(p[doc_of[p] == 7].tolist())
    assert len(dog_sets) > 1 and dog_mixed  # at random, support not always before query
    assert len(cat_in_doc_7) > 3  # any of a document's 30 occurrences, not always its first
    with pytest.raises(ValueError, match="index_train_positions.npy.*n_way 5 > 4"):
        data.SMLMTSampler(out, 5, 2, 2, T)  # bird is not usable


def test_index_without_documents_refused(tmp_path, ds):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    meta = data.read_meta(out)
    for split in ("train", "val"):  # as an index of an older version
        os.remove(os.path.join(out, meta["index"][split].pop("docs")))
    common.write_json(os.path.join(out, "meta.json"), meta)
    with pytest.raises(ValueError, match=r"meta.json.*document.*python prepare.py --reindex --out"):
        data.SMLMTSampler(out, 4, 2, 2, CONTEXT)


def make_reader(kind, ds, split="train"):
    if kind == "shard":
        return data.ShardReader(ds, split, 4, 8)
    if kind == "smlmt":
        return data.SMLMTSampler(ds, 4, 2, 2, 8, split=split)
    return data.LMTaskSampler(ds, 2, 8, split=split)


def draw(reader, rng):
    out = reader.next_batch(rng) if isinstance(reader, data.ShardReader) else reader.sample(rng)
    if isinstance(out, data.Episode):
        return [t for t in vars(out).values() if t is not None]
    return list(out)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["shard", "smlmt", "lm"])
def test_draws_are_a_function_of_the_rng(ds, kind):
    rng = np.random.default_rng
    a, b = make_reader(kind, ds), make_reader(kind, ds)
    assert same(draw(a, rng(0)), draw(b, rng(0)))  # the same rng state: the same data
    assert not same(draw(a, rng(1)), draw(a, rng(0)))
    assert not same(draw(make_reader(kind, ds, split="val"), rng(0)), draw(a, rng(0)))
    # a reader holds no state of its own: after other draws, a run of draws from one generator is
    # that of a fresh reader from a generator in the same state
    for seed in range(5):
        draw(a, rng(seed))
    ra, rb = rng(99), rng(99)
    assert all(same(draw(a, ra), draw(b, rb)) for _ in range(3))
    assert ra.bit_generator.state == rb.bit_generator.state


def test_shard_reader_windows(ds):
    reader = data.ShardReader(ds, "train", batch_size=64, seq_len=12)
    shards = [np.asarray(data.load_shard(p)).astype(np.int64)
              for p in data.list_shards(ds, "train")]
    hits = set()
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = reader.next_batch(rng)
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
    rng = np.random.default_rng(0)
    for _ in range(50):
        ep = sampler.sample(rng)
        assert ep.word_ids is None  # no classes: every position is read
        sx, sy, qx, qy = ep.support_x, ep.support_y, ep.query_x, ep.query_y
        assert sx.shape == sy.shape == (K, T) and qx.shape == qy.shape == (1, T)
        # ((K+1)*T,) the query chunk right after the support chunks
        x = torch.cat([sx.flatten(), qx.flatten()])
        y = torch.cat([sy.flatten(), qy.flatten()])
        assert torch.equal(y[:-1], x[1:])
        assert contains(stream, np.append(x.numpy(), y[-1].item()))
        # no <|endoftext|> inside: one document (only the last target may be the document's
        # closing one)
        assert tiny_enc.eot_token not in x.tolist()


def test_lm_task_short_documents(tmp_path, tiny_enc):
    # K=2, T=4 needs 3*4 + 1 = 13 tokens; "a cat ... cat" (1 + 11 tokens, then <|endoftext|>) has
    # exactly 13
    exact = "a" + " cat" * 11
    path = write_text(tmp_path / "a.txt", [" dog" * 5, exact, " bird" * 11, " fish" * 3])
    out = str(tmp_path / "out")
    prepare.write_shards(prepare.iter_text_docs([path]), tiny_enc, out, val_tokens=0,
                         progress=False)
    sampler = data.LMTaskSampler(out, 2, 4)
    assert sampler.n_docs == 1  # shorter documents are skipped, never spliced across <|endoftext|>
    tokens = tiny_enc.encode_ordinary(exact) + [tiny_enc.eot_token]
    rng = np.random.default_rng(0)
    for _ in range(3):
        ep = sampler.sample(rng)
        sx, sy, qx, qy = ep.support_x, ep.support_y, ep.query_x, ep.query_y
        assert torch.cat([sx.flatten(), qx.flatten()]).tolist() == tokens[:-1]
        # the last target closes the document
        assert torch.cat([sy.flatten(), qy.flatten()]).tolist() == tokens[1:]
    with pytest.raises(ValueError, match="no train document.*13"):
        data.LMTaskSampler(out, 3, 4)


def test_lm_task_draws_every_span_of_every_document_uniformly(tmp_path, tiny_enc):
    # K=2, T=4: an episode is 13 consecutive tokens of one document. Documents of 13, 15 and 17
    # tokens ("a", 11, 13 or 15 words, <|endoftext|>) hold 1, 3 and 5 such spans: 9 in all, each
    # to be drawn with probability 1/9; each document starts its words elsewhere in the list, so
    # every span has other tokens
    docs = ["a" + "".join(" " + TINY_WORDS[(shift + i) % len(TINY_WORDS)] for i in range(m))
            for shift, m in ((0, 11), (5, 13), (10, 15))]
    path = write_text(tmp_path / "a.txt", docs)
    out = str(tmp_path / "out")
    prepare.write_shards(prepare.iter_text_docs([path]), tiny_enc, out, val_tokens=0,
                         progress=False)
    sampler = data.LMTaskSampler(out, 2, 4)
    rng, n = np.random.default_rng(0), 1800
    counts = {}
    for _ in range(n):
        ep = sampler.sample(rng)
        sx, sy, qx, qy = ep.support_x, ep.support_y, ep.query_x, ep.query_y
        span = tuple(torch.cat([sx.flatten(), qx.flatten()]).tolist()) + (qy[0, -1].item(),)
        counts[span] = counts.get(span, 0) + 1
    assert len(counts) == 9
    assert all(abs(v - n / 9) < 60 for v in counts.values()), counts  # 200 +- 4.5 std


@pytest.mark.parametrize("unknown", ["class0", "drop"])
def test_positions_episode_masks_labels_and_classes(unknown):
    # 3 sequences of 6 tokens; ids < 20, mask 99
    x = np.array([[5, 1, 2, 3, 4, 1], [5, 6, 7, 1, 2, 9], [5, 2, 2, 8, 8, 3]])
    for seed in range(30):
        rng = np.random.default_rng(seed)
        ep = data.positions_episode(x, rng, k_shot=2, n_way=4, vocab=20, mask_id=99,
                                    unknown=unknown)
        s_at, q_at = ep.support_at.numpy(), ep.query_at.numpy()
        assert len(set(s_at) | set(q_at)) == 3 and 0 not in set(s_at) | set(q_at)
        sx, qx = ep.support_x.numpy(), ep.query_x.numpy()
        assert (sx[:, s_at] == 99).all() and (qx[:, q_at] == 99).all()
        keep = np.setdiff1d(np.arange(6), s_at)
        assert (sx[:, keep] == x[:, keep]).all()
        assert (np.delete(qx, q_at, 1) == np.delete(x, q_at, 1)).all()
        classes = ep.word_ids.numpy()
        assert len(classes) == 4 and len(set(classes)) == 4
        support_tokens = x[:, s_at].reshape(-1)  # read out in (sequence, position) order
        distinct = set(support_tokens)
        if len(distinct) <= 4:  # all in, padded with other ids
            assert distinct <= set(classes)
        else:  # a random 4 of them
            assert set(classes) <= distinct
        other = 0 if unknown == "class0" else -1
        for tok, y in zip(support_tokens, ep.support_y.numpy()):
            assert (classes[y] == tok) if tok in classes else y == other
        for tok, y in zip(x[:, q_at[0]], ep.query_y.numpy()):
            assert (classes[y] == tok) if tok in classes else y == other
        if unknown == "drop":
            assert (ep.query_y >= 0).any()  # a batch keeps at least one query


def test_empty_shard_loads_as_no_tokens(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    prepare.write_shard(path, [])
    assert os.path.getsize(path) == 4 * data.HEADER_INTS
    tokens = data.load_shard(path)
    assert tokens.dtype == np.uint16 and len(tokens) == 0


def test_shard_reader_reads_a_shard_of_exactly_one_window(tmp_path, tiny_enc):
    # seq_len 8: shard 0 holds exactly one window of 9 tokens, shard 1 none (8 tokens), shard 2
    # four (12 tokens): five windows, each drawn uniformly
    shards = [list(range(9)), list(range(100, 108)), list(range(200, 212))]
    out = write_data_dir(tmp_path / "out", tiny_enc, {"train": shards})
    reader = data.ShardReader(out, "train", batch_size=500, seq_len=8)
    x, y = reader.next_batch(np.random.default_rng(0))
    windows = {tuple(w) for w in torch.cat([x, y[:, -1:]], 1).tolist()}
    assert windows == {tuple(range(9))} | {tuple(range(s, s + 9)) for s in range(200, 204)}
    share = (x[:, 0] == 0).float().mean().item()
    assert 0.14 < share < 0.26  # 1 window of 5
    with pytest.raises(ValueError, match=r"every train shard is shorter than seq_len \+ 1 = 13"):
        data.ShardReader(out, "train", batch_size=1, seq_len=12)


def test_smlmt_windows_from_the_first_indexed_positions_start_at_their_shard(tmp_path, tiny_enc):
    shards, (cat, dog, of) = boundary_shards(tiny_enc)
    out = write_data_dir(tmp_path / "out", tiny_enc, {"train": shards})
    prepare.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6, context=4)
    sampler = data.SMLMTSampler(out, n_way=2, k_shot=1, q_query=1, seq_len=4)
    M = sampler.mask_id
    # the windows of 4 tokens ending at each occurrence; every copy of the word masked
    expected = {cat: {(of, of, M, M), (M, of, of, M)}, dog: {(cat, cat, of, M), (of, of, cat, M)}}
    rng = np.random.default_rng(0)
    for _ in range(5):
        ep = sampler.sample(rng)
        assert sorted(ep.word_ids.tolist()) == sorted([cat, dog])
        for c, word in enumerate(ep.word_ids.tolist()):
            rows = torch.cat([ep.support_x[ep.support_y == c], ep.query_x[ep.query_y == c]])
            assert {tuple(r) for r in rows.tolist()} == expected[word]
    # with one support and one query per class, the label arrays are views numpy will not let
    # anyone write; each tensor must own its memory, or writing one label changes another's
    query_y = ep.query_y.clone()
    ep.support_y[:] = 7
    assert torch.equal(ep.query_y, query_y)


def test_positions_sampler_needs_room_for_its_positions(ds):
    # k_shot + 1 distinct positions among 1..seq_len - 1
    data.PositionsSampler(ds, "train", batch_size=2, seq_len=4, k_shot=2, n_way=4)
    with pytest.raises(ValueError, match="k_shot \\+ 1 = 4 positions do not fit in positions 1..3"):
        data.PositionsSampler(ds, "train", batch_size=2, seq_len=4, k_shot=3, n_way=4)


def test_positions_episode_pads_with_distinct_other_ids():
    # 12 classes from at most 6 support tokens of a 20-id vocabulary: at least 6 padding ids,
    # distinct from each other and from the support tokens
    x = np.array([[5, 1, 2, 3, 4, 1], [5, 6, 7, 1, 2, 9], [5, 2, 2, 8, 8, 3]])
    for seed in range(10):
        ep = data.positions_episode(x, np.random.default_rng(seed), k_shot=2, n_way=12, vocab=20,
                                    mask_id=99, unknown="class0")
        classes = ep.word_ids.tolist()
        assert len(set(classes)) == 12 and set(classes) <= set(range(20))
        assert set(x[:, ep.support_at.numpy()].reshape(-1)) <= set(classes)


def test_apart_samples_non_overlapping_windows_uniformly():
    # five windows that never overlap: each of the 10 pairs equally likely
    nxt, room = data._room(np.array([0, 10, 20, 30, 40]), 5)
    assert (nxt, room) == ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0])
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(3000):
        pair = tuple(data._apart(nxt, room, 2, rng).tolist())
        counts[pair] = counts.get(pair, 0) + 1
    assert len(counts) == 10 and all(0.07 < c / 3000 < 0.13 for c in counts.values()), counts
    # overlapping windows (0 and 2 with T = 5): never both, and the count is always met
    nxt, room = data._room(np.array([0, 2, 10, 11, 30]), 5)
    assert room[0] == 3
    for _ in range(200):
        picked = data._apart(nxt, room, 3, rng)
        assert len(picked) == 3 and np.all(np.diff(np.array([0, 2, 10, 11, 30])[picked]) >= 5)


def test_cli_checks_a_data_dir_and_prints_what_it_holds(ds, tmp_path, capsys):
    data.main([ds])
    lines = capsys.readouterr().out.splitlines()
    for split, line in zip(data.SPLITS, lines):
        assert line.startswith(f"{split}: {len(split_stream(ds, split)):,} tokens in ")
        assert f"index: {len(np.load(os.path.join(ds, 'index_words.npy'))):,} words" in line
    broken = tmp_path / "broken"
    shutil.copytree(ds, broken)
    shard = data.list_shards(str(broken), "val")[0]
    with open(shard, "ab") as f:
        f.write(b"\0\0")  # two bytes too many
    want = "data.py: error: .*val_000000.bin.*truncated or corrupted"
    with pytest.raises(SystemExit, match=want):
        data.main([str(broken)])


def prefix_encoding():
    """A tiny tiktoken.Encoding in which ' pres' is a word and the start of ' pres' + 'ident',
    ' cat' has the spellings ' Cat', ' CAT', 'cat', 'Cat' (single tokens) and 'CAT' (three
    bytes)."""
    ranks = {bytes([i]): i for i in range(256)}
    for w in [" pres", " cat", " Cat", " CAT", " dog", " the", " said", "ident", "cat", "Cat"]:
        b = w.encode()
        for j in range(2, len(b) + 1):
            ranks.setdefault(b[:j], len(ranks))
    return tiktoken.Encoding(name="prefix", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


PREFIX_DOCS = ["the pres said the president said the dog said the pres",
               "Cat said the cat\nCat said (cat the CAT said the catident said CAT\nscat the cat",
               "the dog said the pres the Cat said the dog the cat said the president"]


def test_smlmt_classes_are_whole_words_and_every_spelling_is_masked(tmp_path):
    enc = prefix_encoding()
    tok = {w: enc.encode_single_token(w) for w in (" pres", " cat", " Cat", " CAT", "cat", "Cat",
                                                    "ident", " the", " said", " dog")}
    assert enc.encode(" president") == [tok[" pres"], tok["ident"]]
    assert len(enc.encode("CAT")) == 3
    docs = [enc.encode(d) + [enc.eot_token] for d in PREFIX_DOCS * 6]
    stream = np.concatenate(docs)
    out = write_data_dir(tmp_path / "d", enc, {"train": [stream], "val": [stream]})
    prepare.build_index(out, enc, min_per_million=0, max_per_million=10 ** 6, context=8)
    s = data.SMLMTSampler(out, n_way=3, k_shot=2, q_query=2, seq_len=8)
    words = [enc.decode([int(w)]) for w in s.words]
    assert sorted(words) == [" CAT", " Cat", " cat", " dog", " pres", " said", " the"]
    # only whole-word occurrences: ' pres' 3 times in every 3 documents, never the start of
    # ' president' (the first has not the 7 tokens of context before it)
    i = words.index(" pres")
    pos = np.asarray(s.positions[s.offsets[i]:s.offsets[i + 1]])
    assert len(pos) == 3 * 6 - 1 and (stream[pos + 1] != tok["ident"]).all()

    # the masks of ' cat' in a hand-made window: every spelling, whole words, not 's' + 'cat'
    text = "Cat said (cat the CAT said the catident said\nCAT scat the Cat the cat"
    x = np.array(enc.encode(text))
    got = s._masked(x[None, None], s.spelled[[words.index(" cat")]])[0, 0]
    masked = [enc.decode([int(t)]) for t in x[got]]
    assert masked == ["Cat", "cat", " CAT", " cat", "ident", "C", "A", "T", " Cat", " cat"]
    assert enc.decode(x[~got].tolist()) == " said ( the said the said\n scat the the"

    # every window of every episode: no spelling of its word left, no [MASK] + rest of a word
    rng = np.random.default_rng(0)
    for _ in range(30):
        ep = s.sample(rng)
        classes = [enc.decode([int(w)]).strip().lower() for w in ep.word_ids]
        assert len(set(classes)) == 3  # ' cat' and ' Cat' are never two classes of one episode
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            for row, label in zip(x.tolist(), y.tolist()):
                assert row[-1] == s.mask_id
                shown = "".join("#" if t == s.mask_id else enc.decode([t]) for t in row)
                assert not re.search(rf"(?<![a-z]){classes[label]}(?![a-z])", shown, re.I), shown
                assert "#ident" not in shown, shown


def test_audit_counts_what_episodes_show_of_their_labels(tmp_path, monkeypatch, capsys):
    enc = prefix_encoding()
    stream = np.concatenate([enc.encode(d) + [enc.eot_token] for d in PREFIX_DOCS * 6])
    out = write_data_dir(tmp_path / "d", enc, {"train": [stream], "val": [stream]})
    prepare.build_index(out, enc, min_per_million=0, max_per_million=10 ** 6, context=8)
    args = dict(n_episodes=40, n_way=3, k_shot=2, q_query=2, seq_len=8)
    a = data.audit(out, enc, **args)
    assert (a["candidates"], a["windows"]) == (7, 40 * 3 * 4)
    assert a["mask_then_rest"] == a["spelling_shown"] == a["word_in_text"] == 0
    # ' pres' is no prefix class: 3 of its 5 occurrences a document triple are whole words
    assert a["prefix_classes"] == 0
    # the masking of the previous version, one token id only: every kind of leak shows
    monkeypatch.setattr(data.SMLMTSampler, "_masked",
                        lambda self, x, spelled: x == self.words[spelled][:, None, None])
    a = data.audit(out, enc, **args)
    assert a["mask_then_rest"] > 0 and a["spelling_shown"] > 0 and a["word_in_text"] > 0


def test_smlmt_words_whose_documents_interleave(tmp_path, tiny_enc):
    # the index is sorted by word, then position: cat's last document is dog's first, dog's last
    # is bird's first, and bird (2 documents) and fish (1) are sparse words next to them. Checked
    # against a slow reference of what each word may give: its own occurrences, from distinct
    # documents, or windows apart where it has too few documents, and every document it has.
    T, K, Q = 4, 2, 1
    n = K + Q
    text = [" of to is" * 5, " cat of of", " cat to cat", " of cat is", " is cat dog of",
            " dog of to", " to dog bird of", " bird of of of of bird of of of of bird",
            " fish is fish", " is of to"]
    out = str(tmp_path / "out")
    prepare.write_shards(text, tiny_enc, out, val_tokens=0, progress=False)
    prepare.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6, context=16)
    stream = split_stream(out, "train")
    eot = stream == tiny_enc.eot_token
    doc_of = np.cumsum(eot) - eot
    word = {w: tiny_enc.encode_single_token(" " + w) for w in ("cat", "dog", "bird", "fish")}
    probe = data.SMLMTSampler(out, 1, K, Q, T)
    ref = {}  # word id -> (its documents, usable, from distinct documents)
    for c, w in enumerate(probe.words.tolist()):
        pos = np.flatnonzero(stream == w)
        assert probe.positions[probe.offsets[c]:probe.offsets[c + 1]].tolist() == pos.tolist()
        docs = set(doc_of[pos].tolist())
        apart, last = 0, -T  # greedy from the left: the most windows that do not overlap
        for p in pos:
            if p - last >= T:
                apart, last = apart + 1, p
        ref[w] = (docs, len(docs) >= n or apart >= n, len(docs) >= n)
    assert [ref[word[w]][1:] for w in word] == [(True, True), (True, True), (True, False),
                                               (False, False)]
    usable = sorted(w for w, r in ref.items() if r[1])
    assert sorted(probe.words[probe.usable].tolist()) == usable
    sampler = data.SMLMTSampler(out, len(usable), K, Q, T)  # every usable word in every episode
    used = {w: set() for w in usable}
    rng = np.random.default_rng(1)
    for _ in range(100):
        ep = sampler.sample(rng)
        assert sorted(ep.word_ids.tolist()) == usable
        for c, w in enumerate(ep.word_ids.tolist()):
            p = np.concatenate([ep.support_pos[ep.support_y == c], ep.query_pos[ep.query_y == c]])
            assert len(p) == n and (stream[p] == w).all(), (w, p)
            if ref[w][2]:
                assert len(set(doc_of[p].tolist())) == n
            else:
                assert (np.diff(np.sort(p)) >= T).all()
            used[w] |= set(doc_of[p].tolist())
            x = torch.cat([ep.support_x[ep.support_y == c], ep.query_x[ep.query_y == c]])
            assert (x[:, -1] == sampler.mask_id).all() and not (x == w).any()
    assert {w: used[w] for w in usable} == {w: ref[w][0] for w in usable}
