"""
A short check of the paper-scale path on one CUDA GPU, in a few minutes: what the CPU tests cannot
show. Run it after installing the requirements (with the CUDA build of torch):

    python gpu_check.py --text some_text.txt            # a few MB of local text is plenty
    python gpu_check.py --text a.txt --config configs/181m.py --batch_size=16

It (1) tokenizes the text into a small data directory, (2) trains a few hybrid steps of the config
(configs/570m.py by default: bf16 autocast and torch.compile) and reports graphs compiled, graph
breaks, peak memory and each step's time and MFU, (3) checks that inner steps change the query
loss under the run's autocast, as in fp32, (4) resumes from the middle checkpoint and compares the
final weights, (5) runs bench.py at the config's shape. Any other --key=value overrides a
meta_train.py config key. Results go to --work/gpu_check.json as well.
"""
import argparse
import os
import shutil
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

import bench
import common
import data
import meta_train
import prepare
from model import Llama


def build_data(text, enc, out, max_tokens, index_args=None):
    """A data directory of about max_tokens tokens of the text; every tenth document is val.
    index_args: prepare.build_index's keywords (default: its band, made for real text)."""
    if not os.path.exists(os.path.join(out, "meta.json")):
        docs, chars = [], 0
        for doc in prepare.iter_text_docs(prepare.text_files(text)):
            docs.append(doc)
            chars += len(doc)
            if chars >= 4 * max_tokens:  # about 4 characters per GPT-2 token of English
                break
        index_args = {"source": f"--text {' '.join(text)}", **(index_args or {})}
        prepare.write_shards([d for i, d in enumerate(docs) if i % 10], enc, out, val_tokens=0,
                             val_docs=docs[::10], progress=False, index_args=index_args)
    return data.read_meta(out)


def train_run(cfg, out_dir, copy_at=None, copy_to=None, resume=False):
    """meta_train.train on cfg; with copy_at, the files the run writes at that step are copied to
    copy_to (the state an interrupted run would leave). -> (log rows, compile counters)."""
    from torch._dynamo.utils import counters
    counters.clear()
    save = common.save_checkpoint

    def save_and_copy(path, obj):
        save(path, obj)
        if obj["step"] == copy_at:
            shutil.copy(path, os.path.join(copy_to, os.path.basename(path)))

    common.save_checkpoint = save_and_copy
    try:
        meta_train.train(SimpleNamespace(**{**cfg, "out_dir": out_dir, "resume": resume}))
    finally:
        common.save_checkpoint = save
    breaks = dict(counters["graph_break"])
    log = common.read_log(os.path.join(out_dir, "log.jsonl"))
    return log, {"graphs": counters["stats"]["unique_graphs"],
                 "graph_breaks": sum(breaks.values()), "break_reasons": list(breaks)[:5]}


def inner_loop_check(ckpt_path, cfg, dev, autocast):
    """Query loss of one val episode whose query windows are its support windows, with 0 and with
    inner_steps inner steps, under the run's autocast and in fp32: adaptation must lower it
    alike."""
    ckpt = common.load_checkpoint(ckpt_path, dev)
    c = SimpleNamespace(**cfg)
    model = Llama.from_checkpoint(ckpt, dev)
    head = meta_train.MetaHead(c.dim, c.vocab_size, c.meta_hidden).to(dev)
    head.load_state_dict(ckpt["head"])
    sampler = data.SMLMTSampler(c.data_dir, c.n_way, c.k_shot, c.q_query, c.meta_seq_len,
                                split="val")
    ep = meta_train.to_device(sampler.sample(np.random.default_rng(0)), dev)
    ep.query_x, ep.query_y = ep.support_x, ep.support_y
    out = {}
    for name, ctx in [("run autocast", autocast), ("fp32", nullcontext())]:
        for steps in (0, c.inner_steps):
            with ctx, torch.enable_grad():
                q_loss = meta_train.smlmt_episode(model, head, ep, SimpleNamespace(
                    **{**cfg, "inner_steps": steps}))[0]
            out[f"{name}, {steps} inner steps"] = q_loss.item()
    return out


def check(text, enc, work, config, overrides, steps=6, max_tokens=5_000_000, run_bench=True,
          index_args=None):
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    meta = build_data(text, enc, os.path.join(work, "data"), max_tokens, index_args)
    report = {"torch": torch.__version__, "data": f"{meta['train_tokens']:,} train + "
              f"{meta['val_tokens']:,} val tokens, {meta['index']['n_words']:,} candidate words"}
    cfg = common.configure(meta_train.DEFAULTS, [config] + list(overrides) + [
        f"--data_dir={os.path.join(work, 'data')}", f"--max_steps={steps}", "--log_interval=1",
        f"--eval_interval={steps // 2}", f"--save_interval={steps // 2}", "--warmup_steps=2",
        "--eval_sequences=64", "--eval_episodes=4"])
    c = SimpleNamespace(**cfg)
    dev = common.init_device(c.device).dev
    report["device"] = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    report["config"] = " ".join([config] + list(overrides))
    for d in ("full", "resumed"):
        shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    os.makedirs(os.path.join(work, "resumed"))
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.time()
    log, compiled = train_run(cfg, os.path.join(work, "full"), copy_at=steps // 2,
                              copy_to=os.path.join(work, "resumed"))
    report["train"] = {"seconds": time.time() - t, **compiled, "steps": [
        {k: r[k] for k in ("step", "ar_loss", "meta_loss", "tok_per_s", "mfu", "ar_ms", "meta_ms")}
        for r in log if r["val_loss"] is None]}
    if dev.startswith("cuda"):
        report["train"]["peak_memory_GiB"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    shutil.copy(os.path.join(work, "full", "log.jsonl"), os.path.join(work, "resumed"))
    train_run(cfg, os.path.join(work, "resumed"), resume=True)
    final = [common.load_checkpoint(os.path.join(work, d, f"ckpt_{steps:06d}.pt"))
             for d in ("full", "resumed")]
    diffs = [(a - b).abs().max().item() for part in ("model", "head") if final[0][part]
             for a, b in zip(final[0][part].values(), final[1][part].values())]
    report["resume_max_abs_diff"] = max(diffs)
    autocast, _ = common.autocast(c.dtype, torch.device(dev).type)
    if c.meta_task == "smlmt" and c.meta_ratio > 0:  # the check reads an SMLMT val episode
        report["inner_loop"] = inner_loop_check(
            os.path.join(work, "full", f"ckpt_{steps:06d}.pt"), cfg, dev, autocast)
    if run_bench:
        facts, rows = bench.run(cfg, reps=5, warmup=2, compile=True)
        report["bench"] = bench.format_table(facts, rows, tera=dev.startswith("cuda"))
    report["seconds"] = time.time() - t0
    common.write_json(os.path.join(work, "gpu_check.json"), report)
    return report


def format_report(r):
    lines = [f"{k}: {r[k]}" for k in ("device", "torch", "config", "data")]
    t = r["train"]
    lines.append(f"train: {len(t['steps'])} steps in {t['seconds']:.0f} s (compile included), "
                 f"{t['graphs']} graphs compiled, {t['graph_breaks']} graph breaks "
                 f"{t['break_reasons'] or ''}" + (f", peak memory {t['peak_memory_GiB']:.1f} GiB"
                                                  if "peak_memory_GiB" in t else ""))
    for s in t["steps"]:
        kind = "meta" if s["meta_loss"] is not None else "AR"
        mfu = f", MFU {s['mfu']:.1%}" if s["mfu"] else ""
        unit, ms = ("episode", s["meta_ms"]) if kind == "meta" else ("micro-step", s["ar_ms"])
        lines.append(f"  step {s['step']}: {kind}, {ms:.0f} ms per {unit}, "
                     f"{s['tok_per_s']:,.0f} tok/s{mfu}")
    lines.append(f"resume: max |weight difference| at the last step {r['resume_max_abs_diff']:.3g}")
    if "inner_loop" in r:
        lines.append("inner loop, query = support windows: " + ", ".join(
            f"{k}: {v:.4f}" for k, v in r["inner_loop"].items()))
    if "bench" in r:
        lines += ["", r["bench"]]
    lines.append(f"\ndone in {r['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="+", required=True, help="local UTF-8 text files (globs)")
    p.add_argument("--config", default="configs/570m.py")
    p.add_argument("--work", default="out/gpu_check", help="data, runs and the JSON report")
    p.add_argument("--steps", type=int, default=6, help="training steps (resumed at half)")
    p.add_argument("--max_tokens", type=int, default=5_000_000, help="tokens of text to use")
    p.add_argument("--no_bench", action="store_true", help="skip the bench.py table")
    args, overrides = p.parse_known_args(argv)
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be even and at least 2")
    try:
        report = check(args.text, common.get_encoding("gpt2"), args.work, args.config, overrides,
                       args.steps, args.max_tokens, not args.no_bench)
    except (common.ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"gpu_check.py: error: {e}")
    print(format_report(report))


if __name__ == "__main__":
    main()
