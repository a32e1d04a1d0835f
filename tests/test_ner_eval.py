import copy
import io
import json
import os
import pickle
import random
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch

import ner_eval
from model import Llama, ModelArgs
from ner_eval import IGNORE, LABEL_ID, encode_sentence, get_spans, read_iob2, span_f1


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# Parsing: every trap of the real files in one small file
TRAPS = (
    "# newdoc id =set.hr.1\n"  # no space after '=' (Croatian/Serbian)
    "# sent_id = s1\n"
    "# text = s k Ivo u Zagrebu\n"
    "1\ts k\tO\t-\t-\n"  # a token with a space inside: split on TAB only
    "2\tIvo\tB-PER\tB-PER#O\ts\n"  # junk bookkeeping columns 4-5 (Danish style)
    "3\tu\tO\tO\t-\n"
    "4\tZagrebu\tB-OTH\tB-LOC\t-\n"  # OTH is read as O
    "\n"
    "\n"  # two blank lines do not make an empty sentence
    "#sent_id = s2\n"  # '#' alone starts a comment
    "1\t#\tO\t-\t-\n"  # a '#' token is not a comment: only lines starting with '#' are
    "2\tVlada\tI-ORG\t-\t-\n"  # stray I- is kept as written (the metric reads it as B-)
    "3\tRH\tI-OTH\t-\t-"  # and the file need not end with a newline or a blank line
)


def test_read_iob2_traps(tmp_path):
    sents = read_iob2(write(tmp_path / "x-ud-test.iob2", TRAPS))
    assert sents == [(["s k", "Ivo", "u", "Zagrebu"], ["O", "B-PER", "O", "O"]),
                     (["#", "Vlada", "RH"], ["O", "I-ORG", "O"])]


def test_read_iob2_three_columns_are_enough(tmp_path):
    sents = read_iob2(write(tmp_path / "x.iob2", "1\tcat\tB-PER\n2\tdog\tO\n\n1\tbird\tB-LOC\n"))
    assert sents == [(["cat", "dog"], ["B-PER", "O"]), (["bird"], ["B-LOC"])]


def test_read_iob2_crlf(tmp_path):
    sents = read_iob2(write(tmp_path / "x.iob2", "1\tcat\tB-PER\t-\t-\r\n2\tdog\tO\t-\t-\r\n\r\n"))
    assert sents == [(["cat", "dog"], ["B-PER", "O"])]


@pytest.mark.parametrize("bad", [
    "2 dog O - -",  # spaces instead of tabs
    "2\tdog",  # no tag column
    "x\tdog\tO\t-\t-",  # no position: probably another column layout
    "2\tdog\tB-MISC\t-\t-",  # a type UNER does not have
    "2\tdog\tPER\t-\t-",  # no IOB prefix
    "2\t\tO\t-\t-",  # empty token
])
def test_read_iob2_bad_line_names_file_and_line(tmp_path, bad):
    path = write(tmp_path / "bad.iob2", f"# text = cat dog\n1\tcat\tO\t-\t-\n{bad}\n\n")
    with pytest.raises(ValueError, match=rf"{path}:3: "):
        read_iob2(path)


# Metric: spans and F1 worked out by hand

def test_spans_by_hand():
    assert get_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert get_spans(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 3)]  # I- without B- starts a span
    assert get_spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3)]  # type change
    assert get_spans(["B-ORG", "B-ORG", "I-ORG"]) == [("ORG", 0, 1), ("ORG", 1, 3)]
    assert get_spans(["O", "B-LOC", "I-LOC"]) == [("LOC", 1, 3)]  # span at the sentence end
    assert get_spans(["O", "O"]) == [] and get_spans([]) == []


def test_span_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"],  # PER(0,2) LOC(3,4)
            ["O", "B-ORG", "I-ORG", "I-ORG"],  # ORG(1,4), at the sentence end
            ["B-PER", "O"]]                    # PER(0,1)
    pred = [["I-PER", "I-PER", "O", "O"],      # PER(0,2) right (stray I- read as B-); LOC missed
            ["O", "B-ORG", "I-ORG", "O"],      # ORG(1,3): wrong end
            ["B-PER", "B-LOC"]]                # PER(0,1) right; LOC(1,2) spurious
    m = span_f1(gold, pred)
    assert (m["correct"], m["predicted"], m["gold"]) == (2, 4, 4)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    per = m["per_type"]
    assert per["PER"]["f1"] == pytest.approx(1.0)
    assert (per["LOC"]["correct"], per["LOC"]["predicted"], per["LOC"]["gold"]) == (0, 1, 1)
    assert per["LOC"]["f1"] == 0.0
    assert (per["ORG"]["precision"], per["ORG"]["recall"]) == (0.0, 0.0)


def test_span_f1_type_change_inside_span():
    # gold is one LOC span; B-LOC I-PER predicts LOC(0,1) and PER(1,2): both wrong
    m = span_f1([["B-LOC", "I-LOC"]], [["B-LOC", "I-PER"]])
    assert (m["correct"], m["predicted"], m["gold"]) == (0, 2, 1) and m["f1"] == 0.0


def test_span_f1_no_entities():
    none = [["O", "O", "O"]]
    some = [["B-PER", "O", "O"]]
    m = span_f1(none, some)  # nothing to find, one false alarm
    assert (m["precision"], m["recall"], m["f1"], m["predicted"], m["gold"]) == (0, 0, 0, 1, 0)
    m = span_f1(some, none)  # one entity, nothing predicted
    assert (m["precision"], m["recall"], m["f1"], m["predicted"], m["gold"]) == (0, 0, 0, 0, 1)
    m = span_f1(none, none)  # nothing anywhere: 0, as seqeval reports it
    assert (m["f1"], m["per_type"]) == (0.0, {})
    with pytest.raises(ValueError):
        span_f1([["O", "O"]], [["O"]])
    with pytest.raises(ValueError):  # a sentence without its prediction is not scored as none
        span_f1([["B-PER"], ["O"]], [["B-PER"]])


# Tokenization and first-sub-token alignment

def test_first_subtoken_alignment(tiny_enc):
    e = encode_sentence(["cat", "dogs", "tree"], ["B-PER", "O", "B-LOC"], tiny_enc, 128)
    cat, dog, s = (tiny_enc.encode_ordinary(w) for w in (" cat", " dog", "s"))
    assert e["ids"] == cat + dog + s + tiny_enc.encode_ordinary(" tree")
    assert len(dog) == len(s) == 1
    assert e["labels"] == [LABEL_ID["B-PER"], LABEL_ID["O"], IGNORE, LABEL_ID["B-LOC"]]
    assert e["n_words"] == 3 and not e["cut"]


def test_chinese_has_no_spaces(tiny_enc):
    assert not ner_eval.uses_spaces("zh_gsd") and not ner_eval.uses_spaces("zh_pud")
    assert ner_eval.uses_spaces("en_ewt") and ner_eval.uses_spaces("sv_talbanken")
    words, tags = ["北京", "是", "cat"], ["B-LOC", "O", "B-PER"]
    e = encode_sentence(words, tags, tiny_enc, 128, spaces=False)
    assert e["ids"] == tiny_enc.encode_ordinary("北京是cat")  # tiny encoding: a token per byte
    assert len(e["ids"]) == 6 + 3 + 3 and tiny_enc.encode_ordinary(" ")[0] not in e["ids"]
    assert e["labels"] == ([LABEL_ID["B-LOC"]] + [IGNORE] * 5 + [LABEL_ID["O"]] + [IGNORE] * 2 +
                           [LABEL_ID["B-PER"]] + [IGNORE] * 2)


def test_cut_at_max_len(tiny_enc):
    # ' cat' ' dog' 's' ' tree' cut at 3 tokens: 'tree' loses its label; dogs keeps its first token
    e = encode_sentence(["cat", "dogs", "tree"], ["B-PER", "O", "B-LOC"], tiny_enc, 3)
    assert len(e["ids"]) == 3 and e["cut"] and e["n_words"] == 2
    assert e["tags"] == ["B-PER", "O", "B-LOC"]  # gold keeps the whole sentence
    exact = encode_sentence(["cat", "dogs", "tree"], ["B-PER", "O", "B-LOC"], tiny_enc, 4)
    assert not exact["cut"] and exact["n_words"] == 3


def test_cut_entities_count_entities_the_cut_puts_out_of_reach(tiny_enc):
    # ' cat' | ' dog' 's' | ' bird' | ' river' | ' tree': 6 tokens
    words = ["cat", "dogs", "bird", "river", "tree"]
    tags = ["B-PER", "O", "B-LOC", "I-LOC", "B-ORG"]
    e = encode_sentence(words, tags, tiny_enc, 4)
    # 'river' lost its label, so LOC(2,4) is out of reach although 'bird' kept its own; ORG too
    assert (e["n_words"], e["entities"], e["cut_entities"]) == (3, 3, 2)
    assert encode_sentence(words, tags, tiny_enc, 5)["cut_entities"] == 1  # ORG only
    assert encode_sentence(words, tags, tiny_enc, 6)["cut_entities"] == 0
    # a stray I- starts an entity, as the metric reads gold
    e = encode_sentence(["cat", "dog"], ["O", "I-PER"], tiny_enc, 1)
    assert (e["entities"], e["cut_entities"]) == (1, 1)


# Label on the last sub-token: a sentence whose words have several sub-tokens
# ' cat' 's' | ' ' 'x' 'y' | ' dog' | ' tree' 's': labels at 0 2 5 6 (first) or 1 4 5 7 (last)
MULTI = (["cats", "xy", "dog", "trees"], ["B-PER", "B-ORG", "O", "B-LOC"])


def test_last_subtoken_labels(tiny_enc):
    L = LABEL_ID
    first = encode_sentence(*MULTI, tiny_enc, 128)
    last = encode_sentence(*MULTI, tiny_enc, 128, subtoken="last")
    assert first["ids"] == last["ids"] and len(first["ids"]) == 8
    assert first["labels"] == [L["B-PER"], IGNORE, L["B-ORG"], IGNORE, IGNORE, L["O"], L["B-LOC"],
                               IGNORE]
    assert last["labels"] == [IGNORE, L["B-PER"], IGNORE, IGNORE, L["B-ORG"], L["O"], IGNORE,
                              L["B-LOC"]]
    # cut at 7 tokens inside 'trees': its first sub-token is kept, its last is not
    first, last = (encode_sentence(*MULTI, tiny_enc, 7, subtoken=s) for s in ("first", "last"))
    assert (first["n_words"], first["cut_entities"]) == (4, 0)
    assert (last["n_words"], last["cut_entities"]) == (3, 1)


def test_last_subtoken_features_and_predictions_map_back_to_words(tiny_enc):
    sents = [MULTI, (["dog", "xy"], ["B-ORG", "O"])]  # ' dog' | ' ' 'x' 'y'
    model = tiny_model(tiny_enc)
    hidden = []  # every position's final hidden state, sentence by sentence
    with torch.no_grad():
        for words, tags in sents:
            ids = encode_sentence(words, tags, tiny_enc, 128)["ids"]
            hidden.append(model.hidden(torch.tensor([ids]))[0])
    last_pos, first_pos = [[1, 4, 5, 7], [0, 3]], [[0, 2, 5, 6], [0, 1]]
    # a head that reads the gold tag at each last sub-token and I-LOC everywhere else, so a
    # prediction taken from any other position shows
    target = [[LABEL_ID["I-LOC"]] * len(h) for h in hidden]
    for b, (_, tags) in enumerate(sents):
        for p, tag in zip(last_pos[b], tags):
            target[b][p] = LABEL_ID[tag]
    H = torch.cat(hidden).double()
    Y = 10 * torch.eye(len(ner_eval.LABELS), dtype=torch.float64)[sum(target, [])]
    head = torch.nn.Linear(model.args.dim, len(ner_eval.LABELS), bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.linalg.lstsq(H, Y).solution.T)
    args = settings(eval_batch_size=2)
    for subtoken, pos in (("last", last_pos), ("first", first_pos)):
        exs = ner_eval.encode_sentences(sents, tiny_enc, 128, subtoken=subtoken)
        feats, labels = ner_eval.word_features(model, exs, ner_eval.nullcontext())
        torch.testing.assert_close(feats, torch.cat([h[p] for h, p in zip(hidden, pos)]))
        assert labels.tolist() == [LABEL_ID[t] for _, tags in sents for t in tags]
        cache = {}
        ner_eval.cache_features(model, exs, cache, args, ner_eval.nullcontext())
        for c in (None, cache):  # the full regime's path and the head regime's cached features
            preds = ner_eval.predict(model, head, exs, args, ner_eval.nullcontext(), c)
            if subtoken == "last":
                assert preds == [tags for _, tags in sents]
            else:  # ' dog' is one token, its own first and last
                assert preds == [["I-LOC", "I-LOC", "O", "I-LOC"], ["B-ORG", "I-LOC"]]
    # cut inside the last word: it is predicted O, its entity is lost
    exs = ner_eval.encode_sentences(sents[:1], tiny_enc, 7, subtoken="last")
    preds = ner_eval.predict(model, head, exs, args, ner_eval.nullcontext())
    assert preds == [["B-PER", "B-ORG", "O", "O"]]


def test_cap_is_a_fixed_sample():
    sents = list(range(100))
    a, b = ner_eval.cap(sents, 10, "en_ewt-train"), ner_eval.cap(sents, 10, "en_ewt-train")
    assert a == b and len(a) == 10 and a == sorted(a) and a != sents[:10]
    assert ner_eval.cap(sents, 0, "x") is sents and ner_eval.cap(sents, 500, "x") is sents


# Training: a tiny synthetic NER task whose tags follow from the tokens

FILLER = ["the", "and", "of", "to", "is", "green", "apple", "stone", "house", "tree"]


def synthetic(n, seed):
    """' cat' is always a person, ' dog' an organisation, ' bird river' a two-word location."""
    rng = random.Random(seed)
    sents = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(3, 10)):
            r = rng.random()
            if r < 0.1:
                words.append("cat"), tags.append("B-PER")
            elif r < 0.2:
                words.append("dog"), tags.append("B-ORG")
            elif r < 0.3:
                words += ["bird", "river"]
                tags += ["B-LOC", "I-LOC"]
            else:
                words.append(rng.choice(FILLER)), tags.append("O")
        sents.append((words, tags))
    return sents


def iob2(sents):
    return "".join("".join(f"{i}\t{w}\t{t}\t-\t-\n" for i, (w, t) in enumerate(zip(*s), 1)) + "\n"
                   for s in sents)


def tiny_model(enc, seed=0):
    torch.manual_seed(seed)
    return Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=enc.n_vocab,
                           max_seq_len=64))


def settings(**kw):
    args = ner_eval.get_args(["ckpt.pt", "--device", "cpu"])
    return Namespace(**{**vars(args), **kw})


def test_head_training_learns_synthetic_ner(tiny_enc):
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev, test = enc(synthetic(300, 0)), enc(synthetic(60, 1)), enc(synthetic(60, 2))
    model = tiny_model(tiny_enc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    hidden = model.hidden
    model.hidden = lambda *a, **kw: calls.append(1) or hidden(*a, **kw)
    # the paper's settings, except the head's own lr (3e-5 hardly moves a linear probe)
    res = ner_eval.fine_tune(model, train, dev, {"syn": test}, "head", settings(head_lr=1e-3))
    assert res["lr"] == 1e-3
    assert res["test"]["syn"]["final"]["f1"] > 0.9, res["epochs"]
    assert res["test"]["syn"]["best"]["f1"] > 0.9
    assert len(res["epochs"]) == 10
    assert res["best_dev_f1"] == max(e["dev_f1"] for e in res["epochs"])
    # frozen backbone: its weights never change, and each sentence went through it once, not once
    # per epoch (420 sentences in batches of 64)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(calls) == 7


def test_features_cached_across_runs(tiny_enc):
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev = enc(synthetic(40, 0)), enc(synthetic(8, 1))
    model = tiny_model(tiny_enc)
    calls = []
    hidden = model.hidden
    model.hidden = lambda *a, **kw: calls.append(1) or hidden(*a, **kw)
    cache = {}
    res = ner_eval.fine_tune(model, train, dev, {"syn": dev}, "head", settings(epochs=1),
                             cache=cache)
    assert res["lr"] == 3e-5  # without --head_lr the head regime keeps the paper's lr
    assert len(calls) == 1 and len(cache) == 48
    # a second head (another training set, seed or lr) on the same checkpoint reuses them all
    ner_eval.fine_tune(model, dev, train, {"syn": train}, "head", settings(epochs=2), cache=cache)
    assert len(calls) == 1


def test_predict_pads_cut_words_with_o(tiny_enc):
    sents = [(["cat", "dog", "bird", "fish"], ["B-PER"] * 4), (["cat"], ["B-PER"]),
             (["tree", "house"], ["O", "O"])]
    exs = ner_eval.encode_sentences(sents, tiny_enc, 2)  # one token a word: the first is cut
    model = tiny_model(tiny_enc)
    head = torch.nn.Linear(model.args.dim, len(ner_eval.LABELS))
    with torch.no_grad():  # a head that always says B-PER
        head.weight.zero_()
        head.bias.copy_(torch.eye(len(ner_eval.LABELS))[LABEL_ID["B-PER"]])
    preds = ner_eval.predict(model, head, exs, settings(eval_batch_size=2), ner_eval.nullcontext())
    assert preds == [["B-PER", "B-PER", "O", "O"], ["B-PER"], ["B-PER", "B-PER"]]


def test_full_training_changes_backbone(tiny_enc):
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev = enc(synthetic(32, 0)), enc(synthetic(8, 1))
    model = tiny_model(tiny_enc)
    before = model.layers[0].attention.wq.weight.clone()
    out = model.output.weight.clone()
    res = ner_eval.fine_tune(model, train, dev, {"syn": dev}, "full", settings(epochs=1, lr=1e-3))
    assert not torch.equal(before, model.layers[0].attention.wq.weight)
    assert torch.equal(out, model.output.weight)  # the vocabulary projection is not trained
    assert res["steps"] == 2 and res["lr"] == 1e-3


# The command line, end to end on a tiny data folder and checkpoint

def test_cli_end_to_end(tmp_path, tiny_enc, monkeypatch, capsys):
    data = tmp_path / "uner"
    for split, n, seed in (("train", 48, 0), ("dev", 12, 1), ("test", 12, 2)):
        write(data / "UNER_Tiny-One" / f"xx_one-ud-{split}.iob2", iob2(synthetic(n, seed)))
    write(data / "UNER_Tiny-PUD" / "yy_pud-ud-test.iob2", iob2(synthetic(10, 3)))
    ckpts = []
    for name, seed in (("a", 0), ("b", 1)):
        model = tiny_model(tiny_enc, seed)
        ckpt = {"model_args": vars(model.args), "model": model.state_dict(), "head": None,
                "tokenizer": "tiny", "config": {}, "step": 7}
        (tmp_path / name).mkdir()
        torch.save(ckpt, tmp_path / name / "ckpt.pt")
        ckpts.append(str(tmp_path / name / "ckpt.pt"))
    monkeypatch.setattr(ner_eval.common, "get_encoding", lambda name: tiny_enc)
    common = ["--data_dir", str(data), "--train_sets", "xx_one", "--epochs", "2", "--device", "cpu",
              "--max_train_sentences", "40", "--max_len", "6"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ner_eval.main([str(tmp_path / "a")] + common)  # a run directory: its ckpt.pt
        assert torch.get_num_threads() == 2  # without --threads, the process's count is kept
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "a" / "ner_ckpt.json").read_text())
    assert res["test_sets"] == ["xx_one", "yy_pud"]  # the test-only set is found too
    assert list(res["runs"]) == ["xx_one/head", "xx_one/full"]
    train = res["sentences"]["xx_one"]["train"]
    assert (train["used"], train["total"]) == (40, 48)
    assert res["settings"]["epochs"] == 2 and res["step"] == 7
    # a word is a token here, so at --max_len 6 an entity ending past word 6 is out of reach
    spans = [ner_eval.get_spans(tags) for _, tags in synthetic(10, 3)]
    gold, cut = sum(map(len, spans)), sum(end > 6 for s in spans for _, _, end in s)
    assert 0 < cut < gold
    test = res["sentences"]["yy_pud"]["test"]
    assert (test["entities"], test["cut_entities"]) == (gold, cut)
    for run in res["runs"].values():
        assert len(run["epochs"]) == 2 and run["train_sentences"] == 40
        assert set(run["test"]["yy_pud"]) == {"final", "best"}
        assert run["test"]["yy_pud"]["final"]["gold"] == gold  # the metric's count of gold spans
    assert "xx_one/head" in out and "yy_pud" in out and "train <= 40" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("yy_pud ")]
    # the settings block, then the final and best-dev F1 tables with the unreachable column
    assert len(rows) == 3 and rows[1][-1] == rows[2][-1] == f"{cut}/{gold}"
    assert out.count("unreachable: gold entities with a word that lost its label to the cut at 6 "
                     "tokens") == 2

    ner_eval.main(["--compare", *ckpts, "--regime", "head", "--out", str(tmp_path / "c.json"),
                   "--label_subtoken", "last"] + common)
    out = capsys.readouterr().out
    pair = json.loads((tmp_path / "c.json").read_text())
    a, b = (pair[k]["runs"]["xx_one/head"]["test"]["yy_pud"]["final"]["f1"] for k in "ab")
    assert f"{100 * a:9.1f}{100 * b:9.1f}{100 * (b - a):9.1f}" in out
    row = [line.split() for line in out.splitlines() if line.startswith("yy_pud ")][-1]
    assert len(row) == 8 and row[-1] == f"{cut}/{gold}"  # the name, 6 F1 columns, unreachable
    assert "\nminutes " in out  # run times of A and B
    assert pair["a"]["settings"]["label_subtoken"] == "last"
    assert out.count("labels on each word's last sub-token") == 2


def test_train_sizes_give_an_f1_curve(tmp_path, tiny_enc, monkeypatch, capsys):
    data = tmp_path / "uner"
    for split, n, seed in (("train", 48, 0), ("dev", 12, 1), ("test", 12, 2)):
        write(data / "UNER_Tiny-One" / f"xx_one-ud-{split}.iob2", iob2(synthetic(n, seed)))
    model = tiny_model(tiny_enc)
    torch.save({"model_args": vars(model.args), "model": model.state_dict(), "head": None,
                "tokenizer": "tiny", "config": {}, "step": 7}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(ner_eval.common, "get_encoding", lambda name: tiny_enc)
    ner_eval.main([str(tmp_path / "ckpt.pt"), "--data_dir", str(data), "--train_sets", "xx_one",
                   "--epochs", "1", "--device", "cpu", "--regime", "head", "--head_lr", "1e-2",
                   "--train_sizes", "5", "20", "100", "--out", str(tmp_path / "r.json")])
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    # one run per size; a size past the training set is the whole set, named by what it used
    assert list(runs) == ["xx_one@5/head", "xx_one@20/head", "xx_one@48/head"]
    assert [r["train_sentences"] for r in runs.values()] == [5, 20, 48]
    assert "xx_one@5/head" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ner_eval.get_args(["c.pt", "--train_sizes", "0"])


def result(cut, max_len=128, tokenizer="gpt2"):
    """A results dict as evaluate_checkpoint writes it, one run and one test set, ru_pud."""
    score = {"f1": 0.5}
    return {"checkpoint": "ckpt.pt", "step": 1, "max_len": max_len, "tokenizer": tokenizer,
            "test_sets": ["ru_pud"], "sentences": {"ru_pud": {"test": {
                "used": 1000, "total": 1000, "cut": 440, "entities": 1036, "cut_entities": cut}}},
            "runs": {"all/head": {"test": {"ru_pud": {"final": score, "best": score}},
                                  "seconds": 60, "best_dev_f1": 0.5, "best_epoch": 3}}}


def test_unreachable_entities_next_to_f1():
    table = ner_eval.format_table(result(134), "best").splitlines()
    assert table[1].split() == ["test", "set", "all/head", "unreachable"]
    assert table[2].split() == ["ru_pud", "50.0", "134/1036"]
    assert table[-1].startswith("unreachable: gold entities with a word that lost its label to "
                                "the cut at 128 tokens")
    same = ner_eval.format_compare(result(134), result(134)).splitlines()
    assert same[-1].endswith("(recall <= 1 - unreachable/gold)")
    assert [line.split()[-1] for line in same if line.startswith("ru_pud")] == ["134/1036"]
    # checkpoints with other max_len (their max_seq_len) or tokenizers may lose other entities
    differ = ner_eval.format_compare(result(134), result(120, max_len=100)).splitlines()
    assert [line.split()[-1] for line in differ if line.startswith("ru_pud")] == ["134|120/1036"]
    assert "cut at 128|100 tokens" in differ[-1] and differ[-1].endswith("A|B where the two differ")


def test_seed_makes_runs_repeatable(tiny_enc):
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev = enc(synthetic(40, 0)), enc(synthetic(8, 1))
    model, cache = tiny_model(tiny_enc), {}
    run = lambda seed: ner_eval.fine_tune(model, train, dev, {"syn": dev}, "head",
                                          settings(epochs=2, head_lr=1e-3, seed=seed), cache=cache)
    a, b, c = run(1), run(1), run(2)
    assert a["epochs"] == b["epochs"] and a["test"] == b["test"]
    assert a["epochs"][0]["train_loss"] != c["epochs"][0]["train_loss"]


def test_lr_schedule():
    paper = settings()  # linear decay to 0, no warm-up
    assert [ner_eval.lr_at(s, 4, 1.0, paper) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    warm = settings(warmup_ratio=0.5)  # Hugging Face's get_linear_schedule_with_warmup
    assert [ner_eval.lr_at(s, 8, 1.0, warm) for s in range(8)] == [0, .25, .5, .75, 1, .75, .5, .25]
    flat = settings(decay="none", warmup_ratio=0.25)
    assert [ner_eval.lr_at(s, 4, 1.0, flat) for s in range(4)] == [0.0, 1.0, 1.0, 1.0]
    assert ner_eval.lr_at(0, 1, 1.0, paper) == 1.0  # a single step trains at the peak
    with pytest.raises(SystemExit):
        ner_eval.get_args(["c.pt", "--warmup_ratio", "-0.1"])


def test_train_sizes_of_one_sentence_are_allowed():
    assert ner_eval.get_args(["c.pt", "--train_sizes", "1", "7"]).train_sizes == [1, 7]
    with pytest.raises(SystemExit):
        ner_eval.get_args(["c.pt", "--train_sizes", "0", "7"])


def test_adamw_betas_from_0_up_to_below_1():
    a = ner_eval.get_args(["c.pt", "--beta1", "0", "--beta2", "0"])
    assert (a.beta1, a.beta2) == (0.0, 0.0)
    for flag in ("--beta1", "--beta2"):
        with pytest.raises(SystemExit):
            ner_eval.get_args(["c.pt", flag, "1"])


def test_train_set_names_all_and_paper(tmp_path):
    for n in ner_eval.TRAIN_SETS:
        for split in ("train", "dev", "test"):
            write(tmp_path / f"UNER_{n}" / f"{n}-ud-{split}.iob2", iob2(synthetic(3, 0)))
    write(tmp_path / "UNER_Tiny-PUD" / "yy_pud-ud-test.iob2", iob2(synthetic(5, 0)))
    args = settings(data_dir=str(tmp_path), train_sets=["paper", "en_ewt", "all"],
                    max_eval_sentences=2)
    uner = ner_eval.load_uner(args)  # each of the nine and their concatenation, each once
    runs = [(n, [n]) for n in ner_eval.TRAIN_SETS] + [("all", ner_eval.TRAIN_SETS)]
    assert uner["runs"] == runs
    assert uner["tests"] == ner_eval.TRAIN_SETS + ["yy_pud"]  # own test sets, then test-only
    assert len(uner["sents"]["yy_pud"]["test"]) == 2 and uner["total"]["yy_pud"]["test"] == 5
    assert len(uner["sents"]["en_ewt"]["train"]) == 3  # --max_train_sentences 0: no cap


def test_download_uner_layout(tmp_path, monkeypatch):
    urls = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(request, timeout):
        urls.append(request.full_url)
        return Response(iob2(synthetic(2, 0)).encode())

    monkeypatch.setattr(ner_eval.urllib.request, "urlopen", urlopen)
    ner_eval.download_uner(str(tmp_path), ["da_ddt", "de_pud"])
    assert urls == [f"https://raw.githubusercontent.com/UniversalNER/UNER_Danish-DDT/HEAD/"
                    f"da_ddt-ud-{s}.iob2" for s in ("train", "dev", "test")] + [
                    "https://raw.githubusercontent.com/UniversalNER/UNER_German-PUD/HEAD/"
                    "de_pud-ud-test.iob2"]  # a test-only set has only a test file
    found = ner_eval.find_datasets(str(tmp_path))  # laid out as --data_dir expects
    assert set(found) == {"da_ddt", "de_pud"} and set(found["da_ddt"]) == {"train", "dev", "test"}
    ner_eval.download_uner(str(tmp_path), ["da_ddt", "de_pud"])  # files already there are kept
    assert len(urls) == 4
    with pytest.raises(SystemExit, match="unknown UNER dataset 'xx_yy'"):
        ner_eval.download_uner(str(tmp_path), ["xx_yy"])


# Bad input: a clear error that names the path or the key

def test_bad_input_errors(tmp_path, tiny_enc, capsys):
    for split in ("train", "dev", "test"):
        write(tmp_path / "uner" / "UNER_Tiny-One" / f"xx_one-ud-{split}.iob2",
              iob2(synthetic(2, 0)))
    write(tmp_path / "uner" / "UNER_Tiny-PUD" / "yy_pud-ud-test.iob2", iob2(synthetic(2, 0)))
    data = str(tmp_path / "uner")
    model = tiny_model(tiny_enc)
    ckpt = {"model_args": vars(model.args), "model": model.state_dict(), "tokenizer": "tiny"}
    torch.save(ckpt, tmp_path / "ok.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "model_args"}, tmp_path / "nokey.pt")
    ok = str(tmp_path / "ok.pt")

    def error(argv):
        with pytest.raises(SystemExit) as e:
            ner_eval.main(argv + ["--device", "cpu"])
        return str(e.value)

    assert f"{tmp_path}/nope: no such directory" in error([ok, "--data_dir", f"{tmp_path}/nope"])
    too_deep = str(tmp_path / "uner" / "UNER_Tiny-One")  # a dataset folder, not their parent
    assert f"no UNER files under {too_deep}" in error([ok, "--data_dir", too_deep])
    msg = error([ok, "--data_dir", data, "--train_sets", "en_ewtt"])
    assert "'en_ewtt'" in msg and "en_ewtt-ud-train.iob2" in msg and "there: xx_one" in msg
    msg = error([ok, "--data_dir", data, "--train_sets", "yy_pud"])  # a test-only set
    assert "yy_pud-ud-train.iob2 or yy_pud-ud-dev.iob2" in msg
    msg = error([ok, "--data_dir", data, "--train_sets", "xx_one", "--test_sets", "zz"])
    assert "'zz'" in msg and "test sets there: xx_one yy_pud" in msg
    # a missing checkpoint is named before any data is read (the data dir does not even exist)
    missing = str(tmp_path / "missing.pt")
    assert error([missing, "--data_dir", f"{tmp_path}/nope"]) == f"checkpoint {missing} not found"
    assert error(["--compare", ok, str(tmp_path), "--data_dir", data]) == (
        f"checkpoint {tmp_path}/ckpt.pt not found")  # a run directory without its ckpt.pt
    msg = error([str(tmp_path / "nokey.pt"), "--data_dir", data, "--train_sets", "xx_one"])
    assert "nokey.pt is not a meta_train.py checkpoint: no key 'model_args'" in msg
    with pytest.raises(SystemExit):
        ner_eval.get_args([ok, "--max_train_sentences", "-1"])
    assert "must be 0 (no cap) or more" in capsys.readouterr().err


def uner_dir(root, **texts):
    """A UNER folder: xx_one (train, dev, test) and the test-only yy_pud, each a few synthetic
    sentences, except the files named as texts (e.g. xx_one_dev='...')."""
    files = {"xx_one_train": "UNER_Tiny-One/xx_one-ud-train.iob2",
             "xx_one_dev": "UNER_Tiny-One/xx_one-ud-dev.iob2",
             "xx_one_test": "UNER_Tiny-One/xx_one-ud-test.iob2",
             "yy_pud_test": "UNER_Tiny-PUD/yy_pud-ud-test.iob2"}
    for i, (key, rel) in enumerate(files.items()):
        write(root / rel, texts.get(key, iob2(synthetic(4, i))))
    return {key: str(root / rel) for key, rel in files.items()}


def save_checkpoint(path, enc):
    model = tiny_model(enc)
    torch.save({"model_args": vars(model.args), "model": model.state_dict(), "tokenizer": "tiny",
                "config": {}, "step": 1}, path)
    return str(path)


def cli_error(argv):
    """The message main(argv) exits with: one line, as Python prints a SystemExit's text."""
    with pytest.raises(SystemExit) as e:
        ner_eval.main(argv + ["--train_sets", "xx_one", "--device", "cpu", "--epochs", "1",
                              "--regime", "head"])
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("bad, what", [
    ("2 dog O - -", "expected TAB-separated columns"),
    ("2\tdog\tB-MISC\t-\t-", "tag 'B-MISC' is not O, B-X or I-X"),
])
def test_cli_bad_iob2_line_is_a_one_line_error(tmp_path, tiny_enc, bad, what):
    files = uner_dir(tmp_path / "uner", yy_pud_test=f"# c\n1\tcat\tO\t-\t-\n{bad}\n\n")
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tiny_enc)
    msg = cli_error([ckpt, "--data_dir", str(tmp_path / "uner")])
    assert msg.startswith(f"{files['yy_pud_test']}:3: {what}")


def test_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.iob2"
    path.write_bytes("1\tcat\tO\t-\t-\n\n1\tMalmö\tB-LOC\t-\t-\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{path}:3: not UTF-8 text"):
        read_iob2(path)


@pytest.mark.parametrize("key, fix", [("xx_one_train", "choose other --train_sets"),
                                      ("xx_one_dev", "choose other --train_sets"),
                                      ("yy_pud_test", "leave the set out with --test_sets")])
def test_cli_empty_file_is_an_error_naming_it(tmp_path, tiny_enc, monkeypatch, key, fix):
    # before: an empty training file failed with 'xx_one/head: no training sentences' (no file),
    # an empty dev or test file scored F1 0 over 0 sentences, counted in the mean
    files = uner_dir(tmp_path / "uner", **{key: "# sent_id = 1\n\n"})
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tiny_enc)
    monkeypatch.setattr(ner_eval.common, "get_encoding", lambda name: tiny_enc)
    msg = cli_error([ckpt, "--data_dir", str(tmp_path / "uner")])
    assert msg == (f"{files[key]}: no sentences (empty, or only comments and blank lines); "
                   f"fix the file or {fix}")


def bad_checkpoints(tmp_path, good):
    """{case: path} of files that are not usable checkpoints; good: a real one to damage."""
    raw = open(good, "rb").read()
    files = {"zero-byte": b"", "truncated": raw[:len(raw) // 2], "text": b"step = 100\n",
             "foreign pickle": pickle.dumps({"weights": [1.0, 2.0]})}
    paths = {}
    for case, content in files.items():
        paths[case] = tmp_path / f"{case.replace(' ', '_')}.pt"
        paths[case].write_bytes(content)
    paths["missing keys"] = tmp_path / "missing_keys.pt"
    torch.save({"model": {}, "step": 3}, paths["missing keys"])
    return {case: str(p) for case, p in paths.items()}


@pytest.mark.parametrize("case", ["zero-byte", "truncated", "text", "foreign pickle",
                                  "missing keys"])
def test_cli_bad_checkpoint_is_a_one_line_error_naming_it(tmp_path, tiny_enc, case):
    uner_dir(tmp_path / "uner")
    path = bad_checkpoints(tmp_path, save_checkpoint(tmp_path / "ok.pt", tiny_enc))[case]
    msg = cli_error([path, "--data_dir", str(tmp_path / "uner")])
    # common.load_checkpoint's message, the one every script gives for the same file
    if case == "missing keys":
        assert msg == f"{path} is not a meta_train.py checkpoint: no key 'model_args', 'tokenizer'"
    else:
        assert msg.startswith(f"cannot read checkpoint {path}: ")
        assert msg.endswith(" (truncated, damaged or not a checkpoint)")


def test_cli_errors_print_one_line_without_traceback(tmp_path, tiny_enc):
    files = uner_dir(tmp_path / "uner", xx_one_dev="1\tcat\tB-MISC\t-\t-\n")
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tiny_enc)
    argv = [ckpt, "--data_dir", str(tmp_path / "uner"), "--train_sets", "xx_one", "--device", "cpu"]
    r = subprocess.run([sys.executable, "ner_eval.py", *argv], capture_output=True, text=True,
                       cwd=os.path.dirname(ner_eval.__file__), timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"{files['xx_one_dev']}:1: tag 'B-MISC' is not O, B-X or "
                                     f"I-X with X in PER, ORG, LOC (or OTH, read as O)"]


def test_help():
    with pytest.raises(SystemExit) as e:
        ner_eval.get_args(["--help"])
    assert e.value.code == 0


def test_prf_with_unequal_precision_and_recall():
    # at precision = recall, F1 equals either; here it must be their harmonic mean
    m = ner_eval.prf(1, 2, 4)
    assert (m["precision"], m["recall"]) == (0.5, 0.25)
    assert m["f1"] == pytest.approx(1 / 3)
    assert (m["correct"], m["predicted"], m["gold"]) == (1, 2, 4)
    assert ner_eval.prf(0, 0, 3)["f1"] == 0.0 and ner_eval.prf(0, 3, 0)["f1"] == 0.0
    gold = [["B-PER", "O", "B-LOC", "I-LOC", "B-ORG"]]  # PER(0,1) LOC(2,4) ORG(4,5)
    pred = [["B-PER", "O", "B-LOC", "O", "O"]]  # PER right, LOC(2,3) wrong end, ORG missed
    m = span_f1(gold, pred)
    assert (m["correct"], m["predicted"], m["gold"]) == (1, 2, 3)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, pytest.approx(1 / 3), pytest.approx(0.4))
    assert m["per_type"]["ORG"] == ner_eval.prf(0, 0, 1)


# Run-order independence (issue 28): a run's numbers are a function of what it is

def seed_everything(seed):
    """Put the process's global generators in a known state, so that a run that drew from them
    would give numbers that depend on what ran before it in the same process."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_checkpoint_alone_equals_it_inside_compare(tmp_path, tiny_enc, monkeypatch):
    uner_dir(tmp_path / "uner")  # the test-only yy_pud; xx_one gets more sentences below
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, seed in ((a, 1), (b, 2)):
        model = tiny_model(tiny_enc, seed)
        torch.save({"model_args": vars(model.args), "model": model.state_dict(),
                    "tokenizer": "tiny", "config": {}, "step": 1}, path)
    for n, seed in (("train", 0), ("dev", 1), ("test", 2)):
        write(tmp_path / "uner" / "UNER_Tiny-One" / f"xx_one-ud-{n}.iob2",
              iob2(synthetic(24, seed)))
    monkeypatch.setattr(ner_eval.common, "get_encoding", lambda name: tiny_enc)
    flags = ["--data_dir", str(tmp_path / "uner"), "--train_sets", "xx_one", "--epochs", "2",
             "--batch_size", "5", "--lr", "1e-3", "--head_lr", "1e-2", "--device", "cpu"]
    seed_everything(0)
    ner_eval.main([str(b), "--out", str(tmp_path / "b.json")] + flags)
    seed_everything(0)
    ner_eval.main(["--compare", str(a), str(b), "--out", str(tmp_path / "ab.json")] + flags)
    alone = json.loads((tmp_path / "b.json").read_text())["runs"]
    inside = json.loads((tmp_path / "ab.json").read_text())["b"]["runs"]
    assert list(alone) == ["xx_one/head", "xx_one/full"]
    for key in alone:
        # every epoch's loss and dev F1 and every test score, exactly (seconds aside)
        assert alone[key]["epochs"] == inside[key]["epochs"], key
        assert alone[key]["test"] == inside[key]["test"], key
        assert alone[key]["epochs"][0]["train_loss"] != alone[key]["epochs"][1]["train_loss"]


def test_fine_tune_draws_from_generators_keyed_by_the_run(tiny_enc):
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev = enc(synthetic(30, 0)), enc(synthetic(8, 1))
    model, cache = tiny_model(tiny_enc), {}

    def run(name, regime="head", global_seed=0):
        seed_everything(global_seed)
        before = torch.get_rng_state()
        m = copy.deepcopy(model) if regime == "full" else model
        res = ner_eval.fine_tune(m, train, dev, {"syn": dev}, regime,
                                 settings(epochs=1, head_lr=1e-2, lr=1e-3), cache=cache, name=name)
        # the process's generator is left as it was: a run leaves nothing for the next one
        assert torch.equal(torch.get_rng_state(), before)
        return res["epochs"], res["test"]

    for regime in ("head", "full"):
        # whatever state the process is in, the same run gives the same numbers
        assert run("xx/" + regime, regime, 0) == run("xx/" + regime, regime, 1)
    # another training set or regime is another run, with its own head init and batch order
    assert run("xx/head") != run("yy/head")
    assert ner_eval.run_seed("xx/head", "head", 1337) == 6616440335488985500  # in any process


# Contracts checked on data irregular enough that a near miss gives another answer (issue 26)

def ref_spans(tags):
    """A slow reference of conlleval's chunks: B-X or I-X starts a span unless it continues one
    of type X; I-X continues it; anything else ends it."""
    spans, i = [], 0
    while i < len(tags):
        if tags[i] == "O":
            i += 1
            continue
        typ, j = tags[i][2:], i + 1
        while j < len(tags) and tags[j] == "I-" + typ:
            j += 1
        spans.append((typ, i, j))
        i = j
    return spans


def ref_f1(gold, pred):
    def prf(c, p, g):
        pr, rc = (c / p if p else 0.0), (c / g if g else 0.0)
        return pr, rc, (2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    rows = [(set(ref_spans(g)), set(ref_spans(p))) for g, p in zip(gold, pred)]
    out = {}
    for typ in (None,) + ner_eval.TYPES:
        keep = lambda s: {x for x in s if typ is None or x[0] == typ}
        c = sum(len(keep(g) & keep(p)) for g, p in rows)
        out[typ] = (c, sum(len(keep(p)) for _, p in rows), sum(len(keep(g)) for g, _ in rows))
        out[typ] += prf(*out[typ])
    return out


def random_tags(rng, n):
    """Tag sequences with every trap: stray I-, a type change inside a span, B- after B-."""
    weights = [6] + [1] * (len(ner_eval.LABELS) - 1)
    return [rng.choices(ner_eval.LABELS, weights, k=rng.randint(0, 9)) for _ in range(n)]


def test_spans_and_f1_match_a_slow_reference():
    rng = random.Random(5)
    gold = random_tags(rng, 300)
    # predictions near gold: the same spans with another type, shifted ends, dropped tags
    pred = []
    for g in gold:
        p = list(g)
        for i, tag in enumerate(p):
            r = rng.random()
            if tag != "O" and r < 0.15:
                p[i] = tag[:2] + rng.choice([t for t in ner_eval.TYPES if t != tag[2:]])
            elif r < 0.25:
                p[i] = rng.choice(ner_eval.LABELS)
        pred.append(p)
    for g in gold + pred:
        assert get_spans(g) == ref_spans(g), g
    m, ref = span_f1(gold, pred), ref_f1(gold, pred)
    keys = ("correct", "predicted", "gold", "precision", "recall", "f1")
    assert tuple(m[k] for k in keys) == pytest.approx(ref[None])
    assert 0.3 < m["f1"] < 0.9 and m["precision"] != m["recall"]  # a score a near miss moves
    for typ in ner_eval.TYPES:
        assert tuple(m["per_type"][typ][k] for k in keys) == pytest.approx(ref[typ]), typ


def test_right_boundaries_wrong_type_scores_nothing():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-ORG", "I-ORG", "O", "B-LOC"], ["O", "B-PER"]]  # every boundary right
    m = span_f1(gold, pred)
    assert (m["correct"], m["predicted"], m["gold"]) == (1, 3, 3)
    per = m["per_type"]
    assert (per["PER"]["correct"], per["PER"]["predicted"], per["PER"]["gold"]) == (0, 1, 1)
    assert (per["ORG"]["correct"], per["ORG"]["predicted"], per["ORG"]["gold"]) == (0, 1, 1)
    assert per["LOC"]["f1"] == 1.0 and m["f1"] == pytest.approx(1 / 3)


def test_predict_returns_each_sentence_its_own_tags_in_input_order():
    # cached features that are one-hot label ids and an identity head: the prediction of each
    # word is known, so a batch mixed up by the length sort, or tags shifted between sentences,
    # show; some sentences were cut (n_words < words) and end in O
    rng = random.Random(3)
    L = len(ner_eval.LABELS)
    exs, want, cache = [], [], {}
    for n in [5, 1, 7, 2, 2, 9, 4, 3, 6, 1, 8]:
        kept = n - rng.randint(0, 2) if n > 2 else n
        tags = [rng.choice(ner_eval.LABELS[1:]) for _ in range(n)]
        e = {"ids": [0] * (kept + rng.randint(0, 3)), "tags": ["O"] * n, "n_words": kept}
        exs.append(e)
        cache[id(e)] = torch.eye(L)[[LABEL_ID[t] for t in tags[:kept]]]
        want.append(tags[:kept] + ["O"] * (n - kept))
    head = torch.nn.Linear(L, L)
    with torch.no_grad():
        head.weight.copy_(torch.eye(L))
        head.bias.zero_()
    for bs in (1, 3, 64):
        preds = ner_eval.predict(torch.nn.Module(), head, exs, settings(eval_batch_size=bs),
                                 ner_eval.nullcontext(), cache)
        assert preds == want, bs
    batches = ner_eval.by_length(exs, 3)
    assert sorted(sum(batches, [])) == list(range(len(exs))) and [len(b) for b in batches] == [
        3, 3, 3, 2]
    lengths = [len(exs[i]["ids"]) for b in batches for i in b]
    assert lengths == sorted(lengths)


def fine_tune_spied(monkeypatch, tiny_enc, regime, dev_f1, epochs):
    """fine_tune on a tiny task with score() replaced: dev F1 follows dev_f1 epoch by epoch, and a
    test 'F1' is a fingerprint of the weights scored (head and backbone), recorded at each dev
    call -> (result, fingerprint after each epoch, optimizer kwargs, lr_at calls)."""
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev, test = enc(synthetic(10, 0)), enc(synthetic(4, 1)), enc(synthetic(4, 2))
    model = tiny_model(tiny_enc)
    fingerprints, dev_scores = [], iter(dev_f1)

    def fingerprint(head):
        return (head.weight.sum().item(), head.bias.sum().item(),
                model.layers[1].feed_forward.w2.weight.sum().item())

    def score(m, head, examples, args, ctx, cache=None):
        assert m is model
        if examples is dev:
            fingerprints.append(fingerprint(head))
            return {"f1": next(dev_scores)}
        return {"f1": fingerprint(head)}

    adamw, lrs = [], []
    real_adamw, real_lr_at = torch.optim.AdamW, ner_eval.lr_at
    monkeypatch.setattr(ner_eval, "score", score)
    monkeypatch.setattr(ner_eval.torch.optim, "AdamW",
                        lambda params, **kw: adamw.append(kw) or real_adamw(params, **kw))
    monkeypatch.setattr(ner_eval, "lr_at", lambda step, total, peak, args: lrs.append(
        (step, total, peak)) or real_lr_at(step, total, peak, args))
    args = settings(epochs=epochs, batch_size=4, lr=1e-3, head_lr=3e-2)
    res = ner_eval.fine_tune(model, train, dev, {"syn": test}, regime, args)
    return res, fingerprints, adamw, lrs


@pytest.mark.parametrize("regime", ["head", "full"])
def test_best_epoch_that_is_not_the_last_is_the_one_scored(monkeypatch, tiny_enc, regime,
                                                           capsys):
    # dev F1 peaks at epoch 2 and ties there at epoch 3: the first best epoch is kept
    res, fp, adamw, lrs = fine_tune_spied(monkeypatch, tiny_enc, regime, [0.2, 0.6, 0.6, 0.4], 4)
    out = capsys.readouterr().out
    assert "ner epoch 2/4: train loss " in out and ", dev F1 60.0 (" in out
    assert (res["best_epoch"], res["best_dev_f1"]) == (2, 0.6)
    assert [e["dev_f1"] for e in res["epochs"]] == [0.2, 0.6, 0.6, 0.4]
    assert len(set(fp)) == 4  # the weights moved every epoch
    # the final model is the last epoch's, the best the second's: head, and backbone for full
    assert res["test"]["syn"]["final"]["f1"] == fp[3]
    assert res["test"]["syn"]["best"]["f1"] == fp[1]
    if regime == "head":
        assert len({f[2] for f in fp}) == 1  # the frozen backbone never moved
    # AdamW as the paper's (and Hugging Face's defaults): lr of the regime, no weight decay
    lr = 3e-2 if regime == "head" else 1e-3
    assert adamw == [dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)]
    # 10 sentences in batches of 4: 3 steps an epoch, the schedule over all 12
    assert res["steps"] == 12 and lrs == [(s, 12, lr) for s in range(12)]


def test_best_epoch_that_is_the_last_is_the_final_model(monkeypatch, tiny_enc):
    res, fp, _, _ = fine_tune_spied(monkeypatch, tiny_enc, "full", [0.1, 0.3], 2)
    assert res["best_epoch"] == 2
    assert res["test"]["syn"]["best"] == res["test"]["syn"]["final"] == {"f1": fp[1]}


def test_defaults_are_the_papers():
    a = settings()
    assert (a.lr, a.head_lr, a.batch_size, a.epochs, a.max_len) == (3e-5, None, 16, 10, 128)
    assert (a.warmup_ratio, a.decay, a.weight_decay, a.label_subtoken) == (0.0, "linear", 0.0,
                                                                          "first")
    assert (a.beta1, a.beta2, a.grad_clip, a.regime) == (0.9, 0.999, 1.0, ["head", "full"])
    # not the paper's, but every F1 in the README was drawn with it
    assert a.seed == 1337


def two_tests_result(f1s, name="all/head", seconds=90):
    """A results dict with one run on two test sets, F1 f1s."""
    n = {"used": 10, "total": 10, "cut": 0, "entities": 20, "cut_entities": 0}
    return {"checkpoint": "c.pt", "step": 1, "max_len": 128, "tokenizer": "gpt2",
            "test_sets": ["en_ewt", "da_ddt"],
            "sentences": {"en_ewt": {"test": n}, "da_ddt": {"test": {**n, "cut_entities": 3}}},
            "runs": {name: {"test": {t: {"final": {"f1": f}, "best": {"f1": f / 2}}
                                     for t, f in zip(["en_ewt", "da_ddt"], f1s)},
                            "seconds": seconds, "best_dev_f1": 0.125, "best_epoch": 7}}}


def test_tables_by_hand():
    res = two_tests_result([0.5, 0.2], name="en_ewt@100/full")  # a name wider than 12 columns
    w = len("en_ewt@100/full") + 2
    row = lambda label, cell, cut="": (f"{label:<14}{cell:>{w}}{cut:>13}").rstrip()
    assert ner_eval.format_table(res, "final").splitlines()[:6] == [
        "test F1 x100, final model", row("test set", "en_ewt@100/full", "unreachable"),
        row("en_ewt", "50.0", "0/20"), row("da_ddt", "20.0", "3/20"), row("mean", "35.0"),
        row("minutes", "1.5")]
    assert ner_eval.format_table(res, "best").splitlines()[2:7] == [
        row("en_ewt", "25.0", "0/20"), row("da_ddt", "10.0", "3/20"), row("mean", "17.5"),
        row("dev F1", "12.5"), row("best epoch", "7")]
    out = ner_eval.format_compare(two_tests_result([0.5, 0.2]),
                                  two_tests_result([0.9, 0.4], seconds=570)).splitlines()
    cells = lambda *xs: "".join(f"{x:>9.1f}" for x in xs)
    assert f"{'da_ddt':<14}" + cells(20, 40, 20, 10, 20, 10) + f"{'3/20':>14}" in out
    assert f"{'mean':<14}" + cells(35, 65, 30, 17.5, 32.5, 15) in out
    assert f"{'minutes':<14}" + f"{1.5:>9.1f}{9.5:>9.1f}" in out


def test_settings_block_by_hand():
    c = lambda used, total, cut: {"used": used, "total": total, "cut": cut}
    res = {"checkpoint": "c.pt", "step": 9, "params": 1234567, "tokenizer": "gpt2", "max_len": 64,
           "sentences": {"xx_one": {"train": c(40, 48, 2), "dev": c(12, 12, 1),
                                    "test": c(12, 12, 0)},
                         "yy_pud": {"test": c(10, 10, 3)}}}
    args = settings(epochs=3, batch_size=8, lr=1e-3, head_lr=None, max_train_sentences=40)
    lines = ner_eval.format_settings(args, res).splitlines()
    assert lines[0] == "c.pt (step 9, 1,234,567 parameters, tokenizer gpt2)"
    assert lines[1] == ("epochs 3, batch 8, lr 0.001 (full) / 0.001 (head), warm-up 0, linear "
                        "decay, weight decay 0, seed 1337")
    assert lines[2] == ("sentences per file: train <= 40, dev and test <= all; 6 of 74 cut at 64 "
                        "tokens; labels on each word's first sub-token")
    cells = lambda *xs: "".join(f"{x:>14}" for x in xs)
    assert lines[4:] == [f"{'xx_one':<14}" + cells("40/48", "12/12", "12/12") + f"{3:>6}",
                         f"{'yy_pud':<14}" + cells("-", "-", "10/10") + f"{3:>6}"]


def test_runs_of_a_checkpoint(tmp_path, tiny_enc, monkeypatch):
    # fine_tune watched: which sentences each run trains on, and from which weights
    uner_dir(tmp_path / "uner", xx_one_train=iob2(synthetic(30, 5)))
    ckpt = save_checkpoint(tmp_path / "c.pt", tiny_enc)
    monkeypatch.setattr(ner_eval.common, "get_encoding", lambda name: tiny_enc)
    seen = []

    def fine_tune(model, train, dev, tests, regime, args, ctx, cache, name):
        seen.append((name, [" ".join(e["tags"]) + str(e["ids"]) for e in train], len(dev),
                     sorted(tests), id(cache), model.layers[0].attention.wq.weight.sum().item()))
        with torch.no_grad():  # a run that changes the model must not reach the next run
            model.layers[0].attention.wq.weight.add_(1.0)
        return {"seconds": 0}

    monkeypatch.setattr(ner_eval, "fine_tune", fine_tune)
    args = settings(data_dir=str(tmp_path / "uner"), train_sets=["xx_one"], train_sizes=[4, 11, 99],
                    max_len=500)
    uner = ner_eval.load_uner(args)
    res = ner_eval.evaluate_checkpoint(ckpt, uner, args)
    assert res["max_len"] == 64  # the model's context, not --max_len 500
    assert [s[0] for s in seen] == ["xx_one@4/head", "xx_one@4/full", "xx_one@11/head",
                                    "xx_one@11/full", "xx_one@30/head", "xx_one@30/full"]
    train = [" ".join(e["tags"]) + str(e["ids"]) for e in ner_eval.encode_sentences(
        uner["sents"]["xx_one"]["train"], tiny_enc, 64)]
    subsets = [s[1] for s in seen[::2]]
    assert subsets[2] == train
    # nested and in the training set's order: the first n of one fixed shuffle, not the first n
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) < set(big)
    assert subsets[0] == [t for t in train if t in subsets[0]] and subsets[0] != train[:4]
    assert all(s[2] == 4 and s[3] == ["xx_one", "yy_pud"] for s in seen)
    assert len({s[4] for s in seen}) == 1 and len({s[5] for s in seen}) == 1  # fresh weights
    seen.clear()
    ner_eval.evaluate_checkpoint(ckpt, uner, args)  # the same subsets for another checkpoint
    assert [s[1] for s in seen[::2]] == subsets
    # a model whose vocabulary is smaller than its tokenizer's: refused before any work
    small = {**vars(tiny_model(tiny_enc).args), "vocab_size": tiny_enc.n_vocab - 1}
    torch.save({"model_args": small,
                "model": {}, "tokenizer": "tiny", "step": 1}, tmp_path / "small.pt")
    with pytest.raises(SystemExit, match=f"tokenizer tiny has {tiny_enc.n_vocab} tokens but the "
                       f"model {tiny_enc.n_vocab - 1}; name the checkpoint's with --tokenizer"):
        ner_eval.evaluate_checkpoint(str(tmp_path / "small.pt"), uner, args)


def fine_tune_watched(monkeypatch, tiny_enc, regime, grad_clip):
    """fine_tune on 10 sentences, 2 epochs in batches of 4 -> (result, the training labels of
    each step, the gradient norm the optimizer stepped on at each step)."""
    enc = lambda sents: ner_eval.encode_sentences(sents, tiny_enc, 64)
    train, dev = enc(synthetic(10, 0)), enc(synthetic(4, 1))
    labels, norms, inits = [], [], []
    real_ce, real_adamw = torch.nn.functional.cross_entropy, torch.optim.AdamW

    class F:  # ner_eval's torch.nn.functional, with the training loss watched
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def cross_entropy(self, logits, y, **kw):
            labels.append(y.tolist())
            return real_ce(logits, y, **kw)

    def adamw(params, **kw):
        inits.append([p.detach().clone() for p in params])
        opt = real_adamw(params, **kw)
        opt.register_step_pre_hook(lambda o, args, kwargs: norms.append(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for g in o.param_groups
                         for p in g["params"] if p.grad is not None])).item()))
        return opt

    monkeypatch.setattr(ner_eval, "F", F())
    monkeypatch.setattr(ner_eval.torch.optim, "AdamW", adamw)
    res = ner_eval.fine_tune(tiny_model(tiny_enc), train, dev, {"syn": dev}, regime, settings(
        epochs=2, batch_size=4, lr=1e-3, head_lr=3e-2, grad_clip=grad_clip))
    res["head_init"] = inits[0][-2:]  # the optimizer's last parameters: the head's weight, bias
    return res, train, labels, norms


@pytest.mark.parametrize("regime", ["head", "full"])
def test_each_epoch_trains_on_every_sentence_once(monkeypatch, tiny_enc, regime):
    res, train, labels, _ = fine_tune_watched(monkeypatch, tiny_enc, regime, 1.0)
    every = sorted(k for e in train for k in e["labels"] if k != IGNORE)
    # 10 sentences in batches of 4: 4 + 4 + 2 sentences an epoch, together all of them
    assert res["steps"] == 6 and len(labels) == 6
    for epoch in (labels[:3], labels[3:]):
        assert sorted(sum(epoch, [])) == every
    assert labels[:3] != labels[3:]  # reshuffled every epoch
    # the head starts as nn.Linear's default: uniform in +-1/sqrt(dim), here dim 64
    w, b = res["head_init"]
    assert w.shape == (len(ner_eval.LABELS), 64) and b.shape == (len(ner_eval.LABELS),)
    for t in (w, b):
        assert t.abs().max() <= 1 / 8 and t.min() < 0 < t.max()
    assert 0.8 < w.std().item() / (1 / 8 / 3 ** 0.5) < 1.2  # a uniform's standard deviation


@pytest.mark.parametrize("regime", ["head", "full"])
def test_grad_clip_bounds_the_norm_stepped_on(monkeypatch, tiny_enc, regime):
    # the first step's gradient is the same in both runs (same head init, same first batch)
    _, _, _, free = fine_tune_watched(monkeypatch, tiny_enc, regime, 0.0)  # 0: off
    clip = min(0.5 * min(free), 0.9)  # below 1: the default clip, 1.0, is on too
    _, _, _, clipped = fine_tune_watched(monkeypatch, tiny_enc, regime, clip)
    assert free[0] > clip and clipped[0] == pytest.approx(clip, rel=1e-4)
    assert max(clipped) <= clip * (1 + 1e-4)


@pytest.mark.parametrize("regime", ["head", "full"])
def test_train_loss_of_an_epoch_is_the_mean_of_its_steps_losses(monkeypatch, tiny_enc, regime,
                                                                 capsys):
    losses = []

    def cross_entropy(logits, y):  # the loss fine_tune steps on, as it computes it
        loss = torch.nn.functional.cross_entropy(logits, y)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(ner_eval, "F", Namespace(cross_entropy=cross_entropy))
    res, _, _, _ = fine_tune_spied(monkeypatch, tiny_enc, regime, [0.2, 0.6], 2)
    # 10 sentences in batches of 4: 3 steps an epoch
    assert len(losses) == 6 and len(set(losses)) == 6
    for epoch, step_losses in zip(res["epochs"], (losses[:3], losses[3:])):
        assert epoch["train_loss"] == pytest.approx(sum(step_losses) / 3, rel=1e-12)
    out = capsys.readouterr().out
    assert f"ner epoch 2/2: train loss {sum(losses[3:]) / 3:.4f}, dev F1 60.0 (" in out
