"""Grouped expert kernels per backend, behind the dropless MoE impl: `backend` (which kernel for which backend,
chosen once; the calls that run it), `grouped` (ragged_dot for TPU/GPU, and what every kernel shares), `cpu`
(the XLA:CPU kernels and per-expert arrays aliasing stacked CPU weights)."""
