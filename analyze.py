"""
Learning dynamics of a run, and comparison of runs.

    python analyze.py RUN_DIR [--probe_text FILE] [--probe_batch 8] [--probe_len 256]
                              [--grads loss|paper] [--out DIR]
    python analyze.py --compare RUN_A RUN_B [...] [--out DIR]

The first form reads the run's numbered checkpoints (ckpt_NNNNNN.pt) in step order and, on one
fixed probe batch (evenly spaced windows of the run's first val shard, or of --probe_text), measures
per layer:
  - effective rank (Roy & Vetterli 2007: exp of the Shannon entropy, in nats, of the singular values
    normalised to sum 1) and proportional effective rank (PER = effective rank / number of singular
    values) of every weight matrix (wq wk wv wo w1 w2 w3), of the gradient of the probe pass with
    respect to them (see --grads), and of the block's output activations (probe tokens x d_model);
  - the attention entropy of every head: mean over query positions of -sum p log p of the causal
    attention distribution, in nats and divided by log(number of visible keys).
It writes metrics.csv (step, layer, component, metric, value), one PNG per metric (one panel per
layer), and summary.txt: per layer the step where PER and entropy peak and whether the curve rises
then falls ("diversify, then compress"), and which layers turn first. A numbered checkpoint that
cannot be read is skipped with a warning, and summary.txt lists it: analysis only reads, and the
run's other checkpoints are still good.

--grads chooses the probe pass (one forward and backward pass, which also gives the activations
and attention probabilities):
  loss   (default) the gradient of the next-token loss, RoPE on: the model as it was trained; grad
         metrics for all seven matrices.
  paper  the paper's analysis: the gradient of the mean of the logits, with RoPE replaced by the
         identity (cos 1, sin 0) for the pass; grad metrics for wq wk wv wo only. The paper took
         activations in that same pass, so here too the block outputs (act_*) and the attention
         entropies are those of the model without RoPE. Weight metrics do not depend on the pass
         and are the same under both.

The second form reads each run's log.jsonl and compares validation loss against steps, tokens,
estimated FLOPs and training wall time: how far into the first run's budget each other run reaches
the first run's final validation loss. It prints a table and writes compare.txt and compare.png;
for meta runs both also show the meta val numbers (query accuracy after the inner loop and with no
inner steps, nearest support class mean, support accuracy after adapting) with standard errors.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
from model import Llama

# the matrices of one block, by the short name used in the CSV
MATRICES = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
            "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
# --grads: what each probe pass differentiates, and the matrices whose gradients it analyses
GRADS = {
    "loss": ("next-token loss, RoPE on", list(MATRICES)),
    "paper": ("mean of the logits, RoPE as the identity (activations and attention too)",
              ["wq", "wk", "wv", "wo"]),
}
# every metric in the CSV; the text is the title of its plot
METRICS = {
    "weight_erank": "effective rank of each weight matrix",
    "weight_per": "PER (effective rank / min(rows, cols)) of each weight matrix",
    "grad_erank": "effective rank of the probe pass's gradient of each weight matrix",
    "grad_per": "PER of the probe pass's gradient of each weight matrix",
    "act_erank": "effective rank of the block output (probe tokens x d_model)",
    "act_per": "PER of the block output (probe tokens x d_model)",
    "entropy": "attention entropy per head, nats (mean over query positions 1..T-1)",
    "entropy_norm": "attention entropy per head / log(visible keys) (1 = uniform)",
}
# the curves the summary reads, one per layer: mean over the matrices, or over the heads
SUMMARY_METRICS = ["weight_per", "grad_per", "act_per", "entropy_norm"]
# float64 SVDs: cheap next to the forward and backward pass, and no question about the accuracy
# of the small singular values of nearly low-rank gradients
SVD_DTYPE = torch.float64


def effective_rank(s):
    """Roy & Vetterli's effective rank of singular values s (..., k): exp of the Shannon entropy
    (nats) of s / sum(s). k equal non-zero values give k; zeros contribute nothing (0 log 0 = 0).
    An all-zero s has no distribution and gives nan."""
    return torch.exp(row_entropy(s / s.sum(-1, keepdim=True)))


def svdvals(mats):
    """Singular values of a list of 2-D tensors, one batched SVD per distinct shape."""
    # singular values do not change under transposition: orienting every matrix tall lets
    # w2 (dim, hidden) share a batch with w1 and w3 (hidden, dim)
    mats = [m if m.shape[0] >= m.shape[1] else m.T for m in mats]
    groups = {}
    for i, m in enumerate(mats):
        groups.setdefault(tuple(m.shape), []).append(i)
    out = [None] * len(mats)
    for idx in groups.values():
        s = torch.linalg.svdvals(torch.stack([mats[i] for i in idx]).to(SVD_DTYPE))  # (n, k)
        for i, si in zip(idx, s):
            out[i] = si
    return out


def erank_per(mats):
    """[(effective rank, PER)] for a list of 2-D tensors."""
    eranks = [effective_rank(s).item() for s in svdvals(mats)]
    return [(er, er / min(m.shape)) for er, m in zip(eranks, mats)]


def row_entropy(p):
    """Shannon entropy (nats) of the distributions p (..., n) along the last axis."""
    return -torch.xlogy(p, p).sum(-1)


def head_entropy(att):
    """att (B, H, T, T) causal attention probabilities -> (raw (H,), normalised (H,)): per head the
    mean over the batch and the query positions of the entropy of each query's distribution, in
    nats, and divided by log(i + 1), the entropy of the uniform distribution over the i + 1 keys
    query i can see. Query 0 sees one key, so its entropy is always 0 and its normalised entropy
    0 / 0; it says nothing about the head, so it is left out of both means (positions 1..T-1)."""
    T = att.shape[-1]
    if T < 2:
        raise ValueError("attention entropy needs at least 2 positions")
    ent = row_entropy(att.float())[:, :, 1:]  # (B, H, T-1)
    # query i sees i + 1 keys: 2..T for queries 1..T-1
    visible = torch.arange(2, T + 1, dtype=ent.dtype, device=ent.device)
    return ent.mean((0, 2)), (ent / visible.log()).mean((0, 2))


@contextmanager
def identity_rope(model):
    """Inside the block the model runs with RoPE as the identity (cos 1, sin 0), as in the paper's
    analysis pass; its own tables are put back afterwards. model.py is left as it is: the tables
    are buffers that every forward pass reads."""
    cos, sin = model.rope_cos, model.rope_sin
    model.rope_cos, model.rope_sin = torch.ones_like(cos), torch.zeros_like(sin)
    try:
        yield
    finally:
        model.rope_cos, model.rope_sin = cos, sin


def block_pass(model, x):
    """The model's forward pass, block by block -> (logits (B, T, V), block outputs
    [L x (B, T, C)], attention probabilities [L x (B, H, T, T)]). The probabilities, softmax of
    q k^T / sqrt(D) under the causal mask, are written out here: SDPA never forms them."""
    T = x.shape[1]
    cos, sin = model.rope(T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    h, blocks, attn = model.tok_embeddings(x), [], []
    for layer in model.layers:
        with torch.no_grad():
            q, k, _ = layer.attention.qkv(layer.attention_norm(h), cos, sin)  # (B, H, T, D)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            attn.append(scores.float().masked_fill(~causal, float("-inf")).softmax(-1))
        h = layer(h, cos, sin)
        blocks.append(h)
    return model.output(model.norm(h)).float(), blocks, attn


def probe_pass(model, x, y, grads="loss", ctx=nullcontext()):
    """One forward and backward pass on the probe batch x, y (B, T): of the next-token loss
    (grads 'loss'), or of the mean of the logits with RoPE as the identity (grads 'paper'); the
    forward pass runs under ctx (autocast or nothing).
    Returns (the value differentiated, blocks [L x (B*T, C)], attn [L x (B, H, T, T)], weights
    and grads: dicts (layer, name) -> 2-D tensor, grads for the matrices GRADS[grads] names).
    Leaves only those matrices requiring grad."""
    model.eval()
    # only the analysed matrices need their weight gradients: leaving everything else out of
    # autograd skips the rest, the largest being the output projection's (V, B*T) x (B*T, C)
    model.requires_grad_(False)
    names = GRADS[grads][1]
    for layer in model.layers:
        for name in names:
            layer.get_submodule(MATRICES[name]).weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with ctx:
        if grads == "paper":
            with identity_rope(model):
                logits, blocks, attn = block_pass(model, x)
            value = logits.mean()
        else:
            logits, blocks, attn = block_pass(model, x)
            value = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    value.backward()
    blocks = [b.detach().reshape(-1, model.args.dim) for b in blocks]
    weights, grad = {}, {}
    for i, layer in enumerate(model.layers):
        for name, path in MATRICES.items():
            w = layer.get_submodule(path).weight
            weights[i, name] = w.detach()
            if name in names:
                grad[i, name] = w.grad
    return value.item(), blocks, attn, weights, grad


def analyze_checkpoint(model, x, y, step, grads="loss", ctx=nullcontext()):
    """All metrics of one model on the probe batch x, y (B, T) -> rows
    (step, layer, component, metric, value); components are matrix names, "out" (the block
    output) and "h0".."h{H-1}" (attention heads)."""
    _, blocks, attn, weights, grad = probe_pass(model, x, y, grads, ctx)
    mats = list(weights.values()) + list(grad.values()) + blocks
    labels = ([(i, name, "weight") for i, name in weights] + [(i, name, "grad") for i, name in grad]
              + [(i, "out", "act") for i in range(len(blocks))])
    rows = []
    for (layer, component, kind), (er, per) in zip(labels, erank_per(mats)):
        rows.append((step, layer, component, f"{kind}_erank", er))
        rows.append((step, layer, component, f"{kind}_per", per))
    for layer, att in enumerate(attn):
        raw, norm = head_entropy(att)
        for h in range(att.shape[1]):
            rows.append((step, layer, f"h{h}", "entropy", raw[h].item()))
            rows.append((step, layer, f"h{h}", "entropy_norm", norm[h].item()))
    return rows


def list_checkpoints(run_dir):
    """The run's numbered checkpoints ckpt_NNNNNN.pt in step order (ckpt.pt, the latest, is a
    duplicate of the last one and is not read)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} " + (
            "is a file: pass the directory that holds the run's checkpoints"
            if os.path.exists(run_dir) else "does not exist"))
    found = common.numbered_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no numbered checkpoints (ckpt_NNNNNN.pt) in {run_dir}: analysis "
                                f"needs the periodic copies that meta_train.py keeps")
    return [path for _, path in found]


def probe_windows(tokens, batch, seq_len, source):
    """batch windows of seq_len + 1 tokens (inputs and next-token targets) at evenly spaced offsets
    of the 1-D token array: fixed by the data alone, so every checkpoint sees the same probe."""
    n = len(tokens)
    if n < seq_len + 1:
        raise ValueError(f"{source} has {n} tokens; a probe window needs {seq_len + 1}")
    offsets = np.linspace(0, n - seq_len - 1, batch).round().astype(np.int64)
    windows = np.stack([np.asarray(tokens[o:o + seq_len + 1], dtype=np.int64) for o in offsets])
    return torch.from_numpy(windows)  # (batch, seq_len + 1)


def load_probe(ckpt, probe_text=None, data_dir=None, batch=8, seq_len=None):
    """The probe batch (batch, seq_len + 1) and a line saying where it comes from: probe_text
    tokenized with the run's tokenizer, or else the first val shard of the run's data."""
    cfg = ckpt["config"]
    seq_len = seq_len or cfg["seq_len"]
    if seq_len > ckpt["model_args"]["max_seq_len"]:
        raise ValueError(f"--probe_len {seq_len} > the model's max_seq_len "
                         f"{ckpt['model_args']['max_seq_len']}; lower --probe_len")
    if probe_text:
        try:
            enc = common.get_encoding(ckpt["tokenizer"])
        except RuntimeError as e:  # unknown name, or offline without the BPE file
            raise ValueError(str(e)) from None
        with open(probe_text, encoding="utf-8") as f:
            tokens = enc.encode_ordinary(f.read())
        source = probe_text
    else:
        try:
            shards = data.list_shards(data_dir or cfg["data_dir"], "val")
        except FileNotFoundError as e:  # names the dir; the run's own may have moved
            raise FileNotFoundError(f"{e}; give --data_dir of the run's shards, or --probe_text "
                                    f"FILE") from None
        tokens, source = data.load_shard(shards[0]), shards[0]
    windows = probe_windows(tokens, batch, seq_len, source)
    return windows, f"{batch} windows x {seq_len} tokens from {source}"


def analyze_run(run_dir, probe_text=None, data_dir=None, probe_batch=8, probe_len=None,
                device="auto", grads="loss", dtype="auto"):
    """Metrics of every readable numbered checkpoint of a run -> (rows, probe description,
    skipped: the errors of those that cannot be read, each naming its file). The probe comes from
    the first readable one. None readable is a ValueError. device and dtype: as meta_train's."""
    paths = list_checkpoints(run_dir)
    device = common.init_device(device).dev
    ctx, _ = common.autocast(dtype, torch.device(device).type)
    need = ["model_args", "model", "config", "step"] + (["tokenizer"] if probe_text else [])
    rows, probe, skipped = [], None, []
    for path in tqdm(paths, desc="checkpoints", unit="ckpt"):
        try:
            ckpt = common.load_checkpoint(path, device, need)
        except common.CheckpointError as e:
            tqdm.write(f"warning: skipped: {e}", file=sys.stderr)
            skipped.append(str(e))
            continue
        if probe is None:
            probe, probe_desc = load_probe(ckpt, probe_text, data_dir, probe_batch, probe_len)
            probe = probe.to(device)
        model = Llama.from_checkpoint(ckpt, device)
        rows += analyze_checkpoint(model, probe[:, :-1], probe[:, 1:], ckpt["step"], grads, ctx)
    if not rows:
        raise ValueError(f"none of the {len(paths)} numbered checkpoints in {run_dir} can be read "
                         f"(the warnings above say why)")
    return rows, probe_desc, skipped


def write_text(path, text):
    common.atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(rows, path):
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["step", "layer", "component", "metric", "value"])
    w.writerows(rows)
    write_text(path, buf.getvalue())


def layer_curves(rows, metric):
    """{layer: (steps, values)} of one metric, averaged over the components of each layer (the
    seven matrices, or the heads)."""
    acc = {}
    for step, layer, _, m, value in rows:
        if m == metric:
            acc.setdefault(layer, {}).setdefault(step, []).append(value)
    curves = {}
    for layer, by_step in sorted(acc.items()):
        steps = sorted(by_step)
        curves[layer] = (np.array(steps), np.array([np.mean(by_step[s]) for s in steps]))
    return curves


def peak(steps, values, tol):
    """(peak step, peak value, rises then falls) of one curve. "Diversify, then compress" means
    here: the maximum lies strictly inside the step range, the curve rises from its first value to
    the maximum by more than tol x |maximum|, and falls from the maximum to its last value by more
    than tol x |maximum|."""
    v = np.asarray(values, dtype=float)
    i = int(np.argmax(v))
    margin = tol * abs(v[i])
    turns = bool(0 < i < len(v) - 1 and v[i] - v[0] > margin and v[i] - v[-1] > margin)
    return steps[i], v[i], turns


def summarize(rows, tol, header="", grads="loss", skipped=()):
    steps = sorted({r[0] for r in rows})
    what, grad_names = GRADS[grads]
    lines = [header,
             f"{len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}"]
    if skipped:
        lines.append(f"skipped {len(skipped)} of {len(steps) + len(skipped)} numbered "
                     f"checkpoints, which cannot be read:")
        lines += [f"  {reason}" for reason in skipped]
    lines += [f"gradients (--grads {grads}): of the {what}",
              f"per layer: weight_per is the mean over {', '.join(MATRICES)}, grad_per over "
              f"{', '.join(grad_names)}; entropy_norm is the mean over heads of entropy / "
              f"log(visible keys)",
             f"rises then falls (diversify, then compress): the peak lies strictly inside the step "
             f"range and the curve rises to it and falls after it by more than {tol:g} x the peak",
             ""]
    lines.append(f"{'metric':<13} {'layer':>5} {'peak step':>10} {'first':>8} {'peak':>8} "
                 f"{'last':>8}  rises then falls")
    order = []
    for metric in SUMMARY_METRICS:
        turned = []
        for layer, (s, v) in layer_curves(rows, metric).items():
            pstep, pval, turns = peak(s, v, tol)
            lines.append(f"{metric:<13} {layer:>5} {pstep:>10} {v[0]:>8.4f} {pval:>8.4f} "
                         f"{v[-1]:>8.4f}  {'yes' if turns else 'no'}")
            if turns:
                turned.append((pstep, layer))
        first = ", ".join(f"layer {layer} (step {s})" for s, layer in sorted(turned)) or "none"
        order.append(f"  {metric}: {first}")
    lines += ["", "layers that rise then fall, earliest peak first:"] + order
    return "\n".join(lines) + "\n"


def plot_metrics(rows, out_dir):
    """One PNG per metric: a panel per layer, a line per component, against step. Returns the
    paths written, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = {}  # metric -> layer -> component -> [(step, value)], components in CSV order
    for step, layer, comp, metric, value in rows:
        by_comp = series.setdefault(metric, {}).setdefault(layer, {})
        by_comp.setdefault(comp, []).append((step, value))
    paths = []
    for metric, by_layer in series.items():
        layers = sorted(by_layer)
        cols = min(4, len(layers))
        nrows = math.ceil(len(layers) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False,
                                 sharex=True)
        for ax, layer in zip(axes.flat, layers):
            for comp, pts in by_layer[layer].items():
                ax.plot(*zip(*sorted(pts)), marker=".", label=comp, lw=1)
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{metric}: {METRICS[metric]}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{metric}.png")
        common.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        paths.append(path)
    return paths


# the x-axes of a comparison: log.jsonl keys (tokens = ar_tokens + meta_tokens)
AXES = ["step", "tokens", "flops", "time"]
# meta_train's eval numbers on fixed val episodes: query accuracy after the inner loop, with no
# inner steps, by the nearest support class mean, support accuracy after the inner loop
META_ACCS = ["val_query_acc", "val_query_acc0", "val_centroid_acc", "val_support_acc"]


def read_log(run_dir):
    """The eval lines of a run's log.jsonl as arrays {val_loss, step, tokens, flops, time}, in step
    order. A resumed run may log a step twice; the later line wins."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no log.jsonl in {run_dir}")
    evals = {}
    for rec in common.read_log(path):
        if rec.get("val_loss") is not None:
            evals[rec["step"]] = rec
    if not evals:
        raise ValueError(f"{path} has no eval lines (val_loss)")
    recs = [evals[s] for s in sorted(evals)]
    return {
        "val_loss": np.array([r["val_loss"] for r in recs], dtype=float),
        "step": np.array([r["step"] for r in recs], dtype=float),
        # a token kind a run does not use may be logged as null: it counts as none
        "tokens": np.array([(r.get("ar_tokens") or 0) + (r.get("meta_tokens") or 0) for r in recs],
                           dtype=float),
        # null (not logged) becomes nan, shown as n/a
        "flops": np.array([r.get("flops") for r in recs], dtype=float),
        "time": np.array([r.get("time") for r in recs], dtype=float),
        # meta_train's mechanism numbers on its fixed val episodes and their standard errors
        # (nan where a run or an older log has none)
        **{k: np.array([r.get(k) for r in recs], dtype=float)
           for name in META_ACCS for k in (name, name + "_se")},
    }


def reach(loss, target):
    """Fractional index at which a loss curve (one value per eval) first reaches target, linear
    between evals; None if it never does."""
    hit = np.nonzero(loss <= target)[0]
    if len(hit) == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return 0.0
    return i - 1 + (loss[i - 1] - target) / (loss[i - 1] - loss[i])


def speedup(a, b):
    """{axis: x} where run b first reaches run a's final val loss at x times a's total steps,
    tokens, FLOPs, time (x < 1: sooner), or None when b never reaches it. a, b from read_log."""
    f = reach(b["val_loss"], a["val_loss"][-1])
    out = {}
    for axis in AXES:
        if f is None:
            out[axis] = None
            continue
        i, frac = int(f), f - int(f)
        at = b[axis][i] if frac == 0 else b[axis][i] + frac * (b[axis][i + 1] - b[axis][i])
        out[axis] = at / a[axis][-1]
    return out


def fmt_amount(x):
    return "n/a" if math.isnan(x) else f"{x:.4g}"


def compare_table(runs, logs):
    a = logs[0]
    lines = [f"target: final val loss of {runs[0]} = {a['val_loss'][-1]:.4f}", "",
             f"{'run':<30} {'final val':>9} " + " ".join(f"{ax:>10}" for ax in AXES)]
    for run, log in zip(runs, logs):
        lines.append(f"{run:<30} {log['val_loss'][-1]:>9.4f} "
                     + " ".join(f"{fmt_amount(log[ax][-1]):>10}" for ax in AXES))
    lines += ["", "reaches the target at this fraction of the first run's budget (speedup):",
              f"{'run':<30} " + " ".join(f"{ax:>15}" for ax in AXES)]
    for run, log in zip(runs[1:], logs[1:]):
        cells = []
        for ax, x in speedup(a, log).items():
            if x is None:
                cells.append("not reached")
            elif math.isnan(x):
                cells.append("n/a")
            else:
                cells.append(f"{x:.2f}" + (f" ({1 / x:.2f}x)" if x > 0 else ""))
        lines.append(f"{run:<30} " + " ".join(f"{c:>15}" for c in cells))
    with_meta = [(run, log) for run, log in zip(runs, logs)
                 if not np.isnan(log.get("val_query_acc", np.nan)).all()]
    if with_meta:
        lines += ["", "meta val episodes at the last eval (+- standard error): query accuracy "
                  "after the inner loop, with none, nearest class mean, support after the inner "
                  "loop:",
                  f"{'run':<30} " + " ".join(f"{name[4:]:>15}" for name in META_ACCS)]
        for run, log in with_meta:
            lines.append(f"{run:<30} " + " ".join(
                f"{log[n][-1]:>7.3f} +-{log[n + '_se'][-1]:.3f}" if not np.isnan(log[n][-1])
                else f"{'n/a':>15}" for n in META_ACCS))
    return "\n".join(lines) + "\n"


def plot_compare(runs, logs, path):
    """Val loss against each axis, one line per run, the target dashed. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    meta = any(not np.isnan(log.get("val_query_acc", np.nan)).all() for log in logs)
    fig, axes = plt.subplots(3 if meta else 2, 2, figsize=(10, 10.5 if meta else 7))
    for ax, axis in zip(axes.flat, AXES):
        for run, log in zip(runs, logs):
            ax.plot(log[axis], log["val_loss"], marker=".", label=run)
        ax.axhline(logs[0]["val_loss"][-1], color="gray", ls="--", lw=1)
        ax.set_xlabel(axis)
        ax.set_ylabel("val loss")
    axes.flat[0].legend(fontsize=8)
    if meta:  # left: after the inner loop (solid) and with none (dashed); right: the references
        for ax, names in zip(axes[2], [META_ACCS[:2], META_ACCS[2:]]):
            for i, (run, log) in enumerate(zip(runs, logs)):
                for name, ls in zip(names, ["-", "--"]):
                    if not np.isnan(log[name]).all():
                        ax.errorbar(log["step"], log[name], yerr=log[name + "_se"], ls=ls,
                                    marker=".", color=f"C{i}", capsize=2, label=f"{run} {name[4:]}")
            ax.set_xlabel("step")
            ax.set_ylabel("meta val accuracy")
            ax.legend(fontsize=7)
        axes[2][0].set_title("query: after the inner loop (solid), no inner steps (dashed)",
                             fontsize=9)
        axes[2][1].set_title("nearest support class mean (solid), support after adapting (dashed)",
                             fontsize=9)
    fig.suptitle("validation loss; dashed: the first run's final value", fontsize=10)
    fig.tight_layout()
    common.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def main(argv=None):
    p = common.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="run directory holding ckpt_NNNNNN.pt files")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="compare the val loss of two or more runs; the first is the baseline")
    p.add_argument("--out", help="output directory (default: RUN_DIR/analysis, with --grads "
                                 "paper RUN_DIR/analysis_paper, or the first compared run's "
                                 "analysis/)")
    p.add_argument("--probe_text", help="UTF-8 text for the probe batch, tokenized with the run's "
                                        "tokenizer (default: the run's first val shard)")
    p.add_argument("--data_dir", help="shard directory (default: the data_dir in the run's config)")
    p.add_argument("--probe_batch", type=int, default=8, help="probe windows")
    p.add_argument("--probe_len", type=int,
                   help="tokens per probe window (default: the run's seq_len)")
    p.add_argument("--tol", type=float, default=0.01,
                   help="relative rise and fall a curve needs to count as rising then falling")
    p.add_argument("--grads", choices=list(GRADS), default="loss",
                   help="probe pass: 'loss', the next-token loss with RoPE, grads of all seven "
                   "matrices; 'paper', the mean of the logits with RoPE as the identity (for the "
                   "activations and attention too), grads of wq wk wv wo only")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=common.CHOICES["dtype"], default="auto",
                   help="autocast of the probe pass; auto: bfloat16 on cuda, float32 on cpu")
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.compare is None):
        p.error("give either RUN_DIR or --compare RUN_A RUN_B [...]")
    for flag, value, low in (("--probe_batch", args.probe_batch, 1),
                             ("--probe_len", args.probe_len, 1), ("--tol", args.tol, 0)):
        if value is not None and not value >= low:  # also refuses a nan --tol
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.probe_text and not os.path.isfile(args.probe_text):
        p.error(f"--probe_text {args.probe_text} is not a file")
    if args.out:
        try:
            common.make_dir(args.out, "--out")
        except common.ConfigError as e:
            p.error(str(e))

    if args.compare:
        if len(args.compare) < 2:
            p.error("--compare needs at least two runs")
        try:
            logs = [read_log(run) for run in args.compare]
        except (OSError, ValueError) as e:  # each names its file: one line, no usage, no traceback
            raise SystemExit(str(e)) from None
        out = args.out or os.path.join(args.compare[0], "analysis")
        os.makedirs(out, exist_ok=True)
        table = compare_table(args.compare, logs)
        print(table, end="")
        write_text(os.path.join(out, "compare.txt"), table)
        plotted = plot_compare(args.compare, logs, os.path.join(out, "compare.png"))
        print(f"wrote {out}/compare.txt" + (" and compare.png" if plotted else
                                             " (matplotlib not installed: no plot)"))
        return

    t0 = time.time()
    try:
        rows, probe_desc, skipped = analyze_run(args.run_dir, args.probe_text, args.data_dir,
                                                args.probe_batch, args.probe_len, args.device,
                                                args.grads, args.dtype)
    except (OSError, ValueError) as e:  # no readable checkpoints or shards, a probe too long
        raise SystemExit(str(e)) from None
    # its own default folder: the two passes' curves differ, and neither should replace the other
    out = args.out or os.path.join(args.run_dir, "analysis_paper" if args.grads == "paper"
                                   else "analysis")
    os.makedirs(out, exist_ok=True)
    n = len({r[0] for r in rows})
    print(f"analysed {n} checkpoints in {time.time() - t0:.1f} s"
          + (f", skipped {len(skipped)} that cannot be read" if skipped else ""))
    write_csv(rows, os.path.join(out, "metrics.csv"))
    summary = summarize(rows, args.tol, f"run {args.run_dir}; probe: {probe_desc}", args.grads,
                        skipped)
    write_text(os.path.join(out, "summary.txt"), summary)
    print(summary, end="")
    plots = plot_metrics(rows, out)
    if plots is None:
        print("matplotlib not installed: no plots (pip install matplotlib); "
              "CSV and summary written")
    print(f"wrote {out}/metrics.csv, summary.txt" + (f" and {len(plots)} plots" if plots else ""))


if __name__ == "__main__":
    main()
