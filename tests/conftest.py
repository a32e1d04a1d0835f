import os
import random
import sys

import numpy as np
import pytest
import tiktoken
import torch

# tests use tiny models, for which one thread is fastest and does not fight the extra processes
# that torchrun and the data workers start on a 2-core machine
torch.set_num_threads(1)

# tests import the flat top-level scripts (model.py, data.py, ...) from the repository root, so
# those imports come after the path is set
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common
import data
import prepare

# GPT-2's split pattern (tiktoken's r50k_pat_str)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TINY_WORDS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "apple", "green",
              "the", "and", "of", "to", "is"]
EOT = "<|endoftext|>"
CONTEXT = 16  # the index context of the shared test dataset; windows of up to 16 tokens


def make_tiny_encoding(words=TINY_WORDS):
    """A real tiktoken.Encoding with 256 byte tokens plus one token per ' word' (every prefix of
    ' word' is a token too, so byte-pair merges can reach it). Needs no network and no cache."""
    ranks = {bytes([i]): i for i in range(256)}
    for w in words:
        b = (" " + w).encode()
        for j in range(2, len(b) + 1):
            ranks.setdefault(b[:j], len(ranks))
    return tiktoken.Encoding(name="tiny", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def make_docs(n, seed, min_words=3, max_words=40):
    """Documents of tiny-vocabulary words plus text the tiny encoding can only spell in bytes
    (capitals, digits, punctuation, non-ASCII), one to three lines each."""
    rng = random.Random(seed)
    vocab = TINY_WORDS + ["Zebra,", "42", "café", "x.y", "(tree)"]
    return ["\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(min_words, max_words)))
                      for _ in range(rng.randint(1, 3))) for _ in range(n)]


def write_text(path, docs, sep="\n\n"):
    with open(path, "w", encoding="utf-8") as f:
        f.write(sep.join(docs) + "\n")
    return str(path)


def split_stream(data_dir, split):
    shards = [data.load_shard(p) for p in data.list_shards(data_dir, split)]
    return np.concatenate(shards).astype(np.int64)


@pytest.fixture(scope="session")
def tiny_enc():
    return make_tiny_encoding()


@pytest.fixture(scope="session")
def docs():
    return make_docs(300, seed=0)


@pytest.fixture(scope="session")
def ds(tmp_path_factory, tiny_enc, docs):
    """A data directory: two input files, 2000 val tokens carved off, several train shards, an
    index. Tests that change it work on a copy."""
    d = tmp_path_factory.mktemp("ds")
    paths = [write_text(d / "a.txt", docs[:150]),
             write_text(d / "b.txt", docs[150:], sep="\n\n\n  \n")]
    out = str(d / "out")
    prepare.write_shards(prepare.iter_text_docs(prepare.text_files([str(d / "*.txt")])), tiny_enc,
                         out, val_tokens=2000, shard_tokens=5000, num_proc=1, progress=False)
    prepare.build_index(out, tiny_enc, min_per_million=0, max_per_million=10 ** 6,
                        max_occurrences=300, context=CONTEXT)
    assert sorted(paths) == prepare.text_files([str(d / "*.txt")])
    return out


def write_data_dir(out, enc, splits):
    """A data directory written shard by shard, as prepare.write_shards would lay it out, for tests
    that need exact token positions: splits {split: [token lists]}; no index."""
    os.makedirs(out, exist_ok=True)
    shards = {}
    for split, token_lists in splits.items():
        shards[split] = {}
        for i, tokens in enumerate(token_lists):
            name = f"{split}_{i:06d}.bin"
            prepare.write_shard(os.path.join(out, name), np.array(tokens, dtype=np.int64))
            shards[split][name] = len(tokens)
    total = {s: sum(v.values()) for s, v in shards.items()}
    common.write_json(os.path.join(out, "meta.json"), {
        "tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
        "mask_id": enc.n_vocab, "train_tokens": total.get("train", 0),
        "val_tokens": total.get("val", 0), "shards": {"train": {}, "val": {}, **shards},
        "index": None})
    return str(out)


def boundary_shards(enc):
    """Two train shards of 8 tokens: ' cat' at shard positions 2 and 3, then 0 and 3; ' dog' at 5,
    then 4. 16 train tokens: ' cat' 4 times (250000 per million), ' dog' twice (125000), exactly."""
    cat, dog, of = (enc.encode_single_token(w) for w in (" cat", " dog", " of"))
    eot = enc.eot_token
    return ([[of, of, cat, cat, of, dog, of, eot], [cat, of, of, cat, dog, of, of, eot]],
            (cat, dog, of))


def torchrun(nproc, args, log_dir, timeout=600):
    """`torchrun --standalone --nproc_per_node=nproc meta_train.py args` on gloo over the loopback,
    each rank's output teed to log_dir -> (return code, stdout). On a timeout the whole process
    group is stopped (torchrun's workers start sessions of their own and would otherwise keep
    loading the cores); on failure the error is each rank's stderr log, failing ranks first,
    because torchrun's own output ends in the other ranks' shutdown noise."""
    import glob
    import signal
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "--local-addr=127.0.0.1", f"--log-dir={log_dir}",
           "--tee=3", os.path.join(ROOT, "meta_train.py"), *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        err = f"timed out after {timeout} s\n{err}"
    if p.returncode != 0:
        logs = sorted(glob.glob(os.path.join(str(log_dir), "**", "stderr.log"), recursive=True))
        tails = [(open(f).read()[-2000:], f) for f in logs]
        tails.sort(key=lambda t: "Traceback" not in t[0] and "error" not in t[0].lower())
        err = err[-2000:] + "".join(f"\n--- {f}\n{t}" for t, f in tails)
    return p.returncode, out, err
