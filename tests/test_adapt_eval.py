"""adapt_eval.py on tiny checkpoints trained on the synthetic topic corpus of test_meta_train."""
import copy
import json
import math
import struct
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import adapt_eval
import common
import meta_train
from conftest import make_tiny_encoding, write_data_dir
from model import Llama, ModelArgs
from test_meta_train import CUES, TARGETS, data_dir, run  # noqa: F401 (data_dir: a fixture)


@pytest.fixture(scope="module")
def ckpt(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(data_dir, out, "--meta_ratio=0.0", "--max_steps=30", "--eval_interval=30",
        "--save_interval=30", "--meta_seq_len=8")
    return str(out / "ckpt.pt")


def test_adaptation_curves_and_paired_table(ckpt, tmp_path, capsys):
    out = tmp_path / "adapt.json"
    # the same checkpoint twice: every paired difference must be exactly zero
    adapt_eval.main([ckpt, ckpt, "--ks", "1", "3", "--steps", "0", "2", "6", "--docs", "6",
                     "--inner_optimizer=adamw", "--inner_lr=0.01", "--out", str(out)])
    res = json.loads(out.read_text())
    assert (res["ks"], res["steps"]) == ([1, 3], [0, 2, 6])
    assert (res["documents"], res["chunk_len"]) == (6, 8)
    assert res["inner"]["inner_optimizer"] == "adamw" and res["inner"]["inner_lr"] == 0.01
    (a, ra), (b, rb) = res["runs"].items()
    assert ra["curves"] == rb["curves"]  # weights restored after every run: nothing leaks
    curves = ra["curves"]
    assert curves["1"]["0"] == curves["3"]["0"]  # no steps: k cannot matter
    mean = lambda v: sum(v) / len(v)
    # each document is about one topic: fine-tuning on its chunks lowers the loss of the next
    assert mean(curves["3"]["6"]) < mean(curves["3"]["0"]) - 0.05
    text = capsys.readouterr().out
    assert "k=1" in text and "minus" in text and "+0.0000 +-0.0000" in text
    png = (tmp_path / "adapt.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 400)


def test_text_input_and_errors(ckpt, tmp_path, monkeypatch):
    enc = make_tiny_encoding(TARGETS + CUES)  # the run's tokenizer, which tiktoken cannot name
    monkeypatch.setattr(common, "get_encoding", lambda name: enc)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["cat", "dog"] * 200) + "\n\nshort doc\n")
    out = tmp_path / "a.json"
    adapt_eval.main([ckpt, "--text", str(text), "--ks", "2", "--steps", "0", "1", "--docs", "4",
                     "--out", str(out)])
    assert json.loads(out.read_text())["documents"] == 1  # only the long document fits
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        adapt_eval.main([str(text), "--docs", "1"])
    with pytest.raises(SystemExit, match="has 61 x 8 \\+ 1 tokens"):  # 400 tokens < 489
        adapt_eval.main([ckpt, "--text", str(text), "--ks", "60", "--docs", "1"])


def test_checkpoint_alone_equals_it_after_another(ckpt, tmp_path):
    # issue 28: B's curves do not depend on A running before it in the same process
    other = torch.load(ckpt, weights_only=False)
    g = torch.Generator().manual_seed(0)
    other["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=g)
                      for k, v in other["model"].items()}
    a = str(tmp_path / "a.pt")
    torch.save(other, a)
    flags = ["--ks", "1", "2", "--steps", "0", "3", "--docs", "3", "--inner_optimizer=adamw",
             "--inner_lr=0.01"]
    runs = []
    for argv, out in (([ckpt], "b.json"), ([a, ckpt], "ab.json")):
        torch.manual_seed(0)
        adapt_eval.main(argv + flags + ["--out", str(tmp_path / out)])
        runs.append(json.loads((tmp_path / out).read_text())["runs"])
    (b_alone,), (a_first, b_after) = runs[0].values(), runs[1].values()
    assert b_alone["curves"] == b_after["curves"]
    assert a_first["curves"] != b_after["curves"]


# Contracts on irregular data (issue 26)

def test_support_set_differs_for_every_k_and_the_query_does_not(monkeypatch):
    # chunks of distinct token ids: every lm_loss call shows which chunks it was given
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                            max_seq_len=8))
    T, ks, steps = 3, [1, 2, 4], [0, 2]
    spans = torch.stack([torch.arange(5 * T + 1) + 20 * i for i in range(2)])  # k_max 4: 5 chunks
    seen, real = [], meta_train.lm_loss
    monkeypatch.setattr(meta_train, "lm_loss", lambda m, x, y: seen.append(
        (x[:, 0].tolist(), (y - x).unique().tolist())) or real(m, x, y))
    inner = {k: meta_train.DEFAULTS[k] for k in adapt_eval.INNER_KEYS}
    inner["inner_lr"] = 0.1
    env = SimpleNamespace(dev="cpu")
    out = adapt_eval.adaptation_curves(model, spans, ks, steps, inner, T, env, nullcontext())
    want = []
    for span in spans.tolist():
        chunk = lambda j: span[j * T]  # the first token of chunk j
        for k in ks:
            support = [chunk(j) for j in range(4 - k, 4)]  # the k chunks right before the query
            for s in steps:
                # s gradient steps, then the query: always chunk 4
                want += [(support, [1])] * s + [([chunk(4)], [1])]
    assert seen == want
    assert {k: set(v) for k, v in out.items()} == {k: set(steps) for k in ks}
    assert all(len(v) == len(spans) for c in out.values() for v in c.values())
    # every run starts from the checkpoint's weights: one run redone on a fresh copy agrees
    monkeypatch.setattr(meta_train, "lm_loss", real)
    fresh = copy.deepcopy(model)
    params = list(fresh.parameters())
    x, y = spans[1, :-1].view(5, T), spans[1, 1:].view(5, T)
    meta_train.adapt(params, lambda: real(fresh, x[2:4], y[2:4])[0],
                     SimpleNamespace(**inner, inner_steps=2))
    with torch.no_grad():
        assert out[2][2][1] == real(fresh, x[4:], y[4:])[0].item()
    assert out[2][2][1] != out[2][0][1] and out[2][2][1] != out[4][2][1]


def test_mean_and_standard_error_by_hand():
    m, se = adapt_eval.mean_se([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7) / 3)  # ddof 1
    assert adapt_eval.mean_se([5.0]) == (5.0, 0.0)
    assert adapt_eval.mean_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))  # two documents: an error


def test_tables_by_hand():
    curves = lambda v: {1: {0: v[0], 3: v[1]}, 2: {0: v[0], 3: v[2]}}
    results = {"A": {"curves": curves([[4.0, 5.0, 6.0], [3.0, 4.0, 8.0], [2.0, 2.0, 5.0]])},
               "B": {"curves": curves([[4.0, 5.0, 6.0], [2.0, 4.0, 6.0], [2.0, 3.0, 3.0]])}}
    lines = adapt_eval.format_tables(results, [1, 2], [0, 3]).splitlines()
    cell = lambda m, e, sign="": f"{m:>{sign}11.4f} +-{e:.4f}"
    se = lambda *v: adapt_eval.mean_se(v)[1]
    assert lines[:4] == [
        "A: query next-token loss, mean +- standard error over 3 documents",
        f"{'steps':>6}{'k=1':>18}{'k=2':>18}",
        f"{0:>6}" + cell(5, 1 / math.sqrt(3)) + cell(5, 1 / math.sqrt(3)),
        f"{3:>6}" + cell(5, se(3, 4, 8)) + cell(3, 1)]
    i = lines.index("B minus A (paired over documents; negative: B lower)")
    # paired: the mean and standard error of the per-document differences B - A
    assert lines[i + 2:i + 4] == [f"{0:>6}" + cell(0, 0, "+") + cell(0, 0, "+"),
                                  f"{3:>6}" + cell(-1, se(-1, 0, -2), "+")
                                  + cell(-1 / 3, se(0, 1, -2), "+")]
    assert "minus" not in adapt_eval.format_tables({"A": results["A"]}, [1, 2], [0, 3])


def test_val_spans_come_from_distinct_long_enough_documents(tmp_path):
    enc = make_tiny_encoding()
    eot = enc.eot_token
    # documents of one repeated token each, 13 tokens a span (3 chunks of 4, + 1): lengths with
    # their <|endoftext|> 6, 31, 13 (just enough), 41, 4, 12 (one short), 26, over two shards
    lens = [5, 30, 12, 40, 3, 11, 25]
    docs = [[10 + i] * n + [eot] for i, n in enumerate(lens)]
    d = write_data_dir(tmp_path / "d", enc, {"train": [[1, 2, eot]],
                                             "val": [sum(docs[:3], []), sum(docs[3:], [])]})
    spans = adapt_eval.spans_from_split(d, 3, 4, 10, seed=0)
    assert spans.shape == (4, 13)
    first = spans[:, 0].tolist()
    assert sorted(first) == [11, 12, 13, 16]  # every long-enough document once, no other
    for span in spans.tolist():
        assert span[:-1] == [span[0]] * 12 and span[-1] in (span[0], eot)
    two = [adapt_eval.spans_from_split(d, 3, 4, 2, seed=s)[:, 0].tolist() for s in range(6)]
    assert all(len(set(t)) == 2 for t in two) and len({tuple(sorted(t)) for t in two}) > 1


def test_defaults_and_argument_checks(ckpt, tmp_path, monkeypatch):
    seen = {}

    def curves(model, spans, ks, steps, inner, T, env, autocast):
        seen.update(ks=ks, steps=steps, docs=len(spans), inner=inner, T=T)
        return {k: {s: [1.0] * len(spans) for s in steps} for k in ks}

    monkeypatch.setattr(adapt_eval, "adaptation_curves", curves)
    spans = adapt_eval.spans_from_split
    monkeypatch.setattr(adapt_eval, "spans_from_split",
                        lambda *a: seen.update(seed=a[-1]) or spans(*a))
    adapt_eval.main([ckpt, "--chunk_len", "2", "--out", str(tmp_path / "d.json")])
    assert seen["seed"] == 0  # the val documents RESULTS.md's adaptation table was measured on
    assert (seen["ks"], seen["steps"], seen["docs"], seen["T"]) == ([1, 2, 4, 8],
                                                                    [0, 1, 2, 5, 10], 32, 2)
    # the inner loop of the checkpoint's config (test_meta_train's TINY: SGD at 0.5)
    assert seen["inner"]["inner_lr"] == 0.5 and seen["inner"]["inner_optimizer"] == "sgd"
    # a chunk as long as the model's context fits; one token more is refused, naming the file
    monkeypatch.setattr(common, "get_encoding", lambda name: make_tiny_encoding(TARGETS + CUES))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["cat", "dog"] * 100) + "\n")
    adapt_eval.main([ckpt, "--text", str(text), "--ks", "1", "--steps", "3", "--chunk_len", "32",
                     "--docs", "1",
                     "--out", str(tmp_path / "t.json")])
    assert seen["T"] == 32 and seen["docs"] == 1
    with pytest.raises(SystemExit, match="chunks of 33 tokens > its max_seq_len 32"):
        adapt_eval.main([ckpt, "--text", str(text), "--ks", "1", "--chunk_len", "33"])
    # --chunk_len 0 too: refused, not read as "not given" (the checkpoint's meta_seq_len)
    for bad in (["--ks", "0", "2"], ["--steps", "-1"], ["--docs", "0"], ["--chunk_len", "0"]):
        with pytest.raises(SystemExit) as e:
            adapt_eval.main([ckpt] + bad)
        assert str(e.value.code).startswith(f"adapt_eval.py: error: {bad[0]} must be at least"), bad


def test_val_span_starts_are_spread_over_each_document(tmp_path):
    enc = make_tiny_encoding()
    eot = enc.eot_token
    # 6 documents of 40 distinct tokens (+ <|endoftext|>): a token names its document and position.
    # A 13-token span fits at 41 - 13 + 1 = 29 starts of each, its last token the <|endoftext|> at
    # the last of them
    docs = [list(range(40 * d, 40 * d + 40)) + [eot] for d in range(6)]
    d = write_data_dir(tmp_path / "d", enc, {"train": [[1, 2, eot]],
                                              "val": [sum(docs[:4], []), sum(docs[4:], [])]})
    offsets = []
    for seed in range(20):
        for span in adapt_eval.spans_from_split(d, 3, 4, 6, seed=seed).tolist():
            doc, off = divmod(span[0], 40)
            assert span == docs[doc][off:off + 13]  # 13 consecutive tokens of one doc
            offsets.append(off)
    # 120 draws, uniform over 0..28: near the expected spread, not piled at the document start
    assert 0 <= min(offsets) and max(offsets) <= 28 and len(set(offsets)) >= 20
    assert abs(sum(offsets) / len(offsets) - 14) < 3 and offsets.count(0) < 15


def test_table_of_one_k_and_one_step_by_hand():
    lines = adapt_eval.format_tables({"A": {"curves": {4: {2: [1.0, 3.0]}}}}, [4], [2])
    assert lines.splitlines() == [
        "A: query next-token loss, mean +- standard error over 2 documents",
        f"{'steps':>6}{'k=4':>18}", f"{2:>6}{2.0:>11.4f} +-{1.0:.4f}"]


def test_boundary_values_accepted_and_the_json_beside_the_first_checkpoint(ckpt, tmp_path,
                                                                         monkeypatch, capsys):
    seen = {}

    def curves(model, spans, ks, steps, inner, T, env, autocast):
        seen.update(inner=inner, T=T, docs=len(spans))
        return {k: {s: [1.0] * len(spans) for s in steps} for k in ks}

    monkeypatch.setattr(adapt_eval, "adaptation_curves", curves)
    first = tmp_path / "first" / "ckpt.pt"
    first.parent.mkdir()
    first.write_bytes(open(ckpt, "rb").read())
    # the smallest chunk and document count, betas just below 1
    t0 = time.time()
    adapt_eval.main([str(first), ckpt, "--chunk_len", "1", "--docs", "1", "--ks", "1",
                     "--steps", "0", "--inner_beta1", "0.5", "--inner_beta2", "0.999"])
    wall = time.time() - t0
    out = capsys.readouterr().out
    for path in (first, ckpt):  # each checkpoint's line: its step and the seconds it took
        line = next(l for l in out.splitlines() if l.startswith(f"{path}: step "))
        assert 0 <= int(line.split(", ")[-1][:-len(" s")]) <= wall + 1
    json_path = tmp_path / "first" / "adapt_eval.json"
    png = tmp_path / "first" / "adapt_eval.png"
    assert f"wrote {json_path} and {png}" in out and png.stat().st_size > 0
    assert (seen["T"], seen["docs"]) == (1, 1)
    assert (seen["inner"]["inner_beta1"], seen["inner"]["inner_beta2"]) == (0.5, 0.999)
    saved = json.loads((tmp_path / "first" / "adapt_eval.json").read_text())
    assert list(saved["runs"]) == [str(first), ckpt]
    assert all(0 <= r["seconds"] <= wall for r in saved["runs"].values())
    for beta in ("--inner_beta1", "--inner_beta2"):
        with pytest.raises(SystemExit, match=f"{beta} must be below 1, got 1.0"):
            adapt_eval.main([ckpt, beta, "1.0"])


def test_checkpoints_of_two_tokenizers_are_refused_naming_both(ckpt, tmp_path):
    other = torch.load(ckpt, weights_only=False)
    other["tokenizer"] = "gpt2"
    b = str(tmp_path / "b.pt")
    torch.save(other, b)
    with pytest.raises(SystemExit) as e:
        adapt_eval.main([ckpt, b])
    assert str(e.value.code) == (
        f"adapt_eval.py: error: {b} uses tokenizer 'gpt2', {ckpt} 'tiny': their losses are not "
        f"comparable; compare checkpoints of one tokenizer")


def test_without_matplotlib_no_plot_is_claimed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    results = {"A": {"curves": {1: {0: [1.0, 2.0]}}}}
    assert adapt_eval.plot(results, [1], [0], str(tmp_path / "p.png")) is False
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_of_another_tokenizer_is_refused(ckpt, tmp_path):
    enc = make_tiny_encoding()
    d = write_data_dir(tmp_path / "d", enc, {"train": [[1, 2, enc.eot_token]],
                                             "val": [[1, 2, enc.eot_token]]})
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    with pytest.raises(SystemExit) as e:
        adapt_eval.main([ckpt, "--data_dir", d])
    assert str(e.value.code) == (
        f"adapt_eval.py: error: {d} holds 'gpt2' tokens, the checkpoints read 'tiny'; give "
        f"--data_dir of their tokenizer or --text FILES")


def test_a_document_of_exactly_the_span_length_is_used_and_one_token_less_is_not(tmp_path):
    enc = make_tiny_encoding()
    # 2 chunks of 3 tokens + 1: 7 tokens; a word of one letter repeated is one byte token a letter
    assert len(enc.encode_ordinary("c" * 7)) == 7
    text = tmp_path / "t.txt"
    text.write_text("b" * 6 + "\n\n" + "c" * 7 + "\n\n" + "d" * 10 + "\n")
    spans = adapt_eval.spans_from_text([str(text)], enc, 2, 3, 5)
    assert spans.tolist() == [enc.encode_ordinary("c" * 7), enc.encode_ordinary("d" * 7)]


def test_plot_legend_and_size(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig) or close(fig))
    results = {"A": {"curves": {1: {0: [1.0, 2.0], 3: [0.5, 1.0]}}},
               "B": {"curves": {1: {0: [1.5, 2.0], 3: [0.7, 1.0]}}}}
    assert adapt_eval.plot(results, [1], [0, 3], str(tmp_path / "p.png"))
    (fig,) = figs
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["A", "B"]
    assert {t.get_fontsize() for t in legend.get_texts()} == {8.0}  # small: run paths are long
    assert fig.axes[1].get_legend() is None and tuple(fig.get_size_inches()) == (10.0, 4.0)
