"""How a step splits over ranks (common.layout, meta_train.plan, --plan), the paper layout
rehearsed on 8 CPU ranks against one process, and the pieces of the GPU path that must not depend
on luck: the all-reduce's bucket layout, the autocast cache before the query forward, the torch
version."""
import glob
import json
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import meta_train
import prepare
from common import ConfigError, configure
from conftest import ROOT, make_tiny_encoding, torchrun

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
PAPER = {"11m.py", "65m.py", "181m.py", "570m.py"}
WORLD_SIZES = [1, 2, 4, 8, 16, 32]


def config(*args):
    return SimpleNamespace(**configure(meta_train.DEFAULTS, list(args)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_config_starts_at_every_world_size_or_is_refused_with_a_value_that_works(world_size):
    for path in CONFIGS:
        c = config(path)
        try:
            common.check_config(c, world_size, need_data=False)
        except ConfigError as e:
            assert os.path.basename(path) not in PAPER, (path, world_size, str(e))
            assert "\n" not in str(e)
            key, value = re.search(r"set (\w+)=(\d+)", str(e)).groups()  # the suggested value
            c = config(path, f"--{key}={value}")
            common.check_config(c, world_size, need_data=False)
        p = meta_train.plan(c, world_size)
        # an equal share per rank, in micro-batches no larger than batch_size
        assert p.micro <= c.batch_size and p.micro * p.accum * world_size == c.total_batch_size
        assert p.per_rank == p.micro * p.accum and p.ar_rank_tokens == p.per_rank * c.seq_len
        # every episode runs on exactly one rank; no rank has two more than another
        assert sum(p.episodes) == c.episodes_per_step and max(p.episodes) - min(p.episodes) <= 1
        assert p.ar_tokens == c.total_batch_size * c.seq_len  # the step does not depend on ranks
        assert p.memory > 16 * p.n_params and p.flops > 0
        text = "\n".join(meta_train.plan_lines(c, p, world_size))
        assert f"{p.micro} micro-batch x {p.accum} accumulation x {world_size} ranks" in text


def test_layout_of_the_570m_config():
    c = config(os.path.join(ROOT, "configs", "570m.py"))
    common.check_config(c, 1, need_data=False)  # episodes_per_step 0 -> 4, as a run resolves it
    at = {w: meta_train.plan(c, w) for w in (1, 8, 16, 32)}
    assert [(p.micro, p.accum) for p in at.values()] == [(32, 8), (32, 1), (16, 1), (8, 1)]
    assert at[8].episodes == [1, 1, 1, 1, 0, 0, 0, 0]
    assert len({(p.ar_flops, p.meta_flops, p.ar_tokens, p.meta_tokens) for p in at.values()}) == 1
    # 16 bytes per parameter of state; the activations of a micro-batch shrink with it
    assert at[1].memory_parts["weights, grads, AdamW"] == 16 * 576_527_360
    assert at[16].memory < at[8].memory
    with pytest.raises(ConfigError, match=r"total_batch_size 256 does not split over 24 ranks: "
                                          r"set total_batch_size=768 \(full micro-batches"):
        common.check_config(c, 24, need_data=False)


def test_plan_flag_prints_the_layout_without_data(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "meta_train.py"),
                        os.path.join(ROOT, "configs", "570m.py"), "--plan", "--world_size=16",
                        f"--data_dir={tmp_path / 'none'}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "576,527,360 parameters" in p.stdout
    assert "16 micro-batch x 1 accumulation x 16 ranks x 512 seq_len (8,192 tokens per rank" in \
        p.stdout
    assert "1 on ranks 0-3, 0 on ranks 4-15" in p.stdout and "12 of 16 ranks idle" in p.stdout
    assert re.search(r"estimated FLOPs per step 3\.11e\+14 .* memory per device ~\d+\.\d GiB "
                     r"under bf16 autocast", p.stdout)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "meta_train.py"),
                        os.path.join(ROOT, "configs", "cpu.py"), "--plan", "--world_size=32"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == (
        "config error: total_batch_size 16 does not split over 32 ranks: set "
        "total_batch_size=256 (full micro-batches of batch_size 8 on 32 ranks) or run on a number "
        "of ranks that divides it")


# 36 three-letter words, each one token: enough candidates for 32-way episodes
WORDS = [a + b + c for a in "bdfg" for b in "aei" for c in "klm"]
REHEARSAL = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=384",
             "--meta_hidden=32", "--seq_len=16", "--meta_seq_len=16", "--compile=False",
             # the 570m config's batch and episode layout
             "--total_batch_size=256", "--batch_size=32", "--episodes_per_step=4", "--n_way=32",
             "--k_shot=4", "--q_query=4", "--meta_ratio=0.5",
             # steps 0 and 1 are AR, step 2 is meta at seed 42
             "--max_steps=3", "--eval_interval=3", "--save_interval=3", "--log_interval=1",
             "--eval_sequences=8", "--eval_episodes=3", "--warmup_steps=1", "--inner_lr=0.5"]


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory):
    enc = make_tiny_encoding(WORDS)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    out = str(tmp_path_factory.mktemp("words"))
    prepare.write_shards(docs, enc, out, val_tokens=2000, progress=False)
    prepare.build_index(out, enc, min_per_million=0, max_per_million=10 ** 6, max_occurrences=200,
                        context=16)
    assert enc.n_vocab + 1 <= 384
    return out


def weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {**ckpt["model"], **{"head." + k: v for k, v in ckpt["head"].items()}}


def test_eight_ranks_on_the_paper_layout_equal_one_process(words_dir, tmp_path):
    """8 gloo ranks x 32 sequences and 4 episodes on ranks 0-3 (ranks 4-7 hold no gradient in the
    meta step) against 1 process x 8 accumulated micro-batches and all 4 episodes."""
    args = REHEARSAL + [f"--data_dir={words_dir}"]
    meta_train.train(config(*args, f"--out_dir={tmp_path / 'one'}"))
    code, out, err = torchrun(8, [*args, f"--out_dir={tmp_path / 'eight'}"], tmp_path / "logs")
    assert code == 0, err
    assert "32 micro-batch x 1 accumulation x 8 ranks" in out
    assert "4 smlmt episodes (1 on ranks 0-3, 0 on ranks 4-7)" in out
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")]
            for d in ("one", "eight")]
    keys = ("grad_norm", "ar_loss", "meta_loss", "support_acc", "query_acc")
    rows = [[[r[k] for k in keys] for r in log if r["val_loss"] is None] for log in logs]
    assert [r[1] is not None for r in rows[0]] == [True, True, False]  # AR, AR, meta
    for a, b in zip(*rows):
        # an accuracy is a count: an argmax tie resolved the other way moves it by one example
        assert a == [None if v is None else pytest.approx(v, abs=0.02) if k.endswith("acc")
                     else pytest.approx(v, rel=1e-4) for k, v in zip(keys, b)]
    assert logs[0][-1]["val_loss"] == pytest.approx(logs[1][-1]["val_loss"], abs=1e-4)
    one, eight = (weights(tmp_path / d / "ckpt.pt") for d in ("one", "eight"))
    assert one.keys() == eight.keys()
    for k in one:
        torch.testing.assert_close(one[k], eight[k], atol=1e-5, rtol=0, msg=k)


def test_all_reduce_sends_the_same_buckets_whatever_gradients_a_rank_holds(monkeypatch):
    # two ranks' views of one meta step: one ran an episode (some gradients), the other had none.
    # Both must send the same buckets in the same order, cut from the fixed parameter list
    import torch.distributed as dist
    sent = []

    def fake_all_reduce(t):
        sent.append(tuple(t.shape))
        if len(sent) == 1:  # the counts of ranks holding a gradient: the peer holds them all
            t += 1

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(2, 3), (4,), (1,), (3, 2), (2,)]]
    layouts = []
    for has in ([True, True, False, True, False], [False] * 5):
        sent.clear()
        for p, h in zip(params, has):
            p.grad = torch.full_like(p, 2.0) if h else None
        meta_train.all_reduce_grads(params, bucket_numel=5)
        layouts.append(list(sent))
        # a parameter some rank holds a gradient for gets one on every rank (zeros from this one)
        assert all(p.grad is not None for p in params)
        assert all(torch.equal(p.grad, torch.full_like(p, 2.0 * h)) for p, h in zip(params, has))
    # the counts, then buckets of at least 5 elements: 6 | 4 + 1 | 6 | 2
    assert layouts[0] == layouts[1] == [(5,), (6,), (5,), (6,), (2,)]
    # a parameter no rank holds a gradient for is left out of every bucket, on every rank
    monkeypatch.setattr(dist, "all_reduce", lambda t: sent.append(tuple(t.shape)))
    sent.clear()
    for p, h in zip(params, [True, False, False, True, False]):
        p.grad = torch.ones_like(p) if h else None
    meta_train.all_reduce_grads(params, bucket_numel=5)
    assert sent == [(5,), (6,), (6,)] and [p.grad is not None for p in params] == [
        True, False, False, True, False]


def test_all_reduce_leaves_none_where_no_rank_has_a_gradient(tmp_path):
    # one gloo rank (a world of 1): the sum is the identity, a missing gradient stays missing
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in [(2, 3), (4,), (1,), (3, 2), (2,)]]
        for p in params[:-1]:
            p.grad = torch.randn_like(p)
        before = [p.grad.clone() for p in params[:-1]]
        meta_train.all_reduce_grads(params, bucket_numel=5)
        for p, g in zip(params, before):
            assert torch.equal(p.grad, g)
        assert params[-1].grad is None  # AdamW skips it, as it would in one process
    finally:
        dist.destroy_process_group()


def test_accuracy_counts_labelled_examples_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    assert meta_train.accuracy(logits, torch.tensor([0, 0, -1, 1])).item() == pytest.approx(2 / 3)
    assert meta_train.accuracy(logits, torch.tensor([-1, -1, -1, -1])).item() == 0.0


def test_query_forward_after_adaptation_does_not_read_no_grad_casts(monkeypatch):
    # the support accuracy is taken under no_grad at the adapted weights; autocast caches the
    # weight casts it makes there, and those carry no gradient path. The cache must be cleared
    # between that forward and the query forward with grad
    from data import Episode
    from model import Llama, ModelArgs
    events = []
    clear, head_logits = torch.clear_autocast_cache, meta_train.head_logits
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: (events.append("clear"), clear()))
    monkeypatch.setattr(meta_train, "head_logits", lambda params, h: (
        events.append("grad" if torch.is_grad_enabled() else "no_grad"), head_logits(params, h))[1])
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                            max_seq_len=8))
    head = meta_train.MetaHead(16, 64, 8)
    ep = Episode(support_x=torch.randint(0, 64, (4, 8)), support_y=torch.tensor([0, 0, 1, 1]),
                 query_x=torch.randint(0, 64, (4, 8)), query_y=torch.tensor([0, 1, 0, 1]),
                 word_ids=torch.tensor([5, 9]))
    c = SimpleNamespace(**{**meta_train.DEFAULTS, "inner_steps": 2, "n_way": 2})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        meta_train.smlmt_episode(model, head, ep, c, loss_scale=1.0)
    last_no_grad = max(i for i, e in enumerate(events) if e == "no_grad")
    query = events.index("grad", last_no_grad)
    assert "clear" in events[last_no_grad:query], events


def test_a_torch_older_than_the_pin_is_refused(monkeypatch, tmp_path):
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert f"torch=={common.TORCH_PIN}\n" in f.read()
    monkeypatch.setattr(torch, "__version__", "2.12.1+cu121")
    with pytest.raises(ConfigError, match=r"^torch 2.12.1\+cu121 is older than 2.13.0, which "
                                          r"requirements.txt pins: pip install torch==2.13.0"):
        common.init_device("cpu")
    monkeypatch.setattr(torch, "__version__", "2.14.0.dev20260101+cu128")
    assert common.init_device("cpu").type == "cpu"


def test_wall_time_counts_checkpoint_writes_and_training_time_does_not(words_dir, tmp_path,
                                                                       monkeypatch):
    # a clock that moves by 1 us a reading, and by 10 s while a checkpoint is written
    clock = [0.0]

    def now():
        clock[0] += 1e-6
        return clock[0]

    monkeypatch.setattr(meta_train, "time", SimpleNamespace(time=now))
    save = common.save_checkpoint

    def slow_save(path, obj):
        clock[0] += 10.0
        save(path, obj)

    monkeypatch.setattr(common, "save_checkpoint", slow_save)
    small = [a for a in REHEARSAL if not a.startswith(("--total_batch_size", "--n_way",
                                                         "--max_steps", "--save_interval"))]
    meta_train.train(config(*small, "--total_batch_size=8", "--batch_size=4", "--n_way=4",
                            "--meta_ratio=0.0", "--max_steps=2", "--save_interval=1",
                            "--eval_interval=1", "--keep_checkpoints=False",
                            f"--data_dir={words_dir}", f"--out_dir={tmp_path}"))
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    # saves at steps 0 and 1 before the training rows of steps 1 and 2, none counted as training
    assert [(r["step"], r["time"], r["wall"]) for r in rows if r["val_loss"] is None] == [
        (1, pytest.approx(0, abs=1e-3), pytest.approx(10, abs=1e-3)),
        (2, pytest.approx(0, abs=1e-3), pytest.approx(20, abs=1e-3))]


def test_the_plan_printed_in_reference_md_is_what_plan_prints(monkeypatch, capsys):
    # REFERENCE.md shows `python meta_train.py configs/570m.py --plan --world_size=8`, wrapped
    monkeypatch.chdir(ROOT)
    meta_train.print_plan(["configs/570m.py", "--plan", "--world_size=8"])
    printed = capsys.readouterr().out.split()
    doc = open(os.path.join(ROOT, "REFERENCE.md")).read()
    block = doc[doc.index("```\nconfigs/570m.py on 8 rank(s)") + 4:]
    assert printed == block[:block.index("```")].split()


# RESULTS.md's mechanism-table and LM-task commands: configs/cpu.py with each row's keys, at the
# quick start's batch (16 sequences, micro-batch 8) and episode shape (2 episodes of 8-way 4+4),
# shrunk in width and length only
NARROW = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=384",
          "--meta_hidden=32", "--seq_len=16", "--meta_seq_len=16", "--max_steps=4",
          "--eval_interval=2", "--save_interval=2", "--eval_sequences=8", "--eval_episodes=4",
          "--log_interval=1"]
PAPER_READ = ["--meta_read=mask", "--meta_features=raw", "--inner_lr=0.1"]
RESULTS_RUNS = {
    "quick start meta": [],
    "paper": PAPER_READ + ["--meta_loss_weight=1.0"],
    "paper-w0.01": PAPER_READ,
    "standardize": ["--meta_features=standardize"],
    "center-w0.1": ["--meta_loss_weight=0.1"],
    "center-w1": ["--meta_loss_weight=1.0"],
    "proto": ["--meta_head_rows=proto"],
    "lm": ["--meta_task=lm", "--meta_read=mask", "--meta_features=raw", "--inner_params=all",
           "--inner_optimizer=adamw", "--inner_lr=1e-3", "--inner_lr_schedule=cosine",
           "--inner_warmup_steps=2", "--meta_loss_weight=1.0", "--max_steps=200",
           "--meta_seq_len=8"],  # the last shrinks its chunks: 5 x 16 tokens outgrow these docs
}


@pytest.mark.parametrize("name", list(RESULTS_RUNS))
def test_the_results_commands_run_on_configs_cpu(words_dir, tmp_path, name):
    keys = RESULTS_RUNS[name]
    # the row's keys after the narrowing ones, as on its command line (a later flag wins)
    c = config(os.path.join(ROOT, "configs", "cpu.py"), *NARROW, *keys,
               f"--data_dir={words_dir}", f"--out_dir={tmp_path}", "--max_steps=4")
    meta_train.train(c)
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    want = configure(meta_train.DEFAULTS, [os.path.join(ROOT, "configs", "cpu.py"), *keys])
    for key in ("meta_task", "meta_read", "meta_features", "meta_head_rows", "meta_loss_weight",
                "inner_lr", "inner_params", "n_way", "k_shot", "q_query", "episodes_per_step",
                "total_batch_size", "batch_size"):
        assert ckpt["config"][key] == want[key], key
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert any(r.get("meta_loss") is not None for r in rows)  # a meta step ran
    last = [r for r in rows if r["val_loss"] is not None][-1]
    assert last["step"] == 4 and 0.0 <= last["val_query_acc"] <= 1.0
