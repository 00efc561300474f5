"""The declarative name table between Hugging Face checkpoints and our parameters, and the one description of
each tensor kind.

One table per architecture and layout, read in both directions. A rule maps one HF tensor to one or more of our
parameters by LOGICAL name ("layers.3.attn.q_proj"; how the model stores its layers is its own business, see
`jaxmoe.nn.model.param_slots`); `ours` entries ending in `[j]` address expert j of a stacked [E, ...] parameter.
A rule's `kind` names its entry in `KINDS`, which says everything import, export and sharded reads need: the HF
shape for our shapes, how to read any region of our parameter from the matching part of the HF tensor (the
whole tensor is the full region), how to write the HF tensor back, and whether that round trip is exact.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np

from jaxmoe.nn.config import ModelConfig

LAYOUTS = ("legacy", "mlp", "fused")
Region = tuple[slice, ...]
# get(index into the HF tensor) -> that part of it; a kind's reader asks only for what the region needs
HFGetter = Callable[[tuple], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Kind:
    """How an HF tensor and our parameter(s) correspond.

    hf_shape(*our shapes) -> the HF tensor's shape. read(get, region, our shape, position in the rule) -> our
    parameter over `region` (slices of our shape, step 1), reading only the matching part of the HF tensor through
    `get`. save(*our arrays) -> the HF tensor. bijective: the HF tensor is one parameter of ours reshaped or
    transposed, so export writes the very bytes import read (a file-to-file copy is the export).
    """

    hf_shape: Callable[..., tuple[int, ...]]
    read: Callable[[HFGetter, Region, tuple[int, ...], int], np.ndarray]
    save: Callable[..., np.ndarray]
    bijective: bool

    def load(self, a: np.ndarray, our_shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
        """The whole HF tensor `a` -> our arrays (views of `a` where the layout allows)."""
        return tuple(self.read(a.__getitem__, full_region(s), tuple(s), pos) for pos, s in enumerate(our_shapes))


def full_region(shape: tuple[int, ...]) -> Region:
    """The region covering a whole array of `shape`."""
    return tuple(slice(0, n) for n in shape)


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _rows(r: slice, d: int) -> slice:
    """Head range -> the rows of a [heads*d, ...] tensor holding those heads."""
    return slice(r.start * d, r.stop * d)


def _n(r: slice) -> int:
    return r.stop - r.start


KINDS: dict[str, Kind] = {
    # Same layout on both sides (embeddings [V, H], norm weights [H]).
    "same": Kind(lambda s: s, lambda get, r, s, pos: get(r), lambda a: a, True),
    # nn.Linear weight [out, in] <-> our kernel [in, out].
    "linear": Kind(lambda s: s[::-1], lambda get, r, s, pos: _t(get(r[:-2] + (r[-1], r[-2]))), _t, True),
    # q/k/v weight [heads*d, H] <-> our [H, heads, d].
    "heads_in": Kind(lambda s: (s[1] * s[2], s[0]),
                     lambda get, r, s, pos: get((_rows(r[1], s[2]), r[0])).T.reshape(_n(r[0]), _n(r[1]), s[2])[
                         :, :, r[2]],
                     lambda a: a.reshape(a.shape[0], -1).T, True),
    # o_proj weight [H, heads*d] <-> our [heads, d, H].
    "heads_out": Kind(lambda s: (s[2], s[0] * s[1]),
                      lambda get, r, s, pos: get((r[2], _rows(r[0], s[1]))).T.reshape(_n(r[0]), s[1], _n(r[2]))[
                          :, r[1], :],
                      lambda a: a.reshape(-1, a.shape[-1]).T, True),
    # q/k/v bias [heads*d] <-> our [heads, d].
    "heads_bias": Kind(lambda s: (s[0] * s[1],),
                       lambda get, r, s, pos: get((_rows(r[0], s[1]),)).reshape(_n(r[0]), s[1])[:, r[1]],
                       lambda a: a.reshape(-1), True),
    # transformers v5 fused experts: gate_up [E, 2I, H] <-> our gate [E, H, I] (position 0), up [E, H, I] (1).
    "fused_gate_up": Kind(lambda sg, su: (sg[0], sg[2] + su[2], sg[1]),
                          lambda get, r, s, pos: _t(get((r[0], slice(r[2].start + pos * s[2], r[2].stop + pos * s[2]),
                                                         r[1]))),
                          lambda g, u: np.concatenate([_t(g), _t(u)], axis=1), False),
    # fused down [E, H, I] <-> our [E, I, H].
    "fused_down": Kind(lambda s: (s[0], s[2], s[1]), lambda get, r, s, pos: _t(get((r[0], r[2], r[1]))), _t, True),
}
_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor `hf` <-> our parameters `ours` (logical names, `[j]` for expert j) through `kind`."""

    hf: str
    ours: tuple[str, ...]
    kind: str


def split_target(name: str) -> tuple[str, int | None]:
    """'layers.0.mlp.gate_proj[3]' -> ('layers.0.mlp.gate_proj', 3); a plain name -> (name, None)."""
    m = _SLICE.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def target_shapes(rule: Rule, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Our shape for each entry of `rule.ours` (one expert's shape for a `[j]` entry), from our parameters'
    shapes by logical name."""
    out = []
    for name in rule.ours:
        base, j = split_target(name)
        out.append(tuple(shapes[base][1:] if j is not None else shapes[base]))
    return out


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
    if config.qk_norm:
        rules += [Rule(f"{p}.self_attn.{n}_norm.weight", (f"{o}.attn.{n}_norm.weight",), "same") for n in "qk"]
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
    if config.model_type in ("mixtral", "gemmoe", "gemma3_moe"):  # GemMoE and our Gemma 3 MoE keep Mixtral's
        block = f"{p}.block_sparse_moe" if layout == "legacy" else f"{p}.mlp"
        names = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    elif config.model_type == "gemma2_moe":
        block, names = f"{p}.block_sparse_moe", tuple((n, n) for n in ("gate_proj", "up_proj", "down_proj"))
    else:  # qwen2_moe, qwen3_moe
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
