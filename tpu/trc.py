"""TRC kit: create a TPU VM or pod slice, set it up, copy checkpoints, launch jaxmoe, collect logs, delete.

Every subcommand builds a list of shell commands (mostly `gcloud ...`) and runs them in order, stopping at
the first failure. With `--dry-run` it prints them instead, one per line, quoted with `shlex.join`, so
they can be reviewed or pasted. Standard library only; `gcloud` is needed only for real runs.

    python -m tpu.trc create my-tpu --accelerator-type v4-32 --zone us-central2-b --dry-run
    python -m tpu.trc launch my-tpu --mesh-preset v4-32 -- generate ckpt/moe --prompt "Hi"

Project and zone default to the environment variables TPU_PROJECT and TPU_ZONE. Remote paths are relative
to the home directory of each worker; a word starting with `~/` is expanded there.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python tpu/trc.py`: make `tpu` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpu.accelerators import Accelerator, parse_accelerator  # noqa: E402
from tpu.mesh_presets import load_preset  # noqa: E402

Command = list[str]

REPO_ROOT = Path(__file__).resolve().parent.parent
JAX_TPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
LOG_DIR = "jaxmoe-logs"  # on each worker, under $HOME
TARBALL = "jaxmoe-src.tar.gz"
JAXMOE_COMMANDS = ("build", "generate", "train", "convert", "inspect", "demo")
TAR_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "./out", "./logs")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/~][A-Za-z0-9._/~-]*$")
_SAFE_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")  # GCE resource names


class KitError(Exception):
    """A user error: printed as one line `error: ...`, exit status 2."""


# ---------------------------------------------------------------- gcloud command builders


def _where(ns: argparse.Namespace) -> Command:
    """`--zone Z [--project P]`: the location flags shared by every gcloud TPU command."""
    flags = ["--zone", ns.zone]
    if ns.project:
        flags += ["--project", ns.project]
    return flags


def ssh(ns: argparse.Namespace, remote: str, worker: str = "all") -> Command:
    """`gcloud compute tpus tpu-vm ssh` running `remote` (a shell string) on the given worker(s)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", ns.name, *_where(ns), f"--worker={worker}",
            "--command", remote]


def scp(ns: argparse.Namespace, src: str, dst: str, worker: str = "all", recurse: bool = False) -> Command:
    """`gcloud compute tpus tpu-vm scp`; prefix a path with `NAME:` to mean the worker side."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *(["--recurse"] if recurse else []), src, dst,
            *_where(ns), f"--worker={worker}"]


def _remote_path(path: str, what: str) -> str:
    """Validate a worker-side path (relative to $HOME) so it can go unquoted into a remote shell."""
    if not _SAFE_PATH.match(path):
        raise KitError(f"{what} {path!r} may only contain letters, digits and . _ / ~ - (and not start with -)")
    return path


def remote_join(words: list[str]) -> str:
    """`shlex.join` for the worker's shell, except that a leading `~/` stays unquoted so it means $HOME."""
    return " ".join("~/" + shlex.quote(w[2:]) if w.startswith("~/") and len(w) > 2 else shlex.quote(w)
                    for w in words)


# ---------------------------------------------------------------- subcommands


def plan_create(ns: argparse.Namespace) -> list[Command]:
    """Create a TPU VM / pod slice (directly, or as a queued resource with `--queued`)."""
    acc = _accelerator(ns)
    version = ns.version or acc.generation.runtime_version
    if ns.spot and ns.preemptible:
        raise KitError("choose one of --spot and --preemptible")
    if ns.queued:
        if ns.preemptible:
            raise KitError("queued resources take --spot, not --preemptible")
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", ns.name, "--node-id", ns.name,
               *_where(ns), "--accelerator-type", acc.type, "--runtime-version", version]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", ns.name, *_where(ns),
               "--accelerator-type", acc.type, "--version", version]
    cmd += ["--spot"] * ns.spot + ["--preemptible"] * ns.preemptible
    return [cmd]


def plan_setup(ns: argparse.Namespace) -> list[Command]:
    """Copy the project to every worker (tarball, or `git clone`) and install it with `jax[tpu]`."""
    rdir = _remote_path(ns.remote_dir, "--remote-dir")
    if not re.match(r"^[A-Za-z0-9._\[\]=<>!,-]+$", ns.jax):
        raise KitError(f"--jax {ns.jax!r} is not a plain requirement such as jax[tpu] or jax[tpu]==0.6.2")
    install = (f'cd {rdir} && python3 -m pip install -U "{ns.jax}" -f {JAX_TPU_FIND_LINKS}'
               " && python3 -m pip install -e .")
    if ns.git:
        clone = ["git", "clone", "--depth", "1", *(["--branch", ns.branch] if ns.branch else []), ns.git, rdir]
        fetch = f"if [ -d {rdir}/.git ]; then git -C {rdir} pull --ff-only; else {remote_join(clone)}; fi"
        return [ssh(ns, f"{fetch} && {install}")]
    src = Path(ns.src).resolve()
    if not (src / "pyproject.toml").is_file():
        raise KitError(f"--src {src} has no pyproject.toml: pass the jaxmoe checkout to copy")
    local_tar = str(Path(tempfile.gettempdir()) / TARBALL)
    tar = ["tar", "-czf", local_tar, *(f"--exclude={x}" for x in TAR_EXCLUDES), "-C", str(src), "."]
    unpack = f"mkdir -p {rdir} && tar -xzf {TARBALL} -C {rdir}"
    return [tar, scp(ns, local_tar, f"{ns.name}:{TARBALL}"), ssh(ns, f"{unpack} && {install}")]


def plan_copy(ns: argparse.Namespace) -> list[Command]:
    """Copy a checkpoint from GCS onto the workers, or (worker 0 by default) from a worker up to GCS."""
    down, up = ns.src.startswith("gs://"), ns.dst.startswith("gs://")
    if down == up:
        raise KitError("copy needs exactly one gs:// side: copy NAME gs://BUCKET/PATH DIR (or DIR gs://...)")
    if down:
        dst = _remote_path(ns.dst, "destination")
        remote = f"mkdir -p {dst} && {remote_join(['gcloud', 'storage', 'cp', '-r', ns.src, dst])}"
        return [ssh(ns, remote, ns.worker or "all")]
    src = _remote_path(ns.src, "source")
    return [ssh(ns, remote_join(["gcloud", "storage", "cp", "-r", src, ns.dst]), ns.worker or "0")]


def plan_launch(ns: argparse.Namespace) -> list[Command]:
    """Run one `jaxmoe ...` command on all workers at once (from $HOME), in the background, one log per worker."""
    args = list(ns.jaxmoe_args)
    if not args or args[0] not in JAXMOE_COMMANDS:
        got = repr(args[0]) if args else "nothing"
        raise KitError(f"launch expects a jaxmoe command ({', '.join(JAXMOE_COMMANDS)}) after --, got {got}")
    if ns.mesh_preset:
        if args[0] != "generate":
            raise KitError(f"--mesh-preset applies to generate; for {args[0]} put the mesh in its config")
        if any(a == "--mesh" or a.startswith("--mesh=") for a in args):
            raise KitError("pass either --mesh-preset or --mesh, not both")
        args += ["--mesh", _preset(ns.mesh_preset)]
    for kv in ns.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
            raise KitError(f"--env {kv!r}: expected KEY=VALUE")
    log_name = ns.log_name or args[0]
    if not re.match(r"^[A-Za-z0-9._-]+$", log_name):
        raise KitError(f"--log-name {log_name!r} may only contain letters, digits and . _ -")
    run = remote_join([*(["env", *ns.env] if ns.env else []), "jaxmoe", *args])
    prefix = 'export PATH="$HOME/.local/bin:$PATH"'  # where `pip install --user` puts the jaxmoe script
    if ns.foreground:
        return [ssh(ns, f"{prefix} && {run}", ns.worker)]
    log = f"~/{LOG_DIR}/{log_name}.log"
    # `{ ... & }` backgrounds only jaxmoe, so the echo runs only when mkdir worked.
    remote = (f"{prefix} && mkdir -p ~/{LOG_DIR} && {{ nohup {run} > {log} 2>&1 < /dev/null & }} && "
              f'echo "started on $(hostname): {log}"')
    return [ssh(ns, remote, ns.worker)]


def plan_logs(ns: argparse.Namespace) -> list[Command]:
    """Tail the logs on every worker (`--tail N`) or copy each worker's log folder to OUT/worker-I."""
    if ns.tail:
        return [ssh(ns, f"tail -n {ns.tail} ~/{LOG_DIR}/*.log")]
    acc = _accelerator(ns)
    out = ns.out or os.path.join("logs", ns.name)
    cmds: list[Command] = []
    for i in range(acc.hosts):
        dst = os.path.join(out, f"worker-{i}")
        cmds += [["mkdir", "-p", dst], scp(ns, f"{ns.name}:{LOG_DIR}", dst, worker=str(i), recurse=True)]
    return cmds


def plan_delete(ns: argparse.Namespace) -> list[Command]:
    """Delete the TPU VM / slice (and its queued resource with `--queued`) without prompting."""
    if ns.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", ns.name, *_where(ns), "--quiet", "--force"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", ns.name, *_where(ns), "--quiet"]]


# ---------------------------------------------------------------- argument parsing and running


def _accelerator(ns: argparse.Namespace) -> Accelerator:
    if not ns.accelerator_type:
        raise KitError("no accelerator type: pass --accelerator-type (e.g. v4-32) or set TPU_ACCELERATOR_TYPE")
    try:
        acc = parse_accelerator(ns.accelerator_type)
    except ValueError as e:
        raise KitError(str(e)) from None
    print(f"# {acc.type}: {acc.chips} chips on {acc.hosts} host(s), {acc.generation.hbm_gib} GiB HBM per chip",
          file=sys.stderr)
    return acc


def _preset(name: str) -> str:
    try:
        return load_preset(name)
    except ValueError as e:
        raise KitError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The `trc` argument parser (one subparser per step)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="TPU VM / slice name")
    common.add_argument("--zone", default=os.environ.get("TPU_ZONE"), help="zone (default: $TPU_ZONE)")
    common.add_argument("--project", default=os.environ.get("TPU_PROJECT"), help="project (default: $TPU_PROJECT)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and exit")
    acc = argparse.ArgumentParser(add_help=False)
    acc.add_argument("--accelerator-type", default=os.environ.get("TPU_ACCELERATOR_TYPE"),
                     help="v4-N, v5litepod-N (v5e-N), v5p-N or v6e-N (default: $TPU_ACCELERATOR_TYPE)")
    rdir = argparse.ArgumentParser(add_help=False)
    rdir.add_argument("--remote-dir", default="jaxmoe", help="project folder on the workers (default: ~/jaxmoe)")

    p = argparse.ArgumentParser(prog="python -m tpu.trc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("create", parents=[common, acc], help=plan_create.__doc__)
    c.add_argument("--version", help="TPU VM runtime version (default: the generation's base image)")
    c.add_argument("--spot", action="store_true", help="Spot VM (cheaper, can be preempted)")
    c.add_argument("--preemptible", action="store_true", help="legacy preemptible VM (v4 and older)")
    c.add_argument("--queued", action="store_true", help="request through a queued resource")
    s = sub.add_parser("setup", parents=[common, rdir], help=plan_setup.__doc__)
    s.add_argument("--src", default=str(REPO_ROOT), help="local checkout to copy (default: this repository)")
    s.add_argument("--git", metavar="URL", help="git clone URL on the workers instead of copying --src")
    s.add_argument("--branch", help="branch or tag for --git")
    s.add_argument("--jax", default="jax[tpu]", help='jax requirement to install (default: "jax[tpu]")')
    cp = sub.add_parser("copy", parents=[common], help=plan_copy.__doc__)
    cp.add_argument("src", help="gs://BUCKET/PATH to download, or a worker path to upload")
    cp.add_argument("dst", help="worker folder (relative to $HOME), or gs://BUCKET/PATH")
    cp.add_argument("--worker", help="worker(s): all (download default), 0 (upload default), or an index")
    la = sub.add_parser("launch", parents=[common], help=plan_launch.__doc__,
                        usage="%(prog)s NAME [options] -- build|generate|train|convert|inspect|demo ARGS")
    la.add_argument("--worker", default="all", help="worker(s) to run on (default: all)")
    la.add_argument("--mesh-preset", help="append --mesh SPEC from configs/mesh/PRESET.yaml (generate only)")
    la.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for jaxmoe")
    la.add_argument("--log-name", help="log file name on the workers (default: the jaxmoe command)")
    la.add_argument("--foreground", action="store_true", help="stream the output instead of nohup + log")
    lg = sub.add_parser("logs", parents=[common, acc], help=plan_logs.__doc__)
    lg.add_argument("--out", help="local folder (default: logs/NAME)")
    lg.add_argument("--tail", type=int, default=0, metavar="N", help="print the last N lines on every worker")
    d = sub.add_parser("delete", parents=[common], help=plan_delete.__doc__)
    d.add_argument("--queued", action="store_true", help="delete the queued resource (and its node)")
    return p


PLANS = {"create": plan_create, "setup": plan_setup, "copy": plan_copy, "launch": plan_launch,
         "logs": plan_logs, "delete": plan_delete}


def main(argv: list[str] | None = None) -> int:
    """Parse, plan, then print (`--dry-run`) or run the commands; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tail: list[str] = []
    if "--" in argv:  # `launch NAME [options] -- generate ...`: everything after -- goes to jaxmoe
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    ns = build_parser().parse_args(argv)
    ns.jaxmoe_args = tail
    try:
        if tail and ns.step != "launch":
            raise KitError(f"{ns.step} takes no arguments after --")
        if "--dry-run" in tail:  # a misplaced --dry-run must never turn into a real run
            raise KitError("--dry-run belongs before --; after -- every word goes to jaxmoe")
        if not ns.zone:
            raise KitError("no zone: pass --zone (e.g. us-central2-b) or set TPU_ZONE")
        if not _SAFE_NAME.match(ns.name):
            raise KitError(f"TPU name {ns.name!r}: use lowercase letters, digits and -, starting with a letter")
        plan = PLANS[ns.step](ns)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in plan:
        line = shlex.join(cmd)
        if ns.dry_run:
            print(line)
            continue
        print(f"+ {line}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"error: command failed with exit status {rc}: {line}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
