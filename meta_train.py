"""
Meta-learned pretraining of a small Llama: ordinary next-token (AR) steps mixed with first-order
MAML (FOMAML) episodes, in one loop. meta_ratio = 0 is the vanilla baseline.

  python meta_train.py configs/cpu.py                                  # one process
  python meta_train.py configs/cpu.py --meta_ratio=0 --out_dir=out/vanilla
  torchrun --standalone --nproc_per_node=8 meta_train.py configs/570m.py

Defaults below are the paper's meta-run settings; a config file of assignments overrides them,
and --key=value overrides both. An unknown key or a value of the wrong type is an error.
"""
import ast
import builtins
import ctypes
import datetime
import difflib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from types import ModuleType, SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from model import Llama, ModelArgs, estimate_mfu, model_summary, peak_flops

# I/O
out_dir = "out"
data_dir = "data/wiki"  # shards + SMLMT index written by data.py
eval_interval = 250
eval_sequences = 640  # fixed val sequences of seq_len for the next-token val loss
eval_episodes = 10  # fixed val episodes for meta query accuracy
log_interval = 10
save_interval = 250
keep_checkpoints = True  # numbered ckpt_NNNNNN.pt copies (weights, no optimizer) for analyze.py
resume = False
seed = 42
# model: the paper configs change only dim
dim = 96
n_layers = 12
n_heads = 12
n_kv_heads = 4
vocab_size = 50304
# batch: total_batch_size sequences per AR step = batch_size x grad_accum x ranks
seq_len = 512
batch_size = 32
total_batch_size = 256
# AdamW; lr: linear warm-up, then linear or cosine decay to min_lr, reached at lr_decay_steps
learning_rate = 3e-4
warmup_steps = 2500
max_steps = 6000
lr_schedule = "linear"  # "linear" (the paper's code) or "cosine" (the paper's text, nanoGPT)
lr_decay_steps = 10_000_000  # the paper's code: 0 at 10M steps, so ~3e-4 throughout; 0: max_steps
min_lr = 0.0
weight_decay = 0.01
decay_params = "all"  # "all" (the paper) or "matrices" (no decay on norms and biases)
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0  # max gradient norm after the all-reduce; 0: off (the paper)
# meta-learning
meta_ratio = 0.5  # probability that an optimizer step is made of meta episodes
meta_task = "smlmt"  # "smlmt": masked-word classification episodes; "lm": learn-this-text episodes
inner_params = "head"  # "head": adapt the meta head only (ANIL); "all": adapt every weight
# a meta step reads about as many tokens as an AR step, as in the paper (where every micro-batch
# of the same 256 x 512 sequences was either AR or meta): 4 x 32 x (4 + 4) x 128 = 256 x 512
episodes_per_step = 4  # over all ranks, split among them; independent of batch_size
n_way = 32
k_shot = 4
q_query = 4
meta_seq_len = 128  # an SMLMT window reads one position, so short windows suffice
inner_steps = 10
inner_lr = 0.01
meta_loss_weight = 1.0
meta_hidden = 128
meta_head_init = "xavier"  # "xavier": Xavier-uniform weights (the paper); "default": PyTorch's
# system
device = "auto"  # "auto": cuda when available, else cpu
dtype = "auto"  # "auto": bfloat16 autocast on cuda, float32 on cpu
compile = True
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and type(v) in (bool, int, float, str)}

# keys that may differ when resuming: they do not change the trajectory of the weights
RESUME_FREE = {"out_dir", "resume", "eval_interval", "eval_sequences", "eval_episodes",
               "log_interval", "save_interval", "keep_checkpoints", "compile", "device"}
VAL_SEED = 20240101  # val batches and episodes do not depend on the run's seed: runs compare


class ConfigError(ValueError):
    pass


def configure(defaults, argv):
    """nanoGPT-style: config files (plain assignments) then --key=value, each checked against
    the defaults' keys and types. Files apply first wherever they stand, so a flag always wins."""
    cfg = dict(defaults)
    for arg in sorted(argv, key=lambda a: a.startswith("--")):  # stable: files, then flags
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"expected --key=value, got '{arg}'")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --meta_task=lm
            if isinstance(defaults.get(key), str):
                value = text  # a string key takes the text as written: --out_dir=2024
            items, source = [(key, value)], "command line"
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found")
            namespace = {}
            with open(arg) as f:
                # builtins.compile: the `compile` key below shadows the builtin
                exec(builtins.compile(f.read(), arg, "exec"), namespace)
            items = [(k, v) for k, v in namespace.items()  # skip imports and helpers
                     if not k.startswith("_") and not isinstance(v, ModuleType) and not callable(v)]
            source = arg
        for key, value in items:
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{key}' ({source}){hint}")
            want = type(defaults[key])
            if want is float and type(value) is int:
                value = float(value)
            if type(value) is not want:
                raise ConfigError(f"config key '{key}' ({source}) must be {want.__name__}, "
                                  f"got {type(value).__name__} {value!r}")
            cfg[key] = value
    return cfg


CHOICES = {"meta_task": ("smlmt", "lm"), "inner_params": ("head", "all"),
           "lr_schedule": ("linear", "cosine"), "decay_params": ("all", "matrices"),
           "meta_head_init": ("xavier", "default"), "dtype": ("auto", "float32", "bfloat16")}


def check_config(c, world_size):
    """Errors that should stop a run before any model is built."""
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, "
                              f"got {getattr(c, key)!r}")
    if not 0.0 <= c.meta_ratio <= 1.0:
        raise ConfigError(f"meta_ratio must be in [0, 1], got {c.meta_ratio}")
    if c.meta_task == "lm" and c.inner_params != "all":
        raise ConfigError("meta_task 'lm' adapts the whole model: set inner_params='all'")
    if c.n_way < 2 or c.k_shot < 1 or c.q_query < 1 or c.inner_steps < 0:
        raise ConfigError("need n_way >= 2, k_shot >= 1, q_query >= 1, inner_steps >= 0")
    for key in ("batch_size", "total_batch_size", "seq_len", "meta_seq_len", "eval_interval",
                "eval_sequences", "save_interval", "log_interval", "episodes_per_step"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(c, key)}")
    for key in ("max_steps", "warmup_steps", "lr_decay_steps", "eval_episodes"):
        if getattr(c, key) < 0:
            raise ConfigError(f"{key} must be at least 0, got {getattr(c, key)}")
    # what torch.optim.AdamW would reject mid-setup, named by its key here
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "inner_lr"):
        if not getattr(c, key) >= 0.0:  # also refuses nan
            raise ConfigError(f"{key} must be at least 0, got {getattr(c, key)}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(c, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(c, key)}")
    if c.total_batch_size % (c.batch_size * world_size):
        raise ConfigError(f"total_batch_size {c.total_batch_size} is not a multiple of batch_size "
                          f"{c.batch_size} x {world_size} ranks")
    if c.meta_ratio > 0 and c.episodes_per_step % world_size:
        raise ConfigError(f"episodes_per_step {c.episodes_per_step} does not split evenly over "
                          f"{world_size} ranks")
    try:
        config_model_args(c)  # ModelArgs checks the head counts itself
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not os.path.isdir(c.data_dir):
        raise ConfigError(f"data_dir '{c.data_dir}' not found: write shards with data.py first")


class MetaHead(nn.Module):
    """The paper's meta head: Linear(d,128)-ReLU-Linear(128,128)-ReLU-Linear(128,128)-ReLU-
    Linear(128,vocab). An N-way episode's class logits are the columns of its N word ids, so an
    episode reads (and adapts) only those N rows of the last layer."""

    def __init__(self, dim, vocab_size, hidden, init="xavier"):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, vocab_size)
        if init == "xavier":  # the paper's: Xavier-uniform weights, PyTorch's default biases
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)

    def episode_params(self, word_ids):
        """The weights one episode uses: [w1, b1, w2, b2, w3, b3, out rows (N, h), out bias (N,)]."""
        return [*self.mlp.parameters(), self.out.weight[word_ids], self.out.bias[word_ids]]

    def add_grad(self, grads, word_ids):
        """First order: gradients taken at the adapted episode weights are applied to the head's
        own weights (the N rows of the output layer receive theirs, the other rows none)."""
        *g_mlp, g_w, g_b = grads
        for p, g in [*zip(self.mlp.parameters(), g_mlp), (self.out.weight, None), (self.out.bias, None)]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if g is not None:
                p.grad += g
        self.out.weight.grad.index_add_(0, word_ids, g_w)
        self.out.bias.grad.index_add_(0, word_ids, g_b)


def head_logits(params, h):
    """Functional MetaHead: h (B, C) -> class logits (B, N) with episode_params-shaped weights."""
    *mlp, w_out, b_out = params
    for w, b in zip(mlp[0::2], mlp[1::2]):
        h = F.relu(F.linear(h, w, b))
    return F.linear(h, w_out, b_out)


def features(model, x):
    """Final hidden state at each window's last position, the masked occurrence: (B, T) -> (B, C)."""
    return model(x, return_hidden=True)[2]["hidden"][:, -1]


def weights_changed():
    """Call after changing weights in place inside an autocast region. Autocast keeps the bf16 copy
    of every leaf weight it has cast until the region ends, and does not see in-place updates:
    without this, the next forward would read the weights as they were before the change."""
    torch.clear_autocast_cache()


def adapt(params, support_loss, steps, lr):
    """The inner loop: `steps` of plain SGD on params, in place. Gradients come from autograd.grad,
    so the .grad fields, which hold the outer gradient being accumulated, are never touched.
    support_loss() -> (loss, accuracy). Returns the support accuracy at the adapted weights."""
    for _ in range(steps):
        grads = torch.autograd.grad(support_loss()[0], params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(g, alpha=lr)
        weights_changed()
    with torch.no_grad():
        return support_loss()[1]


def restore(params, saved):
    """Put the weights an all-mode or LM episode adapted back, bit for bit."""
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    weights_changed()


def accuracy(logits, y):
    return (logits.argmax(-1) == y).float().mean().detach()


def smlmt_episode(model, head, ep, c, loss_scale=None):
    """One N-way K-shot SMLMT episode, first-order MAML. With loss_scale, loss_scale * query loss
    is backpropagated: the backbone's .grad gets its ordinary gradient at the adapted weights, the
    head's .grad the gradient taken at its adapted copy. Without it (eval) nothing is accumulated.
    Every weight of model and head ends the episode exactly as it started.
    Returns (query loss, support accuracy after adaptation, query accuracy)."""
    fast = [p.detach().clone().requires_grad_() for p in head.episode_params(ep.word_ids)]
    if c.inner_params == "head":
        # ANIL: the backbone is fixed during adaptation, so its support features are computed
        # once and the inner loop costs only the tiny head
        with torch.no_grad():
            s_feat = features(model, ep.support_x).float()  # (N*K, C)

        def support_loss():
            logits = head_logits(fast, s_feat)
            return F.cross_entropy(logits, ep.support_y), accuracy(logits, ep.support_y)

        s_acc = adapt(fast, support_loss, c.inner_steps, c.inner_lr)
        params = saved = None
    else:
        # features() never projects onto the vocabulary: the output layer neither adapts nor
        # needs saving (in configs/cpu.py it is half the backbone). Compared by identity, as a
        # compiled model's parameter names carry a prefix.
        params = [p for p in model.parameters() if p.requires_grad and p is not model.output.weight]
        saved = [p.detach().clone() for p in params]

        def support_loss():
            logits = head_logits(fast, features(model, ep.support_x).float())
            return F.cross_entropy(logits, ep.support_y), accuracy(logits, ep.support_y)

        s_acc = adapt(params + fast, support_loss, c.inner_steps, c.inner_lr)
    with nullcontext() if loss_scale is not None else torch.no_grad():
        q_logits = head_logits(fast, features(model, ep.query_x).float())  # (N*Q, N)
        q_loss = F.cross_entropy(q_logits, ep.query_y)
    if loss_scale is not None:
        (q_loss * loss_scale).backward()
        head.add_grad([p.grad for p in fast], ep.word_ids)
    if saved is not None:
        restore(params, saved)
    return q_loss.detach(), s_acc, accuracy(q_logits, ep.query_y)


def lm_loss(model, x, y):
    """Next-token loss and accuracy of (B, T) windows; the logits stay inside this function."""
    logits, _ = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()), accuracy(logits, y)


def lm_episode(model, ep, c, loss_scale=None):
    """One learn-this-text episode: adapt every weight on K support chunks of a document, then
    take the next-token loss of the chunk that follows, at the adapted weights (first order),
    and restore the weights exactly. Returns as smlmt_episode."""
    support_x, support_y, query_x, query_y = ep
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    s_acc = adapt(params, lambda: lm_loss(model, support_x, support_y), c.inner_steps, c.inner_lr)
    with nullcontext() if loss_scale is not None else torch.no_grad():
        q_loss, q_acc = lm_loss(model, query_x, query_y)
    if loss_scale is not None:
        (q_loss * loss_scale).backward()
    restore(params, saved)
    return q_loss.detach(), s_acc, q_acc


def to_device(batch, dev):
    """Move a tensor, a tuple of them or an Episode to the device. On CUDA through pinned host
    memory, so that the copy is asynchronous (non_blocking from pageable memory is not)."""
    if isinstance(batch, torch.Tensor):
        if torch.device(dev).type == "cuda":
            batch = batch.pin_memory()
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(to_device(t, dev) for t in batch)
    return replace(batch, **{f.name: to_device(getattr(batch, f.name), dev) for f in fields(batch)})


def episode_tokens_and_flops(model, c):
    """Tokens one meta episode reads and its training FLOPs: the inner loop, the support forward
    that measures the accuracy after adaptation, and the query pass with its backward. A forward
    is a third of flops_per_token; the meta head's own FLOPs (a 128-wide MLP on N*(K+Q) vectors)
    are left out."""
    if c.meta_task == "smlmt":
        support, query = c.n_way * c.k_shot * c.meta_seq_len, c.n_way * c.q_query * c.meta_seq_len
        f = model.flops_per_token(c.meta_seq_len, output=False)
    else:
        support, query = c.k_shot * c.meta_seq_len, c.meta_seq_len
        f = model.flops_per_token(c.meta_seq_len)
    # head mode: one support forward (the features); all mode: inner steps, then one more forward
    inner = support * f / 3 if c.inner_params == "head" else (c.inner_steps + 1 / 3) * support * f
    return support + query, inner + query * f


def get_lr(step, c):
    """Linear warm-up over warmup_steps, then linear or cosine decay from learning_rate to min_lr,
    reached at lr_decay_steps (0: at max_steps) and held after it."""
    if step < c.warmup_steps:
        return c.learning_rate * (step + 1) / c.warmup_steps
    end = c.lr_decay_steps or c.max_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, end - c.warmup_steps))
    if c.lr_schedule == "linear":
        return c.learning_rate + progress * (c.min_lr - c.learning_rate)
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.learning_rate - c.min_lr)


def all_reduce_grads(params, world_size, bucket_numel=2 ** 25):
    """Average .grad over ranks in a few large flat buckets. Explicit all-reduce rather than the
    DDP wrapper: episodes run the model several times per backward (support, inner loop, query)
    and use weights that AR steps do not (the meta head) and vice versa, and the inner loop must
    not communicate; one reduce after accumulation is simple and correct. Every rank takes the
    same branch, so every rank holds grads for the same parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= bucket_numel):
            flat = torch.cat([b.flatten() for b in bucket])
            dist.all_reduce(flat)
            flat /= world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def config_model_args(c):
    """The model a config describes; its context covers both AR batches and episode windows."""
    return ModelArgs(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                     vocab_size=c.vocab_size, max_seq_len=max(c.seq_len, c.meta_seq_len))


def uses_bf16(c, device_type):
    """bf16 autocast when asked for, or by default on CUDA; CPU runs fp32."""
    return c.dtype == "bfloat16" or (c.dtype == "auto" and device_type == "cuda")


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of handing it back to the OS. By default each
    block over 32 MiB (one 8 x 256 x 50304 fp32 logits tensor is 393 MiB) is mmap'd fresh and
    unmapped when freed, so every micro-step page-faults its largest tensors in again: on CPU that
    costs about as much as the step's arithmetic (bench.py: 1493 -> 750 ms per configs/cpu.py AR
    micro-step). The price is a resident set that stays at its peak. -> whether glibc accepted it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h; a threshold of -1 never trims
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def save_checkpoint(path, obj):
    """Write to a temporary name, then rename: a crash mid-write never damages the last good file."""
    data.atomic_write(path, lambda f: torch.save(obj, f))


def run_episode(model, head, ep, c, loss_scale=None):
    if c.meta_task == "smlmt":
        return smlmt_episode(model, head, ep, c, loss_scale)
    return lm_episode(model, ep, c, loss_scale)


def train(c):
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda":
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if dev.startswith("cuda") else "cpu"
    kept = device_type == "cpu" and keep_freed_memory()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    check_config(c, world_size)
    grad_accum = c.total_batch_size // (c.batch_size * world_size)
    # data first: a missing shard, a bad index or n_way larger than the candidate words all
    # fail here, before a model is built
    sampler = val_sampler = None
    try:  # data.py's errors name the file; reported like config errors, without a traceback
        meta = data.read_meta(c.data_dir)
        train_reader = data.ShardReader(c.data_dir, "train", c.batch_size, c.seq_len)
        # the val set: eval_sequences fixed windows, drawn once, the same whatever the batch size
        val_x, val_y = data.ShardReader(c.data_dir, "val", c.eval_sequences, c.seq_len).next_batch(
            np.random.default_rng(VAL_SEED))
        if c.meta_ratio > 0 and c.meta_task == "smlmt":
            args = dict(n_way=c.n_way, k_shot=c.k_shot, q_query=c.q_query, seq_len=c.meta_seq_len)
            sampler = data.SMLMTSampler(c.data_dir, split="train", **args)
            val_sampler = data.SMLMTSampler(c.data_dir, split="val", **args)
        elif c.meta_ratio > 0:
            sampler = data.LMTaskSampler(c.data_dir, c.k_shot, c.meta_seq_len, split="train")
            val_sampler = data.LMTaskSampler(c.data_dir, c.k_shot, c.meta_seq_len, split="val")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    if meta["mask_id"] >= c.vocab_size:
        raise ConfigError(f"vocab_size {c.vocab_size} has no room for the mask id {meta['mask_id']}")

    if ddp:
        # while rank 0 writes a checkpoint (6.9 GB at 570m) the others wait in the next
        # all-reduce: give a slow disk far longer than NCCL's default 10 minutes
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    torch.manual_seed(c.seed)  # the same seed on every rank: identical initial weights
    model_args = config_model_args(c)
    model = Llama(model_args).to(dev)
    head = None
    if c.meta_ratio > 0 and c.meta_task == "smlmt":
        head = MetaHead(c.dim, c.vocab_size, c.meta_hidden, c.meta_head_init).to(dev)
    params = list(model.parameters()) + (list(head.parameters()) if head else [])
    # the paper decays every weight; "matrices" spares norms and biases, as nanoGPT does
    decayed = (lambda p: True) if c.decay_params == "all" else (lambda p: p.dim() >= 2)
    groups = [{"params": [p for p in params if decayed(p)], "weight_decay": c.weight_decay},
              {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.learning_rate,
                                  betas=(c.beta1, c.beta2), fused=device_type == "cuda")

    use_bf16 = uses_bf16(c, device_type)
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext())

    if c.resume and not os.path.exists(os.path.join(c.out_dir, "ckpt.pt")):
        raise ConfigError(f"resume=True but {os.path.join(c.out_dir, 'ckpt.pt')} does not exist")
    os.makedirs(c.out_dir, exist_ok=True)
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    log_path = os.path.join(c.out_dir, "log.jsonl")
    start_step, counters = 0, {"ar_tokens": 0, "meta_tokens": 0, "flops": 0.0, "time": 0.0}
    last_good = None
    if c.resume:
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
        diff = {k: (ckpt["config"].get(k), v) for k, v in vars(c).items()
                if k not in RESUME_FREE and ckpt["config"].get(k) != v}
        if diff:
            raise ConfigError(f"{ckpt_path} was written with a different config "
                              f"(key: checkpoint vs now): {diff}")
        model.load_state_dict(ckpt["model"])
        if head is not None:
            head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, counters = ckpt["step"], ckpt["counters"]
        last_good = f"{ckpt_path} (step {start_step})"
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device_type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        if master and os.path.exists(log_path):
            # drop log lines written after the checkpoint by the interrupted run
            with open(log_path) as f:
                keep = [l for l in f if json.loads(l)["step"] <= start_step]
            data.atomic_write(log_path, lambda f: f.write("".join(keep).encode()))
        del ckpt
    else:
        # a fresh run would overwrite ckpt.pt and mix its numbered checkpoints with the old
        # run's in analyze.py: refuse rather than lose or muddle either run
        old = sorted(f for f in os.listdir(c.out_dir) if f.startswith("ckpt") and f.endswith(".pt"))
        if old:
            raise ConfigError(f"out_dir '{c.out_dir}' holds checkpoints of an earlier run "
                              f"({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}): continue "
                              f"it with --resume=True, or choose another out_dir")
        if master and os.path.exists(log_path):
            os.remove(log_path)

    raw_model = model  # uncompiled: saving, eval and analysis use it
    if c.compile:
        # static shapes: AR batches, support and query windows are three fixed shapes
        model = torch.compile(model, dynamic=False)

    ar_tokens_step = c.batch_size * c.seq_len * grad_accum * world_size
    ep_tokens, ep_flops = (episode_tokens_and_flops(raw_model, c) if sampler else (0, 0.0))
    meta_tokens_step, meta_flops_step = ep_tokens * c.episodes_per_step, ep_flops * c.episodes_per_step
    ar_flops_step = ar_tokens_step * raw_model.flops_per_token(c.seq_len)
    peak = peak_flops(dev)
    say(f"model: {model_summary(raw_model)}")
    if head is not None:
        say(f"meta head: {sum(p.numel() for p in head.parameters()):,} parameters "
            f"({c.meta_hidden}-wide MLP + {c.vocab_size}-row output; an episode uses {c.n_way} rows)")
    say(f"device {dev} x {world_size} rank(s), {'bf16 autocast' if use_bf16 else 'fp32'}, "
        f"compile={c.compile}, {'glibc keeps freed memory, ' if kept else ''}"
        f"peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (no MFU)'}")
    say(f"AR step: {ar_tokens_step:,} tokens = {c.batch_size} micro-batch x {grad_accum} accumulation"
        f" x {world_size} ranks x {c.seq_len} seq_len; {ar_flops_step:.3g} FLOPs")
    if sampler:
        shape = (f"{c.n_way}-way {c.k_shot}-shot {c.q_query}-query" if c.meta_task == "smlmt"
                 else f"{c.k_shot} support chunks + 1 query chunk")
        say(f"meta step ({c.meta_ratio:.0%} of steps): {c.episodes_per_step} {c.meta_task} episodes"
            f" ({c.episodes_per_step // world_size} per rank x {world_size} ranks) of {shape}, "
            f"{c.meta_seq_len} tokens per window, inner_params={c.inner_params}, {c.inner_steps} "
            f"inner steps at {c.inner_lr}: {meta_tokens_step:,} tokens (an AR step: "
            f"{ar_tokens_step:,}), {meta_flops_step:.3g} FLOPs")
    say(f"val: {c.eval_sequences} sequences x {c.seq_len} tokens"
        + (f", {c.eval_episodes} episodes" if sampler else "") + f", every {c.eval_interval} steps")
    say(f"{c.max_steps} steps from step {start_step}, warm-up {c.warmup_steps}, lr "
        f"{c.learning_rate} ({c.lr_schedule} to {c.min_lr} at step {c.lr_decay_steps or c.max_steps})")

    if c.compile:
        # compile every graph now, so that compilation is not logged as training time (which
        # would bias a time comparison against meta runs, which compile more graphs). Weights do
        # not change: no optimizer step, and episodes restore what they adapt.
        t_compile, rng_state = time.time(), torch.get_rng_state()
        x, y = to_device(train_reader.next_batch(np.random.default_rng(VAL_SEED)), dev)
        with autocast:
            model(x, y)[1].backward()
        if sampler:
            with autocast:
                run_episode(model, head, to_device(sampler.sample(
                    np.random.default_rng(VAL_SEED)), dev), c, 1.0)
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng_state)
        say(f"compiled in {time.time() - t_compile:.1f} s, before the clock starts")

    @torch.no_grad()
    def evaluate():
        """Next-token val loss on the fixed val sequences (the same for every run, vanilla or
        meta, whatever its batch size) and meta query accuracy on fixed val episodes; both split
        across ranks, then summed."""
        raw_model.eval()
        stats = torch.zeros(4, dtype=torch.float64, device=dev)  # loss sum, tokens, acc sum, episodes
        for rows in torch.arange(rank, c.eval_sequences, world_size).split(c.batch_size):
            x, y = to_device((val_x[rows], val_y[rows]), dev)
            with autocast:
                stats[0] += raw_model(x, y)[1].double() * y.numel()
            stats[1] += y.numel()
        for i in range(rank, c.eval_episodes if val_sampler else 0, world_size):
            ep = to_device(val_sampler.sample(np.random.default_rng([VAL_SEED, i])), dev)
            with torch.enable_grad(), autocast:
                stats[2] += run_episode(raw_model, head, ep, c)[2]
            stats[3] += 1
        if ddp:
            dist.all_reduce(stats)
        raw_model.train()
        return ((stats[0] / stats[1]).item(),
                (stats[2] / stats[3]).item() if stats[3] > 0 else None)

    def checkpoint(step):
        obj = {"model_args": asdict(model_args), "model": raw_model.state_dict(),
               "head": head.state_dict() if head is not None else None,
               "optimizer": optimizer.state_dict(), "step": step, "config": dict(vars(c)),
               "tokenizer": meta["tokenizer"], "counters": dict(counters),
               # the data stream is a function of (seed, step), so the step is its whole state
               "data": {"step": step, "seed": c.seed},
               "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                       "torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}}
        save_checkpoint(ckpt_path, obj)
        if c.keep_checkpoints:
            # what analyze.py and ner_eval.py read, without the optimizer state: at 570m a
            # numbered copy is 2.3 GB instead of 6.9 GB (25 of them: 58 GB, not 173 GB)
            save_checkpoint(os.path.join(c.out_dir, f"ckpt_{step:06d}.pt"),
                            {k: v for k, v in obj.items() if k != "optimizer"})

    keys = ["step", "lr", "ar_loss", "meta_loss", "support_acc", "query_acc", "val_loss",
            "val_query_acc", "grad_norm", "ar_tokens", "meta_tokens", "flops", "time",
            "tok_per_s", "mfu", "ar_ms", "meta_ms"]

    def log(**row):
        row = {k: row.get(k) for k in keys}
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def stop(what):
        bar.close()
        where = (f"the last good checkpoint is {last_good}, left intact" if last_good
                 else "no checkpoint was written yet")
        raise SystemExit(f"{what}; stopping: {where}")

    from tqdm import tqdm
    bar = tqdm(total=c.max_steps, initial=start_step, disable=not master, unit="step",
               dynamic_ncols=True)
    window = {"ar": [0.0, 0], "meta": [0.0, 0]}  # per-micro-step times since the last log line
    for step in range(start_step, c.max_steps + 1):
        # weights here have had `step` updates: evaluate them now, save them below once this
        # step's loss shows they are finite (a resumed run did both before it stopped)
        if step > start_step or not c.resume:
            if step % c.eval_interval == 0 or step == c.max_steps:
                val_loss, val_acc = evaluate()
                if master:
                    log(step=step, val_loss=val_loss, val_query_acc=val_acc, **counters)
                    acc = f", val query acc {val_acc:.3f}" if val_acc is not None else ""
                    bar.write(f"step {step}: val loss {val_loss:.4f}{acc}")
        if step == c.max_steps:
            if step > start_step or not c.resume:
                # no loss of a later step will vouch for these weights: check them directly
                if not (math.isfinite(val_loss) and all(p.isfinite().all() for p in params)):
                    stop(f"non-finite weights or val loss ({val_loss}) at step {step}")
                if master:
                    checkpoint(step)
            break

        t0 = time.time()
        lr = get_lr(step, c)
        for g in optimizer.param_groups:
            g["lr"] = lr
        # AR or meta, drawn from a generator keyed by (seed, step) alone: every rank takes the same
        # branch without communicating, and resuming at any step replays it. The design notes
        # (../shared/DESIGN.md) draw per micro-step; we draw once per optimizer step (all its
        # micro-steps share the branch), so that a run's global batch, and so its weights, do not
        # depend on how it is split over ranks and accumulation (the data-parallel test checks
        # this), and so that each step's loss scale is that of one kind.
        is_meta = np.random.default_rng([c.seed, step, 1]).random() < c.meta_ratio
        kind = "meta" if is_meta else "ar"
        stats = torch.zeros(5, device=dev)  # AR loss, meta loss, support acc, query acc, count
        # per-micro-step times need a device sync on CUDA, which stops the host from running
        # ahead: take them on every log_interval-th step only
        timed = device_type == "cpu" or step % c.log_interval == 0
        # a micro-batch's or episode's data depends on (seed, step, its slot in the step) only,
        # so a step is the same however it is split over ranks and accumulation steps
        if is_meta:
            slots = range(rank, c.episodes_per_step, world_size)  # this rank's episodes
            scale = c.meta_loss_weight / len(slots)  # a mean over the step's episodes
        else:
            slots = range(rank, grad_accum * world_size, world_size)  # this rank's micro-batches
        for slot in slots:
            tm = time.time()
            if is_meta:
                rng = np.random.default_rng([c.seed, step, slot, 3])
                ep = to_device(sampler.sample(rng), dev)
                with autocast:
                    q_loss, s_acc, q_acc = run_episode(model, head, ep, c, scale)
                stats[1:4] += torch.stack([q_loss, s_acc, q_acc])
            else:
                rng = np.random.default_rng([c.seed, step, slot, 2])
                x, y = to_device(train_reader.next_batch(rng), dev)
                with autocast:
                    loss = model(x, y)[1]
                (loss / grad_accum).backward()
                stats[0] += loss.detach()
            stats[4] += 1
            if timed:
                if device_type == "cuda":
                    torch.cuda.synchronize()
                window[kind][0] += time.time() - tm
                window[kind][1] += 1
        if ddp:
            all_reduce_grads(params, world_size)
            dist.all_reduce(stats)
        grads = [p.grad for p in params if p.grad is not None]
        if c.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                       c.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        stats /= stats[4].clone()
        loss_now, grad_norm = (stats[1] if is_meta else stats[0]).item(), grad_norm.item()
        if not (math.isfinite(loss_now) and math.isfinite(grad_norm)):
            stop(f"non-finite {'meta' if is_meta else 'AR'} loss ({loss_now}) or grad norm at "
                 f"step {step}")
        # only now, with a finite loss at these weights, is a checkpoint of them known to be good
        if step % c.save_interval == 0 and (step > start_step or not c.resume):
            t_save = time.time()
            if master:
                checkpoint(step)
            t0 += time.time() - t_save  # "time" is training time: no eval, no checkpoint I/O
            last_good = f"{ckpt_path} (step {step})"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        counters["time"] += dt
        tokens = meta_tokens_step if is_meta else ar_tokens_step
        counters["meta_tokens" if is_meta else "ar_tokens"] += tokens
        step_flops = meta_flops_step if is_meta else ar_flops_step
        counters["flops"] += step_flops
        bar.update(1)
        if master and ((step + 1) % c.log_interval == 0 or step + 1 == c.max_steps):
            mfu = estimate_mfu(step_flops / dt / world_size, peak)  # the peak is one device's
            ms = {k: (1000 * v[0] / v[1] if v[1] else None) for k, v in window.items()}
            row = dict(step=step + 1, lr=lr, grad_norm=grad_norm, tok_per_s=tokens / dt, mfu=mfu,
                       ar_ms=ms["ar"], meta_ms=ms["meta"], **counters)
            if is_meta:
                row.update(meta_loss=loss_now, support_acc=stats[2].item(),
                           query_acc=stats[3].item())
            else:
                row.update(ar_loss=loss_now)
            log(**row)
            what = (f"meta loss {loss_now:.4f} query acc {row['query_acc']:.3f}" if is_meta
                    else f"loss {loss_now:.4f}")
            bar.write(f"step {step + 1}: {what} | lr {lr:.2e} | {dt * 1000:.0f} ms | "
                      f"{tokens / dt:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else ""))
            window = {"ar": [0.0, 0], "meta": [0.0, 0]}
    bar.close()
    say(f"done: {counters['ar_tokens']:,} AR tokens, {counters['meta_tokens']:,} meta tokens, "
        f"{counters['flops']:.3g} FLOPs, {counters['time']:.1f} s of training")
    if ddp:
        dist.destroy_process_group()
    return raw_model, head


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        print("keys and defaults:")
        for k, v in DEFAULTS.items():
            print(f"  --{k}={v!r}")
        sys.exit(0)
    try:
        cfg = configure(DEFAULTS, sys.argv[1:])
        train(SimpleNamespace(**cfg))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    finally:
        if dist.is_initialized():  # a run that stopped early leaves its process group behind
            dist.destroy_process_group()
