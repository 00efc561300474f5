"""Fine-tuning runs: `Trainer` trains a model as a training config says (frozen/trainable split, float32
master weights), evaluates on held-out data, writes orbax checkpoints with exact resume and the reports.

The model is split once into a graph, the trainable parameters (kept in the master dtype, the only ones
with optimizer state) and the frozen ones; the step is one jitted function of flat {path: array} dicts.
The optimizer and steps are in `jaxmoe.train.step`, losses in `jaxmoe.train.losses`, data in
`jaxmoe.train.data`, checkpoints in `jaxmoe.train.checkpoint`, logs and reports in `jaxmoe.train.reports`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.kernels.backend import training_kernel
from jaxmoe.nn.model import Transformer
from jaxmoe.parallel.mesh import use_mesh
from jaxmoe.train.checkpoint import (CheckpointMismatch, Checkpointer, config_difference, config_from_json,
                                     config_to_json, flat_params)
from jaxmoe.train.config import TrainConfig, TrainConfigError, load_config, parse_config  # noqa: F401
from jaxmoe.train.data import DataState, PackedStream, batches, eval_sequences
from jaxmoe.train.reports import jsonl_keep, write_reports
from jaxmoe.train.step import (evaluate_batches, learning_rate, make_eval_step, make_optimizer, make_train_step,
                               model_from_flat, trainable_filter)

log = logging.getLogger(__name__)


# --- the run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds."""

    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any
    step: int
    rng: jax.Array
    data: DataState


class Trainer:
    """One training run of `model` as `cfg` says; `run()` trains, evaluates, checkpoints and reports."""

    def __init__(self, cfg: TrainConfig, model: Transformer, tokenizer: Any, tokenizer_path: str | None = None,
                 mesh: Any = None, print_fn: Callable[[str], None] = print) -> None:
        c = model.config
        self.cfg, self.tokenizer, self.tokenizer_path, self.print = cfg, tokenizer, tokenizer_path, print_fn
        if cfg.seq_len > c.max_position_embeddings:
            raise TrainConfigError(f"data.seq_len: {cfg.seq_len} is longer than the model's "
                                   f"max_position_embeddings {c.max_position_embeddings}")
        self.mesh = mesh
        if mesh is None:
            # the backend's training kernel: on CPU one whose backward keeps residuals for the routed rows only
            model.set_moe_impl(cfg.moe_impl, **({"kernel": training_kernel()} if cfg.moe_impl == "grouped" else {}))
        else:
            from jaxmoe.parallel.placement import shard_model

            model = shard_model(model, mesh)  # MoE blocks switch to expert parallelism
        model.set_remat(cfg.remat)
        self.config = c
        graphdef, tr, fr = nnx.split(model, trainable_filter(c, cfg.trainable), ...)
        trainable, self.frozen = flat_params(tr), flat_params(fr)
        if not trainable:
            kind = f"a dense {c.model_type} model" if not c.is_moe else f"a {c.model_type} model"
            raise TrainConfigError(f"trainable: '{cfg.trainable}' selects no parameters of {kind}; nothing to train")
        self.dtypes = {k: v.dtype for k, v in trainable.items()}
        self.master_dtype = "float32" if cfg.master_dtype == "float32" else c.dtype
        self.tx = make_optimizer(cfg)
        aux = (cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else c.router_aux_loss_coef) \
            if c.is_moe else 0.0
        self.aux_coef, self.z_coef = aux, cfg.router_z_loss_coef if c.is_moe else 0.0
        self.step_fn = jax.jit(make_train_step(graphdef, self.dtypes, self.tx, learning_rate(cfg), self.aux_coef,
                                               self.z_coef), donate_argnums=(0, 2))
        self.eval_fn = jax.jit(make_eval_step(graphdef, self.dtypes))
        self.graphdef = graphdef
        master = jax.jit(lambda t: jax.tree.map(lambda v: v.astype(self.master_dtype), t))(trainable)
        opt_state = self._on_mesh(self.tx.init(master))  # eager: moments keep their parameter's sharding
        self.state = TrainState(master, self.frozen, opt_state, 0, jax.random.key_data(jax.random.key(cfg.seed)),
                                DataState())
        self.micro = cfg.batch_size // cfg.grad_accum
        self.batch_sharding = self._batch_sharding()
        self.out = Path(cfg.output_dir)
        self.main_process = jax.process_index() == 0  # the one that writes metrics and reports
        self._eval_set: tuple[np.ndarray, np.ndarray] | None = None

    def _on_mesh(self, tree: Any) -> Any:
        """Arrays not yet placed on the mesh (optimizer counters) replicated over it, so the step's inputs
        and outputs are placed alike and it compiles once."""
        if self.mesh is None:
            return tree
        from jax.sharding import NamedSharding, PartitionSpec as P

        def put(x):
            s = getattr(x, "sharding", None)
            if isinstance(s, NamedSharding) and s.mesh == self.mesh:
                return x
            return jax.device_put(x, NamedSharding(self.mesh, P()))

        return jax.tree.map(put, tree)

    def _batch_sharding(self):
        """Micro-batches [A, b, T] split over the mesh's batch axes (the rule table)."""
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding

        from jaxmoe.parallel.rules import logical_to_spec

        shape = (self.cfg.grad_accum, self.micro, self.cfg.seq_len)
        return NamedSharding(self.mesh, logical_to_spec((None, "batch", None), shape, self.mesh))

    def model(self) -> Transformer:
        """The model with the current trainable parameters (in the model dtype)."""
        return model_from_flat(self.graphdef, self.state.trainable, self.state.frozen, self.dtypes)

    # --- evaluation
    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """Held-out sequences: the first eval.sequences of data.eval (or of data.train when none)."""
        if self._eval_set is None:
            cfg = self.cfg
            files, field = (cfg.eval_data, "data.eval") if cfg.eval_data else (cfg.train_data, "data.train")
            self._eval_set = eval_sequences(files, self.tokenizer, cfg.seq_len, cfg.text_field,
                                            self._pad_id(), cfg.eval_sequences, field)
        return self._eval_set

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss, perplexity and per-layer expert load with the current parameters."""
        ids, mask = self.eval_set()
        with use_mesh(self.mesh):
            return evaluate_batches(self.eval_fn, self.state.trainable, self.state.frozen,
                                    batches(zip(ids, mask), self.micro))

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else (self.config.pad_token_id or 0))

    # --- checkpoints
    def _meta(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        return {"step": s.step, "data": s.data.to_json(), "rng": np.asarray(s.rng).tolist(),
                "model_config": config_to_json(self.config), "tokenizer": self.tokenizer_path,
                "trainable": cfg.trainable, "frozen_dir": "frozen" if self.frozen else None,
                "param_groups": {"frozen": sorted(self.frozen), "trainable": sorted(s.trainable)},
                "dtypes": {"frozen": self.config.dtype, "trainable": self.master_dtype},
                "run": {"seed": cfg.seed, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                        "train_data": list(cfg.train_data), "steps": cfg.steps}}

    def _restore(self, ckpt: Checkpointer, step: int) -> None:
        meta = ckpt.read_meta(step)
        where = ckpt.directory / str(step)
        diff = config_difference(config_from_json(meta["model_config"]), self.config)
        if diff:
            raise CheckpointMismatch(f"{where}: the checkpoint is of another model shape "
                                     f"({diff.replace(' vs ', ' in the checkpoint, this run has ')})")
        if meta.get("trainable") != self.cfg.trainable:
            raise CheckpointMismatch(f"{where}: the checkpoint trained '{meta.get('trainable')}', this config "
                                     f"says trainable: '{self.cfg.trainable}'")
        run = meta.get("run", {})
        for key in ("seed", "seq_len", "batch_size"):
            if run.get(key) != getattr(self.cfg, key):
                log.warning("%s: %s was %s, now %s; batches will differ from the original run", where, key,
                            run.get(key), getattr(self.cfg, key))
        _, trainable, opt_state = ckpt.restore(step, {}, self.state.trainable, self.state.opt_state)
        self.state = TrainState(trainable, self.frozen, opt_state, int(meta["step"]),
                                jnp.asarray(meta["rng"], jnp.uint32), DataState.from_json(meta["data"]))

    # --- the loop
    def run(self, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
        """Train to `steps` (or stop after step `stop_at`); returns the final held-out numbers."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(self.out / "checkpoints", cfg.keep_checkpoints, cfg.async_checkpoint)
        try:
            return self._run(ckpt, resume, min(stop_at or cfg.steps, cfg.steps))
        finally:
            ckpt.close()

    def _run(self, ckpt: Checkpointer, resume: bool, stop: int) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        latest = ckpt.latest_step()
        if resume:
            if latest is None:
                raise TrainConfigError(f"--resume: no checkpoint in {ckpt.directory}")
            self._restore(ckpt, latest)
            self.print(f"resumed from step {self.state.step} ({ckpt.directory / str(latest)})")
        elif latest is not None:
            raise TrainConfigError(f"output_dir: {out} already holds checkpoints (step {latest}); pass --resume "
                                   f"to continue that run or choose a new output_dir")
        stream = PackedStream(cfg.train_data, self.tokenizer, cfg.seq_len, seed=cfg.seed,
                              shuffle_buffer=cfg.shuffle_buffer, text_field=cfg.text_field, pad_id=self._pad_id(),
                              state=self.state.data)
        if not resume:
            stream.check_not_empty()
        metrics_path, eval_path = out / "metrics.jsonl", out / "eval.jsonl"
        if self.main_process:
            jsonl_keep(metrics_path, self.state.step)
            jsonl_keep(eval_path, self.state.step)
        if not resume:
            if self.main_process:
                (out / "model_config.json").write_text(json.dumps(config_to_json(self.config), indent=2) + "\n")
                (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            if self.frozen:
                from jaxmoe.train.checkpoint import save_frozen

                save_frozen(out / "frozen", self.frozen, self.config)
        do_eval = cfg.eval_sequences > 0
        if do_eval and not resume:
            self._log_eval(eval_path, "before training")
        last = None
        while self.state.step < stop:
            last = self._one_step(stream, metrics_path)
            s = self.state.step
            if do_eval and cfg.eval_every and s % cfg.eval_every == 0 and s != cfg.steps:
                self._log_eval(eval_path)
            if s % cfg.checkpoint_every == 0 or s in (cfg.steps, stop):
                ckpt.save(s, {}, self.state.trainable, self.state.opt_state, self._meta())
        result = {"step": self.state.step, "train": last}
        if self.state.step == cfg.steps:
            if do_eval:
                result["eval"] = self._log_eval(eval_path, "after training")
            ckpt.wait()
            if self.main_process:
                write_reports(out)
        return result

    def _one_step(self, stream: PackedStream, metrics_path: Path) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        ids, mask = stream.next_batch(cfg.batch_size)
        crc = zlib.crc32(ids.tobytes())
        shape = (cfg.grad_accum, self.micro, cfg.seq_len)
        ids, mask = ids.reshape(shape), mask.reshape(shape)
        if self.batch_sharding is not None:  # every process holds the same full batch; each places its part
            ids, mask = (jax.make_array_from_callback(x.shape, self.batch_sharding, lambda idx, x=x: x[idx])
                         for x in (ids, mask))
        t0 = time.perf_counter()
        with use_mesh(self.mesh):  # the context mesh that the model's constraints and expert-parallel blocks read
            trainable, opt_state, m = self.step_fn(s.trainable, s.frozen, s.opt_state, ids, mask,
                                                   np.asarray(s.step, np.int32))
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(s.rng))[0])
        self.state = TrainState(trainable, s.frozen, opt_state, s.step + 1, rng, dataclasses.replace(stream.state))
        row = {"step": self.state.step, "loss": float(m["loss"]), "ce": float(m["ce"]), "aux": float(m["aux"]),
               "z": float(m["z"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": int(m["tokens"]), "tokens_per_s": float(m["tokens"]) / dt, "batch_crc": crc,
               "expert_load": np.round(np.asarray(m["expert_load"]), 5).tolist()}
        if self.main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.main_process and (self.state.step % cfg.log_every == 0 or self.state.step in (1, cfg.steps)):
            load = "; ".join(f"L{i}: " + " ".join(f"{x:.2f}" for x in layer)
                             for i, layer in enumerate(row["expert_load"]))
            self.print(f"step {row['step']}/{cfg.steps} loss {row['loss']:.4f} ce {row['ce']:.4f} "
                       f"aux {row['aux']:.4f} z {row['z']:.3f} lr {row['lr']:.2e} gnorm {row['grad_norm']:.3f} "
                       f"{row['tokens_per_s']:.0f} tok/s" + (f" | load {load}" if load else ""))
        return row

    def _log_eval(self, path: Path, label: str = "") -> dict[str, Any]:
        r = {"step": self.state.step, **self.evaluate(),
             "data": "data.eval" if self.cfg.eval_data else "data.train (first sequences; no data.eval given)"}
        if not self.main_process:
            return r
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
        self.print(f"eval step {r['step']}{' (' + label + ')' if label else ''}: loss {r['loss']:.4f} "
                   f"perplexity {r['perplexity']:.3f} ({r['tokens']} tokens)")
        return r
