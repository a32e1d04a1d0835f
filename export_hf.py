"""
A nanoMAML checkpoint as a Hugging Face Llama folder, written directly (transformers is not
needed to write it): config.json, model.safetensors, and the GPT-2 tokenizer files with the
[MASK] token. `transformers.AutoModelForCausalLM.from_pretrained(DIR)` then gives our logits, and
the folder works with lm-evaluation-harness and the hub.

    python export_hf.py out/cpu-meta hf/cpu-meta        # a run directory (its ckpt.pt) or a file

Our RoPE rotates interleaved pairs (2i, 2i+1) of a head, Hugging Face's rotates halves
(i, i + D/2): permuting the rows of wq and wk within each head makes the two compute the same.
"""
import argparse
import json
import os
import struct
import sys

import torch

import common
from model import Llama


# GPT-2's split pattern (tiktoken's r50k), which the ByteLevel pre-tokenizer of tokenizer.json uses
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
                r"""|\s+(?!\S)|\s""")


def hf_config(args, eot_id):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": args.vocab_size, "hidden_size": args.dim,
            "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "head_dim": args.dim // args.n_heads, "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32"}


def hf_state_dict(model):
    """Our weights under Hugging Face LlamaForCausalLM's names, q/k rows in rotate-half order.
    The one mapping: bench.py's peer and the export both use it."""
    hd = model.args.dim // model.args.n_heads

    def rope_rows(w):  # (heads * D, C): within each head, rows 0,2,4,.. then 1,3,5,..
        return w.view(-1, hd // 2, 2, w.size(-1)).transpose(1, 2).reshape(w.shape)

    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight,
          "model.norm.weight": model.norm.weight, "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        p, at, ff = f"model.layers.{i}.", layer.attention, layer.feed_forward
        sd.update({p + "self_attn.q_proj.weight": rope_rows(at.wq.weight),
                   p + "self_attn.k_proj.weight": rope_rows(at.wk.weight),
                   p + "self_attn.v_proj.weight": at.wv.weight,
                   p + "self_attn.o_proj.weight": at.wo.weight,
                   p + "mlp.gate_proj.weight": ff.w1.weight, p + "mlp.up_proj.weight": ff.w3.weight,
                   p + "mlp.down_proj.weight": ff.w2.weight,
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}


def write_safetensors(path, tensors):
    """The safetensors format: a little-endian u64 header length, a JSON header of names, dtypes,
    shapes and byte offsets (padded to 8 bytes), then the raw little-endian data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.numpy().tobytes())
    common.atomic_write(path, write)


def bytes_to_unicode():
    """GPT-2's reversible map of the 256 bytes to printable characters (vocab.json's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def bpe_merges(ranks):
    """The merge list a BPE tokenizer needs, recovered from tiktoken's token ranks: each token of
    two or more bytes is the merge of the two parts that BPE, using only lower-ranked merges, leaves
    of its bytes."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(tuple(parts))
    return merges


def write_tokenizer(out, enc, mask_id, max_len):
    """tokenizer.json (fast), vocab.json + merges.txt (slow) and the configs of a GPT-2 style byte
    level BPE with enc's vocabulary, its special tokens and [MASK] at mask_id."""
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)
    ranks = enc._mergeable_ranks  # tiktoken keeps them private; they are the BPE vocabulary
    vocab = {text(b): i for b, i in ranks.items()}
    merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks)]
    specials = {**enc._special_tokens, "[MASK]": mask_id}
    eot = "<|endoftext|>" if "<|endoftext|>" in specials else next(iter(enc._special_tokens))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for s, i in sorted(specials.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges}}
    common.write_json(os.path.join(out, "tokenizer.json"), tokenizer)
    common.write_json(os.path.join(out, "vocab.json"), vocab)
    common.atomic_write(os.path.join(out, "merges.txt"), lambda f: f.write(
        ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    common.write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2TokenizerFast", "model_max_length": max_len,
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "mask_token": "[MASK]",
        "add_prefix_space": False, "clean_up_tokenization_spaces": False})
    common.write_json(os.path.join(out, "special_tokens_map.json"), {
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "mask_token": "[MASK]"})


def export(ckpt, enc, out):
    """Write the Hugging Face folder of a loaded checkpoint -> out."""
    model = Llama.from_checkpoint(ckpt)
    if enc._pat_str != GPT2_PATTERN:
        raise ValueError(f"tokenizer {enc.name}: the exported tokenizer files describe GPT-2's "
                         f"byte-level BPE, whose split pattern this one does not use")
    mask_id = enc.n_vocab  # prepare.py puts [MASK] right after the tokenizer's vocabulary
    common.make_dir(out, "output folder")
    common.write_json(os.path.join(out, "config.json"), hf_config(model.args, enc.eot_token))
    common.write_json(os.path.join(out, "generation_config.json"), {
        "bos_token_id": enc.eot_token, "eos_token_id": enc.eot_token})
    write_safetensors(os.path.join(out, "model.safetensors"), hf_state_dict(model))
    write_tokenizer(out, enc, mask_id, model.args.max_seq_len)
    return out


def main(argv=None):
    p = common.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint file, or a run directory (its ckpt.pt)")
    p.add_argument("out", help="folder to write")
    args = p.parse_args(argv)
    path = common.checkpoint_path(args.ckpt)
    try:
        ckpt, enc = common.checkpoint_and_encoding(path)
        export(ckpt, enc, args.out)
    except (common.CheckpointError, ValueError, OSError) as e:
        sys.exit(f"export_hf.py: error: {e}")
    n = sum(v.numel() for v in ckpt["model"].values())
    print(f"wrote {args.out}: step {ckpt['step']}, {n:,} parameters, tokenizer {enc.name} + [MASK]")


if __name__ == "__main__":
    main()
