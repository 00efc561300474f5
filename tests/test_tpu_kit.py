"""The TRC kit (tpu/): exact dry-run commands, input validation, mesh presets and checks, SCALING.md numbers."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tpu import scaling
from tpu.accelerators import parse_accelerator
from tpu.mesh_presets import PRESET_DIR, check_mesh_divides, load_preset, load_preset_info, parse_mesh_spec

REPO = Path(__file__).resolve().parent.parent
WHERE = "--zone us-central2-b --project trc-proj"
TPU = "gcloud compute tpus tpu-vm"
PIP = ('python3 -m pip install -U "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html'
       " && python3 -m pip install -e .")
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
TPU_PRESETS = [p for p in PRESETS if not p.startswith("cpu")]


def trc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m tpu.trc ARGS` from the repo root with project/zone from the environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    base.update({"TPU_PROJECT": "trc-proj", "TPU_ZONE": "us-central2-b"} if env is None else env)
    return subprocess.run([sys.executable, "-m", "tpu.trc", *args], cwd=REPO, env=base, capture_output=True,
                          text=True, timeout=60)


def dry(*args: str, **kw) -> list[str]:
    """The printed commands of a successful dry run."""
    r = trc(args[0], "--dry-run", *args[1:], **kw)  # before any `--`: after it, words go to jaxmoe
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def fails(*args: str, **kw) -> str:
    """The one-line error of a dry run that must fail (non-zero, nothing on stdout)."""
    r = trc(args[0], "--dry-run", *args[1:], **kw)
    assert r.returncode != 0 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------- create / delete


@pytest.mark.parametrize("acc,gcloud_type,version", [
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
    ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5litepod-64", "v5litepod-64", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v5p-128", "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_per_generation(acc, gcloud_type, version):
    assert dry("create", "moe", "--accelerator-type", acc) == [
        f"{TPU} create moe {WHERE} --accelerator-type {gcloud_type} --version {version}"]


@pytest.mark.parametrize("preset", TPU_PRESETS)
def test_create_for_every_preset(preset):
    acc = load_preset_info(preset)["accelerator"]
    (line,) = dry("create", "moe", "--accelerator-type", acc, "--spot")
    assert f"--accelerator-type {acc} " in line and line.endswith(" --spot")


def test_create_options_and_environment():
    assert dry("create", "moe", "--accelerator-type", "v4-32", "--preemptible") == [
        f"{TPU} create moe {WHERE} --accelerator-type v4-32 --version tpu-ubuntu2204-base --preemptible"]
    assert dry("create", "moe", "--accelerator-type", "v5e-64", "--queued", "--spot") == [
        f"gcloud compute tpus queued-resources create moe --node-id moe {WHERE} --accelerator-type v5litepod-64 "
        "--runtime-version v2-alpha-tpuv5-lite --spot"]
    # flags win over TPU_PROJECT / TPU_ZONE; no project anywhere -> no --project flag
    assert dry("create", "moe", "--accelerator-type", "v6e-8", "--zone", "europe-west4-a", env={"TPU_ZONE": "x"}) == [
        f"{TPU} create moe --zone europe-west4-a --accelerator-type v6e-8 --version v2-alpha-tpuv6e"]
    assert dry("create", "moe", "--version", "v2-alpha-tpuv6e-custom", env={"TPU_ZONE": "z",
                                                                          "TPU_ACCELERATOR_TYPE": "v6e-4"}) == [
        f"{TPU} create moe --zone z --accelerator-type v6e-4 --version v2-alpha-tpuv6e-custom"]


@pytest.mark.parametrize("bad", ["v4-33", "v4-4", "v7-8", "v5litepod-2", "v5e-512", "v6e-3", "tpu-v4-8", "v5p-0"])
def test_bad_accelerator_type_is_one_line_error(bad):
    assert fails("create", "moe", "--accelerator-type", bad).startswith(f"error: unknown accelerator type {bad!r}")


def test_other_input_errors():
    assert fails("create", "moe", "--accelerator-type", "v4-8", env={}) == (
        "error: no zone: pass --zone (e.g. us-central2-b) or set TPU_ZONE")
    assert fails("create", "moe") == (
        "error: no accelerator type: pass --accelerator-type (e.g. v4-32) or set TPU_ACCELERATOR_TYPE")
    assert fails("create", "moe", "--accelerator-type", "v4-8", "--spot", "--preemptible") == (
        "error: choose one of --spot and --preemptible")
    assert fails("create", "moe", "--accelerator-type", "v4-8", "--queued", "--preemptible") == (
        "error: queued resources take --spot, not --preemptible")
    assert fails("delete", "Moe_1").startswith("error: TPU name 'Moe_1': use lowercase")
    assert fails("delete", "moe", "--", "x") == "error: delete takes no arguments after --"


def test_delete():
    assert dry("delete", "moe") == [f"{TPU} delete moe {WHERE} --quiet"]
    assert dry("delete", "moe", "--queued") == [
        f"gcloud compute tpus queued-resources delete moe {WHERE} --quiet --force"]


# ---------------------------------------------------------------- setup / copy


def test_setup_copies_this_checkout_and_installs_jax_tpu():
    tar = str(Path(tempfile.gettempdir()) / "jaxmoe-src.tar.gz")
    assert dry("setup", "moe") == [
        f"tar -czf {tar} --exclude=.git --exclude=.venv --exclude=__pycache__ '--exclude=*.egg-info' "
        f"--exclude=.pytest_cache --exclude=./out --exclude=./logs -C {REPO} .",
        f"{TPU} scp {tar} moe:jaxmoe-src.tar.gz {WHERE} --worker=all",
        f"{TPU} ssh moe {WHERE} --worker=all --command "
        + shlex.quote(f"mkdir -p jaxmoe && tar -xzf jaxmoe-src.tar.gz -C jaxmoe && cd jaxmoe && {PIP}"),
    ]


def test_setup_from_git():
    url = "https://github.com/you/jaxmoe.git"
    remote = (f"if [ -d moe/.git ]; then git -C moe pull --ff-only; else git clone --depth 1 --branch dev {url} moe; fi"
              f" && cd moe && {PIP}")
    assert dry("setup", "moe", "--git", url, "--branch", "dev", "--remote-dir", "moe") == [
        f"{TPU} ssh moe {WHERE} --worker=all --command {shlex.quote(remote)}"]
    assert fails("setup", "moe", "--remote-dir", "a b").startswith("error: --remote-dir 'a b' may only contain")
    assert fails("setup", "moe", "--src", "/").startswith("error: --src / has no pyproject.toml")


def test_copy_checkpoint_down_to_all_workers_and_up_from_worker_0():
    assert dry("copy", "moe", "gs://bkt/gemma-2-9b", "models") == [
        f"{TPU} ssh moe {WHERE} --worker=all --command "
        "'mkdir -p models && gcloud storage cp -r gs://bkt/gemma-2-9b models'"]
    assert dry("copy", "moe", "out/moe", "gs://bkt/moe") == [
        f"{TPU} ssh moe {WHERE} --worker=0 --command 'gcloud storage cp -r out/moe gs://bkt/moe'"]
    assert fails("copy", "moe", "a", "b").startswith("error: copy needs exactly one gs:// side")


# ---------------------------------------------------------------- launch / logs


def _launch_remote(run: str, log: str) -> str:
    return ('export PATH="$HOME/.local/bin:$PATH" && mkdir -p ~/jaxmoe-logs && '
            f"{{ nohup {run} > ~/jaxmoe-logs/{log}.log 2>&1 < /dev/null & }} && "
            f'echo "started on $(hostname): ~/jaxmoe-logs/{log}.log"')


def test_launch_build_generate_train():
    assert dry("launch", "moe", "--worker", "0", "--", "build", "r.yml", "out/moe") == [
        f"{TPU} ssh moe {WHERE} --worker=0 --command "
        + shlex.quote(_launch_remote("jaxmoe build r.yml out/moe", "build"))]
    run = "jaxmoe generate models/moe --prompt 'Hi there' --mesh expert=8,data=2"
    assert dry("launch", "moe", "--mesh-preset", "v4-32", "--", "generate", "models/moe", "--prompt", "Hi there") == [
        f"{TPU} ssh moe {WHERE} --worker=all --command " + shlex.quote(_launch_remote(run, "generate"))]
    run = "env LIBTPU_INIT_ARGS=--xla_tpu_x=1 jaxmoe train cfg.yml"
    env = "LIBTPU_INIT_ARGS=--xla_tpu_x=1"
    assert dry("launch", "moe", "--env", env, "--log-name", "t1", "--", "train", "cfg.yml") == [
        f"{TPU} ssh moe {WHERE} --worker=all --command " + shlex.quote(_launch_remote(run, "t1"))]
    assert dry("launch", "moe", "--foreground", "--", "generate", "m", "--prompt", "x") == [
        f"{TPU} ssh moe {WHERE} --worker=all --command "
        + shlex.quote('export PATH="$HOME/.local/bin:$PATH" && jaxmoe generate m --prompt x')]


@pytest.mark.parametrize("preset", PRESETS)
def test_launch_generate_with_every_preset(preset):
    (line,) = dry("launch", "moe", "--mesh-preset", preset, "--", "generate", "m", "--prompt", "hi")
    assert "--worker=all" in line and f"--mesh {load_preset(preset)} >" in shlex.split(line)[-1]


def test_launch_errors():
    assert fails("launch", "moe", "--", "serve", "m").startswith("error: launch expects a jaxmoe command")
    assert fails("launch", "moe").endswith("after --, got nothing")
    assert fails("launch", "moe", "--mesh-preset", "v4-32", "--", "train", "c.yml") == (
        "error: --mesh-preset applies to generate; for train put the mesh in its config")
    assert fails("launch", "moe", "--mesh-preset", "v4-32", "--", "generate", "m", "--mesh", "expert=2") == (
        "error: pass either --mesh-preset or --mesh, not both")
    assert fails("launch", "moe", "--mesh-preset", "v9-1", "--", "generate", "m").startswith(
        "error: unknown mesh preset 'v9-1'; presets are cpu-8, v4-32")


def test_launch_remote_command_runs_in_bash(tmp_path):
    """The --command string, run by bash in a fake $HOME, starts jaxmoe with the arguments intact (~/ = $HOME)."""
    (tmp_path / ".local/bin").mkdir(parents=True)
    fake = tmp_path / ".local/bin/jaxmoe"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    (line,) = dry("launch", "moe", "--mesh-preset", "cpu-8", "--", "generate", "~/m x", "--prompt", "it's $HOME; ok")
    remote = shlex.split(line)[-1]
    r = subprocess.run(["bash", "-c", remote], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("started on "), r.stderr
    log = tmp_path / "jaxmoe-logs/generate.log"
    for _ in range(100):
        if log.is_file() and log.read_text().count("\n") == 5:
            break
        time.sleep(0.05)
    assert log.read_text().splitlines() == [
        "generate", f"{tmp_path}/m x", "--prompt", "it's $HOME; ok", "--mesh", "expert=4,data=2"]


def test_logs_copy_from_each_worker_and_tail():
    lines = dry("logs", "moe", "--accelerator-type", "v5e-64", "--out", "L")
    assert len(lines) == 2 * 16
    assert lines[:2] == ["mkdir -p L/worker-0", f"{TPU} scp --recurse moe:jaxmoe-logs L/worker-0 {WHERE} --worker=0"]
    assert lines[-1] == f"{TPU} scp --recurse moe:jaxmoe-logs L/worker-15 {WHERE} --worker=15"
    assert dry("logs", "moe", "--accelerator-type", "v4-8")[0] == "mkdir -p logs/moe/worker-0"
    assert len(dry("logs", "moe", "--accelerator-type", "v4-8")) == 2
    assert dry("logs", "moe", "--tail", "20") == [
        f"{TPU} ssh moe {WHERE} --worker=all --command 'tail -n 20 ~/jaxmoe-logs/*.log'"]


def test_dry_run_after_double_dash_is_refused():
    r = trc("launch", "moe", "--", "generate", "m", "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: --dry-run belongs before --; after -- every word goes to jaxmoe\n"


def test_script_path_invocation():
    r = subprocess.run([sys.executable, "tpu/trc.py", "delete", "moe", "--zone", "z", "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"{TPU} delete moe --zone z --quiet\n"


# ---------------------------------------------------------------- accelerators and meshes


@pytest.mark.parametrize("name,chips,hosts", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v4-4096", 2048, 512), ("v5litepod-8", 8, 1), ("v5e-16", 16, 4),
    ("v5litepod-64", 64, 16), ("v5p-8", 4, 1), ("v5p-128", 64, 16), ("v6e-8", 8, 1), ("v6e-256", 256, 64),
])
def test_chips_and_hosts(name, chips, hosts):
    acc = parse_accelerator(name)
    assert (acc.chips, acc.hosts) == (chips, hosts)


def test_check_mesh_divides():
    with pytest.raises(ValueError, match=r"^mesh expert=2 does not divide 3 experts$"):
        check_mesh_divides("expert=2", num_experts=3, num_heads=4, num_kv_heads=2, num_devices=2)
    with pytest.raises(ValueError, match=r"^mesh tensor=4 does not divide 2 KV heads$"):
        check_mesh_divides("tensor=4,data=2", 8, 8, 2, 8)
    with pytest.raises(ValueError, match=r"^mesh tensor=3 does not divide 8 attention heads$"):
        check_mesh_divides("tensor=3", 8, 8, 2, 3)
    with pytest.raises(ValueError, match=r"^mesh expert=4,data=2 uses 8 devices but 16 are available$"):
        check_mesh_divides("expert=4,data=2", 8, 8, 2, 16)
    with pytest.raises(ValueError, match=r"^mesh expert=2 needs an MoE model; this model is dense$"):
        check_mesh_divides("expert=2", 0, 8, 2, 2)
    with pytest.raises(ValueError, match=r"unknown axis 'pipe'"):
        check_mesh_divides("pipe=2", 8, 8, 2, 2)
    with pytest.raises(ValueError, match=r"axis 'data' appears twice"):
        parse_mesh_spec("data=2,data=2")
    with pytest.raises(ValueError, match=r"must be a positive integer, got '0'"):
        parse_mesh_spec("data=0")
    check_mesh_divides("expert=4,data=2", 8, 8, 2, 8)  # divides: no error
    assert parse_mesh_spec("expert=4, data=2") == {"expert": 4, "data": 2}


def test_presets():
    assert PRESETS == ["cpu-8", "v4-32", "v4-8", "v5e-64", "v5e-8", "v5p-128", "v6e-8"]
    assert load_preset("cpu-8") == "expert=4,data=2"
    assert load_preset("v4-32") == "expert=8,data=2"
    assert load_preset("v5litepod-64") == load_preset("v5e-64") == "expert=8,tensor=8"
    for name in TPU_PRESETS:
        info = load_preset_info(name)
        axes = parse_mesh_spec(info["mesh"])
        assert int(info["devices"]) == parse_accelerator(info["accelerator"]).chips
        prod = 1
        for v in axes.values():
            prod *= v
        assert prod == int(info["devices"]) and info["note"]
    with pytest.raises(ValueError, match="unknown mesh preset 'v4-9'"):
        load_preset("v4-9")


# ---------------------------------------------------------------- scaling plan


def test_param_counts_by_hand():
    # Mixtral-8x7B: per layer 8 experts x 3 x 4096 x 14336, q/o 4096x4096, k/v 4096x(8x128), router 8x4096, 2 norms
    layer = 8 * 3 * 4096 * 14336 + 2 * 4096 * 4096 + 2 * 4096 * 1024 + 8 * 4096 + 2 * 4096
    mixtral = 32 * layer + 2 * 32000 * 4096 + 4096
    assert mixtral == 46_702_792_704
    p = scaling.param_counts(scaling.Shape.from_hf(scaling.MODELS["Mixtral-8x7B"]))
    assert p["total"] == mixtral and scaling.BF16 * p["total"] == 93_405_585_408
    # Gemma-2-9B 8x: q/o 3584x(16x256), k/v 3584x(8x256), 4 sandwich norms, tied 256000x3584 embedding
    layer = 8 * 3 * 3584 * 14336 + 2 * 3584 * 4096 + 2 * 3584 * 2048 + 8 * 3584 + 4 * 3584
    gemma = 42 * layer + 256000 * 3584 + 3584
    assert scaling.param_counts(scaling.Shape.from_hf(scaling.MODELS["Gemma-2-9B 8x"]))["total"] == gemma


def test_mixtral_on_v4_32_by_hand():
    from benchmarks.scaling_plan import memory  # the memory numbers: jaxmoe.parallel.plan

    case = scaling.evaluate("Mixtral-8x7B", "v4-32", memory)
    rows = {lay.spec: (m, t) for lay, m, t in case.rows}
    m, t = rows["expert=8,fsdp=2"]
    experts, dense = 32 * 8 * 3 * 4096 * 14336, 46_702_792_704 - 32 * 8 * 3 * 4096 * 14336
    norms = (2 * 32 + 1) * 4096  # never split (their only axis is the norm width)
    assert m["params"] == 2 * (experts // 16 + (dense - norms) // 2 + norms)
    assert t["a2a"] == 32 * 2 * 2 * 4096 * 2 * 7 / 8 == 917_504  # L x (dispatch+combine) x k x H x bf16 x off-chip
    assert rows["expert=8,tensor=2"][1]["tp"] == 32 * 2 * 2 * 1 * 4096 * 2  # 2 all-reduces/layer, ring 2(t-1)
    # 64 seqs / 16 shards: k and v of 4 rows x 32 layers x 8 KV heads x 128 x 4096 slots in bf16, the [4, 4096]
    # bool mask of valid slots and the int32 next-slot index
    assert rows["expert=8,data=2"][0]["kv"] == 2 * 32 * 4 * 4096 * 8 * 128 * 2 + 4 * 4096 + 4 == 2**31 + 16_388
    # full fine-tuning: fp32 master + AdamW m, v + two fp32 gradient buffers = 20 B on the chip's 1/16 of each
    # weight (norms whole), plus two int32 step counters
    assert rows["fsdp=16"][0]["opt_full"] == ((46_702_792_704 - norms) // 16 + norms) * 20 + 8
    # decode with pure FSDP: every chip gathers 15/16 of all weights per step, shared by 64 tokens
    assert rows["fsdp=16"][1]["fsdp_decode"] == 16 * 93_405_585_408 * 15 / 16 / 64
    assert case.rejected == [("expert=16", "mesh expert=16 does not divide 8 experts")]
    assert case.best("infer")[0].spec == "expert=8,data=2" and case.best("train_full") is None


def test_presets_are_the_inference_recommendations():
    from benchmarks.scaling_plan import memory

    for sl in scaling.SLICES:
        best = scaling.evaluate("Mixtral-8x7B", sl, memory).best("infer")[0]
        assert parse_mesh_spec(best.spec) == parse_mesh_spec(load_preset(sl)), sl
    for sl in scaling.HOST_SLICES:
        best = scaling.evaluate("Mixtral-8x7B", sl, memory, scaling.HOST_INFER_BATCH).best("infer")[0]
        assert parse_mesh_spec(best.spec) == parse_mesh_spec(load_preset(sl)), sl


def test_scaling_md_is_generated():
    r = subprocess.run([sys.executable, "benchmarks/scaling_plan.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (REPO / "tpu/SCALING.md").read_text(), \
        "run: python benchmarks/scaling_plan.py --out tpu/SCALING.md"
    assert "| **88.5** ✗ |" in r.stdout  # Gemma-2-9B 8x full fine-tuning with fsdp=16 on v4-32 does not fit 32 GiB
    assert r.stdout.count("\n- Inference (decode): ") == 6 and r.stdout.count("\n- Recommendation: ") == 6
