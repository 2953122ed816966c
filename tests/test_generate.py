"""Greedy generation (the engine, through ``generate`` or ``engine.run``) vs HF ``generate(do_sample=False)``:
identical tokens, with and without masks."""
import numpy as np
import pytest
import torch

from cna_jax import convert, engine
from cna_jax.generate import generate
from cna_jax.batching import bucket, left_pad
from cna_jax.lm import LM
from cna_jax.neurons import multiplier
from hf_models import save_tiny, save_tiny_chat

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "Explain photosynthesis in two sentences.",
    "List three tips for staying focused while studying for long hours at home.",
    "Translate 'good morning' into Spanish.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one paragraph, focusing on the main conflict.",
    "What are prime numbers?",
    "Suggest a name for a grey cat.",
    "How do vaccines train the immune system to recognise a virus it has never met before?",
    "Write a limerick about a programmer.",
    "What is 17 times 23?",
    "Describe the water cycle.",
    "Tell me a fun fact about octopuses.",
    "How can I improve my sleep?",
    "Write one sentence about the ocean.",
]


def _hf_generate(hf, tokens, valid, eos, pad, n):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(valid.astype(np.int64)), max_new_tokens=n,
                          do_sample=False, eos_token_id=list(eos), pad_token_id=pad)
    return out[:, tokens.shape[1]:].numpy()


def _compare(rows, ref, eos):
    """Our rows (new tokens up to and including the EOS) against HF's [B, N] continuations."""
    assert len(rows) == ref.shape[0]
    for row, ours in enumerate(rows):
        r = ref[row].tolist()
        # HF stops at the first EOS (and pads afterwards).
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        assert list(ours) == r[:cut], f"row {row}"


def _run(cfg, params, seqs, mult, eos, n):
    """The engine on raw parameters (no tokenizer): one condition, a slot per row."""
    lm = LM(cfg, params, tokenizer=None, chat=False)
    return engine.run(lm, [(s, 0) for s in seqs], [engine.Condition(neuron_mult=mult)], max_new_tokens=n,
                      slots=len(seqs), eos_ids=list(eos), pad_id=0)


def _smollm2_batch(lm, prompts):
    ids = lm.encode(prompts)
    return left_pad(ids, bucket(max(map(len, ids))), lm.pad_id())


# Both SmolLM2 tests generate with these settings (8 slots, 32 new tokens): the engine's compiled calls
# (30 unrolled layers, ~20 s to compile) are shared between them.
SMOLLM2_KW = dict(max_new_tokens=32, batch_size=8, progress=False)


def test_smollm2_greedy_matches_hf_generate(smollm2_lm, smollm2_hf):
    """17 prompts of mixed length (35-49 tokens) through 8 slots, against one left-padded HF batch, fp32."""
    lm = smollm2_lm
    tokens, valid = _smollm2_batch(lm, PROMPTS)
    assert len(set(valid.sum(1))) > 5  # really mixed lengths
    eos = lm.eos_ids()
    # Full prompts, as HF reads them (the shared-prefix path against HF: tests/test_steering.py).
    out = generate(lm, PROMPTS, share_prefix=False, **SMOLLM2_KW)
    ref = _hf_generate(smollm2_hf, tokens, valid, eos, lm.pad_id(), SMOLLM2_KW["max_new_tokens"])
    _compare(out.tokens, ref, eos)
    assert len({len(t) for t in out.tokens}) >= 3  # rows end at different steps and give their slots on


def test_smollm2_masked_greedy_matches_hf_with_zeroed_columns(smollm2_lm, smollm2_hf):
    lm = smollm2_lm
    rng = np.random.default_rng(0)
    # A sizeable ablation (2% of neurons in layers 2..) so generations really change.
    layers = rng.integers(2, lm.cfg.num_hidden_layers, 900)
    idx = rng.integers(0, lm.cfg.intermediate_size, 900)
    pairs = sorted(set(zip(layers.tolist(), idx.tolist())))
    mult = multiplier(lm.cfg.num_hidden_layers, lm.cfg.intermediate_size, pairs, 0.0)
    prompts = PROMPTS[:8]
    tokens, valid = _smollm2_batch(lm, prompts)
    eos = np.asarray(lm.eos_ids())
    plain = generate(lm, prompts, None, share_prefix=False, **SMOLLM2_KW).tokens
    out = generate(lm, prompts, mult, share_prefix=False, **SMOLLM2_KW).tokens
    assert plain != out
    import copy
    hf = copy.deepcopy(smollm2_hf)
    with torch.no_grad():
        for layer, i in pairs:
            hf.model.layers[layer].mlp.down_proj.weight[:, i] = 0.0
    ref = _hf_generate(hf, tokens, valid, tuple(eos.tolist()), lm.pad_id(), SMOLLM2_KW["max_new_tokens"])
    _compare(out, ref, tuple(eos.tolist()))
    # The shared-prefix path (the chat header once per condition, under that condition's intervention) on
    # SmolLM2 against HF: tests/test_steering.py, with neuron multipliers and steering in one job.


@pytest.mark.parametrize("masked", [False, True])
def test_tiny_qwen2_greedy_matches_hf(tmp_path, masked):
    path, hf = save_tiny(tmp_path, "qwen2", tie_word_embeddings=True)
    cfg, params = convert.load(path)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 19, 12, 30, 7)]
    tokens, valid = left_pad(seqs, 32, 0)
    eos = (1, 2)
    mult = None
    if masked:
        pairs = [(0, 4), (1, 9), (2, 40), (2, 41)]
        mult = multiplier(cfg.num_hidden_layers, cfg.intermediate_size, pairs)
        with torch.no_grad():
            for layer, i in pairs:
                hf.model.layers[layer].mlp.down_proj.weight[:, i] = 0.0
    _compare(_run(cfg, params, seqs, mult, eos, 40), _hf_generate(hf, tokens, valid, eos, 0, 40), eos)


def test_generate_stops_at_eos_and_keeps_order(tmp_path):
    path, hf = save_tiny(tmp_path, "llama")
    cfg, params = convert.load(path)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (6, 9)]
    free = _run(cfg, params, seqs, None, [0], 12)
    assert len(free[0]) >= 3
    # Declare the 3rd token of row 0 an EOS: each row must stop at its first occurrence (counted).
    stop = free[0][2]
    out = _run(cfg, params, seqs, None, [stop], 12)
    for got, row in zip(out, free):
        assert got == (row[:row.index(stop) + 1] if stop in row else row)


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template: the public API's bookkeeping (chat
    formatting, shared prefix, sorting, slots, order restored) at a fraction of SmolLM2's compile time."""
    path, _ = save_tiny_chat(tmp_path_factory.mktemp("chat"))
    return LM.load(path)


def test_generate_api_batches_sorted_and_restored(tiny_chat_lm):
    lm = tiny_chat_lm
    prompts = PROMPTS[:5]
    g = generate(lm, prompts, max_new_tokens=12, batch_size=2, progress=False)
    single = [generate(lm, [p], max_new_tokens=12, batch_size=1, progress=False).tokens[0] for p in prompts]
    assert g.prompts == prompts and g.texts == [lm.decode(t) for t in g.tokens]
    assert g.tokens == single and len(set(map(tuple, single))) == 5  # each row back in its place
    with pytest.raises(ValueError, match="no prompts"):
        generate(lm, [], progress=False)
    with pytest.raises(ValueError, match="neuron_mult"):
        generate(lm, prompts, neuron_mult=np.ones((2, 2)), progress=False)


def test_bucket_and_left_pad():
    assert bucket(1) == 32 and bucket(33) == 64 and bucket(256) == 256 and bucket(257) == 512
    tokens, valid = left_pad([[5, 6], [7]], 4, 0, batch=3)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 0, 0, 7], [0, 0, 5, 6]])
    assert valid.sum() == 5
    with pytest.raises(ValueError):
        left_pad([[1, 2, 3]], 2, 0)
