"""Helpers of benchmarks/build_vs_mergekit.py: logging of the commands it runs, the mergekit virtualenv, reading
both tools' output directories under one naming, comparing them tensor by tensor, and the markdown report."""
from __future__ import annotations

import json
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

TORCH_PIN = "torch==2.13.0"  # the CPU wheel in /opt/wheels; any other spec would pull GBs of CUDA wheels
GOALS = dict(wall_ratio=0.5, rss_ratio=0.5, gate_cosine=0.999)


def log(msg: str) -> None:
    """Print one progress line of the benchmark."""
    print(f"[bench] {msg}", flush=True)


def run_logged(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Run `cmd` (checked), logging it first as a shell line."""
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---- the mergekit virtualenv ----------------------------------------------------------------------------


def _venv_versions(py: Path) -> dict | None:
    code = ("import importlib.metadata as m, json, torch; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers', 'safetensors')} | {'cuda': torch.version.cuda}))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None


def ensure_venv(venv: Path, version: str) -> dict:
    """A virtualenv at `venv` with torch 2.13.0 (CPU) and mergekit==version; created once, then reused."""
    py = venv / "bin" / "python"
    have = _venv_versions(py) if py.is_file() and (venv / "bin" / "mergekit-moe").is_file() else None
    if have and have["mergekit"] == version and have["torch"].startswith("2.13.0") and not have["cuda"]:
        log(f"mergekit venv: reusing {venv} ({', '.join(f'{k} {v}' for k, v in have.items())})")
        return have
    log(f"mergekit venv: {'updating' if py.is_file() else 'creating'} {venv} (torch 2.13.0 CPU, then "
        f"mergekit=={version}; one-off, downloads ~100 MB of pure-Python deps from PyPI)")
    if not py.is_file():
        venv.parent.mkdir(parents=True, exist_ok=True)
        run_logged([sys.executable, "-m", "venv", venv])
    constraints = venv / "bench-constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")  # keeps the resolver from ever replacing torch
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    run_logged(pip + [TORCH_PIN])
    run_logged(pip + ["-c", constraints, f"mergekit=={version}"])
    have = _venv_versions(py)
    if not have or have["mergekit"] != version or not have["torch"].startswith("2.13.0") or have["cuda"]:
        raise RuntimeError(f"{venv}: unexpected packages after install: {have}")
    log(f"mergekit venv ready: {', '.join(f'{k} {v}' for k, v in have.items())}")
    return have


# ---- output comparison ----------------------------------------------------------------------------------

EXPERT_LEGACY = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
EXPERT_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
ROUTER = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
W_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
           "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


class Output:
    """An HF output directory read lazily under canonical names: `model.layers.{i}.experts.{j}.{gate,up,down}_proj`
    ([out, in], per expert), `model.layers.{i}.router` [E, H], everything else under its own HF name."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.config = json.loads((path / "config.json").read_text())
        inter = self.config["intermediate_size"]
        self.files = [safe_open(str(f), "np") for f in sorted(path.glob("*.safetensors"))]
        self.index: dict[str, tuple] = {}  # canonical -> (file, hf name, slicer)
        self.layout = "legacy"
        for fh in self.files:
            for hf in fh.keys():
                if m := EXPERT_LEGACY.fullmatch(hf):
                    self.index[f"model.layers.{m[1]}.experts.{m[2]}.{W_NAMES[m[3]]}"] = (fh, hf, None)
                elif m := EXPERT_FUSED.fullmatch(hf):
                    self.layout = "fused"
                    shape = fh.get_slice(hf).get_shape()
                    for j in range(shape[0]):
                        pre = f"model.layers.{m[1]}.experts.{j}"
                        if m[2] == "down_proj":
                            self.index[f"{pre}.down_proj"] = (fh, hf, (j, slice(None)))
                        elif shape[1] == 2 * inter:  # [E, 2I, H]: gate rows first
                            self.index[f"{pre}.gate_proj"] = (fh, hf, (j, slice(0, inter)))
                            self.index[f"{pre}.up_proj"] = (fh, hf, (j, slice(inter, None)))
                        else:
                            raise RuntimeError(f"{path}: {hf} has shape {shape}; expected [E, 2I, H]")
                elif m := ROUTER.fullmatch(hf):
                    self.index[f"model.layers.{m[1]}.router"] = (fh, hf, None)
                else:
                    self.index[hf] = (fh, hf, None)
        self._last: tuple[str, np.ndarray] | None = None

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` (canonical name) as a numpy array."""
        fh, hf, sl = self.index[name]
        if sl is None:
            return fh.get_tensor(hf)
        if self._last is None or self._last[0] != hf:
            self._last = (hf, fh.get_tensor(hf))
        return self._last[1][sl]

    def dtypes(self) -> set[str]:
        """The dtypes of all tensors in the directory."""
        return {str(fh.get_slice(hf).get_dtype()) for fh, hf, _ in self.index.values()}


def group_of(name: str) -> str:
    """The report's tensor group of canonical tensor `name` (experts, routers, attention, ...)."""
    if ".experts." in name:
        return "experts"
    if name.endswith(".router"):
        return "routers"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embed / lm_head"
    if "self_attn" in name:
        return "attention"
    if "norm" in name:
        return "norms"
    return "other"


def source_of(name: str, base: Path, sources: list[Path]) -> tuple[Path, str]:
    """(source dir, HF tensor name) that canonical tensor `name` was copied from."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.experts\.(\d+)\.(\w+)", name)
    if m:
        return sources[int(m[2])], f"model.layers.{m[1]}.mlp.{m[3]}.weight"
    return base, name


def compare(mk: Output, jx: Output, base: Path, sources: list[Path], fp32_gates: np.ndarray) -> dict:
    """mergekit's and jaxmoe's outputs tensor by tensor, per group (and against the sources), routers by cosine."""
    from safetensors import safe_open

    src_files: dict[Path, dict] = {}

    def src_tensor(d: Path, hf: str):
        if d not in src_files:
            src_files[d] = {k: fh for fh in (safe_open(str(f), "np") for f in sorted(d.glob("*.safetensors")))
                            for k in fh.keys()}
        fh = src_files[d].get(hf)
        if fh is None and hf == "lm_head.weight":  # tied: the embedding
            fh, hf = src_files[d].get("model.embed_tokens.weight"), "model.embed_tokens.weight"
        return None if fh is None else fh.get_tensor(hf)

    names_mk, names_jx = set(mk.index), set(jx.index)
    groups: dict[str, dict] = {}
    mismatches = []
    for name in sorted(names_mk & names_jx, key=lambda n: (group_of(n), n)):
        a, b = mk.get(name), jx.get(name)
        g = groups.setdefault(group_of(name), dict(tensors=0, max_abs_diff=0.0, identical=0, mk_eq_source=0,
                                                   jx_eq_source=0, with_source=0))
        g["tensors"] += 1
        if a.shape != b.shape:
            mismatches.append(f"{name}: shape {a.shape} vs {b.shape}")
            g["max_abs_diff"] = float("inf")
            continue
        g["max_abs_diff"] = max(g["max_abs_diff"], float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0)
        same = a.dtype == b.dtype and np.array_equal(a, b)
        g["identical"] += same
        if not same and group_of(name) != "routers":
            mismatches.append(name)
        if group_of(name) != "routers":
            s = src_tensor(*source_of(name, base, sources))
            if s is not None:
                g["with_source"] += 1
                g["mk_eq_source"] += bool(s.shape == a.shape and np.array_equal(s.astype(a.dtype), a))
                g["jx_eq_source"] += bool(s.shape == b.shape and np.array_equal(s.astype(b.dtype), b))

    # Routers: cosine per (layer, expert), against each other and against mergekit's code in float32.
    layers = sorted(int(n.split(".")[2]) for n in names_mk & names_jx if n.endswith(".router"))

    def cos(x, y):  # two zero vectors (mergekit's clamp leaves a zero difference at zero) count as equal
        x, y = x.astype(np.float64), y.astype(np.float64)
        nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
        c = (x * y).sum(-1) / np.maximum(nx * ny, 1e-300)
        return np.where((nx < 1e-12) & (ny < 1e-12), 1.0, c)

    r_mk = np.stack([mk.get(f"model.layers.{i}.router") for i in layers])
    r_jx = np.stack([jx.get(f"model.layers.{i}.router") for i in layers])
    c = cos(r_mk, r_jx)  # [L, E]
    c_jx32 = cos(r_jx, fp32_gates[layers])
    c_mk32 = cos(r_mk, fp32_gates[layers])
    worst = np.unravel_index(np.argmin(c), c.shape)
    gates = dict(
        cosine_min=float(c.min()), cosine_mean=float(c.mean()), worst_layer=int(layers[worst[0]]),
        worst_expert=int(worst[1]), cosine_min_per_layer=[float(x) for x in c.min(1)],
        jaxmoe_vs_mergekit_fp32_min=float(c_jx32.min()), mergekit_bf16_vs_mergekit_fp32_min=float(c_mk32.min()),
        norm_jaxmoe=[float(np.linalg.norm(r_jx, axis=-1).min()), float(np.linalg.norm(r_jx, axis=-1).max())],
        norm_mergekit=[float(np.linalg.norm(r_mk, axis=-1).min()), float(np.linalg.norm(r_mk, axis=-1).max())])
    cfg_diff = {k: [mk.config.get(k), jx.config.get(k)] for k in sorted(set(mk.config) | set(jx.config))
                if mk.config.get(k) != jx.config.get(k)}
    non_gate = [g for k, g in groups.items() if k != "routers"]
    return dict(
        groups=groups, gates=gates, only_in_mergekit=sorted(names_mk - names_jx),
        only_in_jaxmoe=sorted(names_jx - names_mk), mismatched_tensors=mismatches[:50],
        non_gate_identical=not mismatches and names_mk == names_jx and all(g["identical"] == g["tensors"]
                                                                             for g in non_gate),
        layouts=dict(mergekit=mk.layout, jaxmoe=jx.layout),
        dtypes=dict(mergekit=sorted(mk.dtypes()), jaxmoe=sorted(jx.dtypes())),
        config_differences=cfg_diff,
        files=dict(mergekit=sorted(p.name for p in mk.path.iterdir()), jaxmoe=sorted(p.name for p in jx.path.iterdir())),
        output_bytes=dict(mergekit=sum(f.stat().st_size for f in mk.path.glob("*.safetensors")),
                          jaxmoe=sum(f.stat().st_size for f in jx.path.glob("*.safetensors"))))


# ---- report ---------------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    """The results as markdown tables: timing against the goals, then the tensor comparison."""
    t, c, g = res["timing"], res["comparison"], res["goals"]
    mark = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    rows = [
        "| | mergekit-moe | jaxmoe build | jaxmoe / mergekit | goal |",
        "|---|---|---|---|---|",
        f"| wall time, s (min of {res['repeats']}) | {t['mergekit']['wall_s']:.1f} | {t['jaxmoe']['wall_s']:.1f} | "
        f"{t['wall_ratio']:.2f} | <= {GOALS['wall_ratio']} ({mark(g['wall'])}) |",
        f"| peak RSS, MiB (max of {res['repeats']}) | {t['mergekit']['peak_rss_mib']:.0f} | "
        f"{t['jaxmoe']['peak_rss_mib']:.0f} | {t['rss_ratio']:.2f} | <= {GOALS['rss_ratio']} ({mark(g['rss'])}) |",
        f"| CPU time, s (min) | {t['mergekit']['cpu_s']:.1f} | {t['jaxmoe']['cpu_s']:.1f} | "
        f"{t['jaxmoe']['cpu_s'] / t['mergekit']['cpu_s']:.2f} | |",
    ]
    runs = "; ".join(f"{k}: " + ", ".join(f"{x['wall_s']:.1f} s / {x['peak_rss_mib']:.0f} MiB" for x in v)
                     for k, v in t["runs"].items())
    rows.append(f"\nAll runs in order of repeat (wall / peak RSS): {runs}.")
    out = [f"Model: {res['model']}; {res['machine']}", ""] + rows + ["", "| tensor group | tensors | max abs diff "
           "| identical | mergekit = source | jaxmoe = source |", "|---|---|---|---|---|---|"]
    for name, grp in c["groups"].items():
        src = (lambda k: f"{grp[k]}/{grp['with_source']}") if name != "routers" else (lambda k: "-")
        out.append(f"| {name} | {grp['tensors']} | {grp['max_abs_diff']:.3g} | {grp['identical']}/{grp['tensors']} "
                   f"| {src('mk_eq_source')} | {src('jx_eq_source')} |")
    gt = c["gates"]
    out += ["", f"Gate vectors: min cosine jaxmoe vs mergekit {gt['cosine_min']:.5f} (mean {gt['cosine_mean']:.5f}; "
            f"worst: layer {gt['worst_layer']}, expert {gt['worst_expert']}) — goal >= {GOALS['gate_cosine']} "
            f"({mark(g['gate_cosine'])}). Diagnostic, mergekit's own gate code in float32: jaxmoe vs it "
            f"{gt['jaxmoe_vs_mergekit_fp32_min']:.6f}, mergekit (bf16) vs it {gt['mergekit_bf16_vs_mergekit_fp32_min']:.5f}.",
            f"All other tensors identical: {'yes' if c['non_gate_identical'] else '**no**'} "
            f"({mark(g['non_gate_identical'])}); layouts: mergekit {c['layouts']['mergekit']}, jaxmoe "
            f"{c['layouts']['jaxmoe']}; tensor names only in one output: {len(c['only_in_mergekit'])} / "
            f"{len(c['only_in_jaxmoe'])}."]
    return "\n".join(out) + "\n"


def write_results(results: Path, stem: str, res: dict, md: str, title: str) -> None:
    """results/STEM.json (`res`) and results/STEM.md (a `# title (date)` heading, then `md`)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / f"{stem}.md").write_text(f"# {title} ({res['date']})\n\n" + md)
    log(f"wrote {results / stem}.json and .md")


def cpu_name() -> str:
    """The CPU model name, for the report."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
