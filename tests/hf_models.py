"""Tiny random HF models saved with ``save_pretrained``: the references for parity tests."""
from __future__ import annotations

import os

import numpy as np
import torch
import transformers


def tiny_config(kind="llama", **overrides):
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(overrides)
    if kind == "llama":
        return transformers.LlamaConfig(**base)
    if kind == "qwen2":
        base.setdefault("rope_theta", 1e6)
        return transformers.Qwen2Config(**base)
    raise ValueError(kind)


def save_tiny(tmpdir, kind="llama", seed=0, max_shard_size=None, **overrides):
    """Builds a random HF model, perturbs norms/biases so they matter, saves it; returns (dir, torch model)."""
    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = os.path.join(str(tmpdir), f"{kind}-{seed}")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path, model


def save_tiny_chat(tmpdir, kind="llama", seed=0, **overrides):
    """:func:`save_tiny` with SmolLM2's tokenizer and chat template saved beside the weights (a model
    ``LM.load`` reads as a chat model); ``vocab_size`` defaults to the tokenizer's 49,152."""
    from cna_jax.lm import load_tokenizer

    overrides.setdefault("vocab_size", 49152)
    path, model = save_tiny(tmpdir, kind, seed=seed, **overrides)
    load_tokenizer("smollm2").save_pretrained(path)
    return path, model


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths, total: int):
    """Token ids and a validity mask, left-padded to ``total``."""
    b = len(lengths)
    tokens = np.zeros((b, total), np.int64)
    valid = np.zeros((b, total), bool)
    for i, n in enumerate(lengths):
        tokens[i, total - n:] = rng.integers(0, vocab, n)
        valid[i, total - n:] = True
    return tokens, valid


def left_pad_ids(ids):
    """Token lists left-padded with NumPy (independently of cna_jax.batching.left_pad): (tokens int64, valid)."""
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int64)
    valid = np.zeros((len(ids), width), bool)
    for r, row in enumerate(ids):
        tokens[r, width - len(row):] = row
        valid[r, width - len(row):] = True
    return tokens, valid


def hf_logits(model, tokens, valid):
    """HF logits for a left-padded batch with HF's own position handling (as in generate)."""
    mask = torch.tensor(valid.astype(np.int64))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=mask, position_ids=pos)
    return out.logits.float().numpy()
