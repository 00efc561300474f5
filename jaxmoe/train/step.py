"""The optimizer and the jitted steps of fine-tuning: which parameters train, the learning-rate schedule,
AdamW/SGD with clipping, the train step (gradient accumulation over micro-batches, router losses) and the
held-out evaluation step. The model enters as a graph plus flat {path: array} dicts (see `jaxmoe.train.loop`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.kv_cache import layer_stacks
from jaxmoe.nn.model import Transformer
from jaxmoe.train import losses
from jaxmoe.train.checkpoint import flat_params, state_from_flat
from jaxmoe.train.config import TRAINABLE, TrainConfig, TrainConfigError
from jaxmoe.train.data import fit_batches


# --- what trains, and the optimizer -------------------------------------------------------------
def trainable_filter(config: ModelConfig, which: str) -> Callable[[tuple, Any], bool]:
    """nnx filter (path, value) -> bool for `which` in TRAINABLE: `router` (the router matrices),
    `experts` (everything else in MoE blocks: routed and shared experts, shared-expert gate), `mlp` (every MLP
    parameter but the routers: the dense MLPs and the experts; what a frankenMoE takes from each source model, so
    dense models fine-tuned this way compose exactly under the base model's attention)."""
    if which not in TRAINABLE:
        raise TrainConfigError(f"trainable: '{which}' is not one of {', '.join(TRAINABLE)}")

    moe_stacks = {s for s, group in enumerate(layer_stacks(config)) if config.moe_layers[group.start]}

    def in_moe(path: tuple) -> bool:  # ("stacks", s, "mlp", ...): a parameter of a stack of MoE layers
        return len(path) > 3 and path[0] == "stacks" and path[2] == "mlp" and int(path[1]) in moe_stacks

    def pick(path: tuple, _value: Any) -> bool:
        is_router = in_moe(path) and path[3] == "router"
        is_expert = in_moe(path) and not is_router
        is_mlp = len(path) > 3 and path[0] == "stacks" and path[2] == "mlp" and not is_router
        return {"router": is_router, "experts": is_expert, "router+experts": is_router or is_expert,
                "mlp": is_mlp, "all": True}[which]

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
    """Weight decay mask: matrices and expert stacks decay; vectors (norms, biases) do not, also when stacked
    over layers (a parameter under `stacks` has a leading layer axis)."""
    def one(path: tuple, x: Any) -> bool:
        # Trainable parameters travel as {dotted state path: array}; a state tree would start with ("stacks", ...).
        stacked = bool(path) and str(getattr(path[0], "key", "")).split(".")[0] == "stacks"
        return x.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(one, params)


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
def model_from_flat(graphdef: Any, trainable: dict, frozen: dict, dtypes: dict) -> Transformer:
    """The model of `graphdef` with flat trainable parameters cast to `dtypes` (their model dtypes) and the
    frozen ones as they are."""
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
                nll, _, aux, z, load = _batch_losses(model_from_flat(graphdef, tr, frozen, dtypes), mb_ids, mb_mask,
                                                     bool(z_coef))
                loss = nll / n_tok + (aux_coef * aux + z_coef * z) / n_micro
                return loss, (nll, aux, z, load)

            (_, (nll, aux, z, load)), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            grads = jax.tree.map(jnp.add, grads, g)
            sums = jax.tree.map(jnp.add, sums, (nll, aux / n_micro, z / n_micro, load / n_micro))
            return (grads, sums), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        _, _, _, _, load0 = jax.eval_shape(
            lambda: _batch_losses(model_from_flat(graphdef, trainable, frozen, dtypes), ids[0], mask[0]))
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
        model = model_from_flat(graphdef, trainable, frozen, dtypes)
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
    return {**evaluate_batches(fn, {}, flat_params(state), fitted), "batch_shape": list(shape)}


def evaluate_batches(fn: Callable, trainable: dict, frozen: dict,
                     batch_iter: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Held-out numbers (loss, perplexity, tokens, sequences, expert load) summed over batches by `fn`, a
    jitted `make_eval_step`."""
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
