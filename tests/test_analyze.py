import json
import math
import os
import pickle
import struct
import subprocess
import sys
import types
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch

import analyze
from model import Llama, ModelArgs, apply_rope

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, max_seq_len=32)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(ModelArgs(**ARGS))


def with_singular_values(s, rows, cols, seed=0):
    """A rows x cols matrix U diag(s) V^T (s padded with zeros), U and V random orthonormal."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    d = torch.zeros(rows, cols, dtype=torch.float64)
    d[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return u @ d @ v.T


@pytest.mark.parametrize("k", [1, 3, 5])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    m = with_singular_values([2.5] * k, 9, 6)
    (er, per), = analyze.erank_per([m])
    assert er == pytest.approx(k, abs=1e-9)
    assert per == pytest.approx(k / 6, abs=1e-9)
    # unequal values give less than the count of non-zero values
    (er, _), = analyze.erank_per([with_singular_values([3.0, 1.0, 0.1], 9, 6)])
    assert 1 < er < 3


def test_effective_rank_of_rank_one_matrix_is_one():
    g = torch.Generator().manual_seed(0)
    m = torch.outer(torch.randn(40, generator=g), torch.randn(24, generator=g))  # float32
    (er, _), = analyze.erank_per([m])
    assert er == pytest.approx(1.0, abs=1e-5)


def test_per_of_identity_is_one_and_divides_by_the_smaller_side():
    (er, per), = analyze.erank_per([torch.eye(7)])
    assert (er, per) == (pytest.approx(7), pytest.approx(1.0))
    tall = torch.cat([torch.eye(7), torch.zeros(5, 7)])  # 12 x 7: 7 singular values
    wide = tall.T
    assert [p for _, p in analyze.erank_per([tall, wide])] == [pytest.approx(1.0)] * 2


def test_batched_svd_keeps_each_matrix_its_own_values():
    # matrices of the same (transposed) shape share one batched SVD; results must not mix up
    mats = [with_singular_values([1.0] * k, 10, 4, seed=k) for k in (1, 2, 3, 4)]
    mats[1] = mats[1].T
    assert [er for er, _ in analyze.erank_per(mats)] == pytest.approx([1, 2, 3, 4])


@pytest.mark.parametrize("t", [1, 2, 5, 64])
def test_entropy_of_uniform_row_is_log_t_and_of_one_hot_is_zero(t):
    uniform = torch.full((t,), 1.0 / t)
    assert analyze.row_entropy(uniform).item() == pytest.approx(math.log(t), abs=1e-6)
    one_hot = torch.zeros(t)
    one_hot[t // 2] = 1.0
    assert analyze.row_entropy(one_hot).item() == 0.0


def test_head_entropy_of_uniform_and_one_hot_causal_attention():
    T, H = 12, 3
    uniform = torch.ones(T, T).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(2, H, T, T)
    raw, norm = analyze.head_entropy(uniform)
    # query i sees i + 1 keys; position 0 (one key) is left out of the mean
    expected = sum(math.log(i + 1) for i in range(1, T)) / (T - 1)
    torch.testing.assert_close(raw, torch.full((H,), expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm, torch.ones(H), rtol=1e-6, atol=1e-6)
    self_only = torch.eye(T).expand(2, H, T, T)
    raw, norm = analyze.head_entropy(self_only)
    assert raw.abs().max() == 0 and norm.abs().max() == 0


def naive_attention_probs(attn, x, cos, sin):
    """softmax(q k^T / sqrt(d)) per head, causal mask, RoPE on q and k, kv head h // group."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rope((x @ attn.wq.weight.T).view(B, T, H, D), cos, sin)
    k = apply_rope((x @ attn.wk.weight.T).view(B, T, Hkv, D), cos, sin)
    probs = torch.zeros(B, H, T, T)
    for h in range(H):
        kv = h // (H // Hkv)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        probs[:, h] = torch.softmax(scores, dim=-1)
    return probs


def test_probe_pass_attention_and_gradients_match_references():
    model = tiny_model()
    idx = torch.randint(0, ARGS["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1], idx[:, 1:]
    loss, blocks, attn, weights, grads = analyze.probe_pass(model, x, y)
    T = x.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        h = model.tok_embeddings(x)
        for i, layer in enumerate(model.layers):
            ref = naive_attention_probs(layer.attention, layer.attention_norm(h), cos, sin)
            torch.testing.assert_close(attn[i], ref, rtol=1e-5, atol=1e-6)
            h = layer(h, cos, sin)
            torch.testing.assert_close(blocks[i], h.reshape(-1, ARGS["dim"]))
    # gradients: those of the plain (SDPA) forward pass's next-token loss
    ref_model = tiny_model()
    _, ref_loss = ref_model(x, y)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    for (i, name), g in grads.items():
        ref_w = ref_model.layers[i].get_submodule(analyze.MATRICES[name]).weight
        torch.testing.assert_close(weights[i, name], ref_w.detach())
        torch.testing.assert_close(g, ref_w.grad, rtol=1e-4, atol=1e-7)
    assert len(grads) == 7 * ARGS["n_layers"]


def test_paper_grads_are_those_of_the_mean_logit_without_rope():
    model = tiny_model()
    cos, sin = model.rope_cos, model.rope_sin
    idx = torch.randint(0, ARGS["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1], idx[:, 1:]
    value, blocks, attn, weights, grads = analyze.probe_pass(model, x, y, grads="paper")
    assert model.rope_cos is cos and model.rope_sin is sin  # the model's own tables are back
    L = ARGS["n_layers"]
    assert set(grads) == {(i, n) for i in range(L) for n in ("wq", "wk", "wv", "wo")}
    assert len(weights) == 7 * L  # weight metrics keep all seven
    # the reference, by hand: a model whose RoPE tables rotate nothing, d mean(logits)
    ref = tiny_model()
    ref.rope_cos, ref.rope_sin = torch.ones_like(cos), torch.zeros_like(sin)
    logits, _ = ref(x)
    logits.mean().backward()
    assert value == pytest.approx(logits.mean().item(), rel=1e-6)
    for (i, name), g in grads.items():
        ref_w = ref.layers[i].get_submodule(analyze.MATRICES[name]).weight
        torch.testing.assert_close(g, ref_w.grad, rtol=1e-4, atol=1e-9)
    # with RoPE the same quantity has other gradients: the identity is what the test pins down
    rope = tiny_model()
    rope(x)[0].mean().backward()
    assert not torch.allclose(grads[0, "wq"], rope.layers[0].attention.wq.weight.grad, rtol=1e-2)
    # the activations and attention of that same pass: no RoPE either
    T = x.shape[1]
    one, zero = torch.ones_like(cos[:T]), torch.zeros_like(sin[:T])
    with torch.no_grad():
        h = ref.tok_embeddings(x)
        for i, layer in enumerate(ref.layers):
            probs = naive_attention_probs(layer.attention, layer.attention_norm(h), one, zero)
            torch.testing.assert_close(attn[i], probs, rtol=1e-5, atol=1e-6)
            h = layer(h, one, zero)
            torch.testing.assert_close(blocks[i], h.reshape(-1, ARGS["dim"]))
    # the tables come back even when the pass fails
    with pytest.raises(RuntimeError), analyze.identity_rope(model):
        raise RuntimeError("inside")
    assert model.rope_cos is cos and model.rope_sin is sin


def test_peak_rises_then_falls_only_with_an_interior_peak_beyond_tol():
    s = [0, 10, 20, 30]
    assert analyze.peak(s, [0.5, 0.8, 0.9, 0.7], 0.01) == (20, 0.9, True)
    assert analyze.peak(s, [0.5, 0.6, 0.7, 0.8], 0.01)[2] is False  # still rising
    assert analyze.peak(s, [0.9, 0.8, 0.7, 0.6], 0.01)[2] is False  # only falling
    assert analyze.peak(s, [0.5, 0.9, 0.9, 0.895], 0.01)[2] is False  # fall within tolerance


def test_probe_windows_are_evenly_spaced_and_fixed():
    w = analyze.probe_windows(np.arange(100, dtype=np.uint16), 3, 9, "x")
    assert w.shape == (3, 10) and w.dtype == torch.int64
    assert w[:, 0].tolist() == [0, 45, 90] and w[2, -1] == 99
    with pytest.raises(ValueError, match="short.txt has 5 tokens"):
        analyze.probe_windows(np.arange(5), 2, 9, "short.txt")


def png_size(path):
    """(width, height) in pixels of a PNG file, from its IHDR chunk."""
    raw = open(path, "rb").read(24)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def write_log(run_dir, steps, loss, tokens, flops, time_s, meta_tokens_null=False):
    """A log.jsonl with a training line before every eval line, fixed keys, nulls where unused."""
    keys = ["step", "lr", "ar_loss", "meta_loss", "support_acc", "query_acc", "val_loss",
            "val_query_acc", "ar_tokens", "meta_tokens", "flops", "time", "tok_per_s", "mfu"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.jsonl", "w") as f:
        for s, l, t, fl, ti in zip(steps, loss, tokens, flops, time_s):
            s, l, t, fl, ti = int(s), float(l), float(t), float(fl), float(ti)
            rec = dict.fromkeys(keys)
            meta = None if meta_tokens_null else t / 2
            rec.update(step=s, lr=3e-4, ar_loss=l + 0.1, ar_tokens=t - (meta or 0),
                       meta_tokens=meta, flops=fl, time=ti)
            f.write(json.dumps(rec) + "\n")
            rec.update(val_loss=l)
            f.write(json.dumps(rec) + "\n")


def test_speedup_of_curves_with_a_known_ratio(tmp_path, capsys):
    steps = np.arange(0, 1001, 100)
    # A: loss falls linearly to 3.0 at step 1000. B falls 1.6x faster per step, but each step costs
    # 1.25x the FLOPs and 1.2x the time: it reaches 3.0 at step 625 = 0.625 of A's steps,
    # 0.78125 of A's FLOPs, 0.75 of A's time, 0.625 of A's tokens (same tokens per step)
    write_log(tmp_path / "a", steps, 5 - 0.002 * steps, 1000 * steps, 1e12 * steps, 0.5 * steps,
              meta_tokens_null=True)
    write_log(tmp_path / "b", steps, 5 - 0.0032 * steps, 1000 * steps, 1.25e12 * steps, 0.6 * steps)
    a, b = analyze.read_log(tmp_path / "a"), analyze.read_log(tmp_path / "b")
    assert len(a["step"]) == len(steps)  # eval lines only
    # tokens: AR plus meta tokens, a null count (a run without meta steps) counting 0
    assert a["tokens"].tolist() == (1000 * steps).tolist() == b["tokens"].tolist()
    sp = analyze.speedup(a, b)
    assert sp == pytest.approx({"step": 0.625, "tokens": 0.625, "flops": 0.78125, "time": 0.75})
    assert analyze.speedup(a, a) == pytest.approx({ax: 1.0 for ax in analyze.AXES})

    analyze.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "0.62 (1.60x)" in out and "0.78 (1.28x)" in out and "0.75 (1.33x)" in out
    assert (tmp_path / "a" / "analysis" / "compare.txt").read_text() in out
    assert png_size(tmp_path / "a" / "analysis" / "compare.png") == (1000, 700)  # 2 x 2 panels


def test_compare_shows_the_meta_val_numbers(tmp_path, capsys):
    steps = np.arange(0, 201, 100)
    write_log(tmp_path / "a", steps, 5 - 0.002 * steps, steps, steps, steps, meta_tokens_null=True)
    write_log(tmp_path / "b", steps, 5 - 0.001 * steps, steps, steps, steps)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    with open(tmp_path / "b" / "log.jsonl", "w") as f:
        for r in rows:
            if r["val_loss"] is not None:  # eval lines carry the meta numbers, the last these
                r.update(val_query_acc=0.31, val_query_acc_se=0.012, val_query_acc0=0.14,
                         val_query_acc0_se=0.01, val_centroid_acc=0.2, val_centroid_acc_se=0.011,
                         val_support_acc=0.9, val_support_acc_se=0.02)
            f.write(json.dumps(r) + "\n")
    b = analyze.read_log(tmp_path / "b")
    assert b["val_query_acc"].tolist() == [0.31] * 3 and b["val_support_acc_se"][-1] == 0.02
    assert np.isnan(analyze.read_log(tmp_path / "a")["val_query_acc"]).all()
    analyze.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith(str(tmp_path / "b"))][-1]
    assert line.split()[1:] == ["0.310", "+-0.012", "0.140", "+-0.010", "0.200", "+-0.011",
                                "0.900", "+-0.020"]
    assert not any(l.startswith(str(tmp_path / "a")) and "+-" in l for l in out.splitlines())
    assert (tmp_path / "a" / "analysis" / "compare.png").stat().st_size > 0


def test_speedup_not_reached_and_resumed_log(tmp_path, capsys):
    steps = np.arange(0, 1001, 100)
    write_log(tmp_path / "a", steps, 5 - 0.002 * steps, steps, steps, steps)
    write_log(tmp_path / "b", steps, 5 - 0.001 * steps, steps, steps, steps)  # ends at 4.0 > 3.0
    a, b = analyze.read_log(tmp_path / "a"), analyze.read_log(tmp_path / "b")
    assert analyze.speedup(a, b) == {ax: None for ax in analyze.AXES}
    analyze.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert capsys.readouterr().out.count("not reached") == 4
    # a resumed run logs some steps again; the later line wins
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 1000, "val_loss": 2.0, "ar_tokens": 1000, "meta_tokens": None,
                            "flops": 1000, "time": 1000}) + "\n")
    b = analyze.read_log(tmp_path / "b")
    assert b["val_loss"][-1] == 2.0 and len(b["step"]) == len(steps)
    # 4.1 at step 900, 2.0 at step 1000: 3.0 lies 1.1 / 2.1 of the way
    assert analyze.speedup(a, b)["step"] == pytest.approx((900 + 100 * 1.1 / 2.1) / 1000)


def test_no_checkpoints_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "empty_run"
    run.mkdir()
    torch.save({"step": 5}, run / "ckpt.pt")  # the latest-only copy is not enough
    with pytest.raises(FileNotFoundError, match="no numbered checkpoints.*empty_run"):
        analyze.list_checkpoints(str(run))
    with pytest.raises(FileNotFoundError, match="missing_run does not exist"):
        analyze.list_checkpoints(str(tmp_path / "missing_run"))
    with pytest.raises(FileNotFoundError, match="ckpt.pt is a file: pass the directory"):
        analyze.list_checkpoints(str(run / "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        analyze.main([str(run)])
    assert e.value.code.startswith("no numbered checkpoints (ckpt_NNNNNN.pt) in ")
    assert not (run / "analysis").exists()


def make_run(run_dir, steps, tokenizer="tiny", data_dir="unused"):
    run_dir.mkdir()
    for i, step in enumerate(steps):
        model = tiny_model(seed=i)
        ckpt = {"model_args": asdict(model.args), "model": model.state_dict(), "head": None,
                "tokenizer": tokenizer, "step": step, "optimizer": {},
                "config": {"data_dir": data_dir, "seq_len": 16, "batch_size": 2, "seed": 0}}
        torch.save(ckpt, run_dir / f"ckpt_{step:06d}.pt")
    torch.save(ckpt, run_dir / "ckpt.pt")


def test_end_to_end_cli_writes_csv_summary_and_plots(tmp_path, monkeypatch, tiny_enc, capsys):
    # the checkpoints name the tokenizer "tiny"; register the offline fixture under that name
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "tiny", tiny_enc)
    steps = [0, 50, 100]
    make_run(tmp_path / "run", steps)
    text = tmp_path / "probe.txt"
    text.write_text(" ".join(["the cat and the dog", "a green tree by the river"] * 20))
    analyze.main([str(tmp_path / "run"), "--probe_text", str(text), "--probe_batch", "3",
                  "--probe_len", "12"])
    out = tmp_path / "run" / "analysis"
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,layer,component,metric,value"
    L, H = ARGS["n_layers"], ARGS["n_heads"]
    per_ckpt = L * (7 * 2 * 2 + 2) + L * H * 2  # weights and grads x (erank, per), act, heads
    assert len(lines) - 1 == len(steps) * per_ckpt
    rows = [l.split(",") for l in lines[1:]]
    assert sorted({int(r[0]) for r in rows}) == steps
    assert {r[3] for r in rows} == set(analyze.METRICS)
    assert all(math.isfinite(float(r[4])) for r in rows)
    summary = (out / "summary.txt").read_text()
    assert "3 windows x 12 tokens from" in summary and "probe.txt" in summary
    assert "by more than 0.01 x the peak" in summary  # the default --tol, as --help states it
    for metric in analyze.SUMMARY_METRICS:
        assert sum(l.startswith(metric) for l in summary.splitlines()) == L
    assert summary in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{m}.png" for m in analyze.METRICS)
    assert {png_size(p) for p in out.glob("*.png")} == {(800, 300)}  # a 4 x 3 inch panel a layer
    with pytest.raises(SystemExit) as e:  # longer than the model's context: an error, no crash
        analyze.main([str(tmp_path / "run"), "--probe_text", str(text), "--probe_len", "64"])
    assert e.value.code == "--probe_len 64 > the model's max_seq_len 32; lower --probe_len"


def test_cli_paper_grads(tmp_path, monkeypatch, tiny_enc):
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "tiny", tiny_enc)
    monkeypatch.setattr(analyze, "plot_metrics", lambda rows, out: [])  # seconds, tested above
    make_run(tmp_path / "run", [0, 50])
    text = tmp_path / "probe.txt"
    text.write_text("the cat and the dog by the green tree " * 10)
    analyze.main([str(tmp_path / "run"), "--probe_text", str(text), "--probe_batch", "2",
                  "--probe_len", "8", "--grads", "paper"])
    out = tmp_path / "run" / "analysis_paper"  # beside, not over, the default analysis
    assert not (tmp_path / "run" / "analysis").exists()
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    grad = {r[2] for r in rows if r[3].startswith("grad_")}
    assert grad == {"wq", "wk", "wv", "wo"}
    assert {r[2] for r in rows if r[3].startswith("weight_")} == set(analyze.MATRICES)
    summary = (out / "summary.txt").read_text()
    assert "gradients (--grads paper): of the mean of the logits, RoPE as the identity" in summary
    assert "grad_per over wq, wk, wv, wo;" in summary


def bad_checkpoints(tmp_path, good):
    """{case: path} of files that are not usable checkpoints, made from the good one."""
    raw = good.read_bytes()
    files = {"zero-byte": b"", "truncated": raw[:len(raw) // 2], "text": b"step = 100\n",
             "foreign pickle": pickle.dumps({"weights": [1.0, 2.0]})}
    paths = {}
    for case, content in files.items():
        paths[case] = tmp_path / f"{case.replace(' ', '_')}.pt"
        paths[case].write_bytes(content)
    paths["missing keys"] = tmp_path / "missing_keys.pt"
    torch.save({"model": {}, "step": 3}, paths["missing keys"])
    return paths


CASES = ["zero-byte", "truncated", "text", "foreign pickle", "missing keys"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch, tiny_enc,
                                                              capsys, case):
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "tiny", tiny_enc)
    monkeypatch.setattr(analyze, "plot_metrics", lambda rows, out: [])
    run = tmp_path / "run"
    make_run(run, [0, 50, 100])
    bad = run / "ckpt_000050.pt"
    bad.write_bytes(bad_checkpoints(tmp_path, bad)[case].read_bytes())
    text = tmp_path / "probe.txt"
    text.write_text("the cat and the dog by the green tree " * 10)
    analyze.main([str(run), "--probe_text", str(text), "--probe_batch", "2", "--probe_len", "8"])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "Traceback" not in err
    reason = warnings[0].removeprefix("warning: skipped: ")
    if case == "missing keys":
        assert reason == (f"{bad} is not a meta_train.py checkpoint: no key 'model_args', "
                          f"'config', 'tokenizer'")
    else:
        assert reason.startswith(f"cannot read checkpoint {bad}: ")
    rows = (run / "analysis" / "metrics.csv").read_text().splitlines()[1:]
    assert sorted({int(r.split(",")[0]) for r in rows}) == [0, 100]  # the others are analysed
    summary = (run / "analysis" / "summary.txt").read_text().splitlines()
    assert summary[1:4] == ["2 checkpoints, steps 0..100",
                            "skipped 1 of 3 numbered checkpoints, which cannot be read:",
                            f"  {reason}"]


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path):
    run = tmp_path / "run"
    make_run(run, [0, 50])
    bad = bad_checkpoints(tmp_path, run / "ckpt_000000.pt")
    for step, case in ((0, "truncated"), (50, "zero-byte")):
        (run / f"ckpt_{step:06d}.pt").write_bytes(bad[case].read_bytes())
    r = subprocess.run([sys.executable, "analyze.py", str(run)], capture_output=True, text=True,
                       cwd=os.path.dirname(analyze.__file__), timeout=120)
    lines = r.stderr.splitlines()  # tqdm's progress bar writes to stderr too
    assert r.returncode == 1 and "Traceback" not in r.stderr
    warnings = [line for line in lines if line.startswith("warning: skipped: ")]
    assert len(warnings) == 2
    for line, step in zip(warnings, (0, 50)):
        assert line.startswith(f"warning: skipped: cannot read checkpoint {run}/ckpt_{step:06d}.pt")
    assert lines[-1] == f"none of the 2 numbered checkpoints in {run} can be read (the warnings " \
                        "above say why)"
    assert not (run / "analysis").exists()


def test_without_matplotlib_plots_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = [(0, 0, "wq", "weight_per", 0.5), (10, 0, "wq", "weight_per", 0.6)]
    assert analyze.plot_metrics(rows, str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []


def test_probe_from_the_runs_first_val_shard(tmp_path, monkeypatch):
    # the shard reader is data.py's; a stand-in with its two functions checks the wiring
    shards = {"d": {"val": ["d/val_000000.bin", "d/val_000001.bin"]}}
    fake = types.SimpleNamespace(list_shards=lambda data_dir, split: shards[data_dir][split],
                                 load_shard=lambda path: np.arange(1000, dtype=np.uint16)
                                 + (0 if path.endswith("0.bin") else 1))
    monkeypatch.setattr(analyze, "data", fake)
    ckpt = {"config": {"data_dir": "d", "seq_len": 16}, "model_args": {"max_seq_len": 32}}
    probe, desc = analyze.load_probe(ckpt, batch=4)
    assert probe.shape == (4, 17) and probe[0, 0] == 0 and probe[-1, -1] == 999
    assert desc == "4 windows x 16 tokens from d/val_000000.bin"
    shards["elsewhere"] = {"val": ["elsewhere/val_000000.bin"]}
    assert analyze.load_probe(ckpt, data_dir="elsewhere")[1].endswith("elsewhere/val_000000.bin")
    with pytest.raises(ValueError, match="max_seq_len 32"):
        analyze.load_probe(ckpt, seq_len=64)


# Metric values at inputs where the formula matters: at equal or single singular values, s and
# s^2 (or sum and mean, or any base of the logarithm normalised away) give the same answer.

def test_effective_rank_and_per_of_unequal_singular_values_by_hand():
    s = [3.0, 1.0, 0.5]
    p = [v / 4.5 for v in s]
    expected = math.exp(-sum(q * math.log(q) for q in p))  # 2.3215...
    (er, per), = analyze.erank_per([with_singular_values(s, 9, 6)])
    assert er == pytest.approx(expected, rel=1e-9) and per == pytest.approx(expected / 6, rel=1e-9)
    # batched over leading axes, a zero adding nothing
    er = analyze.effective_rank(torch.tensor([[3.0, 1.0, 0.5, 0.0], [1.0, 1.0, 2.0, 0.0]],
                                             dtype=torch.float64))
    q = [0.25, 0.25, 0.5]
    assert er.tolist() == pytest.approx([expected, math.exp(-sum(v * math.log(v) for v in q))])


def test_row_entropy_of_a_skewed_distribution_in_nats():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.7, 0.1, 0.1, 0.1]])
    ref = [1.5 * math.log(2), -(0.7 * math.log(0.7) + 0.3 * math.log(0.1))]
    assert analyze.row_entropy(p).tolist() == pytest.approx(ref, rel=1e-6)


def test_head_entropy_of_random_causal_attention_against_a_loop():
    B, H, T = 2, 3, 6
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, H, T, T, generator=g) * torch.tensor([0.5, 2.0, 4.0])[:, None, None]
    att = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    raw, norm = analyze.head_entropy(att)
    for h in range(H):
        ents = [(-sum(p * math.log(p) for p in att[b, h, i, :i + 1].tolist()), i)
                for b in range(B) for i in range(1, T)]  # query 0 left out
        assert raw[h].item() == pytest.approx(sum(e for e, _ in ents) / len(ents), rel=1e-5)
        assert norm[h].item() == pytest.approx(
            sum(e / math.log(i + 1) for e, i in ents) / len(ents), rel=1e-5)
    assert raw[0] > raw[1] > raw[2]  # sharper scores, lower entropy: the heads are not mixed up


def test_peak_needs_a_rise_beyond_tol_and_scales_the_margin_by_the_peak():
    s = [0, 10, 20, 30]
    assert analyze.peak(s, [0.895, 0.9, 0.5, 0.4], 0.01)[2] is False  # rise within tolerance
    assert analyze.peak(s, [0.88, 0.9, 0.5, 0.4], 0.01) == (10, 0.9, True)
    # negative curves: the margin is tol x |peak|
    assert analyze.peak(s, [-1.0, -0.5, -0.6, -0.504], 0.01)[2] is False
    assert analyze.peak(s, [-1.0, -0.5, -0.6, -0.506], 0.01) == (10, -0.5, True)


def test_reach_interpolates_between_evals():
    loss = np.array([5.0, 4.0, 3.0, 2.0])
    assert analyze.reach(loss, 5.5) == 0.0  # reached at the first eval
    assert analyze.reach(loss, 3.0) == 2.0  # exactly at an eval
    assert analyze.reach(loss, 3.75) == pytest.approx(1.25)
    assert analyze.reach(loss, 1.0) is None
    # a curve that goes back up: the first time it gets there
    assert analyze.reach(np.array([5.0, 3.0, 4.0, 2.5]), 3.5) == pytest.approx(0.75)


# Tables by hand (issue 26): every cell a near miss (another eval, another layer) would change

def test_compare_table_by_hand():
    nan = float("nan")
    a = {"val_loss": np.array([5.0, 4.0, 3.5]), "step": np.array([0.0, 100, 200]),
         "tokens": np.array([0.0, 1e5, 2e5]), "flops": np.array([0.0, 1e12, 2e12]),
         "time": np.array([0.0, 10, 20])}
    # b reaches 3.5 at 1.5 / 1.6 of the way from its first eval to its second
    b = {"val_loss": np.array([5.0, 3.4, 3.0]), "step": np.array([0.0, 100, 200]),
         "tokens": np.array([0.0, 2e5, 4e5]), "flops": np.array([0.0, nan, nan]),
         "time": np.array([0.0, 40, 80])}
    lines = analyze.compare_table(["A", "B"], [a, b]).splitlines()
    f = 1.5 / 1.6
    assert lines[0] == "target: final val loss of A = 3.5000"
    assert lines[3] == f"{'A':<30} {3.5:>9.4f} " + " ".join(
        f"{x:>10}" for x in ["200", "2e+05", "2e+12", "20"])
    assert lines[4] == f"{'B':<30} {3.0:>9.4f} " + " ".join(
        f"{x:>10}" for x in ["200", "4e+05", "n/a", "80"])
    cells = [f"{x:.2f} ({1 / x:.2f}x)" for x in (100 * f / 200, 2e5 * f / 2e5)] + [
        "n/a", f"{40 * f / 20:.2f} ({20 / (40 * f):.2f}x)"]
    assert lines[-1] == f"{'B':<30} " + " ".join(f"{c:>15}" for c in cells)


def test_summary_lines_by_hand():
    # layer 0: weight_per is the mean of two matrices, 0.2 0.5 0.3 over steps 0 10 20 (rises then
    # falls); layer 1: 0.4 0.45 0.6 (peaks last); entropy_norm of layer 1 peaks at step 10
    rows = []
    for step, (a, b, c, e) in zip([0, 10, 20], [(0.1, 0.3, 0.4, 0.2), (0.4, 0.6, 0.45, 0.9),
                                                (0.2, 0.4, 0.6, 0.5)]):
        rows += [(step, 0, "wq", "weight_per", a), (step, 0, "wk", "weight_per", b),
                 (step, 1, "wq", "weight_per", c), (step, 1, "h0", "entropy_norm", e),
                 (step, 1, "h1", "entropy_norm", e)]
    text = analyze.summarize(rows, 0.01, "hdr").splitlines()
    assert text[:2] == ["hdr", "3 checkpoints, steps 0..20"]
    line = lambda m, layer, p, first, peak, last, yes: (
        f"{m:<13} {layer:>5} {p:>10} {first:>8.4f} {peak:>8.4f} {last:>8.4f}  {yes}")
    assert line("weight_per", 0, 10, 0.2, 0.5, 0.3, "yes") in text
    assert line("weight_per", 1, 20, 0.4, 0.6, 0.6, "no") in text
    assert line("entropy_norm", 1, 10, 0.2, 0.9, 0.5, "yes") in text
    assert "  weight_per: layer 0 (step 10)" in text and "  entropy_norm: layer 1 (step 10)" in text
    assert "  grad_per: none" in text


def test_probe_loss_counts_every_target_token_id_zero_included():
    # token id 0 is an ordinary token ('!' in GPT-2): a probe target of 0 counts in the loss
    model = tiny_model()
    x = torch.tensor([[5, 0, 7, 0, 9, 11], [0, 3, 0, 0, 2, 8]])
    y = torch.tensor([[0, 7, 0, 9, 11, 0], [3, 0, 0, 2, 8, 0]])
    loss, *_ = analyze.probe_pass(model, x, y)
    with torch.no_grad():
        logp = model(x)[0].float().log_softmax(-1)
    ref = -sum(logp[b, t, y[b, t]].item() for b in range(2) for t in range(6)) / 12
    assert loss == pytest.approx(ref, rel=1e-5)


def test_probe_windows_at_the_length_limit():
    # exactly seq_len + 1 tokens: every window is the whole array
    w = analyze.probe_windows(np.arange(10, 20), 3, 9, "x")
    assert w.tolist() == [list(range(10, 20))] * 3
    # one token fewer is refused, saying how many a window needs
    with pytest.raises(ValueError, match=r"^short.txt has 9 tokens; a probe window needs 10$"):
        analyze.probe_windows(np.arange(9), 3, 9, "short.txt")


def logs_with_meta():
    """Run A without meta numbers; B with meta numbers that change from eval to eval (none at the
    first), reaching A's final val loss at its very first eval."""
    nan = float("nan")
    a = {"val_loss": np.array([5.0, 4.0, 3.5]), "step": np.array([0.0, 100, 200]),
         "tokens": np.array([0.0, 1e5, 2e5]), "flops": np.array([0.0, 1e12, 2e12]),
         "time": np.array([0.0, 10, 20])}
    b = {"val_loss": np.array([3.4, 3.2, 3.0]), "step": np.array([0.0, 100, 200]),
         "tokens": np.array([0.0, 2e5, 4e5]), "flops": np.array([0.0, 2e12, 4e12]),
         "time": np.array([0.0, 40, 80])}
    for i, name in enumerate(analyze.META_ACCS):  # nan where none, as read_log gives them
        a[name] = a[name + "_se"] = np.full(3, nan)
        b[name] = np.array([nan, 0.1 + 0.1 * i, 0.15 + 0.2 * i])
        b[name + "_se"] = np.array([nan, 0.05, 0.01 * (i + 1)])
    b["val_support_acc"][-1] = b["val_support_acc_se"][-1] = nan  # none at the last eval
    return a, b


def test_compare_table_meta_numbers_of_the_last_eval_and_a_target_met_at_once():
    a, b = logs_with_meta()
    lines = analyze.compare_table(["A", "B"], [a, b]).splitlines()
    # B is at A's final loss from its first eval, at step 0: 0 x A's budget on every axis
    i = lines.index("reaches the target at this fraction of the first run's budget (speedup):")
    assert lines[i + 2] == f"{'B':<30} " + " ".join(f"{'0.00':>15}" for _ in analyze.AXES)
    # the meta numbers are the last eval's, each with its own standard error; A has none
    assert lines[-1].split() == ["B", "0.150", "+-0.010", "0.350", "+-0.020", "0.550", "+-0.030",
                                 "n/a"]
    assert not any(l.startswith("A ") and "+-" in l for l in lines)


def compare_figure(tmp_path, monkeypatch):
    """plot_compare of logs_with_meta's runs A and B, its figure kept open -> (fig, figs (every
    figure plot_compare closes from now on), the real plt.close, a, b)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    a, b = logs_with_meta()
    assert analyze.plot_compare(["A", "B"], [a, b], str(tmp_path / "c.png"))
    (fig,) = figs
    return fig, figs, close, a, b


def test_compare_plot_panels_show_what_they_name(tmp_path, monkeypatch):
    fig, figs, close, a, b = compare_figure(tmp_path, monkeypatch)
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes] == [(3, 2)] * 6
    for ax, axis in zip(fig.axes[:4], analyze.AXES):  # val loss against each axis, per run
        assert ax.get_xlabel() == axis
        lines = {l.get_label(): l for l in ax.get_lines()}
        for run, log in (("A", a), ("B", b)):
            assert lines[run].get_xdata().tolist() == log[axis].tolist()
            assert lines[run].get_ydata().tolist() == log["val_loss"].tolist()
        target = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
        assert len(target) == 1 and list(target[0].get_ydata()) == [3.5, 3.5]  # A's final
        assert target[0].get_linewidth() > 0 and target[0].get_visible()
    # bottom row: B's meta accuracies (A has none), each labelled with its run and name
    for ax, names, words in ((fig.axes[4], analyze.META_ACCS[:2], "query"),
                             (fig.axes[5], analyze.META_ACCS[2:], "nearest support class mean")):
        assert words in ax.get_title()
        shown = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}
        assert set(shown) == {f"B {n[len('val_'):]}" for n in names}
        for n in names:
            np.testing.assert_array_equal(shown[f"B {n[len('val_'):]}"], b[n])
    close(fig)
    # without meta numbers: the four loss panels only, 2 x 2
    assert analyze.plot_compare(["A", "A2"], [a, a], str(tmp_path / "c.png"))
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in figs[1].axes] == [(2, 2)] * 4
    close(figs[1])


@pytest.mark.parametrize("flag", ["--probe_batch=1", "--probe_len=1", "--tol=0"])
def test_the_lowest_allowed_values_are_accepted(tmp_path, monkeypatch, flag):
    seen = []
    monkeypatch.setattr(analyze, "analyze_run", lambda *a, **kw: seen.append(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the arguments passed their checks
        analyze.main([str(tmp_path), flag])
    assert len(seen) == 1


def test_metric_plots_of_a_one_layer_model(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    rows = [(step, 0, comp, "weight_per", v) for step, vals in ((0, (0.2, 0.4)), (10, (0.3, 0.1)))
            for comp, v in zip(("wq", "wk"), vals)]
    paths = analyze.plot_metrics(rows, str(tmp_path))
    assert paths == [str(tmp_path / "weight_per.png")] and os.path.getsize(paths[0]) > 0
    (ax,) = figs[0].axes  # one panel, with the legend of its components
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["wq", "wk"]
    assert [list(l.get_ydata()) for l in ax.get_lines()] == [[0.2, 0.3], [0.4, 0.1]]
    close(figs[0])


def test_peak_that_rises_or_falls_by_exactly_the_margin_does_not_turn():
    # "by more than tol x |maximum|": a change of exactly the margin (here 0.5 x 2 = 1, exact in
    # binary) is not enough, on either side
    s = [0, 10, 20]
    assert analyze.peak(s, [0.0, 2.0, 1.0], 0.5) == (10, 2.0, False)
    assert analyze.peak(s, [1.0, 2.0, 0.0], 0.5) == (10, 2.0, False)
    assert analyze.peak(s, [0.0, 2.0, 0.75], 0.5) == (10, 2.0, True)


def test_a_maximum_at_either_end_never_turns_whatever_the_tolerance():
    # "the maximum lies strictly inside the step range": independent of tol, even a negative one
    s = [0, 10, 20]
    assert analyze.peak(s, [0.0, 1.0, 2.0], -1.0) == (20, 2.0, False)
    assert analyze.peak(s, [2.0, 1.0, 0.0], -1.0) == (0, 2.0, False)
    assert analyze.peak(s, [0.0, 2.0, 1.0], -1.0) == (10, 2.0, True)


def test_compare_plot_text_sizes(tmp_path, monkeypatch):
    # the small print that keeps six panels readable at 10 x 10.5 inches
    fig, _, close, _, _ = compare_figure(tmp_path, monkeypatch)
    assert fig._suptitle.get_text().startswith("validation loss")
    assert fig._suptitle.get_fontsize() == 10
    assert {t.get_fontsize() for t in fig.axes[0].get_legend().get_texts()} == {8}
    for ax in fig.axes[4:]:
        assert {t.get_fontsize() for t in ax.get_legend().get_texts()} == {7}
        assert ax.title.get_fontsize() == 9
    assert tuple(fig.get_size_inches()) == (10.0, 10.5)
    close(fig)
