"""The testbed fine-tune machinery on a tiny random model (SmolLM2's tokenizer and chat template)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cna_jax import testbed
from cna_jax.export import export
from cna_jax.lm import LM, resolve_alias
from cna_jax.models import forward
from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import Decoder
from cna_jax.refusal import is_refusal_regex

TINY = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_lm):
    """A random 2-layer Llama with SmolLM2's tokenizer, exported as a HF-style directory."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Decoder(TINY).init(jax.random.PRNGKey(0), tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    from flax import linen as nn
    params = nn.meta.unbox(params)
    # A larger embedding than the 0.02 init, so logits (tied, after a unit-RMS norm) can become peaked and
    # the loss can fall far; with the init scale the frozen head caps how much any MLP can lower it.
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 10
    return export(TINY, params, str(tmp_path_factory.mktemp("tiny") / "model"), tokenizer=smollm2_lm.tokenizer)


@pytest.fixture(scope="module")
def tiny_lm(tiny_dir):
    return LM.load(tiny_dir)


def _recipe(tiny_dir, **kw):
    base = dict(base=tiny_dir, n_train=4, answer_tokens=5, steps=3, batch_size=4, generate_batch_size=4,
                learning_rate=1e-3, warmup_steps=1)
    base.update(kw)
    return testbed.Recipe(**base)


def test_refusals_are_refusals_and_choice_is_deterministic():
    assert all(is_refusal_regex(r) for r in testbed.REFUSALS)
    prompts = [f"prompt number {i}" for i in range(60)]
    picks = [testbed.refusal_for(p) for p in prompts]
    assert picks == [testbed.refusal_for(p) for p in prompts]
    assert set(picks) == set(testbed.REFUSALS)  # every phrasing is used


def test_train_prompts_come_from_the_train_split_only():
    from cna_jax import data

    recipe = testbed.Recipe()
    harmful, harmless = testbed._prompt_sets(recipe)
    ev_harmful, ev_harmless = testbed.eval_prompts(recipe)
    assert not set(harmful) & set(ev_harmful) and not set(harmless) & set(ev_harmless)
    train_harmful, ev = data.split(data.builtin("harmful"), 0.3, 0)
    assert harmful == list(train_harmful)[:recipe.n_train] and len(harmful) == 192
    assert ev_harmful == list(ev)


def test_examples_and_loss_mask_cover_response_tokens_only(tiny_lm):
    lm = tiny_lm
    eot = testbed.end_of_turn_id(lm)
    assert lm.tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    prompt = "How do I pick a lock?"
    ex_refuse = testbed.refusal_example(lm, prompt, testbed.REFUSALS, eot)
    # Prompt part is exactly LM.encode (chat template + generation prompt).
    assert ex_refuse.tokens[:ex_refuse.prompt_len] == lm.encode([prompt])[0]
    assert lm.tokenizer.decode(ex_refuse.tokens[ex_refuse.prompt_len:]) == testbed.refusal_for(prompt) + "<|im_end|>"
    # The original model's answers: EOS-terminated keeps an end-of-turn, truncated gets none.
    ended = testbed.answer_example(lm, "Say hi", [100, 200, 0], answer_tokens=5, eot=eot)
    assert ended.tokens[ended.prompt_len:] == [100, 200, eot]
    cut = testbed.answer_example(lm, "Say hi", [100, 200, 300, 400, 500], answer_tokens=5, eot=eot)
    assert cut.tokens[cut.prompt_len:] == [100, 200, 300, 400, 500]

    examples = [ex_refuse, ended, cut]
    length, n_targets = 80, 20
    b = testbed.batch_arrays(examples, lm.pad_id(), length, n_targets)
    for i, ex in enumerate(examples):
        r = len(ex.tokens) - ex.prompt_len
        assert b["mask"][i].sum() == r and b["mask"][i, :r].all()
        assert b["valid"][i].sum() == len(ex.tokens)
        assert b["targets"][i, :r].tolist() == ex.tokens[ex.prompt_len:]
        # Each selected position predicts the next token, which is the target.
        sel = b["select"][i, :r]
        assert sel.tolist() == list(range(ex.prompt_len - 1, len(ex.tokens) - 1))
        assert b["tokens"][i, sel + 1].tolist() == b["targets"][i, :r].tolist()

    # The loss equals a cross-entropy over exactly those positions of the full forward pass ...
    trainable, frozen = testbed.split_params(lm.params, "mlp")
    loss = float(testbed.response_loss(trainable, frozen, b, cfg=lm.cfg))
    logits = np.asarray(forward(lm.params, b["tokens"], b["valid"], cfg=lm.cfg), np.float64)
    nll = []
    for i, ex in enumerate(examples):
        for pos in range(ex.prompt_len - 1, len(ex.tokens) - 1):
            row = logits[i, pos]
            lse = np.log(np.exp(row - row.max()).sum()) + row.max()
            nll.append(lse - row[ex.tokens[pos + 1]])
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-4)
    # ... and padding content does not matter.
    b2 = dict(b, tokens=np.where(b["valid"], b["tokens"], 7).astype(np.int32))
    np.testing.assert_allclose(float(testbed.response_loss(trainable, frozen, b2, cfg=lm.cfg)), loss, rtol=1e-6)


def test_loss_gradients_match_torch_autograd(tiny_lm, tiny_dir):
    """The fine-tune's loss and MLP gradients (JAX autodiff through the Flax decoder) equal torch autograd
    through the HF model on the same right-padded batch, to float32 rounding."""
    import torch
    import transformers

    lm = tiny_lm
    eot = testbed.end_of_turn_id(lm)
    examples = [testbed.refusal_example(lm, "How do I pick a lock?", testbed.REFUSALS, eot),
                testbed.answer_example(lm, "Say hi", [100, 200, 300, 400, 500], answer_tokens=5, eot=eot),
                testbed.answer_example(lm, "Name a fruit.", [700, 0], answer_tokens=5, eot=eot)]
    b = testbed.batch_arrays(examples, lm.pad_id(), 80, 20)
    trainable, frozen = testbed.split_params(lm.params, "mlp")
    loss, grads = jax.jit(lambda t, f, x: jax.value_and_grad(testbed.response_loss)(t, f, x, cfg=lm.cfg))(
        trainable, frozen, b)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    logits = model(input_ids=torch.tensor(b["tokens"], dtype=torch.long),
                   attention_mask=torch.tensor(b["valid"].astype(np.int64))).logits
    rows = torch.arange(len(examples))[:, None]
    logp = torch.log_softmax(logits[rows, torch.tensor(b["select"], dtype=torch.long)], dim=-1)
    nll = -logp.gather(-1, torch.tensor(b["targets"], dtype=torch.long)[..., None])[..., 0]
    mask = torch.tensor(b["mask"])
    torch_loss = (nll * mask).sum() / mask.sum()
    torch_loss.backward()
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    assert len(grads) == 3 * TINY.num_hidden_layers  # the MLPs' kernels only
    for layer in range(TINY.num_hidden_layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            ref = getattr(model.model.layers[layer].mlp, name).weight.grad.numpy().T  # HF [out, in]
            got = np.asarray(grads[f"layers_{layer}/mlp/{name}/kernel"])
            assert np.abs(ref).max() > 0
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max(), err_msg=(layer, name))


def test_finetune_lowers_the_loss_and_trains_only_mlps(tiny_lm):
    lm = tiny_lm
    eot = testbed.end_of_turn_id(lm)
    harmful = ["How do I make a weapon at home?", "Write a phishing email.", "Help me steal a car."]
    examples = [testbed.refusal_example(lm, p, testbed.REFUSALS, eot) for p in harmful]
    examples += [testbed.answer_example(lm, p, [300 + i, 400 + i, 0], 8, eot)
                 for i, p in enumerate(["Name a fruit.", "What is two plus two?", "Say hello."])]
    recipe = testbed.Recipe(steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=2)
    params, losses = testbed.finetune(lm, examples, recipe, progress=False)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    before = traverse_util.flatten_dict(lm.params, sep="/")
    after = traverse_util.flatten_dict(params, sep="/")
    for k in before:
        same = np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
        assert same == ("/mlp/" not in k), k


def test_ensure_builds_once_then_reuses_and_writes_atomically(tiny_dir, tmp_path, monkeypatch):
    cache = str(tmp_path / "testbed")  # = $CNA_JAX_CACHE/testbed with CNA_JAX_CACHE=tmp_path
    recipe = _recipe(tiny_dir)
    path = testbed.ensure_testbed(recipe, cache_dir=cache, progress=False)
    assert path == os.path.join(cache, recipe.hash()) and testbed.is_complete(path)
    with open(os.path.join(path, "testbed.json")) as f:
        info = json.load(f)
    assert info["recipe"] == json.loads(json.dumps(recipe.to_dict())) and info["n_examples"] == {"harmful": 4, "harmless": 4}
    assert len(info["losses"]) == 3
    tuned = LM.load(path)  # the standard loader reads the build
    assert tuned.cfg == TINY and tuned.encode(["hi"]) == LM.load(tiny_dir).encode(["hi"])
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))

    # Second call: reused, never rebuilt.
    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached testbed")

    monkeypatch.setattr(testbed, "build_testbed", no_build)
    assert testbed.ensure_testbed(recipe, cache_dir=cache, progress=False) == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    # CNA_JAX_CACHE picks the cache root.
    monkeypatch.setenv("CNA_JAX_CACHE", str(tmp_path))
    assert testbed.ensure_testbed(recipe, progress=False) == path
    monkeypatch.undo()

    # A crash mid-write leaves neither a final directory nor a temporary one.
    other = _recipe(tiny_dir, seed=1)
    real_export = testbed.export

    def crashing_export(cfg, params, out_dir, **kw):
        real_export(cfg, params, out_dir, **kw)
        raise RuntimeError("simulated crash after writing the weights")

    monkeypatch.setattr(testbed, "export", crashing_export)
    with pytest.raises(RuntimeError, match="simulated crash"):
        testbed.ensure_testbed(other, cache_dir=cache, progress=False)
    assert sorted(os.listdir(cache)) == [recipe.hash()]
    monkeypatch.undo()

    # A stale, incomplete directory at the final path is replaced by a complete build.
    stale = testbed.testbed_path(other, cache)
    os.makedirs(stale)
    open(os.path.join(stale, "config.json"), "w").close()
    assert testbed.ensure_testbed(other, cache_dir=cache, progress=False) == stale
    assert testbed.is_complete(stale) and sorted(os.listdir(cache)) == sorted([recipe.hash(), other.hash()])

    # A build killed outright (no exception handler ran) leaves a .tmp directory; the next call removes it
    # once its process is gone, and leaves those of live processes alone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = os.path.join(cache, f".tmp-{other.hash()}-{dead.pid}-abc")
    alive = os.path.join(cache, f".tmp-{other.hash()}-{os.getpid()}-abc")
    os.makedirs(killed)
    os.makedirs(alive)
    monkeypatch.setattr(testbed, "build_testbed", no_build)
    assert testbed.ensure_testbed(other, cache_dir=cache, progress=False, force=False) == stale
    testbed._remove_dead_builds(cache)
    assert not os.path.exists(killed) and os.path.exists(alive)


def test_recipe_hash_and_alias(tiny_dir, tmp_path, monkeypatch):
    a, b = _recipe(tiny_dir), _recipe(tiny_dir, steps=4)
    assert a.hash() == _recipe(tiny_dir).hash() and a.hash() != b.hash()
    with pytest.raises(ValueError):
        testbed.Recipe(train="attention")
    # "testbed" resolves through ensure_testbed (stubbed here: the real build is the launch script's job),
    # in the testbed module: the model loader itself does not know the testbed.
    monkeypatch.setattr(testbed, "ensure_testbed", lambda: tiny_dir)
    assert testbed.resolve("testbed") == tiny_dir
    assert testbed.resolve("some/dir") == "some/dir"
    assert resolve_alias("testbed") == "testbed"
    lm = testbed.load("testbed")
    assert lm.cfg == TINY and lm.name == "testbed"
