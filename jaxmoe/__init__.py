"""jaxmoe: Mixture-of-Experts language models from dense checkpoints, in JAX/Flax NNX.

The public names are loaded on first use (PEP 562), so `import jaxmoe` (and `jaxmoe --help`, whose package
this is) does not import jax, flax or numpy until a model is actually built or run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time `__getattr__` below loads these
    from jaxmoe.nn.config import ConfigError, ModelConfig
    from jaxmoe.generate import generate
    from jaxmoe.nn.kv_cache import KVCache
    from jaxmoe.nn.model import Output, Transformer

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Output", "Transformer", "generate"]
__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"ConfigError": "jaxmoe.nn.config", "ModelConfig": "jaxmoe.nn.config", "KVCache": "jaxmoe.nn.kv_cache",
         "Output": "jaxmoe.nn.model", "Transformer": "jaxmoe.nn.model", "generate": "jaxmoe.generate"}


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access and keep the value in the package."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxmoe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    # For `generate` this replaces the submodule object, which the import just bound to the same name, with
    # the function. Code that imports `jaxmoe.generate` (the module) before this point leaves the module
    # bound here instead: jaxmoe/generate.py makes that module object callable as the function, so
    # `jaxmoe.generate(model, ids, ...)` generates in every import order.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The loaded attributes and the lazy public names, for completion and `dir(jaxmoe)`."""
    return sorted(set(globals()) | set(__all__))
