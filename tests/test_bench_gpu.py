"""launch/bench_gpu.py (D1, D2, D4 and the bf16 parity check) runs end to end in its ``--quick`` mode on
the CPU, so a session lent a GPU (15 minutes of device time) does not spend it on a script that rotted.
No timing is checked here; the discrete invariant D4 gates on is."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the parity check's tiny HF model
    run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_gpu.py"), "--quick", f"--out={out}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["platform"] == "cpu"
    for bar, key in (("D1", "step_ms"), ("D2", "tokens_per_s"), ("D4", "mixed_step_ms"), ("D4", "single_step_ms")):
        assert math.isfinite(res[bar][key]) and res[bar][key] > 0, (bar, key, res[bar][key])
    # D4 mixes 8 conditions in one batch, among them a directional ablation and an activation addition; the
    # rows without an intervention give the same greedy tokens as the same rows in a one-condition batch.
    d4 = res["D4"]
    assert len(d4["conditions"]) == 8 and "none" in d4["conditions"] and "ablate" in d4["conditions"]
    assert any(c.startswith("add-") for c in d4["conditions"])
    assert d4["gate_none_rows_token_agreement"] == 1.0
    # bf16 against fp32 on the tiny model: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per
    # operation); through its 4 layers the logits stay within a few percent and most greedy tokens agree.
    p = res["parity"]
    assert p["logits_rel_err"] < 0.05 and p["greedy_token_agreement"] > 0.5, p
