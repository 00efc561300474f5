"""Orbax checkpoints of training runs, and models stored as orbax checkpoints.

A checkpoint directory (`OUT/checkpoints`) holds one numbered folder per saved step, each with three
items: `params` ({"frozen": {path: array}, "trainable": {path: array}}; trainable parameters in the
master dtype), `opt_state` (the optax state of the trainable parameters) and `meta` (JSON: step, data
position, PRNG key, ModelConfig, tokenizer path, which parameters train, dtypes). A model stored as an orbax
checkpoint (`save_orbax_model`) is one step whose parameters are all frozen, by LOGICAL name
('layers.3.attn.q_proj', as `jaxmoe.nn.model.param_slots` names them), so it reads back whatever way the model
keeps its layers. Any of them loads as a model through the one loader, `converters.load` (the parameters are
read by `jaxmoe.train.checkpoint_sharded.OrbaxParams`); this module keeps what a training run needs to save and
restore itself.

Arrays are written in bounded zarr chunks (`CHUNK_BYTES`, one expert per chunk along an expert axis), so
a slice is read as roughly its own bytes whatever mesh the checkpoint is later loaded onto.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.model import Transformer, param_slots

FORMAT = "jaxmoe-checkpoint-1"


CHUNK_BYTES = 1 << 20  # bound on one stored chunk: orbax's smallest recommended size


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model or run it is restored into."""


class CheckpointCorrupt(ValueError):
    """A checkpoint whose metadata or arrays cannot be read (the message is one line naming it)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


# --- ModelConfig <-> JSON -----------------------------------------------------------------------
def config_to_json(config: ModelConfig) -> dict[str, Any]:
    """A JSON-able dict of every ModelConfig field."""
    d = dataclasses.asdict(config)
    d["rope_scaling"] = [list(kv) for kv in config.rope_scaling]
    return d


def config_from_json(d: dict[str, Any]) -> ModelConfig:
    """The inverse of `config_to_json` (lists back to tuples)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in d.items() if k in fields}
    for k in ("layer_types", "moe_layers", "eos_token_id"):
        if k in d and d[k] is not None:
            d[k] = tuple(d[k])
    d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling") or ())
    return ModelConfig(**d)


def config_difference(a: ModelConfig, b: ModelConfig, ignore: tuple[str, ...] = ("dtype",)) -> str | None:
    """'hidden_size 64 vs 32' for the first differing field (shape-relevant ones), or None."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in ignore:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            return f"{f.name} {va} vs {vb}"
    return None


# --- flat parameter dicts -----------------------------------------------------------------------
def path_key(path: tuple) -> str:
    """('layers', 0, 'mlp', 'router') -> 'layers.0.mlp.router'."""
    return ".".join(map(str, path))


def flat_params(state: nnx.State) -> dict[str, jax.Array]:
    """{dotted path: array} of an nnx State."""
    return {path_key(p): v for p, v in nnx.to_flat_state(nnx.as_pure(state))}


def state_from_flat(flat: dict[str, Any]) -> nnx.State:
    """The inverse of `flat_params`."""
    return nnx.from_flat_state({tuple(int(x) if x.isdigit() else x for x in k.split(".")): v
                                for k, v in flat.items()})


def param_axes(config: ModelConfig) -> dict[str, tuple]:
    """{name: logical axes} of every parameter of a `config` model (no memory allocated), under both its dotted
    state path (what a run's flat parameter dicts hold) and its logical name (what model checkpoints hold; a
    layer of a stacked array has the array's axes without the leading layer axes)."""
    model = nnx.eval_shape(lambda: Transformer(config))
    axes = {path_key(p): tuple(v.get_metadata().get("axes") or ())
            for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    return {**axes, **{name: axes[s.path][len(s.index):] for name, s in param_slots(model).items()}}


def storage_args(tree: Any, axes: dict[str, tuple] | None = None, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """`ocp.SaveArgs` for every array of `tree`: zarr chunks of at most `chunk_bytes`, and one expert per
    chunk along an 'expert' axis (found through `axes` for the innermost dict key naming a parameter, so
    optimizer states shaped like the parameters are chunked the same way)."""
    axes = axes or {}

    def one(path: tuple, leaf: Any) -> ocp.SaveArgs:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        logical = next((axes[n] for n in reversed(names) if n in axes), ())
        split = tuple(i for i, a in enumerate(logical) if a == "expert") \
            if len(logical) == np.ndim(leaf) else ()
        return ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=split)

    return jax.tree_util.tree_map_with_path(one, tree)


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping each array's sharding) to restore into."""
    def one(x):
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


# --- the run checkpointer -----------------------------------------------------------------------
class Checkpointer:
    """Saves and restores training state under `directory`, keeping the last `keep` steps."""

    def __init__(self, directory: str | Path, keep: int = 3, use_async: bool = True,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.directory = Path(directory).absolute()
        self.chunk_bytes = chunk_bytes
        self._axes: tuple[dict, dict[str, tuple]] | None = None  # (model_config JSON, its param_axes)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, frozen: dict, trainable: dict, opt_state: Any, meta: dict[str, Any]) -> None:
        """Start saving (asynchronously when enabled); the previous save is finished first."""
        params = {k: v for k, v in (("frozen", frozen), ("trainable", trainable)) if v}
        axes = self._param_axes(meta.get("model_config"))
        items = {"params": ocp.args.StandardSave(params, save_args=storage_args(params, axes, self.chunk_bytes)),
                 "meta": ocp.args.JsonSave({"format": FORMAT, **meta})}
        if jax.tree.leaves(opt_state):
            items["opt_state"] = ocp.args.StandardSave(
                opt_state, save_args=storage_args(opt_state, axes, self.chunk_bytes))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _param_axes(self, config_json: dict | None) -> dict[str, tuple]:
        """param_axes of the model in the metadata (cached; {} without one)."""
        if not config_json:
            return {}
        if self._axes is None or self._axes[0] != config_json:
            self._axes = (config_json, param_axes(config_from_json(config_json)))
        return self._axes[1]

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of one step."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, frozen: dict, trainable: dict, opt_state: Any) -> tuple[dict, dict, Any]:
        """(frozen, trainable, opt_state) of `step`, restored with the given arrays' shapes, dtypes and
        shardings; CheckpointMismatch if the saved arrays do not fit."""
        params = {k: v for k, v in (("frozen", frozen), ("trainable", trainable)) if v}
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state))))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatch(f"{self.directory / str(step)}: does not fit this run's model and "
                                     f"optimizer ({first_line(e)})") from None
        return r.params.get("frozen", {}), r.params.get("trainable", {}), r.opt_state

    def wait(self) -> None:
        """Block until pending saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --- models as orbax checkpoints ----------------------------------------------------------------
def locate_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(checkpoint manager directory, step) for a run dir, a checkpoints dir or one step's dir (the newest
    step); FileNotFoundError (one line) when `path` holds no jaxmoe checkpoint."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "meta").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "meta").is_dir()) \
        if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path}: not an orbax checkpoint of jaxmoe (no step folders with 'meta')")
    return root, steps[-1]


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a run directory, checkpoints directory or step directory written by jaxmoe."""
    try:
        locate_checkpoint(path)
        return True
    except (FileNotFoundError, OSError):
        return False


def read_orbax_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata (model_config, tokenizer, step, ...) of the newest step under `path`."""
    root, step = locate_checkpoint(path)
    f = root / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"{f}: unreadable checkpoint metadata ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(f"{f}: checkpoint metadata is not a JSON object")
    return meta


def meta_config(meta: dict[str, Any], where: str | Path) -> ModelConfig:
    """The ModelConfig recorded in a step's metadata; CheckpointCorrupt when it is missing or invalid."""
    try:
        return config_from_json(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorrupt(f"{where}: no valid model_config in the checkpoint metadata "
                                f"({first_line(e)})") from None


def save_frozen(path: str | Path, frozen: dict[str, jax.Array], config: ModelConfig | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write the frozen parameters once per run (they never change, so checkpoints do not repeat them), in
    chunks of at most `chunk_bytes` (one expert per chunk when `config` names the expert axes)."""
    axes = param_axes(config) if config is not None else None
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(path).absolute(), frozen, save_args=storage_args(frozen, axes, chunk_bytes), force=True)
    ckptr.wait_until_finished()
    ckptr.close()


def check_item(directory: Path, what: str) -> None:
    """FileNotFoundError (one line) unless the orbax item `directory` exists."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: {what} of the checkpoint are missing")


def save_orbax_model(model: Transformer, path: str | Path, tokenizer: str | None = None,
                     chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Write `model` as a one-step (step 0) jaxmoe orbax checkpoint at `path` (a new directory), its parameters
    by logical name, in zarr chunks of at most `chunk_bytes` (one expert per chunk), so sharded loads read only
    their slices."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    arrays = flat_params(nnx.state(model, nnx.Param))
    flat = {name: arrays[s.path][s.index] if s.index else arrays[s.path] for name, s in param_slots(model).items()}
    ckpt = Checkpointer(path, keep=1, use_async=False, chunk_bytes=chunk_bytes)
    meta = {"step": 0, "model_config": config_to_json(model.config), "tokenizer": tokenizer,
            "param_groups": {"frozen": sorted(flat), "trainable": []},
            "dtypes": {"frozen": model.config.dtype}}
    ckpt.save(0, flat, {}, {}, meta)
    ckpt.close()
    return path
