"""gpu_check.py end to end on the CPU with a tiny model: the script a GPU user runs must work, and
each of its checks must fail (exit status 1) when its fault is injected."""
import json
import os
import random
import time

import pytest
import torch

import common
import gpu_check
import meta_train
from conftest import make_tiny_encoding

WORDS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone"]
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=384",
        "--seq_len=32", "--batch_size=4", "--total_batch_size=8", "--meta_seq_len=16",
        "--n_way=4", "--k_shot=2", "--q_query=2", "--inner_steps=5", "--inner_lr=0.5",
        "--meta_hidden=32", "--episodes_per_step=2", "--dtype=bfloat16", "--compile=False",
        # the paper's episode read-out (configs/cpu.py reads the state before the word, centred):
        # the fault tests' thresholds were set on it
        "--meta_read=mask", "--meta_features=raw"]
CHECKS = {"graph breaks", "recompiles after the first step", "resume",
          "inner steps lower the query loss under the run's autocast",
          "run autocast agrees with fp32 after adaptation"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work directory whose data gpu_check reuses: the text, and its data dir built with an
    index band for 8 words of 11% each (the default band suits real text)."""
    d = tmp_path_factory.mktemp("gpu_check")
    rng = random.Random(0)
    text = d / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60))
                                for _ in range(300)))
    enc = make_tiny_encoding(WORDS)
    gpu_check.build_data([str(text)], enc, str(d / "work" / "data"), 5_000_000,
                         dict(min_per_million=0, max_per_million=10 ** 6))
    return d


def main(work, monkeypatch):
    """gpu_check.main as a user runs it (on the CPU, --allow_cpu) -> (exit status, report)."""
    monkeypatch.setattr(common, "get_encoding", lambda name: make_tiny_encoding(WORDS))
    argv = ["--text", str(work / "text.txt"), "--work", str(work / "work"), "--config",
            "configs/cpu.py", "--steps=6", "--no_bench", "--allow_cpu", *TINY]
    try:
        gpu_check.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    with open(work / "work" / "gpu_check.json") as f:
        return code, json.load(f)


def test_gpu_check_runs_on_cpu(work, monkeypatch, capsys):
    code, report = main(work, monkeypatch)
    out = capsys.readouterr().out
    assert code == 0, out
    steps = report["train"]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert {s["meta_loss"] is None for s in steps} == {True, False}  # both kinds of step
    assert report["resume_max_abs_diff"] == 0.0  # CPU kernels are deterministic
    assert set(report["checks"]) == CHECKS and report["errors"] == {}
    assert report["checks"]["resume"]["value"] == 0.0
    inner = report["inner_loop"]
    # under bf16 autocast the inner steps lower the loss as they do in fp32 (stale bf16 weights
    # would leave it where it was)
    drop = inner["run autocast, 0 inner steps"] - inner["run autocast, 5 inner steps"]
    assert drop > 0.005
    assert abs(inner["run autocast, 5 inner steps"] - inner["fp32, 5 inner steps"]) < 0.2 * drop
    assert "every check passed" in out and "MFU unknown" in out
    # only the resume check needs checkpoints, and they are gone when it is done
    assert not list((work / "work").glob("*/ckpt*.pt"))


class Patched:
    """A module as meta_train would see it with some of its functions replaced."""

    def __init__(self, module, **replaced):
        self.module, self.replaced = module, replaced

    def __getattr__(self, name):
        return self.replaced.get(name) or getattr(self.module, name)


def stale_casts(monkeypatch):  # autocast's cached weight casts never dropped within an episode:
    # its every forward reads the weights as they were before the inner steps
    monkeypatch.setattr(meta_train, "torch", Patched(torch, clear_autocast_cache=lambda: None))


def bf16_off(monkeypatch):  # under autocast the episode's loss comes out 0.1 higher than in fp32
    F = torch.nn.functional
    ce = lambda *a, **kw: F.cross_entropy(*a, **kw) + 0.1 * torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(meta_train, "F", Patched(F, cross_entropy=ce))


def optimizer_lost(monkeypatch):  # a resume that does not restore AdamW's moments
    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", lambda self, state: None)


def dynamo_counter(key, sub):  # what dynamo counts when a graph breaks or recompiles mid-run
    def inject(monkeypatch):
        from torch._dynamo.utils import counters
        append = common.RunDir.append_log

        def append_log(self, row):
            if row["step"] == 4 and row.get("val_loss") is None:
                counters[key][sub] += 1
            append(self, row)

        monkeypatch.setattr(common.RunDir, "append_log", append_log)
    inject.__name__ = key
    return inject


@pytest.mark.parametrize("fault, fails", [
    (stale_casts, {"inner steps lower the query loss under the run's autocast"}),
    (bf16_off, {"run autocast agrees with fp32 after adaptation"}),
    (optimizer_lost, {"resume"}),
    (dynamo_counter("graph_break", "injected"), {"graph breaks"}),
    (dynamo_counter("stats", "unique_graphs"), {"recompiles after the first step"}),
])
def test_each_check_fails_on_its_fault(work, monkeypatch, capsys, fault, fails):
    fault(monkeypatch)
    code, report = main(work, monkeypatch)
    assert code == 1
    assert {k for k, v in report["checks"].items() if not v["ok"]} == fails
    assert set(report["checks"]) == CHECKS and report["errors"] == {}
    out = capsys.readouterr().out
    assert all(f"FAIL {k}:" in out for k in fails)


def test_a_stage_that_raises_keeps_the_other_stages_figures(work, monkeypatch, capsys):
    def broken(*a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(gpu_check, "inner_loop_check", broken)
    code, report = main(work, monkeypatch)
    assert code == 1
    assert report["errors"] == {"inner loop": "RuntimeError: injected"}
    assert len(report["train"]["steps"]) == 6 and report["checks"]["resume"]["ok"]
    assert "FAIL stage inner loop: RuntimeError: injected" in capsys.readouterr().out


def test_a_stage_that_stops_training_is_recorded_and_leaves_no_checkpoint(work, monkeypatch,
                                                                          capsys):
    # the resumed run meets a non-finite loss: meta_train stops with SystemExit, which the
    # report records as that stage's failure; the later stages run, no checkpoint is left
    run, step = gpu_check.train_run, torch.optim.AdamW.step

    def nan_on_resume(cfg, out_dir, resume=False, **kw):
        if not resume:
            return run(cfg, out_dir, resume=resume, **kw)

        def poisoned(self, *a, **k):  # weights turn NaN after the first resumed step
            out = step(self, *a, **k)
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
        try:
            return run(cfg, out_dir, resume=resume, **kw)
        finally:
            monkeypatch.setattr(torch.optim.AdamW, "step", step)

    monkeypatch.setattr(gpu_check, "train_run", nan_on_resume)
    code, report = main(work, monkeypatch)
    assert code == 1
    assert list(report["errors"]) == ["resume"]
    assert report["errors"]["resume"].startswith("SystemExit: non-finite")
    assert report["checks"]["graph breaks"]["ok"] and "inner_loop" in report
    assert not list((work / "work").glob("*/*.pt*"))
    assert "FAIL stage resume: SystemExit: non-finite" in capsys.readouterr().out


def test_without_cuda_it_refuses_unless_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--text", str(tmp_path / "t.txt"), "--work", str(tmp_path / "w")])
    assert e.value.code == ("gpu_check.py: no CUDA device here, and this checks the GPU path; "
                            "--allow_cpu runs it on the CPU anyway")
    assert not (tmp_path / "w").exists()


def test_tf32_is_off_inside_tf32_off_and_restored_after():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with common.tf32_off():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# The orchestration with every stage's work faked (issue 26): what check() does with the figures
# the stages return, and main's arguments, in milliseconds

def test_build_data_stops_at_4_chars_a_token_and_makes_every_tenth_document_val(tmp_path,
                                                                                 monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"document{i:02d}" for i in range(30)))  # 10 characters each
    seen = {}

    def write_shards(train, enc, out, val_tokens, val_docs, progress, index_args):
        seen.update(train=list(train), val=list(val_docs), index_args=index_args)
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({"made": True}, f)

    monkeypatch.setattr(gpu_check.prepare, "write_shards", write_shards)
    monkeypatch.setattr(gpu_check.data, "read_meta", lambda out: json.load(
        open(os.path.join(out, "meta.json"))))
    out = tmp_path / "data"
    out.mkdir()
    # 50 tokens at 4 characters each: the 20 documents up to 200 characters, the 20th included
    assert gpu_check.build_data([str(text)], None, str(out), 50) == {"made": True}
    docs = [f"document{i:02d}" for i in range(20)]
    assert seen["val"] == ["document00", "document10"]
    assert seen["train"] == [d for d in docs if d not in seen["val"]]
    assert seen["index_args"] == {"source": f"--text {text}"}


class FakeStages:
    """gpu_check's stages with their work faked: weights that move by known amounts, a training
    log of 2 steps, inner-loop losses and a bench table; records how bench was called."""

    def __init__(self, monkeypatch, train_error=None):
        self.resumed, self.bench, self.train_error, self.data = False, [], train_error, []
        monkeypatch.setattr(gpu_check, "build_data", lambda *a: self.data.append(a) or {
            "train_tokens": 1000, "val_tokens": 100, "index": {"n_words": 7}})
        monkeypatch.setattr(gpu_check, "train_run", self.train_run)
        monkeypatch.setattr(gpu_check, "weights", self.weights)
        monkeypatch.setattr(gpu_check, "inner_loop_check", lambda *a: {
            "run autocast, 0 inner steps": 3.0, "run autocast, 5 inner steps": 2.0,
            "fp32, 0 inner steps": 3.0, "fp32, 5 inner steps": 1.5})
        monkeypatch.setattr(gpu_check.bench, "run", lambda *a, **kw: self.bench.append(kw) or (
            {}, []))
        monkeypatch.setattr(gpu_check.bench, "format_table",
                            lambda facts, rows, tera: f"tera {tera}")

    def train_run(self, cfg, out_dir, copy_at=None, copy_to=None, resume=False):
        if self.train_error:
            raise self.train_error
        rows = [{"step": s, "ar_loss": 1.0, "meta_loss": None, "tok_per_s": 10.0, "mfu": None,
                 "ar_ms": 5.0, "meta_ms": None, "val_loss": None} for s in (1, 2)]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "log.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        torch.save({}, os.path.join(out_dir, "ckpt.pt"))
        if copy_to:
            torch.save({}, os.path.join(copy_to, "ckpt.pt"))
        self.resumed = self.resumed or resume
        return rows, {"graphs": 1, "graph_breaks": 0, "break_reasons": [], "recompiles": 0}

    def weights(self, path):
        # the full run moves w from (1, -3) to (1, 1) over the resumed steps (norm 4); the resumed
        # run ends 0.02 away from it: 0.5% of the movement
        if "resumed" in path:
            return {"w": torch.tensor([1.0, 1.02 if self.resumed else -3.0])}
        return {"w": torch.tensor([1.0, 1.0])}


def fake_check(tmp_path, steps=4):
    return gpu_check.check(["unused.txt"], None, str(tmp_path), "configs/cpu.py", [
        "--device=cpu", "--dtype=float32", "--meta_task=smlmt", "--meta_ratio=0.5",
        "--inner_steps=5"], steps=steps)


def test_check_turns_the_stages_figures_into_verdicts(tmp_path, monkeypatch):
    stages = FakeStages(monkeypatch)
    t0 = time.time()
    r = fake_check(tmp_path)
    assert r["errors"] == {}
    # check()'s own default: 5M tokens of text, as main's
    assert stages.data == [(["unused.txt"], None, str(tmp_path / "data"), 5_000_000, None)]
    assert r["checks"]["resume"]["value"] == pytest.approx(0.02 / 4)
    assert r["checks"]["resume"]["ok"] and r["resume_max_abs_diff"] == pytest.approx(0.02)
    drop = r["checks"]["inner steps lower the query loss under the run's autocast"]
    # the autocast drop 1.0 against fp32's 1.5: at least half of it
    assert drop["value"] == 1.0 and drop["ok"] and drop["threshold"].startswith(">= 0.5 x")
    gap = r["checks"]["run autocast agrees with fp32 after adaptation"]
    assert gap["value"] == 0.5 and not gap["ok"]
    assert 0 <= r["train"]["seconds"] <= r["seconds"] <= time.time() - t0
    assert stages.bench == [{"reps": 5, "warmup": 2, "compile": True}] and r["bench"] == \
        "tera False"
    assert gpu_check.failed(r) == ["run autocast agrees with fp32 after adaptation"]
    lines = gpu_check.format_report(r).splitlines()
    assert lines[:4] == ["device: cpu", f"torch: {torch.__version__}",
                         "config: configs/cpu.py --device=cpu --dtype=float32 --meta_task=smlmt "
                         "--meta_ratio=0.5 --inner_steps=5",
                         "data: 1,000 train + 100 val tokens, 7 candidate words"]
    assert lines[4].startswith("train: 2 steps in ")
    assert not list(tmp_path.glob("*/*.pt"))


def test_a_training_stage_that_raises_is_recorded_and_skips_the_rest(tmp_path, monkeypatch):
    FakeStages(monkeypatch, train_error=RuntimeError("out of memory"))
    r = fake_check(tmp_path)
    assert r["errors"] == {"train": "RuntimeError: out of memory",
                           **{s: "skipped: an earlier stage failed"
                              for s in ("resume", "inner loop", "bench")}}
    FakeStages(monkeypatch, train_error=common.ConfigError("bad key"))
    with pytest.raises(common.ConfigError, match="bad key"):  # bad input: a one-line error
        fake_check(tmp_path)


def test_main_passes_its_defaults_and_refuses_an_odd_step_count(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(common, "get_encoding", lambda name: name)
    monkeypatch.setattr(gpu_check, "check", lambda *a: calls.append(a) or {
        "checks": {}, "errors": {}, "seconds": 1.0})
    gpu_check.main(["--text", "a.txt", "--allow_cpu", "--work", str(tmp_path)])
    assert calls == [(["a.txt"], "gpt2", str(tmp_path), "configs/570m.py", [], 6, 5_000_000,
                      True)]
    assert "every check passed" in capsys.readouterr().out
    for steps in ("3", "0", "1"):
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--text", "a.txt", "--allow_cpu", "--steps", steps])
        assert e.value.code == 2
    assert "--steps must be even and at least 2" in capsys.readouterr().err
    assert len(calls) == 1
