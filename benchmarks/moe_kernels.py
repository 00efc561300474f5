"""CPU dropless MoE kernel paths on the demo MoE's shapes (H 576, I 1536, E 4, k 2, float32): ms per layer call
for 1 to 512 tokens, each path on stacked expert weights and (looped, bucketed) on per-expert aliasing arrays.
The numbers behind the kernel choice in `jaxmoe.kernels.cpu.auto_path` (benchmarks/README.md).

    python benchmarks/moe_kernels.py [REPEATS]      # default 15; fastest of REPEATS per cell
"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxmoe.kernels.cpu import aliased_slices, cpu_experts
from jaxmoe.kernels.grouped import ragged_dot_experts
from jaxmoe.nn.router import route

H, I, E, K = 576, 1536, 4, 2
rng = np.random.default_rng(0)
w = [jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.05) for s in ((E, H, I), (E, H, I), (E, I, H))]
router = jnp.asarray(rng.normal(size=(H, E)).astype(np.float32))
tuples = [aliased_slices(a) for a in w]
paths = {p: (lambda x, r, wg, wu, wd, p=p: cpu_experts(x, r, wg, wu, wd, "silu", path=p))
         for p in ("looped", "bucketed", "blocked", "gathered")}
paths["ragged_dot"] = lambda x, r, wg, wu, wd: ragged_dot_experts(x, r, wg, wu, wd, "silu")
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
for n in (1, 8, 16, 24, 31, 32, 48, 64, 128, 512):
    x = jnp.asarray(rng.normal(size=(n, H)).astype(np.float32))
    r = route(x, router, K, True)
    row = {}
    for name, fn in paths.items():
        for form, ws in (("stacked", w), ("tuples", tuples)):
            if form == "tuples" and name not in ("looped", "bucketed"):
                continue
            if name == "gathered" and n > 64:
                continue
            f = jax.jit(fn)
            f(x, r, *ws).block_until_ready()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter(); f(x, r, *ws).block_until_ready(); ts.append(time.perf_counter() - t0)
            row[f"{name}/{form}"] = min(ts) * 1e3
    print(n, " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
