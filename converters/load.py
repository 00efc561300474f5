"""The one loader: any tensor source -> a model, on one device or sharded over a mesh.

    model = converters.load("path/to/hf_dir")                  # or a .gguf file, or a jaxmoe orbax checkpoint
    model = converters.load("run/checkpoints", mesh="expert=4,data=2")

A source gives our parameters by LOGICAL name ('layers.3.attn.q_proj', the names of checkpoints and of the HF
name table; `ParamSource`): `converters.hf.reader.HFParams` over an HF directory or a GGUF file,
`jaxmoe.train.checkpoint_sharded.OrbaxParams` over an orbax checkpoint. `materialize` is the one function that
turns a source into a model. It addresses the model's arrays only through `jaxmoe.nn.model.param_slots`: a
parameter lives in the array at its slot's path, at the slot's leading indices (a layer of a stacked array), so
how the model stores its layers stays the model's business.

`LayerSource` reads the same sources one decoder layer at a time, for passes that need one layer at once (the
gate pass of `jaxmoe build`): memory about one layer, whatever the depth.

(`converters.load` is this module's function `load`: the package binds the name to the function. Import the
module's other names with `from converters.load import ...`.)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from converters.gguf.reader import read_gguf
from converters.hf.names import Region, full_region
from converters.hf.reader import HFParams, Target, abstract_model, param_targets, read_config
from converters.hf.safetensors_io import CheckpointReader
from converters.hub import resolve_model
from jaxmoe.kernels.backend import on_cpu
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.kv_cache import layer_stacks
from jaxmoe.nn.model import DecoderLayer, Transformer
from jaxmoe.parallel.mesh import check_mesh, make_mesh
from jaxmoe.parallel.placement import param_specs, shard_model
from jaxmoe.parallel.rules import MeshError, logical_to_spec

Box = tuple[tuple[int, int], ...]


class ParamSource(Protocol):
    """Our parameters by logical name, in our layout (whatever the file's).

    `check` is called once, before any read, with every parameter's logical shape and slot; it raises a one-line
    error naming the file and the tensor when one is missing or has another shape. `read(name, regions, outs)`
    gives parameter `name` over each region (step-1 slices of its logical shape), written into `outs` (cast to
    their dtype). `done(name)` says that `name` is copied, so the source may drop what it holds for it."""

    where: Any

    def check(self, targets: Mapping[str, Target]) -> None: ...
    def read(self, name: str, regions: Sequence[Region] | None = None,
             outs: Sequence[np.ndarray] | None = None) -> list[np.ndarray]: ...
    def done(self, name: str) -> None: ...


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary (what XLA:CPU needs
    to use a host buffer in place)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    """A device's index (slices, possibly fewer than dimensions) as ((start, stop), ...) over every dimension."""
    out = []
    for i, n in enumerate(shape):
        start, stop, step = (index[i] if i < len(index) else slice(None)).indices(n)
        if step != 1:
            raise ValueError(f"unexpected strided shard index {index}")
        out.append((start, stop))
    return tuple(out)


def _host_array(source: ParamSource, members: list[tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                dtype: np.dtype) -> jax.Array:
    """One parameter array on the default device: one aligned host buffer, each logical parameter copied into
    its index once (the only copy: device_put takes an aligned host array as it is on CPU)."""
    buf = _aligned_empty(shape, dtype)
    for name, index in members:
        out = buf[index]
        source.read(name, [full_region(out.shape)], [out])
        source.done(name)
    return jax.device_put(buf)


def _sharded_array(source: ParamSource, members: list[tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                   dtype: np.dtype, sharding: NamedSharding) -> jax.Array:
    """One parameter array placed by `sharding`: this process reads only the distinct regions its own devices
    hold, each once (devices holding the same region share it), and each logical parameter's part of them."""
    boxes = {_box(index, shape) for index in sharding.addressable_devices_indices_map(shape).values()}
    buffers = {b: _aligned_empty(tuple(hi - lo for lo, hi in b), dtype) for b in sorted(boxes)}
    for name, index in members:
        regions, outs = [], []
        for b, buf in buffers.items():
            lead = b[:len(index)]
            if all(lo <= i < hi for i, (lo, hi) in zip(index, lead)):  # this region holds the parameter's layer
                regions.append(tuple(slice(lo, hi) for lo, hi in b[len(index):]))
                outs.append(buf[tuple(i - lo for i, (lo, _) in zip(index, lead))])
        if regions:
            source.read(name, regions, outs)
        source.done(name)
    return jax.make_array_from_callback(shape, sharding, lambda index: buffers[_box(index, shape)])


def materialize(config: ModelConfig, source: ParamSource, dtype: str | None = None, mesh: Mesh | None = None
                ) -> Transformer:
    """A `config` model whose parameters come from `source`, cast to `dtype` (default config.dtype).

    Without a mesh every parameter array is one host buffer put on the default device. With a mesh every array
    is created in its sharding by the rule table, each process reading only its own devices' regions, and the
    model is handed to the placement function (`shard_model`: MoE blocks switched to expert parallelism); run it
    under `jax.set_mesh(mesh)`. The mesh is checked against `config` before the source is touched (MeshError),
    then every parameter against the source (the source's one-line errors), before any tensor is read."""
    if mesh is not None:
        check_mesh(config, mesh)
    model = abstract_model(config, dtype)
    specs = param_specs(model, mesh) if mesh is not None else {}  # MeshError for a dimension that does not divide
    targets = param_targets(model)
    source.check(targets)
    members: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, t in targets.items():
        members.setdefault(t.slot.path, []).append((name, tuple(t.slot.index)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):  # state besides parameters (e.g. per-layer constants) comes from the config: built
        # for real, with the parameters left unused so that XLA never computes them
        rest = jax.jit(lambda: nnx.split(Transformer(config, dtype=dtype), nnx.Param, ...)[2])()
        if mesh is not None:
            rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    dt = np.dtype(jnp.dtype(model.config.dtype))
    flat = nnx.to_flat_state(params)
    for path, var in flat:
        key = ".".join(map(str, path))
        if key not in members:
            raise TypeError(f"parameter array '{key}' has no logical name in param_slots")
        shape = tuple(var.get_value().shape)
        var.set_value(_host_array(source, members[key], shape, dt) if mesh is None
                      else _sharded_array(source, members[key], shape, dt, NamedSharding(mesh, specs[key])))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
    return model if mesh is None else shard_model(model, mesh)


def _orbax_params(path: Path) -> Any:
    # orbax and tensorstore cost seconds to import; HF and GGUF loads never need them.
    from jaxmoe.train.checkpoint_sharded import OrbaxParams

    return OrbaxParams(path)


def _is_orbax(path: Path) -> bool:
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    from jaxmoe.train.checkpoint import is_orbax_checkpoint

    return is_orbax_checkpoint(path)


def open_source(path: str | Path, mesh: Mesh | None = None) -> tuple[ModelConfig, ParamSource, str]:
    """(config, our parameters, default dtype) of an HF directory, a `.gguf` file or a jaxmoe orbax checkpoint;
    opening reads the configuration and the files' headers, no tensor. The default dtype is the checkpoint's
    (GGUF: float32). A `mesh` is checked against the configuration before any weights file is opened. `path`
    may be a Hub id (`org/name[@revision]`, `converters.hub`): its local Hugging Face cache snapshot is read."""
    path = resolve_model(path)
    if _is_orbax(path):
        source = _orbax_params(path)
        if mesh is not None:
            check_mesh(source.config, mesh)
        return source.config, source, source.config.dtype
    if path.suffix == ".gguf":
        config, tensors = read_gguf(path)  # the configuration is in the file's metadata
        if mesh is not None:
            check_mesh(config, mesh)
        return config, HFParams(config, tensors, str(path)), "float32"
    config = read_config(path)
    if mesh is not None:
        check_mesh(config, mesh)
    return config, HFParams(config, CheckpointReader(path), str(path)), config.dtype


def load(path: str | Path, dtype: str | None = None, mesh: Mesh | str | None = None) -> Transformer:
    """Load a model from an HF directory (dense or MoE, single or sharded safetensors), a `.gguf` file or a
    jaxmoe orbax checkpoint (a training run's output dir, its `checkpoints/` dir or one step's dir, or
    `jaxmoe convert --to orbax` output); `model(input_ids)` gives logits.

    dtype: float32 / bfloat16 / float16; None: bfloat16 on TPU/GPU (half the memory of float32 and the MXU's
    native type), the checkpoint's dtype on CPU (GGUF: float32).
    mesh: a `jax.sharding.Mesh` or mesh spec string ('expert=4,data=2'); the model comes back sharded with
    expert parallelism, each process reading only its devices' slices (HF safetensors and orbax; quantized GGUF
    blocks cannot be sliced, so there each process dequantizes the tensors its devices need, whole).
    """
    mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
    config, source, default_dtype = open_source(path, mesh)
    return materialize(config, source, dtype or default_load_dtype(default_dtype), mesh)


def default_load_dtype(checkpoint_dtype: str) -> str:
    """What `load` gives when no dtype is asked for: bfloat16 on TPU/GPU, the checkpoint's dtype on CPU."""
    return checkpoint_dtype if on_cpu() else "bfloat16"


class LayerSource:
    """A checkpoint's token embedding and decoder layers, each read when asked for: `layer(i)` is decoder layer i
    as a module of its own (what `Transformer.layer(i)` gives of a loaded model), its arrays in `dtype` (default
    the config's), read from `source` only then, and so is the token embedding (`embed`, read on every access:
    a layer-by-layer pass needs it once, before the first layer). Holding one layer at a time bounds memory by
    one layer (or the embedding), whatever the depth. `config`, `embed` and `layer` are what a layer-by-layer
    pass needs of a `Transformer` too.

    With a mesh every array is placed by the rule table (`jaxmoe.parallel.rules`) where it divides the mesh and
    replicated where it does not (the mesh is for the pass's batch; it need not fit the model), each process
    reading only the regions its own devices hold. `source` is checked against the whole model once, here."""

    def __init__(self, config: ModelConfig, source: ParamSource, dtype: str | None = None,
                 mesh: Mesh | None = None) -> None:
        self.config, self.source, self.mesh = config, source, mesh
        self.dtype = np.dtype(jnp.dtype(dtype or config.dtype))
        model = abstract_model(config, dtype)
        self._targets = param_targets(model)
        source.check(self._targets)
        self._axes = {".".join(map(str, p)): tuple(v.get_metadata()["axes"])
                      for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        self._stacks = [(group, nnx.split(stack)) for group, stack in zip(layer_stacks(config), model.stacks)]

    @property
    def embed(self) -> jax.Array:
        """The token embedding [V, H], read from the source now (at Mistral-7B width 262 MB in bfloat16: held
        through the layers it would outweigh a decoder layer's activations)."""
        return self._read("embed")

    def _read(self, name: str) -> jax.Array:
        t = self._targets[name]
        if self.mesh is None:
            return _host_array(self.source, [(name, ())], t.shape, self.dtype)
        axes = self._axes[t.slot.path][len(t.slot.index):]  # without the stacked layers' axis
        try:
            spec = logical_to_spec(axes, t.shape, self.mesh, name)
        except MeshError:
            spec = PartitionSpec()
        return _sharded_array(self.source, [(name, ())], t.shape, self.dtype, NamedSharding(self.mesh, spec))

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i, read now (drop it before asking for the next to keep one layer in memory; a merged
        module's arrays go at the next garbage collection, `layer_state`'s as soon as they are dropped)."""
        return nnx.merge(*self.layer_state(i))

    def layer_state(self, i: int) -> tuple[nnx.GraphDef, nnx.State]:
        """`nnx.split(self.layer(i))` without building the module (nnx.merge leaves reference cycles)."""
        for group, (graphdef, state) in self._stacks:
            if i in group:
                return graphdef, nnx.from_flat_state([(p, v.replace(self._read(f"layers.{i}." + ".".join(map(str, p)))))
                                                      for p, v in nnx.to_flat_state(state)])
        raise IndexError(f"layer {i} of a {self.config.num_layers}-layer model")


def open_layers(path: str | Path, dtype: str | None = None, mesh: Mesh | str | None = None) -> LayerSource:
    """`LayerSource` of an HF directory, a `.gguf` file or a jaxmoe orbax checkpoint; dtype None keeps the
    checkpoint's (GGUF: float32). Reads the configuration and the headers, no tensor."""
    config, source, default_dtype = open_source(path)  # no check_mesh: the mesh need not fit the model
    return LayerSource(config, source, dtype or default_dtype, make_mesh(mesh) if isinstance(mesh, str) else mesh)


def load_orbax_model(path: str | Path, dtype: str | None = None, mesh: Mesh | str | None = None) -> Transformer:
    """`load` for a path that must be a jaxmoe orbax checkpoint (FileNotFoundError, one line, when it is not).
    Trainable parameters kept in a float32 master copy are cast to `dtype` (default: the model's dtype)."""
    source = _orbax_params(Path(path))  # reads the metadata only
    return materialize(source.config, source, dtype, make_mesh(mesh) if isinstance(mesh, str) else mesh)
