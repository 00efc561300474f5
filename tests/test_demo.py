"""`jaxmoe demo` as a newcomer runs it after `pip install -e .` alone: torch is not importable, output is a log
(no terminal), and the demo must still run to the end, name the experts in every table, write the heatmap and
say how to enable the transformers reload."""
from __future__ import annotations

import os
import subprocess
import sys

# torch made unimportable the way a base install lacks it: importlib.util.find_spec("torch") returns None
# for a None entry in sys.modules, so transformers also believes torch absent.
RUN_WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; from jaxmoe.cli import main; "
                     "sys.exit(main(sys.argv[1:]))")


def test_demo_runs_to_the_end_without_torch(tmp_path):
    out = tmp_path / "demo"
    with open(tmp_path / "stdout", "w+") as so, open(tmp_path / "stderr", "w+") as se:
        proc = subprocess.Popen([sys.executable, "-c", RUN_WITHOUT_TORCH, "demo", "--out", str(out),
                                 "--max-new-tokens", "12"], stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    log = stdout + stderr
    assert proc.returncode == 0, log[-3000:]
    assert "demo passed" in stdout
    # Every table names the experts as the recipe does, header included.
    assert "| prompts of | code | math | chat | story |" in stdout
    assert "  layer | code | math | chat | story" in stdout
    assert stdout.count("identical to the MoE: True") == 2
    assert "skipped: torch is not installed" in stdout and "pip install" in stdout
    # A log, not a terminal: no carriage returns or cursor movements from progress bars.
    assert "\r" not in log and "\x1b[" not in log
    assert "PyTorch was not found" not in log  # transformers' advice is noise for a base install
    png = (out / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "routing.txt").read_text().count("\n") > 30  # every one of the 30 layers
    assert (out / "smollm2-4x" / "config.json").is_file()
    assert not list(out.glob("*.tmp-*"))
    # The goal: the demo fits in 3 GiB (it peaked at 6.5 GB: routing copied every parameter).
    assert usage.ru_maxrss < 3 * 2**20, f"peak RSS {usage.ru_maxrss / 2**20:.2f} GiB"
