"""GGUF (llama.cpp) tensor names <-> Hugging Face tensor names, one table per model family.

llama.cpp names tensors `token_embd.weight`, `blk.{i}.attn_q.weight`, ...; Mixtral-style experts are stacked
in one 3-D tensor per projection (`blk.{i}.ffn_gate_exps.weight`, [E, out, in] in numpy order), or in older
files written one per expert (`blk.{i}.ffn_gate.{e}.weight`). HF names are the legacy transformers ones our
HF reader accepts (`block_sparse_moe.experts.{e}.w1` for Mixtral). Both directions read the same tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Outside the layer stack: the same for every family.
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_ATTENTION = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
_DENSE_MLP = {
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Family:
    """How one HF model family is laid out in a GGUF file."""

    model_type: str
    architecture: str  # HF `architectures[0]`
    block: dict[str, str]  # per-layer GGUF leaf -> HF leaf under `model.layers.{i}.`
    experts: dict[str, str] = field(default_factory=dict)  # GGUF ffn leaf -> HF expert leaf
    rope_permuted: bool = False  # llama.cpp interleaves q/k rows per head for its rotary layout
    norm_offset: float = 0.0  # llama.cpp stores (offset + w) for every `*norm.weight`
    hidden_act: str = "silu"
    expert_block: str = "block_sparse_moe"  # HF module holding the experts: `{block}.experts.{e}.`


_LLAMA_BLOCK = {**_ATTENTION, "ffn_norm": "post_attention_layernorm", **_DENSE_MLP}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_BLOCK, rope_permuted=True),
    "mistral": Family("mistral", "MistralForCausalLM", _LLAMA_BLOCK, rope_permuted=True),
    "mixtral": Family(
        "mixtral", "MixtralForCausalLM",
        {**_ATTENTION, "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "block_sparse_moe.gate"},
        experts={"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"},
        rope_permuted=True,
    ),
    "gemma": Family("gemma", "GemmaForCausalLM", _LLAMA_BLOCK, norm_offset=1.0,
                    hidden_act="gelu_pytorch_tanh"),
    "gemma2": Family(
        "gemma2", "Gemma2ForCausalLM",
        {**_ATTENTION, "post_attention_norm": "post_attention_layernorm",
         "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm", **_DENSE_MLP},
        norm_offset=1.0, hidden_act="gelu_pytorch_tanh",
    ),
    # llama.cpp's qwen2 / qwen2moe: NEOX rotary (no q/k row interleave); every qwen2moe layer is sparse, with a
    # shared expert and its sigmoid gate
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen2_moe": Family(
        "qwen2_moe", "Qwen2MoeForCausalLM",
        {**_ATTENTION, "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate",
         "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
         "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
         **_DENSE_MLP},  # the dense layers (`mlp_only_layers`) of an HF Qwen2-MoE
        experts={"ffn_gate": "gate_proj", "ffn_down": "down_proj", "ffn_up": "up_proj"}, expert_block="mlp",
    ),
    # llama.cpp's qwen3 / qwen3moe: qwen2's layout plus per-head q/k norms; qwen3moe has no shared expert, a
    # sparse block in every layer and always renormalises the top-k weights
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORM}),
    "qwen3_moe": Family(
        "qwen3_moe", "Qwen3MoeForCausalLM",
        {**_ATTENTION, **_QK_NORM, "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"},
        experts={"ffn_gate": "gate_proj", "ffn_down": "down_proj", "ffn_up": "up_proj"}, expert_block="mlp",
    ),
}

_GLOBAL_RE = re.compile(r"^(?P<leaf>[a-z_]+)\.(?P<kind>weight|bias)$")
_BLOCK_RE = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<leaf>[a-z_]+)(?:\.(?P<expert>\d+))?\.(?P<kind>weight|bias)$")
_HF_EXPERT_RE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.(?P<leaf>\w+)"
    r"\.(?P<kind>weight)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<leaf>[\w.]+)\.(?P<kind>weight|bias)$")
_HF_GLOBAL_RE = re.compile(r"^(?P<leaf>[\w.]+)\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class MappedName:
    """One HF tensor read from a GGUF tensor; `expert` indexes the leading axis of a stacked expert tensor."""

    hf: str
    gguf_leaf: str  # the GGUF leaf name (`attn_q`, `ffn_gate_exps`, `output_norm`, ...)
    expert: int | None = None


def to_hf(gguf_name: str, family: Family, num_stacked: int = 0) -> list[MappedName]:
    """HF names for a GGUF tensor name (several for a stacked expert tensor of `num_stacked` experts).

    Returns [] for a name the family has no HF equivalent for.
    """
    m = _GLOBAL_RE.match(gguf_name)
    if m and m["leaf"] in GLOBAL_NAMES:
        return [MappedName(f"{GLOBAL_NAMES[m['leaf']]}.{m['kind']}", m["leaf"])]
    m = _BLOCK_RE.match(gguf_name)
    if not m:
        return []
    layer, leaf, kind = m["layer"], m["leaf"], m["kind"]
    prefix = f"model.layers.{layer}"
    if m["expert"] is not None:  # older files: one tensor per expert, `blk.{i}.ffn_gate.{e}.weight`
        if leaf not in family.experts:
            return []
        e = int(m["expert"])
        return [MappedName(f"{prefix}.{family.expert_block}.experts.{e}.{family.experts[leaf]}.{kind}", leaf)]
    if leaf.endswith("_exps") and leaf[: -len("_exps")] in family.experts:
        hf_leaf = family.experts[leaf[: -len("_exps")]]
        return [MappedName(f"{prefix}.{family.expert_block}.experts.{e}.{hf_leaf}.{kind}", leaf, e)
                for e in range(num_stacked)]
    if leaf in family.block:
        return [MappedName(f"{prefix}.{family.block[leaf]}.{kind}", leaf)]
    return []


def to_gguf(hf_name: str, family: Family, stacked: bool = True) -> tuple[str, int | None] | None:
    """The GGUF tensor name (and expert index into it, for stacked experts) an HF tensor is stored under.

    `stacked=False` gives the older one-tensor-per-expert names. Returns None for an unknown name.
    """
    m = _HF_EXPERT_RE.match(hf_name)
    if m:
        by_hf = {v: k for k, v in family.experts.items()}
        if m["leaf"] not in by_hf:
            return None
        leaf, e = by_hf[m["leaf"]], int(m["expert"])
        if stacked:
            return f"blk.{m['layer']}.{leaf}_exps.{m['kind']}", e
        return f"blk.{m['layer']}.{leaf}.{e}.{m['kind']}", None
    m = _HF_BLOCK_RE.match(hf_name)
    if m:
        by_hf = {v: k for k, v in family.block.items()}
        return (f"blk.{m['layer']}.{by_hf[m['leaf']]}.{m['kind']}", None) if m["leaf"] in by_hf else None
    m = _HF_GLOBAL_RE.match(hf_name)
    if m:
        by_hf = {v: k for k, v in GLOBAL_NAMES.items()}
        return (f"{by_hf[m['leaf']]}.{m['kind']}", None) if m["leaf"] in by_hf else None
    return None
