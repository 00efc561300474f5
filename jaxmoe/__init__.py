"""jaxmoe: Mixture-of-Experts language models from dense checkpoints, in JAX/Flax NNX."""
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import KVCache, Output, Transformer

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Output", "Transformer"]
__version__ = "0.1.0"
