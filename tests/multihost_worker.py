"""One process of the 2-process test in tests/test_multihost.py (4 CPU devices each, gloo collectives).

python -m tests.multihost_worker PORT PROCESS_ID NUM_PROCESSES MODEL_DIR MESH OUT_DIR

Loads MODEL_DIR onto the global mesh reading only this process's slices, computes logits and a greedy
generation, exports the model (process 0 writes), and writes OUT_DIR/result-PROCESS_ID.json.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    port, pid, nproc, model_dir, spec, out = argv
    pid, nproc = int(pid), int(nproc)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    from jaxmoe import sharding

    sharding.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    import numpy as np
    from flax import nnx

    from converters.hf import read_config
    from converters.safetensors_io import CheckpointReader
    from converters.sharded import model_from_tensors_sharded, save_hf_sharded
    from jaxmoe.generate import generate

    mesh = sharding.make_mesh(spec)
    reader = CheckpointReader(model_dir)
    model = model_from_tensors_sharded(read_config(model_dir), reader, model_dir, mesh)
    total = sum(int(np.prod(reader.shape(k))) * reader.dtype(k).itemsize for k in reader.keys())
    expert_total = sum(int(np.prod(reader.shape(k))) * reader.dtype(k).itemsize for k in reader.keys()
                       if ".experts." in k)
    bytes_read = reader.bytes_read
    gate = model.layers[0].mlp.gate_proj[...]
    local_experts = sorted({s.index[0].start for s in gate.addressable_shards})

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), out_shardings=sharding.replicate_sharding(mesh))
    logits = np.asarray(forward(state, sharding.shard_batch(ids, mesh)))
    tokens = generate(model, ids, 6, eos_token_id=())
    save_hf_sharded(model, os.path.join(out, "export"), progress=False)

    result = dict(process=jax.process_index(), devices=jax.device_count(), local_devices=jax.local_device_count(),
                  bytes_read=bytes_read, total_bytes=total, expert_bytes=expert_total,
                  local_expert_starts=local_experts, tokens=np.asarray(tokens).tolist())
    np.save(os.path.join(out, f"logits-{pid}.npy"), logits)
    with open(os.path.join(out, f"result-{pid}.json"), "w") as f:
        json.dump(result, f)
    sharding.main_print(f"process 0 of {nproc}: done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
