"""Gemma 3 MoE remote code (`configuration_gemma3moe.py`, `modeling_gemma3moe.py`, which builds on the GemMoE
files of `converters/moe/gemmoe_hf`): copied, with those, beside the weights of every Gemma 3 MoE checkpoint
jaxmoe writes, so that transformers loads it with `trust_remote_code=True`."""
