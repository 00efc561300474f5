"""Fast answers: `--help` imports no heavy library, `jaxmoe.generate` is the function in every import
order, and `jaxmoe generate` reuses its compiled executables through the persistent compilation cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxmoe.cli import COMMANDS, COMPILING, build_parser
from tests.tiny_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "transformers", "torch", "numpy")


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (nothing imported yet) from the repository root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxmoe.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_help_imports_nothing_heavy():
    """`jaxmoe --help` and every `jaxmoe CMD --help`, each in a fresh process: argparse prints the help, and
    none of jax, flax, transformers, torch, numpy was imported (they cost seconds)."""
    code = """
        import contextlib, io, json, sys
        from jaxmoe.cli import main

        argv = json.loads(sys.argv[1])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "usage: jaxmoe" in out.getvalue(), out.getvalue()
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2]))))
    """
    for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
        proc = _python(code, json.dumps(argv), json.dumps(HEAVY))
        assert proc.returncode == 0, (argv, proc.stderr)
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], argv
    # The console entry point's own module (python -m jaxmoe.cli) too.
    proc = _python("""
        import runpy, sys
        sys.argv = ["jaxmoe", "--help"]
        try:
            runpy.run_module("jaxmoe.cli", run_name="__main__")
        except SystemExit:
            pass
        print(sorted(m for m in sys.modules if m.split(".")[0] in %r))
    """ % (HEAVY,))
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_import_jaxmoe_is_lazy():
    """`import jaxmoe` loads no jax; the public names load their modules on first use."""
    proc = _python("""
        import sys
        import jaxmoe
        assert "jax" not in sys.modules and "flax" not in sys.modules
        assert jaxmoe.ConfigError.__name__ == "ConfigError" and "jax" not in sys.modules  # config is plain Python
        assert jaxmoe.ModelConfig.__module__ == "jaxmoe.nn.config"
        assert [jaxmoe.Transformer.__name__, jaxmoe.KVCache.__name__, jaxmoe.Output.__name__] == \\
            ["Transformer", "KVCache", "Output"]
        assert "jax" in sys.modules
        try:
            jaxmoe.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("jaxmoe.no_such_name resolved")
        from jaxmoe.parallel import placement  # submodules still import as usual
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# How a program may have imported things before it calls `jaxmoe.generate(model, ids, ...)`.
IMPORT_ORDERS = [
    "import jaxmoe",  # the package alone: `jaxmoe.generate` resolves lazily to the function
    "import jaxmoe.generate",  # the submodule first: the package attribute is the module object
    "from jaxmoe.generate import left_pad\nimport jaxmoe",
]


@pytest.mark.parametrize("order", range(len(IMPORT_ORDERS)))
def test_jaxmoe_generate_calls_the_function_in_every_import_order(tiny_hf, order):
    model_dir, _ = tiny_hf("llama")
    proc = _python(IMPORT_ORDERS[order] + "\n" + textwrap.dedent("""
        import sys
        import numpy as np
        import converters
        from jaxmoe.generate import generate_full

        model = converters.load(sys.argv[1], dtype="float32")
        ids = np.array([[1, 5, 9, 3]], np.int32)
        got = jaxmoe.generate(model, ids, 3, eos_token_id=())
        from jaxmoe import generate as imported
        again = imported(model, ids, 3, eos_token_id=())
        import jaxmoe.generate as gen_module  # and once the submodule is imported by name, whatever came before
        third = jaxmoe.generate(model, ids, 3, eos_token_id=())
        want = generate_full(model, ids, 3, eos_token_id=()).sequences
        assert got.shape == (1, 7) and (got == want).all() and (again == want).all() and (third == want).all()
        assert callable(gen_module) and gen_module.left_pad is not None
        print("ok")
    """), str(model_dir))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.fixture(scope="module")
def model_dir(tiny_hf, tmp_path_factory):
    """The tiny Mixtral (an MoE: the shape of model the cache matters for) with a word-level tokenizer."""
    import shutil

    src, _ = tiny_hf("mixtral")
    out = tmp_path_factory.mktemp("cache_model") / "mixtral"
    shutil.copytree(src, out)
    make_tokenizer(out)
    return out


def _entries(path: Path) -> set[str]:
    """The executables in a jax compilation cache directory (one `*-cache` file each)."""
    return {p.name for p in path.glob("*-cache")} if path.is_dir() else set()


GENERATE = ("generate", "--prompt", "the cat", "--max-new-tokens", "4")


def test_second_generate_hits_the_compile_cache(model_dir, tmp_path):
    """First run writes the prefill and decode executables; a second run of the same model writes nothing
    new: every compile was read back from the cache."""
    cache = tmp_path / "xla"
    env = {"JAXMOE_COMPILE_CACHE": str(cache)}
    first = _cli(*GENERATE[:1], str(model_dir), *GENERATE[1:], env=env)
    assert first.returncode == 0, first.stderr
    written = _entries(cache)
    assert any(n.startswith("jit__prefill") for n in written) and any(n.startswith("jit__decode") for n in written)
    assert "compile:" in first.stderr and "trace" in first.stderr
    second = _cli(*GENERATE[:1], str(model_dir), *GENERATE[1:], env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout  # same text from the cached executables
    assert _entries(cache) == written


@pytest.mark.parametrize("how", ["flag", "env"])
def test_compile_cache_off_writes_nothing(model_dir, tmp_path, how):
    """--no-compile-cache and JAXMOE_COMPILE_CACHE=0 write no cache, neither in the default place
    ($JAXMOE_CACHE/xla) nor in a configured one."""
    root, moved = tmp_path / "root", tmp_path / "moved"
    env = {"JAXMOE_CACHE": str(root), "JAXMOE_COMPILE_CACHE": "0" if how == "env" else str(moved)}
    flag = ["--no-compile-cache"] if how == "flag" else []
    proc = _cli(*GENERATE[:1], str(model_dir), *GENERATE[1:], *flag, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not _entries(root / "xla") and not _entries(moved)


def test_no_compile_cache_flag_before_or_after_the_command():
    parser = build_parser()
    for argv in (["--no-compile-cache", "eval", "m", "--data", "f"],
                 ["eval", "m", "--data", "f", "--no-compile-cache"]):
        assert parser.parse_args(argv).no_compile_cache is True, argv
    assert parser.parse_args(["eval", "m", "--data", "f"]).no_compile_cache is False
    with pytest.raises(SystemExit):  # only the commands that compile take it after the command
        parser.parse_args(["convert", "a", "b", "--no-compile-cache"])


def test_compile_cache_settings_are_restored(tmp_path, monkeypatch):
    """The CLI's cache is on only while a command runs: a program that calls `jaxmoe.cli.main` in-process
    gets its jax settings back afterwards."""
    import jax

    from jaxmoe.cache import compile_cache, compile_cache_dir

    monkeypatch.setenv("JAXMOE_CACHE", str(tmp_path / "root"))
    monkeypatch.delenv("JAXMOE_COMPILE_CACHE", raising=False)
    assert compile_cache_dir() == tmp_path / "root" / "xla" and compile_cache_dir(enabled=False) is None
    assert compile_cache_dir(jax_dir="/jax/own") == Path("/jax/own")  # JAX_COMPILATION_CACHE_DIR is kept
    monkeypatch.setenv("JAXMOE_COMPILE_CACHE", "off")
    assert compile_cache_dir() is None and compile_cache_dir(jax_dir="/jax/own") is None
    monkeypatch.setenv("JAXMOE_COMPILE_CACHE", str(tmp_path / "elsewhere"))
    assert compile_cache_dir(jax_dir="/jax/own") == tmp_path / "elsewhere"
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    with compile_cache() as path:
        assert path == tmp_path / "elsewhere" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
    with compile_cache(enabled=False) as path:
        assert path is None and not jax.config.jax_enable_compilation_cache
    assert jax.config.jax_enable_compilation_cache


def test_compiling_commands_are_known():
    assert COMPILING <= set(COMMANDS) and "convert" not in COMPILING
