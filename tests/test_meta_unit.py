"""The FOMAML episodes against independent reference computations, and the configurator."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import meta_train
from meta_train import ConfigError, MetaHead, configure, lm_episode, smlmt_episode
from model import Llama, ModelArgs

V, N, K, Q, T = 40, 4, 3, 2, 8


def setup(seed=0):
    torch.manual_seed(seed)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V,
                            max_seq_len=16))
    head = MetaHead(32, V, 16)
    word_ids = torch.tensor([7, 3, 21, 30])
    ep = SimpleNamespace(support_x=torch.randint(0, V, (N * K, T)),
                         support_y=torch.arange(N).repeat_interleave(K),
                         query_x=torch.randint(0, V, (N * Q, T)),
                         query_y=torch.arange(N).repeat_interleave(Q), word_ids=word_ids)
    return model, head, ep


def cfg(**kw):
    base = dict(inner_params="head", inner_steps=3, inner_lr=0.5)
    base.update(kw)
    return SimpleNamespace(**base)


def ref_logits(model, head, x, word_ids):
    """The head read the slow way: full-vocabulary logits, then the sampled words' columns."""
    h = model(x, return_hidden=True)[2]["hidden"][:, -1]
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
        s_feat = model(ep.support_x, return_hidden=True)[2]["hidden"][:, -1]
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


def test_fomaml_head_mode_never_reruns_backbone_in_inner_loop():
    model, head, ep = setup()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
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


def test_lm_episode_gradient_at_adapted_weights_and_restore():
    model, _, _ = setup(2)
    before = snapshot(model)
    x = torch.randint(0, V, (3, 9))
    ep = (x[:, :-1], x[:, 1:], torch.randint(0, V, (1, 8)), torch.randint(0, V, (1, 8)))
    c = cfg(inner_params="all", inner_steps=2, inner_lr=0.2)
    lm_episode(model, ep, c, loss_scale=0.5)

    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    for _ in range(c.inner_steps):
        grads = torch.autograd.grad(ref(ep[0], ep[1])[1], params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= c.inner_lr * g
    for p in params:
        p.grad = None
    (0.5 * ref(ep[2], ep[3])[1]).backward()
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
    with pytest.raises(ConfigError, match=r"unknown config key 'inner_lrr' \(.*bad.py\).*'inner_lr'"):
        configure(meta_train.DEFAULTS, [str(f)])


def test_lr_schedule():
    c = SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert meta_train.get_lr(0, c) == pytest.approx(0.1)
    assert meta_train.get_lr(9, c) == pytest.approx(1.0)
    assert meta_train.get_lr(60, c) == pytest.approx(0.55)
    assert meta_train.get_lr(110, c) == pytest.approx(0.1)
