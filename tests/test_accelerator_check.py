"""benchmarks/accelerator_check.py --tiny runs in this process (8 CPU devices, from conftest) through the code path
the accelerator run takes, and every section reports real numbers: logits equal to transformers', the same greedy
tokens, a router step whose FLOPs match a hand count and whose loss falls, grouped kernels equal to the dense
reference, and the expert-parallel model's tokens equal to one device's."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _accelerator_check():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("accelerator_check", ROOT / "benchmarks" / "accelerator_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_real_numbers(tmp_path):
    assert _accelerator_check().main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "accelerator_check.tiny.json").read_text())
    s = res["sections"]
    assert res["failed"] == [] and res["meta"]["backend"] == "cpu" and res["meta"]["devices"] == 8

    f32, bf16 = s["parity"]["mixtral"]["float32"], s["parity"]["mixtral"]["bfloat16"]
    assert f32["max_abs_diff"] <= 1e-4 and f32["argmax_agree"] == 1.0 and f32["max_abs_logit"] > 1.0
    assert f32["jaxmoe_vs_f32"] == f32["max_abs_diff"] and f32["transformers_vs_f32"] == 0.0
    assert 0.0 < bf16["max_abs_diff"] <= 0.05 * bf16["max_abs_logit"] and bf16["argmax_agree"] >= 0.9
    assert 0.0 < bf16["jaxmoe_vs_f32"] <= 0.05 * bf16["max_abs_logit"] and bf16["transformers_vs_f32"] > 0.0

    [gen] = s["generation"]["mixtral"]
    assert gen["batch"] == 2 and gen["same_tokens"] is True
    assert gen["jaxmoe_decode_tps"] > 0 and gen["transformers_decode_tps"] > 0 and gen["jaxmoe_compile_s"] > 0

    # Hand count for the tiny Mixtral (H 32, 4 heads x 8, 2 kv heads, I 48, top-2 of 4 experts, V 512, 2 layers)
    # on 2 x 32 tokens: per layer q,o 2*32*32 + k,v 2*32*16 + experts 2*3*32*48 + router 32*4 = 12416 weights.
    matmul = 2 * 64 * (2 * 12416 + 32 * 512)
    attention = 4 * 2 * 32 ** 2 * 32 * 2
    t = s["train"]
    assert t["flops"] == 2 * matmul + 3 * attention == 12_124_160
    assert t["step_s"] > 0 and 0 < t["mfu"] < 1 and t["losses"][-1] < t["losses"][0]

    k = s["kernels"]
    assert k["kernel"] == "cpu" and k["max_abs_out"] > 0.5
    for name in ("ragged_dot", "default (cpu)"):
        assert k[name]["max_abs_diff_vs_dense"] <= 1e-5 and k[name]["ms"] > 0

    e = s["expert_parallel"]
    assert (e["devices"], e["mesh"], e["dispatch"], e["impls"]) == (8, "expert=4,data=2", ["allgather"],
                                                                    ["expert_parallel"])
    assert e["tokens_equal"] is True and e["new_tokens"] == 6

    md = (tmp_path / "accelerator_check.tiny.md").read_text()
    assert "| mixtral | float32 |" in md and "| mixtral | bfloat16 |" in md and "greedy tokens equal to one device: True" in md
