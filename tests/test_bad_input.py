"""Bad input at every entry point, tried as a user would: each either works or stops with one line
that names the culprit and a fix that exists, losing nothing already written. Subprocesses only
where the exit status or the one line on stderr is the point."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import adapt_eval
import analyze
import common
import data
import export_hf
import meta_train
import ner_eval
import prepare
import sample
from common import ConfigError
from conftest import ROOT, make_tiny_encoding, write_text
from test_meta_train import CUES, TARGETS, data_dir, run  # noqa: F401 (data_dir: a fixture)

ENC = make_tiny_encoding(TARGETS + CUES)  # data_dir's tokenizer, which tiktoken cannot name


def cli(args, env=None):
    """Run a command from the repository root -> (exit status, stderr lines)."""
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """A finished 4-step vanilla run with checkpoints at steps 0, 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    run(data_dir, out, "--meta_ratio=0.0", "--max_steps=4", "--eval_interval=2",
        "--save_interval=2", "--meta_seq_len=8")
    return str(out)


@pytest.fixture
def text(tmp_path, data_dir):
    return write_text(tmp_path / "t.txt", [" ".join(["cat dog"] * 30)] * 40)


# prepare.py: (flags, error), each found before any text is read or anything written
PREPARE_CASES = [
    (["--max_tokens", "0"], "--max_tokens must be at least 1, got 0"),
    (["--max_tokens", "-5"], "--max_tokens must be at least 1, got -5"),
    (["--val_tokens", "0"], r"--val_tokens must be at least 1 \(training reads a val split\), "
                            r"got 0; or give --val_text FILES"),
    (["--max_occurrences", "0"], "--max_occurrences must be at least 2, got 0"),
    (["--context", "0"], "--context must be at least 1, got 0"),
    (["--shard_tokens", "0"], "--shard_tokens must be at least 1, got 0"),
    (["--num_proc", "0"], "--num_proc must be at least 1, got 0"),
    (["--max_tokens", "100", "--val_tokens", "1000"],
     r"--max_tokens 100 leaves no train tokens after the 1000 val tokens \(--val_tokens\); raise "
     r"--max_tokens or lower --val_tokens"),
    (["--tokenizer", "gpt3"], "unknown tiktoken encoding 'gpt3'; known: gpt2, "),
]


@pytest.mark.parametrize("flags,error", PREPARE_CASES, ids=[" ".join(c[0]) for c in PREPARE_CASES])
def test_prepare_checks_its_own_arguments(tmp_path, text, flags, error):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="^prepare.py: error: " + error):
        prepare.main(["--text", text, "--out", str(out)] + flags)
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_prepare_out_that_cannot_be_a_folder(tmp_path, text, monkeypatch, where):
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": ENC)
    (tmp_path / "f").write_text("keep")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "x"
    error = ("exists and is not a directory" if where == "file" else
             r"cannot be created \(Not a directory\); choose another --out")
    with pytest.raises(SystemExit, match=f"^prepare.py: error: --out {out} {error}"):
        prepare.main(["--text", text, "--out", str(out), "--num_proc", "1"])
    assert (tmp_path / "f").read_text() == "keep"


def test_prepare_refuses_an_out_another_prepare_holds(tmp_path, text, monkeypatch):
    """Two run_cpu.sh into one fresh DATA: the second prepare.py is refused and leaves the first's
    live staging folder alone; the lock goes with the process, however it ends."""
    monkeypatch.setattr(common, "get_encoding", lambda name="gpt2": ENC)
    out = tmp_path / "out"
    live = out / ".write_shards-live"
    live.mkdir(parents=True)
    (live / "train_000000.bin").write_bytes(b"\0" * 10)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
        " f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(600)"),
        str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    args = ["--text", text, "--out", str(out), "--num_proc", "1", "--val_tokens", "200",
            "--min_per_million", "0", "--max_per_million", "1e6"]
    try:
        assert holder.stdout.readline().strip() == "locked"
        error = (rf"^prepare.py: error: --out {out} is in use by another prepare.py \(pid "
                 rf"{holder.pid}\); wait for it to end, or choose another --out$")
        with pytest.raises(SystemExit, match=error):
            prepare.main(args)
        assert (live / "train_000000.bin").exists()
    finally:
        holder.kill()  # kill -9: the OS releases the lock
        holder.wait()
    prepare.main(args)
    assert not live.exists() and data.read_meta(str(out))["train_tokens"] > 0
    lock = common.lock_dir(str(out), "x", "y", "z")  # as another process would (flock: per open)
    before = (out / "meta.json").read_bytes()
    with pytest.raises(SystemExit, match=r"--out .* is in use by another prepare.py \(pid "
                                         rf"{os.getpid()}\)"):
        prepare.main(["--reindex", "--out", str(out), "--min_per_million", "0"])
    lock.close()
    assert (out / "meta.json").read_bytes() == before


def test_data_py_old_command_line_points_to_prepare(tmp_path):
    rc, err = cli([sys.executable, "data.py", "--text", "a.txt", "--out", str(tmp_path)])
    assert rc != 0 and len(err) == 1
    assert err[0].startswith("data.py: error: unknown option --text: data.py only checks a data "
                             "directory") and "python prepare.py --text FILES --out DIR" in err[0]


def replace_shard_tokens(out):
    """Replace the first train shard by other tokens of the same length."""
    shard = data.list_shards(out, "train")[0]
    prepare.write_shard(shard, np.roll(np.asarray(data.load_shard(shard)), 1))
    return shard


def test_shard_replaced_by_tokens_of_its_length_is_caught(data_dir, tmp_path):
    out = str(tmp_path / "d")
    shutil.copytree(data_dir, out)
    shard = replace_shard_tokens(out)
    error = (f"{shard}: CRC-32 [0-9a-f]{{8}} but meta.json records [0-9a-f]{{8}}; the shard was "
             f"replaced or damaged after it was written: rebuild the directory")
    rc, err = cli([sys.executable, "data.py", out])
    assert rc == 1 and len(err) == 1 and err[0].startswith("data.py: error: " + shard)
    # a vanilla run reads no index, which used to be the only thing to notice
    with pytest.raises(ConfigError, match=error):
        run(out, tmp_path / "run", "--meta_ratio=0.0", "--max_steps=1")
    assert not (tmp_path / "run").exists()


def test_data_dir_without_checksums_still_loads_with_a_notice(data_dir, tmp_path, capsys):
    out = str(tmp_path / "d")
    shutil.copytree(data_dir, out)
    meta = data.read_meta(out)
    assert set(meta["shard_crc32"]) == set(meta["shards"]["train"]) | set(meta["shards"]["val"])
    del meta["shard_crc32"]  # as an older prepare.py wrote it
    common.write_json(os.path.join(out, "meta.json"), meta)
    data.main([out])
    captured = capsys.readouterr()
    assert "records no shard checksums" in captured.err and "train:" in captured.out


# meta_train.py: keys that only some tasks read, and out_dir
def test_meta_train_out_dir_that_cannot_be_made(data_dir, tmp_path):
    (tmp_path / "f").write_text("keep")
    for out, why in ((tmp_path / "f", "File exists"), (tmp_path / "f" / "x", "Not a directory")):
        with pytest.raises(ConfigError, match=rf"^out_dir {out} cannot be created \({why}\); "
                                              rf"choose another out_dir$"):
            run(data_dir, out, "--meta_ratio=0.0", "--max_steps=1")
    assert (tmp_path / "f").read_text() == "keep"


def test_meta_train_positions_n_way_above_the_vocabulary(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=rf"^n_way 1000 > the {ENC.n_vocab} token ids of "
                                          rf"tokenizer 'tiny' .*; lower n_way$"):
        run(data_dir, tmp_path, "--meta_task=positions", "--n_way=1000", "--max_steps=1")


def test_meta_train_lm_task_names_meta_seq_len(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="lower k_shot or meta_seq_len$"):
        run(data_dir, tmp_path, "--meta_task=lm", "--inner_params=all", "--meta_seq_len=300",
            "--max_steps=1")


RUN = ["--meta_ratio=0.0", "--max_steps=4", "--eval_interval=2", "--save_interval=2",
       "--meta_seq_len=8"]


def test_resume_with_max_steps_below_the_checkpoint_is_refused(data_dir, run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    with pytest.raises(ConfigError, match=r"^max_steps 2 is below step 4 of .*ckpt.pt; give "
                                          r"--max_steps=4 or more to continue it$"):
        run(data_dir, out, *RUN, "--max_steps=2", "--resume=True")


def test_fresh_run_keeps_the_log_of_an_earlier_run_without_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0, "val_loss": 5.9}\n')
    run(data_dir, out, *RUN, "--max_steps=1")
    assert (out / "log.jsonl.earlier-1").read_text() == '{"step": 0, "val_loss": 5.9}\n'
    assert f"note: {out / 'log.jsonl'} of an earlier run that wrote no checkpoint is kept as " \
           f"{out / 'log.jsonl.earlier-1'}" in capsys.readouterr().out


@pytest.mark.parametrize("cause", ["damaged", "permission"])
def test_fallback_resume_keeps_the_unreadable_ckpt_and_says_why(data_dir, run_dir, tmp_path,
                                                                 capsys, monkeypatch, cause):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    if cause == "damaged":
        (out / "ckpt.pt").write_bytes(b"not a checkpoint")
        why = r"UnpicklingError: .* \(truncated, damaged or not a checkpoint\)"
    else:  # unreadable for a moment: the file is intact, and it alone holds AdamW's state
        load = torch.load

        def refuse(path, *a, **k):
            if str(path).endswith("ckpt.pt"):
                raise PermissionError(13, "Permission denied", str(path))
            return load(path, *a, **k)
        monkeypatch.setattr(torch, "load", refuse)
        why = r"PermissionError: Permission denied \(the file may be intact: fix the cause"
    before = (out / "ckpt.pt").read_bytes()
    run(data_dir, out, *RUN, "--max_steps=6", "--resume=True")
    printed = capsys.readouterr().out
    assert (out / "ckpt.pt.unreadable-1").read_bytes() == before
    assert re.search(f"cannot read checkpoint {out / 'ckpt.pt'}: {why}", printed)
    assert f"kept the unreadable {out / 'ckpt.pt'} as {out / 'ckpt.pt.unreadable-1'}" in printed
    monkeypatch.undo()
    assert common.load_checkpoint(str(out / "ckpt.pt"))["step"] == 6  # the resumed run's


# adapt_eval.py
def other_tokenizer_ckpt(run_dir, tmp_path):
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=False)
    ckpt["tokenizer"] = "gpt2"
    path = str(tmp_path / "other.pt")
    common.save_checkpoint(path, ckpt)
    return path


ADAPT_CASES = [
    (["--ks", "0"], "--ks must be at least 1, got 0"),
    (["--docs", "0"], "--docs must be at least 1, got 0"),
    (["--chunk_len", "0"], "--chunk_len must be at least 1, got 0"),
    (["--inner_optimizer=adam"], "--inner_optimizer must be one of sgd, adamw, got 'adam'"),
    (["--inner_lr_schedule=cos"], "--inner_lr_schedule must be one of linear, cosine, constant"),
    (["--inner_lr=-1"], "--inner_lr must be at least 0, got -1.0"),
    (["--inner_beta2=1"], "--inner_beta2 must be below 1, got 1.0"),
    (["--ks", "100"], r"no val document has the 809 tokens of 100 \+ 1 chunks of 8 and a target "
                      r"\(the longest has \d+\); lower the largest --ks or --chunk_len$"),
]


@pytest.mark.parametrize("flags,error", ADAPT_CASES, ids=[" ".join(c[0]) for c in ADAPT_CASES])
def test_adapt_eval_flags(run_dir, tmp_path, flags, error):
    out = tmp_path / "a.json"
    with pytest.raises(SystemExit, match="^adapt_eval.py: error: .*" + error):
        adapt_eval.main([run_dir, "--out", str(out), "--docs", "2"] + flags)
    assert not out.exists()


def test_adapt_eval_refuses_checkpoints_of_other_tokens(data_dir, run_dir, tmp_path):
    other = other_tokenizer_ckpt(run_dir, tmp_path)
    with pytest.raises(SystemExit, match=f"^adapt_eval.py: error: {other} uses tokenizer 'gpt2', "
                                         f".*ckpt.pt 'tiny': their losses are not comparable"):
        adapt_eval.main([run_dir, other, "--docs", "2", "--out", str(tmp_path / "a.json")])
    with pytest.raises(SystemExit, match=f"^adapt_eval.py: error: {data_dir} holds 'tiny' tokens, "
                                         f"the checkpoints read 'gpt2'; give --data_dir"):
        adapt_eval.main([other, "--data_dir", data_dir, "--out", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()


def test_adapt_eval_out_checked_before_the_work(run_dir, tmp_path):
    with pytest.raises(SystemExit, match=f"--out {tmp_path} is a folder; give a file name"):
        adapt_eval.main([run_dir, "--out", str(tmp_path)])
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match=r"a.json: its folder cannot be created \(File exists\)"):
        adapt_eval.main([run_dir, "--out", str(tmp_path / "f" / "a.json")])


# the small tools: (module, argv, error); tmp is the test's tmp_path
TOOL_CASES = [
    (sample, ["{run}", "--tokens", "0"], "--tokens must be at least 1, got 0"),
    (sample, ["{run}", "--temperature", "nan"],
     "--temperature must be above 0, got nan"),
    (export_hf, ["{run}", "{tmp}/f"],
     r"output folder {tmp}/f cannot be created \(File exists\)"),
    (analyze, ["{run}", "--probe_batch", "0"], "--probe_batch must be at least 1"),
    (analyze, ["{run}", "--tol", "-1"], "--tol must be at least 0, got -1.0"),
    (analyze, ["{run}", "--probe_text", "{tmp}/none.txt"],
     "--probe_text {tmp}/none.txt is not a file"),
    (analyze, ["{run}", "--out", "{tmp}/f"],
     r"--out {tmp}/f cannot be created \(File exists\)"),
    (analyze, ["{run}", "--data_dir", "{tmp}/none"],
     "no val_NNNNNN.bin shards in {tmp}/none; give --data_dir of the run's shards, or "
     "--probe_text FILE"),
    (ner_eval, ["{run}", "--lr", "-1"], r"--lr must be at least 0, got -1.0"),
    (ner_eval, ["{run}", "--threads", "-1"], "--threads must be at least 0"),
    (ner_eval, ["{run}", "--beta2", "1"], r"--beta2 must lie in \[0, 1\)"),
    # results are written after every fine-tuning run: the path is checked before any
    (ner_eval, ["{run}", "--data_dir", "{tmp}/none", "--out", "{tmp}/f/ner.json"],
     r"--out {tmp}/f/ner.json: its folder cannot be created \(File exists\); choose another "
     r"--out"),
]


@pytest.mark.parametrize("tool,argv,error", TOOL_CASES,
                         ids=[f"{t.__name__} {' '.join(a[1:])}" for t, a, _ in TOOL_CASES])
def test_tools_refuse_bad_flags_in_one_line(run_dir, tmp_path, capsys, monkeypatch, tool, argv,
                                            error):
    monkeypatch.setattr(common, "get_encoding", lambda name: ENC)
    (tmp_path / "f").write_text("keep")
    fill = lambda s: s.format(run=run_dir, tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        tool.main([fill(a) for a in argv])
    # argparse's errors (status 2) are printed; the others are the exit message
    said = capsys.readouterr().err.strip() if e.value.code == 2 else str(e.value.code)
    # in-process argparse names the program __main__.py; analyze.py's errors from its work come
    # without the prefix
    assert re.match(rf"(\S+\.py: error: )?" + fill(error), said) and "\n" not in said
    assert (tmp_path / "f").read_text() == "keep"


@pytest.mark.parametrize("argv", [["ner_eval.py", "ckpt", "--epochs", "0"],
                                  ["analyze.py", "--compare", "one"],
                                  ["prepare.py", "--out", "x"],
                                  ["adapt_eval.py", "ckpt", "--nope"]])
def test_argument_errors_are_one_line(argv):
    rc, err = cli([sys.executable] + argv)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"{argv[0]}: error: ")
    assert err[0].endswith(f"(see {argv[0]} --help)")


@pytest.mark.parametrize("env,error", [
    ({"RUNS": "vanila"}, "ablate.sh: unknown run 'vanila' in RUNS; valid: vanilla smlmt "
                         "smlmt-inner0 positions lm-adamw"),
    ({"RUNS": "vanilla", "STEPS": "1e3"}, "ablate.sh: STEPS must be a positive whole number, "
                                          "got '1e3'"),
    ({"RUNS": "vanilla", "DATA": "/nonexistent"},
     "ablate.sh: no .venv/bin/python or no /nonexistent/meta.json: run bash run_cpu.sh first"),
])
def test_ablate_refuses_unknown_runs_and_steps(env, error):
    rc, err = cli(["bash", "ablate.sh"], env=env)
    assert rc == 1 and len(err) == 1 and err[0].startswith(error)
