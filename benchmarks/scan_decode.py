"""Why CPU generation runs layer by layer (`jaxmoe.layerwise`): one decode step of a SmolLM2-shaped stack
(30 layers, hidden 576, MLP 1536, 9 heads, 3 kv heads, float32; attention over a 640-slot cache + gated MLP,
no embedding or head) run three ways on XLA:CPU:

- unrolled: one program, each layer's weights and cache separate arrays (fast, but compiles every layer);
- scanned: one program, `jax.lax.scan` over weights stacked [L, ...] (compiles one layer; XLA:CPU copies each
  layer's slice of every stacked weight before its matmuls);
- layerwise: one compiled layer program called once per layer on separate arrays (what jaxmoe does on CPU).

    python benchmarks/scan_decode.py [--batch 1,8] [--repeats 20]
Prints compile seconds and the median ms per step of each.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

L, H, I, N, KV, D, S = 30, 576, 1536, 9, 3, 64, 640


def layer(x, wq, wk, wv, wo, wg, wu, wd, ck, cv, idx):
    """One pre-norm-free decoder layer for a [B, H] decode step over its cache ([B, kv, d, S] / [B, kv, S, d])."""
    b = x.shape[0]
    q = (x @ wq).reshape(b, KV, N // KV, D)
    ck = jax.lax.dynamic_update_slice(ck, (x @ wk).reshape(b, KV, D, 1), (0, 0, 0, idx))
    cv = jax.lax.dynamic_update_slice(cv, (x @ wv).reshape(b, KV, 1, D), (0, 0, idx, 0))
    p = jax.nn.softmax(jnp.einsum("bkgd,bkds->bkgs", q, ck), -1)
    x = x + jnp.einsum("bkgs,bksd->bkgd", p, cv).reshape(b, N * D) @ wo
    return x + (jax.nn.silu(x @ wg) * (x @ wu)) @ wd, ck, cv


def unrolled(x, weights, ks, vs, idx):
    ks, vs = list(ks), list(vs)
    for i in range(L):
        x, ks[i], vs[i] = layer(x, *weights[i], ks[i], vs[i], idx)
    return x, ks, vs


def scanned(x, stacked, ck, cv, idx):
    def body(x, xs):
        *w, k, v = xs
        x, k, v = layer(x, *w, k, v, idx)
        return x, (k, v)

    x, (ck, cv) = jax.lax.scan(body, x, (*stacked, ck, cv))
    return x, ck, cv


def _time(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    """Measure the three ways at each batch size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    shapes = [(H, N * D), (H, KV * D), (H, KV * D), (N * D, H), (H, I), (H, I), (I, H)]
    stacked = [jnp.asarray(rng.normal(0, 0.02, (L,) + s).astype(np.float32)) for s in shapes]
    per_layer = [tuple(jnp.asarray(np.asarray(w[i])) for w in stacked) for i in range(L)]
    idx = jnp.int32(100)
    for b in (int(v) for v in args.batch.split(",")):
        x = jnp.asarray(rng.normal(size=(b, H)).astype(np.float32))
        ks = [jnp.zeros((b, KV, D, S)) for _ in range(L)]
        vs = [jnp.zeros((b, KV, S, D)) for _ in range(L)]
        row = {}
        t0 = time.perf_counter()
        f = jax.jit(unrolled, donate_argnums=(2, 3)).lower(x, per_layer, ks, vs, idx).compile()
        c = time.perf_counter() - t0
        state = {"ks": ks, "vs": vs}

        def run_unrolled():
            y, state["ks"], state["vs"] = f(x, per_layer, state["ks"], state["vs"], idx)
            return y

        row["unrolled"] = (c, _time(run_unrolled, args.repeats))
        t0 = time.perf_counter()
        state.update(ck=jnp.zeros((L, b, KV, D, S)), cv=jnp.zeros((L, b, KV, S, D)))
        g = jax.jit(scanned, donate_argnums=(2, 3)).lower(x, stacked, state["ck"], state["cv"], idx).compile()
        c = time.perf_counter() - t0

        def run_scanned():
            y, state["ck"], state["cv"] = g(x, stacked, state["ck"], state["cv"], idx)
            return y

        row["scanned"] = (c, _time(run_scanned, args.repeats))
        t0 = time.perf_counter()
        state.update(ks=[jnp.zeros((b, KV, D, S)) for _ in range(L)], vs=[jnp.zeros((b, KV, S, D)) for _ in range(L)])
        h = jax.jit(layer, donate_argnums=(8, 9)).lower(x, *per_layer[0], state["ks"][0], state["vs"][0], idx).compile()
        c = time.perf_counter() - t0

        def run_layerwise():
            y = x
            for i in range(L):
                y, state["ks"][i], state["vs"][i] = h(y, *per_layer[i], state["ks"][i], state["vs"][i], idx)
            return y

        row["layerwise"] = (c, _time(run_layerwise, args.repeats))
        print(f"batch {b}: " + " | ".join(f"{k} compile {c:.2f} s, step {ms:.1f} ms" for k, (c, ms) in row.items()),
              flush=True)


if __name__ == "__main__":
    main()
