"""The files a training run leaves besides checkpoints: metrics logs (JSON lines) and the end-of-run
reports (loss curve, routing change before vs after training)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


# --- metrics logs ------------------------------------------------------------------------------------
def jsonl_keep(path: Path, last_step: int) -> list[dict]:
    """Rows of a metrics file up to `last_step`, rewriting the file (a killed run may have logged more)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= last_step:
                rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# --- end-of-run reports -----------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def routing_change(before: list[list[float]], after: list[list[float]]) -> str:
    """A table of per-layer expert load (top-k slot fractions) before and after training."""
    lines = ["layer  expert  before  after   change"]
    for l, (b, a) in enumerate(zip(before, after)):
        for e, (x, y) in enumerate(zip(b, a)):
            lines.append(f"{l:5d}  {e:6d}  {x:6.3f}  {y:6.3f}  {y - x:+7.3f}")
    return "\n".join(lines)


def write_reports(out: str | Path) -> list[Path]:
    """loss_curve.png (train and held-out loss by step) and routing_report.{txt,json} (expert load on
    held-out data before vs after) from a run directory's metrics.jsonl and eval.jsonl."""
    out = Path(out)
    train, evals = _read_jsonl(out / "metrics.jsonl"), _read_jsonl(out / "eval.jsonl")
    written = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss_curve.png (pip install matplotlib)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy", lw=1)
        if evals:
            ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out cross-entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png", dpi=120)
        plt.close(fig)
        written.append(out / "loss_curve.png")
    if len(evals) >= 2 and evals[0]["expert_load"]:
        before, after = evals[0], evals[-1]
        text = (f"expert load (fraction of top-k slots) on {after.get('data', 'held-out data')}, step "
                f"{before['step']} vs step {after['step']}\nloss {before['loss']:.4f} -> {after['loss']:.4f}\n"
                + routing_change(before["expert_load"], after["expert_load"]) + "\n")
        (out / "routing_report.txt").write_text(text)
        (out / "routing_report.json").write_text(json.dumps(
            {"before": before, "after": after}, indent=2) + "\n")
        written += [out / "routing_report.txt", out / "routing_report.json"]
    return written
