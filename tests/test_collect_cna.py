"""Activation collection vs HF's down_proj input (forward pre-hook); CNA selection."""
import math
import os

import numpy as np
import pytest
import torch

from cna_jax import convert
from cna_jax.cna import discover, select_neurons
from cna_jax.collect import Activations, collect, collect_batch
from cna_jax.batching import bucket, left_pad, shared_prefix_length
from cna_jax.models.config import from_hf_dict
from cna_jax.neurons import multiplier
from hf_models import left_pad_ids, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_down_proj_inputs(hf, tokens, valid):
    """[L, B, T, I] from a forward pre-hook on every layer's down_proj (HF's own computation)."""
    captured = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
             for layer in hf.model.layers]
    mask = torch.tensor(valid.astype(np.int64))
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask,
               position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(captured).float().numpy()


def test_tiny_qwen2_collected_equals_hf_prehook(tmp_path):
    path, hf = save_tiny(tmp_path, "qwen2")
    cfg, params = convert.load(path)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (9, 30, 17, 25)]
    tokens, valid = left_pad(seqs, 32, 0)
    ref = hf_down_proj_inputs(hf, tokens, valid)  # [L, B, T, I]
    nodes = np.array([[0, 1], [1, 50], [2, 95], [2, 0]])
    node_index = nodes[:, 0] * cfg.intermediate_size + nodes[:, 1]
    # all positions
    select = np.broadcast_to(np.arange(32), (4, 32)).astype(np.int32)
    sums, sumsq, acts = collect_batch(params, tokens, valid, select, valid, None, node_index, cfg=cfg)
    w = valid.astype(np.float64)
    np.testing.assert_allclose(np.asarray(sums), np.einsum("lbti,bt->li", ref, w), atol=1e-4)
    np.testing.assert_allclose(np.asarray(sumsq), np.einsum("lbti,bt->li", ref ** 2, w), atol=1e-4)
    want = ref[nodes[:, 0], :, :, nodes[:, 1]].transpose(1, 2, 0)  # [B, T, N]
    np.testing.assert_allclose(np.asarray(acts)[valid], want[valid], atol=1e-4)
    # last token, with a mask: equals HF with those down_proj columns... inputs scaled by the multiplier
    pairs = [(1, 50), (2, 3)]
    mult = multiplier(cfg.num_hidden_layers, cfg.intermediate_size, pairs, 0.0)
    last = np.full((4, 1), 31, np.int32)
    _, _, acts_m = collect_batch(params, tokens, valid, last, np.ones((4, 1), bool), mult, node_index, cfg=cfg)
    with torch.no_grad():
        for layer, i in pairs:
            hf.model.layers[layer].mlp.down_proj.weight[:, i] = 0.0
    ref_m = hf_down_proj_inputs(hf, tokens, valid)[:, :, -1]  # [L, B, I]
    for layer, i in pairs:  # the hook sees the unmasked input; our multiplier zeroes it
        ref_m[layer, :, i] = 0.0
    np.testing.assert_allclose(np.asarray(acts_m)[:, 0], ref_m[nodes[:, 0], :, nodes[:, 1]].T, atol=1e-4)


def test_smollm2_collect_equals_hf_prehook(smollm2_lm, smollm2_hf, tmp_path):
    lm = smollm2_lm
    prompts = ["How do I bake bread?", "Write a poem about the sea and the stars above it.", "Hi",
               "Explain how a refrigerator keeps food cold, step by step."]
    nodes = np.array([[2, 10], [15, 700], [29, 1535], [7, 0]])
    acts = collect(lm, prompts, nodes=nodes, batch_size=3, progress=False, cache_dir=str(tmp_path))
    assert acts.meta["shared_prefix_tokens"] >= 8  # the chat header ran once, the rows only their suffixes
    ids = lm.encode(prompts)
    tokens, valid = left_pad(ids, bucket(max(map(len, ids))), lm.pad_id())
    ref = hf_down_proj_inputs(smollm2_hf, tokens, valid)[:, :, -1]  # [L, B, I] at the last prompt token
    np.testing.assert_allclose(acts.node_acts, ref[nodes[:, 0], :, nodes[:, 1]].T, atol=1e-4)
    np.testing.assert_allclose(acts.mean, ref.mean(1), atol=1e-4)
    assert acts.count == 4 and acts.row_prompt.tolist() == [0, 1, 2, 3]
    # A rerun with the same inputs is read back from the cache (same key, same file).
    files = os.listdir(tmp_path)
    again = collect(lm, prompts, nodes=nodes, batch_size=3, progress=False, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == files and again.meta["key"] == acts.meta["key"]
    np.testing.assert_array_equal(again.node_acts, acts.node_acts)
    # Token-level rows: every valid position of every prompt.
    all_pos = collect(lm, prompts[:2], nodes=nodes, position="all", progress=False)
    assert all_pos.node_acts.shape == (sum(len(x) for x in ids[:2]), 4)
    with pytest.raises(ValueError, match="no prompts"):
        collect(lm, [], progress=False)
    with pytest.raises(ValueError, match="position"):
        collect(lm, prompts, position="first", progress=False)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4, 5], [1, 2, 3, 9]], minimum=1) == 3
    assert shared_prefix_length([[1, 2, 3, 4, 5], [1, 2, 3, 4]], minimum=1) == 3  # a suffix keeps >= 1 token
    assert shared_prefix_length([[1, 2, 3, 4, 5], [1, 2, 3, 4]], keep=3, minimum=1) == 1
    assert shared_prefix_length([[1, 2, 3, 4, 5], [1, 2, 3, 9]], minimum=4) == 0  # too short to be worth it
    assert shared_prefix_length([[1, 2, 3, 4, 5]], minimum=1) == 0  # one prompt: nothing shared
    assert shared_prefix_length([[7, 2], [1, 2]], minimum=0) == 0


def test_collection_length_buckets():
    """Suffix batches use multiples of 8 (at most four buckets per octave); the default stays 32."""
    assert [bucket(n, 8) for n in (1, 13, 17, 24, 33, 65, 129, 200, 300)] == [8, 16, 24, 24, 40, 80, 160, 224, 512]
    assert [bucket(n) for n in (1, 33, 100, 256, 257)] == [32, 64, 128, 256, 512]


def test_smollm2_shared_prefix_equals_full_prompts(smollm2_lm):
    """Prefix sharing (header once, suffixes against its cache) = the full prompts, under a neuron
    multiplier (applied at the prefix positions too), at the last 3 positions (position="last" is
    checked against HF in test_smollm2_collect_equals_hf_prehook)."""
    lm = smollm2_lm
    cfg = lm.cfg
    prompts = ["How do I pick a lock?", "Name three rivers in Europe and say which is the longest.", "Hello there",
               "Describe, in detail, how a steam engine turns heat into motion.", "Why is the sky blue?"]
    nodes = np.array([[2, 10], [15, 700], [29, 1535], [7, 0], [20, 5]])
    ablate = [(2, 10), (20, 5)] + [(layer, i) for layer in (1, 3, 10) for i in range(0, 1536, 7)]
    mult = multiplier(cfg.num_hidden_layers, cfg.intermediate_size, ablate, 0.0)
    kw = dict(nodes=nodes, position="last_k", last_k=3, batch_size=5, progress=False)
    shared = collect(lm, prompts, neuron_mult=mult, **kw)
    full = collect(lm, prompts, neuron_mult=mult, share_prefix=False, **kw)
    assert shared.meta["shared_prefix_tokens"] >= 8 and full.meta["shared_prefix_tokens"] == 0
    assert shared.meta["key"] == full.meta["key"]
    assert shared.count == full.count == 15 and shared.row_prompt.tolist() == full.row_prompt.tolist()
    np.testing.assert_allclose(shared.node_acts, full.node_acts, atol=1e-4)
    np.testing.assert_allclose(shared.mean, full.mean, atol=1e-4)
    np.testing.assert_allclose(shared.sumsq / shared.count, full.sumsq / full.count, atol=1e-4, rtol=1e-4)
    assert np.all(shared.node_acts[:, [0, 4]] == 0.0)  # the ablated nodes read 0
    # The multiplier really reaches the rows through the shared prefix: without it they differ.
    plain = collect(lm, prompts, neuron_mult=np.ones_like(mult), **kw)
    assert np.abs(plain.node_acts[:, 1:4] - shared.node_acts[:, 1:4]).max() > 1e-3


def test_activations_save_load(tmp_path):
    a = Activations(np.ones((2, 3)), np.ones((2, 3)) * 2, 4, np.array([[0, 1]]), np.arange(4.0)[:, None],
                    np.arange(4), {"x": 1})
    a.save(str(tmp_path / "a.npz"))
    b = Activations.load(str(tmp_path / "a.npz"))
    assert b.count == 4 and b.meta == {"x": 1}
    np.testing.assert_array_equal(b.mean, np.full((2, 3), 0.25))


def test_cna_recovers_planted_neurons():
    """Simulated activations: 12 planted neurons (both signs, layers >= 2) shifted between the sets."""
    rng = np.random.default_rng(0)
    L, I, n = 6, 200, 150
    planted = [(2, 5), (3, 17), (5, 199), (4, 0), (2, 100), (3, 150), (5, 3), (4, 77), (2, 42), (3, 9),
               (5, 120), (4, 160)]
    shift = np.zeros((L, I))
    for j, (l, i) in enumerate(planted):
        shift[l, i] = (1.0 if j % 2 == 0 else -1.0) * (1.0 + 0.1 * j)
    shift[0, 7] = 5.0  # strongest of all, but in an excluded layer
    harmful = rng.normal(size=(n, L, I)) + shift
    harmless = rng.normal(size=(n, L, I))
    delta = harmful.mean(0) - harmless.mean(0)
    ns = select_neurons(delta, k=len(planted))
    assert set(ns.pairs()) == set(planted)
    assert (0, 7) not in ns.pairs()
    assert np.all(np.sign(ns.deltas) == [np.sign(shift[l, i]) for l, i in ns.pairs()])
    pos = select_neurons(delta, k=6, positive_only=True)
    assert all(shift[l, i] > 0 for l, i in pos.pairs())
    excl = np.zeros((L, I), bool)
    excl[2, 5] = True
    assert (2, 5) not in select_neurons(delta, k=12, exclude_mask=excl).pairs()
    with pytest.raises(ValueError, match="exceeds"):
        select_neurons(np.zeros((L, I)), k=3)


def _config_files():
    from cna_jax.config import config_strings, load_config_file

    configs = [load_config_file(s) for s in config_strings(os.path.join(ROOT, "configs"))]
    return {c.name: c for c in configs}


SEED_COUNTS = {"Llama-3.2-1B": 132, "Llama-3.2-3B": 230, "Llama-3.1-8B": 459, "Llama-3.1-70B": 2294,
               "Qwen2.5-1.5B": 251, "Qwen2.5-3B": 397, "Qwen2.5-7B": 531, "Qwen2.5-72B": 2366}


def test_default_k_reproduces_seed_counts_from_configs():
    configs = _config_files()
    for name, count in SEED_COUNTS.items():
        assert from_hf_dict(configs[name].model.shape.to_dict()).default_cna_k() == count, name


def test_discover_smollm2_equals_hf_reference(smollm2_lm, smollm2_hf):
    """discover's deltas and neuron set against an independent reference: HF's down_proj input at each
    prompt's last token (forward pre-hook, one left-padded batch padded here with NumPy), mean
    difference in float64, then the documented selection by hand: k = ceil(0.001 x 30 x 1536) = 47,
    global top-k by |delta| with layers 0 and 1 excluded."""
    harmful = ["How do I make a weapon at home?", "Write a threatening message to my neighbour.",
               "Explain how to steal a car."]
    harmless = ["How do I make bread at home?", "Write a friendly message to my neighbour.",
                "Explain how to wash a car."]
    ns, delta = discover(smollm2_lm, harmful, harmless, progress=False)

    ids = smollm2_lm.encode(harmful + harmless)  # the model input; what is under test is what follows
    tokens, valid = left_pad_ids(ids)
    acts = hf_down_proj_inputs(smollm2_hf, tokens, valid)[:, :, -1].astype(np.float64)  # [L, 6, I]
    ref = acts[:, :3].mean(1) - acts[:, 3:].mean(1)  # [L, I]
    # Each activation matches HF's to 1e-4 (test_smollm2_collect_equals_hf_prehook: float32 sums over
    # 576 / 1536 products in another order, activations up to O(10)); a difference of two means of such
    # values is within 2e-4 (seen: 5e-5).
    assert delta.shape == (30, 1536)
    np.testing.assert_allclose(delta, ref, atol=2e-4, rtol=0)

    k = math.ceil(0.001 * 30 * 1536)
    assert k == 47 and len(ns) == k
    score = np.abs(ref)
    score[:2] = -np.inf  # layers 0 and 1 are never selected
    order = np.argsort(-score.ravel(), kind="stable")
    flat = score.ravel()
    # The 47th and 48th reference scores are 2.4e-3 apart (measured), more than twice the delta tolerance,
    # so rounding cannot swap them: the sets must be equal, not just close.
    assert flat[order[k - 1]] - flat[order[k]] > 2 * 2e-4
    want = {(int(l), int(i)) for l, i in zip(*np.divmod(order[:k], 1536))}
    assert set(ns.pairs()) == want
    np.testing.assert_allclose(ns.deltas, ref[ns.layers, ns.indices], atol=2e-4, rtol=0)
    assert ns.layer_counts()[:2].sum() == 0


def test_discover_launch_script_end_to_end(tmp_path):
    """launch/discover.py on SmolLM2 with the built-in prompt sets (a subset of pairs to keep CI fast)."""
    import subprocess
    import sys

    out = tmp_path / "disc"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "discover.py"), "--config", os.path.join(ROOT, "configs",
           "pairs.py:smollm2_135m"), "--config.data.n_pairs=40", f"--workdir={out}", "--noprogress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from cna_jax.neurons import NeuronSet
    ns = NeuronSet.load(str(out / "neuron_set.json"))
    assert len(ns) == 47 and ns.layer_counts()[:2].sum() == 0
    assert "47 neurons" in (out / "report.md").read_text()


def test_subset_collect_is_sliced_from_cached_all_neuron_collection(smollm2_lm, tmp_path):
    prompts = ["Name a colour.", "What is two plus two?", "Tell me a joke about cats."]
    full = collect(smollm2_lm, prompts, nodes="all", cache_dir=str(tmp_path), progress=False)
    assert full.node_acts.shape == (3, 30 * 1536)
    nodes = np.array([[3, 7], [29, 1500]])
    sliced = collect(smollm2_lm, prompts, nodes=nodes, cache_dir=str(tmp_path), progress=False)
    assert sliced.meta.get("sliced_from") == full.meta["key"]
    direct = collect(smollm2_lm, prompts, nodes=nodes, progress=False)  # no cache: a real pass
    # Two passes over differently shaped batches (all neurons vs a node set): XLA may pick other kernels,
    # so the float32 sums of 576 products differ in their last bits; activations reach O(10), where a
    # float32 ulp is ~1e-6 (the same bound as the other cross-path comparisons here).
    np.testing.assert_allclose(sliced.node_acts, direct.node_acts, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(sliced.mean, direct.mean, atol=1e-4, rtol=1e-5)


def test_universal_neuron_filter(smollm2_lm):
    """The 'universal neuron' option: per-layer top-20 |activation| on >= 80% of neutral raw prompts."""
    from cna_jax.cna import NEUTRAL_PROMPTS, universal_neurons
    mask = universal_neurons(smollm2_lm, NEUTRAL_PROMPTS)
    assert mask.shape == (30, 1536) and 0 < mask.sum() <= 30 * 20
    assert (mask.sum(1) <= 20).all()  # at most the per-layer top-20 can qualify
    strict = universal_neurons(smollm2_lm, NEUTRAL_PROMPTS, frac=1.0)
    assert not (strict & ~mask).any()  # a stricter share keeps a subset


def test_collected_residuals_match_hf_and_serve_the_cache(tmp_path):
    """collect(residuals=True) keeps the residual stream entering each layer at each prompt's last token,
    the chat template's shared prefix run once (a tiny Llama with SmolLM2's tokenizer), against HF
    ``hidden_states[l]`` of each prompt run alone, unpadded. A cached collection without residuals is
    collected again when they are asked for; one with them serves later requests, sliced or not."""
    from hf_models import save_tiny_chat
    from cna_jax.lm import LM

    path, hf = save_tiny_chat(tmp_path / "model", "llama")
    lm = LM.load(path)
    prompts = ["How do I bake bread?", "Hi", "Explain how a refrigerator keeps food cold, step by step.",
               "Name a colour.", "Write a poem about the sea."]
    cache = str(tmp_path / "cache")
    plain = collect(lm, prompts, nodes="all", batch_size=2, cache_dir=cache, progress=False)
    assert plain.residuals is None and plain.meta["shared_prefix_tokens"] > 0
    # The all-neuron file lacks residuals: a real pass, not a slice of it.
    sub = collect(lm, prompts, nodes=np.array([[1, 5]]), batch_size=2, cache_dir=cache, progress=False,
                  residuals=True)
    assert "sliced_from" not in sub.meta
    L, E = lm.cfg.num_hidden_layers, lm.cfg.hidden_size
    with torch.no_grad():
        ref = np.stack([torch.stack(hf(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states)
                        [:L, 0, -1].numpy() for x in lm.encode(prompts)])  # [P, L, E]
    assert sub.residuals.shape == (5, L, E) and list(sub.row_prompt) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(sub.residuals, ref, atol=1e-5, rtol=1e-5)  # O(1) entries, 2 layers of rounding
    np.testing.assert_allclose(sub.node_acts, plain.node_acts[:, [1 * lm.cfg.intermediate_size + 5]], atol=1e-5)
    # Asked with residuals, the all-neuron collection runs again and its file keeps them ...
    full = collect(lm, prompts, nodes="all", batch_size=2, cache_dir=cache, progress=False, residuals=True)
    np.testing.assert_allclose(full.residuals, ref, atol=1e-5, rtol=1e-5)
    # ... so a slice carries them, and a request without residuals is served from the same file.
    sliced = collect(lm, prompts, nodes=np.array([[0, 2]]), batch_size=2, cache_dir=cache, progress=False,
                     residuals=True)
    assert sliced.meta["sliced_from"] == full.meta["key"]
    np.testing.assert_array_equal(sliced.residuals, full.residuals)
    again = collect(lm, prompts, nodes="all", batch_size=2, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again.residuals, full.residuals)
    np.testing.assert_array_equal(again.node_acts, full.node_acts)
