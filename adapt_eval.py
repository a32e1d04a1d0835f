"""
Does a checkpoint learn new text faster, with fewer examples? The proposal's test of "MAML in LLM
pretraining": for each held-out document, fine-tune a copy of the model on k consecutive chunks of
it for s steps and measure the next-token loss on the chunk that follows them, averaged over
documents with a standard error; checkpoints side by side.

    python adapt_eval.py out/cpu-vanilla out/cpu-meta          # the val split of each run's data
    python adapt_eval.py A B --text held_out.txt --ks 1 2 4 8 --steps 0 1 2 5 10 20

The query chunk of a document is the same for every k (the chunk after the k_max support
chunks; k uses the k chunks right before it), so the curves differ in the number of examples
only. Chunks are separate windows: the only way the support chunks help is through the weights.
Fine-tuning is meta_train.py's inner loop (meta_train.adapt) with the first checkpoint's inner
settings (optimizer, lr and schedule over the s steps) unless flags override them, the same for
every checkpoint. Writes a JSON file and a plot.
"""
import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import common
import data
import meta_train
import prepare
from model import Llama

INNER_KEYS = ("inner_optimizer", "inner_lr", "inner_lr_schedule", "inner_warmup_steps",
              "inner_beta1", "inner_beta2", "inner_eps", "inner_weight_decay")


def spans_from_text(paths, enc, n_chunks, T, n_docs):
    """(n_chunks * T + 1)-token spans, the start of each long-enough document of the text files."""
    spans = []
    for doc in prepare.iter_text_docs(prepare.text_files(paths)):
        tokens = enc.encode_ordinary(doc)
        if len(tokens) >= n_chunks * T + 1:
            spans.append(tokens[:n_chunks * T + 1])
            if len(spans) == n_docs:
                break
    if not spans:
        raise ValueError(f"no document of {paths} has {n_chunks} x {T} + 1 tokens; lower the "
                         f"largest --ks or --chunk_len")
    return torch.tensor(spans)


def spans_from_split(data_dir, n_chunks, T, n_docs, seed):
    """One (n_chunks * T + 1)-token span of each of n_docs distinct val documents long enough
    for it (all of them if fewer), at a random start: documents drawn without replacement, so
    the standard error counts independent documents."""
    sampler = data.LMTaskSampler(data_dir, n_chunks - 1, T, "val",
                                 "lower the largest --ks or --chunk_len")
    rng = np.random.default_rng(seed)
    docs = rng.choice(sampler.n_docs, min(n_docs, sampler.n_docs), replace=False)
    starts = sampler.doc_begins[docs] + (rng.random(len(docs)) * sampler.n_spans[docs]).astype(
        np.int64)
    return torch.from_numpy(data._gather(sampler.shards, sampler.shard_starts, starts,
                                         n_chunks * T + 1))


def adaptation_curves(model, spans, ks, steps, inner, T, env, autocast):
    """-> {k: {s: [query loss per document]}}: model's weights are restored after every run."""
    out = {k: {s: [] for s in steps} for k in ks}
    k_max = max(ks)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for span in spans:
        x, y = span[:-1].view(k_max + 1, T), span[1:].view(k_max + 1, T)
        x, y = x.to(env.dev), y.to(env.dev)
        for k in ks:
            support = (x[k_max - k:k_max], y[k_max - k:k_max])
            for s in steps:
                c = SimpleNamespace(**inner, inner_steps=s)
                with autocast:
                    meta_train.adapt(params, lambda: meta_train.lm_loss(model, *support)[0], c)
                    with torch.no_grad():
                        loss = meta_train.lm_loss(model, x[k_max:], y[k_max:])[0]
                out[k][s].append(loss.item())
                meta_train.restore(params, saved)
    return out


def mean_se(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def format_tables(results, ks, steps):
    lines = []
    for name, res in results.items():
        lines += [f"{name}: query next-token loss, mean +- standard error over "
                  f"{len(res['curves'][ks[0]][steps[0]])} documents",
                  f"{'steps':>6}" + "".join(f"{'k=' + str(k):>18}" for k in ks)]
        for s in steps:
            cells = [mean_se(res["curves"][k][s]) for k in ks]
            lines.append(f"{s:>6}" + "".join(f"{m:>11.4f} +-{e:.4f}" for m, e in cells))
        lines.append("")
    if len(results) > 1:  # paired per document: the same documents and chunks for every run
        (a, ra), *rest = results.items()
        for b, rb in rest:
            lines += [f"{b} minus {a} (paired over documents; negative: {b} lower)",
                      f"{'steps':>6}" + "".join(f"{'k=' + str(k):>18}" for k in ks)]
            for s in steps:
                cells = [mean_se(np.subtract(rb["curves"][k][s], ra["curves"][k][s])) for k in ks]
                lines.append(f"{s:>6}" + "".join(f"{m:>+11.4f} +-{e:.4f}" for m, e in cells))
            lines.append("")
    return "\n".join(lines)


def plot(results, ks, steps, path):
    """Loss against steps at the largest k, and against k at the most steps. False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        m, e = zip(*[mean_se(res["curves"][max(ks)][s]) for s in steps])
        a1.errorbar(steps, m, yerr=e, marker=".", capsize=3, label=name)
        m, e = zip(*[mean_se(res["curves"][k][max(steps)]) for k in ks])
        a2.errorbar(ks, m, yerr=e, marker=".", capsize=3, label=name)
    a1.set(xlabel="fine-tuning steps s", ylabel="query loss", title=f"k = {max(ks)} chunks")
    a2.set(xlabel="support chunks k", ylabel="query loss", title=f"s = {max(steps)} steps",
           xscale="log")
    a1.legend(fontsize=8)
    fig.tight_layout()
    common.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def main(argv=None):
    p = common.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="checkpoint files or run directories (their ckpt.pt)")
    p.add_argument("--text", nargs="+", help="held-out text files (default: each run's val split)")
    p.add_argument("--data_dir", help="shards whose val split to use (default: the first run's)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="support chunks")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 5, 10],
                   help="fine-tuning steps")
    p.add_argument("--chunk_len", type=int, help="tokens per chunk (default: meta_seq_len)")
    p.add_argument("--docs", type=int, default=32, help="documents averaged over")
    p.add_argument("--seed", type=int, default=0, help="which val documents")
    for key in INNER_KEYS:
        p.add_argument(f"--{key}", type=type(meta_train.DEFAULTS[key]),
                       help="default: the first checkpoint's")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--out", help="JSON path (default: adapt_eval.json beside the first checkpoint)")
    args = p.parse_args(argv)
    try:
        for flag, value, low in (("--ks", min(args.ks), 1), ("--steps", min(args.steps), 0),
                                 ("--docs", args.docs, 1), ("--chunk_len", args.chunk_len, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        for key in INNER_KEYS:  # meta_train's checks, for the keys this script takes
            value = getattr(args, key)
            if value is None:
                continue
            if key in common.CHOICES and value not in common.CHOICES[key]:
                raise ValueError(f"--{key} must be one of {', '.join(common.CHOICES[key])}, got "
                                 f"{value!r}")
            if key not in common.CHOICES and not value >= 0:  # also refuses nan
                raise ValueError(f"--{key} must be at least 0, got {value}")
            if key in ("inner_beta1", "inner_beta2") and not value < 1:
                raise ValueError(f"--{key} must be below 1, got {value}")
        if args.out:
            common.check_out_file(args.out, "--out")
        paths = [common.checkpoint_path(c) for c in args.ckpts]
        ckpts = [common.load_checkpoint(path, need=("model_args", "model", "config", "step",
                                                    "tokenizer")) for path in paths]
        for path, ckpt in zip(paths[1:], ckpts[1:]):  # losses over other tokens do not compare
            if ckpt["tokenizer"] != ckpts[0]["tokenizer"]:
                raise ValueError(f"{path} uses tokenizer {ckpt['tokenizer']!r}, {paths[0]} "
                                 f"{ckpts[0]['tokenizer']!r}: their losses are not comparable; "
                                 f"compare checkpoints of one tokenizer")
        first = ckpts[0]["config"]
        inner = {k: getattr(args, k) if getattr(args, k) is not None else first.get(
            k, meta_train.DEFAULTS[k]) for k in INNER_KEYS}
        T = args.chunk_len or first["meta_seq_len"]
        for path, ckpt in zip(paths, ckpts):
            if T > ckpt["model_args"]["max_seq_len"]:
                raise ValueError(f"{path}: chunks of {T} tokens > its max_seq_len "
                                 f"{ckpt['model_args']['max_seq_len']}; lower --chunk_len")
        if args.text:
            enc = common.get_encoding(ckpts[0]["tokenizer"])
            spans = spans_from_text(args.text, enc, max(args.ks) + 1, T, args.docs)
        else:
            data_dir = args.data_dir or first["data_dir"]
            tokenizer = data.read_meta(data_dir)["tokenizer"]
            if tokenizer != ckpts[0]["tokenizer"]:
                raise ValueError(f"{data_dir} holds {tokenizer!r} tokens, the checkpoints read "
                                 f"{ckpts[0]['tokenizer']!r}; give --data_dir of their tokenizer "
                                 f"or --text FILES")
            spans = spans_from_split(data_dir, max(args.ks) + 1, T, args.docs, args.seed)
        env = common.init_device(args.device)
    except (common.CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"adapt_eval.py: error: {e}")
    autocast, _ = common.autocast(args.dtype, env.type)
    ks, steps = sorted(set(args.ks)), sorted(set(args.steps))
    print(f"{len(spans)} documents, {max(ks)} + 1 chunks of {T} tokens each; inner loop: "
          + ", ".join(f"{k}={v}" for k, v in inner.items()))
    results = {}
    for path, ckpt in zip(paths, ckpts):
        t0 = time.time()
        model = Llama.from_checkpoint(ckpt, env.dev)
        curves = adaptation_curves(model, spans, ks, steps, inner, T, env, autocast)
        name = path if path not in results else f"{path} ({len(results)})"
        results[name] = {"step": ckpt["step"], "curves": curves, "seconds": time.time() - t0}
        print(f"{path}: step {ckpt['step']}, {time.time() - t0:.0f} s")
    print("\n" + format_tables(results, ks, steps), end="")
    out = args.out or os.path.join(os.path.dirname(paths[0]), "adapt_eval.json")
    common.write_json(out, {"inner": inner, "chunk_len": T, "ks": ks, "steps": steps,
                            "documents": len(spans), "runs": results})
    png = os.path.splitext(out)[0] + ".png"
    print(f"wrote {out}" + (f" and {png}" if plot(results, ks, steps, png) else ""))


if __name__ == "__main__":
    main()
