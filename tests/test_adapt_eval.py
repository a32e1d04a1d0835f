"""adapt_eval.py on tiny checkpoints trained on the synthetic topic corpus of test_meta_train."""
import json

import pytest
import torch

import adapt_eval
import common
from conftest import make_tiny_encoding
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
    assert (tmp_path / "adapt.png").exists()


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
