"""
How fast is nanoMAML, against the machine's limit and against the model a user would pick instead?
One table: training micro-steps (forward + backward, no optimizer step) of an AR micro-batch and of
an SMLMT meta episode in head and in all mode, at the config's shapes, compared per token; MFU
against a known GPU's datasheet peak, else against a matmul timed in this run; the peer, Hugging
Face LlamaForCausalLM with our configuration and weights, eager and compiled; tokenization against
raw tiktoken; episode sampling; the peak memory of every step.

  python bench.py                                # configs/cpu.py on CPU, configs/181m.py on CUDA
  python bench.py --config configs/11m.py --reps 5 --no_compile --json out/bench.json
  python bench.py --batch_size=4 --meta_seq_len=128   # any meta_train.py key overrides the config
  python bench.py --text corpus/valid.txt             # also tokenization against raw tiktoken

The peer is an optional extra: `pip install transformers` (it leaves torch alone); without it its
rows say so. Times are medians of --reps runs after --warmup runs.
"""
import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

import common
import data
import export_hf
import meta_train
import prepare
from model import Llama, estimate_mfu, model_summary, peak_flops

ROOT = os.path.dirname(os.path.abspath(__file__))


def median_ms(steps, reps, warmup, sync=None):
    """steps {name: (setup, fn)} -> {name: median ms of fn()} over `reps` runs after `warmup`
    untimed ones (which also compile). The steps take turns, rep by rep: a shared machine that
    slows down for a while slows them all alike, so their ratios hold. The order reverses every
    rep (a b c, c b a, ...): in a fixed order a step's time depended on its place in it (ours
    against the peer came out 5% either way, depending on which went first).
    setup() is not timed."""
    times = {name: [] for name in steps}
    for i in range(warmup + reps):
        for name, (setup, fn) in list(steps.items())[::1 if i % 2 == 0 else -1]:
            if setup:
                setup()
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn, dev, setup=None):
    """Bytes a step needs above what was allocated before it. CUDA: max_memory_allocated. A CPU
    has no allocator statistics, so Linux's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set before the step, after handing freed heap back
    with malloc_trim: the step's tensors plus allocator overhead. None where unavailable."""
    if setup:
        setup()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(dev) - base
    def status(key):  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS:")
    except (OSError, StopIteration):
        return None
    fn()
    return status("VmHWM:") - base


def matmul_peak(dev, dtype, n, reps, warmup):
    """FLOP/s of an n x n x n matmul in dtype (2 n^3 per product), the best a dense kernel does
    here. The fastest run, not the median: a peak taken low on a noisy machine flatters MFU."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    ms = min(median_ms({"mm": (None, lambda: a @ b)}, 1, warmup if i == 0 else 0, sync)["mm"]
             for i in range(reps))
    return 2 * n ** 3 / (ms / 1000)


def hf_peer(model):
    """-> (LlamaForCausalLM with model's configuration and weights, its version), or (None, why).
    The configuration and weights are export_hf.py's: the mapping a user's export goes through."""
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None, "transformers not installed (pip install transformers)"
    cfg = LlamaConfig(**export_hf.hf_config(model.args, eot_id=0), use_cache=False)  # training
    peer = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    peer.load_state_dict(export_hf.hf_state_dict(model), strict=True)
    n_ours, n_peer = model.num_params(), sum(p.numel() for p in peer.parameters())
    assert n_ours == n_peer, f"parameter counts differ: ours {n_ours:,}, peer {n_peer:,}"
    return peer.to(model.output.weight.device).train(), f"transformers {transformers.__version__}"


def random_episode(c):
    """An SMLMT-shaped episode of random tokens, for when there is no data directory."""
    N, K, Q, T, V = c.n_way, c.k_shot, c.q_query, c.meta_seq_len, c.vocab_size
    lab = torch.arange(N)
    return data.Episode(support_x=torch.randint(0, V, (N * K, T)),
                        support_y=lab.repeat_interleave(K),
                        query_x=torch.randint(0, V, (N * Q, T)), query_y=lab.repeat_interleave(Q),
                        word_ids=torch.randperm(V)[:N],
                        support_pos=torch.zeros(N * K, dtype=torch.long),
                        query_pos=torch.zeros(N * Q, dtype=torch.long))


def _count_tokens(docs):
    """(in a worker of prepare's pool) the raw-tiktoken baseline of bench_tokenize: encode and
    only count."""
    return sum(map(len, prepare._worker_enc.encode_ordinary_batch(docs, num_threads=1)))


def bench_tokenize(paths, enc, num_proc, repeats=3, batch_chars=1 << 18):
    """Tokens/s of the whole prepare.write_shards pipeline on local files (reading, tokenizing,
    writing shards) against raw tiktoken on the same documents with the same number of processes
    (num_proc processes calling enc.encode_ordinary_batch and only counting), and tiktoken's own
    threaded call with num_proc threads. The three alternate `repeats` times and each keeps its
    best, since a shared machine is noisy. -> dict."""
    docs = list(prepare.iter_text_docs(paths))
    best = {"pipeline_tok_s": 0.0, "raw_processes_tok_s": 0.0, "raw_threads_tok_s": 0.0}
    for _ in range(repeats):
        t0 = time.time()
        with prepare._pool(enc, num_proc) as pool:
            batches = (b for _, b in prepare._batches(docs, False, batch_chars))
            n_tokens = sum(pool.imap(_count_tokens, batches))
        best["raw_processes_tok_s"] = max(best["raw_processes_tok_s"],
                                          n_tokens / (time.time() - t0))
        t0 = time.time()
        n_tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=num_proc)))
        best["raw_threads_tok_s"] = max(best["raw_threads_tok_s"], n_tokens / (time.time() - t0))
        with tempfile.TemporaryDirectory() as out_dir:
            t0 = time.time()
            meta = prepare.write_shards(prepare.iter_text_docs(paths), enc, out_dir, val_tokens=0,
                                        num_proc=num_proc, batch_chars=batch_chars,
                                        progress=False)
            # the same count as raw: without the <|endoftext|>s
            n_encoded = meta["train_tokens"] - meta["train_docs"]
            best["pipeline_tok_s"] = max(best["pipeline_tok_s"], n_encoded / (time.time() - t0))
    return {"num_proc": num_proc, "tokens": n_tokens, **best,
            "ratio_vs_raw_processes": best["pipeline_tok_s"] / best["raw_processes_tok_s"]}


def bench_sampler(data_dir, n_way=32, k_shot=4, q_query=4, seq_len=128, n_episodes=200,
                  split="train"):
    """SMLMT episode sampling speed in this process -> dict with windows/s (support + query
    windows)."""
    sampler = data.SMLMTSampler(data_dir, n_way, k_shot, q_query, seq_len, split=split)
    rng = np.random.default_rng(0)
    sampler.sample(rng)  # warm the page cache and numpy
    t0 = time.time()
    for _ in range(n_episodes):
        sampler.sample(rng)
    seconds = time.time() - t0
    windows = n_episodes * n_way * (k_shot + q_query)
    return {"windows_s": windows / seconds, "episodes_s": n_episodes / seconds,
            "windows_per_episode": windows // n_episodes}


def data_rows(c, text, num_proc):
    """Tokenization (bench_tokenize) and episode sampling (bench_sampler) -> rows."""
    rows = []
    missing = [p for p in text if not os.path.isfile(p)]
    text = [p for p in text if os.path.isfile(p)]
    try:
        if not text:
            raise RuntimeError(f"no --text file found ({', '.join(missing) or 'none given'})")
        tok = bench_tokenize(text, common.get_encoding("gpt2"), num_proc, repeats=3)
        rows.append(dict(name=f"raw tiktoken, {num_proc} processes",
                         rate=tok["raw_processes_tok_s"]))
        rows.append(dict(name="tokenize + write shards (prepare.py)", rate=tok["pipeline_tok_s"],
                         ratio=tok["ratio_vs_raw_processes"], ratio_of="of raw",
                         target=">= 0.8 of raw", met=tok["ratio_vs_raw_processes"] >= 0.8, note=(
                             f"{tok['tokens']:,} tokens of "
                             f"{', '.join(map(os.path.basename, text))}; best of 3, as "
                             f"bench_tokenize measures")))
    except RuntimeError as e:
        rows.append(dict(name="tokenization: skipped", note=str(e)))
    if not os.path.isdir(c.data_dir):
        return rows + [dict(name="SMLMT episode sampling: skipped", note=f"no {c.data_dir}")]
    s = bench_sampler(c.data_dir, c.n_way, c.k_shot, c.q_query, c.meta_seq_len)
    return rows + [dict(name=f"SMLMT episode sampling ({s['windows_per_episode']} windows)",
                        rate=s["windows_s"], unit="win/s", target=">= 20000 win/s",
                        met=s["windows_s"] >= 20000)]


def zero(modules):
    """A function that resets the gradients of modules (before each timed run)."""
    return lambda: [m.zero_grad(set_to_none=True) for m in modules]


def timed_steps(cfg, c, model, head, x, y, ep, autocast, dev, reps, warmup, sync, compile):
    """The AR micro-step, the head- and all-mode episodes and the peer's step (when transformers
    is installed), eager and (compile=True) compiled, each timed as the median of reps ->
    (steps: name -> (step, modules whose grads are reset before each run, tokens, FLOPs),
    ms: name -> median ms, first: name -> seconds of the first, compiling call, peer_info)."""
    def train_step(loss_fn):  # forward under autocast, then backward, as meta_train does
        def step():
            with autocast:
                loss = loss_fn()
            loss.backward()
        return step

    def ar_step(m):
        return train_step(lambda: m(x, y)[1])

    def peer_step(m):  # HF shifts the labels inside: logits at all B x T positions, as ours
        return train_step(lambda: m(input_ids=x, labels=x).loss)

    def episode_step(cm):  # with loss_scale, smlmt_episode runs its own backward, in autocast
        def step():
            with autocast:
                meta_train.smlmt_episode(model, head, ep, cm, loss_scale=1.0)
        return step

    ar_tokens = c.batch_size * c.seq_len
    ar_flops = ar_tokens * model.flops_per_token(c.seq_len)
    steps = {"ar": (ar_step(model), [model], ar_tokens, ar_flops)}
    for mode in ("head", "all"):
        cm = SimpleNamespace(**{**cfg, "meta_task": "smlmt", "inner_params": mode})
        tokens_and_flops = meta_train.episode_tokens_and_flops(model, cm)
        steps[mode] = (episode_step(cm), [model, head], *tokens_and_flops)
    peer, peer_info = hf_peer(model)
    if peer is not None:
        # the same function, or the comparison means nothing; in full fp32 (TF32, which
        # init_device turns on for CUDA, differs from fp32 by ~5e-3 at the 570m shape)
        with torch.no_grad(), common.tf32_off():
            diff = (model(x)[0] - peer(input_ids=x).logits.float()).abs().max().item()
        assert diff < 1e-3, f"the peer's logits differ from ours by {diff}"
        peer_info += f", sdpa attention, our weights (largest logit difference {diff:.1e})"
        steps["peer"] = (peer_step(peer), [peer], ar_tokens, ar_flops)

    ms, first = median_ms({k: (zero(s[1]), s[0]) for k, s in steps.items()}, reps, warmup, sync), {}
    if compile:
        compiled = {}
        for name, make, m in [("ar_c", ar_step, model), ("peer_c", peer_step, peer)]:
            if m is not None:
                compiled[name] = (make(torch.compile(m, dynamic=False)), [m], ar_tokens, ar_flops)
                t0 = time.perf_counter()
                compiled[name][0]()  # the compilation, timed alone so that warm-up does not hide it
                first[name] = time.perf_counter() - t0
        ms.update(median_ms({k: (zero(s[1]), s[0]) for k, s in compiled.items()}, reps, warmup,
                            sync))
        steps.update(compiled)
    return steps, ms, first, peer_info


def finish_rows(rows, notes, peak):
    """Every row gets every key and its MFU; a row's note becomes a numbered footnote."""
    for r in rows:
        if r.get("note"):
            notes.append(r["note"])
            r["name"] += f" [{len(notes)}]"
        r.pop("note", None)
        for k, v in dict(ms=None, rate=None, unit="tok/s", flop_s=None, mem_bytes=None,
                         ratio=None, ratio_of="", target="", met=None).items():
            r.setdefault(k, v)
        r["mfu"] = estimate_mfu(r["flop_s"], peak) if r["flop_s"] else None


def machine_facts(c, env, dev, model, bf16, load, peak, listed, peer_info, reps, warmup, notes):
    """What a reader needs to trust the table: device, torch, threads, load, dtype, model, MFU
    basis, peer, data, how memory and time were taken, and the footnotes."""
    cuda = dev.type == "cuda"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":")[1].strip() for l in f if "model name" in l), cpu)
    return {"device": torch.cuda.get_device_name(dev) if cuda else f"CPU: {cpu}",
            "malloc": "glibc keeps freed memory, as meta_train.py" if env.kept_memory
            else "default",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load": f"{load:.2f} (1-minute load average at the start)" if load is not None else "",
            "dtype": "bf16 autocast" if bf16 else "fp32", "model": model_summary(model),
            "peak_flop_s": peak, "mfu_basis": f"datasheet bf16 peak, {listed / 1e12:.0f} TFLOP/s"
            if listed else f"the matmul row, measured in this run", "peer": peer_info,
            "data": c.data_dir if os.path.isdir(c.data_dir) else "random tokens",
            "memory": "torch.cuda.max_memory_allocated above the allocation before the step"
            if cuda else "peak RSS (VmHWM) growth over the RSS before the step, after malloc_trim",
            "timing": f"median of {reps} after {warmup} warm-up, interleaved; "
                      "forward + backward, no optimizer step", "notes": notes}


def run(cfg, reps=10, warmup=2, compile=True, peak_n=None, text=(), num_proc=1):
    """Measure everything -> (facts, rows). cfg: a meta_train config dict."""
    c = SimpleNamespace(**cfg)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a busy machine times slow
    # data first: the tokenizer benchmark forks worker processes, best before torch's threads exist
    later, notes = data_rows(c, text, num_proc), []
    env = common.init_device(c.device)  # on CPU it keeps freed memory, as meta_train.py does
    dev = torch.device(env.dev)
    cuda = dev.type == "cuda"
    autocast, bf16 = common.autocast(c.dtype, dev.type)
    sync = torch.cuda.synchronize if cuda else None

    # the peak: a known GPU's datasheet, else measured here in the dtype the model computes in
    mm_dtype = torch.bfloat16 if bf16 else torch.float32
    peak_n = peak_n or (8192 if cuda else 2048)
    measured = matmul_peak(dev, mm_dtype, peak_n, reps, warmup)
    listed = peak_flops(dev) if bf16 else None
    peak = listed or measured
    rows = [dict(name=f"matmul {peak_n}^3 {str(mm_dtype)[6:]} (fastest of {reps})",
                 flop_s=measured)]

    torch.manual_seed(c.seed)
    model = Llama(common.model_args(c)).to(dev).train()
    head = meta_train.MetaHead(c.dim, c.vocab_size, c.meta_hidden).to(dev)
    if os.path.isdir(c.data_dir):
        rng = np.random.default_rng(c.seed)
        x, y = data.ShardReader(c.data_dir, "train", c.batch_size, c.seq_len).next_batch(rng)
        sampler = data.SMLMTSampler(c.data_dir, c.n_way, c.k_shot, c.q_query, c.meta_seq_len)
        ep = sampler.sample(rng)
    else:
        notes.append(f"no {c.data_dir}: random tokens stand in for the AR batch and the episode")
        xy = torch.randint(0, c.vocab_size, (c.batch_size, c.seq_len + 1))
        x, y, ep = xy[:, :-1].contiguous(), xy[:, 1:].contiguous(), random_episode(c)
    x, y, ep = x.to(dev), y.to(dev), meta_train.to_device(ep, dev)

    steps, ms, first, peer_info = timed_steps(cfg, c, model, head, x, y, ep, autocast, dev, reps,
                                              warmup, sync, compile)
    ar_tokens, ar_flops = steps["ar"][2:]

    mem = {k: peak_memory(s[0], dev, zero(s[1])) for k, s in steps.items()}

    def step_row(key, name, **kw):
        tokens, flops = steps[key][2:]
        rows.append(dict(name=name, ms=ms[key], rate=tokens / ms[key] * 1000,
                         flop_s=flops / ms[key] * 1000, mem_bytes=mem[key], **kw))

    cpu_fp32 = not cuda and not bf16  # the MFU target is against the fp32 peak of a CPU
    mfu = estimate_mfu(ar_flops / ms["ar"] * 1000, peak)
    step_row("ar", f"AR micro-step {c.batch_size}x{c.seq_len} (ours, eager)",
             target=">= 30% MFU" if cpu_fp32 else "", met=mfu >= 0.3 if cpu_fp32 else None)
    for mode in ("head", "all"):
        per_token = ms[mode] / steps[mode][2] / (ms["ar"] / ar_tokens)
        step_row(mode, f"episode {c.n_way}-way {c.k_shot}+{c.q_query} x{c.meta_seq_len}, {mode}, "
                       f"{c.inner_steps} inner", ratio=per_token, ratio_of="x AR per token",
                 **(dict(target="<= 1.5x AR", met=per_token <= 1.5) if mode == "head" else {}))
    out_share = 6 * c.vocab_size * c.dim / model.flops_per_token(c.seq_len)
    notes.append(f"an episode reads {steps['head'][2]:,} tokens (support + query windows); it "
                 f"never projects to the vocabulary, which is {out_share:.0%} of an AR token's "
                 f"FLOPs")
    if "peer" in ms:
        step_row("peer", "peer: HF LlamaForCausalLM, eager", ratio=ms["peer"] / ms["ar"],
                 ratio_of="peer/ours time", target="ours >= peer", met=ms["peer"] >= ms["ar"])
    else:
        rows.append(dict(name="peer: skipped", note=peer_info))
    if "ar_c" in ms:
        step_row("ar_c", "AR micro-step (ours, compiled)", ratio=ms["ar"] / ms["ar_c"],
                 ratio_of="eager/compiled")
    if "peer_c" in ms:
        step_row("peer_c", "peer: HF LlamaForCausalLM, compiled", ratio=ms["peer_c"] / ms["ar_c"],
                 ratio_of="peer/ours time", target="ours > peer", met=ms["peer_c"] > ms["ar_c"])
    if compile:
        notes.append("first call, compiling: " + ", ".join(
            f"{'ours' if k == 'ar_c' else 'peer'} {s:.0f} s" for k, s in first.items()) +
            " (less with a warm inductor cache)")
    rows += later
    finish_rows(rows, notes, peak)

    facts = machine_facts(c, env, dev, model, bf16, load, peak, listed, peer_info, reps, warmup,
                          notes)
    return facts, rows


def format_table(facts, rows, tera=False):
    scale, funit = (1e12, "TFLOP/s") if tera else (1e9, "GFLOP/s")

    def num(v, f):
        return "" if v is None else f.format(v)

    cols = ["measurement", "ms", "rate", funit, "MFU", "peak MiB", "ratio", "target", "met"]
    table = [[r["name"], num(r["ms"], "{:.1f}"),
              "" if r["rate"] is None else f"{r['rate']:,.0f} {r['unit']}",
              num(r["flop_s"] and r["flop_s"] / scale, "{:.2f}"), num(r["mfu"], "{:.1%}"),
              num(r["mem_bytes"] and r["mem_bytes"] / 2 ** 20, "{:.0f}"),
              "" if r["ratio"] is None else f"{r['ratio']:.2f} {r['ratio_of']}", r["target"],
              {True: "yes", False: "NO", None: ""}[r["met"]]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *table)]
    keys = ("device", "torch", "threads", "load", "dtype", "malloc", "config", "model", "mfu_basis",
            "peer", "data", "memory", "timing")
    lines = [f"{k:>9}: {facts[k]}" for k in keys if k in facts]
    lines += ["", " | ".join(c.ljust(w) for c, w in zip(cols, widths)),
              "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines + [f"[{i}] {n}" for i, n in enumerate(facts["notes"], 1)])


def main(argv=None):
    parser = common.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other --key=value is a meta_train.py config key overriding the config file.")
    parser.add_argument("--config", help="config file (default configs/cpu.py, on CUDA 181m.py)")
    parser.add_argument("--reps", type=int, default=10, help="timed runs of each step (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--compile", dest="compile", action="store_true", default=True,
                        help="also time ours and the peer under torch.compile (the default)")
    parser.add_argument("--no_compile", dest="compile", action="store_false")
    parser.add_argument("--peak_n", type=int, help="matmul size of the peak (2048 CPU, 8192 CUDA)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=common.CHOICES["dtype"], default="auto",
                        help="auto: bfloat16 autocast on cuda, float32 on cpu")
    parser.add_argument("--text", nargs="*", default=[],
                        help="text files for the tokenization benchmark (without, its rows say "
                             "skipped); the GPT-2 vocabulary must be cached or downloadable")
    parser.add_argument("--num_proc", type=int, default=common.n_cpus(),
                        help="tokenizer processes (default: the CPUs this process may use)")
    parser.add_argument("--json", help="also write the facts and rows to this JSON file")
    args, overrides = parser.parse_known_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    if args.json:  # before the minutes of measuring, not after
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    config = args.config or os.path.join(ROOT, "configs", "181m.py" if torch.cuda.is_available()
                                         else "cpu.py")
    try:
        cfg = common.configure(meta_train.DEFAULTS, [config] + overrides + [
            f"--device={args.device}", f"--dtype={args.dtype}"])
        facts, rows = run(cfg, args.reps, args.warmup, args.compile, args.peak_n, args.text,
                          args.num_proc)
    except common.ConfigError as e:
        sys.exit(f"config error: {e}")
    except (ValueError, OSError) as e:  # a data dir that is there but unreadable or stale
        sys.exit(f"bench.py: error: {e}")
    facts["config"] = " ".join([os.path.relpath(config)] + overrides)
    facts["command"] = " ".join(["python", "bench.py"] + (sys.argv[1:] if argv is None else argv))
    print(format_table(facts, rows, tera=torch.cuda.is_available()))
    if args.json:
        common.write_json(args.json, {"facts": facts, "rows": rows})


if __name__ == "__main__":
    main()
