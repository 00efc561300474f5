"""jaxmoe's cache directory and the persistent XLA compilation cache.

`cache_root()` is `$JAXMOE_CACHE`, else `~/.cache/jaxmoe` (the same rule as `converters.gguf.smollm2.cache_root`,
restated here because jaxmoe never imports converters). Compiled executables go to `<root>/xla`, so a second
run of the same command on the same model loads its executables from disk instead of compiling them again
(a 4-expert 30-layer MoE compiles for tens of seconds on CPU).

`JAXMOE_COMPILE_CACHE` controls it: `0` / `off` / `false` / `no` = disabled; a path = that directory; unset
or empty = jax's own cache directory when one is already configured (`JAX_COMPILATION_CACHE_DIR` or
`jax.config`: a user's or a test's choice wins over our default), else `<root>/xla`. Importing this module
imports nothing heavy; jax is imported only by `compile_cache`, which commands that compile run under.

The directory is not size-capped (jax's default). jax's LRU eviction (`jax_compilation_cache_max_size`) was
tried and dropped: it needs an `-atime` file beside every entry, and one entry written without it (by a
process with eviction off) makes every later write fail, so the cache silently stopped growing. Delete the
directory to reclaim the space; it refills on the next runs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

ENV = "JAXMOE_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no"}
# jax's defaults skip compiles under 1 s, which on a fast machine would leave out some of our model's
# executables; caching every one keeps the rule simple. Applied only while jax's settings are its defaults,
# so thresholds a user set (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, ...) stand.
_THRESHOLDS = {"jax_persistent_cache_min_compile_time_secs": (1.0, 0.0),  # name: (jax default, ours)
               "jax_persistent_cache_min_entry_size_bytes": (0, -1)}  # -1: no size floor (0 lets jax pick one)


def cache_root() -> Path:
    """jaxmoe's cache directory: `$JAXMOE_CACHE`, else `~/.cache/jaxmoe`."""
    env = os.environ.get("JAXMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxmoe"


def compile_cache_dir(enabled: bool = True, jax_dir: str | None = None) -> Path | None:
    """Where compiled executables are kept, or None when the cache is off (`enabled` False, e.g. from
    `--no-compile-cache`, or `JAXMOE_COMPILE_CACHE=0`). `JAXMOE_COMPILE_CACHE=/path` picks the directory;
    otherwise `jax_dir` (jax's configured cache directory, if any), else `cache_root()/xla`."""
    env = os.environ.get(ENV, "").strip()
    if not enabled or env.lower() in _OFF:
        return None
    if env:
        return Path(env).expanduser()
    return Path(jax_dir) if jax_dir else cache_root() / "xla"


@contextlib.contextmanager
def compile_cache(enabled: bool = True) -> Iterator[Path | None]:
    """Within the block, compiles are read from and written to the persistent cache at `compile_cache_dir`
    (yielded; None when off). When off, jax's own cache is switched off too, even one configured through
    `JAX_COMPILATION_CACHE_DIR`. On exit the previous jax settings come back, so a process that calls the
    CLI in-process (tests, notebooks) is left as it was."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", *_THRESHOLDS)
    before = {name: getattr(jax.config, name) for name in names}
    path = compile_cache_dir(enabled, before["jax_compilation_cache_dir"])
    if path is None:
        settings = {"jax_enable_compilation_cache": False}
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            # A cache is an optimisation: an unwritable cache directory must not stop the command.
            log.warning("compilation cache off: cannot create %s (%s)", path, e.strerror or e)
            path, settings = None, {"jax_enable_compilation_cache": False}
        else:
            settings = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": str(path)}
            settings.update({k: ours for k, (default, ours) in _THRESHOLDS.items() if before[k] == default})
    changed = {k: v for k, v in settings.items() if before[k] != v}
    for name, value in changed.items():
        jax.config.update(name, value)
    if changed:
        # jax opens its cache once per process, at the first compile after a reset; reset so these
        # settings are the ones it opens with.
        cc.reset_cache()
    if path is not None:
        log.debug("persistent compilation cache at %s", path)
    try:
        yield path
    finally:
        if changed:
            for name in changed:
                jax.config.update(name, before[name])
            cc.reset_cache()
