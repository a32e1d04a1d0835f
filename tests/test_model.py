import math

import pytest
import torch
import torch.nn.functional as F

from model import (Llama, ModelArgs, RMSNorm, apply_rope, estimate_mfu, peak_flops, precompute_rope,
                   repeat_kv)

PAPER_COUNTS = {96: 11_282_784, 384: 64_595_328, 768: 181_095_168, 1536: 569_808_384}


def tiny(vocab_size=64, **kw):
    torch.manual_seed(0)
    args = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=32)
    args.update(kw)
    return Llama(ModelArgs(**args)).eval()


@pytest.mark.parametrize("dim", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(dim):
    with torch.device("meta"):  # shapes only: no 570M allocation
        model = Llama(ModelArgs(dim=dim))
    assert model.num_params() == PAPER_COUNTS[dim]


def test_paper_configs_set_those_sizes():
    # the config files are what users run; they must produce the counted sizes
    import common
    import meta_train
    for name, dim in [("11m", 96), ("65m", 384), ("181m", 768), ("570m", 1536)]:
        cfg = common.configure(meta_train.DEFAULTS, [f"configs/{name}.py"])
        assert cfg["dim"] == dim and cfg["n_layers"] == 12
        assert (cfg["n_heads"], cfg["n_kv_heads"]) == (12, 4)


def test_causality():
    model = tiny()
    idx = torch.randint(0, 64, (2, 16))
    t = 7
    idx2 = idx.clone()
    idx2[:, t + 1] = (idx2[:, t + 1] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def naive_attention(attn, x, cos, sin):
    """Written out from the definition: q k^T / sqrt(d), causal mask, softmax, kv heads repeated."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rope((x @ attn.wq.weight.T).view(B, T, H, D), cos, sin)
    k = apply_rope((x @ attn.wk.weight.T).view(B, T, Hkv, D), cos, sin)
    v = (x @ attn.wv.weight.T).view(B, T, Hkv, D)
    out = torch.zeros(B, T, H, D)
    for h in range(H):
        kv = h // (H // Hkv)  # query head h reads kv head h // group size
        for i in range(T):
            s = torch.stack([(q[:, i, h] * k[:, j, kv]).sum(-1) for j in range(i + 1)], -1)
            p = torch.softmax(s / math.sqrt(D), dim=-1)  # (B, i+1)
            out[:, i, h] = (p[:, :, None] * v[:, : i + 1, kv]).sum(1)
    return out.reshape(B, T, H * D) @ attn.wo.weight.T


def test_sdpa_gqa_matches_naive_attention():
    model = tiny()
    attn = model.layers[0].attention
    x = torch.randn(2, 10, 48)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    with torch.no_grad():
        fast = attn(x, cos, sin)
        ref = naive_attention(attn, x, cos, sin)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_repeat_kv_groups_consecutive_query_heads():
    x = torch.arange(2 * 3).float().view(1, 1, 2, 3)
    y = repeat_kv(x, 3)
    assert y.shape == (1, 1, 6, 3)
    for h in range(6):
        assert torch.equal(y[0, 0, h], x[0, 0, h // 3])


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    cos, sin = precompute_rope(D, 64, 10000.0)
    q, k = torch.randn(D), torch.randn(D)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, D).expand(1, 64, 1, D), cos, sin)[0, m, 0]
        kn = apply_rope(k.view(1, 1, 1, D).expand(1, 64, 1, D), cos, sin)[0, n, 0]
        return (qm * kn).sum()

    for delta in [0, 1, 5, 17]:
        ref = score(delta, 0)
        for n in [3, 20, 40]:
            torch.testing.assert_close(score(n + delta, n), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(5, 0), score(6, 0))  # and it does depend on m - n


@pytest.mark.parametrize("init", ["pytorch", "gpt2"])
def test_fresh_loss_close_to_log_vocab(init):
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                            init=init))
    idx = torch.randint(0, 50257, (4, 64))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1  # padding is ignored
    with torch.no_grad():
        _, loss = model(idx, targets)
    # the final norm gives unit-RMS features, so a logit is ~N(0, d s^2) with s the output layer's
    # std: 1/3 under PyTorch's U(+-1/sqrt(d)), ~0 under N(0, 0.02); E[logsumexp] = ln V + var / 2
    var = 1 / 3 if init == "pytorch" else 64 * 0.02 ** 2
    assert abs(loss.item() - math.log(50304) - var / 2) < 0.05


def test_ignore_index_drops_padding():
    model = tiny()
    idx = torch.randint(0, 64, (1, 8))
    tgt = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        no_logits, loss = model(idx, tgt.masked_fill(torch.arange(8) >= 4, -1))
        logits, _ = model(idx)
    assert no_logits is None  # a loss comes alone: nobody keeps the fp32 logits alive
    ref = F.cross_entropy(logits[0, :4], tgt[0, :4])
    torch.testing.assert_close(loss, ref)


def test_hidden_is_what_the_output_projection_reads():
    model = tiny()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits, _ = model(idx)
        h = model.hidden(idx)
        # written out: embedding, the blocks, the final norm
        ref = model.tok_embeddings(idx)
        for layer in model.layers:
            ref = layer(ref, model.rope_cos[:12], model.rope_sin[:12])
        ref = model.norm(ref)
    assert h.shape == (2, 12, 48)
    torch.testing.assert_close(h, ref, rtol=0, atol=0)
    torch.testing.assert_close(model.output(h), logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sequence length 33 > max_seq_len 32"):
        model.hidden(torch.zeros(1, 33, dtype=torch.long))


def test_compiled_forward_matches_eager():
    model = tiny(n_layers=1)
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref, _ = model(idx)
        ref_h = model.hidden(idx)
        model.compile()  # in place, both entry points
        out, _ = model(idx)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        h = model.hidden(idx)
        # hidden() called directly (the meta and NER heads' entry point) runs compiled too
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)
    assert [n for n, _ in model.named_parameters()][0] == "tok_embeddings.weight"  # no prefix


def test_flops_and_mfu():
    model = tiny()
    n = model.num_params() - 64 * 48  # without the input embedding
    assert model.num_params(embedding=False) == n
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 48 * 32
    assert peak_flops("cpu") is None and estimate_mfu(1e12, None) is None
    assert estimate_mfu(312e12 / 2, 312e12) == 0.5


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_matches_whole_names(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda") == peak


def test_generate_extends_sequence():
    model = tiny()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, top_k=5)
    assert out.shape == (1, 8) and (out[:, :3] == 0).all()


# Closed-form references: the invariants above (causality, relative positions) hold for many wrong
# formulas (an epsilon outside the root, any RoPE frequency); these pin the formulas themselves.

def test_rmsnorm_matches_its_formula_where_eps_matters():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-4)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    w = norm.weight.detach().double()
    for scale in (1.0, 1e-2, 1e-3):  # at 1e-2 the mean square is about eps; below, eps dominates
        x = torch.randn(3, 5, 16) * scale
        xd = x.double()
        ref = xd / torch.sqrt((xd ** 2).sum(-1, keepdim=True) / 16 + 1e-4) * w
        torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-7)
        # bf16 in, bf16 out, computed in fp32: the bf16 rounding of the exact value, which a
        # computation in bf16 misses for many elements (its mean square loses bits)
        out = norm(x.bfloat16())
        assert out.dtype == torch.bfloat16
        exact = (xd.bfloat16().double() / torch.sqrt((xd.bfloat16().double() ** 2).mean(
            -1, keepdim=True) + 1e-4) * w).bfloat16()
        assert (out == exact).float().mean() > 0.97


def test_rope_tables_match_the_closed_form():
    D, end, theta = 8, 20, 500.0
    cos, sin = precompute_rope(D, end, theta)
    assert cos.shape == sin.shape == (end, D // 2)
    for m in range(end):
        for i in range(D // 2):
            angle = m * theta ** (-2 * i / D)
            assert cos[m, i].item() == pytest.approx(math.cos(angle), abs=1e-5)
            assert sin[m, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
    # the model's tables: head_dim = dim / n_heads, its own theta, max_seq_len positions
    model = tiny(rope_theta=500.0, dim=48, n_heads=6)
    ref_cos, ref_sin = precompute_rope(8, 32, 500.0)
    assert torch.equal(model.rope_cos, ref_cos) and torch.equal(model.rope_sin, ref_sin)
    assert torch.equal(model.rope(5)[0], ref_cos[:5]) and torch.equal(model.rope(5)[1], ref_sin[:5])


def test_apply_rope_rotates_adjacent_pairs_by_their_angles():
    torch.manual_seed(0)
    B, T, H, D = 2, 3, 2, 6
    x = torch.randn(B, T, H, D)
    angles = torch.rand(T, D // 2) * 6
    out = apply_rope(x, angles.cos(), angles.sin())
    for t in range(T):
        for i in range(D // 2):
            c, s = math.cos(angles[t, i]), math.sin(angles[t, i])
            a, b = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]  # (real, imaginary) of pair i
            torch.testing.assert_close(out[:, t, :, 2 * i], a * c - b * s)
            torch.testing.assert_close(out[:, t, :, 2 * i + 1], a * s + b * c)
    assert apply_rope(x.bfloat16(), angles.cos(), angles.sin()).dtype == torch.bfloat16


def reference_logits(model, idx):
    """The whole decoder written out from its definition in float64 from the model's weights: its
    own RMSNorm, RoPE (angles m theta^(-2i/D) on adjacent pairs), causal GQA softmax attention,
    SwiGLU, pre-norm residual blocks, final norm, output projection."""
    a = model.args
    W = {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.dim // a.n_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps) * w

    pos = torch.arange(T, dtype=torch.float64)[:, None]
    ang = pos * a.rope_theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)  # (T, D/2)

    def rope(v):  # (B, T, heads, D)
        re, im = v[..., 0::2], v[..., 1::2]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.stack([re * c - im * s, re * s + im * c], -1).flatten(-2)

    h = W["tok_embeddings.weight"][idx]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(a.n_layers):
        p = f"layers.{i}."
        x = rms(h, W[p + "attention_norm.weight"])
        q = rope((x @ W[p + "attention.wq.weight"].T).view(B, T, H, D))
        k = rope((x @ W[p + "attention.wk.weight"].T).view(B, T, Hkv, D))
        v = (x @ W[p + "attention.wv.weight"].T).view(B, T, Hkv, D)
        heads = []
        for j in range(H):
            kv = j // (H // Hkv)
            s = (q[:, :, j] @ k[:, :, kv].transpose(1, 2)) / math.sqrt(D)
            heads.append(s.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, kv])
        h = h + torch.cat(heads, -1) @ W[p + "attention.wo.weight"].T
        x = rms(h, W[p + "ffn_norm.weight"])
        gate = x @ W[p + "feed_forward.w1.weight"].T
        up = x @ W[p + "feed_forward.w3.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ W[p + "feed_forward.w2.weight"].T
    return rms(h, W["norm.weight"]) @ W["output.weight"].T


def test_forward_matches_the_written_out_decoder():
    # a large eps and theta other than the default, so that both must come from the args;
    # norm weights away from 1, so that each norm's own weight must be applied where it belongs
    model = tiny(norm_eps=1e-3, rope_theta=300.0, hidden_dim=40)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            else:  # weights of 0.02 leave the residual stream near its embedding: enlarge them
                p.mul_(5)
    idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(idx)
        hidden = model.hidden(idx)
    ref = reference_logits(model, idx)
    assert logits.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(idx)[0].dtype == torch.float32  # the loss over the vocabulary needs fp32
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden @ model.output.weight.detach().T, logits, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("init", ["pytorch", "gpt2"])
def test_init_stds(init):
    torch.manual_seed(0)
    L = 4
    model = Llama(ModelArgs(dim=64, n_layers=L, n_heads=4, n_kv_heads=2, vocab_size=512,
                            max_seq_len=16, init=init))
    assert model.args.hidden_dim == 4 * 64
    kinds = set()
    for name, p in model.named_parameters():
        kinds.add(name.split(".")[-2] if "layers" in name else name.split(".")[0])
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        if init == "gpt2":  # the residual branches' output projections start 1 / sqrt(2 L) smaller
            std = 0.02 / math.sqrt(2 * L) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        elif name == "tok_embeddings.weight":  # nn.Embedding: N(0, 1)
            std = 1.0
        else:  # nn.Linear: kaiming-uniform with a = sqrt(5), i.e. U(-b, b), b = 1 / sqrt(fan_in)
            bound = 1 / math.sqrt(p.shape[1])
            std = bound / math.sqrt(3)
            assert p.abs().max().item() <= bound, name
            assert p.abs().max().item() > 0.99 * bound, name  # uniform: it reaches the bound
        assert p.std().item() == pytest.approx(std, rel=0.05), name
        assert abs(p.mean().item()) < 0.1 * std, name
    assert kinds == {"tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3",
                     "attention_norm", "ffn_norm", "norm", "output"}


def test_pytorch_init_at_11m_is_the_paper_codes():
    """The paper's decoder (pico-maml-train, src/model/pico_decoder.py) has no init code: at 11m
    (d 96, SwiGLU 384) wq has std 1/sqrt(3 * 96) = 0.059, w2 1/sqrt(3 * 384) = 0.0295."""
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=96, vocab_size=2048, max_seq_len=16))
    assert model.args.init == "pytorch"
    ffn = model.layers[0].feed_forward
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.0589, rel=0.03)
    assert ffn.w2.weight.std().item() == pytest.approx(0.0295, rel=0.03)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.03)
    with pytest.raises(ValueError, match="init must be"):
        ModelArgs(init="xavier")


def test_flops_of_passes_without_the_output_projection():
    model = tiny()
    n = model.num_params(embedding=False)
    assert model.flops_per_token(16, output=False) == 6 * (n - 64 * 48) + 12 * 2 * 48 * 16


def test_greedy_and_top_k_sampling():
    model = tiny()
    prompt = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(0))
    # top_k=1 and a temperature near 0 are both greedy; past max_seq_len (32) the prefix is cut
    ref = prompt
    with torch.no_grad():
        for _ in range(5):
            logits, _ = model(ref[:, -32:])
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, 5, top_k=1), ref)
    assert torch.equal(model.generate(prompt, 5, temperature=0.0), ref)
    # top_k=2 samples both of the two most likely tokens, and no other
    with torch.no_grad():
        top2 = set(model(prompt)[0][0, -1].topk(2).indices.tolist())
    out = model.generate(prompt.expand(300, 30), 1, top_k=2)[:, -1]
    assert set(out.tolist()) == top2


def test_model_defaults_are_the_papers():
    # DESIGN.md's models: the configs set only dim, everything else comes from here
    a = ModelArgs()
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.hidden_dim) == (
        96, 12, 12, 4, 50304, 384)
    assert (a.norm_eps, a.rope_theta, a.max_seq_len) == (1e-6, 10000.0, 512)


def test_from_checkpoint_restores_the_weights():
    from dataclasses import asdict
    model = tiny()
    ckpt = {"model_args": asdict(model.args), "model": model.state_dict()}
    torch.manual_seed(1)  # another init than tiny()'s: only the loaded weights agree
    loaded = Llama.from_checkpoint(ckpt)
    assert loaded.args == model.args
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))
