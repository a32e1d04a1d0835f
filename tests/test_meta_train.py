"""meta_train.py end to end on a tiny model and synthetic shards: learning, data parallel over
torchrun/gloo, exact resume, and the errors that must stop a run before training."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import data
import meta_train
import prepare
from conftest import ROOT, make_tiny_encoding, torchrun
from common import ConfigError, configure

# Topic documents: each is about one target word and otherwise made of that topic's two cue
# words, so a window ending at a masked target tells its word by its context: the synthetic
# episode distribution that meta-learning must get above chance.
TARGETS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone"]
CUES = [a + b for a in "abcd" for b in "wxyz"]  # 2 letters: never candidate words
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=384",
        "--seq_len=32", "--batch_size=4", "--total_batch_size=8", "--meta_seq_len=16",
        "--n_way=4", "--k_shot=2", "--q_query=2", "--inner_steps=5", "--inner_lr=0.5",
        "--meta_hidden=32", "--eval_sequences=8", "--eval_episodes=4", "--log_interval=1",
        "--compile=False", "--warmup_steps=2", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--init=gpt2", "--episodes_per_step=4"]  # the tests below were sized on these


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    enc = make_tiny_encoding(TARGETS + CUES)
    rng = random.Random(0)
    docs = []
    for _ in range(250):
        i = rng.randrange(len(TARGETS))
        docs.append(" ".join(rng.choice([CUES[i], CUES[i + 8], TARGETS[i]]) for _ in range(40)))
    out = str(tmp_path_factory.mktemp("synth"))
    prepare.write_shards(docs, enc, out, val_tokens=3000, progress=False)
    prepare.build_index(out, enc, min_per_million=0, max_per_million=10 ** 6, max_occurrences=500,
                        context=16)
    assert enc.n_vocab + 1 <= 384  # the mask id fits the tiny model's vocab
    return out


def run(data_dir, out_dir, *overrides):
    """Train in this process; returns the config it ran with."""
    c = SimpleNamespace(**configure(meta_train.DEFAULTS, TINY + [
        f"--data_dir={data_dir}", f"--out_dir={out_dir}", *overrides]))
    meta_train.train(c)
    return c


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_log_untimed(out_dir):
    """The log without its timings, which differ between otherwise identical runs."""
    timing = ("time", "wall", "tok_per_s", "mfu", "ar_ms", "meta_ms")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_log(out_dir)]


def weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {**ckpt["model"], **{"head." + k: v for k, v in (ckpt["head"] or {}).items()}}


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_vanilla_run_lowers_val_loss(data_dir, tmp_path):
    run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=60", "--eval_interval=60",
        "--save_interval=60")
    evals = [r for r in read_log(tmp_path) if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[0]["val_loss"] > 5.5  # ln(384) = 5.95 at init
    assert evals[-1]["val_loss"] < 0.6 * evals[0]["val_loss"]
    assert evals[-1]["meta_tokens"] == 0 and evals[-1]["ar_tokens"] == 60 * 8 * 32


def test_meta_run_lifts_query_accuracy(data_dir, tmp_path):
    run(data_dir, tmp_path, "--meta_ratio=1.0", "--max_steps=40", "--eval_interval=40",
        "--save_interval=40", "--eval_episodes=16")
    log = read_log(tmp_path)
    evals = [r for r in log if r["val_loss"] is not None]
    first, last = evals[0]["val_query_acc"], evals[-1]["val_query_acc"]
    assert first < 0.45 and last > 0.6, (first, last)  # chance is 1/4
    assert evals[-1]["ar_tokens"] == 0 and evals[-1]["meta_tokens"] > 0
    assert all(r["query_acc"] is not None for r in log if r["val_loss"] is None)


def test_every_eval_logs_the_mechanism_numbers(data_dir, tmp_path, capsys):
    # the well-posed keys on together, AR steps with [MASK] among their inputs
    run(data_dir, tmp_path / "meta", "--meta_ratio=0.5", "--max_steps=4", "--eval_interval=2",
        "--save_interval=4", "--eval_episodes=6", "--meta_features=standardize",
        "--meta_head_rows=proto", "--meta_read=before", "--ar_mask_rate=0.1")
    evals = [r for r in read_log(tmp_path / "meta") if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        for name in meta_train.VAL_META:
            assert 0 <= r[name] <= 1 and 0 <= r[name + "_se"] <= 0.5, (name, r)
    # standard errors over 6 episodes of 8 queries each: accuracies move in steps of 1/8
    assert any(r[name + "_se"] > 0 for r in evals for name in meta_train.VAL_META)
    assert "query_acc0" in capsys.readouterr().out
    run(data_dir, tmp_path / "vanilla", "--meta_ratio=0.0", "--max_steps=1")
    r = read_log(tmp_path / "vanilla")[0]
    assert all(r[name] is None and r[name + "_se"] is None for name in meta_train.VAL_META)


def test_resume_continues_exactly(data_dir, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    part.mkdir()
    args = ["--meta_ratio=0.5", "--max_steps=8", "--eval_interval=4", "--save_interval=4"]
    save = common.save_checkpoint

    def keep_step_4(path, obj):  # the interrupted run: its files as they were at step 4
        save(path, obj)
        if obj["step"] == 4:
            shutil.copy(path, part / os.path.basename(path))

    monkeypatch.setattr(common, "save_checkpoint", keep_step_4)
    run(data_dir, full, *args)
    monkeypatch.undo()
    assert "optimizer" not in torch.load(part / "ckpt_000004.pt", weights_only=False)
    shutil.copy(full / "log.jsonl", part / "log.jsonl")  # with lines past step 4, to be dropped
    run(data_dir, part, *args, "--resume=True")
    assert_same(weights(full / "ckpt_000008.pt"), weights(part / "ckpt_000008.pt"), atol=0)
    # the log is the uninterrupted run's, line for line, up to timings
    assert read_log_untimed(part) == read_log_untimed(full)
    # log lines of both kinds before and after the resume point: the run was a hybrid
    kinds = {(r["ar_loss"] is not None, r["meta_loss"] is not None) for r in read_log(part)}
    assert (True, False) in kinds and (False, True) in kinds


def test_a_finished_run_extended_equals_the_longer_run(data_dir, tmp_path):
    args = ["--meta_ratio=0.5", "--eval_interval=2", "--save_interval=2", "--lr_decay_steps=50"]
    run(data_dir, tmp_path / "long", *args, "--max_steps=8")
    run(data_dir, tmp_path / "short", *args, "--max_steps=4")
    run(data_dir, tmp_path / "short", *args, "--max_steps=8", "--resume=True")
    assert_same(weights(tmp_path / "long" / "ckpt.pt"), weights(tmp_path / "short" / "ckpt.pt"),
                atol=0)
    assert read_log_untimed(tmp_path / "short") == read_log_untimed(tmp_path / "long")
    # with the decay ending at max_steps, more steps would change the lr: refused
    args = ["--meta_ratio=0.0", "--eval_interval=2", "--save_interval=2", "--lr_decay_steps=0"]
    run(data_dir, tmp_path / "to_max", *args, "--max_steps=2")
    with pytest.raises(ConfigError, match=r"'max_steps': \(2, 4\)"):
        run(data_dir, tmp_path / "to_max", *args, "--max_steps=4", "--resume=True")


def test_bf16_compiled_hybrid_run_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """The GPU code path, bf16 autocast + torch.compile + episodes, run on the CPU: both kinds of
    step, and a resume that continues bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    part.mkdir()
    args = ["--meta_ratio=0.5", "--max_steps=4", "--eval_interval=2", "--save_interval=2",
            "--dtype=bfloat16", "--compile=True", "--episodes_per_step=2"]
    save = common.save_checkpoint

    def keep_step_2(path, obj):
        save(path, obj)
        if obj["step"] == 2:
            shutil.copy(path, part / os.path.basename(path))

    monkeypatch.setattr(common, "save_checkpoint", keep_step_2)
    run(data_dir, full, *args)
    monkeypatch.undo()
    shutil.copy(full / "log.jsonl", part / "log.jsonl")
    run(data_dir, part, *args, "--resume=True")
    assert_same(weights(full / "ckpt_000004.pt"), weights(part / "ckpt_000004.pt"), atol=0)
    log = read_log(full)
    kinds = {(r["ar_loss"] is not None, r["meta_loss"] is not None) for r in log}
    assert (True, False) in kinds and (False, True) in kinds, log
    assert all(math.isfinite(r["val_loss"]) for r in log if r["val_loss"] is not None)


def test_meta_steps_and_val_do_not_depend_on_the_micro_batch(data_dir, tmp_path):
    # episodes per step is a method knob: halving the micro-batch (a memory knob) changes neither
    # the meta steps nor the val set
    args = ["--meta_ratio=1.0", "--max_steps=3", "--eval_interval=3", "--save_interval=3"]
    run(data_dir, tmp_path / "b4", *args, "--batch_size=4")
    run(data_dir, tmp_path / "b2", *args, "--batch_size=2")
    assert_same(weights(tmp_path / "b4" / "ckpt_000003.pt"),
                weights(tmp_path / "b2" / "ckpt_000003.pt"), atol=0)
    val = [[r["val_loss"] for r in read_log(tmp_path / b) if r["val_loss"] is not None]
           for b in ("b4", "b2")]
    assert val[0] == pytest.approx(val[1], abs=1e-6, rel=0)


@pytest.mark.parametrize("decay_params, groups", [("all", [(0.01, 21)]),
                                                  ("matrices", [(0.01, 16), (0.0, 5)])])
def test_weight_decay_groups(data_dir, tmp_path, decay_params, groups):
    run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=0", "--weight_decay=0.01",
        f"--decay_params={decay_params}")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    got = [(g["weight_decay"], len(g["params"])) for g in ckpt["optimizer"]["param_groups"]]
    assert got == groups  # 2 layers x 7 + embedding + output = 16 matrices; 2 x 2 + 1 norms


def test_resume_rejects_a_changed_config(data_dir, tmp_path):
    run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=2", "--eval_interval=2",
        "--save_interval=2")
    with pytest.raises(ConfigError, match="learning_rate"):
        run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=4", "--resume=True",
            "--learning_rate=1e-3")


def test_fresh_run_refuses_an_out_dir_with_checkpoints(data_dir, tmp_path):
    args = ["--meta_ratio=0.0", "--max_steps=2", "--eval_interval=2", "--save_interval=2"]
    run(data_dir, tmp_path, *args)
    before = weights(tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run .*--resume=True"):
        run(data_dir, tmp_path, *args, "--seed=7")
    assert_same(before, weights(tmp_path / "ckpt.pt"), atol=0)  # the earlier run is untouched
    assert [r["step"] for r in read_log(tmp_path) if r["val_loss"] is not None] == [0, 2]


def test_data_parallel_matches_one_process(data_dir, tmp_path):
    """2 gloo ranks x 1 micro-batch of 4 against 1 process x 2 accumulated micro-batches of 4."""
    args = ["--meta_ratio=0.5", "--max_steps=6", "--eval_interval=6", "--save_interval=6",
]
    run(data_dir, tmp_path / "one", *args)
    code, out, err = torchrun(2, [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'two'}",
                                  *args], tmp_path / "logs")
    assert code == 0, err
    assert "2 rank(s)" in out and "1 accumulation x 2 ranks" in out
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    kinds = {r["ar_loss"] is not None for r in one if r["val_loss"] is None}
    assert kinds == {True, False}  # both AR and meta steps were taken
    assert_same(weights(tmp_path / "one" / "ckpt_000006.pt"),
                weights(tmp_path / "two" / "ckpt_000006.pt"), atol=1e-5)
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) < 1e-4
    # AdamW hardly sees a constant scale of the gradient, so the weights alone would not catch a
    # sum over ranks instead of a mean: the logged gradient norms and losses must agree too
    keys = ("grad_norm", "ar_loss", "meta_loss", "support_acc", "query_acc")
    train_rows = lambda log: [[r[k] for k in keys] for r in log if r["val_loss"] is None]
    assert len(train_rows(one)) == 6
    for a, b in zip(train_rows(one), train_rows(two)):
        # an accuracy is a count: an argmax tie resolved the other way moves it by one example
        assert a == [None if v is None else pytest.approx(v, abs=0.02) if k.endswith("acc")
                     else pytest.approx(v, rel=1e-4) for k, v in zip(keys, b)]


@pytest.mark.parametrize("override, words", [
    (["--n_wya=8"], ["unknown config key 'n_wya'", "did you mean 'n_way'"]),
    (["--meta_ratio=1.5"], ["meta_ratio must be in [0, 1]"]),
    (["--meta_ratio=-0.1"], ["meta_ratio must be in [0, 1]"]),
    (["--n_way=9"], ["n_way 9 > 8 candidate words", "index_train_positions.npy"]),
    (["--data_dir=/nonexistent/shards"], ["data_dir '/nonexistent/shards' not found"]),
    (["--batch_size=0"], ["batch_size must be at least 1, got 0"]),
    (["--eval_interval=0"], ["eval_interval must be at least 1, got 0"]),
    (["--n_heads=3"], ["dim 32 must be a multiple of n_heads 3"]),
    (["--resume=True"], ["resume=True but", "holds no checkpoint"]),
])
def test_bad_config_stops_before_training(data_dir, tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        run(data_dir, tmp_path / "run", *override)
    for w in words:
        assert w in str(e.value)
    assert not os.path.exists(tmp_path / "run")  # nothing was trained or written


def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "meta_train.py"), "--meta_ratio=2.0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "config error: meta_ratio must be in [0, 1]" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, "meta_train.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--inner_lr=0.01" in p.stdout


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    # lr 1e30: the first update blows the weights up, a later step's loss is not finite
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=6", "--eval_interval=100",
            "--save_interval=1", "--warmup_steps=1", "--learning_rate=1e30", "--grad_clip=1e30")
    msg = str(e.value)
    assert "non-finite AR loss" in msg and "at step " in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    good = msg.split("last good checkpoint is ")[1].split(" ")[0]
    ckpt = torch.load(good, weights_only=False)  # intact and loadable
    assert ckpt["step"] < step and all(v.isfinite().all() for v in ckpt["model"].values())
    assert not os.path.exists(tmp_path / f"ckpt_{step:06d}.pt")  # bad weights were never saved


def test_non_finite_weights_after_the_last_update_are_not_saved(data_dir, tmp_path, monkeypatch):
    # the last update writes a NaN into the weights: no later step's loss can flag them, so the
    # final checkpoint must check them itself
    step_fn, calls = torch.optim.AdamW.step, []

    def poisoned_step(self, *a, **k):
        out = step_fn(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(SystemExit, match=r"non-finite weights or val loss .* at step 2; "
                                         r".*ckpt.pt \(step 1\)"):
        run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=2", "--eval_interval=100",
            "--save_interval=1")
    assert not os.path.exists(tmp_path / "ckpt_000002.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 1


RESUME = ["--meta_ratio=0.5", "--max_steps=6", "--eval_interval=2", "--save_interval=2"]


def test_resume_drops_a_torn_last_log_line_and_stale_temporaries(data_dir, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    part.mkdir()
    save = common.save_checkpoint

    def keep_step_4(path, obj):
        save(path, obj)
        if obj["step"] == 4:
            shutil.copy(path, part / os.path.basename(path))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(common, "save_checkpoint", keep_step_4)
        run(data_dir, full, *RESUME)
    lines = (full / "log.jsonl").read_text().splitlines(keepends=True)
    upto = [l for l in lines if json.loads(l)["step"] <= 4]
    # a kill -9 in the middle of writing the next line, and of writing two checkpoints
    (part / "log.jsonl").write_text("".join(upto) + lines[len(upto)][:25])
    for junk in (".ckpt.pt.k2j3h4", ".ckpt_000006.pt.x8y9", ".log.jsonl.abc"):
        (part / junk).write_bytes(b"\0" * 1000)
    (part / ".mine").write_text("not ours")
    run(data_dir, part, *RESUME, "--resume=True")
    assert "dropped its torn last line" in capsys.readouterr().out
    assert sorted(os.listdir(part)) == sorted([".lock", ".mine", "ckpt.pt", "ckpt_000004.pt",
                                               "ckpt_000006.pt", "log.jsonl"])
    assert_same(weights(full / "ckpt_000006.pt"), weights(part / "ckpt_000006.pt"), atol=0)
    assert read_log_untimed(part) == read_log_untimed(full)  # every complete line kept


def test_a_torn_line_inside_the_log_is_an_error_naming_it(data_dir, tmp_path):
    run(data_dir, tmp_path, *RESUME)
    lines = (tmp_path / "log.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "log.jsonl").write_text(lines[0] + "{garbage\n" + "".join(lines[1:]))
    with pytest.raises(ConfigError, match=r"log.jsonl line 2 is not JSON"):
        run(data_dir, tmp_path, *RESUME, "--resume=True")


def test_resume_without_ckpt_pt_uses_the_newest_readable_numbered_one(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path / "full", *RESUME)
    part = tmp_path / "part"
    part.mkdir()
    for f in ("ckpt_000002.pt", "ckpt_000004.pt", "log.jsonl"):
        shutil.copy(tmp_path / "full" / f, part / f)
    (part / "ckpt_000004.pt").write_bytes((part / "ckpt_000004.pt").read_bytes()[:1000])  # torn
    run(data_dir, part, *RESUME, "--resume=True")
    out = capsys.readouterr().out
    assert "ckpt_000004.pt: RuntimeError" in out and "trying an older checkpoint" in out
    assert "resuming from" in out and "ckpt_000002.pt" in out and "bit for bit" in out
    steps = [r["step"] for r in read_log(part) if r["val_loss"] is not None]
    assert steps == [0, 2, 4, 6]  # the log goes on from step 2, the torn step 4 written anew
    assert torch.load(part / "ckpt.pt", weights_only=False)["step"] == 6


def test_resume_with_no_readable_checkpoint_names_it(data_dir, tmp_path):
    tmp_path.joinpath("ckpt.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no checkpoint in .* can be read: cannot read "
                                          r"checkpoint .*ckpt.pt: EOFError"):
        run(data_dir, tmp_path, *RESUME, "--resume=True")


def test_a_second_run_into_a_live_run_dir_is_refused(data_dir, tmp_path):
    # another process holds the run directory's lock, as a live run does
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
        " f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(600)"),
        str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid}\)"):
            run(data_dir, out, "--meta_ratio=0.0", "--max_steps=1")
        assert not os.path.exists(out / "log.jsonl")  # nothing of the live run was touched
    finally:
        holder.kill()  # kill -9: the OS releases the lock of a process that dies
        holder.wait()
    run(data_dir, out, "--meta_ratio=0.0", "--max_steps=1")


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_weights(data_dir, tmp_path):
    args = TINY + [f"--data_dir={data_dir}", "--meta_ratio=0.5", "--max_steps=40",
                   "--eval_interval=10", "--save_interval=2"]
    run(data_dir, tmp_path / "full", *args[len(TINY) + 1:])
    cmd = [sys.executable, os.path.join(ROOT, "meta_train.py"), *args,
           f"--out_dir={tmp_path / 'killed'}"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it once its step-10 checkpoint exists: the kill lands wherever the run then is
        while not os.path.exists(tmp_path / "killed" / "ckpt_000010.pt") and p.poll() is None:
            time.sleep(0.01)
        p.kill()
    finally:
        p.wait()
    assert p.returncode == -9
    subprocess.run(cmd + ["--resume=True"], check=True, capture_output=True, timeout=300)
    assert_same(weights(tmp_path / "full" / "ckpt_000040.pt"),
                weights(tmp_path / "killed" / "ckpt_000040.pt"), atol=0)


@pytest.mark.parametrize("text, words", [
    ("dim = 64\nn_layers = (\n", ["bad.py, line 2", "SyntaxError"]),
    ("dim = 64\nx = 1 / 0\n", ["bad.py, line 2", "ZeroDivisionError"]),
])
def test_config_file_errors_name_file_and_line(tmp_path, text, words):
    (tmp_path / "bad.py").write_text(text)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "meta_train.py"),
                        str(tmp_path / "bad.py")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("config error: config file") and len(p.stderr.splitlines()) == 1
    for w in words:
        assert w in p.stderr


@pytest.mark.parametrize("override, words", [
    (["--learning_rate=-1e-3"], ["learning_rate must be at least 0, got -0.001"]),
    (["--beta2=1.0"], ["beta2 must be in [0, 1), got 1.0"]),
    (["--weight_decay=-0.1"], ["weight_decay must be at least 0, got -0.1"]),
    (["--meta_seq_len=32"], ["meta_seq_len 32 > the SMLMT index's context 16"]),
    (["--lr_schedule=step"], ["lr_schedule must be one of 'linear', 'cosine'"]),
    (["--episodes_per_step=-1"], ["episodes_per_step must be at least 0"]),
    (["--n_kv_heads=0"], ["n_kv_heads must be at least 1, got 0"]),
    (["--k_shot=0"], ["k_shot must be at least 1, got 0"]),
    (["--warmup_steps=5", "--lr_decay_steps=5"], ["lr_decay_steps 5 must come after warmup"]),
    (["--device=cuda"], ["device 'cuda': this torch build or machine has no CUDA device"]),
    (["--device=banana"], ["device 'banana'"]),
])
def test_values_torch_would_reject_are_config_errors(data_dir, tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        run(data_dir, tmp_path / "run", *override)
    for w in words:
        assert w in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_wandb_logging_gets_every_log_row(data_dir, tmp_path, monkeypatch):
    calls = []
    fake = SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                           log=lambda row, step: calls.append(("log", row, step)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(data_dir, tmp_path / "run", "--meta_ratio=0.5", "--max_steps=4", "--eval_interval=2",
        "--save_interval=4", "--wandb_log=True", "--wandb_project=proj")
    (_, init), *logged = calls
    assert init["project"] == "proj" and init["name"] == "run" and init["config"]["max_steps"] == 4
    rows = read_log(tmp_path / "run")
    assert [(row, step) for _, row, step in logged] == [
        ({k: v for k, v in r.items() if v is not None}, r["step"]) for r in rows]
    calls.clear()
    monkeypatch.delitem(sys.modules, "wandb")  # off by default: never imported
    run(data_dir, tmp_path / "off", "--meta_ratio=0.0", "--max_steps=1")
    assert "wandb" not in sys.modules and calls == []


@pytest.mark.parametrize("unknown", ["class0", "drop"])
def test_positions_task_runs(data_dir, tmp_path, capsys, unknown):
    run(data_dir, tmp_path, "--meta_task=positions", f"--positions_unknown={unknown}",
        "--meta_ratio=1.0", "--max_steps=3", "--eval_interval=3", "--save_interval=3",
        "--positions_batch=4")
    log = read_log(tmp_path)
    assert all(r["meta_loss"] is not None and 0 <= r["query_acc"] <= 1
               for r in log if r["val_loss"] is None)
    assert all(0 <= r["val_query_acc"] <= 1 for r in log if r["val_loss"] is not None)
    shape = "4-way, 2 support + 1 query positions of 4 sequences of 32 tokens"
    assert shape in capsys.readouterr().out


def test_wandb_without_the_package_is_a_config_error(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails, as when not installed
    with pytest.raises(ConfigError, match="wandb is not installed"):
        run(data_dir, tmp_path / "run", "--wandb_log=True")
    assert not os.path.exists(tmp_path / "run")


def one_step_reference(c, data_dir, slots):
    """The model and (meta runs) head as train() builds them from the seed, with the gradient of
    one step taken by hand: slots(model, head) accumulates it. -> model, head, the gradient's
    norm."""
    torch.manual_seed(c.seed)
    model = meta_train.Llama(common.model_args(c))
    head = None
    if c.meta_ratio > 0:
        head = meta_train.MetaHead(c.dim, c.vocab_size, c.meta_hidden, c.meta_head_init)
    out = slots(model, head)
    params = [p for m in (model, head) if m is not None for p in m.parameters()]
    norm = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm().item()
    return model, head, norm, out


def adamw_step(c, model, head):
    params = [p for m in (model, head) if m is not None for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=meta_train.get_lr(0, c), betas=(c.beta1, c.beta2),
                            weight_decay=c.weight_decay)
    opt.step()
    ref = {k: v for k, v in model.state_dict().items()}
    return {**ref, **({"head." + k: v for k, v in head.state_dict().items()} if head else {})}


def first_train_row(out_dir):
    return next(r for r in read_log(out_dir) if r["val_loss"] is None)


@pytest.mark.parametrize("batch_size", [8, 4, 2])
def test_accumulated_ar_step_is_the_full_batch_step(data_dir, tmp_path, batch_size):
    # 8 sequences a step as 1, 2 or 4 micro-batches, clipping off (the default): the gradient is
    # that of the mean loss over the 8 sequences drawn for the step's slots, taken as one batch
    c = run(data_dir, tmp_path, "--meta_ratio=0.0", "--max_steps=1", "--eval_interval=1",
            "--save_interval=1", f"--batch_size={batch_size}")
    assert c.grad_clip == 0.0
    reader = data.ShardReader(data_dir, "train", batch_size, c.seq_len)
    batches = [reader.next_batch(np.random.default_rng([c.seed, 0, slot, 2]))
               for slot in range(8 // batch_size)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def full_batch(model, head):
        loss = model(x, y)[1]
        loss.backward()
        return loss.item()

    model, _, norm, loss = one_step_reference(c, data_dir, full_batch)
    row = first_train_row(tmp_path)
    # the norm is logged before the step: AdamW would hide a wrong scale in the weights
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert row["ar_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["ar_tokens"] == 8 * c.seq_len
    assert row["flops"] == 8 * c.seq_len * model.flops_per_token(c.seq_len)
    # the mean time of this step's kind only, in milliseconds (a step of this tiny model takes
    # well under a minute)
    assert 0 < row["ar_ms"] < 60_000 and row["meta_ms"] is None
    assert_same(weights(tmp_path / "ckpt_000001.pt"), adamw_step(c, model, None), atol=1e-6)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_meta_step_gradient_is_the_weighted_mean_over_episodes(data_dir, tmp_path, weight):
    c = run(data_dir, tmp_path, "--meta_ratio=1.0", "--max_steps=1", "--eval_interval=1",
            "--save_interval=1", "--episodes_per_step=3", f"--meta_loss_weight={weight}")
    sampler = data.SMLMTSampler(data_dir, c.n_way, c.k_shot, c.q_query, c.meta_seq_len)

    def episodes(model, head):
        stats = []
        for slot in range(3):
            ep = sampler.sample(np.random.default_rng([c.seed, 0, slot, 3]))
            stats.append([v.item() for v in meta_train.smlmt_episode(model, head, ep, c,
                                                                     weight / 3)])
        return np.mean(stats, axis=0)  # query loss, support accuracy, query accuracy

    model, head, norm, (q_loss, s_acc, q_acc) = one_step_reference(c, data_dir, episodes)
    row = first_train_row(tmp_path)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert row["meta_loss"] == pytest.approx(q_loss, rel=1e-5) and row["ar_loss"] is None
    assert (row["support_acc"], row["query_acc"]) == (pytest.approx(s_acc), pytest.approx(q_acc))
    tokens, flops = meta_train.episode_tokens_and_flops(model, c)
    assert (row["meta_tokens"], row["flops"]) == (3 * tokens, pytest.approx(3 * flops))
    assert 0 < row["meta_ms"] < 60_000 and row["ar_ms"] is None
    assert_same(weights(tmp_path / "ckpt_000001.pt"), adamw_step(c, model, head), atol=1e-6)


def test_positions_meta_step_reads_an_ar_steps_tokens_by_default(data_dir, tmp_path, capsys):
    # episodes_per_step 0: total_batch_size / positions_batch = 8 / 2 episodes of 2 x 32 tokens
    c = run(data_dir, tmp_path, "--meta_ratio=1.0", "--max_steps=1", "--eval_interval=1",
            "--save_interval=1", "--meta_task=positions", "--positions_batch=2",
            "--episodes_per_step=0")
    assert c.episodes_per_step == 4
    assert first_train_row(tmp_path)["meta_tokens"] == 4 * 2 * 32 == 8 * c.seq_len
    meta_line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("meta step")]
    assert "4 positions episodes" in meta_line[0] and ": 256 tokens" in meta_line[0]


def test_grad_clip_clips_and_logs_the_norm_before_clipping(data_dir, tmp_path):
    args = ["--meta_ratio=0.0", "--max_steps=1", "--eval_interval=1", "--save_interval=1"]
    run(data_dir, tmp_path / "off", *args)
    run(data_dir, tmp_path / "clip", *args, "--grad_clip=1e-12")
    off, clip = first_train_row(tmp_path / "off"), first_train_row(tmp_path / "clip")
    assert clip["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-6) and off["grad_norm"] > 1
    # clipped to a norm of 1e-12, the gradient is far below AdamW's eps: the step moves a weight
    # only by its decay (lr x 0.01 x 1 for the norms), where the unclipped step moves each by about
    # the lr (1.5e-3 at step 0)
    w0 = weights(tmp_path / "off" / "ckpt_000000.pt")
    moved = {d: max((weights(tmp_path / d / "ckpt_000001.pt")[k] - w0[k]).abs().max().item()
                    for k in w0) for d in ("off", "clip")}
    assert moved["off"] > 1e-3 and moved["clip"] < 2e-5, moved


def test_logged_times_are_per_micro_step_per_episode_and_training_only(data_dir, tmp_path,
                                                                         monkeypatch):
    # a fake clock that moves only while data is read (0.25 s an AR micro-batch, 0.5 s an
    # episode) and by 1 us a reading: the logged step times and the training time are then known
    # by hand, whatever the machine's speed
    clock = [0.0]

    def now():
        clock[0] += 1e-6
        return clock[0]

    def advancing(f, seconds):
        def wrapped(*a, **kw):
            clock[0] += seconds
            return f(*a, **kw)
        return wrapped

    monkeypatch.setattr(meta_train, "time", SimpleNamespace(time=now))
    monkeypatch.setattr(data.ShardReader, "next_batch",
                        advancing(data.ShardReader.next_batch, 0.25))
    monkeypatch.setattr(data.SMLMTSampler, "sample", advancing(data.SMLMTSampler.sample, 0.5))
    args = ["--max_steps=4", "--eval_interval=2", "--save_interval=2"]
    run(data_dir, tmp_path / "ar", *args, "--meta_ratio=0.0", "--batch_size=2")  # 4 micro-steps
    run(data_dir, tmp_path / "meta", *args, "--meta_ratio=1.0", "--episodes_per_step=3")
    for name, kind, ms, per_step in (("ar", "ar_ms", 250, 1.0), ("meta", "meta_ms", 500, 1.5)):
        rows = [r for r in read_log(tmp_path / name) if r["val_loss"] is None]
        assert len(rows) == 4
        for r in rows:
            assert ms <= r[kind] < ms + 0.1, (name, r)
        # evaluation (which reads val data through the same readers) and checkpoint writes are
        # not training time
        assert [r["time"] for r in rows] == pytest.approx([per_step * (i + 1) for i in range(4)],
                                                          abs=1e-3)
