"""jaxmoe: Mixture-of-Experts language models from dense checkpoints, in JAX/Flax NNX."""
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import KVCache, Output, Transformer
from jaxmoe.generate import generate  # noqa: E402  (the function shadows the submodule name on purpose)

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Output", "Transformer", "generate"]
__version__ = "0.1.0"
