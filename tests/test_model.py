import math

import pytest
import torch
import torch.nn.functional as F

from model import Llama, ModelArgs, apply_rope, estimate_mfu, peak_flops, precompute_rope, repeat_kv

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


def test_fresh_loss_close_to_log_vocab():
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    idx = torch.randint(0, 50257, (4, 64))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1  # padding is ignored
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50304)) < 0.1


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
        h = model.hidden(idx)
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
