"""Export (Flax params -> HF-style directory) round trips: our loader and HF transformers read it back."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

from cna_jax import convert
from cna_jax.export import ExportError, export, hf_state_dict
from cna_jax.lm import LM
from cna_jax.models import forward
from hf_models import hf_logits, left_padded_batch, save_tiny

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
}


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_round_trip_and_transformers_logits(tmp_path, case):
    kind, overrides = CASES[case]
    src, _ = save_tiny(tmp_path, kind, **overrides)
    cfg, params = convert.load(src)
    out = export(cfg, params, str(tmp_path / "exported"))

    # Our loader: identical config and parameters, bit for bit.
    cfg2, params2 = convert.load(out)
    assert cfg2 == cfg
    _assert_same_params(params, params2)

    # The exported tensors are exactly the original HF checkpoint's (names, layout, values).
    orig = load_file(os.path.join(src, "model.safetensors"))
    new = load_file(os.path.join(out, "model.safetensors"))
    if cfg.tie_word_embeddings:
        orig.pop("lm_head.weight", None)
    assert set(new) == set(orig)
    for k in orig:
        np.testing.assert_array_equal(new[k], orig[k].astype(np.float32), err_msg=k)

    # HF transformers reads it and agrees with our forward.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tokens, valid = left_padded_batch(np.random.default_rng(0), cfg.vocab_size, [40, 25, 33], 40)
    ref = hf_logits(hf, tokens, valid)
    ours = np.asarray(forward(params2, tokens, valid, cfg=cfg2))
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_export_rejects_a_tree_that_does_not_match_the_config(tmp_path):
    src, _ = save_tiny(tmp_path, "llama")
    cfg, params = convert.load(src)
    flat = _flat(params)
    flat.pop("layers_1/mlp/up_proj/kernel")
    with pytest.raises(ExportError, match="missing"):
        hf_state_dict(cfg, traverse_util.unflatten_dict(flat, sep="/"))


def test_smollm2_export_reloads_identically(tmp_path, smollm2_lm):
    """The real model with its tokenizer: ``LM.load(dir)`` gives the same params, formatting and EOS ids."""
    lm = smollm2_lm
    out = export(lm.cfg, lm.params, str(tmp_path / "smollm2"), tokenizer=lm.tokenizer)
    with open(os.path.join(out, "config.json")) as f:
        hf_cfg = json.load(f)
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["tie_word_embeddings"] is True
    lm2 = LM.load(out)
    assert lm2.cfg == lm.cfg
    _assert_same_params(lm.params, lm2.params)
    prompts = ["How do I bake sourdough bread?", "Tell me a joke about cats."]
    assert lm2.encode(prompts) == lm.encode(prompts)
    assert lm2.format(prompts[0]) == lm.format(prompts[0])
    assert lm2.eos_ids() == lm.eos_ids() and lm2.pad_id() == lm.pad_id()
