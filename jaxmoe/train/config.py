"""The training config: its schema, defaults and validation (one-line errors naming the field)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from jaxmoe.nn.config import DTYPES

TRAINABLE = ("router", "experts", "router+experts", "mlp", "all")


class TrainConfigError(ValueError):
    """A bad training config; the message names the field."""


# --- the config -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; `load_config` reads it from YAML (see configs/train/router.yml)."""

    model: str
    output_dir: str
    train_data: tuple[str, ...]
    eval_data: tuple[str, ...] = ()
    tokenizer: str | None = None
    text_field: str = "text"
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    shuffle_buffer: int = 1024
    eval_sequences: int = 64
    steps: int = 1000
    seed: int = 0
    trainable: str = "router"
    param_dtype: str | None = None
    master_dtype: str = "float32"
    optimizer: str = "adamw"
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_every: int = 0
    log_every: int = 10
    mesh: str | None = None
    moe_impl: str = "grouped"  # or "dense"; with a `mesh` the MoE blocks run "expert_parallel" instead
    remat: str = "none"  # recompute layer activations in the backward pass: none | full | dots


# YAML key -> (TrainConfig field, kind); kinds: str, int, float, bool, paths; a trailing '?' allows null.
SCHEMA: dict[str, tuple[str, str]] = {
    "model": ("model", "str"), "output_dir": ("output_dir", "str"), "tokenizer": ("tokenizer", "str?"),
    "seed": ("seed", "int"), "steps": ("steps", "int"), "trainable": ("trainable", "str"),
    "mesh": ("mesh", "str?"), "log_every": ("log_every", "int"), "moe_impl": ("moe_impl", "str"),
    "remat": ("remat", "str"),
    "data.train": ("train_data", "paths"), "data.eval": ("eval_data", "paths?"),
    "data.text_field": ("text_field", "str"), "data.seq_len": ("seq_len", "int"),
    "data.batch_size": ("batch_size", "int"), "data.grad_accum": ("grad_accum", "int"),
    "data.shuffle_buffer": ("shuffle_buffer", "int"),
    "precision.param_dtype": ("param_dtype", "str?"), "precision.master_dtype": ("master_dtype", "str"),
    "optimizer.name": ("optimizer", "str"), "optimizer.lr": ("lr", "float"),
    "optimizer.warmup_steps": ("warmup_steps", "int"), "optimizer.schedule": ("schedule", "str"),
    "optimizer.min_lr_ratio": ("min_lr_ratio", "float"), "optimizer.weight_decay": ("weight_decay", "float"),
    "optimizer.b1": ("b1", "float"), "optimizer.b2": ("b2", "float"), "optimizer.eps": ("eps", "float"),
    "optimizer.clip_norm": ("clip_norm", "float?"),
    "loss.router_aux_loss_coef": ("router_aux_loss_coef", "float?"),
    "loss.router_z_loss_coef": ("router_z_loss_coef", "float"),
    "checkpoint.every": ("checkpoint_every", "int"), "checkpoint.keep": ("keep_checkpoints", "int"),
    "checkpoint.async": ("async_checkpoint", "bool"),
    "eval.every": ("eval_every", "int"), "eval.sequences": ("eval_sequences", "int"),
}
REQUIRED = ("model", "output_dir", "data.train")
SECTIONS = {k.split(".")[0] for k in SCHEMA if "." in k}
CHOICES = {"trainable": TRAINABLE, "optimizer.name": ("adamw", "sgd"), "optimizer.schedule": ("cosine", "constant"),
           "precision.param_dtype": DTYPES, "precision.master_dtype": ("float32", "param"),
           "moe_impl": ("grouped", "dense"), "remat": ("none", "full", "dots")}
POSITIVE = ("steps", "data.seq_len", "data.batch_size", "data.grad_accum", "data.shuffle_buffer", "log_every",
            "checkpoint.every", "checkpoint.keep", "optimizer.lr")
NON_NEGATIVE = ("optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.min_lr_ratio", "eval.every",
                "eval.sequences",
                "loss.router_aux_loss_coef", "loss.router_z_loss_coef", "optimizer.clip_norm", "optimizer.eps")


def _value(key: str, kind: str, v: Any, source: str) -> Any:
    err = lambda what: TrainConfigError(f"{source}: {key}: {what}, got {v!r}")  # noqa: E731
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if v is None:
        if optional:
            return () if kind == "paths" else None
        raise err("is required")
    if kind == "paths":
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v or not all(isinstance(p, str) and p for p in v):
            raise err("expected a file path or a list of file paths")
        return tuple(v)
    if kind == "str" and not isinstance(v, str):
        raise err("expected a string")
    if kind == "bool" and not isinstance(v, bool):
        raise err("expected true or false")
    if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
        raise err("expected an integer")
    if kind == "float":
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                v = float(v)
            except ValueError:
                raise err("expected a number") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise err("expected a number")
        v = float(v)
    return v


def parse_config(d: Any, source: str = "config") -> TrainConfig:
    """Validate a config dict (the YAML document); TrainConfigError names the first bad field."""
    if not isinstance(d, dict):
        raise TrainConfigError(f"{source}: expected a mapping of fields at the top level")
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise TrainConfigError(f"{source}: {k}: expected a mapping of fields")
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2
        else:
            flat[str(k)] = v
    unknown = sorted(set(flat) - set(SCHEMA))
    if unknown:
        raise TrainConfigError(f"{source}: {unknown[0]}: unknown field; known fields: {', '.join(SCHEMA)}")
    values = {}
    for key, (name, kind) in SCHEMA.items():
        if key not in flat:
            if key in REQUIRED:
                raise TrainConfigError(f"{source}: {key}: is required")
            continue  # the dataclass default
        values[name] = _value(key, kind, flat[key], source)
        v = values[name]
        if key in CHOICES and v is not None and v not in CHOICES[key]:
            raise TrainConfigError(f"{source}: {key}: '{v}' is not one of {', '.join(CHOICES[key])}")
        if key in POSITIVE and v <= 0:
            raise TrainConfigError(f"{source}: {key}: must be positive, got {v}")
        if key in NON_NEGATIVE and v is not None and v < 0:
            raise TrainConfigError(f"{source}: {key}: must not be negative, got {v}")
    cfg = TrainConfig(**values)
    if cfg.batch_size % cfg.grad_accum:
        raise TrainConfigError(f"{source}: data.grad_accum: {cfg.grad_accum} does not divide data.batch_size "
                               f"{cfg.batch_size}")
    if cfg.seq_len < 2:
        raise TrainConfigError(f"{source}: data.seq_len: must be at least 2 (one prediction), got {cfg.seq_len}")
    if cfg.warmup_steps > cfg.steps:
        raise TrainConfigError(f"{source}: optimizer.warmup_steps: {cfg.warmup_steps} > steps {cfg.steps}")
    if not 0 < cfg.b1 < 1 or not 0 < cfg.b2 < 1:
        raise TrainConfigError(f"{source}: optimizer.b1/b2: must be in (0, 1), got {cfg.b1}, {cfg.b2}")
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training config")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_config(d, str(path))
