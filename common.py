"""
Run bookkeeping that every nanoMAML script shares and no reader of the method needs: the
configurator, the device / rank / autocast choice, files written atomically, the tokenizer,
checkpoints with clear errors, and the run directory (its lock, its log, resume or refuse).
"""
import argparse
import ast
import builtins
import ctypes
import datetime
import difflib
import fcntl
import glob
import json
import os
import re
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from types import ModuleType, SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, 'prog: error: message', without the usage block (a
    dozen lines for the scripts with many flags, which buried the error); --help shows it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class ConfigError(ValueError):
    """A bad key, value, file or directory, found before any work; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


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
            items, source = read_config_file(arg), arg
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


def read_config_file(path):
    """The assignments of a config file -> [(key, value)]; an error in it names file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found")
    namespace = {}
    try:
        with open(path) as f:
            # builtins.compile: meta_train's `compile` key shadows the builtin there
            exec(builtins.compile(f.read(), path, "exec"), namespace)
    except Exception as e:
        line = e.lineno if isinstance(e, SyntaxError) else next(
            (fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__))
             if fr.filename == path), "?")
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return [(k, v) for k, v in namespace.items()  # skip imports and helpers
            if not k.startswith("_") and not isinstance(v, ModuleType) and not callable(v)]


SCHEDULES = ("linear", "cosine", "constant")
CHOICES = {"meta_task": ("smlmt", "lm", "positions"), "positions_unknown": ("class0", "drop"),
           "inner_params": ("head", "all"),
           "lr_schedule": SCHEDULES, "inner_lr_schedule": SCHEDULES,
           "inner_optimizer": ("sgd", "adamw"), "decay_params": ("all", "matrices"),
           "meta_head_init": ("xavier", "default"),
           "init": ("pytorch", "gpt2"), "head_grad": ("fomaml", "paper"),
           "dtype": ("auto", "float32", "bfloat16"),
           "meta_read": ("mask", "before"), "meta_features": ("raw", "standardize", "center"),
           "meta_head_rows": ("words", "proto")}


def auto_episodes_per_step(c):
    """episodes_per_step, where 0 ("auto") becomes as many episodes as read an AR step's
    total_batch_size x seq_len tokens (rounded, at least 1)."""
    tokens = {"smlmt": c.n_way * (c.k_shot + c.q_query) * c.meta_seq_len,
              "positions": c.positions_batch * c.seq_len,
              "lm": (c.k_shot + 1) * c.meta_seq_len}[c.meta_task]
    if c.episodes_per_step or tokens <= 0:  # set, or a bad size that check_config names
        return c.episodes_per_step
    return max(1, round(c.total_batch_size * c.seq_len / tokens))


def check_config(c, world_size, need_data=True):
    """meta_train.py's config errors, found before any data is read or model built: each names
    its key, and what torch would reject later (a negative lr, betas outside [0, 1)) is here.
    need_data=False: the layout alone (meta_train.py --plan), no data directory needed.
    episodes_per_step 0 is replaced by the number it stands for (auto_episodes_per_step)."""
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, "
                              f"got {getattr(c, key)!r}")
    c.episodes_per_step = auto_episodes_per_step(c)
    if not 0.0 <= c.meta_ratio <= 1.0:
        raise ConfigError(f"meta_ratio must be in [0, 1], got {c.meta_ratio}")
    if c.meta_task == "lm" and c.inner_params != "all":
        raise ConfigError("meta_task 'lm' adapts the whole model: set inner_params='all'")
    if c.head_grad == "paper" and (c.inner_params != "head" or c.meta_task == "lm"):
        raise ConfigError("head_grad 'paper' replays the paper code's head-only inner loop: it "
                          "needs inner_params='head' and meta_task 'smlmt' or 'positions'")
    if c.head_grad == "paper" and c.meta_head_rows == "proto":
        raise ConfigError("head_grad 'paper' replays the words' output rows; meta_head_rows "
                          "'proto' needs head_grad='fomaml'")
    if c.meta_read == "before" and c.meta_task != "smlmt":
        raise ConfigError(f"meta_read 'before' reads SMLMT windows; meta_task {c.meta_task!r} "
                          f"needs meta_read='mask'")
    if c.meta_read == "before" and c.meta_seq_len < 2:
        raise ConfigError("meta_read 'before' needs meta_seq_len of at least 2")
    if c.meta_features != "raw" and c.inner_params != "head":
        raise ConfigError(f"meta_features {c.meta_features!r} takes the support statistics once, "
                          "at the original weights: set inner_params='head'")
    if not 0.0 <= c.ar_mask_rate < 1.0:
        raise ConfigError(f"ar_mask_rate must be in [0, 1), got {c.ar_mask_rate}")
    if c.n_way < 2:
        raise ConfigError(f"n_way must be at least 2, got {c.n_way}")
    for key in ("batch_size", "total_batch_size", "seq_len", "meta_seq_len", "eval_interval",
                "eval_sequences", "save_interval", "log_interval", "positions_batch", "k_shot",
                "q_query", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                "meta_hidden"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(c, key)}")
    for key in ("max_steps", "warmup_steps", "lr_decay_steps", "eval_episodes",
                "episodes_per_step", "inner_warmup_steps", "inner_steps"):
        if getattr(c, key) < 0:
            raise ConfigError(f"{key} must be at least 0, got {getattr(c, key)}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "inner_lr",
                "inner_eps", "inner_weight_decay"):
        if not getattr(c, key) >= 0.0:  # also refuses nan
            raise ConfigError(f"{key} must be at least 0, got {getattr(c, key)}")
    for key in ("beta1", "beta2", "inner_beta1", "inner_beta2"):
        if not 0.0 <= getattr(c, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(c, key)}")
    if 0 < c.lr_decay_steps <= c.warmup_steps:
        raise ConfigError(f"lr_decay_steps {c.lr_decay_steps} must come after warmup_steps "
                          f"{c.warmup_steps} (or be 0: max_steps)")
    if c.wandb_log:
        try:
            import wandb  # noqa: F401 (found now, not after minutes of setup)
        except ImportError:
            raise ConfigError("wandb_log=True but wandb is not installed (pip install wandb)")
    layout(c, world_size)
    try:
        model_args(c)  # ModelArgs checks the head counts itself
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if need_data and not os.path.isdir(c.data_dir):
        raise ConfigError(f"data_dir '{c.data_dir}' not found: write shards with prepare.py first")


def layout(c, world_size):
    """How one optimizer step splits over world_size ranks -> SimpleNamespace(per_rank, micro,
    accum, episodes): every rank takes total_batch_size / world_size sequences of an AR step, as
    `accum` micro-batches of `micro`, the largest divisor of per_rank that is at most batch_size
    (a per-device ceiling); episode slot s of a meta step goes to rank s % world_size, so ranks
    may hold one episode more than others, or none (they still join every all-reduce). Only a
    total_batch_size that world_size does not divide cannot run."""
    if c.total_batch_size % world_size:
        raise ConfigError(f"total_batch_size {c.total_batch_size} does not split over "
                          f"{world_size} ranks: set total_batch_size="
                          f"{' or '.join(map(str, full_batch_sizes(c, world_size)))} (full "
                          f"micro-batches of batch_size {c.batch_size} on {world_size} ranks) or "
                          f"run on a number of ranks that divides it")
    per_rank = c.total_batch_size // world_size
    micro = max(d for d in range(1, min(c.batch_size, per_rank) + 1) if per_rank % d == 0)
    episodes = [len(range(r, c.episodes_per_step, world_size)) for r in range(world_size)]
    return SimpleNamespace(per_rank=per_rank, micro=micro, accum=per_rank // micro,
                           episodes=episodes if c.meta_ratio > 0 else [0] * world_size)


def full_batch_sizes(c, world_size):
    """The multiples of world_size x batch_size nearest total_batch_size (one or two): layouts
    whose micro-batch is the whole batch_size. A mere multiple of world_size can leave a per-rank
    share with no large divisor (86 = 2 x 43) and so tiny micro-batches."""
    unit = world_size * c.batch_size
    below = c.total_batch_size // unit * unit
    return [n for n in (below, below + unit) if n > 0 and n != c.total_batch_size]


def model_args(c):
    """The model a meta_train config describes; its context covers AR batches and episodes."""
    from model import ModelArgs
    return ModelArgs(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                     vocab_size=c.vocab_size, max_seq_len=max(c.seq_len, c.meta_seq_len),
                     init=c.init)


TORCH_PIN = "2.13.0"  # requirements.txt's pin (a test keeps the two equal)


def check_torch():
    """Refuse a torch older than the pinned one: the bf16 episode relies on how its autocast
    caches weight casts, and older releases behave differently there."""
    version = torch.__version__
    parse = lambda v: tuple(int(n) for n in re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v).groups("0"))
    if parse(version) < parse(TORCH_PIN):
        raise ConfigError(f"torch {version} is older than {TORCH_PIN}, which requirements.txt "
                          f"pins: pip install torch=={TORCH_PIN} (the CUDA build on a GPU machine)")


def init_device(device="auto"):
    """The device this process computes on, and its place in a torchrun job ->
    SimpleNamespace(dev, type, ddp, rank, local_rank, world_size, master, kept_memory). "auto":
    cuda when available (the local rank's GPU under torchrun), else cpu, where glibc is asked to
    keep freed memory (keep_freed_memory). A torch older than the pinned one is refused."""
    check_torch()
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(dev).type
    except RuntimeError:  # torch lists twenty device types this code does not run on
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: only cpu and cuda are supported")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch build or machine has no CUDA device")
    if dev == "cuda":
        dev = f"cuda:{local_rank}"
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return SimpleNamespace(dev=dev, type=kind, ddp=ddp, rank=rank, local_rank=local_rank,
                           world_size=world_size, master=rank == 0,
                           kept_memory=kind == "cpu" and keep_freed_memory())


@contextmanager
def tf32_off():
    """Full fp32 matmuls inside: init_device turns TF32 on for CUDA training, which rounds matmul
    inputs to 10 mantissa bits, too coarse for comparing two implementations at 1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def init_process_group(env):
    if env.ddp:
        # while rank 0 writes a checkpoint the others wait in the next all-reduce: give a large
        # checkpoint on a slow disk far longer than NCCL's default 10 minutes
        dist.init_process_group(backend="nccl" if env.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))


def autocast(dtype, device_type):
    """-> (context, uses bf16). dtype "auto": bf16 autocast on CUDA, fp32 on the CPU."""
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device_type == "cuda")
    return (torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()), bf16


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of handing it back to the OS. By default each
    block over 32 MiB (one 8 x 256 x 50304 fp32 logits tensor is 393 MiB) is mmap'd fresh and
    unmapped when freed, so every micro-step page-faults its largest tensors in again, on the CPU
    about as costly as the step's arithmetic. The price is a resident set that stays at its peak.
    -> whether glibc accepted it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h; a threshold of -1 never trims
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def n_cpus():
    """The CPUs this process may use (sched_getaffinity respects taskset and containers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def atomic_write(path, write):
    """Write `path` through write(f) under a temporary name in the same directory, then rename it
    into place, so neither a crash nor an error leaves a half-written file or damages the file it
    replaces. The temporary is '.<name>.<random>', which RunDir removes when a crash left it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_dir(path, what):
    """Make the output folder `path` (what: the flag or key naming it), before any work: a file of
    that name, no permission or a read-only disk is a ConfigError naming it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be created ({e.strerror}); choose another "
                          f"{what}") from None


def check_out_file(path, what):
    """Make the folder of the output file `path`, before any work; a folder at `path` itself is
    a ConfigError naming it (what: the flag naming it)."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a folder; give a file name")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {path}: its folder cannot be created ({e.strerror}); choose "
                          f"another {what}") from None


def write_json(path, obj):
    """Every JSON file nanoMAML writes (meta.json, results, bench tables) goes through here."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def get_encoding(name="gpt2"):
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        known = tiktoken.list_encoding_names()
        if name not in known:  # not a download problem: no cache or network would help
            raise RuntimeError(f"unknown tiktoken encoding {name!r}; known: "
                               f"{', '.join(known)}") from None
        # tiktoken downloads its vocabulary on first use; offline that fails
        raise RuntimeError(f"cannot load tiktoken encoding {name!r} ({type(e).__name__}); "
                           f"offline, point TIKTOKEN_CACHE_DIR at a cache holding it") from e


def load_checkpoint(path, device="cpu", need=("model_args", "model", "config", "step")):
    """The dict meta_train.py saved at path, with the keys in `need`. Every way a file can fail to
    be one (missing, truncated, zero bytes, text, another program's pickle) raises
    CheckpointError naming the file, never a bare unpickling traceback."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: a checkpoint holds the RNG states (numpy arrays, tuples) beside the
        # tensors; only load checkpoints you wrote or trust
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except OSError as e:  # permissions, I/O: the file itself may be fine
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{e.strerror or e} (the file may be intact: fix the cause and "
                              f"retry)") from None
    except Exception as e:
        first = str(e).split(". ")[0]  # torch's zip errors run on for several sentences
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first} "
                              f"(truncated, damaged or not a checkpoint)") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a meta_train.py checkpoint: no key "
                              f"{', '.join(map(repr, missing))}")
    return ckpt


def checkpoint_path(path):
    """The checkpoint a command-line argument names: a file, or a run directory's ckpt.pt."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def read_log(path):
    """The rows of a log.jsonl. A crash while a line was written leaves it torn: a torn last line
    is dropped with a warning; a line that is not JSON anywhere else is an error naming it."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: the write was cut short
                print(f"warning: {path}: dropped its torn last line {line[:60]!r}...")
                continue
            raise ConfigError(f"{path} line {n} is not JSON ({line[:60]!r}); fix or remove "
                              f"that line") from None
    return rows


def checkpoint_and_encoding(path, tokenizer=None, need=("model_args", "model", "step")):
    """load_checkpoint(path) and its tiktoken encoding (tokenizer: a name overriding the
    checkpoint's); either failure raises CheckpointError naming the file."""
    ckpt = load_checkpoint(path, need=tuple(need) + (() if tokenizer else ("tokenizer",)))
    try:
        return ckpt, get_encoding(tokenizer or ckpt["tokenizer"])
    except RuntimeError as e:  # unknown name, or no network and no cached BPE file
        raise CheckpointError(f"{path}: {e}") from None


def save_checkpoint(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


def numbered_checkpoints(out_dir):
    """[(step, path)] of the ckpt_NNNNNN.pt files in out_dir, in step order."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt")):
        m = re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def aside_name(path, why):
    """A free name beside `path` to keep an old file under: '<path>.<why>-<N>'."""
    n = 1
    while os.path.exists(f"{path}.{why}-{n}"):
        n += 1
    return f"{path}.{why}-{n}"


LOG_KEYS = ["step", "lr", "ar_loss", "meta_loss", "support_acc", "query_acc", "val_loss",
            "val_query_acc", "val_query_acc_se", "val_query_acc0", "val_query_acc0_se",
            "val_centroid_acc", "val_centroid_acc_se", "val_support_acc", "val_support_acc_se",
            "grad_norm", "ar_tokens", "meta_tokens", "flops", "time", "wall", "tok_per_s",
            "mfu", "ar_ms", "meta_ms"]


def lock_dir(path, what, holder, other):
    """Take the OS lock of the directory `path` (exists) -> the open lock file; closing it, or the
    process ending however it ends (kill -9 too), releases the lock. Held by another process: a
    ConfigError naming `what`, the other `holder` and its pid, and the `other` way out."""
    lock = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise ConfigError(f"{what} is in use by another {holder} (pid {pid}); wait for it to "
                          f"end, or {other}") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class RunDir:
    """The out_dir of one training run, held while the run lives. Entering it makes the directory,
    takes an OS lock (a second run into the same directory is refused while the first lives; the
    OS drops the lock when the process ends, however it ends) and removes the temporaries a crash
    left mid-write. Only the master rank writes, so only it locks."""

    def __init__(self, out_dir, master=True, resume=False):
        self.out_dir, self.master, self.resume, self.lock = out_dir, master, resume, None
        self.ckpt = os.path.join(out_dir, "ckpt.pt")
        self.log = os.path.join(out_dir, "log.jsonl")

    def __enter__(self):
        if self.resume and not (os.path.isdir(self.out_dir) and self.checkpoints()):
            raise ConfigError(f"resume=True but {self.out_dir} holds no checkpoint (ckpt.pt or "
                              f"ckpt_NNNNNN.pt)")
        make_dir(self.out_dir, "out_dir")
        if self.master:
            self.lock = lock_dir(self.out_dir, f"out_dir '{self.out_dir}'", "run",
                                 "choose another out_dir")
            for name in os.listdir(self.out_dir):  # atomic_write's temporaries, left by a crash
                if re.fullmatch(r"\.(ckpt(_\d+)?\.pt|log\.jsonl)\..+", name):
                    os.remove(os.path.join(self.out_dir, name))
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.close()  # closing the file releases the lock

    def checkpoints(self):
        return ([self.ckpt] if os.path.exists(self.ckpt) else []) + [
            p for _, p in numbered_checkpoints(self.out_dir)]

    def load_resume_checkpoint(self, device):
        """The checkpoint to resume from -> (dict, path): ckpt.pt, which holds the optimizer
        state; else, with a warning, the newest numbered checkpoint that loads, which does not."""
        candidates = [self.ckpt] + [p for _, p in reversed(numbered_checkpoints(self.out_dir))]
        failed = []
        for path in candidates:
            if not os.path.exists(path):
                continue
            try:
                ckpt = load_checkpoint(path, device, need=("model", "config", "step", "rng",
                                                           "counters"))
            except CheckpointError as e:
                print(f"warning: {e}; trying an older checkpoint")
                failed.append(str(e))
                continue
            if path != self.ckpt:
                if failed and os.path.exists(self.ckpt) and self.master:
                    # the next save would replace it: keep it, it may only have been unreadable
                    # for a moment and it alone holds the optimizer state
                    aside = aside_name(self.ckpt, "unreadable")
                    os.replace(self.ckpt, aside)
                    print(f"warning: kept the unreadable {self.ckpt} as {aside}")
                print(f"warning: resuming from {path}: {self.ckpt} is missing or unreadable, and "
                      f"numbered checkpoints hold no optimizer state, so AdamW's moments restart "
                      f"from zero and this run will not match an uninterrupted one bit for bit")
            return ckpt, path
        raise ConfigError(f"resume=True but no checkpoint in {self.out_dir} can be read: "
                          + "; ".join(failed))

    def refuse_earlier_run(self):
        """A fresh run would overwrite ckpt.pt and mix its numbered checkpoints with the old run's
        in analyze.py: refuse rather than lose or muddle either run."""
        old = [os.path.basename(p) for p in self.checkpoints()]
        if old:
            raise ConfigError(f"out_dir '{self.out_dir}' holds checkpoints of an earlier run "
                              f"({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}): continue "
                              f"it with --resume=True, or choose another out_dir")
        if self.master and os.path.exists(self.log):
            # an earlier run that stopped before its first checkpoint: keep its log, out of the way
            aside = aside_name(self.log, "earlier")
            os.replace(self.log, aside)
            print(f"note: {self.log} of an earlier run that wrote no checkpoint is kept as {aside}")

    def append_log(self, row):
        """One JSON object per line, always with every key of LOG_KEYS (null where unknown)."""
        with open(self.log, "a") as f:
            f.write(json.dumps({k: row.get(k) for k in LOG_KEYS}) + "\n")

    def truncate_log(self, step):
        """Keep the log lines up to `step` (a resumed run writes the later ones again); read_log
        drops a line a crash tore."""
        if os.path.exists(self.log):
            keep = [json.dumps(row) + "\n" for row in read_log(self.log) if row["step"] <= step]
            atomic_write(self.log, lambda f: f.write("".join(keep).encode()))


class RunLog:
    """What a training run reports while it trains: log.jsonl rows (and Weights & Biases, imported
    only when on), the progress bar and its lines, the last checkpoint known good, and the two
    clocks: counters["time"], training only, which the loop sums, and "wall", everything since
    train() started, summed over resumed runs, so that a whole run's throughput, checkpoint stalls
    included, can be read honestly."""

    def __init__(self, run, c, master, counters, start_step, t_start, last_good=None,
                 clock=time.time):
        self.run, self.counters, self.last_good = run, counters, last_good
        # clock: the one t_start was read from
        self.wall0, self.t_start, self.clock = counters.get("wall", 0.0), t_start, clock
        self.wandb = None
        if c.wandb_log and master:
            import wandb
            wandb.init(project=c.wandb_project, config=vars(c),
                       name=c.wandb_run_name or os.path.basename(os.path.abspath(c.out_dir)))
            self.wandb = wandb
        self.bar = tqdm(total=c.max_steps, initial=start_step, disable=not master, unit="step",
                        dynamic_ncols=True)

    def stamp(self):
        """The counters, with the wall clock brought up to now."""
        self.counters["wall"] = self.wall0 + self.clock() - self.t_start
        return self.counters

    def log(self, **row):
        self.run.append_log(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def write(self, line):
        self.bar.write(line)

    def stop(self, what):
        """Stop the run on a fault, saying which checkpoint is left to resume from."""
        self.bar.close()
        where = (f"the last good checkpoint is {self.last_good}, left intact" if self.last_good
                 else "no checkpoint was written yet")
        raise SystemExit(f"{what}; stopping: {where}")
