"""README.md model cards for exported models: what the model is, how it was built, how to load it."""
from __future__ import annotations

from jaxmoe.nn.config import ModelConfig

FAMILY_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "gemma2": "Gemma 2",
                "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "gemma2_moe": "Gemma-2 MoE", "qwen3": "Qwen3",
                "qwen3_moe": "Qwen3-MoE", "gemmoe": "GemMoE (Gemma MoE)", "gemma3": "Gemma 3",
                "gemma3_moe": "Gemma 3 MoE"}
# config.json's model_type where it is not our family name; families whose class ships as remote code -> its files.
HF_MODEL_TYPES = {"gemma2_moe": "gemma2moe", "gemma3": "gemma3_text", "gemma3_moe": "gemma3moe"}
REMOTE_FILES = {"gemma2_moe": ("configuration_gemma2moe.py", "modeling_gemma2moe.py"),
                "gemmoe": ("configuration_gemmoe.py", "modeling_gemmoe.py"),
                "gemma3_moe": ("configuration_gemma3moe.py", "modeling_gemma3moe.py", "configuration_gemmoe.py",
                               "modeling_gemmoe.py")}


def parameter_count(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts implied by `config`."""
    c = config
    h, d = c.hidden_size, c.head_dim
    attn = h * d * (2 * c.num_heads + 2 * c.num_kv_heads)
    if c.qkv_bias:
        attn += d * (c.num_heads + 2 * c.num_kv_heads)
    if c.o_bias:
        attn += h
    if c.qk_norm:
        attn += 2 * d
    norms = h * (4 if c.sandwich_norms else 2)
    total = active = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h
    for moe in c.moe_layers:
        total += attn + norms
        active += attn + norms
        if moe and c.num_experts:
            expert = 3 * h * c.expert_intermediate_size
            shared = 3 * h * c.shared_expert_intermediate_size + (h if c.shared_expert_intermediate_size else 0)
            total += h * c.num_experts + c.num_experts * expert + shared
            active += h * c.num_experts + c.num_experts_per_tok * expert + shared
        else:
            total += 3 * h * c.intermediate_size
            active += 3 * h * c.intermediate_size
    return total, active


# What each recipe gate_mode computes, for the card (formulas: README "Gate modes").
GATE_MODE_TEXT = {
    "hidden": "mergekit-moe's: the base model's hidden state at each prompt's last token, positives minus "
              "negatives, normalised",
    "hidden_avg": "mergekit-moe's: the base model's hidden states averaged over each prompt, positives minus "
                  "negatives, normalised",
    "cheap_embed": "mergekit-moe's: the normalised sum of the prompts' token embeddings, the same in every layer",
    "random": "mergekit-moe's: standard normal, to be trained",
    "uniform_random": "mergekit-moe's: uniform in +-1/sqrt(hidden size), to be trained",
    "embed_algebra": "the Gemma-2-MoE toolkit's: mean prompt embeddings, positives minus half the negatives, "
                     "centred and scaled",
    "router_mean": "jaxmoe's: the mean router input (normalised MLP input) over all prompt tokens, centred "
                   "across experts, scaled per layer",
    "calibrated": "jaxmoe's: per layer, a logistic regression of the router on the router inputs of every prompt "
                  "token, negative prompts as counter-examples",
}


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _description(config: ModelConfig) -> str:
    c = config
    total, active = parameter_count(c)
    name = FAMILY_NAMES.get(c.model_type, c.model_type)
    lines = [f"- Architecture: {name} (`model_type` "
             f"`{HF_MODEL_TYPES.get(c.model_type, c.model_type)}`), {c.num_layers} layers, "
             f"hidden size {c.hidden_size}, {c.num_heads} attention heads ({c.num_kv_heads} key/value heads), "
             f"vocabulary {c.vocab_size}."]
    if c.is_moe:
        n_moe = sum(c.moe_layers)
        lines.append(f"- Mixture of experts: {c.num_experts} experts, top-{c.num_experts_per_tok} routing "
                     f"({'renormalised' if c.norm_topk_prob else 'not renormalised'} weights) in {n_moe} of "
                     f"{c.num_layers} layers; expert width {c.expert_intermediate_size}"
                     + (f", shared expert width {c.shared_expert_intermediate_size}"
                        if c.shared_expert_intermediate_size else "") + ".")
        lines.append(f"- Parameters: {_human(total)} total, {_human(active)} active per token.")
    else:
        lines.append(f"- Parameters: {_human(total)}.")
    if c.sliding_window:
        lines.append(f"- Sliding-window attention ({c.sliding_window} tokens) on "
                     f"{sum(t == 'sliding' for t in c.layer_types)} of {c.num_layers} layers.")
    lines.append(f"- Weights: safetensors, {c.dtype}.")
    return "\n".join(lines)


def _usage(config: ModelConfig) -> str:
    remote = config.model_type in REMOTE_FILES
    trust = ", trust_remote_code=True" if remote else ""
    text = ("```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'path = "PATH/TO/THIS/MODEL"  # or its Hub id\n'
            "tokenizer = AutoTokenizer.from_pretrained(path)\n"
            f'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto"{trust})\n'
            'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))\n"
            "```\n")
    if remote:
        files = REMOTE_FILES[config.model_type]
        text += (f"\ntransformers has no built-in {FAMILY_NAMES[config.model_type]} class: `trust_remote_code=True` "
                 f"loads {', '.join(f'`{f}`' for f in files[:-1])} and `{files[-1]}` from this directory (read them "
                 "first; they import only torch and transformers).\n")
    text += ("\nWith jaxmoe (JAX/Flax):\n\n```python\nimport converters\n\n"
             'model = converters.load("PATH/TO/THIS/MODEL")\n'
             "logits = model(input_ids)  # int32 [batch, tokens] -> [batch, tokens, vocab]\n```\n")
    return text


def model_card(config: ModelConfig, recipe_text: str | None = None, routing_table: str | None = None,
               gate_mode: str | None = None, heldout: str | None = None) -> str:
    """Markdown README for a model directory: description, recipe YAML, routing table, loading snippet.

    gate_mode: the recipe's, named with what it computes; heldout: a held-out routing report (markdown,
    `converters.moe.heldout.format_scores`), when one was measured."""
    tags = ["jaxmoe", "safetensors"] + (["moe", "frankenmoe"] if config.is_moe else [])
    front = "---\nlibrary_name: transformers\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n\n"
    kind = "mixture-of-experts" if config.is_moe else "dense"
    parts = [front, f"# {FAMILY_NAMES.get(config.model_type, config.model_type)} {kind} model\n\n",
             "Written by jaxmoe (JAX/Flax)"
             + (" from a mergekit-style MoE recipe: the experts are MLPs of dense models, the routers were "
                "computed from prompts." if recipe_text else ".") + "\n\n",
             _description(config), "\n"]
    if gate_mode:
        parts.append(f"- Routers: gate_mode `{gate_mode}`"
                     + (f" ({GATE_MODE_TEXT[gate_mode]})" if gate_mode in GATE_MODE_TEXT else "") + ".\n")
        if heldout:
            parts.append("- " + heldout.split("\n", 1)[0].rstrip(".") + ".\n")  # its headline
    parts.append("\n")
    if recipe_text:
        parts += ["## Recipe\n\n```yaml\n", recipe_text.rstrip("\n"), "\n```\n\n"]
    if routing_table:
        parts += ["## Routing\n\nShare of tokens whose top-1 expert is each column, for the prompts of each "
                  "expert (row), averaged over layers:\n\n", routing_table.rstrip("\n"), "\n\n"]
    if heldout:
        parts += ["## Held-out routing\n\n", heldout.rstrip("\n"), "\n\n"]
    parts += ["## Usage\n\n", _usage(config)]
    return "".join(parts)
