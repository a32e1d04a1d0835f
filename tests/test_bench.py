"""bench.py: its timing helper, its table on a tiny model without data, and the Hugging Face peer
(only where transformers is installed; it is an optional extra)."""
import copy
import io
import json
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


# The measurements' arithmetic, with the clock replaced by known times (issue 26)

def test_rows_follow_from_the_times(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    times = {"ar": 4.0, "head": 12.0, "all": 40.0}
    monkeypatch.setattr(bench, "median_ms", lambda steps, reps, warmup, sync=None: {
        k: times[k] for k in steps})
    monkeypatch.setattr(bench, "matmul_peak", lambda dev, dtype, n, reps, warmup: 2e9)
    mem = iter([3 * 2 ** 20, 5 * 2 ** 20, 7 * 2 ** 20])
    monkeypatch.setattr(bench, "peak_memory", lambda fn, dev, setup=None: next(mem))
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (1.5, 9.0, 9.0))
    cfg = tiny_cfg(tmp_path)
    facts, rows = bench.run(cfg, reps=3, warmup=0, compile=False, peak_n=64, text=())
    assert facts["load"] == "1.50 (1-minute load average at the start)"
    assert facts["peak_flop_s"] == 2e9
    assert facts["mfu_basis"] == "the matmul row, measured in this run"
    c = meta_train.SimpleNamespace(**cfg)
    model = Llama(common.model_args(c))
    ar_tokens = 2 * 8  # batch_size x seq_len
    ar_flops = ar_tokens * model.flops_per_token(8)
    by = {r["name"].split(" (")[0].split(",")[0]: r for r in rows}
    mm = next(r for r in rows if r["name"].startswith("matmul 64^3 float32 (fastest of 3)"))
    assert mm["flop_s"] == 2e9 and mm["mfu"] == 1.0
    ar = by["AR micro-step 2x8"]
    assert (ar["ms"], ar["rate"], ar["mem_bytes"]) == (4.0, ar_tokens / 4.0 * 1000, 3 * 2 ** 20)
    assert ar["flop_s"] == pytest.approx(ar_flops / 4e-3)
    assert ar["mfu"] == pytest.approx(ar_flops / 4e-3 / 2e9) and ar["met"] == (ar["mfu"] >= 0.3)
    for mode, ms, mib in (("head", 12.0, 5), ("all", 40.0, 7)):
        cm = meta_train.SimpleNamespace(**{**cfg, "meta_task": "smlmt", "inner_params": mode})
        tokens, flops = meta_train.episode_tokens_and_flops(model, cm)
        row = next(r for r in rows if f", {mode}," in r["name"])
        assert row["name"] == f"episode 2-way 1+1 x8, {mode}, 2 inner"
        assert (row["ms"], row["mem_bytes"]) == (ms, mib * 2 ** 20)
        assert row["rate"] == pytest.approx(tokens / ms * 1000)
        assert row["flop_s"] == pytest.approx(flops / ms * 1000)
        # per token against an AR token: (ms / episode tokens) / (AR ms / AR tokens)
        assert row["ratio"] == pytest.approx(ms / tokens / (4.0 / ar_tokens))
        assert row["met"] == ((row["ratio"] <= 1.5) if mode == "head" else None)
    assert tokens == 2 * (1 + 1) * 8  # n_way x (k_shot + q_query) windows of meta_seq_len
    # a row's note is a numbered footnote; the episode note gives the output layer's share
    for start, note in (("peer: skipped", "transformers not installed"),
                        ("SMLMT episode sampling: skipped", f"no {cfg['data_dir']}")):
        name = next(r["name"] for r in rows if r["name"].startswith(start))
        assert facts["notes"][int(name.rsplit("[", 1)[1][:-1]) - 1].startswith(note), name
    share = 6 * 64 * 16 / model.flops_per_token(8)
    assert f"an episode reads 32 tokens (support + query windows); it never projects to the " \
           f"vocabulary, which is {share:.0%} of an AR token's FLOPs" in facts["notes"]
    table = bench.format_table(facts, rows).splitlines()
    assert table[-len(facts["notes"]):] == [f"[{i}] {n}" for i, n in enumerate(facts["notes"], 1)]
    line = next(l for l in table if l.startswith("AR micro-step"))
    assert f"{ar_tokens / 4.0 * 1000:,.0f} tok/s" in line and f"{ar['mfu']:.1%}" in line
    assert " 3 " in line and "| 4.0 " in line


def test_matmul_peak_is_the_fastest_run(monkeypatch):
    calls = iter([5.0, 2.0, 3.0])
    warm = []
    monkeypatch.setattr(bench, "median_ms", lambda steps, reps, warmup, sync=None: (
        warm.append(warmup), {"mm": next(calls)})[1])
    flop_s = bench.matmul_peak(torch.device("cpu"), torch.float32, 8, reps=3, warmup=2)
    assert flop_s == 2 * 8 ** 3 / 0.002 and warm == [2, 0, 0]  # warm-up before the first only


def test_peak_memory_sees_a_step_allocate(monkeypatch):
    keep = []
    grow = bench.peak_memory(lambda: keep.append(torch.ones(16 * 2 ** 20)), torch.device("cpu"))
    if grow is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 * 2 ** 20 < grow < 200 * 2 ** 20  # 64 MiB of floats, and little else
    keep.clear()
    setup = bench.peak_memory(lambda: None, torch.device("cpu"), setup=lambda: keep.append(
        torch.ones(16 * 2 ** 20)))
    assert setup < 16 * 2 ** 20  # what setup allocates is not the step's


def test_sampler_and_tokenizer_counts(ds, tiny_enc, tmp_path):
    s = bench.bench_sampler(ds, n_way=3, k_shot=2, q_query=1, seq_len=8, n_episodes=5)
    assert s["windows_per_episode"] == 3 * (2 + 1) and type(s["windows_per_episode"]) is int
    assert s["windows_s"] == pytest.approx(9 * s["episodes_s"])
    docs = ["the cat and the dog", "river stone, apple!", "green tree 42"] * 20
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(docs) + "\n")
    tok = bench.bench_tokenize([str(path)], tiny_enc, num_proc=1, repeats=1, batch_chars=64)
    assert tok["tokens"] == sum(len(tiny_enc.encode_ordinary(d)) for d in docs)
    assert tok["ratio_vs_raw_processes"] == tok["pipeline_tok_s"] / tok["raw_processes_tok_s"]
    assert tok["num_proc"] == 1 and min(tok["raw_threads_tok_s"], tok["pipeline_tok_s"]) > 0


def test_data_rows_and_their_targets(ds, tiny_enc, tmp_path, monkeypatch):
    seen = []

    def tokenize(paths, enc, num_proc, repeats=3):
        seen.append((paths, enc, num_proc, repeats))
        return {"tokens": 1234, "raw_processes_tok_s": 1000.0, "pipeline_tok_s": 790.0,
                "ratio_vs_raw_processes": 0.79}

    monkeypatch.setattr(bench, "bench_tokenize", tokenize)
    monkeypatch.setattr(bench.common, "get_encoding", lambda name: tiny_enc)
    monkeypatch.setattr(bench, "bench_sampler", lambda *a: {
        "windows_s": 20000.0, "windows_per_episode": 16})
    text = tmp_path / "t.txt"
    text.write_text("the cat\n")
    c = meta_train.SimpleNamespace(data_dir=ds, n_way=2, k_shot=4, q_query=4, meta_seq_len=8)
    rows = bench.data_rows(c, [str(text), str(tmp_path / "missing.txt")], 3)
    assert seen == [([str(text)], tiny_enc, 3, 3)]  # the files that exist, best of 3
    raw, pipe, smp = rows
    assert (raw["name"], raw["rate"]) == ("raw tiktoken, 3 processes", 1000.0)
    assert (pipe["rate"], pipe["ratio"], pipe["met"]) == (790.0, 0.79, False)  # 0.8 of raw
    assert pipe["note"] == "1,234 tokens of t.txt; best of 3, as bench_tokenize measures"
    assert smp["name"] == "SMLMT episode sampling (16 windows)" and smp["met"] is True
    monkeypatch.setattr(bench, "bench_sampler", lambda *a: {
        "windows_s": 19999.0, "windows_per_episode": 16})
    assert bench.data_rows(c, [], 1)[-1]["met"] is False  # just under the target
    rows = bench.data_rows(c, [str(tmp_path / "missing.txt")], 1)
    assert rows[0] == {"name": "tokenization: skipped",
                       "note": f"no --text file found ({tmp_path / 'missing.txt'})"}


def test_cli_defaults_and_datasheet_basis(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "run", lambda cfg, *a: seen.append((cfg, a)) or (
        {"notes": [], "device": "d"}, []))
    bench.main([f"--data_dir={tmp_path}", "--no_compile", "--n_way=3"])
    cfg, (reps, warmup, compile, peak_n, text, num_proc) = seen[0]
    assert (reps, warmup, compile, peak_n, text) == (10, 2, False, None, [])
    assert (cfg["n_way"], cfg["dim"], cfg["device"]) == (3, 64, "auto")  # configs/cpu.py + flag
    assert num_proc == common.n_cpus()
    # a GPU in the datasheet table: MFU against its bf16 peak (bf16 autocast on the CPU here)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(bench, "peak_flops", lambda dev: 989e12)
    facts, rows = bench.run({**tiny_cfg(tmp_path), "dtype": "bfloat16"}, reps=1, warmup=0,
                            compile=False, peak_n=32, text=())
    assert facts["peak_flop_s"] == 989e12
    assert facts["mfu_basis"] == "datasheet bf16 peak, 989 TFLOP/s"
    ar = next(r for r in rows if r["name"].startswith("AR micro-step"))
    assert ar["mfu"] == pytest.approx(ar["flop_s"] / 989e12) and ar["met"] is None


def test_median_ms_against_a_known_clock(monkeypatch):
    # a clock that only the steps move: a takes 3, 1, 2 ms after a 7 ms warm-up, b 0.5 ms; a's
    # setup takes a second, which is not a's time
    clock = [100.0]
    durations = iter([7e-3, 3e-3, 1e-3, 2e-3])

    def tick(s):
        clock[0] += s

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    ms = bench.median_ms({"a": (lambda: tick(1.0), lambda: tick(next(durations))),
                          "b": (None, lambda: tick(5e-4))}, reps=3, warmup=1)
    assert ms == {"a": pytest.approx(2.0, rel=1e-9), "b": pytest.approx(0.5, rel=1e-9)}


def test_matmul_peak_times_the_matrix_product(monkeypatch):
    made, products = [], []
    real_randn = torch.randn
    monkeypatch.setattr(bench.torch, "randn", lambda *a, **kw: made.append(
        real_randn(*a, **kw)) or made[-1])
    monkeypatch.setattr(bench, "median_ms", lambda steps, reps, warmup, sync=None: (
        products.append(steps["mm"][1]()), {"mm": 4.0})[1])
    assert bench.matmul_peak(torch.device("cpu"), torch.float64, 5, reps=2, warmup=1) == \
        2 * 5 ** 3 / 4e-3
    a, b = made
    ref = [[sum(a[i, k].item() * b[k, j].item() for k in range(5)) for j in range(5)]
           for i in range(5)]  # row times column, by loops
    assert len(products) == 2
    for p in products:
        assert p.shape == (5, 5) and torch.allclose(p, torch.tensor(ref, dtype=torch.float64))


def test_json_goes_into_an_existing_or_a_new_folder(tmp_path, monkeypatch):
    row = {**dict.fromkeys(ROW_KEYS), "name": "r", "ms": 1.5, "ratio_of": "", "target": ""}
    monkeypatch.setattr(bench, "run", lambda cfg, *a: ({"notes": [], "device": "d"}, [row]))
    for path in (tmp_path / "b.json", tmp_path / "new" / "deeper" / "b.json"):
        bench.main([f"--data_dir={tmp_path}", "--no_compile", f"--json={path}"])
        saved = json.loads(path.read_text())
        assert saved["rows"] == [row] and saved["facts"]["device"] == "d"


def test_cpu_name_comes_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(bench, "median_ms", lambda steps, reps, warmup, sync=None: {
        k: 1.0 for k in steps})
    monkeypatch.setattr(bench, "matmul_peak", lambda dev, dtype, n, reps, warmup: 1e9)
    monkeypatch.setattr(bench, "peak_memory", lambda fn, dev, setup=None: None)
    cpuinfo = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
               "model\t\t: 85\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nstepping\t: 7\n\n"
               "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n")
    real_open, real_exists = open, os.path.exists
    monkeypatch.setattr(bench, "open", lambda path, *a, **kw: io.StringIO(cpuinfo)
                        if path == "/proc/cpuinfo" else real_open(path, *a, **kw), raising=False)
    monkeypatch.setattr(bench.os.path, "exists", lambda p: p == "/proc/cpuinfo" or real_exists(p))
    facts, _ = bench.run(tiny_cfg(tmp_path), reps=1, warmup=0, compile=False, peak_n=8, text=())
    assert facts["device"] == "CPU: Intel(R) Xeon(R) CPU @ 2.20GHz"


def test_peak_memory_on_cpu_reads_kilobytes_from_proc_status(monkeypatch):
    # VmRSS before the step 1000 kB, VmHWM after it 5096 kB: the step needed 4096 kB (4 MiB)
    status = iter(["Name:\tpython\nVmHWM:\t 999 kB\nVmRSS:\t    1000 kB\n",
                   "Name:\tpython\nVmHWM:\t    5096 kB\nVmRSS:\t 1200 kB\n"])
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/self/status":
            return io.StringIO(next(status))
        if path == "/proc/self/clear_refs":
            return io.StringIO()
        return real_open(path, *a, **kw)

    monkeypatch.setattr(bench, "open", fake_open, raising=False)
    assert bench.peak_memory(lambda: None, torch.device("cpu")) == 4 * 2 ** 20


def test_random_episode_has_a_real_episodes_shapes_and_dtypes(ds):
    import dataclasses

    import data
    import numpy as np
    c = meta_train.SimpleNamespace(n_way=3, k_shot=2, q_query=2, meta_seq_len=8, vocab_size=64)
    real = data.SMLMTSampler(ds, 3, 2, 2, 8).sample(np.random.default_rng(0))
    fake = bench.random_episode(c)
    for f in dataclasses.fields(data.Episode):
        r, b = getattr(real, f.name), getattr(fake, f.name)
        if r is None:
            assert b is None, f.name
        else:
            assert (b.shape, b.dtype) == (r.shape, r.dtype), f.name


def test_tokenize_rates_against_a_known_clock(tiny_enc, tmp_path, monkeypatch):
    # bench's clock moves 100 s between any two readings: every measurement takes 100 s, so the
    # rates are below 1 token/s
    clock = [0.0]

    def now():
        clock[0] += 100.0
        return clock[0]

    monkeypatch.setattr(bench, "time", meta_train.SimpleNamespace(time=now,
                                                                  perf_counter=time.perf_counter))
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(["the cat and the dog", "green tree 42"] * 5) + "\n")
    tok = bench.bench_tokenize([str(path)], tiny_enc, num_proc=1, repeats=2, batch_chars=16)
    n = tok["tokens"]
    assert n == 5 * sum(len(tiny_enc.encode_ordinary(d)) for d in ["the cat and the dog",
                                                                   "green tree 42"])
    assert n < 100
    assert tok["raw_processes_tok_s"] == tok["raw_threads_tok_s"] == tok["pipeline_tok_s"] == n / 100
    assert tok["ratio_vs_raw_processes"] == 1.0


class FakePeer(torch.nn.Module):
    """Stands in for transformers' LlamaForCausalLM: our model behind its call signature (HF
    shifts the labels inside)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, labels=None):
        logits = self.m(input_ids)[0]
        loss = None if labels is None else torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return meta_train.SimpleNamespace(logits=logits, loss=loss)


@pytest.mark.parametrize("mfu, met, peer_ms", [(0.45, True, 4.0), (0.2998, False, 6.0)])
def test_compiled_and_peer_rows_and_the_first_call_note(tmp_path, monkeypatch, mfu, met,
                                                        peer_ms):
    # torch.compile replaced by the identity and the peer by our own model behind HF's call: what
    # is checked is the bookkeeping around them
    monkeypatch.setattr(bench, "hf_peer", lambda model: (FakePeer(copy.deepcopy(model)), "fake"))
    monkeypatch.setattr(bench.torch, "compile", lambda m, **kw: m)
    times = {"ar": 4.0, "head": 12.0, "all": 40.0, "peer": peer_ms, "ar_c": 2.5, "peer_c": 3.5}
    monkeypatch.setattr(bench, "median_ms", lambda steps, reps, warmup, sync=None: {
        k: times[k] for k in steps})
    cfg = tiny_cfg(tmp_path)
    ar_flops = 2 * 8 * Llama(common.model_args(meta_train.SimpleNamespace(**cfg))).flops_per_token(8)
    # a peak that puts the eager AR step at this MFU, against the 30% target
    monkeypatch.setattr(bench, "matmul_peak", lambda dev, dtype, n, reps, warmup: (
        ar_flops / 4e-3 / mfu))
    monkeypatch.setattr(bench, "peak_memory", lambda fn, dev, setup=None: None)
    facts, rows = bench.run(cfg, reps=1, warmup=0, compile=True, peak_n=8, text=())
    by = {r["name"]: r for r in rows}
    ar = next(r for r in rows if r["name"].startswith("AR micro-step 2x8"))
    assert ar["mfu"] == pytest.approx(mfu) and ar["met"] is met
    c = by["AR micro-step (ours, compiled)"]
    assert c["ms"] == 2.5 and c["ratio"] == 4.0 / 2.5 and c["ratio_of"] == "eager/compiled"
    # the peer computes our function: a logit difference of 0; as fast as ours (4 ms) or slower
    # meets 'ours >= peer'
    assert facts["peer"] == "fake, sdpa attention, our weights (largest logit difference 0.0e+00)"
    peer = by["peer: HF LlamaForCausalLM, eager"]
    assert (peer["ms"], peer["ratio"], peer["met"]) == (peer_ms, peer_ms / 4.0, True)
    peer_c = by["peer: HF LlamaForCausalLM, compiled"]
    assert (peer_c["ratio"], peer_c["met"]) == (3.5 / 2.5, True)
    # the first (compiling) calls of a tiny model take well under a second
    assert "first call, compiling: ours 0 s, peer 0 s (less with a warm inductor cache)" in \
        facts["notes"]


def test_warmup_0_is_allowed(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run", lambda cfg, *a: seen.append(a) or ({"notes": []}, []))
    bench.main([f"--data_dir={tmp_path}", "--no_compile", "--warmup=0", "--reps=1"])
    assert seen[0][:2] == (1, 0)


def test_table_columns_by_hand():
    row = {**dict.fromkeys(ROW_KEYS), "name": "x", "ms": 2.25, "rate": 1234.5, "unit": "tok/s",
           "flop_s": 2.5e9, "mfu": 0.123, "mem_bytes": 3.75 * 2 ** 20, "ratio_of": "",
           "target": ""}
    facts = {"notes": []}
    line = bench.format_table(facts, [row]).splitlines()[-1]
    assert [c.strip() for c in line.split("|")][:6] == ["x", "2.2", "1,234 tok/s", "2.50",
                                                         "12.3%", "4"]
    line = bench.format_table(facts, [{**row, "flop_s": 2.5e12}], tera=True).splitlines()[-1]
    assert [c.strip() for c in line.split("|")][3] == "2.50"


def test_random_episode_draws_every_token_id_and_distinct_words():
    # a vocabulary of 3 and 4 x (4 + 4) windows of 16 tokens: each id appears (a draw that
    # leaves out id 0 would miss it with probability < 1e-40), labels class-major
    c = meta_train.SimpleNamespace(n_way=4, k_shot=4, q_query=4, meta_seq_len=16, vocab_size=3)
    ep = bench.random_episode(c)
    for x in (ep.support_x, ep.query_x):
        assert set(x.flatten().tolist()) == {0, 1, 2}
    assert ep.support_y.tolist() == [i for i in range(4) for _ in range(4)] == ep.query_y.tolist()
    c.vocab_size = 4
    words = bench.random_episode(c).word_ids.tolist()
    assert sorted(words) == [0, 1, 2, 3]


@pytest.mark.parametrize("dev, given, n", [("cuda", None, 8192), ("cpu", None, 2048),
                                           ("cuda", 96, 96), ("cpu", 96, 96)])
def test_the_peak_matmul_size_of_each_device(tmp_path, monkeypatch, dev, given, n):
    # 8192^3 keeps a GPU's tensor cores busy; 2048^3 takes a CPU about a second
    class Stop(Exception):
        pass

    seen = []

    def matmul_peak(device, dtype, size, reps, warmup):
        seen.append((device.type, size))
        raise Stop

    monkeypatch.setattr(bench, "data_rows", lambda c, text, num_proc: [])
    monkeypatch.setattr(common, "init_device", lambda device: meta_train.SimpleNamespace(dev=dev))
    monkeypatch.setattr(common, "autocast", lambda dtype, kind: (None, kind == "cuda"))
    monkeypatch.setattr(bench, "matmul_peak", matmul_peak)
    with pytest.raises(Stop):
        bench.run(tiny_cfg(tmp_path), peak_n=given)
    assert seen == [(dev, n)]


def test_tokenize_keeps_the_best_of_3_by_default(tiny_enc, tmp_path, monkeypatch):
    # data_rows' note says "best of 3, as bench_tokenize measures"
    runs = []
    write = bench.prepare.write_shards
    monkeypatch.setattr(bench.prepare, "write_shards", lambda *a, **kw: runs.append(1) or write(
        *a, **kw))
    path = tmp_path / "t.txt"
    path.write_text("the cat and the dog\n\ngreen tree 42\n")
    tok = bench.bench_tokenize([str(path)], tiny_enc, num_proc=1)
    assert len(runs) == 3 and tok["tokens"] == sum(len(tiny_enc.encode_ordinary(d)) for d in [
        "the cat and the dog", "green tree 42"])
