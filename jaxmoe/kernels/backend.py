"""The grouped expert kernel per backend, chosen once (`default_kernel`: when a MoE block is built or its impl
is set), and the calls that run a chosen kernel.

- `ragged_dot` (TPU, GPU): `jax.lax.ragged_dot` grouped matmuls over the token copies sorted by expert
  (`jaxmoe.kernels.grouped`).
- `cpu` (XLA:CPU): per-expert matmuls that read each used expert's weights once (`jaxmoe.kernels.cpu`).
- `cpu_blocked` (XLA:CPU, training: `training_kernel`): the blocked scan, whose backward pass keeps residuals for
  the routed rows only. The prefill path of `cpu` switches over static bucket sizes, and a differentiated
  `lax.switch` keeps the residuals of every branch: a router step of a SmolLM2-135M 2-expert MoE at 8 x 256 tokens
  went past 21 GB with it, 9.4 GB with the dense reference.

`grouped_experts` runs a kernel on tokens and their routing; `grouped_mlp` runs its grouped MLP on rows
already sorted by expert (the expert-parallel dispatch sorts its own rows). `platform` (and `on_cpu`) is the one place
jaxmoe and converters read the default backend.
"""
from __future__ import annotations

import jax

from jaxmoe.kernels.cpu import blocked_mlp, cpu_experts
from jaxmoe.kernels.grouped import Experts, ragged_dot_experts, ragged_dot_mlp
from jaxmoe.nn.router import Routing

KERNELS = ("ragged_dot", "cpu", "cpu_blocked")
# XLA:CPU without LLVM optimisation or fusion emitters: programs compile in about a third of the time and their
# elementwise code runs a little slower (matmuls are library calls either way). For programs run once or a few
# times (the gate pass of a build, the calibrated gate fit), where compile time dominates.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def platform() -> str:
    """The default JAX backend ('cpu', 'tpu', 'gpu', ...)."""
    return jax.default_backend()


def on_cpu() -> bool:
    """True when the default backend is XLA:CPU (our test bed: float32 defaults, layer-by-layer decoding)."""
    return platform() == "cpu"


def default_kernel() -> str:
    """The grouped kernel for the default backend: 'cpu' on CPU, 'ragged_dot' elsewhere."""
    return "cpu" if platform() == "cpu" else "ragged_dot"


def quick_compile_options() -> dict | None:
    """`compiler_options` for a program that runs only a few times: FAST_CPU_COMPILE on CPU, else None."""
    return FAST_CPU_COMPILE if platform() == "cpu" else None


def training_kernel() -> str:
    """The grouped kernel for training on the default backend: 'cpu_blocked' on CPU, else `default_kernel`."""
    return "cpu_blocked" if platform() == "cpu" else default_kernel()


def check_kernel(kernel: str) -> str:
    """`kernel` when it names one of KERNELS, else ValueError naming the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"grouped kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    return kernel


def grouped_experts(x: jax.Array, r: Routing, wg: Experts, wu: Experts, wd: Experts, activation: str,
                    kernel: str) -> jax.Array:
    """Dropless sum_j weight_j * expert_j(x) [N, H] for tokens x [N, H] with `kernel` (one of KERNELS).
    Weights are stacked ([E, H, I] / [E, I, H]) or sequences of E per-expert arrays."""
    if check_kernel(kernel) == "cpu_blocked":
        # Recomputed in the backward pass: saved, the scan's per-block residuals outweigh the dense reference's.
        return jax.checkpoint(lambda x, r, wg, wu, wd: cpu_experts(x, r, wg, wu, wd, activation, path="blocked"))(
            x, r, wg, wu, wd)
    if kernel == "cpu":
        return cpu_experts(x, r, wg, wu, wd, activation)
    return ragged_dot_experts(x, r, wg, wu, wd, activation)


def grouped_mlp(xs: jax.Array, sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                activation: str, kernel: str) -> jax.Array:
    """down_e(act(xs @ gate_e) * (xs @ up_e)) for rows xs [R, H] sorted by expert, `sizes` [E] rows per
    expert (sum <= R), weights stacked; rows past sum(sizes) come out zero. `kernel` (one of KERNELS):
    'ragged_dot' runs `ragged_dot`, 'cpu' the blocked scan (XLA:CPU's ragged_dot does work x E)."""
    if check_kernel(kernel) != "ragged_dot":
        return blocked_mlp(xs, sizes, wg, wu, wd, activation)
    return ragged_dot_mlp(xs, sizes, wg, wu, wd, activation)
