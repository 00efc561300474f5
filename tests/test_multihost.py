"""Multi-host on one machine: 2 processes x 4 CPU devices (gloo) load a tiny Mixtral onto one 8-device mesh,
each reading only its own slices (from HF safetensors and from a jaxmoe orbax checkpoint), and compute the
same logits and greedy tokens as one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

import converters
from converters.hf.safetensors_io import CheckpointReader
from jaxmoe.train.checkpoint import flat_params, save_orbax_model
from jaxmoe.generate import generate
from jaxmoe.parallel.mesh import initialize_distributed
from jaxmoe.parallel.rules import MeshError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.2, num_local_experts=8,
              num_experts_per_tok=2, sliding_window=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_only_their_slices_and_match_one_process(tmp_path):
    model_dir = tmp_path / "mixtral8"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.MixtralConfig(**CONFIG)).float().save_pretrained(model_dir)
    out = tmp_path / "out"
    out.mkdir()
    # The same model as an orbax checkpoint in chunks of at most 2 KiB: 12 per 24 KB expert matrix, as the default
    # 1 MiB gives ~110 per Mixtral-8x7B expert matrix (117 MB). (Chunks under 1 KiB compressed would be stored
    # inline in the OCDBT index, which every process reads whole.)
    model = converters.load(model_dir)
    params = {k: np.asarray(v) for k, v in flat_params(nnx.state(model)).items()}
    orbax_dir = save_orbax_model(model, tmp_path / "orbax", chunk_bytes=2048)
    np.savez(out / "reference.npz", **params)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i), "2",
                               str(model_dir), "expert=8", str(out), str(orbax_dir)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]

    # One process, one device, meanwhile.
    ids = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
    graphdef, state = nnx.split(model)
    ref_logits = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids))
    ref_tokens = generate(model, ids, 6, eos_token_id=())

    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    assert "process 0 of 2: done" in logs[0] and "of 2: done" not in logs[1]  # only process 0 prints

    results = [json.loads((out / f"result-{i}.json").read_text()) for i in range(2)]
    total = sum(v.nbytes for v in params.values())
    expert = sum(v.nbytes for k, v in params.items() if k.endswith(("gate_proj", "up_proj", "down_proj")))
    reads = []
    for i, r in enumerate(results):
        assert (r["process"], r["devices"], r["local_devices"]) == (i, 8, 4)
        # expert=8 over 2 hosts: each reads the shared (non-expert) tensors and exactly half of the experts.
        assert r["bytes_read"] < r["total_bytes"]
        assert r["bytes_read"] == r["total_bytes"] - r["expert_bytes"] // 2
        assert r["local_expert_starts"] == list(range(4 * i, 4 * i + 4))
        assert np.abs(np.load(out / f"logits-{i}.npy") - ref_logits).max() <= 1e-5
        np.testing.assert_array_equal(np.asarray(r["tokens"]), ref_tokens)
        # The orbax checkpoint: every local shard equals the model's slice (checked in the worker), the same
        # logits and tokens, and each process reads about its share, not the whole checkpoint.
        o = r["orbax"]
        assert o["shards_checked"] == 4 * len(params)
        assert np.abs(np.load(out / f"orbax-logits-{i}.npy") - ref_logits).max() <= 1e-5
        np.testing.assert_array_equal(np.asarray(o["tokens"]), ref_tokens)
        assert o["share"] == total - expert // 2  # expert=8: half of the experts, all of the rest
        for o in (r["orbax"], r["orbax_fsdp"]):
            reads.append((o["rchar"], o["ts_bytes"], o["share"]))
            assert o["ts_bytes"] <= o["rchar"] < total  # tensorstore's file reads are part of rchar
            assert o["rchar"] < 1.1 * o["share"] + 32 * 1024, (o, total)  # 32 KiB: metadata, OCDBT manifest, index
        assert r["orbax_fsdp"]["share"] < 0.55 * total  # fsdp=8: half of nearly every tensor
    print("orbax bytes read per process (rchar, tensorstore, share) of", total, ":", reads)

    # The sharded export (process 0 wrote it) holds the checkpoint's tensors unchanged.
    src, dst = CheckpointReader(model_dir), CheckpointReader(out / "export")
    assert sorted(src.keys()) == sorted(dst.keys())
    for k in src.keys():
        np.testing.assert_array_equal(np.asarray(dst.get(k)), np.asarray(src.get(k)), err_msg=k)


def test_initialize_distributed_refuses_incomplete_flags():
    with pytest.raises(MeshError, match="needs both the number of processes and this process's id"):
        initialize_distributed("127.0.0.1:1234", num_processes=2)
    with pytest.raises(MeshError, match=r"process id 2 is not in 0\.\.1"):
        initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(MeshError, match="need a --coordinator host:port"):
        initialize_distributed(None, num_processes=2, process_id=1)


def test_cli_generate_on_two_processes_prints_once_and_matches_one_process(tmp_path):
    """`jaxmoe --coordinator ... generate --mesh expert=8`: every process runs it, process 0 prints."""
    from tests.tiny_tokenizer import make_tokenizer

    model_dir = tmp_path / "mixtral8"
    torch.manual_seed(1)
    tf.AutoModelForCausalLM.from_config(tf.MixtralConfig(**CONFIG)).float().save_pretrained(model_dir)
    make_tokenizer(model_dir)
    gen = ["generate", str(model_dir), "--prompt", "write a python function", "--max-new-tokens", "6"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = subprocess.run([sys.executable, "-m", "jaxmoe.cli", *gen], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = [subprocess.Popen([sys.executable, "-m", "jaxmoe.cli", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), *gen, "--mesh", "expert=8"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    # Process 0 prints the generated text last (gloo's native connection messages may come before it, while the
    # model loads); every other process's stdout is silenced at the file-descriptor level.
    assert outs[0][0].rstrip().endswith(single.stdout.strip()) and len(single.stdout.strip()) > 5
    assert outs[1][0] == ""
