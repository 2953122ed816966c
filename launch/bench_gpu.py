"""D1 / D2 / D4 of PERFORMANCE.md on one GPU: an 8B-shaped Llama (configs/pairs.py:llama_3_1_8b) with random bf16
weights, greedy decoding through the generation engine (:mod:`cna_jax.engine`: its jitted ``prefill`` /
``place`` / ``decode`` calls from ``single_device_functions``, and ``engine.run`` for whole jobs). D3 (the 70B memory
plan) is launch/plan.py.

Steady-state decode (D1, D2, D4): S slots, all filled by ``Functions.insert`` (prefill + place,
``prefill_rows(S, T)`` rows per call, as ``engine.run`` does) with random --prompt_len-token prompts; cache width
W = T + N (T = the prompt bucket, N = max new tokens = the ring); then ``decode`` calls of --chunk steps
are timed one by one (--calls of them, median per step). An EOS id that never occurs (-1) keeps every
slot busy; before a slot could reach N the slots are refilled (untimed), so every timed step is a full
batch. Bytes a step must read: every weight except the embedding table (one row per slot is gathered)
plus the whole KV cache (2 x L x S x K x D x W, bf16: attention reads all W columns, masked); achieved
bandwidth = those bytes / step time, against the HBM spec figure and the one measured here (a
device-to-device copy, bytes read + written).

D1: batch 1, 128-token prompt, N = 256: ms per decode step (prefill excluded), tok/s, fraction of the
    roofline (bytes / bandwidth).
D2: batch 256, 128 in / 256 out: throughput = 256 x 256 generated tokens / wall time of one
    ``engine.run`` job (prefill and host loop included; median of --repeats after a warm-up), against
    vLLM's published ~11k tok/s for Llama-3.1-8B on one H100; beside it the steady-state decode-only
    tok/s and the prefill time of the 256 rows.
D4: --d4_slots slots (32, the study's generation batch) mixing --d4_conditions conditions (row s has
    condition s mod 8; the slots' ``cond``): none, random neuron multipliers [L, I] each zeroing
    --d4_zero_frac of all neurons, and with --d4_steering one directional ablation
    (``Condition(direction=r, ablate=True)``) and one activation addition (``add={L // 2: 4}``), vs the
    same engine, slots, prompts and steps with one condition (none). Both decode states are timed in
    turn, call by call (same machine load on both); slowdown = mixed / single - 1 (bar <= 10%, moonshot
    <= 3%). Gate reported beside it: the condition-0 rows' greedy tokens in the mixed batch vs the
    same rows decoded alone in the mixed table's program (a one-condition table with the steering arrays;
    neutral table rows are bit-identical within one program); also reported, not a gate: the same
    comparison against the timed one-condition run, whose table has no steering arrays, another program
    that may round differently (and two compiled programs may pick different GEMM algorithms).
Parity: a tiny random Llama (tests/hf_models.py) in bf16 vs fp32 on the same device: relative logit
    error (``models.forward``) and greedy-token agreement through ``engine.run`` (32 new tokens).

Timings: ``block_until_ready``; first calls (compile) reported apart.

    python launch/bench_gpu.py --out=/tmp/bench.json
    python launch/bench_gpu.py --quick          # tiny shape, a few steps: validates the script (CPU too)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/pairs.py:llama_3_1_8b", "model config string (its shape is used)")
flags.DEFINE_integer("repeats", 5, "timed runs per whole-job / prefill measurement (median)")
flags.DEFINE_integer("calls", 20, "timed decode calls (of --chunk steps) per steady-state measurement (median)")
flags.DEFINE_integer("chunk", 8, "decode steps per engine call (engine.run's default)")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens")
flags.DEFINE_integer("d1_new", 256, "new tokens for D1 (the ring width N)")
flags.DEFINE_integer("d2_batch", 256, "batch for D2")
flags.DEFINE_integer("d2_new", 256, "new tokens for D2")
flags.DEFINE_integer("d4_slots", 32, "slots for D4")
flags.DEFINE_integer("d4_new", 256, "ring width N (max new tokens) for D4")
flags.DEFINE_integer("d4_conditions", 8, "conditions mixed in D4's batch")
flags.DEFINE_float("d4_zero_frac", 0.001, "fraction of all L x I neurons each D4 multiplier zeroes")
flags.DEFINE_bool("d4_steering", True, "D4: one of the conditions is a directional ablation, one an addition")
flags.DEFINE_float("spec_bandwidth", 0.0, "HBM bandwidth (bytes/s) to state; 0 = from the device name")
flags.DEFINE_string("out", "", "write the results as JSON here")
flags.DEFINE_bool("parity", True, "run the tiny-model bf16 vs fp32 parity check")
flags.DEFINE_bool("d1", True, "run D1")
flags.DEFINE_bool("d2", True, "run D2")
flags.DEFINE_bool("d4", True, "run D4")
flags.DEFINE_bool("quick", False, "validate the script: a tiny Llama shape, 16-token prompts, 16 new tokens, "
                  "batches of 8, 3 calls of 4 steps, 2 repeats, a 4 MiB bandwidth copy")

SPEC_BW = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
           "H200": 4.8e12}
VLLM_D2 = 11_000.0
LENGTH_MULTIPLE = 16  # engine.run's default: prompts of T tokens are padded to bucket(T, 16)
# --quick: a tiny Llama (HF config numbers)
TINY_SHAPE = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-05, rope_theta=10000.0,
                  rope_scaling=None, tie_word_embeddings=False, max_position_embeddings=2048)


def _spec_bandwidth(kind: str) -> tuple[float, str]:
    if FLAGS.spec_bandwidth:
        return FLAGS.spec_bandwidth, "given"
    for key, bw in SPEC_BW.items():
        if key.lower() in kind.lower():
            return bw, f"spec for {key}"
    if "h100" in kind.lower():
        return 3.35e12, "spec for H100 SXM (assumed)"
    return float("nan"), "unknown"


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def measure_bandwidth(jax, jnp, repeats, n=1 << 30):
    """Device-to-device copy of n float32 (default 4 GiB; bytes read + written) / time."""
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda a: a * 1.0000001)
    copy(x).block_until_ready()
    med, _ = _median_time(lambda a=x: copy(a).block_until_ready(), max(repeats, 10))
    del x
    return 2 * n * 4 / med


def random_params(jax, jnp, cfg, dtype):
    from cna_jax.models import abstract_params

    shapes = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, dtype))
    leaves = []
    key = jax.random.PRNGKey(0)
    for i, (path, s) in enumerate(shapes[0]):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            leaves.append(jnp.ones(s.shape, s.dtype))
        else:
            fill = jax.jit(lambda k, shape=s.shape, dt=s.dtype: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt))
            leaves.append(fill(jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(shapes[1], leaves)


def prompt_bucket(prompt_len: int) -> int:
    from cna_jax.batching import bucket

    return bucket(prompt_len, LENGTH_MULTIPLE)


def random_prompts(np, cfg, batch, prompt_len, seed=0):
    """[batch, T] left-padded random prompts of prompt_len tokens (T = its bucket) and their mask."""
    from cna_jax.batching import left_pad

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    return left_pad(ids, prompt_bucket(prompt_len), 0)


def step_bytes(cfg, weight_bytes, slots, width):
    """Bytes one decode step reads: weights less the embedding table, one embedding row per slot, the
    whole KV cache (bf16 keys and values, every column)."""
    embed = cfg.vocab_size * cfg.hidden_size * 2
    kv = 2 * cfg.num_hidden_layers * slots * cfg.num_key_value_heads * cfg.head_dim * width * 2
    return weight_bytes - embed + slots * cfg.hidden_size * 2 + kv


class SteadyDecode:
    """S slots decoding in steady state through the engine's jitted calls (see the module docstring)."""

    def __init__(self, jax, np, cfg, params, dtype, tokens, valid, cond, conditions, new, chunk, fills=0,
                 steering=None):
        from cna_jax import engine

        self.jax, self.np, self.params, self.new, self.chunk = jax, np, params, new, chunk
        s, t = tokens.shape
        self.fns = engine.single_device_functions(cfg, dtype, s, t + new, new, chunk)
        self.table = self.fns.put_table(engine.stack_conditions(cfg, conditions, steering=steering))
        self.eos = jax.numpy.asarray([-1], jax.numpy.int32)  # never occurs
        cap = engine.prefill_rows(s, t)
        self.batches = []  # the insert calls that fill every slot, filler rows (copies of row i) dropped
        for i in range(0, s, cap):
            take = min(cap, s - i)
            pick = np.r_[np.arange(i, i + take), np.full(cap - take, i)]
            slot_idx = np.r_[np.arange(i, i + take), np.full(cap - take, s)].astype(np.int32)
            self.batches.append((tokens[pick], valid[pick], np.asarray(cond, np.int32)[pick], slot_idx))
        t0 = time.perf_counter()
        self.state = self._fill(self.fns.empty())
        self.first_fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self.fns.decode(params, self.state, self.table, self.eos))
        self.first_decode_s = time.perf_counter() - t0
        self.fill_s = []
        for _ in range(fills):
            t0 = time.perf_counter()
            self.state = self._fill(self.state)
            self.fill_s.append(time.perf_counter() - t0)
        self.step_s = []

    def _fill(self, state):
        for rows in self.batches:
            state = self.fns.insert(self.params, state, None, *rows, self.table, self.eos)
        return self.jax.block_until_ready(state)

    def timed_chunk(self) -> float:
        """Seconds per step of one decode call (refilling first, untimed, when a slot could end)."""
        if int(self.np.asarray(self.state.step).max()) + self.chunk >= self.new:
            self.state = self._fill(self.state)
        t0 = time.perf_counter()
        self.state = self.jax.block_until_ready(self.fns.decode(self.params, self.state, self.table, self.eos))
        dt = (time.perf_counter() - t0) / self.chunk
        self.step_s.append(dt)
        done = self.np.asarray(self.state.done)
        assert not done.any(), "a slot ended during a timed call"
        return dt

    def summary(self, cfg, weight_bytes, spec_bw, meas_bw) -> dict:
        s, w = self.state.kv_valid.shape
        step = statistics.median(self.step_s)
        nbytes = step_bytes(cfg, weight_bytes, s, w)
        return dict(slots=s, cache_width=w, chunk=self.chunk, step_s=step, step_ms=step * 1e3,
                    tokens_per_s=s / step, step_bytes=nbytes, achieved_GBps=nbytes / step / 1e9,
                    roofline_s_measured_bw=nbytes / meas_bw, roofline_s_spec_bw=nbytes / spec_bw,
                    fraction_of_roofline_measured_bw=(nbytes / meas_bw) / step,
                    fraction_of_roofline_spec_bw=(nbytes / spec_bw) / step,
                    fill_s=statistics.median(self.fill_s) if self.fill_s else None, fill_runs_s=self.fill_s,
                    compile_plus_first_s=dict(insert=self.first_fill_s, decode=self.first_decode_s),
                    runs_s=self.step_s)


def d4_conditions(np, cfg, n, zero_frac, steering):
    """none + random neuron multipliers (+ one directional ablation and one activation addition)."""
    from cna_jax import engine
    from cna_jax.neurons import multiplier

    L, I, E = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    rng = np.random.default_rng(0)
    k = max(1, round(zero_frac * L * I))
    conds, names = [engine.Condition()], ["none"]
    steer = 2 if steering and n >= 3 else 0
    for i in range(n - 1 - steer):
        flat = rng.choice(L * I, k, replace=False)
        conds.append(engine.Condition(neuron_mult=multiplier(L, I, np.stack(np.divmod(flat, I), 1), 0.0)))
        names.append(f"mult-{i}")
    if steer:
        r = rng.standard_normal(E).astype(np.float32)
        conds += [engine.Condition(direction=r, ablate=True), engine.Condition(direction=r, add={L // 2: 4.0})]
        names += ["ablate", f"add-L{L // 2}"]
    return conds, names, k


def parity(jax, jnp, np):
    """Tiny random Llama: bf16 vs fp32 logits and greedy tokens (through the engine) on this device."""
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from hf_models import left_padded_batch, save_tiny

    from cna_jax import convert, engine
    from cna_jax.lm import LM
    from cna_jax.models import forward

    d = tempfile.mkdtemp()
    path, _ = save_tiny(d, "llama", num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                        num_attention_heads=8, num_key_value_heads=4)
    cfg, p32 = convert.load(path, dtype=jnp.float32)
    _, p16 = convert.load(path, dtype=jnp.bfloat16)
    tokens, valid = left_padded_batch(np.random.default_rng(0), cfg.vocab_size, [7, 30, 64, 12, 50, 64, 3, 41], 64)
    with jax.default_matmul_precision("highest"):
        l32 = np.asarray(forward(p32, tokens, valid, None, cfg=cfg, dtype=jnp.float32))
    l16 = np.asarray(forward(p16, tokens, valid, None, cfg=cfg, dtype=jnp.bfloat16))
    m = valid[..., None]
    rel = float(np.linalg.norm((l16 - l32) * m) / np.linalg.norm(l32 * m))
    rows = [(tokens[i][valid[i]].tolist(), 0) for i in range(len(tokens))]

    def gen(params, dtype):
        lm = LM(cfg, params, tokenizer=None, chat=False, dtype=dtype)
        out = engine.run(lm, rows, [engine.Condition()], max_new_tokens=32, slots=len(rows), eos_ids=[-1], pad_id=0)
        return np.asarray(out)  # [B, 32]: the EOS never occurs

    with jax.default_matmul_precision("highest"):
        g32 = gen(p32, jnp.float32)
    g16 = gen(p16, jnp.bfloat16)
    top1 = float(np.mean((l16.argmax(-1) == l32.argmax(-1))[valid]))
    return dict(logits_rel_err=rel, top1_agreement=top1, greedy_token_agreement=float(np.mean(g16 == g32)),
                greedy_first_token_agreement=float(np.mean(g16[:, 0] == g32[:, 0])))


def _show(d):
    return json.dumps({k: v for k, v in d.items() if k != "runs_s"}, default=str)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cna_jax import engine
    from cna_jax.config import load_config_file
    from cna_jax.lm import LM
    from cna_jax.models.config import from_hf_dict

    F = FLAGS
    if F.quick:
        F.prompt_len, F.d1_new, F.d2_batch, F.d2_new, F.d4_slots, F.d4_new = 16, 16, 8, 16, 8, 16
        F.calls, F.chunk, F.repeats = 3, 4, 2
    dev = jax.devices()[0]
    kind = dev.device_kind
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # no nvidia-smi
        smi = f"n/a ({e})"
    res = dict(device=kind, nvidia_smi=smi, jax=jax.__version__, platform=dev.platform,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), quick=F.quick)
    print(json.dumps(res), flush=True)

    if F.parity:
        res["parity"] = parity(jax, jnp, np)
        print("parity", json.dumps(res["parity"]), flush=True)

    spec_bw, spec_src = _spec_bandwidth(kind + " " + smi)
    meas_bw = measure_bandwidth(jax, jnp, F.repeats, n=1 << 20 if F.quick else 1 << 30)
    res.update(spec_bandwidth=spec_bw, spec_bandwidth_source=spec_src, measured_bandwidth=meas_bw)
    print(f"HBM bandwidth: measured {meas_bw / 1e12:.2f} TB/s (copy, read+write); {spec_src} {spec_bw / 1e12:.2f} TB/s",
          flush=True)

    if F.quick:
        name, cfg = "tiny (--quick)", from_hf_dict(TINY_SHAPE)
    else:
        study = load_config_file(F.config)
        name, cfg = study.name, from_hf_dict(study.model.shape.to_dict())
    dtype = jnp.bfloat16
    params = random_params(jax, jnp, cfg, dtype)
    jax.block_until_ready(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    res.update(model=name, params=cfg.num_params(), weight_bytes=weight_bytes)
    p = F.prompt_len
    none = [engine.Condition()]

    if F.d1:
        n = F.d1_new
        tokens, valid = random_prompts(np, cfg, 1, p)
        dec = SteadyDecode(jax, np, cfg, params, dtype, tokens, valid, [0], none, n, F.chunk)
        for _ in range(F.calls):
            dec.timed_chunk()
        s = dec.summary(cfg, weight_bytes, spec_bw, meas_bw)
        res["D1"] = dict(batch=1, prompt=p, new_tokens=n, per_token_s=s["step_s"], **s,
                         weights_only_roofline_fraction_spec=(weight_bytes / spec_bw) / s["step_s"])
        print("D1", _show(res["D1"]), flush=True)

    if F.d2:
        b, n2 = F.d2_batch, F.d2_new
        tokens, valid = random_prompts(np, cfg, b, p)
        dec = SteadyDecode(jax, np, cfg, params, dtype, tokens, valid, np.zeros(b, np.int32), none, n2, F.chunk,
                           fills=F.repeats)
        for _ in range(F.calls):
            dec.timed_chunk()
        s = dec.summary(cfg, weight_bytes, spec_bw, meas_bw)
        del dec
        lm = LM(cfg, params, tokenizer=None, chat=False, dtype=dtype)
        rows = [(tokens[i][valid[i]].tolist(), 0) for i in range(b)]

        def job():
            out = engine.run(lm, rows, none, max_new_tokens=n2, slots=b, chunk=F.chunk, eos_ids=[-1], pad_id=0,
                             length_multiple=LENGTH_MULTIPLE)
            assert all(len(r) == n2 for r in out), "a row stopped early"

        t0 = time.perf_counter()
        job()
        first = time.perf_counter() - t0
        wall, walls = _median_time(job, F.repeats)
        tps = b * n2 / wall
        res["D2"] = dict(batch=b, prompt=p, new_tokens=n2, wall_s=wall, tokens_per_s=tps,
                         decode_only_tokens_per_s=s["tokens_per_s"], decode_step_ms=s["step_ms"],
                         decode_achieved_GBps=s["achieved_GBps"],
                         prefill_s=s["fill_s"],
                         vllm_tokens_per_s=VLLM_D2, ratio_vs_vllm=tps / VLLM_D2,
                         compile_plus_first_s=dict(s["compile_plus_first_s"], run=first),
                         runs_s=dict(run=walls, decode_step=s["runs_s"], prefill=s["fill_runs_s"]))
        print("D2", _show(res["D2"]), flush=True)

    if F.d4:
        sl, n4 = F.d4_slots, F.d4_new
        conds, names, k = d4_conditions(np, cfg, F.d4_conditions, F.d4_zero_frac, F.d4_steering)
        tokens, valid = random_prompts(np, cfg, sl, p, seed=1)
        cond = (np.arange(sl) % len(conds)).astype(np.int32)
        mixed = SteadyDecode(jax, np, cfg, params, dtype, tokens, valid, cond, conds, n4, F.chunk)
        single = SteadyDecode(jax, np, cfg, params, dtype, tokens, valid, np.zeros(sl, np.int32), none, n4, F.chunk)
        # The gate's twin: one condition again, in the mixed table's program (with its steering arrays when the
        # mix has a direction; a one-condition job without them compiles another program, which may round
        # differently). Decoded the same steps, not timed.
        twin = SteadyDecode(jax, np, cfg, params, dtype, tokens, valid, np.zeros(sl, np.int32), none, n4, F.chunk,
                            steering=F.d4_steering)
        for _ in range(F.calls):  # in turn: the same load on both
            mixed.timed_chunk()
            single.timed_chunk()
            twin.timed_chunk()
        sm = mixed.summary(cfg, weight_bytes, spec_bw, meas_bw)
        ss = single.summary(cfg, weight_bytes, spec_bw, meas_bw)
        # Gate: condition-0 rows, the same prompts and steps in both runs.
        zero = cond == 0
        om, ot, os_ = (np.asarray(d.state.out)[zero] for d in (mixed, twin, single))
        steps = np.asarray(mixed.state.step)[zero]
        assert all((steps == np.asarray(d.state.step)[zero]).all() for d in (twin, single))
        cols = np.arange(om.shape[1])[None, :] < steps[:, None]
        agree = float(np.mean((om == ot)[cols]))
        agree_single = float(np.mean((om == os_)[cols]))
        slow = sm["step_s"] / ss["step_s"] - 1
        res["D4"] = dict(slots=sl, prompt=p, ring=n4, chunk=F.chunk, conditions=names, neurons_zeroed_per_mult=k,
                         condition_table_bucket=engine.condition_bucket(len(conds)),
                         mixed_step_ms=sm["step_ms"], single_step_ms=ss["step_ms"], slowdown=slow,
                         bar_met=slow <= 0.10, moonshot_met=slow <= 0.03,
                         mixed_tokens_per_s=sm["tokens_per_s"], single_tokens_per_s=ss["tokens_per_s"],
                         achieved_GBps_mixed=sm["achieved_GBps"], achieved_GBps_single=ss["achieved_GBps"],
                         gate_none_rows_token_agreement=agree, single_program_token_agreement=agree_single,
                         compile_plus_first_s=dict(mixed=sm["compile_plus_first_s"],
                                                   single=ss["compile_plus_first_s"]),
                         runs_s=dict(mixed=sm["runs_s"], single=ss["runs_s"]))
        print("D4", _show(res["D4"]), flush=True)
        print(f"D4: {len(conds)} conditions mixed {sm['step_ms']:.2f} ms/step vs one condition "
              f"{ss['step_ms']:.2f} ms/step at {sl} slots: {slow:+.1%} (bar <= +10%: "
              f"{'met' if slow <= 0.10 else 'NOT met'}); none-rows token agreement {agree:.3f}", flush=True)
        if agree < 1.0:
            print("D4 gate: the condition-0 rows differ between the mixed and the single run", flush=True)

    if F.out:
        with open(F.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
