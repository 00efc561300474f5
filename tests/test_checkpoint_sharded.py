"""Orbax checkpoints loaded onto a mesh (8 CPU devices): every parameter restored straight into its sharding,
the same logits as one device, chunked storage, and one-line errors for bad meshes and damaged checkpoints.
The two-process read measurement is in tests/test_multihost.py."""
from __future__ import annotations

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

import converters
from jaxmoe.parallel.mesh import parse_mesh_spec, use_mesh
from jaxmoe.parallel.placement import param_shardings, placed_mesh, shard_batch
from jaxmoe.parallel.rules import MeshError, axis_size
from converters.load import load_orbax_model
from jaxmoe.nn.model import param_slots
from jaxmoe.train.checkpoint import (CHUNK_BYTES, CheckpointCorrupt, Checkpointer, config_to_json, flat_params,
                                     save_frozen, save_orbax_model)

IDS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def orbax_mixtral(tiny_hf, tmp_path_factory):
    """(orbax checkpoint of the tiny 4-expert Mixtral, its single-device model, single-device logits)."""
    src, _ = tiny_hf("mixtral")
    model = converters.load(src)
    path = save_orbax_model(model, tmp_path_factory.mktemp("orbax") / "ckpt")
    return path, model, np.asarray(_forward(model, IDS))


def _forward(model, ids, mesh=None):
    graphdef, state = nnx.split(model)
    ids = ids if mesh is None else shard_batch(ids, mesh)
    # Unoptimised XLA code: the same numbers within float32 noise, compiled in about half the time.
    with use_mesh(mesh):
        lowered = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, ids)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(state, ids)


@pytest.mark.parametrize("spec", ["expert=4,data=2", "fsdp=8"])
def test_orbax_checkpoint_loads_sharded_with_single_device_logits(orbax_mixtral, spec):
    path, ref_model, ref_logits = orbax_mixtral
    model = converters.load(path, mesh=spec)  # an orbax dir: read by jaxmoe.train.checkpoint_sharded
    mesh = placed_mesh(model)
    assert dict(mesh.shape) == parse_mesh_spec(spec)
    n = math.prod(axis_size(mesh, a) for a in ("expert", "fsdp", "tensor"))
    assert n in (4, 8)
    ref = flat_params(nnx.state(ref_model))
    arrays = flat_params(nnx.state(model))
    for key, arr in arrays.items():
        assert arr.sharding == param_shardings(model, mesh)[key], key
        assert np.array_equal(np.asarray(arr), np.asarray(ref[key])), key
    experts = 0
    for name, slot in param_slots(model).items():  # by logical name: a stacked array holds several layers' tensors
        arr, lead = arrays[slot.path], len(slot.index)
        if name.endswith(("gate_proj", "up_proj", "down_proj")) and ".mlp." in name and arr.ndim - lead == 3:
            experts += 1
            shards = arr.addressable_shards  # each device holds 1/n of each expert tensor, n distinct pieces
            assert len(shards) == 8 and all(s.data.shape[:lead] == arr.shape[:lead] and  # every layer's part
                                            math.prod(s.data.shape[lead:]) * n == math.prod(arr.shape[lead:])
                                            for s in shards), name
            assert len({tuple((sl.start, sl.stop) for sl in s.index[lead:]) for s in shards}) == n, name
    assert experts == 3 * sum(model.config.moe_layers) > 0
    logits = np.asarray(_forward(model, IDS, mesh))
    assert np.abs(logits - ref_logits).max() <= 1e-5


def _chunk_shape(step_params, key: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(stored shape, zarr chunk shape, item size) of one array of an orbax params item."""
    t = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step_params}",
                                               "path": key}}).result()
    return tuple(t.shape), tuple(t.chunk_layout.read_chunk.shape), t.dtype.numpy_dtype.itemsize


def test_saved_arrays_are_chunked_by_expert_and_byte_size(orbax_mixtral, tmp_path):
    path, model, _ = orbax_mixtral
    shape, chunk, _ = _chunk_shape(path / "0" / "params", "frozen.layers.0.mlp.gate_proj")
    assert shape == (4, 32, 48) and chunk == (1, 32, 48)  # one expert per chunk at the default size
    # A small bound splits every array into chunks of at most that many bytes, over several dimensions.
    small = save_orbax_model(model, tmp_path / "small", chunk_bytes=1024)
    assert CHUNK_BYTES == 1 << 20
    for key in ("embed", "layers.0.attn.q_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"):
        shape, chunk, size = _chunk_shape(small / "0" / "params", f"frozen.{key}")
        assert math.prod(chunk) * size <= 1024 and math.prod(chunk) * 4 <= math.prod(shape), (key, chunk)
        if key == "embed":
            assert all(c < s for c, s in zip(chunk, shape)), chunk  # both vocab and width are split
        if ".mlp." in key:
            assert chunk[0] == 1, chunk
    restored = load_orbax_model(small, mesh="fsdp=8")
    for key, arr in flat_params(nnx.state(restored)).items():
        assert np.array_equal(np.asarray(arr), np.asarray(flat_params(nnx.state(model))[key])), key


def test_training_run_with_frozen_dir_and_float32_master_loads_sharded(orbax_mixtral, tmp_path):
    """A `jaxmoe train` layout: frozen parameters (bfloat16) saved once per run, the trainable router as a
    float32 master copy in the step; the sharded load casts to bfloat16 and equals the unsharded one."""
    _, model, _ = orbax_mixtral
    flat = flat_params(nnx.state(model))
    trainable = {k: v for k, v in flat.items() if k.endswith("mlp.router")}
    frozen = {k: v.astype(jnp.bfloat16) for k, v in flat.items() if k not in trainable}
    config = model.config.replace(dtype="bfloat16")
    run = tmp_path / "run"
    save_frozen(run / "frozen", frozen, config)
    ckpt = Checkpointer(run / "checkpoints", use_async=False)
    ckpt.save(7, {}, trainable, {}, {"step": 7, "model_config": config_to_json(config), "frozen_dir": "frozen",
                                     "param_groups": {"frozen": sorted(frozen), "trainable": sorted(trainable)},
                                     "dtypes": {"frozen": "bfloat16", "trainable": "float32"}})
    ckpt.close()
    # A run stores its own parameter arrays (stacked layers: state paths); one expert per chunk here too.
    gate = param_slots(model)["layers.0.mlp.gate_proj"]
    assert _chunk_shape(run / "frozen", gate.path)[1][len(gate.index)] == 1
    one = flat_params(nnx.state(load_orbax_model(run)))
    sharded = load_orbax_model(run, mesh="expert=4,data=2")
    assert sharded.config.dtype == "bfloat16" and sum(k.endswith("mlp.router") for k in param_slots(sharded)) == 3
    for key, arr in flat_params(nnx.state(sharded)).items():
        assert arr.dtype == jnp.bfloat16 and np.array_equal(np.asarray(arr), np.asarray(one[key])), key
        if key.endswith("mlp.router"):
            assert np.array_equal(np.asarray(arr), np.asarray(trainable[key].astype(jnp.bfloat16))), key


def test_bad_mesh_and_damaged_checkpoints_fail_in_one_line(orbax_mixtral, tmp_path):
    path, _, _ = orbax_mixtral
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for data in (broken / "0" / "params").rglob("d"):
        shutil.rmtree(data)  # the array data files (OCDBT) are gone, the metadata is left
    # The mesh is checked against the checkpoint's config before any array is read.
    with pytest.raises(MeshError, match=r"^mesh expert=8 does not divide 4 experts$"):
        converters.load(broken, mesh="expert=8")
    with pytest.raises(MeshError, match=r"^mesh tensor=8 does not divide 4 attention heads$"):
        load_orbax_model(broken, mesh="tensor=8")
    for mesh in ("expert=4,data=2", None):
        with pytest.raises(CheckpointCorrupt) as e:
            load_orbax_model(broken, mesh=mesh)
        assert str(e.value).startswith(f"{broken / '0' / 'params'}: cannot read the parameters (")
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"no such file or directory$"):
        load_orbax_model(tmp_path / "nothing", mesh="fsdp=8")
    (broken / "0" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointCorrupt, match=r"metadata: unreadable checkpoint metadata \(.*\)$"):
        load_orbax_model(broken, mesh="fsdp=8")
