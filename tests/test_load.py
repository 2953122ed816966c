"""Model loading: the GGUF tokenizer without torch, and the converted-copy cache (``LM.load(cache_dir=)``).

References: transformers' own GGUF tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``,
which needs torch) for the tokenizer, HF PyTorch models for logits and greedy tokens.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from cna_jax import checkpoint, convert, data
from cna_jax import sharding as S
from cna_jax.lm import LM, load_tokenizer, smollm2_gguf_path
from cna_jax.models import forward
from hf_models import hf_logits, left_padded_batch, save_tiny, save_tiny_chat


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------------
# The GGUF tokenizer without torch

PROMPTS = (list(data.builtin("harmful")[:16]) + list(data.builtin("harmless")[:16]) + [
    "", " ", "Hi", "  leading and trailing spaces  ", "tabs\tand\nnew\n\nlines", "naïve café, 東京, 🤖🚀",
    "<|im_start|>user\nan injected turn<|im_end|>", "numbers 1234567 3.14159 -42", "x" * 300,
    "Mixed CASE and punctuation!?... (brackets) [x] {y} 'quotes' \"dq\"",
])


@pytest.fixture(scope="module")
def tokenizers_pair():
    path = smollm2_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_tokenizer("smollm2"), ref


def test_gguf_tokenizer_equals_transformers(tokenizers_pair):
    ours, ref = tokenizers_pair
    assert len(PROMPTS) >= 40
    # LM.format and LM.encode only use the tokenizer (and chat), so two LMs without params compare them.
    lm_ours, lm_ref = LM(None, {}, ours), LM(None, {}, ref)
    for p in PROMPTS:
        assert lm_ours.format(p) == lm_ref.format(p)
        assert lm_ours.encode([p]) == lm_ref.encode([p])
        assert ours(p)["input_ids"] == ref(p)["input_ids"]  # raw text too (the base-model path)
    ids = ref(PROMPTS[37] + PROMPTS[38], add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids) and ours.decode(ids, skip_special_tokens=True) == ref.decode(
        ids, skip_special_tokens=True)
    assert ours.chat_template == ref.chat_template
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.pad_token_id,
                                                                         ref.bos_token_id) == (2, 2, 1)
    assert ours.get_vocab() == ref.get_vocab() and ours.all_special_ids == ref.all_special_ids
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()  # the whole fast tokenizer


_NO_TORCH = r"""
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as in an environment without it
import numpy as np
from cna_jax.lm import LM
from cna_jax.models import forward
lm = LM.load("smollm2")
ids = lm.encode(["Hi"])[0]
logits = forward(lm.params, np.asarray([ids], np.int32), np.ones((1, len(ids)), bool), cfg=lm.cfg)
assert sys.modules["torch"] is None  # nothing imported it behind the shim's back
print("IDS=" + json.dumps([int(t) for t in ids]) + " NEXT=" + str(int(np.argmax(logits[0, -1]))))
"""


def test_offline_default_runs_without_torch(smollm2_hf, tokenizers_pair):
    """LM.load("smollm2"), its chat formatting and a forward pass in a process where torch cannot be
    imported (the generation code above the forward pass imports nothing more); the prompt's ids and the
    greedy next token are HF's (transformers' own GGUF tokenizer and model)."""
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("IDS=")][0]
    ids = json.loads(line[len("IDS="):line.index(" NEXT=")])
    nxt = int(line[line.index(" NEXT=") + len(" NEXT="):])
    assert ids == LM(None, {}, tokenizers_pair[1]).encode(["Hi"])[0]
    with torch.no_grad():
        want = int(smollm2_hf(torch.tensor([ids])).logits[0, -1].argmax())
    assert nxt == want


# ---------------------------------------------------------------------------------------------------
# The converted-copy cache

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (8 heads, 4 KV heads; safetensors in 3 shards) with SmolLM2's tokenizer."""
    path, model = save_tiny_chat(tmp_path_factory.mktemp("src"), "llama", vocab_size=320, num_attention_heads=8,
                                 num_key_value_heads=4, max_shard_size="60KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return path, model


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _logits(lm, hf_model=None):
    tokens, valid = left_padded_batch(np.random.default_rng(0), lm.cfg.vocab_size, [5, 9, 3, 9], 9)
    if lm.layout is not None:
        out = S.sharded_forward(lm.cfg, lm.layout)(lm.params, tokens, valid, None)
    else:
        out = forward(lm.params, tokens, valid, None, cfg=lm.cfg)
    return np.asarray(out), (None if hf_model is None else hf_logits(hf_model, tokens, valid))


def test_warm_load_equals_cold_and_hf(tiny, tmp_path):
    src, model = tiny
    cache = str(tmp_path / "cache")
    plain = LM.load(src)
    cold = LM.load(src, cache_dir=cache)
    entry, cached = checkpoint.cache_lookup(cache, src, jnp.float32)
    assert cached and os.path.isdir(os.path.join(entry, "params"))
    warm = LM.load(src, cache_dir=cache)
    assert warm.cfg == cold.cfg == plain.cfg
    _leaves_equal(cold.params, plain.params)
    _leaves_equal(warm.params, cold.params)
    ours_cold, ref = _logits(cold, model)
    ours_warm, _ = _logits(warm)
    np.testing.assert_array_equal(ours_warm, ours_cold)
    # fp32 at "highest" matmul precision: differences are summation-order rounding (see test_models).
    np.testing.assert_allclose(ours_warm, ref, atol=2e-5, rtol=1e-5)
    assert warm.encode(PROMPTS[:8]) == cold.encode(PROMPTS[:8]) and warm.eos_ids() == cold.eos_ids()
    assert warm.format("hi") == cold.format("hi") and warm.pad_id() == cold.pad_id()
    assert LM.load(src, chat=False, cache_dir=cache).format("hi") == "hi"  # chat is the caller's, not cached


def test_warm_load_never_opens_the_source(tiny, tmp_path, monkeypatch):
    src = _copy_tree(tiny[0], tmp_path / "model")
    cache = str(tmp_path / "cache")
    cold = LM.load(src, cache_dir=cache)
    entry, _ = checkpoint.cache_lookup(cache, src, jnp.float32)

    # Destroy every source file's contents while keeping its size and times (its identity), and make it
    # unreadable: a warm load that read any of them would fail or differ (chmod alone does not stop root).
    for name in os.listdir(src):
        f = os.path.join(src, name)
        st = os.stat(f)
        with open(f, "r+b") as fh:
            fh.write(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(f, 0)
    monkeypatch.setattr(convert, "open_checkpoint", lambda *a, **k: pytest.fail("the source was opened"))
    assert checkpoint.cache_lookup(cache, src, jnp.float32) == (entry, True)
    warm = LM.load(src, cache_dir=cache)
    _leaves_equal(warm.params, cold.params)
    assert warm.encode(["hi"]) == cold.encode(["hi"])

    # Moved away: the newest converted copy of that path still loads.
    os.rename(src, str(tmp_path / "elsewhere"))
    gone = LM.load(src, cache_dir=cache)
    _leaves_equal(gone.params, cold.params)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        LM.load(src)  # without the cache it is gone


def test_changed_source_or_dtype_misses(tiny, tmp_path):
    src = _copy_tree(tiny[0], tmp_path / "model")
    cache = str(tmp_path / "cache")
    first = LM.load(src, cache_dir=cache)
    entry, _ = checkpoint.cache_lookup(cache, src, jnp.float32)

    # Another dtype: its own entry, converted from the source (fp32 -> bf16 casts exactly alike).
    assert not checkpoint.cache_lookup(cache, src, jnp.bfloat16)[1]
    bf = LM.load(src, dtype=jnp.bfloat16, cache_dir=cache)
    assert checkpoint.cache_lookup(cache, src, jnp.bfloat16)[1]
    _leaves_equal(bf.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), first.params))

    # A changed source (new weights written in place): a miss, reconverted; the stale copy is removed.
    new_dir, new_model = save_tiny(tmp_path / "new", "llama", seed=1, num_attention_heads=8, num_key_value_heads=4,
                                   max_shard_size="60KB")
    for name in os.listdir(new_dir):
        os.replace(os.path.join(new_dir, name), os.path.join(src, name))
    entry2, cached = checkpoint.cache_lookup(cache, src, jnp.float32)
    assert not cached and entry2 != entry
    second = LM.load(src, cache_dir=cache)
    assert checkpoint.cache_lookup(cache, src, jnp.float32) == (entry2, True) and not os.path.exists(entry)
    ours, ref = _logits(LM.load(src, cache_dir=cache), new_model)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
    assert not np.array_equal(np.asarray(jax.tree.leaves(second.params)[0]),
                              np.asarray(jax.tree.leaves(first.params)[0]))


def test_sharded_warm_load_restores_into_layout(tiny, tmp_path):
    src, model = tiny
    cache = str(tmp_path / "cache")
    mesh = ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=4, rules="generation"))
    cold = LM.load(src, mesh_config=mesh, cache_dir=cache)
    warm = LM.load(src, mesh_config=mesh, cache_dir=cache)
    assert warm.layout is not None and dict(warm.layout.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    want = S.layout_from_config(warm.cfg, mesh).params(warm.cfg)
    for leaf, cold_leaf, sh in zip(jax.tree.leaves(warm.params), jax.tree.leaves(cold.params), jax.tree.leaves(want)):
        assert leaf.sharding == sh and cold_leaf.sharding == sh
    total = sum(x.nbytes for x in jax.tree.leaves(warm.params))
    assert max(S.per_device_bytes(warm.params).values()) < 0.5 * total  # no whole copy on a device
    _leaves_equal(warm.params, cold.params)
    ours, ref = _logits(warm, model)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
    # The same entry serves an unsharded load: it holds the whole arrays, not one mesh's pieces.
    single = LM.load(src, cache_dir=cache)
    assert single.layout is None
    _leaves_equal(single.params, LM.load(src).params)


def test_study_cache_dir_setting(tmp_path):
    """model.convert_cache: relative to the workdir by default ("converted"), "" = off, absolute as is."""
    from cna_jax.config import study_config

    c = study_config("x", "a", "b", {})
    assert c.model.convert_cache == "converted"
    work = str(tmp_path / "work")
    assert checkpoint.cache_dir_from_config(c.model.convert_cache, work) == os.path.join(work, "converted")
    assert checkpoint.cache_dir_from_config("", work) is None
    assert checkpoint.cache_dir_from_config(str(tmp_path / "shared"), work) == str(tmp_path / "shared")
    assert checkpoint.cache_dir_from_config("~/c", work) == os.path.expanduser("~/c")


def test_study_loads_through_the_cache(tiny, tmp_path):
    """Study.lm converts once into <workdir>/converted; a new Study on that workdir restores the copy."""
    from cna_jax.config import study_config
    from cna_jax.study import Study

    src, _ = tiny
    shape = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=512)
    c = study_config("tiny", src, src, shape, dtype="float32")
    c.mesh.devices = 1
    work = str(tmp_path / "work")
    first = Study(c, work, progress=False).lm("instruct")
    assert checkpoint.cache_lookup(os.path.join(work, "converted"), src, jnp.float32)[1]
    again = Study(c, work, progress=False).lm("instruct")
    _leaves_equal(again.params, first.params)
    c.model.convert_cache = ""
    Study(c, str(tmp_path / "off"), progress=False).lm("instruct")
    assert not os.path.exists(tmp_path / "off" / "converted")


def test_weights_and_tokenizer_of_a_gguf_file_share_one_reader(monkeypatch):
    """LM.load of a GGUF file reads its metadata once (one GGUFFile for the tokenizer and the weights)."""
    from cna_jax import convert

    made = []

    class Counting(convert.GGUFFile):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(convert, "GGUFFile", Counting)
    convert._gguf_reader.cache_clear()
    path = smollm2_gguf_path()
    tok = load_tokenizer(path)
    cfg, ckpt = convert.open_checkpoint(path)
    assert made == [os.path.abspath(path)]
    assert ckpt.shape("model.embed_tokens.weight") == (len(tok), cfg.hidden_size) == (49152, 576)
    convert._gguf_reader.cache_clear()  # later tests get readers of the real class


def _same_as_gguf_reader(path):
    """Every metadata value and tensor of GGUFFile equals the ``gguf`` package's GGUFReader's (which flattens
    nested arrays)."""
    import gguf

    from cna_jax.gguf_file import GGUFFile

    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]  # GGUF.*: the header
    for key, value in ours.metadata.items():
        want = ref.fields[key].contents()
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = [v for part in value for v in part]
        assert value == want and type(value) is type(want), key
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(d) for d in b.shape))
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)
    return ours


def test_gguf_file_reads_what_gguf_reader_reads(tmp_path):
    """SmolLM2's file (Q8_0, Q4_1 and F32 tensors, 49k tokens, 48k merges) and a written file with every value
    type, nested arrays and F16 / F32 / Q8_0 / BF16 tensors at an unusual alignment; a file that is not GGUF
    fails with its path."""
    import struct

    import gguf
    from gguf.quants import quantize

    from cna_jax.gguf_file import GGUFFile

    smol = _same_as_gguf_reader(smollm2_gguf_path())
    assert len(smol.metadata["tokenizer.ggml.tokens"]) == 49152
    path = str(tmp_path / "all.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for i, (kind, value) in enumerate([("uint8", 7), ("int8", -7), ("uint16", 700), ("int16", -700),
                                       ("uint32", 70000), ("int32", -70000), ("float32", 0.1), ("bool", True),
                                       ("uint64", 2 ** 40), ("int64", -(2 ** 40)), ("float64", 0.1),
                                       ("string", "héllo")]):
        getattr(w, f"add_{kind}")(f"test.{i}.{kind}", value)
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, -1.25])
    w.add_array("test.strings", ["a", "", "ünï"])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_array("test.empty", [])
    rng = np.random.default_rng(0)
    for name, kind in [("f32", None), ("f16", gguf.GGMLQuantizationType.F16),
                       ("q8", gguf.GGMLQuantizationType.Q8_0), ("bf16", gguf.GGMLQuantizationType.BF16)]:
        x = rng.normal(size=(3, 64)).astype(np.float32)
        if kind is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = _same_as_gguf_reader(path)
    assert ours.metadata["test.strings"] == ["a", "", "ünï"] and ours.metadata["test.nested"] == [[1, 2], [3]]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="bad.gguf: not a GGUF file"):
        GGUFFile(str(bad))
    raw = open(path, "rb").read()  # the tensor named "f16" renamed "f32" (same length): a duplicate name
    name = struct.pack("<Q", 3) + b"f16"  # the name as the header stores it: its length, then its bytes
    assert raw.count(name) == 1
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(raw.replace(name, struct.pack("<Q", 3) + b"f32"))
    with pytest.raises(ValueError, match="duplicate tensor 'f32'"):
        GGUFFile(str(dup))
    with pytest.raises(ValueError, match="f32"):  # as gguf.GGUFReader did
        gguf.GGUFReader(str(dup))
