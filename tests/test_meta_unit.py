"""The FOMAML episodes against independent reference computations, and the configurator."""
import copy
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import meta_train
from common import ConfigError, configure
from meta_train import MetaHead, lm_episode, smlmt_episode
from model import Llama, ModelArgs

V, N, K, Q, T = 40, 4, 3, 2, 8


def setup(seed=0):
    torch.manual_seed(seed)
    # GPT-2 init: these checks were sized on its small weights (the adaptation test's margins)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V,
                            max_seq_len=16, init="gpt2"))
    head = MetaHead(32, V, 16)
    word_ids = torch.tensor([7, 3, 21, 30])
    ep = data.Episode(support_x=torch.randint(0, V, (N * K, T)),
                      support_y=torch.arange(N).repeat_interleave(K),
                      query_x=torch.randint(0, V, (N * Q, T)),
                      query_y=torch.arange(N).repeat_interleave(Q), word_ids=word_ids)
    return model, head, ep


def cfg(**kw):
    return SimpleNamespace(**{**meta_train.DEFAULTS, "inner_params": "head", "inner_steps": 3,
                              "inner_lr": 0.5, **kw})


def ref_logits(model, head, x, word_ids):
    """The head read the slow way: full-vocabulary logits, then the sampled words' columns."""
    h = model.hidden(x)[:, -1]
    return head.out(head.mlp(h))[:, word_ids]


def snapshot(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_fomaml_head_mode_gradients():
    model, head, ep = setup()
    before = snapshot(model, head)
    c = cfg()
    smlmt_episode(model, head, ep, c, loss_scale=1.0)

    # reference: adapt a full copy of the head with explicit SGD on the frozen support features
    fast = copy.deepcopy(head)
    with torch.no_grad():
        s_feat = model.hidden(ep.support_x)[:, -1]
    for _ in range(c.inner_steps):
        loss = F.cross_entropy(fast.out(fast.mlp(s_feat))[:, ep.word_ids], ep.support_y)
        grads = torch.autograd.grad(loss, list(fast.parameters()))
        with torch.no_grad():
            for p, g in zip(fast.parameters(), grads):
                p -= c.inner_lr * g
    ref_model = copy.deepcopy(model)
    for p in ref_model.parameters():
        p.grad = None
    q_loss = F.cross_entropy(ref_logits(ref_model, fast, ep.query_x, ep.word_ids), ep.query_y)
    q_loss.backward()  # gradient of the query loss at the adapted head, backbone with it fixed

    for (name, p), ref in zip(head.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    # rows of words outside the episode get no gradient
    other = torch.ones(V, dtype=torch.bool)
    other[ep.word_ids] = False
    assert (head.out.weight.grad[other] == 0).all()
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        if ref.grad is None:
            assert p.grad is None or (p.grad == 0).all(), name
        else:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert model.output.weight.grad is None  # the vocabulary projection is not on the path
    for p, b in zip(snapshot(model, head), before):
        assert torch.equal(p, b)  # stored weights unchanged by the episode


def paper_meta_micro_batches(model, head, episodes, inner_steps, inner_lr, scale):
    """pico-maml-train (afbb6fb) src/training/trainer.py, the meta branch of _training_loop, slowly
    and literally: per meta micro-batch, snapshot the head; per inner step inner_optimizer.
    zero_grad(), support forward through the frozen backbone, backward, SGD step; then the query
    loss / accumulation, backward; then head.load_state_dict(snapshot). Grads left on the head
    and backbone are what the outer AdamW step would read."""
    inner_optimizer = torch.optim.SGD(head.parameters(), lr=inner_lr)
    for ep in episodes:
        orig_state = {k: v.clone() for k, v in head.state_dict().items()}
        for _ in range(inner_steps):
            for p in model.parameters():
                p.requires_grad_(False)
            inner_optimizer.zero_grad()
            logits = head.out(head.mlp(model.hidden(ep.support_x)[:, -1]))[:, ep.word_ids]
            F.cross_entropy(logits, ep.support_y).backward()
            inner_optimizer.step()
            for p in model.parameters():
                p.requires_grad_(True)
        logits = head.out(head.mlp(model.hidden(ep.query_x)[:, -1]))[:, ep.word_ids]
        (F.cross_entropy(logits, ep.query_y) * scale).backward()
        with torch.no_grad():
            head.load_state_dict(orig_state)


@pytest.mark.parametrize("inner_steps", [3, 0])
def test_head_grad_paper_replays_the_paper_codes_loop(inner_steps):
    model, head, ep0 = setup(2)
    episodes = [ep0] + [setup(s)[2] for s in (3, 4)]  # one meta step of three episodes
    episodes[1].word_ids = torch.tensor([5, 9, 2, 11])
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(head)
    c = cfg(head_grad="paper", inner_steps=inner_steps, inner_lr=0.5)
    for ep in episodes:
        smlmt_episode(model, head, ep, c, loss_scale=1 / 3)
    paper_meta_micro_batches(ref_model, ref_head, episodes, inner_steps, 0.5, 1 / 3)
    for (name, p), ref in zip(list(model.named_parameters()) + list(head.named_parameters()),
                              list(ref_model.parameters()) + list(ref_head.parameters())):
        if ref.grad is None:
            assert p.grad is None or (p.grad == 0).all(), name
        else:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    # and it is not FOMAML, unless there is no inner loop (then the paper's code is FOMAML)
    fomaml = copy.deepcopy(setup(2)[:2])
    for ep in episodes:
        smlmt_episode(*fomaml, ep, cfg(inner_steps=inner_steps, inner_lr=0.5), loss_scale=1 / 3)
    differs = [not torch.allclose(p.grad, f.grad, atol=1e-6)
               for p, f in zip(head.parameters(), fomaml[1].parameters())]
    assert all(differs) if inner_steps else not any(differs)
    for p, f in zip(model.parameters(), fomaml[0].parameters()):  # the backbone's: the same
        if p.grad is not None:
            torch.testing.assert_close(p.grad, f.grad, rtol=1e-5, atol=1e-6)


def test_fomaml_head_mode_never_reruns_backbone_in_inner_loop():
    model, head, ep = setup()
    calls = []
    model.norm.register_forward_hook(lambda *a: calls.append(1))  # once per backbone pass
    smlmt_episode(model, head, ep, cfg(inner_steps=10), loss_scale=1.0)
    assert len(calls) == 2  # support features once, query once


def test_fomaml_all_mode_gradients_and_exact_restore():
    model, head, ep = setup(1)
    before = snapshot(model, head)
    c = cfg(inner_params="all", inner_steps=2, inner_lr=0.1)
    smlmt_episode(model, head, ep, c, loss_scale=1.0)

    ref_model, fast = copy.deepcopy(model), copy.deepcopy(head)
    params = list(ref_model.parameters()) + list(fast.parameters())
    for _ in range(c.inner_steps):
        loss = F.cross_entropy(ref_logits(ref_model, fast, ep.support_x, ep.word_ids), ep.support_y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= c.inner_lr * g
    for p in params:
        p.grad = None
    F.cross_entropy(ref_logits(ref_model, fast, ep.query_x, ep.word_ids), ep.query_y).backward()
    for (name, p), ref in zip(list(model.named_parameters()) + list(head.named_parameters()),
                              params):
        if ref.grad is None:
            assert p.grad is None or (p.grad == 0).all(), name
        else:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    for p, b in zip(snapshot(model, head), before):
        assert torch.equal(p, b)  # restored bit-exactly


def test_an_episode_that_raises_leaves_the_weights_as_they_were(monkeypatch):
    # all mode adapts the backbone in place: an error in the middle of the inner loop (an
    # interrupt, running out of memory) must not leave adapted weights in the model
    model, head, ep = setup()
    before = snapshot(model, head)
    calls, head_logits = [], meta_train.head_logits

    def failing(params, h):
        calls.append(1)
        if len(calls) == 3:  # two inner steps have changed the backbone
            raise RuntimeError("boom")
        return head_logits(params, h)

    monkeypatch.setattr(meta_train, "head_logits", failing)
    with pytest.raises(RuntimeError, match="boom"):
        smlmt_episode(model, head, ep, cfg(inner_params="all", inner_steps=5), loss_scale=1.0)
    assert len(calls) == 3
    for p, b in zip(snapshot(model, head), before):
        assert torch.equal(p, b)


def test_lm_episode_gradient_at_adapted_weights_and_restore():
    model, _, _ = setup(2)
    before = snapshot(model)
    x = torch.randint(0, V, (3, 9))
    ep = data.Episode(x[:, :-1], x[:, 1:], torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8)))
    c = cfg(inner_params="all", inner_steps=2, inner_lr=0.2)
    lm_episode(model, ep, c, loss_scale=0.5)

    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    for _ in range(c.inner_steps):
        grads = torch.autograd.grad(ref(ep.support_x, ep.support_y)[1], params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= c.inner_lr * g
    for p in params:
        p.grad = None
    (0.5 * ref(ep.query_x, ep.query_y)[1]).backward()
    for (name, p), r in zip(model.named_parameters(), params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)
    for p, b in zip(snapshot(model), before):
        assert torch.equal(p, b)


def test_eval_episode_accumulates_nothing():
    model, head, ep = setup()
    q_loss, s_acc, q_acc = smlmt_episode(model, head, ep, cfg())
    assert all(p.grad is None for p in list(model.parameters()) + list(head.parameters()))
    assert 0 <= q_acc <= 1 and 0 <= s_acc <= 1 and q_loss > 0


def test_inner_loop_learns_support():
    model, head, ep = setup()
    _, acc0, _ = smlmt_episode(model, head, ep, cfg(inner_steps=1, inner_lr=0.0))
    _, acc, _ = smlmt_episode(model, head, ep, cfg(inner_steps=300, inner_lr=0.5))
    assert acc == 1.0 and acc0 < 1.0


def test_configure_overrides_and_types(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("dim = 64\nlearning_rate = 1\nimport math\n_private = 3\n")
    c = configure(meta_train.DEFAULTS, [str(f), "--n_layers=3", "--meta_task=lm",
                                        "--compile=False"])
    assert (c["dim"], c["n_layers"], c["meta_task"], c["compile"]) == (64, 3, "lm", False)
    assert c["learning_rate"] == 1.0 and type(c["learning_rate"]) is float
    assert meta_train.DEFAULTS["dim"] == 96  # defaults untouched
    # a flag wins over a file wherever the file stands; a string key takes its text as written
    c = configure(meta_train.DEFAULTS, ["--dim=128", str(f), "--out_dir=2024", "--data_dir=None"])
    assert (c["dim"], c["out_dir"], c["data_dir"]) == (128, "2024", "None")


@pytest.mark.parametrize("argv, words", [
    (["--n_wya=8"], ["unknown config key 'n_wya'", "did you mean 'n_way'"]),
    (["--n_way=8.5"], ["'n_way'", "must be int", "float"]),
    (["--compile=1"], ["'compile'", "must be bool"]),
    (["--dim"], ["expected --key=value"]),
    (["nope.py"], ["'nope.py' not found"]),
])
def test_configure_rejects(argv, words):
    with pytest.raises(ConfigError) as e:
        configure(meta_train.DEFAULTS, argv)
    for w in words:
        assert w in str(e.value)


def test_configure_rejects_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("inner_lrr = 0.1\n")
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'inner_lrr' \(.*bad.py\).*'inner_lr'"):
        configure(meta_train.DEFAULTS, [str(f)])


def test_lr_schedule():
    c = SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110,
                        lr_decay_steps=0, lr_schedule="cosine")
    lr = lambda step, **kw: meta_train.get_lr(step, SimpleNamespace(**{**vars(c), **kw}))
    assert lr(0) == pytest.approx(0.1)  # (step + 1) / warmup_steps of the peak
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)  # decay starts at warmup_steps, from the peak
    assert lr(60) == pytest.approx(0.55)  # halfway: the cosine's midpoint
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)  # held at min_lr
    assert lr(60, lr_schedule="linear") == pytest.approx(0.55)
    assert lr(35, lr_schedule="linear") == pytest.approx(1.0 - 0.9 * 0.25)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr(60, lr_decay_steps=210) == pytest.approx(quarter)
    # the paper's code: linear to 0 at step 10M, so 6000 steps stay within 0.04% of the peak
    paper = dict(learning_rate=3e-4, min_lr=0.0, warmup_steps=2500, max_steps=6000,
                 lr_decay_steps=10_000_000, lr_schedule="linear")
    assert lr(5999, **paper) == pytest.approx(3e-4 * (1 - 3499 / (10_000_000 - 2500)))
    assert lr(2499, **paper) == pytest.approx(3e-4)


def episode_under(dtype, mode, steps, compile=False):
    """(query loss, outer gradient) of one episode whose query windows are its support windows,
    so that adaptation must lower the query loss, under autocast to `dtype` on the CPU. Inner lrs
    small enough that 5 bf16 steps follow the fp32 trajectory (larger make all-mode chaotic)."""
    model, head, ep = setup(3)
    ep.query_x, ep.query_y = ep.support_x, ep.support_y
    c = cfg(inner_params="head" if mode == "head" else "all", inner_steps=steps,
            inner_lr={"head": 0.3, "all": 0.05, "lm": 0.3, "lm-adamw": 0.01}[mode],
            inner_optimizer="adamw" if mode == "lm-adamw" else "sgd")
    # aot_eager: dynamo and AOT autograd trace as inductor does (where autocast's casts become graph
    # ops), without the minutes of C++ codegen; meta_train's bf16 + inductor run is tested too
    run_model = torch.compile(model, dynamic=False, backend="aot_eager") if compile else model
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        if mode.startswith("lm"):
            x = ep.support_x[:3]
            # query: the first support chunk
            lm_ep = data.Episode(x[:, :-1], x[:, 1:], x[:1, :-1], x[:1, 1:])
            q_loss = lm_episode(run_model, lm_ep, c, loss_scale=1.0)[0]
        else:
            q_loss = smlmt_episode(run_model, head, ep, c, loss_scale=1.0)[0]
    grad = torch.cat([p.grad.flatten() for m in (model, head) for p in m.parameters()
                      if p.grad is not None])
    return q_loss.item(), grad


@pytest.mark.parametrize("mode", ["head", "all", "lm", "lm-adamw"])
def test_inner_steps_adapt_under_bf16_autocast(mode):
    # autocast caches the bf16 copy of every weight it casts and does not see in-place updates:
    # the episode must make the next forward read the adapted weights, not the cached originals
    loss0, grad0 = episode_under(torch.bfloat16, mode, 0)
    loss, grad = episode_under(torch.bfloat16, mode, 5)
    ref_loss, ref_grad = episode_under(torch.float32, mode, 5)
    assert ref_loss < 0.8 * loss0  # adaptation matters here (in fp32)
    assert loss < 0.8 * loss0, (loss0, loss)
    assert abs(loss - ref_loss) < 0.05 * ref_loss, (loss, ref_loss)  # bf16 tracks fp32
    cos = F.cosine_similarity(grad, ref_grad, dim=0)
    assert cos > 0.95 and F.cosine_similarity(grad0, ref_grad, dim=0) < 0.7, cos


def test_inner_steps_adapt_under_bf16_autocast_compiled():
    loss0, _ = episode_under(torch.bfloat16, "all", 0, compile=True)
    loss, _ = episode_under(torch.bfloat16, "all", 5, compile=True)
    ref_loss, _ = episode_under(torch.float32, "all", 5)
    assert loss < 0.8 * loss0 and abs(loss - ref_loss) < 0.05 * ref_loss, (loss0, loss, ref_loss)


def test_all_mode_leaves_the_vocabulary_projection_alone_when_compiled(monkeypatch):
    # a compiled model names its parameters "_orig_mod.*": the projection features() never uses
    # must still be left out of the adapted (and cloned) weights
    model, head, ep = setup()
    adapted, restore = [], meta_train.restore
    monkeypatch.setattr(meta_train, "restore", lambda p, s: (adapted.extend(p), restore(p, s)))
    compiled = torch.compile(model, dynamic=False, backend="aot_eager")
    smlmt_episode(compiled, head, ep, cfg(inner_params="all", inner_steps=1), loss_scale=1.0)
    assert len(adapted) == len(list(model.parameters())) - 1
    assert all(p is not model.output.weight for p in adapted)


def test_support_accuracy_is_measured_after_adaptation():
    model, head, ep = setup(4)
    c = cfg(inner_steps=1, inner_lr=20.0)
    _, s_acc, _ = smlmt_episode(model, head, ep, c)
    fast = copy.deepcopy(head)
    with torch.no_grad():
        s_feat = model.hidden(ep.support_x)[:, -1]
    logits = lambda: fast.out(fast.mlp(s_feat))[:, ep.word_ids]
    acc = lambda: (logits().argmax(-1) == ep.support_y).float().mean()
    before = acc()
    loss = F.cross_entropy(fast.out(fast.mlp(s_feat))[:, ep.word_ids], ep.support_y)
    with torch.no_grad():
        for p, g in zip(fast.parameters(), torch.autograd.grad(loss, list(fast.parameters()))):
            p -= c.inner_lr * g
    after = acc()
    assert before != after  # the step changes the accuracy, so the test can tell them apart
    assert s_acc == after


def test_meta_head_init():
    torch.manual_seed(0)
    for init, bound in [("xavier", math.sqrt(6 / (16 + 40))), ("default", 1 / math.sqrt(16))]:
        w = MetaHead(32, 40, 16, init=init).out.weight
        # uniform(-b, b): max |w| just under b, std b / sqrt(3)
        assert 0.95 * bound < w.abs().max() <= bound
        assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound


def test_defaults_are_the_papers_meta_run():
    # REFERENCE.md's table of the paper's settings states these; its code configured them so
    d = meta_train.DEFAULTS
    paper = dict(seq_len=512, total_batch_size=256, max_steps=6000, warmup_steps=2500,
                 learning_rate=3e-4, beta1=0.9, beta2=0.999, weight_decay=0.01,
                 decay_params="all", grad_clip=0.0, lr_schedule="linear",
                 lr_decay_steps=10_000_000, meta_ratio=0.5, n_way=32, k_shot=4, inner_steps=10,
                 inner_lr=0.01, inner_optimizer="sgd", meta_hidden=128, meta_head_init="xavier",
                 seed=42, inner_params="head", meta_task="smlmt")
    assert {k: d[k] for k in paper} == paper
    # a meta step reads as many tokens as an AR step: 4 SMLMT episodes of 32 x 8 x 128, or the
    # paper code's 32 positions episodes of its 8 x 512 micro-batches (its 256 sequences a step)
    assert d["episodes_per_step"] == 0
    c = SimpleNamespace(**d)
    assert common.auto_episodes_per_step(c) == 4 and 4 * 32 * 8 * 128 == 256 * 512
    c.meta_task = "positions"
    assert common.auto_episodes_per_step(c) == 32 and 32 * 8 * 512 == 256 * 512
    c.meta_task, c.inner_params = "lm", "all"
    assert common.auto_episodes_per_step(c) == round(256 * 512 / (5 * 128))
    c.episodes_per_step = 3  # a number that is set stays
    assert common.auto_episodes_per_step(c) == 3


def test_adamw_inner_step_is_a_hand_computed_adamw_step():
    torch.manual_seed(0)
    w0, x, y = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    w = w0.clone().requires_grad_()
    loss = lambda: ((w @ x - y) ** 2).sum()
    g = torch.autograd.grad(loss(), [w])[0]
    c = cfg(inner_optimizer="adamw", inner_steps=1, inner_lr=0.1, inner_weight_decay=0.05)
    meta_train.adapt([w], loss, c)
    # step 1: the bias-corrected moments are g and g^2, so the step is lr * g / (|g| + eps)
    ref = w0 * (1 - 0.1 * 0.05) - 0.1 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule, warmup", [("linear", 1), ("cosine", 0), ("constant", 2)])
def test_adamw_inner_loop_equals_torch_adamw_at_the_inner_schedule(schedule, warmup):
    torch.manual_seed(1)
    w0, x, y = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    c = cfg(inner_optimizer="adamw", inner_steps=4, inner_lr=0.05, inner_lr_schedule=schedule,
            inner_warmup_steps=warmup, inner_beta1=0.8, inner_beta2=0.99, inner_eps=1e-6,
            inner_weight_decay=0.1)
    w = w0.clone().requires_grad_()
    meta_train.adapt([w], lambda: ((w @ x - y) ** 2).sum(), c)
    ref = w0.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1.0, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    lrs = {"linear": [0.05, 0.05, 0.05 * 2 / 3, 0.05 / 3],  # warm-up 1, then to 0 at step 4
           "cosine": [0.05 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)],
           "constant": [0.025, 0.05, 0.05, 0.05]}[schedule]
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        ((ref @ x - y) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_lm_episode_with_adamw_inner_loop_gradient_and_restore():
    model, _, _ = setup(2)
    before = snapshot(model)
    x = torch.randint(0, V, (3, 9))
    ep = data.Episode(x[:, :-1], x[:, 1:], torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8)))
    c = cfg(inner_params="all", inner_steps=3, inner_lr=0.01, inner_optimizer="adamw",
            inner_lr_schedule="linear", inner_warmup_steps=1, inner_weight_decay=0.1)
    lm_episode(model, ep, c, loss_scale=1.0)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    for lr in [0.01, 0.01, 0.005]:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        ref(ep.support_x, ep.support_y)[1].backward()
        opt.step()
    opt.zero_grad()
    ref(ep.query_x, ep.query_y)[1].backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)
    for p, b in zip(snapshot(model), before):
        assert torch.equal(p, b)  # restored bit for bit, AdamW's state gone with the episode


def test_lr_schedule_boundaries():
    c = SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110,
                        lr_decay_steps=0, lr_schedule="linear")
    lr = lambda step, **kw: meta_train.get_lr(step, SimpleNamespace(**{**vars(c), **kw}))
    assert lr(109) == pytest.approx(1.0 - 0.9 * 99 / 100)  # one step before the end
    assert lr(110) == pytest.approx(0.1) and lr(111) == pytest.approx(0.1)
    # no warm-up: the peak at step 0
    assert lr(0, warmup_steps=0) == pytest.approx(1.0)
    assert lr(55, warmup_steps=0) == pytest.approx(1.0 - 0.9 * 0.5)
    # decay ending where warm-up ends: the peak at warmup_steps, min_lr one step later
    assert lr(10, lr_decay_steps=10) == pytest.approx(1.0)
    assert lr(11, lr_decay_steps=10) == pytest.approx(0.1)
    # constant: warm-up, then the peak for good, whatever the decay keys say
    assert lr(4, lr_schedule="constant") == pytest.approx(0.5)
    assert [lr(s, lr_schedule="constant") for s in (10, 60, 110, 500)] == [1.0] * 4


def test_sgd_inner_loop_at_a_warmup_schedule():
    # SGD over 3 inner steps, warm-up 2 then linear to 0 at step 3: lrs 0.05, 0.1, 0.1
    torch.manual_seed(0)
    w0, x, y = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    w = w0.clone().requires_grad_()
    loss = lambda w: ((w @ x - y) ** 2).sum()
    c = cfg(inner_steps=3, inner_lr=0.1, inner_lr_schedule="linear", inner_warmup_steps=2)
    acc = meta_train.adapt([w], lambda: loss(w), c, lambda: torch.tensor(0.5))
    assert acc == 0.5  # support_acc, read once after the steps
    ref = w0.clone().requires_grad_()
    for lr in (0.05, 0.1, 0.1):
        g, = torch.autograd.grad(loss(ref), [ref])
        ref = (ref - lr * g).detach().requires_grad_()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-6)


def test_features_read_the_last_or_the_given_positions():
    model, _, _ = setup()
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        h = model.hidden(x)
        torch.testing.assert_close(meta_train.features(model, x), h[:, -1])
        at = torch.tensor([5, 1])
        # (B * A, C) in (sequence, position) order, as PositionsSampler orders the labels
        ref = torch.stack([h[b, a] for b in range(3) for a in at.tolist()])
        torch.testing.assert_close(meta_train.features(model, x, at), ref)


def test_accuracy_leaves_out_unlabelled_examples():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, -1, 1])  # right, wrong, left out, right
    assert meta_train.accuracy(logits, y).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("task, mode", [("smlmt", "head"), ("smlmt", "all"), ("positions", "head"),
                                        ("lm", "all")])
def test_episode_tokens_and_flops(task, mode):
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V,
                            max_seq_len=64))
    c = cfg(meta_task=task, inner_params=mode, n_way=5, k_shot=3, q_query=2, meta_seq_len=16,
            seq_len=64, positions_batch=6, inner_steps=7)
    tokens, flops = meta_train.episode_tokens_and_flops(model, c)
    f = lambda T, out=False: model.flops_per_token(T, output=out)  # forward + backward
    if task == "smlmt":  # 15 support, 10 query windows of 16; the inner loop reads features
        support, query, per = 15 * 16, 10 * 16, f(16)
        read = support + query
    elif task == "positions":  # 6 sequences of 64 read once, passed as support and as query
        support, query, per = 6 * 64, 6 * 64, f(64)
        read = 6 * 64
    else:  # 3 support chunks and one query chunk of 16, through the output projection
        support, query, per = 3 * 16, 16, f(16, True)
        read = support + query
    assert tokens == read
    # head: one support forward (a third); all: 7 inner forward-backward steps, then a forward
    inner = support * per / 3 if mode == "head" else 7 * support * per + support * per / 3
    assert flops == pytest.approx(inner + query * per, rel=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_inner_loop_leaves_weights_the_loss_does_not_use_alone(optimizer):
    # autograd.grad gives None for them: no step, and no weight decay either
    torch.manual_seed(0)
    w, unused = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    before = unused.detach().clone()
    c = cfg(inner_optimizer=optimizer, inner_steps=2, inner_lr=0.1, inner_weight_decay=0.5)
    meta_train.adapt([w, unused], lambda: (w ** 2).sum(), c)
    assert torch.equal(unused.detach(), before)


def test_episodes_in_one_bf16_autocast_region_read_the_restored_weights():
    # restore() writes the weights back in place: autocast's cached bf16 copies of the adapted
    # weights must not be what the next episode of the same region reads
    model, head, ep = setup(3)
    c = cfg(inner_params="all", inner_steps=3, inner_lr=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = smlmt_episode(model, head, ep, c)
        second = smlmt_episode(model, head, ep, c)
    assert [v.item() for v in first] == [v.item() for v in second]


def test_centroid_accuracy_by_hand():
    # class 0 support at (0, 0) and (2, 0): mean (1, 0); class 1 at (0, 4): mean (0, 4);
    # class 2 has no support example (its only one is unlabelled) and is never predicted
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    s_y = torch.tensor([0, 0, 1, -1])
    q = torch.tensor([[1.0, 1.0],    # nearer (1, 0): class 0, right
                      [0.0, 3.0],    # nearer (0, 4): class 1, right
                      [1.0, 1.9],    # distance 1.9 to class 0, sqrt(1 + 4.41) to 1: 0, wrong
                      [9.0, 9.0],    # labelled 2, the class with no mean: wrong
                      [5.0, 5.0]])   # left out
    q_y = torch.tensor([0, 1, 1, 2, -1])
    acc = meta_train.centroid_accuracy(s, s_y, q, q_y, 3)
    assert acc.item() == pytest.approx(2 / 4)


def test_support_standardisation_invariants():
    torch.manual_seed(0)
    s = torch.randn(12, 5) * torch.tensor([10.0, 0.1, 1.0, 3.0, 0.5]) + 7.0
    assert meta_train.feature_norm(s, "raw")(s) is s
    z = meta_train.feature_norm(s, "standardize")(s)
    torch.testing.assert_close(z.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    # eps 1e-5 in the spread: the dimension of spread 0.1 comes out 1e-4 short of 1
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(5), atol=2e-4, rtol=0)
    # per-dimension scale and shift of the features leave the standardised ones as they were
    a, b = torch.tensor([3.0, 0.2, 1.0, 5.0, 2.0]), torch.randn(5)
    torch.testing.assert_close(meta_train.feature_norm(s * a + b, "standardize")(s * a + b), z,
                               atol=1e-3, rtol=2e-3)  # eps again
    # the mean and spread are the support's: other features are moved and scaled by the same
    q = torch.randn(3, 5)
    torch.testing.assert_close(meta_train.feature_norm(s, "standardize")(q),
                               (q - s.mean(0)) / (s.std(0, correction=0) + 1e-5))
    # one spread for all dimensions: centred, mean square 1 over all entries, the geometry kept
    z = meta_train.feature_norm(s, "center")(s)
    sd = ((s - s.mean(0)) ** 2).mean().sqrt() + 1e-5
    torch.testing.assert_close((z ** 2).mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cdist(z, z) * sd, torch.cdist(s, s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(meta_train.feature_norm(3.0 * s + b, "center")(3.0 * s + b), z,
                               atol=1e-4, rtol=1e-4)


def test_standardised_episode_ignores_the_scale_of_each_feature():
    # the final norm's weight scales each feature dimension: with standardisation the episode
    # is the same (its [MASK] state's shared direction and scale are taken out), raw it is not
    model, head, ep = setup(5)
    results = {}
    for features in ("raw", "standardize"):
        c = cfg(meta_features=features, inner_steps=5, inner_lr=0.3)
        first = smlmt_episode(model, head, ep, c)[0].item()
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled.norm.weight.mul_(torch.linspace(0.2, 5.0, 32))
        results[features] = (first, smlmt_episode(scaled, head, ep, c)[0].item())
    assert results["standardize"][0] == pytest.approx(results["standardize"][1], rel=1e-4)
    assert abs(results["raw"][0] - results["raw"][1]) > 1e-2


def reference_episode_grads(model, head, ep, c):
    """The slow first-order reference for the well-posed keys: the inner loop's change of every
    episode weight is computed on detached copies, then the query loss is taken at (original
    weights + that change) as a function of the originals, so that backward gives the FOMAML
    gradient, including the one through the Proto-MAML rows into the MLP."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    pos = -2 if c.meta_read == "before" else -1
    with torch.no_grad():
        s_raw = model.hidden(ep.support_x)[:, pos]
    if c.meta_features == "standardize":
        mean, sd = s_raw.mean(0), s_raw.std(0, correction=0) + 1e-5
        norm = lambda f: (f - mean) / sd
    elif c.meta_features == "center":
        mean = s_raw.mean(0)
        sd = (s_raw - mean).pow(2).sum(1).mean().div(s_raw.shape[1]).sqrt() + 1e-5
        norm = lambda f: (f - mean) / sd
    else:
        norm = lambda f: f
    mlp = list(head.mlp.parameters())

    def mlp_out(ws, f):
        for w, b in zip(ws[0::2], ws[1::2]):
            f = torch.relu(f @ w.T + b)
        return f

    def rows():
        if c.meta_head_rows == "words":
            return [head.out.weight[ep.word_ids], head.out.bias[ep.word_ids]]
        h = mlp_out(mlp, norm(s_raw))
        mu = torch.stack([h[ep.support_y == k].mean(0) for k in range(len(ep.word_ids))])
        return [2 * mu, -(mu ** 2).sum(-1)]

    logits = lambda ps, f: mlp_out(ps[:-2], f) @ ps[-2].T + ps[-1]
    start = [p.detach().clone() for p in mlp + rows()]
    fast = [p.clone().requires_grad_() for p in start]
    for _ in range(c.inner_steps):
        loss = F.cross_entropy(logits(fast, norm(s_raw)), ep.support_y)
        with torch.no_grad():
            for p, g in zip(fast, torch.autograd.grad(loss, fast)):
                p -= c.inner_lr * g
    delta = [(f - s).detach() for f, s in zip(fast, start)]
    adapted = [p + d for p, d in zip(mlp + rows(), delta)]
    q_feat = norm(model.hidden(ep.query_x)[:, pos])
    F.cross_entropy(logits(adapted, q_feat), ep.query_y).backward()
    return model, head


@pytest.mark.parametrize("features, rows, read", [
    ("raw", "words", "mask"), ("standardize", "words", "mask"), ("raw", "proto", "mask"),
    ("standardize", "proto", "before"), ("raw", "words", "before"), ("center", "words", "before"),
    ("center", "proto", "mask")])
def test_well_posed_keys_give_the_first_order_gradient(features, rows, read):
    model, head, ep = setup(6)
    before = snapshot(model, head)
    c = cfg(meta_features=features, meta_head_rows=rows, meta_read=read, inner_steps=3,
            inner_lr=0.3)
    smlmt_episode(model, head, ep, c, loss_scale=1.0)
    ref_model, ref_head = reference_episode_grads(model, head, ep, c)
    for (name, p), ref in zip(list(model.named_parameters()) + list(head.named_parameters()),
                              list(ref_model.parameters()) + list(ref_head.parameters())):
        if ref.grad is None:
            assert p.grad is None or (p.grad == 0).all(), name
        else:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    if rows == "proto":  # the class rows came from the prototypes: no output row moves
        assert (head.out.weight.grad == 0).all() and (head.out.bias.grad == 0).all()
        assert head.mlp[0].weight.grad.abs().sum() > 0
    for p, b in zip(snapshot(model, head), before):
        assert torch.equal(p, b)


def test_proto_rows_start_as_the_nearest_prototype_classifier():
    # W_c = 2 mu_c, b_c = -|mu_c|^2: the logits are -|h - mu_c|^2 + |h|^2, so with no inner steps
    # the episode's query accuracy is the nearest-centroid accuracy of the head's hidden layer
    model, head, ep = setup(7)
    c = cfg(meta_head_rows="proto", inner_steps=0)
    with torch.no_grad():
        s_h = head.mlp(model.hidden(ep.support_x)[:, -1])
        q_h = head.mlp(model.hidden(ep.query_x)[:, -1])
        w, b = head.proto_rows(model.hidden(ep.support_x)[:, -1], ep.support_y, N)
    mu = torch.stack([s_h[ep.support_y == k].mean(0) for k in range(N)])
    torch.testing.assert_close(q_h @ w.T + b, -torch.cdist(q_h, mu) ** 2 + (q_h ** 2).sum(-1, True),
                               rtol=1e-4, atol=1e-4)
    _, _, q_acc = smlmt_episode(model, head, ep, c)
    assert q_acc == meta_train.centroid_accuracy(s_h, ep.support_y, q_h, ep.query_y, N)


def test_probe_reports_no_adaptation_and_centroid_accuracy():
    model, head, ep = setup(8)
    probe = {}
    c = cfg(inner_steps=4, inner_lr=0.5)
    smlmt_episode(model, head, ep, c, probe=probe)
    assert probe["query_acc0"] == smlmt_episode(model, head, ep, cfg(inner_steps=0))[2]
    with torch.no_grad():
        s, q = model.hidden(ep.support_x)[:, -1], model.hidden(ep.query_x)[:, -1]
    assert probe["centroid_acc"] == meta_train.centroid_accuracy(s, ep.support_y, q, ep.query_y, N)
    # the probe changes nothing else the episode returns
    assert [v.item() for v in smlmt_episode(model, head, ep, c)] == [
        v.item() for v in smlmt_episode(model, head, ep, c, probe={})]


def test_mask_inputs_replaces_a_share_of_inputs():
    x = torch.arange(20000).view(100, 200) % 50
    rng = lambda: np.random.default_rng(1)
    assert meta_train.mask_inputs(x, rng(), 0.0, 99) is x
    m = meta_train.mask_inputs(x, rng(), 0.1, 99)
    masked = m == 99
    assert 0.09 < masked.float().mean() < 0.11
    assert torch.equal(m[~masked], x[~masked]) and (x == 99).sum() == 0
    assert torch.equal(m, meta_train.mask_inputs(x, rng(), 0.1, 99))  # drawn from rng alone


@pytest.mark.parametrize("features, rows", [("standardize", "words"), ("standardize", "proto"),
                                            ("raw", "proto"), ("center", "words")])
def test_well_posed_keys_adapt_under_bf16_autocast(features, rows):
    model, head, ep = setup(3)
    ep.query_x, ep.query_y = ep.support_x, ep.support_y
    out = {}
    for dtype, steps in [(torch.bfloat16, 0), (torch.bfloat16, 5), (torch.float32, 5)]:
        m, h = copy.deepcopy(model), copy.deepcopy(head)
        c = cfg(meta_features=features, meta_head_rows=rows, inner_steps=steps, inner_lr=0.3)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = smlmt_episode(m, h, ep, c, loss_scale=1.0)[0].item()
        out[dtype, steps] = loss, torch.cat([p.grad.flatten() for mod in (m, h)
                                             for p in mod.parameters() if p.grad is not None])
    (loss0, _), (loss, grad), (ref_loss, ref_grad) = out.values()
    assert loss < 0.8 * loss0 and abs(loss - ref_loss) < 0.05 * ref_loss, (loss0, loss, ref_loss)
    # bf16 features against fp32: over seeds 3-5 the paper's raw/words episode's cosine is 0.91-1.0
    assert F.cosine_similarity(grad, ref_grad, dim=0) > 0.9


def test_head_gradients_of_two_episodes_that_share_words_add_up():
    # one step of two episodes in one process: the words 3 and 7 are classes of both (in other
    # class slots), so their output rows must get the sum of two gradients, not the last one
    model, head, ep1 = setup()
    _, _, ep2 = setup(seed=1)
    ep2.word_ids = torch.tensor([3, 11, 7, 5])
    c = cfg()
    alone = []
    for ep in (ep1, ep2):
        m, h = copy.deepcopy(model), copy.deepcopy(head)
        smlmt_episode(m, h, ep, c, loss_scale=1.0)
        alone.append({n: p.grad.clone() for n, p in [*m.named_parameters(), *h.named_parameters()]
                      if p.grad is not None})
    smlmt_episode(model, head, ep1, c, loss_scale=0.25)
    smlmt_episode(model, head, ep2, c, loss_scale=0.75)
    got = {n: p.grad for n, p in [*model.named_parameters(), *head.named_parameters()]
           if p.grad is not None}
    assert set(got) == set(alone[0]) == set(alone[1])
    for n in got:
        torch.testing.assert_close(got[n], 0.25 * alone[0][n] + 0.75 * alone[1][n], rtol=1e-5,
                                   atol=1e-7, msg=n)
    g = head.out.weight.grad
    for w in (3, 7):  # both episodes' gradients are in the shared rows, and each is non-zero
        assert alone[0]["out.weight"][w].abs().sum() > 0
        assert alone[1]["out.weight"][w].abs().sum() > 0
        assert not torch.allclose(g[w], 0.75 * alone[1]["out.weight"][w])
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[[3, 5, 7, 11, 21, 30]] = False
    assert (g[untouched] == 0).all() and (head.out.bias.grad[untouched] == 0).all()


@pytest.mark.parametrize("argv, want, got", [
    (["--n_way=True"], "int", "bool True"),  # bool is a subclass of int, not an int key's value
    (["--learning_rate=True"], "float", "bool True"),  # nor of a float key
    (["--dim=64.0"], "int", "float 64.0"),  # a whole float is not an int
    (["--compile=0"], "bool", "int 0"),
    (["--eval_interval=[10]"], "int", "list [10]"),
])
def test_configure_rejects_a_value_of_a_related_type(tmp_path, argv, want, got):
    for args in (argv, [str(tmp_path / "c.py")]):  # on the command line and in a file
        (tmp_path / "c.py").write_text(argv[0][2:].replace("=", " = ") + "\n")
        with pytest.raises(ConfigError, match=re.escape(f"must be {want}, got {got}")):
            configure(meta_train.DEFAULTS, args)
