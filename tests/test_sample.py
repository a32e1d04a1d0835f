"""sample.py on a tiny checkpoint trained on the synthetic topic corpus of test_meta_train."""
import json

import pytest

import common
import sample
from conftest import make_tiny_encoding
from test_meta_train import CUES, TARGETS, data_dir, run  # noqa: F401 (data_dir: a fixture)


def test_sample_prints_step_val_loss_and_text(data_dir, tmp_path, monkeypatch, capsys):
    run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=20", "--eval_interval=10",
        "--save_interval=10")
    capsys.readouterr()
    enc = make_tiny_encoding(TARGETS + CUES)
    monkeypatch.setattr(common, "get_encoding", lambda name: enc)
    args = ["--prompt", " cat", "--tokens", "12", "--num_samples", "3", "--seed", "1"]
    sample.main([str(tmp_path)] + args)
    out = capsys.readouterr().out
    logged = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    val = next(r["val_loss"] for r in logged if r["step"] == 20 and r["val_loss"] is not None)
    assert out.splitlines()[0] == f"{tmp_path / 'ckpt.pt'}: step 20, val loss {val:.4f}"
    texts = out.split("---\n")[1:]
    assert len(texts) == 3 and all(t.startswith(" cat") for t in texts)
    sample.main([str(tmp_path / "ckpt_000010.pt")] + args)  # an earlier one, its own val loss
    again = capsys.readouterr().out
    assert "step 10, val loss" in again and again.split("---\n")[1:] != texts
    sample.main([str(tmp_path)] + args)
    assert capsys.readouterr().out == out  # seeded: the same text again
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        sample.main([str(tmp_path / "log.jsonl")])
