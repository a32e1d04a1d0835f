"""
A small Llama-style decoder (the pico-decoder family of the paper): RMSNorm, rotary position
embeddings, grouped-query attention through scaled_dot_product_attention, SwiGLU, no biases,
untied input embedding and output projection. Close to llama2.c's model.py, plus what the rest
of nanoMAML reads: final hidden states (meta head, NER heads), FLOPs per token and MFU.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 96
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 4
    vocab_size: int = 50304  # GPT-2's 50257 + [MASK] (id 50257), padded to a multiple of 64
    hidden_dim: int = 0  # SwiGLU hidden size; 0 means 4 * dim (the paper's models)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    # "pytorch": the modules' own defaults, which the paper's decoder kept (it has no init code):
    # embedding N(0, 1), every Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)), norms 1. "gpt2": N(0,
    # 0.02), the residual branches' output projections (wo, w2) 0.02 / sqrt(2 n_layers), norms 1
    init: str = "pytorch"

    def __post_init__(self):
        if self.hidden_dim == 0:
            self.hidden_dim = 4 * self.dim
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must be a multiple of n_heads {self.n_heads}, and "
                             f"n_heads a multiple of n_kv_heads {self.n_kv_heads}")
        if self.init not in ("pytorch", "gpt2"):
            raise ValueError(f"init must be 'pytorch' or 'gpt2', got {self.init!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in fp32: under bf16 autocast the mean of squares loses too many bits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def precompute_rope(head_dim, end, theta):
    """cos, sin tables (end, head_dim // 2): position m rotates pair i by m theta^(-2i/head_dim)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x (B, T, H, D) with D viewed as D/2 pairs (real, imag); rotate each pair by its angle
    xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def repeat_kv(x, n_rep):
    """(B, T, n_kv, D) -> (B, T, n_kv * n_rep, D): each kv head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, T, n_kv, D = x.shape
    return x[:, :, :, None, :].expand(B, T, n_kv, n_rep, D).reshape(B, T, n_kv * n_rep, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def qkv(self, x, cos, sin):
        """x (B, T, C) -> q, k, v (B, H, T, D): RoPE on q and k, each kv head repeated for the
        query heads it serves."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        y = F.scaled_dot_product_attention(*self.qkv(x, cos, sin), is_causal=True)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        # not persistent: derived from args, so checkpoints hold only learned weights
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if args.init == "gpt2":
            self.apply(self._init_weights)
            # each residual branch adds to the stream 2 * n_layers times, so its output projection
            # starts smaller to keep the stream's variance independent of depth
            for name, p in self.named_parameters():
                if name.endswith("wo.weight") or name.endswith("w2.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope(self, T):
        """cos, sin tables (T, head_dim / 2) of positions 0..T-1."""
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} > max_seq_len {self.args.max_seq_len}")
        return self.rope_cos[:T], self.rope_sin[:T]

    def hidden(self, idx):
        """idx (B, T) token ids -> final hidden states (B, T, C) after the last norm: what the meta
        and NER heads read. It skips the vocabulary projection, in the small models a large
        share of the FLOPs."""
        cos, sin = self.rope(idx.shape[1])
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def forward(self, idx, targets=None):
        """idx (B, T) -> (logits (B, T, V) in fp32, None); with targets (B, T) (-1 marks padding)
        -> (None, next-token cross-entropy): whoever asks for the loss does not need the logits,
        and a caller holding them until its next step would keep the largest tensor alive."""
        logits = self.output(self.hidden(idx)).float()  # fp32: the loss over 50k classes needs it
        if targets is None:
            return logits, None
        return None, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=-1)

    def compile(self, **kwargs):
        """torch.compile both entry points, forward and hidden, in place: parameter names stay as
        they are (torch.compile(model) would prefix them with _orig_mod.)."""
        super().compile(**kwargs)
        self.hidden = torch.compile(self.hidden, **kwargs)

    def num_params(self, embedding=True):
        """All parameters; embedding=False drops the input embedding table (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.tok_embeddings.weight.numel()

    def flops_per_token(self, seq_len, output=True):
        """Training FLOPs (forward + backward) per token: 6 N for the matmuls, where N counts every
        parameter except the input embedding (the output projection is a matmul, so it counts
        unless output=False, for passes that read hidden states only), plus 12 * n_layers * dim * T
        for QK^T and AV (as in the PaLM paper; causal masking is not discounted, which is the
        convention MFU numbers are quoted in). A forward pass alone is a third of this."""
        a = self.args
        n = self.num_params(embedding=False) - (0 if output else self.output.weight.numel())
        return 6 * n + 12 * a.n_layers * a.dim * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample continuations of idx (B, T); recomputes the full prefix each step (no KV cache),
        which is fine for the sanity samples this is for."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.args.max_seq_len:])
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        """The model of a checkpoint meta_train.py wrote (the dict common.load_checkpoint read)."""
        model = cls(ModelArgs(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device)


# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, matched as whole words of the
# device name ("L4" is not "L40"), most specific first. A device not listed gets no MFU: a
# guessed peak would give a wrong number.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
    ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("MI300X", 1307e12),
]


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device, or None when unknown (CPU, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_FLOPS if re.search(rf"\b{key}\b", name)), None)


def estimate_mfu(flops_per_second, peak):
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    return None if not peak else flops_per_second / peak


def model_summary(model):
    a = model.args
    return (f"{model.num_params():,} parameters ({model.num_params(embedding=False):,} without the "
            f"input embedding) | {a.n_layers} layers, dim {a.dim}, {a.n_heads} heads, "
            f"{a.n_kv_heads} kv heads, ffn {a.hidden_dim}, vocab {a.vocab_size}")
