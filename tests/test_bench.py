"""bench.py: its timing helper, its table on a tiny model without data, and the Hugging Face peer
(only where transformers is installed; it is an optional extra)."""
import os
import subprocess
import sys
import time

import pytest
import torch

import bench
import common
import meta_train
from model import Llama, ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"name", "ms", "rate", "unit", "flop_s", "mfu", "mem_bytes", "ratio", "ratio_of",
            "target", "met"}


def tiny_cfg(tmp_path):
    return common.configure(meta_train.DEFAULTS, [
        "--dim=16", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--vocab_size=64",
        "--seq_len=8", "--batch_size=2", "--n_way=2", "--k_shot=1", "--q_query=1",
        "--meta_seq_len=8", "--inner_steps=2", "--meta_hidden=8", "--device=cpu",
        f"--data_dir={tmp_path / 'absent'}"])


def test_median_ms_interleaves_steps_after_warmup():
    calls = []
    ms = bench.median_ms({"a": (lambda: calls.append("setup a"),
                                lambda: (calls.append("a"), time.sleep(0.002))),
                          "b": (None, lambda: calls.append("b"))}, reps=3, warmup=2)
    # warm-up and timed runs take turns, in an order that reverses every rep
    assert calls == ["setup a", "a", "b", "b", "setup a", "a"] * 2 + ["setup a", "a", "b"]
    assert set(ms) == {"a", "b"} and 2.0 <= ms["a"] < 1000 and ms["b"] < ms["a"]


def test_help_runs():
    out = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--reps" in out.stdout and "--no_compile" in out.stdout
    out = subprocess.run([sys.executable, "bench.py", "--reps=0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--reps must be at least 1" in out.stderr


def test_a_bad_data_dir_is_a_one_line_error(tmp_path):
    # a data dir that is not there is a skipped row; one that is there but unreadable stops the
    # run naming the file, without a traceback
    with pytest.raises(SystemExit, match=r"bench.py: error: .*meta.json does not exist"):
        bench.main([f"--data_dir={tmp_path}", "--reps=1", "--no_compile"])


@pytest.mark.parametrize("with_peer", [False, True])
def test_tiny_run_table(tmp_path, monkeypatch, with_peer):
    if with_peer:
        pytest.importorskip("transformers")
    else:
        monkeypatch.setitem(sys.modules, "transformers", None)  # import fails, as when absent
    facts, rows = bench.run(tiny_cfg(tmp_path), reps=1, warmup=0, compile=False, peak_n=64,
                            text=())
    assert all(set(r) == ROW_KEYS for r in rows)
    names = [r["name"] for r in rows]
    for part in ["matmul", "AR micro-step", ", head,", ", all,", "peer", "sampling: skipped"]:
        assert any(part in n for n in names), (part, names)
    ar = next(r for r in rows if r["name"].startswith("AR micro-step"))
    assert ar["ms"] > 0 and ar["rate"] > 0 and 0 < ar["mfu"] and ar["met"] in (True, False)
    head = next(r for r in rows if ", head," in r["name"])
    assert head["ratio"] > 0 and head["met"] in (True, False)
    peer = next(r for r in rows if r["name"].startswith("peer"))
    assert ("skipped" in peer["name"]) != with_peer
    assert any("random tokens" in n for n in facts["notes"])
    table = bench.format_table(facts, rows)
    assert "AR micro-step" in table and "MFU" in table


def test_peer_computes_our_function():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                            max_seq_len=16))
    peer, _ = bench.hf_peer(model)
    x = torch.randint(0, 64, (2, 16))
    assert sum(p.numel() for p in peer.parameters()) == model.num_params()
    torch.testing.assert_close(peer(input_ids=x).logits, model(x)[0], atol=1e-5, rtol=1e-5)
