"""The declarative name table between Hugging Face checkpoints and our parameter tree.

One table per architecture and layout, read in both directions: import applies `Kind.load` to the HF
tensor, export applies `Kind.save` to our arrays. A rule maps one HF tensor to one or more of our
parameters; `ours` entries ending in `[j]` address expert j of a stacked [E, ...] parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxmoe.nn.config import ModelConfig

LAYOUTS = ("legacy", "mlp", "fused")


@dataclasses.dataclass(frozen=True)
class Kind:
    """How an HF tensor becomes ours and back, and the HF shape expected for our shapes."""

    load: Callable[[np.ndarray, list], tuple[np.ndarray, ...]]
    save: Callable[..., np.ndarray]
    hf_shape: Callable[..., tuple[int, ...]]


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


KINDS: dict[str, Kind] = {
    # Same layout on both sides (embeddings [V, H], norm weights [H]).
    "same": Kind(lambda a, s: (a,), lambda a: a, lambda s: s),
    # nn.Linear weight [out, in] <-> our kernel [in, out].
    "linear": Kind(lambda a, s: (_t(a),), _t, lambda s: s[::-1]),
    # q/k/v weight [heads*d, H] <-> [H, heads, d].
    "heads_in": Kind(lambda a, s: (a.T.reshape(s[0]),), lambda a: a.reshape(a.shape[0], -1).T,
                     lambda s: (s[1] * s[2], s[0])),
    # o_proj weight [H, heads*d] <-> [heads, d, H].
    "heads_out": Kind(lambda a, s: (a.T.reshape(s[0]),), lambda a: a.reshape(-1, a.shape[-1]).T,
                      lambda s: (s[2], s[0] * s[1])),
    # q/k/v bias [heads*d] <-> [heads, d].
    "heads_bias": Kind(lambda a, s: (a.reshape(s[0]),), lambda a: a.reshape(-1), lambda s: (s[0] * s[1],)),
    # transformers v5 fused experts: gate_up [E, 2I, H] <-> gate [E, H, I], up [E, H, I] (gate first).
    "fused_gate_up": Kind(
        lambda a, s: (_t(a[:, : a.shape[1] // 2]), _t(a[:, a.shape[1] // 2:])),
        lambda g, u: np.concatenate([_t(g), _t(u)], axis=1),
        lambda sg, su: (sg[0], sg[2] + su[2], sg[1])),
    # fused down [E, H, I] <-> [E, I, H].
    "fused_down": Kind(lambda a, s: (_t(a),), _t, lambda s: (s[0], s[2], s[1])),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor `hf` <-> our parameter paths `ours` through `kind`."""

    hf: str
    ours: tuple[str, ...]
    kind: str


def load_rule(rule: Rule, a: np.ndarray, our_shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
    """Turn HF tensor `a` into our arrays of `our_shapes` (for the slice rules: one expert's shape)."""
    return KINDS[rule.kind].load(a, our_shapes)


def save_rule(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
    """Turn our arrays (in rule order) into the HF tensor."""
    return np.ascontiguousarray(KINDS[rule.kind].save(*arrays))


def hf_shape(rule: Rule, our_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The HF shape a rule expects given our (per-expert, for slice rules) shapes."""
    return tuple(KINDS[rule.kind].hf_shape(*our_shapes))


def _norm_rules(config: ModelConfig, p: str, o: str) -> list[Rule]:
    names = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_out_norm"),
             ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "mlp_out_norm"))
    if not config.sandwich_norms:
        names = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
    return [Rule(f"{p}.{hf}.weight", (f"{o}.{ours}.weight",), "same") for hf, ours in names]


def _attn_rules(config: ModelConfig, p: str, o: str) -> list[Rule]:
    rules = [Rule(f"{p}.self_attn.{n}_proj.weight", (f"{o}.attn.{n}_proj",), "heads_in") for n in "qkv"]
    rules.append(Rule(f"{p}.self_attn.o_proj.weight", (f"{o}.attn.o_proj",), "heads_out"))
    if config.qkv_bias:
        rules += [Rule(f"{p}.self_attn.{n}_proj.bias", (f"{o}.attn.{n}_bias",), "heads_bias") for n in "qkv"]
    if config.o_bias:
        rules.append(Rule(f"{p}.self_attn.o_proj.bias", (f"{o}.attn.o_bias",), "same"))
    return rules


def _mlp_rules(prefix: str, o: str) -> list[Rule]:
    return [Rule(f"{prefix}.{n}_proj.weight", (f"{o}.{n}_proj",), "linear") for n in ("gate", "up", "down")]


def _moe_rules(config: ModelConfig, p: str, o: str, layout: str) -> list[Rule]:
    e = config.num_experts
    m = f"{o}.mlp"
    if layout == "fused":
        return [Rule(f"{p}.mlp.gate.weight", (f"{m}.router",), "linear"),
                Rule(f"{p}.mlp.experts.gate_up_proj", (f"{m}.gate_proj", f"{m}.up_proj"), "fused_gate_up"),
                Rule(f"{p}.mlp.experts.down_proj", (f"{m}.down_proj",), "fused_down")]
    if config.model_type == "mixtral":
        block = f"{p}.block_sparse_moe" if layout == "legacy" else f"{p}.mlp"
        names = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    elif config.model_type == "gemma2_moe":
        block, names = f"{p}.block_sparse_moe", tuple((n, n) for n in ("gate_proj", "up_proj", "down_proj"))
    else:  # qwen2_moe
        block, names = f"{p}.mlp", tuple((n, n) for n in ("gate_proj", "up_proj", "down_proj"))
    rules = [Rule(f"{block}.gate.weight", (f"{m}.router",), "linear")]
    for j in range(e):
        rules += [Rule(f"{block}.experts.{j}.{hf}.weight", (f"{m}.{ours}[{j}]",), "linear") for hf, ours in names]
    return rules


def hf_rules(config: ModelConfig, layout: str = "legacy") -> list[Rule]:
    """The full table for `config` in an on-disk `layout`: legacy (block_sparse_moe / per-expert),
    mlp (Mixtral `mlp.gate` + per-expert w1/w2/w3), or fused (transformers v5 `gate_up_proj`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: '{layout}' is not one of {', '.join(LAYOUTS)}")
    rules = [Rule("model.embed_tokens.weight", ("embed",), "same"),
             Rule("model.norm.weight", ("final_norm.weight",), "same")]
    if not config.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head",), "linear"))
    for i in range(config.num_layers):
        p, o = f"model.layers.{i}", f"layers.{i}"
        rules += _norm_rules(config, p, o) + _attn_rules(config, p, o)
        if config.moe_layers[i]:
            rules += _moe_rules(config, p, o, layout)
            if config.shared_expert_intermediate_size:
                rules += _mlp_rules(f"{p}.mlp.shared_expert", f"{o}.mlp.shared_expert")
                rules.append(Rule(f"{p}.mlp.shared_expert_gate.weight", (f"{o}.mlp.shared_expert_gate",), "linear"))
        else:
            rules += _mlp_rules(f"{p}.mlp", f"{o}.mlp")
    return rules


def detect_layout(config: ModelConfig, has: Callable[[str], bool]) -> str:
    """Which MoE spelling a checkpoint uses, judged from the first MoE layer's tensor names."""
    if not config.is_moe:
        return "legacy"
    i = config.moe_layers.index(True)
    if has(f"model.layers.{i}.mlp.experts.gate_up_proj"):
        return "fused"
    if config.model_type == "mixtral" and has(f"model.layers.{i}.mlp.gate.weight"):
        return "mlp"
    return "legacy"
