"""Cloud TPU accelerator types: parse a name such as `v4-32` into generation, chips and hosts.

The number after the dash counts TensorCores on v4 and v5p (two per chip) and chips on v5e and v6e.
A host (TPU VM worker) holds 4 chips on every generation here, except single-host v5e/v6e slices
of up to 8 chips, which sit on one VM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    """One TPU generation: how its accelerator types are spelled and what a chip holds."""

    name: str  # short name used in docs and presets: v4, v5e, v5p, v6e
    prefix: str  # gcloud accelerator-type prefix: v4, v5litepod, v5p, v6e
    runtime_version: str  # default TPU VM software version for `tpu-vm create --version`
    cores_per_chip: int  # 2 when the type counts TensorCores (v4, v5p), 1 when it counts chips
    hbm_gib: int  # HBM per chip
    sizes: tuple[int, ...]  # allowed numbers after the dash, or () for "multiples of 8 up to max_size"
    max_size: int = 0


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "v4", "tpu-ubuntu2204-base", 2, 32, (), 8192),
    "v5e": Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 1, 16, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": Generation("v5p", "v5p", "v2-alpha-tpuv5", 2, 95, (), 17920),
    "v6e": Generation("v6e", "v6e", "v2-alpha-tpuv6e", 1, 32, (1, 4, 8, 16, 32, 64, 128, 256)),
}

CHIPS_PER_HOST = 4
SINGLE_HOST_MAX_CHIPS = 8  # v5e/v6e: slices of 1, 4 or 8 chips are one VM

_TYPE_RE = re.compile(r"^(v4|v5litepod|v5e|v5p|v6e)-(\d+)$")


@dataclass(frozen=True)
class Accelerator:
    """A parsed accelerator type with the chip and host counts derived from it."""

    type: str  # canonical gcloud spelling, e.g. v5litepod-64
    generation: Generation
    size: int  # the number after the dash

    @property
    def chips(self) -> int:
        """Number of TPU chips (= JAX devices: v4/v5p megacore shows one device per chip)."""
        return self.size // self.generation.cores_per_chip

    @property
    def hosts(self) -> int:
        """Number of TPU VM workers (`--worker=0..hosts-1`)."""
        if self.generation.cores_per_chip == 1 and self.chips <= SINGLE_HOST_MAX_CHIPS:
            return 1
        return max(1, self.chips // CHIPS_PER_HOST)

    @property
    def label(self) -> str:
        """Name for people: `v5e-64 (v5litepod-64)` for v5e, the gcloud type otherwise."""
        return f"v5e-{self.size} ({self.type})" if self.generation.name == "v5e" else self.type

    @property
    def hbm_bytes(self) -> int:
        """HBM per chip in bytes."""
        return self.generation.hbm_gib * 2**30


def _allowed(gen: Generation) -> str:
    if gen.sizes:
        return ", ".join(f"{gen.prefix}-{s}" for s in gen.sizes)
    return f"{gen.prefix}-8 .. {gen.prefix}-{gen.max_size} in steps of 8"


def parse_accelerator(name: str) -> Accelerator:
    """Parse an accelerator type; `v5e-N` is accepted as an alias of `v5litepod-N`.

    Raises ValueError with a one-line message naming the allowed types.
    """
    m = _TYPE_RE.match(name.strip().lower())
    if not m:
        raise ValueError(
            f"unknown accelerator type {name!r}: expected v4-N, v5litepod-N (or v5e-N), v5p-N or v6e-N"
        )
    prefix, size = m.group(1), int(m.group(2))
    gen = next(g for g in GENERATIONS.values() if prefix in (g.prefix, g.name))
    ok = size in gen.sizes if gen.sizes else (size % 8 == 0 and 8 <= size <= gen.max_size)
    if not ok:
        raise ValueError(f"unknown accelerator type {name!r}: {gen.name} slices are {_allowed(gen)}")
    return Accelerator(f"{gen.prefix}-{size}", gen, size)
