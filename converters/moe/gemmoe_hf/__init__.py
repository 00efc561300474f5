"""GemMoE remote code (`configuration_gemmoe.py`, `modeling_gemmoe.py`): copied beside the weights of every
GemMoE checkpoint jaxmoe writes, so that transformers loads it with `trust_remote_code=True`. The Gemma 3 MoE
remote code (`converters/moe/gemma3moe_hf`) builds on the modeling file and is shipped with it."""
