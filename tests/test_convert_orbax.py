"""`jaxmoe convert --to orbax` and back: HF -> orbax -> HF is bit-identical; the orbax model's logits are ours."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import converters
from converters.hf.safetensors_io import CheckpointReader
from converters.load import load_orbax_model
from jaxmoe.cli import main as cli


def test_hf_to_orbax_to_hf_is_bit_identical(tiny_hf, tmp_path):
    src, _ = tiny_hf("mixtral")
    assert cli(["convert", str(src), str(tmp_path / "ckpt"), "--to", "orbax"]) == 0
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)
    assert np.array_equal(np.asarray(load_orbax_model(tmp_path / "ckpt")(ids)), np.asarray(converters.load(src)(ids)))
    assert cli(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--no-progress"]) == 0
    a, b = CheckpointReader(src), CheckpointReader(tmp_path / "hf")
    assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 40
    assert all(np.array_equal(a.get(k), b.get(k)) for k in a.keys())
