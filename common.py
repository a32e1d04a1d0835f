"""
Run bookkeeping that every nanoMAML script shares and no reader of the method needs.
"""
import os

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


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
    except Exception as e:
        first = str(e).split(". ")[0]  # torch's zip errors run on for several sentences
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first} "
                              f"(truncated, damaged or not a checkpoint)") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a meta_train.py checkpoint: no key "
                              f"{', '.join(map(repr, missing))}")
    return ckpt
