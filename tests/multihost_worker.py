"""One process of the 2-process test in tests/test_multihost.py (4 CPU devices each, gloo collectives).

python -m tests.multihost_worker PORT PROCESS_ID NUM_PROCESSES MODEL_DIR MESH OUT_DIR [ORBAX_DIR]

Loads MODEL_DIR onto the global mesh reading only this process's slices, computes logits and a greedy
generation, exports the model (process 0 writes), and writes OUT_DIR/result-PROCESS_ID.json. With ORBAX_DIR
(the same model as a jaxmoe orbax checkpoint, OUT_DIR/reference.npz its parameters) it also restores that
onto MESH and onto fsdp=8, measuring the bytes this process reads (/proc/self/io rchar and tensorstore's
file counter), checking every local shard against the reference, and computing logits and tokens again.
"""
from __future__ import annotations

import json
import os
import sys


def _rchar() -> int:
    """Bytes this process has passed through read()/pread() so far (all threads)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _ts_bytes() -> int:
    """Bytes tensorstore's file kvstore has read in this process so far."""
    import tensorstore as ts

    return sum(v.get("value", 0) for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
               for v in m["values"])


def _restore_orbax(orbax_dir: str, spec: str, reference: dict) -> tuple:
    """(model, result): restore onto `spec`; bytes read (rchar, tensorstore), the bytes of the distinct
    regions this process's devices hold (its share), the shards checked against the reference."""
    import numpy as np
    from flax import nnx

    from converters.load import load_orbax_model
    from jaxmoe.train.checkpoint import flat_params

    r0, t0 = _rchar(), _ts_bytes()
    model = load_orbax_model(orbax_dir, mesh=spec)
    rchar, ts_read = _rchar() - r0, _ts_bytes() - t0
    checked, share = 0, 0
    for key, arr in flat_params(nnx.state(model)).items():
        regions = {}
        for shard in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), reference[key][shard.index], err_msg=key)
            regions[tuple(sl.indices(n)[:2] for sl, n in zip(shard.index, arr.shape))] = shard.data.nbytes
            checked += 1
        share += sum(regions.values())
    return model, dict(rchar=rchar, ts_bytes=ts_read, share=share, shards_checked=checked)


def main(argv: list[str]) -> None:
    port, pid, nproc, model_dir, spec, out, *rest = argv
    pid, nproc = int(pid), int(nproc)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    from jaxmoe.parallel.mesh import initialize_distributed, main_print, make_mesh

    initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    import numpy as np
    from flax import nnx

    from converters.hf.reader import HFParams, read_config
    from converters.hf.safetensors_io import CheckpointReader
    from converters.hf.sharded import save_hf_sharded
    from converters.load import materialize
    from jaxmoe.generate import generate
    from jaxmoe.nn.model import param_slots
    from jaxmoe.parallel.placement import replicate_sharding, shard_batch

    mesh = make_mesh(spec)
    reader = CheckpointReader(model_dir)
    config = read_config(model_dir)
    model = materialize(config, HFParams(config, reader, model_dir), config.dtype, mesh)
    total = sum(int(np.prod(reader.shape(k))) * reader.dtype(k).itemsize for k in reader.keys())
    expert_total = sum(int(np.prod(reader.shape(k))) * reader.dtype(k).itemsize for k in reader.keys()
                       if ".experts." in k)
    bytes_read = reader.bytes_read
    slot = param_slots(model)["layers.0.mlp.gate_proj"]  # [E, H, I], or [L, E, H, I] in a layer stack
    arrays = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    gate = arrays[slot.path]
    local_experts = sorted({s.index[len(slot.index)].start for s in gate.addressable_shards})

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), out_shardings=replicate_sharding(mesh))
    with jax.set_mesh(mesh):  # the context mesh of the model's constraints and expert-parallel blocks
        logits = np.asarray(forward(state, shard_batch(ids, mesh)))
    tokens = generate(model, ids, 6, eos_token_id=())
    save_hf_sharded(model, os.path.join(out, "export"), progress=False)

    result = dict(process=jax.process_index(), devices=jax.device_count(), local_devices=jax.local_device_count(),
                  bytes_read=bytes_read, total_bytes=total, expert_bytes=expert_total,
                  local_expert_starts=local_experts, tokens=np.asarray(tokens).tolist())
    if rest:  # the same model as an orbax checkpoint
        reference = dict(np.load(os.path.join(out, "reference.npz")))
        omodel, result["orbax"] = _restore_orbax(rest[0], spec, reference)
        ograph, ostate = nnx.split(omodel)
        assert ograph == graphdef  # same structure and expert-parallel settings: the compiled forward is reused
        result["orbax"]["tokens"] = np.asarray(generate(omodel, ids, 6, eos_token_id=())).tolist()
        with jax.set_mesh(mesh):
            np.save(os.path.join(out, f"orbax-logits-{pid}.npy"), np.asarray(forward(ostate, shard_batch(ids, mesh))))
        result["orbax_fsdp"] = _restore_orbax(rest[0], "fsdp=8", reference)[1]
    np.save(os.path.join(out, f"logits-{pid}.npy"), logits)
    with open(os.path.join(out, f"result-{pid}.json"), "w") as f:
        json.dump(result, f)
    main_print(f"process 0 of {nproc}: done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
