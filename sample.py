"""
Text a checkpoint writes, as nanoGPT's sample.py: the checkpoint's step and val loss first, then
samples continuing a prompt.

    python sample.py out/cpu-meta
    python sample.py out/cpu-meta/ckpt_000100.pt --prompt "The river" --tokens 80 --top_k 50
"""
import argparse
import os
import sys

import torch

import common
from model import Llama


def val_loss_at(run_dir, step):
    """The val loss the run logged at `step`, or None."""
    path = os.path.join(run_dir, "log.jsonl")
    rows = common.read_log(path) if os.path.isfile(path) else []
    return next((r["val_loss"] for r in rows if r["step"] == step and r["val_loss"] is not None),
                None)


def main(argv=None):
    p = common.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint file, or a run directory (its ckpt.pt)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
    p.add_argument("--tokens", type=int, default=60, help="new tokens per sample")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=50, help="0: sample from the whole vocabulary")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    for flag, ok, need in (("--tokens", args.tokens >= 1, "at least 1"),
                           ("--num_samples", args.num_samples >= 1, "at least 1"),
                           ("--temperature", args.temperature > 0, "above 0"),
                           ("--top_k", args.top_k >= 0, "at least 0")):
        if not ok:  # also refuses a nan temperature
            sys.exit(f"sample.py: error: {flag} must be {need}, got {getattr(args, flag[2:])}")
    path = common.checkpoint_path(args.ckpt)
    try:
        ckpt, enc = common.checkpoint_and_encoding(path)
        env = common.init_device(args.device)
    except (common.CheckpointError, common.ConfigError) as e:
        sys.exit(f"sample.py: error: {e}")
    model = Llama.from_checkpoint(ckpt, env.dev).eval()
    loss = val_loss_at(os.path.dirname(path), ckpt["step"])
    print(f"{path}: step {ckpt['step']}, val loss "
          + (f"{loss:.4f}" if loss is not None else "not logged"))
    ids = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    torch.manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples, device=env.dev)
    y = model.generate(x, args.tokens, temperature=args.temperature, top_k=args.top_k or None)
    for row in y.tolist():
        # ids past the tokenizer's vocabulary ([MASK], padding) have no text
        print("---\n" + enc.decode([t for t in row if t < enc.n_vocab]))


if __name__ == "__main__":
    main()
