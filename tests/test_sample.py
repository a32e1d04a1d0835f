"""sample.py on a tiny checkpoint trained on the synthetic topic corpus of test_meta_train."""
import json

import pytest
import torch

import common
import sample
from conftest import make_tiny_encoding
from model import Llama, ModelArgs
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


# Without training: a tiny checkpoint and generate() watched (issue 26)

def test_val_loss_at_the_checkpoints_step(tmp_path):
    rows = [{"step": 10, "val_loss": None}, {"step": 10, "val_loss": 5.5},
            {"step": 20, "val_loss": 4.25}, {"step": 30, "val_loss": None}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sample.val_loss_at(str(tmp_path), 10) == 5.5  # the eval line, not the train line
    assert sample.val_loss_at(str(tmp_path), 20) == 4.25
    assert sample.val_loss_at(str(tmp_path), 30) is None and sample.val_loss_at(str(tmp_path), 11) \
        is None
    assert sample.val_loss_at(str(tmp_path / "nowhere"), 10) is None


def test_arguments_reach_generate_and_masked_ids_are_dropped(tmp_path, monkeypatch, capsys):
    enc = make_tiny_encoding(TARGETS + CUES)
    model = Llama(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=384,
                            max_seq_len=16))
    torch.save({"model_args": vars(model.args), "model": model.state_dict(), "tokenizer": "tiny",
                "step": 5}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(common, "get_encoding", lambda name: enc)
    calls = []
    cat, dog = enc.encode_single_token(" cat"), enc.encode_single_token(" dog")

    def generate(self, idx, n, temperature, top_k):
        calls.append((idx.tolist(), n, temperature, top_k))
        # ids past the tokenizer's vocabulary ([MASK], padding) in the continuation
        new = torch.tensor([[dog, enc.n_vocab, cat, 383]] * idx.shape[0])[:, :n]
        return torch.cat([idx, new], 1)

    monkeypatch.setattr(Llama, "generate", generate)
    sample.main([str(tmp_path), "--prompt", " cat", "--tokens", "4", "--num_samples", "2",
                 "--temperature", "0.5", "--top_k", "7"])
    out = capsys.readouterr().out
    assert out == f"{tmp_path / 'ckpt.pt'}: step 5, val loss not logged\n" + \
        "---\n cat dog cat\n" * 2
    assert calls == [([[cat], [cat]], 4, 0.5, 7)]
    sample.main([str(tmp_path), "--prompt", "", "--tokens", "1", "--top_k", "0"])
    # an empty prompt starts from <|endoftext|>; top_k 0 is the whole vocabulary
    assert calls[-1] == ([[enc.eot_token]] * 2, 1, 0.8, None)
    for bad in (["--tokens", "0"], ["--num_samples", "0"], ["--temperature", "0"],
                ["--top_k", "-1"]):
        with pytest.raises(SystemExit) as e:
            sample.main([str(tmp_path)] + bad)
        assert str(e.value.code).startswith(f"sample.py: error: {bad[0]} must be"), bad
    for ok in (["--tokens", "1"], ["--num_samples", "1"], ["--top_k", "0"]):
        sample.main([str(tmp_path)] + ok)  # each at its smallest allowed value


def test_defaults(tmp_path, monkeypatch, capsys):
    enc = make_tiny_encoding()
    model = Llama(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=320,
                            max_seq_len=16))
    torch.save({"model_args": vars(model.args), "model": model.state_dict(), "tokenizer": "tiny",
                "step": 5}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(common, "get_encoding", lambda name: enc)
    calls = []
    monkeypatch.setattr(Llama, "generate", lambda self, idx, n, temperature, top_k: calls.append(
        (idx.tolist(), n, temperature, top_k)) or idx)
    sample.main([str(tmp_path / "ckpt.pt")])
    nl = enc.encode_ordinary("\n")
    # a new line as the prompt, 2 samples of 60 tokens at temperature 0.8 from the top 50, seed 42
    assert calls == [([nl, nl], 60, 0.8, 50)] and torch.initial_seed() == 42
