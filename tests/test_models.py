"""Flax decoder + real loader vs HF transformers PyTorch (the reference nobody here wrote)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cna_jax import convert
from cna_jax.models import ConfigError, forward, from_hf_dict
from cna_jax.neurons import NeuronSet, multiplier
from hf_models import hf_logits, left_pad_ids, left_padded_batch, save_tiny

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_mqa": ("llama", dict(num_key_value_heads=1)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=1)),
}


def _batch(vocab, seed=0):
    # Mixed lengths >= 64 tokens, left-padded: exercises padding positions and masks.
    return left_padded_batch(np.random.default_rng(seed), vocab, [80, 64, 71], 80)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kind, overrides = CASES[case]
    path, hf = save_tiny(tmp_path, kind, **overrides)
    cfg, params = convert.load(path)
    tokens, valid = _batch(cfg.vocab_size)
    ref = hf_logits(hf, tokens, valid)
    out = np.asarray(forward(params, tokens, valid, cfg=cfg))
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)


def test_llama3_rope_scaling_changes_logits(tmp_path):
    # Guard: the llama3 case must really exercise scaled frequencies (positions beyond the original context).
    path, _ = save_tiny(tmp_path, "llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    cfg, params = convert.load(path)
    plain = cfg.__class__(**{**cfg.__dict__, "rope_scaling": None})
    tokens, valid = _batch(cfg.vocab_size)
    a = np.asarray(forward(params, tokens, valid, cfg=cfg))
    b = np.asarray(forward(params, tokens, valid, cfg=plain))
    assert np.abs(a - b)[valid].max() > 1e-3


def test_sharded_checkpoint_with_index(tmp_path):
    path, hf = save_tiny(tmp_path, "llama", max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    cfg, params = convert.load(path)
    tokens, valid = _batch(cfg.vocab_size, seed=1)
    np.testing.assert_allclose(np.asarray(forward(params, tokens, valid, cfg=cfg))[valid],
                               hf_logits(hf, tokens, valid)[valid], atol=1e-4, rtol=0)


def test_bf16_load_rounds_like_torch(tmp_path):
    """The bf16 loader: every leaf bf16, each value torch's own bf16 rounding of the HF float32 weight
    (both round to nearest even: equal bit for bit). Numerics in bf16: test_smollm2_bf16_* below."""
    path, hf = save_tiny(tmp_path, "qwen2")
    cfg, params = convert.load(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))

    def bf16(t):
        return t.detach().to(torch.bfloat16).float().numpy()

    layer = hf.model.layers[1]
    pairs = [(params["embed_tokens"]["embedding"], bf16(hf.model.embed_tokens.weight)),
             (params["layers_1"]["mlp"]["gate_proj"]["kernel"], bf16(layer.mlp.gate_proj.weight).T),
             (params["layers_1"]["self_attn"]["k_proj"]["bias"], bf16(layer.self_attn.k_proj.bias).reshape(2, 16)),
             (params["layers_1"]["input_layernorm"]["weight"], bf16(layer.input_layernorm.weight))]
    for got, want in pairs:
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


# --- neuron multiplier -------------------------------------------------------------------------------

def _ablate_hf_columns(hf, pairs):
    with torch.no_grad():
        for layer, idx in pairs:
            hf.model.layers[layer].mlp.down_proj.weight[:, idx] = 0.0


def test_mask_equals_zeroed_down_proj_columns(tmp_path):
    path, hf = save_tiny(tmp_path, "qwen2")
    cfg, params = convert.load(path)
    rng = np.random.default_rng(3)
    pairs = sorted({(int(rng.integers(cfg.num_hidden_layers)), int(rng.integers(cfg.intermediate_size)))
                    for _ in range(40)})
    tokens, valid = _batch(cfg.vocab_size)
    mult = multiplier(cfg.num_hidden_layers, cfg.intermediate_size, pairs, 0.0)
    ours = np.asarray(forward(params, tokens, valid, mult, cfg=cfg))
    before = hf_logits(hf, tokens, valid)
    _ablate_hf_columns(hf, pairs)
    ref = hf_logits(hf, tokens, valid)
    assert np.abs(ref - before)[valid].max() > 1e-3  # the ablation matters
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_amplify_equals_scaled_down_proj_columns(tmp_path):
    path, hf = save_tiny(tmp_path, "llama")
    cfg, params = convert.load(path)
    pairs = [(0, 3), (1, 10), (2, 50)]
    tokens, valid = _batch(cfg.vocab_size)
    ours = np.asarray(forward(params, tokens, valid, multiplier(3, cfg.intermediate_size, pairs, 4.0), cfg=cfg))
    with torch.no_grad():
        for layer, idx in pairs:
            hf.model.layers[layer].mlp.down_proj.weight[:, idx] *= 4.0
    np.testing.assert_allclose(ours[valid], hf_logits(hf, tokens, valid)[valid], atol=1e-4, rtol=0)


def test_unit_multiplier_equals_no_mask_and_masks_do_not_recompile(tmp_path):
    path, _ = save_tiny(tmp_path, "llama")
    cfg, params = convert.load(path)
    tokens, valid = _batch(cfg.vocab_size)
    ones = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    np.testing.assert_array_equal(np.asarray(forward(params, tokens, valid, ones, cfg=cfg)),
                                  np.asarray(forward(params, tokens, valid, cfg=cfg)))
    before = forward._cache_size()
    outs = []
    for seed in range(4):
        ns = NeuronSet.from_pairs([(seed % 3, seed * 7), (2, seed + 1)], 3, cfg.intermediate_size)
        outs.append(np.asarray(forward(params, tokens, valid, ns.multiplier(), cfg=cfg)))
    assert forward._cache_size() == before  # traced multiplier: no new compilation
    assert not np.allclose(outs[0], outs[1])


def test_neuron_set_roundtrip_and_multiplier(tmp_path):
    ns = NeuronSet.from_pairs([(2, 5), (0, 1), (2, 7)], 4, 16, deltas=[0.5, -1.0, 0.25], meta={"k": 3})
    ns.save(str(tmp_path / "set.json"))
    back = NeuronSet.load(str(tmp_path / "set.json"))
    assert back.pairs() == ns.pairs() and back.meta == {"k": 3}
    np.testing.assert_array_equal(back.layer_counts(), [1, 0, 2, 0])
    m = ns.multiplier(0.0)
    assert m.shape == (4, 16) and m.sum() == 4 * 16 - 3 and m[2, 5] == 0 and m[0, 1] == 0
    with pytest.raises(ValueError, match="duplicate"):
        NeuronSet.from_pairs([(1, 1), (1, 1)], 4, 16)
    with pytest.raises(ValueError, match="out of range"):
        multiplier(4, 16, [(4, 0)])


# --- bad input -----------------------------------------------------------------------------------------

def _hf_cfg(tmp_path, **changes):
    path, _ = save_tiny(tmp_path, "llama")
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    d.update(changes)
    return path, d


def test_unsupported_config_keys_and_values(tmp_path):
    _, d = _hf_cfg(tmp_path)
    with pytest.raises(ConfigError, match="frobnicate"):
        from_hf_dict({**d, "frobnicate": 1})
    with pytest.raises(ConfigError, match="mlp_bias"):
        from_hf_dict({**d, "mlp_bias": True})
    with pytest.raises(ConfigError, match="yarn"):
        from_hf_dict({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_dict({**d, "model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_dict({**d, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="hidden_act"):
        from_hf_dict({**d, "hidden_act": "gelu"})


def test_missing_tensor_wrong_shape_unused_key_missing_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = save_tiny(tmp_path, "llama")
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    cfg = convert.from_hf_config_file(path)

    def reader_with(ts):
        save_file(ts, st)
        return convert.SafetensorsCheckpoint(path)

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(convert.ConversionError, match="missing.*layers_1/mlp/up_proj"):
        convert.load_params(reader_with(missing), cfg)
    wrong = dict(tensors)
    wrong["model.layers.0.mlp.gate_proj.weight"] = np.zeros((7, 64), np.float32)
    with pytest.raises(convert.ConversionError, match="shape"):
        convert.load_params(reader_with(wrong), cfg)
    extra = dict(tensors)
    extra["model.layers.0.mlp.gate_proj.bias"] = np.zeros((96,), np.float32)
    with pytest.raises(convert.ConversionError, match="not used"):
        convert.load_params(reader_with(extra), cfg)
    extra_layer = dict(tensors)
    extra_layer["model.layers.9.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(convert.ConversionError, match="layers_9"):
        convert.load_params(reader_with(extra_layer), cfg)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        convert.load(str(tmp_path / "no_such_dir"))
    os.remove(st)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load(path)
    with pytest.raises(FileNotFoundError):
        convert.load(str(tmp_path / "model.gguf"))


# --- the real model --------------------------------------------------------------------------------------

def test_smollm2_gguf_matches_transformers_gguf_load(smollm2_lm, smollm2_hf):
    """~500 tokens (RoPE bugs hide in short prompts); KL(HF || ours) per token <= 1e-4."""
    tok = smollm2_lm.tokenizer
    text = ("Contrastive neuron attribution ranks MLP neurons by the difference of their mean activation "
            "between harmful and harmless prompts. ") * 30
    ids = np.asarray(tok(text)["input_ids"][:500])[None]
    assert ids.shape[1] == 500
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor(ids)).logits.float().numpy()
    out = np.asarray(forward(smollm2_lm.params, ids, np.ones_like(ids, bool), cfg=smollm2_lm.cfg))
    lq = jax.nn.log_softmax(ref, -1)
    lp = jax.nn.log_softmax(out, -1)
    kl = np.asarray((jnp.exp(lq) * (lq - lp)).sum(-1))
    assert kl.max() <= 1e-4, kl.max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.99


# Natural text (not repeated: the next token is really uncertain in places) for the numerics tests below.
NATURAL = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a screw press adapted from wine making. Within fifty years, "
    "presses were running in more than two hundred cities across Europe, and the price of books fell "
    "sharply. Scholars could now compare identical copies of a text, which changed how knowledge was "
    "checked and shared.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a wide pan, add a chopped onion and "
    "a pinch of salt, and cook until soft. Stir in two cloves of garlic, then a tin of crushed tomatoes. Let "
    "it simmer for twenty minutes, tasting as you go, and finish with fresh basil.",
]


@pytest.fixture(scope="module")
def smollm2_natural(smollm2_lm, smollm2_hf):
    """(tokens, valid, HF float32 logits as float64) for NATURAL, left-padded here with NumPy."""
    ids = [smollm2_lm.tokenizer(t)["input_ids"] for t in NATURAL]  # 76 and 65 tokens
    tokens, valid = left_pad_ids(ids)
    return tokens, valid, hf_logits(smollm2_hf, tokens, valid).astype(np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(ref, other):
    """KL(softmax(ref) || softmax(other)) per position, float64."""
    lp, lq = _log_softmax(ref), _log_softmax(other)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_smollm2_bf16_agrees_with_transformers(smollm2_lm, smollm2_hf, smollm2_natural):
    """Our bf16 forward (bf16 weights and activations) against HF float32 on the same input:
    - top-1 agreement on >= 95% of the 141 positions. bf16 moves logits by up to ~1 here (measured 0.9
      for ours, 0.7 for HF's own bf16), so a position whose float32 top-2 margin is below that may
      legitimately flip: 4 of the 141 positions (3%) have margins < 0.1 (measured agreement: 100%, ours
      and HF's bf16 alike). A coarse bug (a wrong cast, a bf16 softmax over the vocabulary) shows here.
    - the finer check: mean KL(HF fp32 || ours bf16) at most twice HF's own bf16 error on the same
      positions, KL(HF fp32 || HF bf16) (measured 1.3e-3 vs 1.2e-3). A bf16 implementation as careful as
      transformers' lands near 1x; losing one more mantissa bit anywhere costs about as much again
      (weights rounded to 6 bits instead of bf16's 7, float32 compute: KL 1.2e-3 by itself), which the
      factor 2 does not absorb."""
    import copy

    tokens, valid, ref = smollm2_natural
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), smollm2_lm.params)  # = the bf16 loader (test_load)
    ours = np.asarray(forward(params, tokens, valid, cfg=smollm2_lm.cfg, dtype=jnp.bfloat16)).astype(np.float64)
    hf_bf16 = copy.deepcopy(smollm2_hf).to(torch.bfloat16)
    theirs = hf_logits(hf_bf16, tokens, valid).astype(np.float64)
    del hf_bf16
    assert np.isfinite(ours[valid]).all()
    agree = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
    assert agree >= 0.95, agree
    kl_ours, kl_hf = _kl(ref, ours)[valid].mean(), _kl(ref, theirs)[valid].mean()
    assert kl_hf > 1e-5  # HF's bf16 really ran in bf16 (float32 would give ~1e-11)
    assert kl_ours <= 2.0 * kl_hf, (kl_ours, kl_hf)


def test_smollm2_default_matmul_precision_matches_transformers(smollm2_lm, smollm2_natural):
    """The one parity run at JAX's *default* matmul precision (conftest sets "highest" for the suite).
    The lowered program really carries DEFAULT dots (checked on the HLO). On CPU, XLA computes float32
    dots in float32 whatever the precision (only TPU/GPU lower "default" to bf16 passes / TF32), so the
    bound is the float32 one of the "highest" runs: logits of magnitude ~20 after 30 layers summed in
    another order than torch's, |diff| <= 1e-3 (measured 1.4e-4, identical to "highest"); KL <= 1e-6
    (measured 1.4e-10)."""
    tokens, valid, ref = smollm2_natural
    params, cfg = smollm2_lm.params, smollm2_lm.cfg
    with jax.default_matmul_precision("default"):
        hlo = forward.lower(params, tokens, valid, cfg=cfg).as_text()
        out = np.asarray(forward(params, tokens, valid, cfg=cfg)).astype(np.float64)
    assert "precision = [DEFAULT, DEFAULT]" in hlo and "HIGHEST" not in hlo
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-3, rtol=0)
    assert _kl(ref, out)[valid].max() <= 1e-6
