"""gpu_check.py end to end on the CPU with a tiny model: the script a GPU user runs must work, and
each of its checks must fail (exit status 1) when its fault is injected."""
import json
import random

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
