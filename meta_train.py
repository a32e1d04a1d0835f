"""
Meta-learned pretraining of a small Llama: ordinary next-token (AR) steps mixed with first-order
MAML (FOMAML) episodes, in one loop. meta_ratio = 0 is the vanilla baseline.

  python meta_train.py configs/cpu.py                                  # one process
  python meta_train.py configs/cpu.py --meta_ratio=0 --out_dir=out/vanilla
  torchrun --standalone --nproc_per_node=8 meta_train.py configs/570m.py
  python meta_train.py configs/570m.py --plan --world_size=16   # its layout, FLOPs, memory

The defaults below are the paper's meta-run settings; a config file of assignments overrides
them, and --key=value overrides both. An unknown key or a value of the wrong type is an error.
The file reads top down: the defaults, one episode (run_episode), the training loop (train),
then setting up, saving and planning a run.
"""
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import ConfigError
from model import Llama, estimate_mfu, model_summary, peak_flops

# I/O
out_dir = "out"
data_dir = "data/wiki"  # shards and SMLMT index, written by prepare.py
eval_interval = 250
eval_sequences = 640  # fixed val windows of seq_len for the next-token val loss
eval_episodes = 10  # fixed val episodes for the meta accuracies
log_interval = 10
save_interval = 250
keep_checkpoints = True  # numbered weight-only copies ckpt_NNNNNN.pt for analyze.py, ner_eval.py
resume = False  # continue out_dir exactly; max_steps may grow unless the lr decays to it
seed = 42

# model (the paper's configs change only dim)
dim = 96
n_layers = 12
n_heads = 12
n_kv_heads = 4
vocab_size = 50304
init = "pytorch"  # PyTorch's module defaults (the paper's code), or "gpt2": N(0, 0.02)

# batch: total_batch_size sequences per AR step, an equal share per rank, in micro-batches of at
# most batch_size (a memory ceiling: common.layout picks the micro-batch and accumulation)
seq_len = 512
batch_size = 32
total_batch_size = 256

# AdamW; lr: linear warm-up, then decay to min_lr, reached at lr_decay_steps (0: max_steps)
learning_rate = 3e-4
warmup_steps = 2500
max_steps = 6000
lr_schedule = "linear"  # the paper's code; or "cosine" (its text, nanoGPT), or "constant"
lr_decay_steps = 10_000_000  # the paper's code: 0 only at 10M steps, so ~3e-4 throughout
min_lr = 0.0
weight_decay = 0.01
decay_params = "all"  # the paper; or "matrices": no decay on norms and biases (nanoGPT)
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0  # max gradient norm after the all-reduce; 0: off (the paper)

# meta steps
meta_ratio = 0.5  # probability that an optimizer step is made of meta episodes
# "smlmt": masked-word classification episodes; "lm": learn-this-text episodes; "positions": the
# paper code's tasks, from random positions of a pretraining micro-batch
meta_task = "smlmt"
# episodes per meta step, over all ranks. 0: as many tokens as an AR step, as in the paper
# (SMLMT: 4 episodes of 32 x 8 windows of 128 = 256 x 512; positions: 256 / positions_batch)
episodes_per_step = 0
meta_loss_weight = 1.0  # the query loss's weight against the AR loss

# an episode
n_way = 32
k_shot = 4
q_query = 4
meta_seq_len = 128  # an SMLMT window is read at one position: short windows suffice
positions_batch = 8  # "positions": sequences of seq_len per episode (the paper's micro-batch)
# "positions": a label outside the classes is class 0 ("class0", the paper's code; it inflates
# query accuracy), or left out ("drop")
positions_unknown = "class0"

# the inner loop
inner_params = "head"  # "head": adapt the meta head only (ANIL); "all": every weight
inner_steps = 10
inner_lr = 0.01
inner_optimizer = "sgd"  # the paper; or "adamw": the inner loop trains as LLMs are trained
inner_lr_schedule = "constant"  # over the inner steps; or "linear", "cosine" to 0
inner_warmup_steps = 0
inner_beta1 = 0.9  # the inner AdamW's
inner_beta2 = 0.999
inner_eps = 1e-8
inner_weight_decay = 0.0
# the head's outer gradient: "fomaml", or "paper": as the paper's code left it (the last support
# gradient plus the query gradient of the rank's last episode of the step)
head_grad = "fomaml"

# the meta head and what it reads (each an ablation, the first value the paper's)
meta_hidden = 128
meta_head_init = "xavier"  # Xavier-uniform weights (the paper), or "default": PyTorch's
# "mask": the features at the [MASK] itself; "before": the state just before it, the one
# next-token training shapes to predict the word
meta_read = "mask"
# "raw"; "standardize": minus the support mean, over the support's spread per dimension (the raw
# [MASK] state is mostly one shared direction); "center": over one spread for all dimensions
meta_features = "raw"
# the class rows: the output rows of the N word ids (the paper), or "proto": initialised from the
# support prototypes of the head's last hidden layer (Proto-MAML)
meta_head_rows = "words"
ar_mask_rate = 0.0  # share of AR inputs replaced by [MASK], so pretraining sees what episodes read

# system
device = "auto"  # cuda when available, else cpu
dtype = "auto"  # bfloat16 autocast on cuda, float32 on cpu
compile = True

# logging: every log.jsonl row also to Weights & Biases (imported only when on), as nanoGPT
wandb_log = False
wandb_project = "nanomaml"
wandb_run_name = ""  # "": the out_dir's name
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and type(v) in (bool, int, float, str)}

# keys that may differ when resuming: they do not change the trajectory of the weights
RESUME_FREE = {"out_dir", "resume", "eval_interval", "eval_sequences", "eval_episodes",
               "log_interval", "save_interval", "keep_checkpoints", "compile", "device",
               "wandb_log", "wandb_project", "wandb_run_name"}
VAL_SEED = 20240101  # val batches and episodes do not depend on the run's seed: runs compare


# the method: the meta head, then one episode, top down from run_episode
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
        """The weights an episode uses: [w1, b1, w2, b2, w3, b3, out rows (N, h), out bias (N,)]."""
        return [*self.mlp.parameters(), self.out.weight[word_ids], self.out.bias[word_ids]]

    def proto_rows(self, s_feat, support_y, n_way):
        """Proto-MAML (Triantafillou et al. 2020): class rows from the support prototypes mu_c of
        the last hidden layer, W_c = 2 mu_c, b_c = -|mu_c|^2, so that the unadapted logits are
        -|h - mu_c|^2 up to a per-example constant. s_feat (N*K, C), support_y (N*K,) (label -1:
        left out) -> (N, hidden), (N,), differentiable in the MLP's weights."""
        h = self.mlp(s_feat)  # (N*K, hidden)
        keep = support_y >= 0
        onehot = F.one_hot(support_y[keep], n_way).to(h.dtype)  # (S, N)
        mu = onehot.T @ h[keep] / onehot.sum(0).clamp(min=1)[:, None]  # (N, hidden)
        return 2 * mu, -(mu * mu).sum(-1)

    def add_grad(self, grads, word_ids):
        """First order: gradients taken at the adapted episode weights are applied to the head's
        own weights (the N rows of the output layer receive theirs, the other rows none; g_w and
        g_b None: the rows did not come from the output layer)."""
        *g_mlp, g_w, g_b = grads
        for p, g in [*zip(self.mlp.parameters(), g_mlp), (self.out.weight, None),
                     (self.out.bias, None)]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if g is not None:
                p.grad += g
        if g_w is not None:
            self.out.weight.grad.index_add_(0, word_ids, g_w)
            self.out.bias.grad.index_add_(0, word_ids, g_b)


def head_logits(params, h):
    """Functional MetaHead: h (B, C) -> class logits (B, N) with episode_params-shaped weights."""
    *mlp, w_out, b_out = params
    for w, b in zip(mlp[0::2], mlp[1::2]):
        h = F.relu(F.linear(h, w, b))
    return F.linear(h, w_out, b_out)


def run_episode(model, head, ep, c, loss_scale=None, probe=None):
    """One meta episode, first-order MAML: adapt on the support set, take the query loss at the
    adapted weights, and (training: loss_scale given) backpropagate loss_scale * query loss into
    .grad as the original weights' gradient. Every weight ends the episode as it started.
    probe (eval): a dict that receives what the episode gets with no inner steps (query_acc0) and,
    for classification episodes, by nearest class mean (centroid_acc).
    -> (query loss, support accuracy after adaptation, query accuracy)."""
    if c.meta_task == "lm":
        return lm_episode(model, ep, c, loss_scale, probe)
    return smlmt_episode(model, head, ep, c, loss_scale, probe)  # smlmt and positions


def smlmt_episode(model, head, ep, c, loss_scale=None, probe=None):
    """An N-way K-shot classification episode (SMLMT, or the paper code's positions task: the
    examples are read where data.Episode says), as run_episode describes. inner_params "head"
    (ANIL) adapts a copy of the head's weights for the N classes; "all" also adapts the
    backbone, in place, and puts it back."""
    train = loss_scale is not None
    n_way = len(ep.word_ids)
    read = lambda x, at: features(model, x, at, c.meta_read == "before").float()  # noqa: E731
    s_raw = None  # (N*K, C) support features at the original weights; all mode may need none
    if (c.inner_params == "head" or c.meta_head_rows == "proto" or probe is not None
            or c.meta_features != "raw"):
        with torch.no_grad():
            s_raw = read(ep.support_x, ep.support_at)
    norm = feature_norm(s_raw, c.meta_features)
    s_feat = None if s_raw is None else norm(s_raw)
    fast, rows = episode_head(head, ep, s_feat, c, train)
    q_feat = None  # (N*Q, C) query features at the original weights, as the probe read them
    if probe is not None:
        with torch.no_grad():
            q_feat = norm(read(ep.query_x, ep.query_at))
            probe["query_acc0"] = accuracy(head_logits(fast, q_feat), ep.query_y)
            probe["centroid_acc"] = centroid_accuracy(s_feat, ep.support_y, q_feat, ep.query_y,
                                                      n_way)
    backbone = backbone_weights(model) if c.inner_params == "all" else []
    with put_back(backbone):
        # 1. adapt on the support set
        def support():  # (N*K, N) the support set's class logits at the weights now
            # ANIL: the backbone is fixed, so the support features computed above serve every step
            f = norm(read(ep.support_x, ep.support_at)) if backbone else s_feat
            return head_logits(fast, f)

        last = [] if c.head_grad == "paper" else None
        s_acc = adapt(backbone + fast,
                      lambda: F.cross_entropy(support(), ep.support_y, ignore_index=-1), c,
                      lambda: accuracy(support(), ep.support_y), last)
        # 2. the query loss at the adapted weights
        with nullcontext() if train else torch.no_grad():
            if backbone or q_feat is None:
                q_feat = norm(read(ep.query_x, ep.query_at))
            q_logits = head_logits(fast, q_feat)  # (N*Q, N)
            q_loss = F.cross_entropy(q_logits, ep.query_y, ignore_index=-1)
        # 3. first order: its gradient at the adapted weights is the original weights' gradient
        if train:
            (q_loss * loss_scale).backward()  # the backbone's .grad, and fast's
            head_outer_grad(head, fast, rows, last, ep.word_ids)
    return q_loss.detach(), s_acc, accuracy(q_logits, ep.query_y)


def features(model, x, at=None, before=False):
    """Final hidden states where an episode's examples are read: each window's last (SMLMT
    windows end at the occurrence; before=True: the one before it), or the positions `at` (A,)
    of every window: (B, T) -> (B, C) or (B * A, C)."""
    h = model.hidden(x)  # (B, T, C)
    return h[:, -2 if before else -1] if at is None else h[:, at].flatten(0, 1)


def feature_norm(s_feat, how):
    """meta_features as a function of features: "raw" leaves them; "standardize" subtracts the
    support mean and divides by the support's spread per dimension; "center" by one spread for
    all dimensions, the root mean square deviation, which keeps the features' geometry (per
    dimension, a direction the features barely use is scaled up as much as the one that carries
    the classes). The mean and spread are constants of the episode: no gradient flows through
    them. s_feat (N*K, C): the raw support features."""
    if how == "raw":
        return lambda f: f
    eps = 1e-5
    mean = s_feat.mean(0)  # (C,)
    if how == "standardize":
        spread = s_feat.std(0, correction=0) + eps
    else:
        spread = ((s_feat - mean) ** 2).mean().sqrt().expand_as(mean) + eps
    return lambda f: (f - mean) / spread


def episode_head(head, ep, s_feat, c, train):
    """The head as this episode uses it, its MLP and N class rows -> (fast, rows). fast: detached
    copies of episode_params, the weights the inner loop adapts (first order: the outer gradient
    is taken at them). meta_head_rows "words": the class rows are the N words' output rows;
    "proto" (rows not None): rows built from the support prototypes, a function of the MLP that
    the outer gradient flows back through (with grad when training)."""
    params = head.episode_params(ep.word_ids)
    rows = None
    if c.meta_head_rows == "proto":
        with nullcontext() if train else torch.no_grad():
            rows = head.proto_rows(s_feat, ep.support_y, len(ep.word_ids))
        params = params[:-2] + list(rows)
    return [p.detach().clone().requires_grad_() for p in params], rows


def accuracy(logits, y):
    """Share of correct predictions among the labelled examples (label -1: left out), as a tensor:
    no boolean-mask indexing, whose data-dependent shape would make the host wait for the device."""
    labelled = y >= 0
    correct = ((logits.argmax(-1) == y) & labelled).sum()
    return (correct / labelled.sum().clamp(min=1)).float().detach()


def centroid_accuracy(s_feat, support_y, q_feat, query_y, n_way):
    """Nearest class mean of the support features (Euclidean), the reference any adaptation
    should beat: s_feat (S, C), q_feat (Q, C), labels -1 left out; a class without support
    examples is never predicted."""
    keep = support_y >= 0
    onehot = F.one_hot(support_y[keep], n_way).to(s_feat.dtype)  # (S', N)
    counts = onehot.sum(0)  # (N,)
    mu = onehot.T @ s_feat[keep] / counts.clamp(min=1)[:, None]  # (N, C)
    d = torch.cdist(q_feat, mu).masked_fill(counts == 0, float("inf"))  # (Q, N)
    return accuracy(-d, query_y)


def backbone_weights(model):
    """The weights an all-mode episode adapts besides the head: every trainable one but the
    vocabulary projection, which features() never uses (it neither adapts nor needs saving)."""
    return [p for p in model.parameters() if p.requires_grad and p is not model.output.weight]


@contextmanager
def put_back(params):
    """Weights adapted in place inside the block are put back, bit for bit, when it ends (also when
    it raises): an episode must leave the model as it found it."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        if params:
            restore(params, saved)


def restore(params, saved):
    """Copy the saved weights back into params, and drop autocast's casts of the old ones."""
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    weights_changed()


def adapt(params, support_loss, c, support_acc=None, last=None):
    """The inner loop: c.inner_steps steps of SGD or AdamW on params, in place, at the inner lr
    schedule. Gradients come from autograd.grad, so the .grad fields, which hold the outer
    gradient being accumulated, are never touched, and AdamW's moments live only in this call.
    support_loss() -> loss; support_acc() -> accuracy, taken once, at the adapted weights.
    Returns that accuracy (None without support_acc); the list `last`, if given, receives the last
    inner step's gradients (taken before its update)."""
    adamw = c.inner_optimizer == "adamw"  # SGD keeps no state: no copy of the adapted weights
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) if adamw else None for p in params]
    for t in range(c.inner_steps):
        lr = scheduled_lr(t, c.inner_lr, c.inner_warmup_steps, c.inner_steps, c.inner_lr_schedule,
                          0.0)
        grads = torch.autograd.grad(support_loss(), params, allow_unused=True)
        if last is not None:
            last[:] = grads
        with torch.no_grad():
            for p, g, state in zip(params, grads, moments):
                if g is None:
                    continue
                if not adamw:
                    p.sub_(g, alpha=lr)
                    continue
                m, v = state
                # AdamW as torch.optim.AdamW computes it: decoupled decay, bias-corrected moments
                p.mul_(1 - lr * c.inner_weight_decay)
                m.lerp_(g, 1 - c.inner_beta1)
                v.mul_(c.inner_beta2).addcmul_(g, g, value=1 - c.inner_beta2)
                denom = (v.sqrt() / math.sqrt(1 - c.inner_beta2 ** (t + 1))).add_(c.inner_eps)
                p.addcdiv_(m, denom, value=-lr / (1 - c.inner_beta1 ** (t + 1)))
        weights_changed()
    acc = None
    if support_acc is not None:
        with torch.no_grad():
            acc = support_acc()
    # the weight casts autocast cached under no_grad carry no gradient path: drop them, so that
    # the query forward with grad that follows casts (and differentiates) the weights itself
    torch.clear_autocast_cache()
    return acc


def scheduled_lr(step, lr, warmup, decay_end, schedule, min_lr):
    """Linear warm-up over `warmup` steps, then constant, or linear or cosine decay from lr to
    min_lr, reached at step decay_end and held after it: the outer schedule (get_lr) and the
    inner loop's, over its steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_end - warmup))
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr + progress * (min_lr - lr)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def weights_changed():
    """Call after changing weights in place inside an autocast region. Autocast keeps the bf16 copy
    of every leaf weight it has cast until the region ends, and does not see in-place updates:
    without this, the next forward would read the weights as they were before the change."""
    torch.clear_autocast_cache()


def head_outer_grad(head, fast, rows, last, word_ids):
    """After the query backward: the gradients at the adapted copy `fast` go to the head's own
    weights (first order). rows: Proto-MAML's class rows, whose gradient flows on into the MLP.
    last: head_grad "paper", the last inner step's gradients (None otherwise; empty without inner
    steps, which leaves plain FOMAML)."""
    grads = [p.grad for p in fast]
    if last:
        # the paper's code ran each inner step as zero_grad, support backward, SGD step on the
        # head's own .grad: the head's gradients from earlier episodes of the step (on this
        # rank) are wiped, and the last support gradient, unscaled, stays under the query's
        for p in head.parameters():
            p.grad = None
        head.add_grad(last, word_ids)
    if rows is not None:  # through the prototypes into the MLP; no output row was used
        torch.autograd.backward(rows, grads[-2:])
        grads[-2:] = None, None
    head.add_grad(grads, word_ids)


def lm_episode(model, ep, c, loss_scale=None, probe=None):
    """A learn-this-text episode, as run_episode describes: adapt every weight on K support
    chunks of a document, take the next-token loss of the chunk that follows (probe: query_acc0,
    the next-token accuracy there with no inner steps)."""
    if probe is not None:
        with torch.no_grad():
            probe["query_acc0"] = lm_loss(model, ep.query_x, ep.query_y)[1]
    params = [p for p in model.parameters() if p.requires_grad]
    with put_back(params):
        # 1. adapt on the support chunks
        s_acc = adapt(params, lambda: lm_loss(model, ep.support_x, ep.support_y)[0], c,
                      lambda: lm_loss(model, ep.support_x, ep.support_y)[1])
        # 2. the query loss at the adapted weights, 3. its gradient there (first order)
        with nullcontext() if loss_scale is not None else torch.no_grad():
            q_loss, q_acc = lm_loss(model, ep.query_x, ep.query_y)
        if loss_scale is not None:
            (q_loss * loss_scale).backward()
    return q_loss.detach(), s_acc, q_acc


def lm_loss(model, x, y):
    """Next-token loss and accuracy of (B, T) windows; the logits stay inside this function."""
    logits, _ = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()), accuracy(logits, y)


# the training loop, then what each step calls
def train(c):
    """One run of config c (a SimpleNamespace of every key) -> (model, head)."""
    t_start = time.time()
    env = common.init_device(c.device)
    say = print if env.master else (lambda *a, **k: None)
    common.check_config(c, env.world_size)  # resolves episodes_per_step 0: checkpoints hold it
    data_info, train_reader, val, sampler, val_sampler = load_data(c)
    common.init_process_group(env)
    model, head, params, optimizer = build(c, env)
    autocast, bf16 = common.autocast(c.dtype, env.type)
    cost, peak = plan(c, env.world_size, bf16), peak_flops(env.dev)
    with common.RunDir(c.out_dir, env.master, c.resume) as run:
        start_step, counters, last_good = start_run(run, c, model, head, optimizer, env)
        say(describe(c, model, head, env, cost, start_step, bf16, peak))
        if c.compile:
            secs = compile_before_clock(model, head, c, env, train_reader, sampler, cost,
                                        autocast, optimizer)
            say(f"compiled in {secs:.1f} s, before the clock starts")
        out = common.RunLog(run, c, env.master, counters, start_step, t_start, last_good,
                            time.time)
        window = {"ar": [0.0, 0], "meta": [0.0, 0]}  # micro-step / episode times between logs

        for step in range(start_step, c.max_steps + 1):
            # once in a while: evaluate the weights, which have had `step` updates; they are saved
            # below once this step's loss shows them finite (a resumed run did both before it
            # stopped). At max_steps no later loss will vouch for them: they are checked directly.
            fresh = step > start_step or not c.resume
            if fresh and (step % c.eval_interval == 0 or step == c.max_steps):
                val_loss, val_meta = evaluate(model, head, val, val_sampler, c, env, autocast)
                if env.master:
                    log_eval(out, step, val_loss, val_meta)
            if step == c.max_steps:
                if fresh:
                    if not (math.isfinite(val_loss) and all(p.isfinite().all() for p in params)):
                        out.stop(f"non-finite weights or val loss ({val_loss}) at step {step}")
                    if env.master:
                        save_checkpoint(run, c, model, head, optimizer, step, out.stamp(),
                                        data_info["tokenizer"])
                break

            # an AR or a meta step, drawn from a generator keyed by (seed, step) alone: every
            # rank takes the same branch without communicating, and a resumed run replays it
            t0 = time.time()
            lr = get_lr(step, c)
            for g in optimizer.param_groups:
                g["lr"] = lr
            is_meta = np.random.default_rng([c.seed, step, 1]).random() < c.meta_ratio
            kind = "meta" if is_meta else "ar"
            # per-slot times need a device sync on CUDA, which stops the host from running ahead:
            # taken on every log_interval-th step only
            timed = env.type == "cpu" or step % c.log_interval == 0
            stats = forward_backward(model, head, c, env, step, is_meta, cost, train_reader,
                                     sampler, autocast, window[kind] if timed else None)

            # reduce over ranks, clip, check, save, step
            if env.ddp:
                all_reduce_grads(params)
                dist.all_reduce(stats)
            with_grad = [p for p in params if p.grad is not None]
            grad_norm = (torch.nn.utils.clip_grad_norm_(with_grad, c.grad_clip) if c.grad_clip > 0
                         else torch.nn.utils.get_total_norm([p.grad for p in with_grad])).item()
            means = dict(zip(STEP_STATS, (stats / stats[-1]).tolist()))  # over slots and ranks
            loss_now = means["meta_loss" if is_meta else "ar_loss"]
            if not (math.isfinite(loss_now) and math.isfinite(grad_norm)):
                out.stop(f"non-finite {'meta' if is_meta else 'AR'} loss ({loss_now}) or grad norm "
                         f"at step {step}")
            # only now, with a finite loss at these weights, is a checkpoint of them known good
            if fresh and step % c.save_interval == 0:
                t_save = time.time()
                if env.master:
                    save_checkpoint(run, c, model, head, optimizer, step, out.stamp(),
                                    data_info["tokenizer"])
                t0 += time.time() - t_save  # "time" is training time: no eval, no checkpoints
                out.last_good = f"{run.ckpt} (step {step})"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # count and log
            dt = time.time() - t0
            tokens, flops = ((cost.meta_tokens, cost.meta_flops) if is_meta
                             else (cost.ar_tokens, cost.ar_flops))
            counters["time"] += dt
            counters["meta_tokens" if is_meta else "ar_tokens"] += tokens
            counters["flops"] += flops
            out.bar.update(1)
            if env.master and ((step + 1) % c.log_interval == 0 or step + 1 == c.max_steps):
                log_step(out, step + 1, lr, grad_norm, dt, tokens, flops, peak, env, window,
                         means, is_meta)
                window = {"ar": [0.0, 0], "meta": [0.0, 0]}
        out.bar.close()
    say(f"done: {counters['ar_tokens']:,} AR tokens, {counters['meta_tokens']:,} meta tokens, "
        f"{counters['flops']:.3g} FLOPs, {counters['time']:.1f} s of training, "
        f"{out.stamp()['wall']:.1f} s in all")
    if env.ddp:
        # leave together: a rank that tore down gloo while rank 0 still wrote the last
        # checkpoint aborted once (std::terminate) in the 8-rank test
        dist.barrier()
        dist.destroy_process_group()
    return model, head


# the meta numbers of every eval, over the fixed val episodes, each with its standard error
# (_se): query accuracy after the inner loop, with no inner steps, by the nearest class mean of the
# support features (the reference adaptation should beat), support accuracy after the inner loop
VAL_META = ("val_query_acc", "val_query_acc0", "val_centroid_acc", "val_support_acc")


@torch.no_grad()
def evaluate(model, head, val, val_sampler, c, env, autocast):
    """Next-token val loss on the fixed val windows (the same for every run, vanilla or meta,
    whatever its batch size) and the VAL_META numbers on fixed val episodes (None without), both
    split across ranks and summed -> (val loss, {name: value, name_se: its standard error})."""
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=env.dev)  # loss sum, tokens
    # per VAL_META number: sum, sum of squares, episodes with it
    acc = torch.zeros(len(VAL_META), 3, dtype=torch.float64, device=env.dev)
    for rows in torch.arange(env.rank, c.eval_sequences, env.world_size).split(c.batch_size):
        x, y = to_device((val[0][rows], val[1][rows]), env.dev)
        with autocast:
            stats[0] += model(x, y)[1].double() * y.numel()
        stats[1] += y.numel()
    for i in range(env.rank, c.eval_episodes if val_sampler else 0, env.world_size):
        ep = to_device(val_sampler.sample(np.random.default_rng([VAL_SEED, i])), env.dev)
        probe = {}
        with torch.enable_grad(), autocast:
            _, s_acc, q_acc = run_episode(model, head, ep, c, probe=probe)
        got = [q_acc, probe.get("query_acc0"), probe.get("centroid_acc"), s_acc]
        for j, v in enumerate(got):
            if v is not None:
                v = v.double()
                acc[j] += torch.stack([v, v * v, torch.ones_like(v)])
    if env.ddp:
        dist.all_reduce(stats)
        dist.all_reduce(acc)
    model.train()
    out = {}
    for name, (total, squares, n) in zip(VAL_META, acc.tolist()):
        mean = total / n if n else None
        out[name] = mean
        # the sample standard deviation over the episodes, over sqrt(episodes)
        out[name + "_se"] = (math.sqrt(max(squares / n - mean * mean, 0.0) / (n - 1))
                             if n > 1 else None)
    return (stats[0] / stats[1]).item(), out


def log_eval(out, step, val_loss, val_meta):
    """An eval's log.jsonl row and progress line."""
    out.log(step=step, val_loss=val_loss, **val_meta, **out.stamp())
    out.write(f"step {step}: val loss {val_loss:.4f}" + "".join(
        f", {k[4:]} {val_meta[k]:.3f}+-{val_meta[k + '_se'] or 0:.3f}"
        for k in VAL_META if val_meta[k] is not None))


def get_lr(step, c):
    """The outer (AdamW) lr at `step`: scheduled_lr with the run's schedule, decayed by
    lr_decay_steps (0: by max_steps)."""
    return scheduled_lr(step, c.learning_rate, c.warmup_steps, c.lr_decay_steps or c.max_steps,
                        c.lr_schedule, c.min_lr)


# what forward_backward sums over a step's slots, in this order, and train over the ranks
STEP_STATS = ("ar_loss", "meta_loss", "support_acc", "query_acc", "slots")


def forward_backward(model, head, c, env, step, is_meta, cost, reader, sampler, autocast, times):
    """One optimizer step's micro-batches (AR) or this rank's episodes (meta), their gradients
    accumulated in .grad -> (5,) the STEP_STATS sums. Data depends on (seed, step, its slot in
    the step) only: episode slot s goes to rank s % world_size (a rank may have none); AR
    sequences are split into equal shares (common.layout); losses are scaled by their share of the
    step, so that the summed gradients over ranks are the step's mean, however it was split.
    times: a [seconds, slots] pair that each slot's time is added to, or None."""
    stats = torch.zeros(len(STEP_STATS), device=env.dev)
    slots = (range(env.rank, c.episodes_per_step, env.world_size) if is_meta
             else range(cost.accum))
    for slot in slots:
        tm = time.time()
        if is_meta:
            ep = to_device(sampler.sample(np.random.default_rng([c.seed, step, slot, 3])), env.dev)
            with autocast:
                q_loss, s_acc, q_acc = run_episode(model, head, ep, c,
                                                   c.meta_loss_weight / c.episodes_per_step)
            stats[1:4] += torch.stack([q_loss, s_acc, q_acc])  # meta_loss, support_acc, query_acc
        else:
            start = env.rank * cost.per_rank + slot * cost.micro
            x, y = to_device(ar_batch(reader, c, step, start, cost.micro), env.dev)
            with autocast:
                loss = model(x, y)[1]
            (loss / (cost.accum * env.world_size)).backward()
            stats[0] += loss.detach()  # ar_loss
        stats[-1] += 1  # slots
        if times is not None:
            if env.type == "cuda":
                torch.cuda.synchronize()
            times[0] += time.time() - tm
            times[1] += 1
    return stats


def ar_batch(reader, c, step, start, n):
    """Sequences start..start+n-1 (x, y: (n, T)) of step's AR batch. The batch is drawn in blocks
    of batch_size sequences, block b from a generator keyed by (seed, step, b), so its data does
    not depend on how ranks, micro-batches and accumulation split it."""
    xs, ys = [], []
    for b in range(start // c.batch_size, (start + n - 1) // c.batch_size + 1):
        rng = np.random.default_rng([c.seed, step, b, 2])
        x, y = reader.next_batch(rng)
        x = mask_inputs(x, rng, c.ar_mask_rate, reader.mask_id)
        lo, hi = max(start - b * c.batch_size, 0), min(start + n - b * c.batch_size, c.batch_size)
        xs.append(x[lo:hi])
        ys.append(y[lo:hi])
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))


def mask_inputs(x, rng, rate, mask_id):
    """AR inputs x (B, T) with a share `rate` of tokens, drawn from rng, replaced by mask_id (the
    targets keep the real tokens): pretraining then sees the token that episodes read."""
    if rate == 0:
        return x
    x = x.clone()
    x[torch.from_numpy(rng.random(tuple(x.shape)) < rate)] = mask_id
    return x


def to_device(batch, dev):
    """Move a tensor, a tuple of them or an Episode to the device. On CUDA through pinned host
    memory, so that the copy is asynchronous (non_blocking from pageable memory is not)."""
    if isinstance(batch, torch.Tensor):
        if torch.device(dev).type == "cuda":
            batch = batch.pin_memory()
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(to_device(t, dev) for t in batch)
    return replace(batch, **{f.name: to_device(getattr(batch, f.name), dev) for f in fields(batch)
                             if getattr(batch, f.name) is not None})


def all_reduce_grads(params, bucket_numel=2 ** 25):
    """Sum .grad over ranks in a few large flat buckets; each rank scaled its losses by its share
    of the step, so the sum is the step's gradient. Explicit all-reduce rather than the DDP
    wrapper: episodes run the model several times per backward (support, inner loop, query) and
    use weights that AR steps do not (the meta head) and vice versa, and the inner loop must not
    communicate; one reduce after accumulation is simple and correct. The ranks first sum which
    parameters any of them holds a gradient for; the buckets are cut from those, in the parameter
    list's fixed order, with zeros where a rank holds no gradient (a rank with no episode in a
    meta step holds none), so every rank sends the same layout. A parameter no rank has a
    gradient for keeps .grad None, as in one process."""
    held = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                        device=params[0].device)
    dist.all_reduce(held)  # how many ranks hold a gradient for each parameter: the same everywhere
    bucket, size = [], 0
    for p in [p for p, n in zip(params, held.tolist()) if n > 0] + [None]:
        if p is not None:
            bucket.append(p)
            size += p.numel()
        if bucket and (p is None or size >= bucket_numel):
            flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten()
                              for q in bucket])
            dist.all_reduce(flat)
            offset = 0
            for q in bucket:
                g = flat[offset:offset + q.numel()].view_as(q)
                offset += q.numel()
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.copy_(g)
            bucket, size = [], 0


def log_step(out, step, lr, grad_norm, dt, tokens, flops, peak, env, window, means, is_meta):
    """A training step's log.jsonl row and progress line; means: the step's STEP_STATS means."""
    mfu = estimate_mfu(flops / dt / env.world_size, peak)  # the peak is one device's
    ms = {k: (1000 * v[0] / v[1] if v[1] else None) for k, v in window.items()}
    row = dict(step=step, lr=lr, grad_norm=grad_norm, tok_per_s=tokens / dt, mfu=mfu,
               ar_ms=ms["ar"], meta_ms=ms["meta"], **out.stamp())
    if is_meta:
        row.update({k: means[k] for k in ("meta_loss", "support_acc", "query_acc")})
    else:
        row.update(ar_loss=means["ar_loss"])
    out.log(**row)
    what = (f"meta loss {means['meta_loss']:.4f} query acc {means['query_acc']:.3f}" if is_meta
            else f"loss {means['ar_loss']:.4f}")
    out.write(f"step {step}: {what} | lr {lr:.2e} | {dt * 1000:.0f} ms | {tokens / dt:,.0f} tok/s"
              + (f" | mfu {mfu:.1%}" if mfu else ""))


# setting up a run, resuming and saving it
def load_data(c):
    """The run's data, opened before any model is built, so that a missing shard, a bad index or
    n_way larger than the candidate words stop it first -> (data_info (meta.json), train
    reader, fixed val windows (x, y), train and val episode samplers or None)."""
    sampler = val_sampler = None
    try:  # data.py's errors name the file; reported like config errors, without a traceback
        data_info = data.read_meta(c.data_dir)
        if c.meta_ratio > 0 and c.meta_task == "smlmt" and data_info.get("index"):
            if c.meta_seq_len > data_info["index"]["context"]:
                raise ConfigError(f"meta_seq_len {c.meta_seq_len} > the SMLMT index's context "
                                  f"{data_info['index']['context']} in {c.data_dir}; rebuild it "
                                  f"with `python prepare.py --reindex --context "
                                  f"{c.meta_seq_len} --out {c.data_dir}` or lower meta_seq_len")
        train_reader = data.ShardReader(c.data_dir, "train", c.batch_size, c.seq_len)
        # the val set: eval_sequences fixed windows, drawn once, the same whatever the batch size
        val = data.ShardReader(c.data_dir, "val", c.eval_sequences, c.seq_len).next_batch(
            np.random.default_rng(VAL_SEED))
        if c.meta_ratio > 0 and c.meta_task == "smlmt":
            args = dict(n_way=c.n_way, k_shot=c.k_shot, q_query=c.q_query, seq_len=c.meta_seq_len)
            sampler = data.SMLMTSampler(c.data_dir, split="train", **args)
            val_sampler = data.SMLMTSampler(c.data_dir, split="val", **args)
        elif c.meta_ratio > 0 and c.meta_task == "positions":
            args = dict(batch_size=c.positions_batch, seq_len=c.seq_len, k_shot=c.k_shot,
                        n_way=c.n_way, unknown=c.positions_unknown)
            sampler = data.PositionsSampler(c.data_dir, "train", **args)
            val_sampler = data.PositionsSampler(c.data_dir, "val", **args)
        elif c.meta_ratio > 0:
            fix = "lower k_shot or meta_seq_len"
            sampler = data.LMTaskSampler(c.data_dir, c.k_shot, c.meta_seq_len, "train", fix)
            val_sampler = data.LMTaskSampler(c.data_dir, c.k_shot, c.meta_seq_len, "val", fix)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    if data_info["mask_id"] >= c.vocab_size:
        raise ConfigError(f"vocab_size {c.vocab_size} has no room for the mask id "
                          f"{data_info['mask_id']}")
    return data_info, train_reader, val, sampler, val_sampler


def build(c, env):
    """The model, the meta head (None for vanilla and LM-task runs) and AdamW over both, from
    one seed on every rank: identical initial weights -> (model, head, params, optimizer)."""
    torch.manual_seed(c.seed)
    model = Llama(common.model_args(c)).to(env.dev)
    head = None
    if c.meta_ratio > 0 and c.meta_task != "lm":
        head = MetaHead(c.dim, c.vocab_size, c.meta_hidden, c.meta_head_init).to(env.dev)
    params = list(model.parameters()) + (list(head.parameters()) if head else [])
    # the paper decays every weight; "matrices" spares norms and biases, as nanoGPT does
    decayed = (lambda p: True) if c.decay_params == "all" else (lambda p: p.dim() >= 2)
    groups = [{"params": [p for p in params if decayed(p)], "weight_decay": c.weight_decay},
              {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.learning_rate,
                                  betas=(c.beta1, c.beta2), fused=env.type == "cuda")
    return model, head, params, optimizer


def compile_before_clock(model, head, c, env, reader, sampler, cost, autocast, optimizer):
    """torch.compile, and every graph compiled now, so that compilation is not logged as training
    time (which would bias a time comparison against meta runs, which compile more graphs).
    Weights do not change: no optimizer step, and episodes restore what they adapt."""
    model.compile(dynamic=False)  # static shapes: AR batches, support and query windows
    t0, rng_state = time.time(), torch.get_rng_state()
    x, y = to_device(ar_batch(reader, c, 0, 0, cost.micro), env.dev)
    with autocast:
        model(x, y)[1].backward()
        if sampler:
            ep = sampler.sample(np.random.default_rng(VAL_SEED))
            run_episode(model, head, to_device(ep, env.dev), c, 1.0)
    optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng_state)
    return time.time() - t0


def start_run(run, c, model, head, optimizer, env):
    """-> (start step, counters, the last good checkpoint or None). A new run refuses an out_dir
    that holds an earlier run; resume=True restores everything a checkpoint holds into the fresh
    model, head and optimizer and this process's RNGs, and cuts log.jsonl back to its step. The
    config must match but for RESUME_FREE keys: anything else would change the run."""
    if not c.resume:
        run.refuse_earlier_run()
        return 0, {"ar_tokens": 0, "meta_tokens": 0, "flops": 0.0, "time": 0.0}, None
    ckpt, path = run.load_resume_checkpoint(env.dev)
    free = set(RESUME_FREE)
    if c.lr_decay_steps > 0 or c.lr_schedule == "constant":
        free.add("max_steps")  # the lr does not depend on it: a finished run can be extended
    diff = {k: (ckpt["config"].get(k), v) for k, v in vars(c).items()
            if k not in free and ckpt["config"].get(k) != v}
    if diff:
        raise ConfigError(f"{path} was written with a different config "
                          f"(key: checkpoint vs now): {diff}")
    if ckpt["step"] > c.max_steps:  # nothing to do would look like success
        raise ConfigError(f"max_steps {c.max_steps} is below step {ckpt['step']} of {path}; give "
                          f"--max_steps={ckpt['step']} or more to continue it")
    model.load_state_dict(ckpt["model"])
    if head is not None:
        head.load_state_dict(ckpt["head"])
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if env.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    if env.master:
        run.truncate_log(ckpt["step"])  # lines the interrupted run wrote after it
    return ckpt["step"], ckpt["counters"], path


def save_checkpoint(run, c, model, head, optimizer, step, counters, tokenizer):
    """Everything a resumed run needs to continue exactly: the uncompiled weights, optimizer,
    config, step and counters, every RNG state (the data stream is a function of (seed, step)).
    Written as the numbered copy analyze.py and ner_eval.py read (keep_checkpoints; without the
    optimizer state, two thirds of a checkpoint), then as ckpt.pt, the only copy with it. Each is
    written to a temporary name and renamed; in this order a crash between the two leaves ckpt.pt
    at the step before, so the resumed run writes both again."""
    obj = {"model_args": asdict(model.args), "model": model.state_dict(),
           "head": head.state_dict() if head is not None else None,
           "optimizer": optimizer.state_dict(), "step": step, "config": dict(vars(c)),
           "tokenizer": tokenizer, "counters": dict(counters),
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                   "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    if c.keep_checkpoints:
        common.save_checkpoint(os.path.join(run.out_dir, f"ckpt_{step:06d}.pt"),
                               {k: v for k, v in obj.items() if k != "optimizer"})
    common.save_checkpoint(run.ckpt, obj)


# a step's plan: layout, tokens, FLOPs, memory; the lines a run prints at its start
def episode_tokens_and_flops(model, c):
    """Tokens one meta episode reads and its training FLOPs: the inner loop, the support forward
    that measures the accuracy after adaptation, and the query pass with its backward. A forward
    is a third of flops_per_token; the meta head's own FLOPs (a 128-wide MLP on N*(K+Q) vectors)
    are left out."""
    if c.meta_task == "smlmt":
        support, query = c.n_way * c.k_shot * c.meta_seq_len, c.n_way * c.q_query * c.meta_seq_len
        tokens, f = support + query, model.flops_per_token(c.meta_seq_len, output=False)
    elif c.meta_task == "positions":  # the support and query passes read the same B x T tokens
        support = query = tokens = c.positions_batch * c.seq_len
        f = model.flops_per_token(c.seq_len, output=False)
    else:
        support, query = c.k_shot * c.meta_seq_len, c.meta_seq_len
        tokens, f = support + query, model.flops_per_token(c.meta_seq_len)
    # head mode: one support forward (the features); all mode: inner steps, then one more forward
    inner = support * f / 3 if c.inner_params == "head" else (c.inner_steps + 1 / 3) * support * f
    return tokens, inner + query * f


def plan(c, world_size, bf16=True):
    """One optimizer step over world_size ranks, from the config alone (the model is built on the
    meta device: no weights, no data) -> SimpleNamespace: common.layout's per_rank, micro, accum
    and episodes (per rank); ar_tokens, ar_flops, meta_tokens, meta_flops of one step over all
    ranks, and flops, their mix at meta_ratio; ar_rank_tokens and meta_rank_tokens, the most one
    rank reads in a step; memory, an estimate of one device's peak bytes, and memory_parts.

    The estimate (bf16: under bf16 autocast, else fp32): 16 bytes a parameter (fp32 weights,
    gradients, AdamW's two moments), 2 more for autocast's bf16 weight copies; plus the larger of
    one AR micro-batch and one episode's saved activations: 26 values a token per layer per dim
    (RMSNorm inputs, q/k/v, attention output, SwiGLU's three 4*dim products; flash attention, no
    recomputation) and, for passes that project onto the vocabulary, bf16/fp32 logits with their
    log-softmax and its gradient; all-mode episodes add the saved weights, an AdamW inner loop its
    moments. Left out: the CUDA context, the allocator's slack, compile workspaces."""
    lay = common.layout(c, world_size)
    meta = c.meta_ratio > 0
    with torch.device("meta"):
        model = Llama(common.model_args(c))
        head = MetaHead(c.dim, c.vocab_size, c.meta_hidden) if c.meta_task != "lm" else None
    n_model = model.num_params()
    n_params = n_model + (sum(p.numel() for p in head.parameters()) if head and meta else 0)
    ar_tokens = c.total_batch_size * c.seq_len
    ep_tokens, ep_flops = episode_tokens_and_flops(model, c) if meta else (0, 0.0)
    e = 2 if bf16 else 4  # bytes of an activation
    act = lambda tokens: tokens * c.n_layers * c.dim * 26 * e
    logits = lambda tokens: tokens * c.vocab_size * (e + 8)
    parts = {"weights, grads, AdamW": 16 * n_params, "bf16 weight copies": 2 * n_model * bf16,
             "AR micro-batch activations": act(lay.micro * c.seq_len) + logits(lay.micro *
                                                                                 c.seq_len)}
    if meta:
        if c.meta_task == "smlmt":
            grad_tokens = c.n_way * (c.q_query + c.k_shot * (c.inner_params == "all"))
            grad_tokens *= c.meta_seq_len
        elif c.meta_task == "positions":
            grad_tokens = c.positions_batch * c.seq_len
        else:
            grad_tokens = c.k_shot * c.meta_seq_len
        ep_bytes = act(grad_tokens) + (logits(grad_tokens) if c.meta_task == "lm" else 0)
        if c.inner_params == "all":
            ep_bytes += 4 * n_model * (1 + 2 * (c.inner_optimizer == "adamw"))
        parts["episode activations"] = ep_bytes
    ar_flops = ar_tokens * model.flops_per_token(c.seq_len)
    meta_flops = ep_flops * c.episodes_per_step
    state = parts["weights, grads, AdamW"] + parts["bf16 weight copies"]
    return SimpleNamespace(
        **vars(lay), ar_tokens=ar_tokens, ar_flops=ar_flops, meta_tokens=ep_tokens *
        c.episodes_per_step, meta_flops=meta_flops,
        flops=(1 - c.meta_ratio) * ar_flops + c.meta_ratio * meta_flops,
        ar_rank_tokens=lay.per_rank * c.seq_len, meta_rank_tokens=max(lay.episodes) * ep_tokens,
        n_params=n_params, bf16=bf16, memory_parts=parts,
        memory=state + max(v for k, v in parts.items() if "activations" in k))


def episode_split(episodes):
    """Episodes per rank in words: '1 per rank x 4 ranks', '1 on ranks 0-3, 0 on ranks 4-7'."""
    w, hi, lo = len(episodes), episodes[0], episodes[-1]
    if hi == lo:
        return f"{hi} per rank x {w} ranks"
    n = episodes.count(hi)
    ranks = lambda a, b: f"rank {a}" if a == b else f"ranks {a}-{b}"
    return f"{hi} on {ranks(0, n - 1)}, {lo} on {ranks(n, w - 1)}"


def plan_lines(c, p, world_size):
    """The layout of a step in words: what a run prints at its start and --plan prints."""
    lines = [f"AR step: {p.ar_tokens:,} tokens = {p.micro} micro-batch x {p.accum} accumulation x "
             f"{world_size} ranks x {c.seq_len} seq_len ({p.ar_rank_tokens:,} tokens per rank; "
             f"batch_size {c.batch_size} is the micro-batch's ceiling); {p.ar_flops:.3g} FLOPs"]
    if p.micro < c.batch_size / 2 and p.accum > 1:  # the share per rank has no large divisor
        lines.append(f"warning: micro-batch {p.micro} is far below batch_size {c.batch_size}; "
                     f"total_batch_size="
                     f"{' or '.join(map(str, common.full_batch_sizes(c, world_size)))} would run "
                     f"full micro-batches")
    if c.meta_ratio > 0:
        shape = {"smlmt": f"{c.n_way}-way {c.k_shot}-shot {c.q_query}-query windows of "
                          f"{c.meta_seq_len} tokens",
                 "positions": f"{c.n_way}-way, {c.k_shot} support + 1 query positions of "
                              f"{c.positions_batch} sequences of {c.seq_len} tokens",
                 "lm": f"{c.k_shot} support chunks + 1 query chunk of {c.meta_seq_len} tokens"
                 }[c.meta_task]
        idle = (f"; {p.episodes.count(0)} of {world_size} ranks idle in meta steps (an "
                f"episodes_per_step that {world_size} divides uses them all)"
                if 0 in p.episodes else "")
        lines.append(f"meta step ({c.meta_ratio:.0%} of steps): {c.episodes_per_step} "
                     f"{c.meta_task} episodes ({episode_split(p.episodes)}) of {shape}, "
                     f"inner_params={c.inner_params}, {c.inner_steps} inner steps at "
                     f"{c.inner_lr}: {p.meta_tokens:,} tokens ({p.meta_rank_tokens:,} on the "
                     f"busiest rank), {p.meta_flops:.3g} FLOPs{idle}")
    gib = lambda b: f"{b / 2 ** 30:.1f}"
    lines.append(f"estimated FLOPs per step {p.flops:.3g} (at meta_ratio {c.meta_ratio}); memory "
                 f"per device ~{gib(p.memory)} GiB {'under bf16 autocast' if p.bf16 else 'in fp32'}"
                 f" ({', '.join(f'{k} {gib(v)}' for k, v in p.memory_parts.items())}; only the "
                 f"larger activations count; no CUDA context or allocator slack)")
    return lines


def describe(c, model, head, env, p, start_step, bf16, peak):
    """The derived quantities a user needs to trust a run, printed once at its start."""
    lines = [f"model: {model_summary(model)}"]
    if head is not None:
        lines.append(f"meta head: {sum(p.numel() for p in head.parameters()):,} parameters "
                     f"({c.meta_hidden}-wide MLP + {c.vocab_size}-row output; an episode uses "
                     f"{c.n_way} rows)")
    lines.append(f"device {env.dev} x {env.world_size} rank(s), "
                 f"{'bf16 autocast' if bf16 else 'fp32'}, compile={c.compile}, "
                 f"{'glibc keeps freed memory, ' if env.kept_memory else ''}"
                 f"peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (no MFU)'}")
    lines += plan_lines(c, p, env.world_size)
    lines.append(f"val: {c.eval_sequences} sequences x {c.seq_len} tokens"
                 + (f", {c.eval_episodes} episodes" if c.meta_ratio > 0 else "")
                 + f", every {c.eval_interval} steps")
    lines.append(f"{c.max_steps} steps from step {start_step}, warm-up {c.warmup_steps}, lr "
                 f"{c.learning_rate} ({c.lr_schedule} to {c.min_lr} at step "
                 f"{c.lr_decay_steps or c.max_steps})")
    return "\n".join(lines)


def print_plan(argv):
    """--plan [--world_size=N]: the layout and cost of a step of this config on N ranks (default
    1), checked as a run would check it, without data, weights or processes."""
    world_size, rest = 1, []
    for a in argv:
        if a.startswith("--world_size="):
            try:
                world_size = int(a.partition("=")[2])
            except ValueError:
                raise ConfigError(f"--world_size must be a whole number, got {a}") from None
            if world_size < 1:
                raise ConfigError(f"--world_size must be at least 1, got {world_size}")
        elif a != "--plan":
            rest.append(a)
    c = SimpleNamespace(**common.configure(DEFAULTS, rest))
    common.check_config(c, world_size, need_data=False)
    p = plan(c, world_size, bf16=c.dtype != "float32")  # "auto" is bf16 on the GPUs this is for
    print(f"{' '.join(rest) or 'defaults'} on {world_size} rank(s): {p.n_params:,} parameters "
          f"(model and meta head)")
    print("\n".join(plan_lines(c, p, world_size)))


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        print("keys and defaults:")
        for k, v in DEFAULTS.items():
            print(f"  --{k}={v!r}")
        sys.exit(0)
    try:
        if "--plan" in sys.argv[1:]:
            print_plan(sys.argv[1:])
        else:
            train(SimpleNamespace(**common.configure(DEFAULTS, sys.argv[1:])))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    finally:
        if dist.is_initialized():  # a run that stopped early leaves its process group behind
            dist.destroy_process_group()
