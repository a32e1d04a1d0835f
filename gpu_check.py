"""
A short check of the paper-scale path on one CUDA GPU, in a few minutes: what the CPU tests cannot
show. Run it after installing the requirements (with the CUDA build of torch):

    python gpu_check.py --text some_text.txt            # a few MB of local text is plenty
    python gpu_check.py --text a.txt --config configs/181m.py --batch_size=16

It (1) tokenizes the text into a small data directory, (2) trains a few hybrid steps of the config
(configs/570m.py by default: bf16 autocast and torch.compile) and reports graphs compiled, graph
breaks, recompiles after the first step, peak memory and each step's time and MFU, (3) resumes
from the middle checkpoint and compares the final weights, (4) checks that inner steps lower the
query loss under the run's autocast as they do in fp32, (5) runs bench.py at the config's shape
(its peer comparison in full fp32). Any other --key=value overrides a meta_train.py config key.

Each check has a threshold (INNER_DROP_SHARE, BF16_TOL, RESUME_TOL below; no graph breaks, no
recompiles); the script exits with status 1 when one fails or a stage raises. The JSON report,
--work/gpu_check.json, is rewritten after every stage, so a failure keeps the earlier figures.
Disk: the runs keep ckpt.pt only (no numbered copies), at most two plus one being written (at
570m about 21 GB), and remove them when done. Without CUDA it refuses to run unless --allow_cpu.
"""
import argparse
import math
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


# Thresholds: each check fails the script (exit status 1) when its figure is past them.
INNER_DROP_SHARE = 0.5  # bf16 inner steps lower the query loss by at least half fp32's drop
BF16_TOL = 0.05  # |bf16 - fp32| query loss after adaptation; bf16 keeps 8 significant bits, 0.4%
# relative per rounding, and a loss near ln 32 = 3.47 read through the whole backbone collects a
# few of them (~0.01-0.03); a stale cast (the inner steps not seen) moves it by the whole drop
RESUME_TOL = 0.01  # ||full - resumed|| / ||full's own movement over the resumed steps||. On the
# CPU the two are bit for bit equal. CUDA's atomic-add kernels (embedding and index_add
# backward, split-K matmuls) change gradients in their last bits from run to run; AdamW passes
# that on unamplified except where a gradient is near zero, so a correct resume stays far below
# 1% of the movement, and a wrong one (optimizer state lost, other data) is tens of percent


def train_run(cfg, out_dir, copy_at=None, copy_to=None, resume=False):
    """meta_train.train on cfg; with copy_at, ckpt.pt as the run writes it at that step is copied
    to copy_to (the state an interrupted run would leave). -> (log rows, compile counters: graphs,
    graph breaks and their reasons, and recompiles: graphs compiled after the first training
    step, when every graph the run needs was compiled before the clock started)."""
    from torch._dynamo.utils import counters
    counters.clear()
    save, append_log = common.save_checkpoint, common.RunDir.append_log
    graphs_at = []  # (step, is a training row, graphs compiled so far) at each log row

    def save_and_copy(path, obj):
        save(path, obj)
        if obj["step"] == copy_at and os.path.basename(path) == "ckpt.pt":
            shutil.copy(path, os.path.join(copy_to, "ckpt.pt"))

    def append_and_count(run, row):
        append_log(run, row)
        graphs_at.append((row["step"], row.get("val_loss") is None,
                          counters["stats"]["unique_graphs"]))

    common.save_checkpoint, common.RunDir.append_log = save_and_copy, append_and_count
    try:
        meta_train.train(SimpleNamespace(**{**cfg, "out_dir": out_dir, "resume": resume}))
    finally:
        common.save_checkpoint, common.RunDir.append_log = save, append_log
    breaks = dict(counters["graph_break"])
    first = next((g for _, training, g in graphs_at if training), None)
    log = common.read_log(os.path.join(out_dir, "log.jsonl"))
    return log, {"graphs": counters["stats"]["unique_graphs"],
                 "graph_breaks": sum(breaks.values()), "break_reasons": list(breaks)[:5],
                 "recompiles": graphs_at[-1][2] - first if first is not None else 0}


def weights(path):
    """The model's and head's weights of a checkpoint, on the CPU (no optimizer state)."""
    ckpt = common.load_checkpoint(path)
    return {**ckpt["model"], **{"head." + k: v for k, v in (ckpt["head"] or {}).items()}}


def inner_loop_check(ckpt_path, cfg, dev, autocast):
    """Query loss of one val episode whose query windows are its support windows, with 0 and with
    inner_steps inner steps, under the run's autocast and in fp32: adaptation must lower it
    alike."""
    ckpt = common.load_checkpoint(ckpt_path, dev)
    c = SimpleNamespace(**cfg)
    model = Llama.from_checkpoint(ckpt, dev)
    head = meta_train.MetaHead(c.dim, c.vocab_size, c.meta_hidden).to(dev)
    head.load_state_dict(ckpt["head"])
    del ckpt  # its optimizer state is twice the weights: free it before the episodes
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


def verdict(value, ok, threshold):
    return {"value": value, "ok": bool(ok), "threshold": threshold}


def data_stage(job):
    """Build the data directory and configure the run: job gets cfg, c (cfg as attributes) and
    dev."""
    meta = build_data(job.text, job.enc, os.path.join(job.work, "data"), job.max_tokens,
                      job.index_args)
    job.report["data"] = (f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
                          f"{meta['index']['n_words']:,} candidate words")
    # keep_checkpoints=False: the resume check needs ckpt.pt at the middle step and at the
    # end only; numbered copies would add gigabytes a save at paper scale
    job.cfg = common.configure(meta_train.DEFAULTS, [job.config] + list(job.overrides) + [
        f"--data_dir={os.path.join(job.work, 'data')}", f"--max_steps={job.steps}",
        "--log_interval=1", f"--eval_interval={job.steps // 2}",
        f"--save_interval={job.steps // 2}", "--warmup_steps=2", "--eval_sequences=64",
        "--eval_episodes=4", "--keep_checkpoints=False"])
    job.c = SimpleNamespace(**job.cfg)
    job.dev = common.init_device(job.c.device).dev
    job.report["device"] = (torch.cuda.get_device_name(job.dev) if job.dev.startswith("cuda")
                            else "cpu")


def train_stage(job):
    """Train the full run, copying its middle checkpoint to the resumed run's directory; report
    its steps, peak memory and the graph-break and recompile checks."""
    report, dev = job.report, job.dev
    for d in (job.full, job.resumed):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(job.resumed)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.time()
    log, compiled = train_run(job.cfg, job.full, copy_at=job.steps // 2, copy_to=job.resumed)
    report["train"] = {"seconds": time.time() - t, **compiled, "steps": [
        {k: r[k] for k in ("step", "ar_loss", "meta_loss", "tok_per_s", "mfu", "ar_ms",
                           "meta_ms")}
        for r in log if r["val_loss"] is None]}
    if dev.startswith("cuda"):
        report["train"]["peak_memory_GiB"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    report["checks"]["graph breaks"] = verdict(compiled["graph_breaks"],
                                               compiled["graph_breaks"] == 0, "0")
    report["checks"]["recompiles after the first step"] = verdict(
        compiled["recompiles"], compiled["recompiles"] == 0, "0")


def resume_stage(job):
    """Resume from the middle checkpoint and compare its final weights with the full run's."""
    report, resumed_ckpt = job.report, os.path.join(job.resumed, "ckpt.pt")
    shutil.copy(os.path.join(job.full, "log.jsonl"), job.resumed)
    mid = weights(resumed_ckpt)
    train_run(job.cfg, job.resumed, resume=True)
    end, again = weights(job.last), weights(resumed_ckpt)
    norm = lambda a, b: math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item()
                                      for k in a))
    rel = norm(end, again) / max(norm(end, mid), 1e-30)
    report["resume_max_abs_diff"] = max((end[k] - again[k]).abs().max().item() for k in end)
    report["checks"]["resume"] = verdict(rel, rel <= RESUME_TOL, f"<= {RESUME_TOL}")
    os.remove(resumed_ckpt)  # all the later stages need is full's


def inner_loop_stage(job):
    """The inner-loop checks on the full run's last checkpoint: the inner steps lower the query
    loss under the run's autocast, and it agrees with fp32 after adaptation."""
    report, c = job.report, job.c
    if not (c.meta_task == "smlmt" and c.meta_ratio > 0):  # it reads an SMLMT val episode
        return
    autocast, _ = common.autocast(c.dtype, torch.device(job.dev).type)
    inner = report["inner_loop"] = inner_loop_check(job.last, job.cfg, job.dev, autocast)
    n = c.inner_steps
    drop = {k: inner[f"{k}, 0 inner steps"] - inner[f"{k}, {n} inner steps"]
            for k in ("run autocast", "fp32")}
    report["checks"]["inner steps lower the query loss under the run's autocast"] = verdict(
        drop["run autocast"], drop["fp32"] > 0 and
        drop["run autocast"] >= INNER_DROP_SHARE * drop["fp32"],
        f">= {INNER_DROP_SHARE} x the fp32 drop ({drop['fp32']:.4g}), which is > 0")
    gap = abs(inner[f"run autocast, {n} inner steps"] - inner[f"fp32, {n} inner steps"])
    report["checks"]["run autocast agrees with fp32 after adaptation"] = verdict(
        gap, gap <= BF16_TOL, f"<= {BF16_TOL}")


def bench_stage(job):
    """Remove the last checkpoint, then (with run_bench) bench.py's table at the config's
    shape."""
    if os.path.exists(job.last):
        os.remove(job.last)  # the runs' checkpoints are no longer needed
    if job.run_bench:
        facts, rows = bench.run(job.cfg, reps=5, warmup=2, compile=True)
        job.report["bench"] = bench.format_table(facts, rows, tera=job.dev.startswith("cuda"))


def check(text, enc, work, config, overrides, steps=6, max_tokens=5_000_000, run_bench=True,
          index_args=None):
    """Run the stages in order; the report is written to work/gpu_check.json after each, so a
    failure in one leaves the others' figures. -> the report: its "checks" say what passed
    ({name: value, ok, threshold}), its "errors" which stages raised and why."""
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    path = os.path.join(work, "gpu_check.json")
    report = {"torch": torch.__version__, "config": " ".join([config] + list(overrides)),
              "checks": {}, "errors": {}}
    full, resumed = os.path.join(work, "full"), os.path.join(work, "resumed")
    # what every stage reads; data_stage adds cfg, c and dev for the stages after it
    job = SimpleNamespace(text=text, enc=enc, work=work, config=config, overrides=overrides,
                          steps=steps, max_tokens=max_tokens, run_bench=run_bench,
                          index_args=index_args, report=report, full=full, resumed=resumed,
                          last=os.path.join(full, "ckpt.pt"))
    stages = [("data", data_stage), ("train", train_stage), ("resume", resume_stage),
              ("inner loop", inner_loop_stage), ("bench", bench_stage)]
    try:
        for name, stage in stages:
            try:
                stage(job)
            # SystemExit too: training stops that way on a non-finite loss, the very fault a
            # bf16 check hunts; recorded, and the later stages that do not need it still run
            except (Exception, SystemExit) as e:
                if isinstance(e, common.ConfigError) and name in ("data", "train"):
                    raise  # bad input, before anything was measured: a one-line error
                report["errors"][name] = f"{type(e).__name__}: {e}"
                if name in ("data", "train"):  # everything after needs the data and the run
                    report["errors"].update({n: "skipped: an earlier stage failed"
                                             for n, _ in stages[stages.index((name, stage)) + 1:]})
                    report["seconds"] = time.time() - t0
                    common.write_json(path, report)
                    break
            report["seconds"] = time.time() - t0
            common.write_json(path, report)
    finally:  # a failed stage must not leave gigabyte checkpoints behind
        for d in (full, resumed):
            for f in os.listdir(d) if os.path.isdir(d) else []:
                if ".pt" in f:
                    os.remove(os.path.join(d, f))
    return report


def failed(report):
    return [k for k, v in report["checks"].items() if not v["ok"]] + list(report["errors"])


def format_report(r):
    lines = [f"{k}: {r[k]}" for k in ("device", "torch", "config", "data") if k in r]
    t = r.get("train")
    if t:
        lines.append(f"train: {len(t['steps'])} steps in {t['seconds']:.0f} s (compile "
                     f"included), {t['graphs']} graphs compiled, {t['graph_breaks']} graph breaks "
                     f"{t['break_reasons'] or ''}, {t['recompiles']} recompiles after the first "
                     f"step" + (f", peak memory {t['peak_memory_GiB']:.1f} GiB"
                                if "peak_memory_GiB" in t else ""))
        for s in t["steps"]:
            kind = "meta" if s["meta_loss"] is not None else "AR"
            mfu = f"MFU {s['mfu']:.1%}" if s["mfu"] else "MFU unknown (no datasheet peak)"
            unit, ms = ("episode", s["meta_ms"]) if kind == "meta" else ("micro-step", s["ar_ms"])
            lines.append(f"  step {s['step']}: {kind}, {ms:.0f} ms per {unit}, "
                         f"{s['tok_per_s']:,.0f} tok/s, {mfu}")
    if "resume_max_abs_diff" in r:
        lines.append(f"resume: max |weight difference| at the last step "
                     f"{r['resume_max_abs_diff']:.3g}")
    if "inner_loop" in r:
        lines.append("inner loop, query = support windows: " + ", ".join(
            f"{k}: {v:.4f}" for k, v in r["inner_loop"].items()))
    if "bench" in r:
        lines += ["", r["bench"]]
    lines.append("")
    for k, v in r["checks"].items():
        value = f"{v['value']:.4g}" if isinstance(v["value"], float) else v["value"]
        lines.append(f"{'ok  ' if v['ok'] else 'FAIL'} {k}: {value} (threshold {v['threshold']})")
    for k, v in r["errors"].items():
        lines.append(f"FAIL stage {k}: {v}")
    lines.append(f"\ndone in {r['seconds']:.0f} s: " + (
        f"{len(failed(r))} failed" if failed(r) else "every check passed"))
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
    p.add_argument("--allow_cpu", action="store_true",
                   help="run without CUDA (the tests do, at a tiny size)")
    args, overrides = p.parse_known_args(argv)
    try:
        common.check_torch()  # before minutes of tokenizing
    except common.ConfigError as e:
        sys.exit(f"gpu_check.py: error: {e}")
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be even and at least 2")
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("gpu_check.py: no CUDA device here, and this checks the GPU path; "
                 "--allow_cpu runs it on the CPU anyway")
    try:
        report = check(args.text, common.get_encoding("gpt2"), args.work, args.config, overrides,
                       args.steps, args.max_tokens, not args.no_bench)
    except (common.ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"gpu_check.py: error: {e}")
    print(format_report(report))
    print(f"report: {os.path.join(args.work, 'gpu_check.json')}")
    if failed(report):
        sys.exit(1)


if __name__ == "__main__":
    main()
