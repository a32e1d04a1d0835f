import os
import sys

import pytest
import tiktoken
import torch

# tests use tiny models, for which one thread is fastest and does not fight the extra processes
# that torchrun and the data workers start on a 2-core machine
torch.set_num_threads(1)

# tests import the flat top-level scripts (model.py, data.py, ...) from the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GPT-2's split pattern (tiktoken's r50k_pat_str)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
TINY_WORDS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "apple", "green",
              "the", "and", "of", "to", "is"]


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


@pytest.fixture(scope="session")
def tiny_enc():
    return make_tiny_encoding()
