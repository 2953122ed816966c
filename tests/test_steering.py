"""Directional ablation and activation addition against a PyTorch forward-hook implementation on the HF model.

The reference for a condition is the HF model with hooks written here, run on that condition's rows only:
* a forward pre-hook on every ``model.model.layers[l]`` edits the residual it receives: ``x - (x.r) r``
  (ablation, every layer) then ``x + alpha r`` (addition, at the chosen layers);
* forward hooks on ``self_attn`` (output[0]) and ``mlp`` (output) project r out of both block outputs;
* a ``down_proj`` forward pre-hook multiplies the neurons (the neuron-multiplier rows).
Ours runs every condition in ONE batch (each row carries its condition index): the full-sequence
forward for logits, and the continuous-batching engine for greedy tokens.

Tolerance: logits within 1e-4 absolute (tiny Qwen2: the float32 error against HF is ~3e-7), or, where the
unsteered model's own error against HF is larger, twice that error. Both sides compute in float32 with the
same weights and differ only in summation order; SmolLM2's residual stream carries entries of several
hundred (float32 spacing ~3e-5 there), and after 30 layers the *unsteered* model already differs from HF
by up to ~1.5e-4 on ~0.002% of logits (measured; test_models checks SmolLM2 by KL for that reason), so
1e-4 is not reachable there even without steering. Steering must add no error beyond that rounding; a
wrong sign, layer or missed hook moves logits by >> 1e-2 (asserted: every steered condition changes
logits by more than 1e-2 and changes some generations).

Residual means: SmolLM2 at atol 1e-4 + rtol 1e-5 (relative 1e-5 of entries up to several hundred is the
float32 rounding accumulated over 30 layers; measured max error / max |entry| per layer ~3e-7).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cna_jax import convert, damage, data, direction, engine
from cna_jax.batching import bucket, left_pad, split_shared_prefix
from cna_jax.lm import LM
from cna_jax.models.llama import Decoder, Intervention, causal_mask, padding_positions
from hf_models import save_tiny
from test_generate import PROMPTS


def _unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _hook(hf, cond):
    """Registers the hooks that implement ``cond`` (an engine.Condition) on ``hf``; returns the handles."""
    handles = []
    layers = hf.model.layers
    if cond.neuron_mult is not None:
        for l, m in enumerate(cond.neuron_mult):
            scale = torch.tensor(np.asarray(m, np.float32))
            handles.append(layers[l].mlp.down_proj.register_forward_pre_hook(
                lambda mod, args, scale=scale: (args[0] * scale,) + tuple(args[1:])))
    if cond.direction is None:
        return handles
    r = torch.tensor(_unit(cond.direction))

    def project_out(x):
        return x - (x @ r)[..., None] * r

    for l, layer in enumerate(layers):
        alpha = float(cond.add.get(l, 0.0))
        if cond.ablate or alpha:
            def pre(mod, args, alpha=alpha):
                x = args[0]
                if cond.ablate:
                    x = project_out(x)
                if alpha:
                    x = x + alpha * r
                return (x,) + tuple(args[1:])
            handles.append(layer.register_forward_pre_hook(pre))
        if cond.ablate:
            handles.append(layer.self_attn.register_forward_hook(
                lambda mod, args, out: (project_out(out[0]),) + tuple(out[1:])))
            handles.append(layer.mlp.register_forward_hook(lambda mod, args, out: project_out(out)))
    return handles


def _with_hooks(hf, cond, fn):
    handles = _hook(hf, cond)
    try:
        with torch.no_grad():
            return fn()
    finally:
        for h in handles:
            h.remove()


def _hf_logits(hf, cond, tokens, valid):
    """HF logits [B, T, V] of a left-padded batch under ``cond`` (positions as in generate)."""
    mask = torch.tensor(valid.astype(np.int64))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = _with_hooks(hf, cond, lambda: hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask,
                                           position_ids=pos))
    return out.logits.float().numpy()


def _hf_generate(hf, cond, ids, n, eos, pad):
    """HF greedy continuations (cut after the first EOS) of token lists under ``cond``."""
    tokens, valid = left_pad(ids, bucket(max(map(len, ids))), pad)
    out = _with_hooks(hf, cond, lambda: hf.generate(
        input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(valid.astype(np.int64)),
        max_new_tokens=n, do_sample=False, eos_token_id=list(eos), pad_token_id=pad))
    rows = []
    for r in out[:, tokens.shape[1]:].numpy().tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


@functools.partial(jax.jit, static_argnames=("cfg",))
def _our_logits(params, tokens, valid, table, cond, *, cfg):
    """Full-sequence logits [B, T, V] with a per-row condition; tokens, valid, cond: [B, T], [B, T], [B]."""
    out = Decoder(cfg).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                             intervention=Intervention(*table, cond))
    return out.logits


def _check(lm, hf, ids, conditions, *, n, eos, pad, slots):
    """Every prompt under every condition, all in one batch; logits and greedy tokens against HF.

    ids: full token lists of the prompts; conditions[0] must be no intervention. Logit tolerance: 1e-4,
    or twice the unsteered model's own float32 error against HF where that is larger (see the module
    docstring): steering must add no error beyond the rounding the model already has.
    Returns the HF generations per condition."""
    assert conditions[0].neuron_mult is None and conditions[0].direction is None
    cfg = lm.cfg
    table = engine.put_host_table(engine.stack_conditions(cfg, conditions))
    c_of_row = [c for c in range(len(conditions)) for _ in ids]
    # Conditions interleaved across rows (row i has condition i mod C), so no batch is one condition.
    order = sorted(range(len(c_of_row)), key=lambda i: (i % len(ids), c_of_row[i]))
    rows_ids = [ids[i % len(ids)] for i in order]
    rows_c = [c_of_row[i] for i in order]
    where = {(c, i % len(ids)): k for k, (i, c) in enumerate(zip(order, rows_c))}  # (condition, prompt) -> row
    tokens, valid = left_pad(rows_ids, bucket(max(map(len, ids))), pad)
    ours = np.asarray(_our_logits(lm.params, tokens, valid, table, jnp.asarray(rows_c, jnp.int32), cfg=cfg))
    ref_tokens, ref_valid = left_pad(ids, tokens.shape[1], pad)
    plain = _hf_logits(hf, engine.Condition(), ref_tokens, ref_valid)
    for c, cond in enumerate(conditions):
        ref = _hf_logits(hf, cond, ref_tokens, ref_valid)
        mine = ours[[where[(c, p)] for p in range(len(ids))]]  # this condition's rows, in prompt order
        err = np.abs(mine - ref)[ref_valid].max()
        if c == 0:
            floor = err
            assert floor <= 3e-4, floor  # the unsteered model itself
        print(f"condition {c}: max |logit error| {err:.2e}")
        assert err <= max(1e-4, 2 * floor), (c, err, floor)
        if cond.neuron_mult is not None or cond.direction is not None:
            assert np.abs(ref - plain)[ref_valid].max() > 1e-2, f"condition {c} hardly changes the logits"

    # Greedy tokens through the engine (shared prefix run once per condition) against HF generate.
    prefix, suffixes, q = split_shared_prefix(ids)
    assert q > 0  # the prefix path is exercised
    rows = [(list(suffixes[i % len(ids)]), c) for i, c in zip(order, rows_c)]
    # length_multiple=32: the suffixes (2-21 tokens) share one prefill length bucket, so SmolLM2's 30 unrolled
    # layers compile one prefill (several buckets: tests/test_engine.py on a tiny model).
    got = engine.run(lm, rows, conditions, max_new_tokens=n, slots=slots, chunk=4, eos_ids=eos, pad_id=pad,
                     prefix=None if prefix is None else np.asarray(prefix).tolist(), length_multiple=32)
    want = [_hf_generate(hf, cond, ids, n, eos, pad) for cond in conditions]
    for i, (c, out) in enumerate(zip(rows_c, got)):
        assert out == want[c][order[i] % len(ids)], (c, order[i] % len(ids))
    for c in range(1, len(conditions)):
        changed = sum(a != b for a, b in zip(want[c], want[0]))
        print(f"condition {c}: {changed}/{len(ids)} generations changed")
        assert changed, f"condition {c} does not change the generations"
    return want


def _random_mult(cfg, seed, n):
    rng = np.random.default_rng(seed)
    m = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    m[rng.integers(0, cfg.num_hidden_layers, n), rng.integers(0, cfg.intermediate_size, n)] = 0
    return m


def _hf_mean_residuals(hf, ids):
    """Mean over token lists of HF ``hidden_states[l]`` (the input of layer l) at the last token, for
    every layer, one unpadded sequence at a time. Returns [L + 1, E] float64."""
    with torch.no_grad():
        hs = [torch.stack(hf(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states)[:, 0, -1]
              for x in ids]
    return torch.stack(hs).double().mean(0).numpy()


def test_tiny_qwen2_steering_matches_hf_hooks(tmp_path):
    """5 conditions x 6 random prompts in one batch: none, neuron multiplier, ablation, addition, and
    ablation + addition of a second direction at two layers (one negative alpha)."""
    path, hf = save_tiny(tmp_path, "qwen2")
    hf.generation_config.eos_token_id = None
    cfg, params = convert.load(path)
    lm = LM(cfg, params, tokenizer=None, chat=False)
    rng = np.random.default_rng(5)
    head = rng.integers(3, cfg.vocab_size, 9).tolist()  # a shared header, as a chat template gives
    ids = [head + rng.integers(3, cfg.vocab_size, k).tolist() for k in (4, 11, 2, 7, 15, 5)]
    # Directions that matter: differences of mean residuals between two halves of random prompts.
    other = [rng.integers(3, cfg.vocab_size, 8).tolist() for _ in range(6)]
    r1, r2 = (_hf_mean_residuals(hf, ids) - _hf_mean_residuals(hf, other))[1:3]
    conditions = [engine.Condition(), engine.Condition(_random_mult(cfg, 0, 40)),
                  engine.Condition(direction=r1, ablate=True), engine.Condition(direction=r1, add={1: 3.0}),
                  engine.Condition(direction=r2, ablate=True, add={0: 2.0, 2: -2.0})]
    # An EOS id outside the vocabulary: every row runs all 12 steps, so every token is compared.
    _check(lm, hf, ids, conditions, n=12, eos=[cfg.vocab_size], pad=0, slots=8)


def test_smollm2_steering_matches_hf_hooks(smollm2_lm, smollm2_hf):
    """SmolLM2 with difference-of-means directions (8 harmful vs 8 harmless built-in prompts, from HF's
    own hidden states): 5 conditions x 6 prompts (3 harmful, 3 harmless) in one batch."""
    lm, hf = smollm2_lm, smollm2_hf
    harmful, harmless = data.builtin("harmful").prompts, data.builtin("harmless").prompts
    train_bad, train_ok = lm.encode(list(harmful[:8])), lm.encode(list(harmless[:8]))
    every = _hf_mean_residuals(hf, train_bad) - _hf_mean_residuals(hf, train_ok)
    diff = {l: every[l] for l in (12, 20)}
    norm = {l: float(np.linalg.norm(d)) for l, d in diff.items()}
    conditions = [engine.Condition(), engine.Condition(_random_mult(lm.cfg, 0, 900)),
                  engine.Condition(direction=diff[12], ablate=True),
                  engine.Condition(direction=diff[12], add={12: norm[12]}),  # move toward the harmful mean
                  engine.Condition(direction=diff[20], ablate=True, add={20: -norm[20], 25: 0.5 * norm[20]})]
    ids = lm.encode(list(harmful[8:11]) + PROMPTS[:3])
    n = 16
    want = _check(lm, hf, ids, conditions, n=n, eos=list(lm.eos_ids()), pad=lm.pad_id(), slots=8)
    lengths = [len(row) for rows in want for row in rows]  # = ours, compared token for token in _check
    assert min(lengths) < n == max(lengths)  # rows end at different steps (30 rows through 8 slots)


def test_smollm2_refusal_directions_match_hf_hidden_states(smollm2_lm, smollm2_hf):
    """residual_means / refusal_directions against HF ``hidden_states[l]`` (the input of layer l) at the
    last token, each prompt run alone (no padding) in HF; ours in left-padded batches of 3."""
    lm, hf = smollm2_lm, smollm2_hf
    bad = list(data.builtin("harmful").prompts[:4])
    ok = list(data.builtin("harmless").prompts[:5])
    means = direction.residual_means(lm, ok, batch_size=3)  # 2 batches, the second with a filler row
    L = lm.cfg.num_hidden_layers
    ok_ids, bad_ids = lm.encode(ok), lm.encode(bad)
    ref_ok, ref_bad = _hf_mean_residuals(hf, ok_ids)[:L], _hf_mean_residuals(hf, bad_ids)[:L]
    scale = np.abs(ref_ok).max(axis=1, keepdims=True)
    print("residual means: max |error| / max |ref| per layer", (np.abs(means - ref_ok) / scale).max())
    np.testing.assert_allclose(means, ref_ok, atol=1e-4, rtol=1e-5)
    diff, norms = direction.refusal_directions(lm, bad, ok, batch_size=3)
    np.testing.assert_allclose(diff, ref_bad - ref_ok, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(norms, np.linalg.norm(ref_bad - ref_ok, axis=1), rtol=1e-5)
    # Layer 0 reads the embedding of the last token, the chat template's same final token for every
    # prompt: no difference there; every later layer has one.
    assert diff.shape == (L, lm.cfg.hidden_size) and norms[0] == 0 and np.all(norms[1:] > 0)


def test_tiny_residual_means_match_hf_hidden_states(tmp_path):
    """Tiny Qwen2, 5 token lists in left-padded batches of 2 (the last with a filler row) against HF
    ``hidden_states[l]`` at the last token of each unpadded list. Residual entries are O(1) here, so
    float32 rounding through 3 layers is ~1e-6: atol 1e-5."""
    path, hf = save_tiny(tmp_path, "qwen2")
    cfg, params = convert.load(path)
    lm = LM(cfg, params, tokenizer=None, chat=False)
    rng = np.random.default_rng(7)
    ids = [rng.integers(3, cfg.vocab_size, k).tolist() for k in (6, 13, 3, 9, 20)]
    means = direction.residual_means(lm, None, batch_size=2, ids=ids, progress=True)  # the bar changes nothing
    ref = _hf_mean_residuals(hf, ids)[:cfg.num_hidden_layers]
    assert means.shape == (cfg.num_hidden_layers, cfg.hidden_size)
    np.testing.assert_allclose(means, ref, atol=1e-5, rtol=0)
    # On a (4, 1, 2) mesh the rows of a batch are split over the data axis (batches of 4, the second with
    # 3 filler rows; the fillers must not count).
    from cna_jax import sharding as S

    layout = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    _, sharded = convert.load(path, shardings=lambda c: layout.params(c))
    mesh_lm = LM(cfg, sharded, tokenizer=None, chat=False, layout=layout)
    np.testing.assert_allclose(direction.residual_means(mesh_lm, None, batch_size=2, ids=ids), ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_selection(tmp_path_factory):
    """A 5-layer tiny Llama, per-layer directions between two random prompt sets, 6 held-out lists."""
    path, _ = save_tiny(tmp_path_factory.mktemp("select"), "llama", num_hidden_layers=5)
    cfg, params = convert.load(path)
    lm = LM(cfg, params, tokenizer=None, chat=False)
    rng = np.random.default_rng(11)
    head = rng.integers(3, cfg.vocab_size, 8).tolist()
    a = [head + rng.integers(3, cfg.vocab_size, 6).tolist() for _ in range(6)]
    b = [head + rng.integers(3, cfg.vocab_size, 6).tolist() for _ in range(6)]
    dirs = direction.residual_means(lm, None, ids=a) - direction.residual_means(lm, None, ids=b)
    heldout = [head + rng.integers(3, cfg.vocab_size, k).tolist() for k in (3, 7, 5, 9, 4, 6)]
    return lm, dirs, heldout


def _select(lm, dirs, heldout, **kw):
    # Texts are the token ids written out; the "refusal" scorer flags a text holding an id ending in 7.
    return direction.select_direction_layer(lm, dirs, None, ids=heldout, decode=lambda t: " ".join(map(str, t)),
                                            detector=r"regex:\b\d*7\b", max_new_tokens=8, slots=8,
                                            eos_ids=[lm.cfg.vocab_size], pad_id=0, **kw)


def test_select_direction_layer_deterministic_and_in_range(tiny_selection):
    lm, dirs, heldout = tiny_selection
    assert direction.candidate_layers(30) == list(range(6, 25))  # SmolLM2: 20-80% of 30 layers
    assert direction.candidate_layers(5) == [1, 2, 3, 4]
    best, rates = _select(lm, dirs, heldout)
    assert sorted(rates) == [1, 2, 3, 4] and best in rates
    assert rates[best] == min(rates.values()) and all(0 <= r <= 1 for r in rates.values())
    assert _select(lm, dirs, heldout) == (best, rates)  # deterministic
    # One candidate: that layer, with the same rate as in the joint job (rows do not interact).
    only, one = _select(lm, dirs, heldout, layers=[3])
    assert only == 3 and one[3] == rates[3]


def test_select_direction_layer_stops_rows_once_flagged(tiny_selection, monkeypatch):
    """With stop_when_scored a row ends once its flag is settled: fewer tokens, the same rates and layer."""
    from cna_jax import engine
    lm, dirs, heldout = tiny_selection
    lengths, run = [], engine.run

    def counting_run(*a, **kw):
        out = run(*a, **kw)
        lengths.append(sum(map(len, out)))
        return out

    monkeypatch.setattr(engine, "run", counting_run)
    kw = dict(ids=heldout, decode=lambda t: " ".join(map(str, t)), detector="phrases:7", max_new_tokens=12,
              slots=8, eos_ids=[lm.cfg.vocab_size], pad_id=0)
    full = direction.select_direction_layer(lm, dirs, None, stop_when_scored=False, **kw)
    early = direction.select_direction_layer(lm, dirs, None, progress=True, **kw)
    assert early == full and 0 < max(full[1].values())
    assert lengths[1] < lengths[0] == 4 * len(heldout) * 12  # no EOS here: every full row runs 12 tokens


def test_select_direction_layer_bad_input(tiny_selection):
    lm, dirs, heldout = tiny_selection
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        _select(lm, dirs, heldout, layers=[2, 5])
    with pytest.raises(ValueError, match="out of range"):
        _select(lm, dirs, heldout, layers=[-1])
    with pytest.raises(ValueError, match="directions has shape"):
        _select(lm, dirs[:3], heldout)
    with pytest.raises(ValueError, match="zero or not finite"):
        _select(lm, np.zeros_like(dirs), heldout)
    with pytest.raises(ValueError, match="no candidate layers"):
        _select(lm, dirs, heldout, layers=[])
    with pytest.raises(ValueError, match="unknown behaviour scorer"):
        direction.select_direction_layer(lm, dirs, None, ids=heldout, decode=str, detector="nonsense")


def _hf_kl(hf, cond, ids, conts):
    """KL(p_none || p_cond) per prompt and position along the continuations, one unpadded sequence at a
    time through HF (hooks implement the condition). Returns a list of [n_p] float64 arrays."""
    out = []
    for p, c in zip(ids, conts):
        x = torch.tensor([list(p) + list(c)])
        sl = slice(len(p) - 1, len(p) - 1 + len(c))  # the positions predicting continuation tokens 0..n-1
        ref = _with_hooks(hf, engine.Condition(), lambda: hf(input_ids=x).logits[0, sl].double().log_softmax(-1))
        got = _with_hooks(hf, cond, lambda: hf(input_ids=x).logits[0, sl].double().log_softmax(-1))
        out.append((ref.exp() * (ref - got)).sum(-1).numpy())
    return out


@pytest.mark.parametrize("budget", [damage.RESIDUAL_BUDGET, 0])
def test_kl_from_first_changed_layer_matches_hf_hooks(tmp_path, budget):
    """kl_along runs each condition only from the kept residual at or below the first layer it changes (a
    20-layer model keeps every layer's input, or every 2nd one's when they do not fit the budget):
    conditions starting at layers 19, 13, 7 and 0 (neurons, activation addition, ablation) and the neutral
    one match HF hooks run on the whole model."""
    path, hf = save_tiny(tmp_path, "llama", num_hidden_layers=20)
    cfg, params = convert.load(path)
    assert damage.residual_grid(cfg.num_hidden_layers, 1, budget) == (1 if budget else 2)
    lm = LM(cfg, params, tokenizer=None, chat=False)
    rng = np.random.default_rng(3)
    ids = [rng.integers(3, cfg.vocab_size, k).tolist() for k in (6, 4, 8)]
    conts = [rng.integers(3, cfg.vocab_size, k).tolist() for k in (5, 7, 3)]  # teacher-forced: any tokens
    r = rng.normal(size=cfg.hidden_size)
    late = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    late[19, :40] = 40.0
    middle = late.copy()
    middle[7, ::3] = -5.0
    conditions = [engine.Condition(late), engine.Condition(direction=r, add={13: 4.0, 16: -3.0}),
                  engine.Condition(middle), engine.Condition(direction=r, ablate=True, add={13: 0.0}),
                  engine.Condition(direction=r)]
    assert [c.first_layer(20) for c in conditions] == [19, 13, 7, 0, 20]
    kl = damage.kl_along(lm, ids, conts, conditions, batch_size=2, residual_budget=budget)
    for c, cond in enumerate(conditions):
        want = _hf_kl(hf, cond, ids, conts)
        for p, w in enumerate(want):
            np.testing.assert_allclose(kl[c, p, :len(w)], w, rtol=1e-3, atol=2e-5)
        if c < 4:
            assert max(w.max() for w in want) > 5e-4, f"condition {c} hardly changes the distribution"
    assert np.all(kl[4][~np.isnan(kl[4])] == 0)  # a direction that is neither ablated nor added: no change


def test_tiny_qwen2_kl_damage_matches_hf_hooks(tmp_path):
    """KL_first / KL_seq (docs/METHOD.md §4) of a neuron multiplier, a directional ablation and an
    activation addition against HF forward hooks, along the unmodified model's greedy continuations of
    different lengths, in padded batches (2 of 3 prompts + a filler row)."""
    path, hf = save_tiny(tmp_path, "qwen2")
    cfg, params = convert.load(path)
    lm = LM(cfg, params, tokenizer=None, chat=False)
    rng = np.random.default_rng(7)
    ids = [rng.integers(3, cfg.vocab_size, k).tolist() for k in (5, 9, 3)]
    other = [rng.integers(3, cfg.vocab_size, 8).tolist() for _ in range(3)]
    r = (_hf_mean_residuals(hf, ids) - _hf_mean_residuals(hf, other))[2]
    conts = [c[:k] for c, k in zip(_hf_generate(hf, engine.Condition(), ids, 7, [cfg.vocab_size], 0), (7, 2, 5))]
    # A tiny random model's next-token distributions are nearly flat: amplify every neuron to move them.
    conditions = [engine.Condition(np.full((cfg.num_hidden_layers, cfg.intermediate_size), 30.0, np.float32)), engine.Condition(direction=r, ablate=True),
                  engine.Condition(direction=r, add={1: -2.0}), engine.Condition()]
    kl = damage.kl_along(lm, ids, conts, conditions, batch_size=2)
    assert kl.shape == (4, 3, 7)
    for c, cond in enumerate(conditions):
        want = _hf_kl(hf, cond, ids, conts)
        for p, w in enumerate(want):
            got = kl[c, p]
            assert np.isnan(got[len(w):]).all() and not np.isnan(got[:len(w)]).any()
            # The float32 logits differ from HF's by ~1e-5 (the model's own rounding); a KL is a sum of
            # p * (log p - log q) over the vocabulary, so its error is of that order, not relative.
            np.testing.assert_allclose(got[:len(w)], w, rtol=1e-3, atol=2e-5)
        print(f"condition {c}: max KL {max(w.max() for w in want):.2e}")
        if c < 3:
            assert max(w.max() for w in want) > 5e-4, f"condition {c} hardly changes the distribution"
    assert np.all(kl[3][~np.isnan(kl[3])] == 0)  # no intervention: the same logits, exactly
    s = damage.summarize_kl(kl)
    firsts = kl[:, :, 0].mean(1)
    seqs = np.array([np.mean([kl[c, p, :n].mean() for p, n in enumerate((7, 2, 5))]) for c in range(4)])
    np.testing.assert_allclose(s["kl_first"], firsts, rtol=1e-12)
    np.testing.assert_allclose(s["kl_seq"], seqs, rtol=1e-12)
    # Scoring only the first 3 positions equals the first 3 columns of the full run (other padding and
    # batch: logits differ in the last float32 bits, ~1e-6 relative, so the KLs by ~1e-6 absolute).
    short = damage.kl_along(lm, ids, conts, conditions[:1], max_positions=3, batch_size=3)
    np.testing.assert_allclose(short[0], kl[0, :, :3], rtol=1e-4, atol=2e-6)
    # Each condition runs against its own two-row table, so a call with fewer conditions reuses every
    # compiled program (one per batch shape) and gives the same values, exactly.
    programs = (damage.kl_fn, damage.residuals_fn)
    compiled = [f._cache_size() for f in programs]
    np.testing.assert_array_equal(damage.kl_along(lm, ids, conts, conditions[1:3], batch_size=2), kl[1:3])
    assert [f._cache_size() for f in programs] == compiled
    # A 40-token continuation: the batch of the two short rows (padded to 32 tokens) scores 32 positions,
    # the long row's batch all 40; every row still matches HF.
    long = [conts[0], _hf_generate(hf, engine.Condition(), ids[1:2], 40, [cfg.vocab_size], 0)[0], conts[2]]
    assert len(long[1]) == 40
    got = damage.kl_along(lm, ids, long, conditions[:1], batch_size=2)
    for p, w in enumerate(_hf_kl(hf, conditions[0], ids, long)):
        assert np.isnan(got[0, p, len(w):]).all()
        np.testing.assert_allclose(got[0, p, :len(w)], w, rtol=1e-3, atol=2e-5)
