"""export_hf.py: the Hugging Face folder computes our function. Checked against Hugging Face
Llama's math written out here (always), and against transformers itself when it is installed."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import export_hf
from conftest import make_tiny_encoding
from model import Llama, ModelArgs


def tiny_ckpt(enc, seed=0):
    torch.manual_seed(seed)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320,
                            max_seq_len=16))
    for p in model.parameters():  # norms away from 1, so that a missing norm weight shows
        p.data += 0.1 * torch.randn_like(p)
    return model, {"model_args": vars(model.args), "model": model.state_dict(), "step": 3,
                   "tokenizer": enc.name}


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    data = raw[8 + n:]
    return {k: torch.frombuffer(bytearray(data[v["data_offsets"][0]:v["data_offsets"][1]]),
                                dtype=torch.float32).view(v["shape"]) for k, v in header.items()}


def hf_llama_logits(w, cfg, idx):
    """LlamaForCausalLM's forward as transformers computes it: RoPE rotating halves."""
    H, Hkv, C = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D, T = C // H, idx.shape[1]
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D)
    ang = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)  # (T, D)
    rot = lambda x: x * ang.cos() + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * ang.sin()
    norm = lambda x, g: g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
    h = w["model.embed_tokens.weight"][idx]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(1, T, H, D).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(1, T, Hkv, D).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(1, T, Hkv, D).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, T, C)
        h = h + y @ w[p + "self_attn.o_proj.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        m = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + m @ w[p + "mlp.down_proj.weight"].T
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_exported_weights_compute_our_function(tmp_path):
    enc = make_tiny_encoding()
    model, ckpt = tiny_ckpt(enc)
    export_hf.export(ckpt, enc, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    w = read_safetensors(tmp_path / "model.safetensors")
    assert len(w) == 3 + 9 * 2 and sum(t.numel() for t in w.values()) == model.num_params()
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(hf_llama_logits(w, cfg, idx), ours, atol=1e-4, rtol=1e-4)
    # without the q/k permutation the two disagree: the test can tell
    w["model.layers.0.self_attn.q_proj.weight"] = model.layers[0].attention.wq.weight.detach()
    assert (hf_llama_logits(w, cfg, idx) - ours).abs().max() > 1e-3


def test_tokenizer_files(tmp_path):
    enc = make_tiny_encoding()
    export_hf.write_tokenizer(str(tmp_path), enc, enc.n_vocab, 16)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()[1:]
    assert len(vocab) == enc.n_vocab - 1  # every token but the special <|endoftext|>
    assert len(merges) == len(vocab) - 256  # one merge per token beyond the 256 bytes
    for m in merges:  # each merge joins two tokens into a token
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    added = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["content"], t["id"]) for t in added] == [("<|endoftext|>", 308), ("[MASK]", 309)]
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["the cat and the dog", " river stone, apple!", "tree\n\nhouse  green 42"]:
        assert tok.encode(text).ids == enc.encode_ordinary(text)
        assert tok.decode(enc.encode_ordinary(text)) == text


def test_transformers_loads_it_with_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    enc = make_tiny_encoding()
    model, ckpt = tiny_ckpt(enc, seed=1)
    export_hf.export(ckpt, enc, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        diff = (hf(input_ids=idx).logits - model(idx)[0]).abs().max().item()
    assert diff < 1e-4, diff
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok("the cat and the dog")["input_ids"] == enc.encode_ordinary("the cat and the dog")
    assert tok.mask_token_id == enc.n_vocab


def test_a_tokenizer_other_than_gpt2s_byte_level_bpe_is_refused(tmp_path):
    import tiktoken
    enc = make_tiny_encoding()
    other = tiktoken.Encoding(name="other", pat_str=r"\S+|\s+", special_tokens=enc._special_tokens,
                              mergeable_ranks=enc._mergeable_ranks)
    _, ckpt = tiny_ckpt(other)
    with pytest.raises(ValueError, match="split pattern"):
        export_hf.export(ckpt, other, str(tmp_path))


# The format details a loader relies on, by hand (issue 26)

def test_bytes_to_unicode_is_gpt2s_table():
    m = export_hf.bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord("!")] == "!" and m[ord("~")] == "~" and m[0xA1] == "\xa1" and m[0xFF] == "\xff"
    # the others in byte order from 256: 0..32, then 127..160, then 173 (the soft hyphen)
    assert (m[0], m[ord(" ")], m[ord("\n")]) == (chr(256), "Ġ", "Ċ")
    assert (m[127], m[160], m[0xAD]) == (chr(256 + 33), chr(256 + 33 + 33), chr(256 + 67))
    # every byte by the table's rule: the printable characters of Latin-1 but the space (so not
    # 0x80..0xA0, nor the soft hyphen 0xAD) stand for themselves, the others take 256, 257, ...
    own = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    assert len(own) == 188 and 0xAE in own and 0xAD not in own and 0xA0 not in own
    others = [b for b in range(256) if b not in own]
    assert m == {**{b: chr(b) for b in own}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    assert m[0xAE] == "\xae"  # the registered sign, right after the soft hyphen


def test_bpe_merges_by_hand():
    ranks = {bytes([c]): i for i, c in enumerate(b"abcd")}
    # 'abc': the lower-ranked of ab and bc merges first, so the last merge differs
    assert export_hf.bpe_merges({**ranks, b"ab": 4, b"bc": 5, b"abc": 6})[-1] == (b"ab", b"c")
    assert export_hf.bpe_merges({**ranks, b"bc": 4, b"ab": 5, b"abc": 6})[-1] == (b"a", b"bc")
    # 'abcd' with no 'bc' or 'abc' token: ab, then cd, then the two halves
    merges = export_hf.bpe_merges({**ranks, b"ab": 4, b"cd": 5, b"abcd": 6})
    assert merges == [(b"a", b"b"), (b"c", b"d"), (b"ab", b"cd")]


def test_safetensors_header_is_aligned_and_exact(tmp_path):
    tensors = {"a": torch.arange(3.0), "bb": torch.ones(2, 5), "c": torch.zeros(1)}
    export_hf.write_safetensors(str(tmp_path / "m.safetensors"), tensors)
    raw = (tmp_path / "m.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and len(raw) == 8 + n + 4 * (3 + 10 + 1)  # the data starts aligned
    header = json.loads(raw[8:8 + n])
    assert header == {"__metadata__": {"format": "pt"},
                      "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                      "bb": {"dtype": "F32", "shape": [2, 5], "data_offsets": [12, 52]},
                      "c": {"dtype": "F32", "shape": [1], "data_offsets": [52, 56]}}
    for name, t in read_safetensors(tmp_path / "m.safetensors").items():
        assert torch.equal(t, tensors[name])


def test_config_and_cli(tmp_path, monkeypatch, capsys):
    enc = make_tiny_encoding()
    model, ckpt = tiny_ckpt(enc)
    cfg = export_hf.hf_config(model.args, 7)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]) == (
        32, model.args.hidden_dim, 8)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"],
            cfg["vocab_size"], cfg["max_position_embeddings"]) == (4, 2, 2, 320, 16)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (7, 7, False)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"]) == (model.args.norm_eps,
                                                        model.args.rope_theta)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    monkeypatch.setattr(export_hf.common, "get_encoding", lambda name: enc)
    export_hf.main([str(tmp_path), str(tmp_path / "hf")])
    n = sum(v.numel() for v in ckpt["model"].values())
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'hf'}: step 3, {n:,} parameters, "
                                       f"tokenizer tiny + [MASK]\n")
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (conf["model_max_length"], conf["mask_token"], conf["eos_token"]) == (
        16, "[MASK]", "<|endoftext|>")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": enc.eot_token, "eos_token_id": enc.eot_token}
    with pytest.raises(SystemExit, match="export_hf.py: error: cannot read checkpoint"):
        export_hf.main([str(tmp_path / "hf" / "config.json"), str(tmp_path / "x")])


def test_tokenizer_json_fields_are_gpt2s(tmp_path):
    # without the tokenizers library (CI) nothing loads the file: its settings are pinned to those
    # of GPT-2's own tokenizer.json on the hub, but the special tokens are not normalized
    enc = make_tiny_encoding()
    export_hf.write_tokenizer(str(tmp_path), enc, enc.n_vocab, 16)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    assert tok["added_tokens"] == [dict(id=308, content="<|endoftext|>", **flags),
                                   dict(id=309, content="[MASK]", **flags)]
    byte_level = dict(type="ByteLevel", trim_offsets=True, use_regex=True)
    assert tok["pre_tokenizer"] == dict(byte_level, add_prefix_space=False)
    assert tok["decoder"] == dict(byte_level, add_prefix_space=True)
    assert (tok["normalizer"], tok["post_processor"], tok["truncation"], tok["padding"]) == (
        None, None, None, None)
    model = {k: v for k, v in tok["model"].items() if k not in ("vocab", "merges")}
    assert model == dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                         ignore_merges=False)
    assert tok["model"]["vocab"] == json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and tok["model"]["merges"] == merges[1:]
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>", "mask_token": "[MASK]"}
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (conf["tokenizer_class"], conf["add_prefix_space"],
            conf["clean_up_tokenization_spaces"]) == ("GPT2TokenizerFast", False, False)


def test_config_json_by_hand(tmp_path, monkeypatch):
    # every key Hugging Face reads, with its JSON type: a float head_dim (8.0) would equal 8 in
    # Python but not load as a size
    enc = make_tiny_encoding()
    model, ckpt = tiny_ckpt(enc)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    monkeypatch.setattr(export_hf.common, "get_encoding", lambda name: enc)
    export_hf.main([str(tmp_path), str(tmp_path / "hf")])
    text = (tmp_path / "hf" / "config.json").read_text()
    cfg = json.loads(text)
    a = model.args
    want = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320,
            "hidden_size": 32, "intermediate_size": a.hidden_dim, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "hidden_act": "silu", "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
            "max_position_embeddings": 16, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": enc.eot_token, "eos_token_id": enc.eot_token,
            "torch_dtype": "float32"}
    assert cfg == want
    assert {k: type(v) for k, v in cfg.items()} == {k: type(v) for k, v in want.items()}
