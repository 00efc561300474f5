"""Orbax checkpoints of training runs, and models stored as orbax checkpoints.

A checkpoint directory (`OUT/checkpoints`) holds one numbered folder per saved step, each with three
items: `params` ({"frozen": {path: array}, "trainable": {path: array}}; trainable parameters in the
master dtype), `opt_state` (the optax state of the trainable parameters) and `meta` (JSON: step, data
position, PRNG key, ModelConfig, tokenizer path, which parameters train, dtypes). `load_orbax_model`
turns any of them back into a Transformer without the optimizer state.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import Transformer

FORMAT = "jaxmoe-checkpoint-1"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model or run it is restored into."""


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


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping each array's sharding) to restore into."""
    def one(x):
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


# --- the run checkpointer -----------------------------------------------------------------------
class Checkpointer:
    """Saves and restores training state under `directory`, keeping the last `keep` steps."""

    def __init__(self, directory: str | Path, keep: int = 3, use_async: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, frozen: dict, trainable: dict, opt_state: Any, meta: dict[str, Any]) -> None:
        """Start saving (asynchronously when enabled); the previous save is finished first."""
        params = {k: v for k, v in (("frozen", frozen), ("trainable", trainable)) if v}
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave({"format": FORMAT, **meta})}
        if jax.tree.leaves(opt_state):
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatch(f"{self.directory / str(step)}: does not fit this run's model and "
                                     f"optimizer ({first[:300]})") from None
        return r.params.get("frozen", {}), r.params.get("trainable", {}), r.opt_state

    def wait(self) -> None:
        """Block until pending saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --- models as orbax checkpoints ----------------------------------------------------------------
def _locate(path: str | Path) -> tuple[Path, int]:
    """(checkpoint manager directory, step) for a run dir, a checkpoints dir or one step's dir."""
    path = Path(path).absolute()
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
        _locate(path)
        return True
    except (FileNotFoundError, OSError):
        return False


def read_orbax_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata (model_config, tokenizer, step, ...) of the newest step under `path`."""
    root, step = _locate(path)
    return json.loads((root / str(step) / "meta" / "metadata").read_text())


def save_frozen(path: str | Path, frozen: dict[str, jax.Array]) -> None:
    """Write the frozen parameters once per run (they never change, so checkpoints do not repeat them)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(path).absolute(), frozen, force=True)
    ckptr.wait_until_finished()
    ckptr.close()


def restore_frozen(path: str | Path, abstract: dict[str, Any]) -> dict[str, jax.Array]:
    """Read what `save_frozen` wrote, as `abstract` (ShapeDtypeStructs) says."""
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(Path(path).absolute(), abstract)
    finally:
        ckptr.close()


def load_orbax_model(path: str | Path, dtype: str | None = None, moe_impl: str = "ragged") -> Transformer:
    """A Transformer from a jaxmoe orbax checkpoint: a training run's output dir, its `checkpoints/` dir
    (the newest step) or one step's dir. Trainable parameters kept in a float32 master copy are cast to
    `dtype` (default: the model's dtype when it was trained)."""
    root, step = _locate(path)
    meta = read_orbax_meta(root / str(step))
    config = config_from_json(meta["model_config"])
    model = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, moe_impl=moe_impl))
    graphdef, state = nnx.split(model)
    shapes = flat_params(state)
    groups, dtypes = meta.get("param_groups", {}), meta.get("dtypes", {})

    def abstract(group: str) -> dict[str, jax.ShapeDtypeStruct]:
        unknown = [n for n in groups.get(group, []) if n not in shapes]
        if unknown:
            raise CheckpointMismatch(f"{root / str(step)}: parameter '{unknown[0]}' is not in a "
                                     f"{config.model_type} model")
        dt = jnp.dtype(dtypes.get(group, config.dtype))
        return {n: jax.ShapeDtypeStruct(shapes[n].shape, dt) for n in groups.get(group, [])}

    in_step = {g: abstract(g) for g in ("frozen", "trainable") if groups.get(g) and
               not (g == "frozen" and meta.get("frozen_dir"))}
    flat: dict[str, Any] = {}
    if in_step:
        mgr = ocp.CheckpointManager(root)
        try:
            r = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(in_step)))
        finally:
            mgr.close()
        for group in r.params.values():
            flat.update(group)
    if meta.get("frozen_dir") and groups.get("frozen"):
        frozen_dir = root.parent / meta["frozen_dir"]
        if not frozen_dir.is_dir():
            raise FileNotFoundError(f"{frozen_dir}: the frozen parameters of {root / str(step)} are missing")
        flat.update(restore_frozen(frozen_dir, abstract("frozen")))
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise CheckpointMismatch(f"{root / str(step)}: parameter '{missing[0]}' is missing")
    target = jnp.dtype(model.config.dtype)
    values = {k: jnp.asarray(np.asarray(v)).astype(target) for k, v in flat.items()}
    return nnx.merge(graphdef, state_from_flat(values))


def save_orbax_model(model: Transformer, path: str | Path, tokenizer: str | None = None) -> Path:
    """Write `model` as a one-step (step 0) jaxmoe orbax checkpoint at `path` (a new directory)."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    flat = flat_params(nnx.state(model))
    ckpt = Checkpointer(path, keep=1, use_async=False)
    meta = {"step": 0, "model_config": config_to_json(model.config), "tokenizer": tokenizer,
            "param_groups": {"frozen": sorted(flat), "trainable": []},
            "dtypes": {"frozen": model.config.dtype}}
    ckpt.save(0, flat, {}, {}, meta)
    ckpt.close()
    return path
