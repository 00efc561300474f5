"""Shared fixtures: tiny random transformers models, saved to disk once per test session."""
from __future__ import annotations

import os

# 8 CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI turns on a persistent XLA compilation cache under the user's cache directory; tests must neither fill
# a developer's cache nor be sped up by one a warm machine left. Tests of the cache set their own directory.
os.environ["JAXMOE_COMPILE_CACHE"] = "0"

import pytest  # noqa: E402

from tests.tiny_models import TINY, make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(name) -> (directory, torch model in float32, eval, eager attention/experts)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_tiny(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def pytest_collection_modifyitems(items):
    assert TINY  # the model table must not be empty
