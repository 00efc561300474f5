"""The one loader (`converters.load`): HF directories, GGUF files and orbax checkpoints all become models through one
function, `materialize`, sharded or not; a parameter that lives in a stacked array at a layer index is filled
there, and a mesh that splits the layer axis reads each layer's regions once, only where the devices hold it;
orbax checkpoints that do not fit fail in one line naming the file."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import converters
from converters.hf.names import KINDS
from converters.hf.reader import state_arrays
from converters.load import load_orbax_model
from jaxmoe.nn.model import Slot, param_slots
from jaxmoe.parallel import rules
from jaxmoe.parallel.mesh import make_mesh
from jaxmoe.train.checkpoint import CheckpointCorrupt, CheckpointMismatch, flat_params, save_orbax_model
from tests.test_gguf import write_gemma2

LOADER = sys.modules["converters.load"]  # `converters.load` itself is the function


def _same_params(a, b) -> None:
    sa, sb = flat_params(nnx.state(a, nnx.Param)), flat_params(nnx.state(b, nnx.Param))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(np.asarray(sa[k]), np.asarray(sb[k])), k


def test_hf_gguf_and_orbax_all_go_through_materialize(tiny_hf, tmp_path, monkeypatch):
    calls = []
    real = LOADER.materialize

    def counting(config, source, dtype=None, mesh=None):
        calls.append((type(source).__name__, None if mesh is None else dict(mesh.shape)))
        return real(config, source, dtype, mesh)

    monkeypatch.setattr(LOADER, "materialize", counting)
    src, _ = tiny_hf("mixtral")
    hf = converters.load(src)
    ckpt = save_orbax_model(hf, tmp_path / "ckpt")
    _same_params(converters.load(ckpt), hf)
    _same_params(load_orbax_model(ckpt), hf)
    _same_params(converters.load(src, mesh="expert=4,data=2"), hf)
    _same_params(converters.load(ckpt, mesh="expert=4,data=2"), hf)
    expected = write_gemma2(tmp_path / "g2.gguf")
    gguf = converters.load(tmp_path / "g2.gguf")
    c = gguf.config
    q = expected["model.layers.1.self_attn.q_proj.weight"]  # HF [heads*d, H] -> ours [H, heads, d]
    np.testing.assert_array_equal(np.asarray(state_arrays(gguf)["layers.1.attn.q_proj"]),
                                  q.T.reshape(c.hidden_size, c.num_heads, c.head_dim))
    _same_params(converters.load(tmp_path / "g2.gguf", mesh="tensor=2,data=4"), gguf)
    mesh = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert calls == [("HFParams", None), ("OrbaxParams", None), ("OrbaxParams", None), ("HFParams", mesh),
                     ("OrbaxParams", mesh), ("HFParams", None),
                     ("HFParams", {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2})]


# --- the one table of tensor kinds ----------------------------------------------------------------------------
KIND_SHAPES = {"same": [(6, 4)], "linear": [(4, 6)], "heads_in": [(8, 2, 3)], "heads_out": [(2, 3, 8)],
               "heads_bias": [(2, 3)], "fused_gate_up": [(2, 8, 3), (2, 8, 3)], "fused_down": [(2, 3, 8)]}


def _halves(n: int) -> list[slice]:
    return [slice(0, n), slice(0, n // 2), slice(n // 2, n), slice(1, n)]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_reads_any_region_as_its_whole_load_and_saves_back(name):
    """Import (whole tensors), sharded reads (regions) and export (save) agree for every kind in the table."""
    kind, shapes = KINDS[name], KIND_SHAPES[name]
    rng = np.random.default_rng(0)
    ours = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    hf = kind.save(*ours)
    assert hf.shape == kind.hf_shape(*shapes)
    for pos, (whole, mine) in enumerate(zip(kind.load(hf, shapes), ours)):
        assert whole.tobytes() == mine.tobytes()
        for region in itertools.product(*(_halves(n) for n in mine.shape)):
            got = kind.read(hf.__getitem__, region, mine.shape, pos)
            assert np.array_equal(got, mine[region]), (pos, region)
    # bijective: the HF tensor is one parameter reshaped or transposed, so the same bytes come back out
    assert kind.bijective == (len(shapes) == 1)
    if kind.bijective:
        assert np.ascontiguousarray(kind.save(*kind.load(hf, shapes))).tobytes() == np.ascontiguousarray(hf).tobytes()


# --- the stacked-slot path on a toy model whose layer axis is split over the mesh ---------------------------
@dataclasses.dataclass(frozen=True)
class ToyConfig:
    dtype: str = "float32"
    model_type: str = "toy"


class Toy(nnx.Module):
    """An embedding and one stack of 4 layers' weights [L, 6, 8]: logical 'layers.l.w' is stack[l]; and a
    per-layer constant that is not a parameter (the loader builds it from the config)."""

    def __init__(self, config=None, dtype=None):
        self.config = ToyConfig(dtype or "float32")
        self.embed = nnx.Param(jnp.zeros((8, 6)), axes=("vocab", "embed"))
        self.stack = nnx.Param(jnp.zeros((4, 6, 8)), axes=("layers", "embed", "mlp"))
        self.windows = nnx.Variable(jnp.arange(4) * 2)


TOY = {"embed": np.arange(48, dtype=np.float32).reshape(8, 6)}
TOY.update({f"layers.{i}.w": np.full((6, 8), 10.0 * i, np.float32) + np.arange(8) for i in range(4)})


class DictSource:
    """Our parameters from a dict, recording every region read and every `done`."""

    where = "dict"

    def __init__(self, tensors):
        self.tensors, self.reads, self.finished = tensors, [], []

    def check(self, targets):
        assert {n: t.shape for n, t in targets.items()} == {n: a.shape for n, a in self.tensors.items()}

    def read(self, name, regions=None, outs=None):
        for region, out in zip(regions, outs):
            self.reads.append((name, tuple((r.start, r.stop) for r in region)))
            np.copyto(out, self.tensors[name][region])
        return list(outs)

    def done(self, name):
        self.finished.append(name)


@pytest.fixture
def toy_loader(monkeypatch):
    """The loader seeing the Toy model, with stacked slots, and the layer axis split over `data`."""
    monkeypatch.setattr(LOADER, "abstract_model",
                        lambda config, dtype=None: nnx.eval_shape(lambda: Toy(config, dtype)))
    monkeypatch.setattr(LOADER, "Transformer", Toy)
    monkeypatch.setattr(LOADER, "check_mesh", lambda config, mesh: None)
    monkeypatch.setattr(LOADER, "shard_model", lambda model, mesh: model)
    monkeypatch.setattr(sys.modules["converters.hf.reader"], "param_slots", lambda model: {
        "embed": Slot("embed", ()), **{f"layers.{i}.w": Slot("stack", (i,)) for i in range(4)}})
    monkeypatch.setitem(rules.LOGICAL_RULES, "layers", ("data",))


def test_stacked_slots_fill_their_layer_on_one_device(toy_loader):
    source = DictSource(TOY)
    model = LOADER.materialize(ToyConfig(), source)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), TOY["embed"])
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(model.stack[...][i]), TOY[f"layers.{i}.w"])
    assert sorted(source.reads) == sorted([("embed", ((0, 8), (0, 6)))] +
                                          [(f"layers.{i}.w", ((0, 6), (0, 8))) for i in range(4)])
    assert sorted(source.finished) == sorted(TOY)
    np.testing.assert_array_equal(np.asarray(model.windows[...]), [0, 2, 4, 6])


def test_stacked_slots_on_a_mesh_that_splits_the_layers(toy_loader):
    source = DictSource(TOY)
    model = LOADER.materialize(ToyConfig(), source, mesh=make_mesh("data=2,tensor=4"))
    stack = model.stack[...]
    assert stack.sharding.spec == P("data", None, "tensor")
    np.testing.assert_array_equal(np.asarray(stack), np.stack([TOY[f"layers.{i}.w"] for i in range(4)]))
    np.testing.assert_array_equal(np.asarray(model.embed[...]), TOY["embed"])
    for shard in stack.addressable_shards:  # each device: 2 layers, a quarter of the width
        assert shard.data.shape == (2, 6, 2)
    # Each layer is read once per distinct region holding it (4 width slices), never where no device holds it.
    for i in range(4):
        assert sorted(r for n, r in source.reads if n == f"layers.{i}.w") == [((0, 6), (2 * k, 2 * k + 2))
                                                                               for k in range(4)]
    assert sorted(r for n, r in source.reads if n == "embed") == [((2 * k, 2 * k + 2), (0, 6)) for k in range(4)]
    assert sorted(source.finished) == sorted(TOY)
    windows = model.windows[...]
    assert windows.sharding.spec == P() and len(windows.sharding.device_set) == 8  # replicated over the mesh
    np.testing.assert_array_equal(np.asarray(windows), [0, 2, 4, 6])


# --- orbax checkpoints that do not fit ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def orbax_llama(tiny_hf, tmp_path_factory):
    model = converters.load(tiny_hf("llama")[0])
    return save_orbax_model(model, tmp_path_factory.mktemp("orbax") / "ckpt"), model


def _edit_meta(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "0" / "meta" / "metadata"
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))
    return f


def test_model_checkpoints_store_logical_names(orbax_llama):
    path, model = orbax_llama
    meta = json.loads((path / "0" / "meta" / "metadata").read_text())
    assert meta["param_groups"]["frozen"] == sorted(param_slots(model)) and "layers.2.attn.o_proj" in \
        meta["param_groups"]["frozen"]
    _same_params(converters.load(path), model)


def test_unknown_format_and_misfit_arrays_fail_in_one_line(orbax_llama, tmp_path):
    path, _ = orbax_llama
    meta = _edit_meta(path, tmp_path / "future", lambda m: {**m, "format": "jaxmoe-checkpoint-9"})
    with pytest.raises(CheckpointCorrupt) as e:
        converters.load(tmp_path / "future")
    assert str(e.value) == (f"{meta}: checkpoint format 'jaxmoe-checkpoint-9' is not jaxmoe-checkpoint-1, the one "
                            "this jaxmoe reads; convert it to HF with the jaxmoe that wrote it "
                            "(`jaxmoe convert IN OUT`)")
    _edit_meta(path, tmp_path / "misfit", lambda m: {**m, "model_config": {**m["model_config"], "vocab_size": 64}})
    with pytest.raises(CheckpointMismatch) as e:
        converters.load(tmp_path / "misfit")
    assert str(e.value).startswith(f"{tmp_path / 'misfit' / '0' / 'params'}: 'frozen.embed' has shape (128, 32), "
                                   "the model needs (64, 32);") and "\n" not in str(e.value)
