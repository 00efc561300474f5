"""Fine-tuning: a training config, the optax step (frozen/trainable split, gradient accumulation,
clipping, float32 master weights), held-out evaluation, orbax checkpoints with exact resume.

The model is split once into a graph, the trainable parameters (kept in the master dtype, the only ones
with optimizer state) and the frozen ones; the step is one jitted function of flat {path: array} dicts.
Losses are in `jaxmoe.train.losses`, data in `jaxmoe.train.data`, checkpoints in `jaxmoe.train.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.train import losses
from jaxmoe.train.checkpoint import (CheckpointMismatch, Checkpointer, config_difference, config_from_json,
                               config_to_json, flat_params, state_from_flat)
from jaxmoe.nn.config import ModelConfig
from jaxmoe.train.data import DataState, PackedStream, batches, eval_sequences, fit_batches
from jaxmoe.nn.model import Transformer
from jaxmoe.train.config import TRAINABLE, TrainConfig, TrainConfigError, load_config, parse_config  # noqa: F401

log = logging.getLogger(__name__)
# --- what trains, and the optimizer -------------------------------------------------------------
def trainable_filter(config: ModelConfig, which: str) -> Callable[[tuple, Any], bool]:
    """nnx filter (path, value) -> bool for `which` in TRAINABLE: `router` (the router matrices),
    `experts` (everything else in MoE blocks: routed and shared experts, shared-expert gate)."""
    if which not in TRAINABLE:
        raise TrainConfigError(f"trainable: '{which}' is not one of {', '.join(TRAINABLE)}")

    def in_moe(path: tuple) -> bool:
        return len(path) > 3 and path[0] == "layers" and path[2] == "mlp" and config.moe_layers[path[1]]

    def pick(path: tuple, _value: Any) -> bool:
        is_router = in_moe(path) and path[3] == "router"
        is_expert = in_moe(path) and not is_router
        return {"router": is_router, "experts": is_expert, "router+experts": is_router or is_expert,
                "all": True}[which]

    return pick


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to lr*min_lr_ratio at the last step (or constant)."""
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps]) \
            if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
                                              cfg.lr * cfg.min_lr_ratio)


def _matrices(params: Any) -> Any:
    """Weight decay mask: matrices and expert stacks decay; vectors (norms, biases) do not."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (or SGD with momentum b1) on the schedule."""
    sched = learning_rate(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_matrices)
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_matrices),
                          optax.sgd(sched, momentum=cfg.b1))
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt


# --- steps -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds."""

    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any
    step: int
    rng: jax.Array
    data: DataState


def _model(graphdef, trainable: dict, frozen: dict, dtypes: dict) -> Transformer:
    params = {k: v.astype(dtypes[k]) for k, v in trainable.items()}
    return nnx.merge(graphdef, state_from_flat(params), state_from_flat(frozen))


def _batch_losses(model: Transformer, ids, mask, z_loss: bool = False):
    """(sum NLL, predicted tokens, aux, z, load [L, E]) of one (micro-)batch; z is 0 unless `z_loss`."""
    out = model.forward(ids, attention_mask=mask)
    nll, count = losses.token_nll(out.logits, ids, mask)
    c = model.config
    if out.router_logits:
        aux = losses.load_balancing_loss(out.router_logits, c.num_experts_per_tok, mask)
        z = losses.router_z_loss(out.router_logits, mask) if z_loss else jnp.zeros((), jnp.float32)
        load = losses.expert_load(out.router_logits, c.num_experts_per_tok, mask)
    else:
        aux = z = jnp.zeros((), jnp.float32)
        load = jnp.zeros((0, 0), jnp.float32)
    return nll, count, aux, z, load


def make_train_step(graphdef, dtypes: dict, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    aux_coef: float, z_coef: float):
    """step(trainable, frozen, opt_state, ids [A, b, T], mask, step) -> (trainable, opt_state, metrics)."""

    def step(trainable, frozen, opt_state, ids, mask, step):
        n_micro = ids.shape[0]
        m = mask.astype(jnp.float32)
        n_tok = jnp.maximum(jnp.sum(m[:, :, :-1] * m[:, :, 1:]), 1.0)

        def micro(carry, xs):
            grads, sums = carry
            mb_ids, mb_mask = xs

            def loss_fn(tr):
                nll, _, aux, z, load = _batch_losses(_model(graphdef, tr, frozen, dtypes), mb_ids, mb_mask,
                                                     bool(z_coef))
                loss = nll / n_tok + (aux_coef * aux + z_coef * z) / n_micro
                return loss, (nll, aux, z, load)

            (_, (nll, aux, z, load)), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            grads = jax.tree.map(jnp.add, grads, g)
            sums = jax.tree.map(jnp.add, sums, (nll, aux / n_micro, z / n_micro, load / n_micro))
            return (grads, sums), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        _, _, _, _, load0 = jax.eval_shape(
            lambda: _batch_losses(_model(graphdef, trainable, frozen, dtypes), ids[0], mask[0]))
        sums0 = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jnp.zeros(load0.shape, load0.dtype))
        (grads, (nll, aux, z, load)), _ = jax.lax.scan(micro, (zeros, sums0), (ids, mask))
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        ce = nll / n_tok
        metrics = {"loss": ce + aux_coef * aux + z_coef * z, "ce": ce, "aux": aux, "z": z,
                   "grad_norm": optax.tree.norm(grads), "tokens": n_tok, "expert_load": load,
                   "lr": schedule(step)}
        return trainable, opt_state, metrics

    return step


def make_eval_step(graphdef, dtypes: dict):
    """eval(trainable, frozen, ids [b, T], mask) -> (sum NLL, predicted tokens, top-k slot counts [L, E])."""

    def step(trainable, frozen, ids, mask):
        model = _model(graphdef, trainable, frozen, dtypes)
        nll, count, _, _, load = _batch_losses(model, ids, mask)
        real = jnp.sum(mask) * max(model.config.num_experts_per_tok, 1)
        return nll, count, load * real

    return step


def evaluate_model(model: Transformer, sequences: Iterable[tuple[np.ndarray, np.ndarray]],
                   batch_size: int = 8, bucket: int = 64) -> dict[str, Any]:
    """Held-out numbers of a model on packed (ids, mask) sequences (e.g. `jaxmoe.train.data.iter_sequences`):
    loss (mean token NLL), perplexity = exp(loss), tokens (predictions counted), sequences, the per-layer
    expert load [L, E] (top-k slot fractions) and batch_shape [rows, width] of every forward pass: data
    shorter than one batch is scored at its own size (`jaxmoe.train.data.fit_batches`, widths a multiple of
    `bucket`), not padded to batch_size x seq_len."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(make_eval_step(graphdef, {}))
    shape, fitted = fit_batches(sequences, batch_size, bucket)
    return {**_evaluate(fn, {}, flat_params(state), fitted), "batch_shape": list(shape)}


def _evaluate(fn, trainable, frozen, batch_iter: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    nll, count, slots, n_seq = 0.0, 0.0, None, 0
    for b_ids, b_mask in batch_iter:
        n_seq += int(b_mask.any(axis=1).sum())  # filler rows of the last batch are all padding
        n, c, s = fn(trainable, frozen, jnp.asarray(b_ids), jnp.asarray(b_mask))
        nll, count = nll + float(n), count + float(c)
        slots = np.asarray(s, np.float64) if slots is None else slots + np.asarray(s, np.float64)
    loss = nll / max(count, 1.0)
    load = (slots / np.maximum(slots.sum(-1, keepdims=True), 1.0)).tolist() if slots is not None and slots.size else []
    return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(count), "sequences": n_seq,
            "expert_load": load}


# --- the run ---------------------------------------------------------------------------------------
def _jsonl_keep(path: Path, last_step: int) -> list[dict]:
    """Rows of a metrics file up to `last_step`, rewriting the file (a killed run may have logged more)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= last_step:
                rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


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
            model.set_moe_impl(cfg.moe_impl)
        else:
            from jaxmoe.parallel.sharding import shard_model

            model = shard_model(model, mesh)  # MoE blocks switch to expert parallelism
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
        """Micro-batches [A, b, T] split over the mesh's batch axes (sharding.py's rule table)."""
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding

        from jaxmoe.parallel.sharding import logical_to_spec

        shape = (self.cfg.grad_accum, self.micro, self.cfg.seq_len)
        return NamedSharding(self.mesh, logical_to_spec((None, "batch", None), shape, self.mesh))

    def model(self) -> Transformer:
        """The model with the current trainable parameters (in the model dtype)."""
        return _model(self.graphdef, self.state.trainable, self.state.frozen, self.dtypes)

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
        return _evaluate(self.eval_fn, self.state.trainable, self.state.frozen, batches(zip(ids, mask), self.micro))

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
            _jsonl_keep(metrics_path, self.state.step)
            _jsonl_keep(eval_path, self.state.step)
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


# --- end-of-run reports -----------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def routing_change(before: list[list[float]], after: list[list[float]]) -> str:
    """A table of per-layer expert load (top-k slot fractions) before and after training."""
    lines = ["layer  expert  before  after   change"]
    for l, (b, a) in enumerate(zip(before, after)):
        for e, (x, y) in enumerate(zip(b, a)):
            lines.append(f"{l:5d}  {e:6d}  {x:6.3f}  {y:6.3f}  {y - x:+7.3f}")
    return "\n".join(lines)


def write_reports(out: str | Path) -> list[Path]:
    """loss_curve.png (train and held-out loss by step) and routing_report.{txt,json} (expert load on
    held-out data before vs after) from a run directory's metrics.jsonl and eval.jsonl."""
    out = Path(out)
    train, evals = _read_jsonl(out / "metrics.jsonl"), _read_jsonl(out / "eval.jsonl")
    written = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss_curve.png (pip install matplotlib)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy", lw=1)
        if evals:
            ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out cross-entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png", dpi=120)
        plt.close(fig)
        written.append(out / "loss_curve.png")
    if len(evals) >= 2 and evals[0]["expert_load"]:
        before, after = evals[0], evals[-1]
        text = (f"expert load (fraction of top-k slots) on {after.get('data', 'held-out data')}, step "
                f"{before['step']} vs step {after['step']}\nloss {before['loss']:.4f} -> {after['loss']:.4f}\n"
                + routing_change(before["expert_load"], after["expert_load"]) + "\n")
        (out / "routing_report.txt").write_text(text)
        (out / "routing_report.json").write_text(json.dumps(
            {"before": before, "after": after}, indent=2) + "\n")
        written += [out / "routing_report.txt", out / "routing_report.json"]
    return written
