"""prepare.py: shards that decode to the documents, the val split, the output directory's
guards, the SMLMT index and its band, and the command line."""
import glob
import os
import shutil
import sys
import types

import numpy as np
import pytest
import tiktoken

import common
import data
import prepare
from conftest import (CONTEXT, EOT, TINY_WORDS, boundary_shards, split_stream, write_data_dir,
                      write_text)


def check_shard_sizes(data_dir, enc, shard_tokens):
    """Each train shard but the last ends with the document that brings it to shard_tokens."""
    for path in data.list_shards(data_dir, "train")[:-1]:
        tokens = data.load_shard(path)
        last_doc = enc.decode(tokens.tolist()).split(EOT)[-2]
        assert len(tokens) >= shard_tokens > len(tokens) - len(enc.encode_ordinary(last_doc)) - 1


def hidden_left(d):
    """Dot-files and folders in d but its .lock (which prepare.py keeps): staging left behind."""
    return [p for p in glob.glob(os.path.join(str(d), ".*")) if os.path.basename(p) != ".lock"]


def dir_snapshot(d):
    return {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(d, "*")))}


def test_shards_decode_to_documents(ds, tiny_enc, docs):
    tokens = np.concatenate([split_stream(ds, "val"), split_stream(ds, "train")])
    assert tiny_enc.decode(tokens.tolist()) == "".join(doc + EOT for doc in docs)
    meta = data.read_meta(ds)
    assert len(meta["shards"]["train"]) > 1
    assert (meta["train_tokens"] == sum(meta["shards"]["train"].values())
            == len(split_stream(ds, "train")))
    assert meta["train_docs"] + meta["val_docs"] == len(docs)
    assert (meta["tokenizer"], meta["vocab_size"]) == ("tiny", tiny_enc.n_vocab)
    assert (meta["eot_id"], meta["mask_id"]) == (tiny_enc.eot_token, tiny_enc.n_vocab)
    for split in ("train", "val"):
        for path in data.list_shards(ds, split):
            header = np.fromfile(path, dtype=np.int32, count=data.HEADER_INTS)
            n_tokens = meta["shards"][split][os.path.basename(path)]
            assert list(header[:3]) == [data.MAGIC, data.VERSION, n_tokens]
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
    # ... and is the last one there
    assert len(val) - len(tiny_enc.encode_ordinary(docs[m - 1])) - 1 < 2000
    assert tiny_enc.decode(split_stream(ds, "train").tolist()).startswith(docs[m] + EOT)


def test_parallel_output_identical_and_val_docs_and_max_tokens(tmp_path, tiny_enc, docs):
    a = write_text(tmp_path / "train.txt", docs[:100])
    b = write_text(tmp_path / "valid.txt", docs[100:120])
    kw = dict(val_tokens=0, shard_tokens=3000, batch_chars=400, progress=False)
    m1 = prepare.write_shards(prepare.iter_text_docs([a]), tiny_enc, tmp_path / "p1", num_proc=1,
                              val_docs=prepare.iter_text_docs([b]), **kw)
    m2 = prepare.write_shards(prepare.iter_text_docs([a]), tiny_enc, tmp_path / "p2", num_proc=2,
                              val_docs=prepare.iter_text_docs([b]), **kw)
    assert m1["shards"] == m2["shards"] and len(m1["shards"]["train"]) > 1
    check_shard_sizes(tmp_path / "p1", tiny_enc, 3000)
    for name in list(m1["shards"]["train"]) + list(m1["shards"]["val"]):
        p1, p2 = (open(tmp_path / d / name, "rb").read() for d in ("p1", "p2"))
        assert p1 == p2
    val_text = tiny_enc.decode(split_stream(tmp_path / "p1", "val").tolist())
    assert val_text == "".join(d + EOT for d in docs[100:120])
    train_text = tiny_enc.decode(split_stream(tmp_path / "p1", "train").tolist())
    assert train_text == "".join(d + EOT for d in docs[:100])
    # max_tokens stops at the end of the document that reaches it
    m3 = prepare.write_shards(prepare.iter_text_docs([a]), tiny_enc, tmp_path / "p3",
                              max_tokens=1000, **kw)
    n = [len(tiny_enc.encode_ordinary(d)) + 1 for d in docs[:100]]
    k = int(np.searchsorted(np.cumsum(n), 1000))
    assert m3["train_tokens"] == sum(n[:k + 1]) and m3["train_docs"] == k + 1
    with pytest.raises(ValueError, match="not both"):
        prepare.write_shards(prepare.iter_text_docs([a]), tiny_enc, tmp_path / "p4", val_tokens=10,
                             val_docs=prepare.iter_text_docs([b]), progress=False)


def test_text_reader_formats(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("\n\nfirst doc\n  second line \n\n\n \t\nsecond doc\n\nthird", encoding="utf-8")
    assert list(prepare.iter_text_docs([str(p)])) == ["first doc\n  second line ", "second doc",
                                                      "third"]
    assert list(prepare.iter_text_docs([str(p)], one_doc_per_file=True)) == [p.read_text().strip()]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\n\xff\xfe broken")
    with pytest.raises(ValueError, match="bad.txt"):
        list(prepare.iter_text_docs([str(tmp_path / "bad.txt")]))


def test_missing_and_empty_input(tmp_path, tiny_enc):
    with pytest.raises(FileNotFoundError, match="nomatch"):
        prepare.text_files([str(tmp_path / "nomatch*.txt")])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="blank.txt"):
        docs = prepare.iter_text_docs(prepare.text_files([str(tmp_path / "*.txt")]))
        prepare.write_shards(docs, tiny_enc, out, progress=False)
    # nothing written, no temporary left
    assert not glob.glob(str(out / "*")) and not hidden_left(out)
    with pytest.raises(SystemExit, match="nomatch"):
        prepare.main(["--text", str(tmp_path / "nomatch*"), "--out", str(out)])


def test_everything_to_val_refused(tmp_path, tiny_enc, docs):
    a = write_text(tmp_path / "a.txt", docs[:5])
    with pytest.raises(ValueError, match="nothing left for train"):
        prepare.write_shards(prepare.iter_text_docs([a]), tiny_enc, tmp_path / "out",
                             val_tokens=10 ** 6, progress=False)
    assert not os.path.exists(tmp_path / "out")  # not even an empty --out is left behind


def test_token_ids_must_fit_uint16(tmp_path, tiny_enc):
    path = str(tmp_path / "train_000000.bin")
    prepare.write_shard(path, [1, 2, 3])
    before = open(path, "rb").read()
    for bad in ([1, 65536], [1, -1]):
        with pytest.raises(ValueError, match="train_000000.bin.*uint16"):
            prepare.write_shard(path, bad)
    with pytest.raises(ValueError, match="train_000000.bin.*integers"):
        prepare.write_shard(path, [1.5])
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["train_000000.bin"]
    prepare.write_shard(path, [65535])
    assert data.load_shard(path)[0] == 65535
    # 2^31 tokens overflow the int32 count in the header (a view of one token: no memory)
    with pytest.raises(ValueError, match="2147483648 tokens do not fit the int32 header"):
        prepare.write_shard(path, np.broadcast_to(np.uint16(1), (2 ** 31,)))
    # a tokenizer whose ids do not fit is refused before anything is written
    big = tiktoken.Encoding(name="big", pat_str=tiny_enc._pat_str,
                            mergeable_ranks=tiny_enc._mergeable_ranks, special_tokens={EOT: 70000})
    with pytest.raises(ValueError, match="uint16"):
        prepare.write_shards(["a doc"], big, tmp_path / "out", val_tokens=0, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_out_dir_of_other_tokenizer_refused(tmp_path, ds, tiny_enc, docs):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    before = dir_snapshot(out)
    other = tiktoken.Encoding(name="other", pat_str=tiny_enc._pat_str,
                              mergeable_ranks=tiny_enc._mergeable_ranks,
                              special_tokens=tiny_enc._special_tokens)
    with pytest.raises(ValueError, match="meta.json.*'tiny'.*'other'"):
        prepare.write_shards(docs, other, out, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="--overwrite"):  # same tokenizer: refused unless overwrite
        prepare.write_shards(docs, tiny_enc, out, progress=False)
    assert dir_snapshot(out) == before and not hidden_left(out)
    # overwrite: the new shards replace the old, surplus old shards go, and the index must be
    # rebuilt
    prepare.write_shards(docs[:20], tiny_enc, out, val_tokens=0, overwrite=True, progress=False)
    shards = [os.path.basename(p) for p in glob.glob(os.path.join(out, "*.bin"))]
    assert shards == ["train_000000.bin"]
    train_text = tiny_enc.decode(split_stream(out, "train").tolist())
    assert train_text == "".join(d + EOT for d in docs[:20])
    with pytest.raises(FileNotFoundError, match="no SMLMT index"):
        data.SMLMTSampler(out, 2, 1, 1, 8)
    # shards without a meta.json: tokenizer unknown, refused even with overwrite
    os.remove(os.path.join(out, "meta.json"))
    with pytest.raises(ValueError, match="no meta.json"):
        prepare.write_shards(docs, tiny_enc, out, overwrite=True, progress=False)


def test_index_sampling(tmp_path, ds, tiny_enc):
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    shards = [np.asarray(data.load_shard(p)).astype(np.int64)
              for p in data.list_shards(out, "train")]
    starts = np.cumsum([0] + [len(s) for s in shards[:-1]])
    stream = np.concatenate(shards)
    # every occurrence with CONTEXT - 1 tokens before it in its shard is eligible
    eligible = np.concatenate([st + np.arange(CONTEXT - 1, len(s))
                               for s, st in zip(shards, starts)])

    def index(seed):
        prepare.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6,
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
        prepare.write_shards(docs[:100] * times, tiny_enc, out, val_tokens=0, val_docs=docs[250:],
                             progress=False)
    stream = split_stream(outs[0], "train")
    per_million = np.bincount(stream, minlength=tiny_enc.n_vocab) / len(stream) * 1e6
    ids = [tiny_enc.encode_single_token(" " + w) for w in TINY_WORDS if len(w) >= 3]
    rates = sorted(per_million[ids])
    lo, hi = (rates[1] + rates[2]) / 2, (rates[-3] + rates[-2]) / 2  # a band cutting both ends
    expected = sorted(i for i in ids if lo <= per_million[i] <= hi)
    assert 0 < len(expected) < len(ids) - 3
    for out in outs:
        index = prepare.build_index(out, tiny_enc, min_per_million=lo, max_per_million=hi,
                                    context=8)
        assert np.load(os.path.join(out, "index_words.npy")).tolist() == expected
        assert (index["min_per_million"], index["max_per_million"]) == (lo, hi)
        assert index["train_tokens"] == data.read_meta(out)["train_tokens"]
    assert data.read_meta(outs[1])["train_tokens"] == 3 * len(stream)
    for bad in ((-1, 10), (5, 1), (float("nan"), 10)):
        with pytest.raises(ValueError, match="0 <= --min_per_million <= --max_per_million"):
            prepare.build_index(outs[0], tiny_enc, *bad)


def test_cli_end_to_end(tmp_path, tiny_enc, docs, monkeypatch, capsys):
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": tiny_enc)
    train = write_text(tmp_path / "t.txt", docs[:200])
    valid = write_text(tmp_path / "v.txt", docs[200:])
    out = str(tmp_path / "out")
    args = ["--text", train, "--val_text", valid, "--out", out, "--num_proc", "1",
            "--min_per_million", "1000", "--max_per_million", "1e6", "--context", "16"]
    prepare.main(args)
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
    assert len(examples) == min(10, len(words))  # ten, spread over the frequency range
    assert ", ".join(map(repr, examples)) in printed and set(examples) <= set(words)
    assert examples[0] == tiny_enc.decode([int(word_ids[np.argmax(counts[word_ids])])])
    assert examples[-1] == tiny_enc.decode([int(word_ids[np.argmin(counts[word_ids])])])
    ep = data.SMLMTSampler(out, 4, 2, 2, 16, split="val").sample(np.random.default_rng(0))
    assert ep.query_x.shape == (8, 16)
    with pytest.raises(SystemExit, match="--overwrite"):
        prepare.main(args)
    # --reindex with a band that keeps only some of the tiny words: exactly those, never ' of'
    # (2 letters)
    per_million = counts / meta["train_tokens"] * 1e6
    tiny_ids = {w: tiny_enc.encode_single_token(" " + w) for w in TINY_WORDS}
    lo, hi = sorted(float(per_million[i]) for i in tiny_ids.values())[5:7]
    prepare.main(["--reindex", "--out", out, "--min_per_million", repr(lo), "--max_per_million",
                  repr(hi), "--context", "8"])
    index = data.read_meta(out)["index"]
    assert index["context"] == 8 and index["max_per_million"] == hi
    expected = sorted(i for w, i in tiny_ids.items() if len(w) >= 3 and lo <= per_million[i] <= hi)
    assert 0 < len(expected) < 10
    assert np.load(os.path.join(out, "index_words.npy")).tolist() == expected
    with pytest.raises(SystemExit) as e:
        prepare.main(args + ["--val_tokens", "100"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0


def test_failed_build_leaves_out_as_it_was(tmp_path, tiny_enc, docs, monkeypatch):
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": tiny_enc)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\0" * 1000)  # one document, and not a single word
    out = tmp_path / "out"
    val = write_text(tmp_path / "val.txt", docs[250:260])
    cmd = ["--out", str(out), "--val_text", val, "--num_proc", "1", "--overwrite"]
    with pytest.raises(SystemExit, match=f"--text {nul}: .*no word at all"):
        prepare.main(["--text", str(nul)] + cmd)
    assert not out.exists()
    good = write_text(tmp_path / "good.txt", docs[:50])
    prepare.main(["--text", good, "--min_per_million", "0", "--max_per_million", "1e6"] + cmd)
    before = dir_snapshot(out)
    with pytest.raises(SystemExit, match=f"--text {nul}: .*no word at all"):
        prepare.main(["--text", str(nul)] + cmd)
    assert dir_snapshot(out) == before and not hidden_left(out)
    # a band none of the words falls in: named, with what to change
    with pytest.raises(SystemExit, match=f"--text {good}: no candidate word occurs 500000 to "
                                         f"1e\\+06 .*widen --min_per_million/--max_per_million"):
        prepare.main(["--text", good, "--min_per_million", "5e5", "--max_per_million", "1e6"] + cmd)
    with pytest.raises(SystemExit, match="0 <= --min_per_million"):
        prepare.main(["--text", good, "--min_per_million", "-1"] + cmd)
    assert dir_snapshot(out) == before and not hidden_left(out)


def test_failed_reindex_leaves_old_index(tmp_path, ds, tiny_enc, monkeypatch):
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": tiny_enc)
    out = str(tmp_path / "out")
    shutil.copytree(ds, out)
    before = dir_snapshot(out)
    with pytest.raises(SystemExit, match=f"{out} \\(train shards\\): no candidate word.*widen"):
        prepare.main(["--reindex", "--out", out, "--min_per_million", "5e5",
                      "--max_per_million", "1e6"])
    assert dir_snapshot(out) == before
    # a failure once the train index is written (a val shard that no longer matches meta.json)
    prepare.write_shard(data.list_shards(out, "val")[0], np.zeros(10, dtype=np.int64))
    before = dir_snapshot(out)
    with pytest.raises(SystemExit, match="val_000000.bin"):
        prepare.main(["--reindex", "--out", out, "--seed", "1", "--min_per_million", "0",
                      "--max_per_million", "1e6", "--context", str(CONTEXT)])
    assert dir_snapshot(out) == before and not hidden_left(out)
    data.SMLMTSampler(out, 4, 2, 2, CONTEXT)  # the old train index still loads


def test_dataset_reader(tmp_path, tiny_enc, docs, monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):  # datasets.load_dataset, without a network
        calls.append((name, config, split, streaming))
        rows = [{"text": d, "id": i} for i, d in enumerate(docs[:30])]
        return iter(rows + [{"text": " \n", "id": 30}])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": tiny_enc)
    out = str(tmp_path / "out")
    prepare.main(["--dataset", "org/set", "--name", "cfg", "--out", out, "--val_tokens", "100",
                  "--num_proc", "1", "--min_per_million", "0", "--max_per_million", "1e6",
                  "--context", "8"])
    assert calls == [("org/set", "cfg", "train", True)]
    tokens = np.concatenate([split_stream(out, "val"), split_stream(out, "train")])
    # the blank row is skipped
    assert tiny_enc.decode(tokens.tolist()) == "".join(d + EOT for d in docs[:30])
    with pytest.raises(ValueError, match="no column 'body'"):
        list(prepare.iter_hf_docs("org/set", text_column="body"))


def test_offline_dataset_is_a_one_line_error(tmp_path, tiny_enc, monkeypatch):
    def load_dataset(*a, **kw):  # what the hub client raises without a network
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)\n...")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": tiny_enc)
    with pytest.raises(SystemExit, match=r"cannot stream dataset org/set .*ConnectionError: "
                                         r"Couldn't reach.*offline, give local text with --text"):
        prepare.main(["--dataset", "org/set", "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_staging_left_by_a_killed_run_is_removed(tmp_path, tiny_enc, docs):
    out = tmp_path / "out"
    for stale in (".write_shards-abc", ".build_index-xyz"):  # kill -9 runs no cleanup
        (out / stale).mkdir(parents=True)
        (out / stale / "train_000000.bin").write_bytes(b"\0" * 100)
    prepare.write_shards(docs, tiny_enc, str(out), val_tokens=50, progress=False)
    assert not hidden_left(out)


def test_index_keeps_occurrences_from_the_context_boundary_on_and_band_edges(tmp_path, tiny_enc):
    shards, (cat, dog, _) = boundary_shards(tiny_enc)
    out = write_data_dir(tmp_path / "out", tiny_enc, {"train": shards})
    # a band whose ends are exactly the two words' frequencies keeps both
    index = prepare.build_index(out, tiny_enc, min_per_million=125000.0,
                                max_per_million=250000.0, context=4)
    load = lambda key: np.load(os.path.join(out, index["train"][key])).tolist()
    assert np.load(os.path.join(out, "index_words.npy")).tolist() == sorted([cat, dog])
    # an occurrence needs context - 1 = 3 tokens before it in its shard: shard position 3 is the
    # first that qualifies (global 3 and 8 + 3), 2 and 0 do not
    by_word = {cat: [3, 11], dog: [5, 12]}
    assert load("offsets") == [0, 2, 4]
    assert load("positions") == by_word[min(cat, dog)] + by_word[max(cat, dog)]
    assert load("docs") == [0, 1, 0, 1]  # one document per shard
    assert index["train"]["n_positions"] == 4 and "val" not in index
    # a band just inside either frequency leaves that word out
    # (a band of one frequency, lo = hi, is a band too)
    for lo, hi, kept in ((125000.5, 250000.0, [cat]), (125000.0, 249999.5, [dog]),
                         (250000.0, 250000.0, [cat])):
        prepare.build_index(out, tiny_enc, min_per_million=lo, max_per_million=hi, context=4)
        assert np.load(os.path.join(out, "index_words.npy")).tolist() == kept


def test_shards_of_another_tokenizer_get_no_index_and_tokens_must_be_1d(tmp_path, tiny_enc, ds):
    other = tiktoken.Encoding(name="other", pat_str=tiny_enc._pat_str,
                              mergeable_ranks=tiny_enc._mergeable_ranks,
                              special_tokens=tiny_enc._special_tokens)
    with pytest.raises(ValueError, match="meta.json: shards of tokenizer 'tiny', index asked for "
                                         "with 'other'"):
        prepare.build_index(ds, other)
    with pytest.raises(ValueError, match="x.bin: tokens must be a 1-d array, got shape \\(2, 2\\)"):
        prepare.write_shard(str(tmp_path / "x.bin"), [[1, 2], [3, 4]])
    assert not os.path.exists(tmp_path / "x.bin")
