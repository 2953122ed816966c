"""G4: the study's generation workload slice, SmolLM2-135M fp32 CPU, one core for both sides.

Model (``--model``): ``testbed`` (default), the study's instruct model on the offline default -- SmolLM2-135M-
Instruct fine-tuned to refuse (docs/TESTBED.md), built on first use, both sides loading its exported HF
directory -- so the rows end as the study's do (most harmful prompts refused in a dozen tokens, the rest
running to the limit); or ``smollm2``, the Instruct model as shipped, which answers these prompts instead
(almost every row runs to the limit, so both sides decode about the same steps).

Workload: 8 conditions x 48 prompts x 150 new tokens (``--prompts``, ``--nulls``, ``--new_tokens``), greedy,
EOS (the tokenizer's and the chat end-of-turn) ending each row on both sides. Prompts: the chat-formatted
held-out harmful prompts, ``split(load_prompts("builtin:harmful"), 0.3, 0)`` eval part, the first 48.
Conditions (each zeroes the down_proj input columns of a neuron set, i.e. a multiplier of 0):

  * ``none``;
  * ``cna``: the 47 neurons of docs/example/neuron_set.json (the example study's CNA set; same shape
    as SmolLM2-135M, 30 x 1536);
  * ``null-i`` (i < 6): uniform random subsets of the same size over all 30 x 1536 neurons,
    ``np.random.default_rng([0, i])``.

Ours: ONE ``cna_jax.engine.run`` job holding every (prompt, condition) row, prompt-major so that
conditions mix in every batch, ``--slots`` slots (default 32, as the study's generation.batch_size),
the chat header shared (run once per condition), as ``study.stage_generation`` runs it.
Anchor: HF transformers ``generate`` (PyTorch, greedy) the usual way: one condition at a time, batches of
``--hf_batch`` (32) prompts left-padded to the batch's longest, the mask applied by a ``down_proj``
forward pre-hook multiplying its input by the condition's [I] mask in each layer (no hooks for ``none``).

Gate: identical greedy tokens per row (up to and including EOS). Mismatching rows are counted and each is
inspected: the logit gap between HF's top two tokens at the first differing position (a float near-tie
shows as a gap of ~1e-5 or less). Timing: compile (ours: a warm-up job of the same shapes) apart, then
``--repeats`` interleaved timed runs of the whole workload per side, median.

    python launch/bench_engine.py                 # the G4 figure (about 10-20 min on one core)
    python launch/bench_engine.py --quick         # small settings, to validate the script
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, sgemm_gflops, smollm2_both  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # one core for both sides, before JAX / torch start (PERFORMANCE.md rules)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_enum("model", "testbed", ["testbed", "smollm2"], "testbed: the study's tuned instruct model; "
                  "smollm2: SmolLM2-135M-Instruct as shipped.")
flags.DEFINE_integer("prompts", 48, "Held-out harmful prompts (the first ones of the eval split).")
flags.DEFINE_integer("nulls", 6, "Random null subsets (conditions = none + cna + nulls).")
flags.DEFINE_integer("new_tokens", 150, "Max new tokens per row.")
flags.DEFINE_integer("slots", 32, "Engine slots (ours).")
flags.DEFINE_integer("chunk", 4, "Engine decode steps per call (ours; engine.run's default).")
flags.DEFINE_integer("hf_batch", 32, "HF generate batch size (anchor).")
flags.DEFINE_integer("repeats", 1, "Timed runs per side of the whole workload (median).")
flags.DEFINE_bool("quick", False, "Small settings to validate the script: 8 prompts, 2 nulls, 24 tokens, "
                  "8 slots, HF batches of 8.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

NEURON_SET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "example", "neuron_set.json")


def conditions(cfg, n_nulls):
    """(name, multiplier [L, I] or None) per condition."""
    import numpy as np

    from cna_jax.neurons import multiplier

    with open(NEURON_SET) as f:
        ns = json.load(f)
    if (ns["num_layers"], ns["intermediate_size"]) != (cfg.num_hidden_layers, cfg.intermediate_size):
        raise SystemExit(f"{NEURON_SET} is for another shape")
    pairs = np.stack([ns["layers"], ns["indices"]], 1)
    out = [("none", None), ("cna", multiplier(cfg.num_hidden_layers, cfg.intermediate_size, pairs, 0.0))]
    n_all = cfg.num_hidden_layers * cfg.intermediate_size
    for i in range(n_nulls):
        flat = np.random.default_rng([0, i]).choice(n_all, len(pairs), replace=False)
        null = np.stack(np.divmod(flat, cfg.intermediate_size), 1)
        out.append((f"null-{i}", multiplier(cfg.num_hidden_layers, cfg.intermediate_size, null, 0.0)))
    return out


def cut_at_eos(row, eos):
    return row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch
    import transformers

    from cna_jax import data, engine
    from cna_jax.batching import left_pad, split_shared_prefix

    F = flags.FLAGS
    if F.quick:
        F.prompts, F.nulls, F.new_tokens, F.slots, F.hf_batch = 8, 2, 24, 8, 8
    lm, hf = smollm2_both(F.model)
    cfg = lm.cfg
    eos = set(lm.eos_ids())
    pad = lm.pad_id()
    prompts = list(data.split(data.load_prompts("builtin:harmful"), 0.3, 0)[1])[:F.prompts]
    conds = conditions(cfg, F.nulls)
    ids = lm.encode(prompts)
    prefix, suffixes, q = split_shared_prefix(ids)
    prefix = None if prefix is None else np.asarray(prefix).tolist()
    # Prompt-major: every batch of slots mixes conditions (the study's job mixes them too).
    rows = [(suffixes[j], c) for j in range(len(prompts)) for c in range(len(conds))]
    eng_conds = [engine.Condition(neuron_mult=m) for _, m in conds]

    def ours(job_rows=rows):
        return engine.run(lm, job_rows, eng_conds, max_new_tokens=F.new_tokens, slots=F.slots, chunk=F.chunk,
                          prefix=prefix, length_multiple=engine.JOB_LENGTH_MULTIPLE)

    masks = [None if m is None else [torch.tensor(m[layer]) for layer in range(cfg.num_hidden_layers)]
             for _, m in conds]

    hf_work = {"row_steps": 0}  # rows x decode steps HF computed (a batch runs until its last row ends)

    def hf_condition(c, prompt_ids):
        handles = []
        if masks[c] is not None:
            for layer, scale in enumerate(masks[c]):
                handles.append(hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
                    lambda mod, args, scale=scale: (args[0] * scale,)))
        out = []
        try:
            for b in range(0, len(prompt_ids), F.hf_batch):
                batch = prompt_ids[b:b + F.hf_batch]
                tokens, valid = left_pad(batch, max(map(len, batch)), pad)
                with torch.no_grad():
                    gen = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                      attention_mask=torch.tensor(valid.astype(np.int64)),
                                      max_new_tokens=F.new_tokens, do_sample=False, eos_token_id=sorted(eos),
                                      pad_token_id=pad)
                out += [cut_at_eos(r, eos) for r in gen[:, tokens.shape[1]:].numpy().tolist()]
                hf_work["row_steps"] += len(batch) * (gen.shape[1] - tokens.shape[1])
        finally:
            for h in handles:
                h.remove()
        return out

    def theirs():
        return {c: hf_condition(c, ids) for c in range(len(conds))}

    results = {"model": F.model, "machine": os.uname().nodename, "jax": jax.__version__, "torch": torch.__version__,
               "transformers": transformers.__version__, "prompts": len(prompts), "conditions": [n for n, _ in conds],
               "new_tokens": F.new_tokens, "slots": F.slots, "chunk": F.chunk, "hf_batch": F.hf_batch,
               "rows": len(rows), "shared_prefix": q, "load_avg_start": os.getloadavg()}
    print(f"G4 workload ({F.model}): {len(conds)} conditions x {len(prompts)} prompts x {F.new_tokens} new tokens = "
          f"{len(rows)} rows; shared chat header {q} tokens; engine slots {F.slots}, chunk {F.chunk}; "
          f"HF batches of {F.hf_batch}", flush=True)
    results["sgemm_gflops"] = sgemm_gflops()
    print(f"one-core SGEMM (NumPy 2048^2 float32): {results['sgemm_gflops']:.1f} GFLOP/s", flush=True)

    # Compile: a warm-up job with every compiled shape of the workload (slots, width, condition bucket, and a
    # prefill per suffix length bucket: P rows of each bucket, so that each prefill call of the length-sorted
    # queue holds one bucket), then the gate on the full workload.
    from cna_jax.batching import bucket
    by_bucket = {bucket(len(ids_), engine.JOB_LENGTH_MULTIPLE): (ids_, c) for ids_, c in sorted(rows, key=lambda r: len(r[0]))}
    p = engine.prefill_rows(min(F.slots, len(rows)), (0 if prefix is None else len(prefix)) + max(by_bucket))
    warm = [row for b in sorted(by_bucket) for row in [by_bucket[b]] * p]
    warm += [by_bucket[max(by_bucket)]] * max(0, min(F.slots, len(rows)) - len(warm))
    t0 = time.perf_counter()
    ours(warm)
    results["ours_compile_s"] = time.perf_counter() - t0
    hf_condition(0, ids[:2])  # HF warm-up
    t0 = time.perf_counter()
    mine = ours()
    t_ours_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_work["row_steps"] = 0
    ref = theirs()
    t_hf_first = time.perf_counter() - t0
    results["hf_row_steps"] = hf_work["row_steps"]
    print(f"first (gate) run: ours {t_ours_first:.1f} s, HF {t_hf_first:.1f} s; ours compile (warm-up job) "
          f"{results['ours_compile_s']:.1f} s", flush=True)

    mismatches = []
    for r, (j, c) in enumerate((j, c) for j in range(len(prompts)) for c in range(len(conds))):
        a, b = mine[r], ref[c][j]
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mismatches.append({"row": r, "prompt": j, "condition": conds[c][0], "position": at,
                               "ours": a[at] if at < len(a) else None, "hf": b[at] if at < len(b) else None})
    for mm in mismatches:  # the HF logit gap between its top two tokens where the rows part
        c = next(i for i, (n, _) in enumerate(conds) if n == mm["condition"])
        seq = ids[mm["prompt"]] + ref[c][mm["prompt"]][:mm["position"]]
        handles = [] if masks[c] is None else [
            hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda mod, args, s=s: (args[0] * s,))
            for layer, s in enumerate(masks[c])]
        try:
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([seq])).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        top = torch.topk(logits, 2)
        mm["hf_top2_gap"] = float(top.values[0] - top.values[1])
        mm["hf_gap_ours_vs_hf_token"] = (float(logits[mm["hf"]] - logits[mm["ours"]])
                                         if mm["ours"] is not None and mm["hf"] is not None else None)
    n_tokens = sum(len(x) for x in mine)
    results.update(mismatched_rows=len(mismatches), mismatches=mismatches, new_tokens_total=n_tokens,
                   hf_new_tokens_total=sum(len(x) for v in ref.values() for x in v))
    print(f"gate: {len(rows) - len(mismatches)}/{len(rows)} rows identical; {len(mismatches)} differ"
          + "".join(f"\n  row {m['row']} ({m['condition']}, prompt {m['prompt']}) from token {m['position']}: "
                    f"ours {m['ours']} vs HF {m['hf']}, HF top-2 logit gap {m['hf_top2_gap']:.2e}"
                    for m in mismatches), flush=True)

    if F.repeats > 1:
        t_ours, t_hf = interleaved([ours, theirs], F.repeats)
    else:
        t_ours, t_hf = t_ours_first, t_hf_first  # the gate run is the timed run (after the compile warm-up)
    results.update(ours_s=t_ours, hf_s=t_hf, speedup=t_hf / t_ours, ours_tok_s=n_tokens / t_ours,
                   hf_tok_s=results["hf_new_tokens_total"] / t_hf, load_avg_end=os.getloadavg())
    print(f"G4: ours {t_ours:.1f} s ({n_tokens / t_ours:.1f} tok/s) vs HF {t_hf:.1f} s "
          f"({results['hf_new_tokens_total'] / t_hf:.1f} tok/s): {t_hf / t_ours:.2f}x "
          f"[{n_tokens} new tokens; HF decoded {results['hf_row_steps']} row-steps; load average {os.getloadavg()[0]:.1f}]", flush=True)
    print(json.dumps({k: v for k, v in results.items() if k != "mismatches"}))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
