"""Tests for converters.hf.safetensors_io and converters.atomic: exact bytes, exact errors, no leftovers."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import converters.hf.planned_writer as pw
from converters.atomic import atomic_output_dir
from converters.errors import CheckpointError
from converters.hf.planned_writer import PlannedWriter
from converters.hf.safetensors_io import CheckpointReader, SafetensorsFile, TensorBytes
from converters.hf.safetensors_writer import ShardedWriter, write_safetensors

REPO = Path(__file__).resolve().parents[1]


def _all_dtypes() -> dict[str, np.ndarray]:
    """One tensor per supported dtype, with edge values (nan, inf, -0.0, extremes, 0-d, empty)."""
    rng = np.random.default_rng(0)
    f = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 3e-5], dtype=np.float64)
    t = {
        "f64": f.reshape(2, 4),
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": f.astype(np.float16).reshape(4, 2),
        "bf16": np.concatenate([f, rng.standard_normal(8)]).astype(ml_dtypes.bfloat16).reshape(2, 2, 4),
        "f8e4m3": np.array([0.5, -1.0, 448.0, 0.0], dtype=ml_dtypes.float8_e4m3fn),
        "f8e5m2": np.array([0.5, -1.0, 57344.0, np.inf], dtype=ml_dtypes.float8_e5m2),
        "i64": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], dtype=np.int64),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        "i16": np.array([-32768, 32767, 7], dtype=np.int16),
        "i8": np.array([[-128, 127], [0, 1]], dtype=np.int8),
        "u8": np.array([0, 255, 17], dtype=np.uint8),
        "u16": np.array([0, 65535], dtype=np.uint16),
        "u32": np.array([0, 2**32 - 1], dtype=np.uint32),
        "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "bool": np.array([[True, False, True]]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    return t


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-identical: same dtype, same shape, same bytes."""
    assert np.asarray(b).dtype == a.dtype, (a.dtype, b.dtype)
    assert np.asarray(b).shape == a.shape
    assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes()


def _torch_bytes(t) -> bytes:  # noqa: ANN001 - torch tensor
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("how", ["helper", "writer"])
def test_roundtrip_every_dtype_bit_identical(tmp_path: Path, how: str) -> None:
    import torch
    from safetensors import safe_open

    tensors = _all_dtypes()
    if how == "helper":
        path = tmp_path / "x.safetensors"
        write_safetensors(path, tensors, metadata={"format": "pt"})
    else:
        with ShardedWriter(tmp_path) as w:
            for k, v in tensors.items():
                w.add(k, v)
        assert w.close() == ["model.safetensors"]
        path = tmp_path / "model.safetensors"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left

    f = SafetensorsFile(path)
    assert f.keys() == list(tensors)
    assert f.metadata == {"format": "pt"}
    for k, v in tensors.items():
        assert f.shape(k) == v.shape and f.dtype(k) == v.dtype
        _same(v, f.get(k))

    numpy_native = [k for k in tensors if k not in ("bf16", "f8e4m3", "f8e5m2")]  # numpy has no such dtypes
    with safe_open(str(path), framework="np") as sf:
        for k in numpy_native:
            _same(tensors[k], sf.get_tensor(k))

    torch_dt = {"bf16": torch.bfloat16, "f8e4m3": torch.float8_e4m3fn, "f8e5m2": torch.float8_e5m2,
                "bool": torch.bool, "f32": torch.float32, "i64": torch.int64, "u64": torch.uint64}
    with safe_open(str(path), framework="pt") as sf:
        assert sf.metadata() == {"format": "pt"}
        assert list(sf.keys()) == sorted(tensors)
        for k, v in tensors.items():
            t = sf.get_tensor(k)
            assert tuple(t.shape) == v.shape
            if k in torch_dt:
                assert t.dtype == torch_dt[k]
            assert _torch_bytes(t) == v.tobytes()


def test_header_is_8_byte_aligned_and_inputs_normalised(tmp_path: Path) -> None:
    import jax.numpy as jnp

    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "a.safetensors", {
        "transposed": base.T,  # non-contiguous input
        "bigendian": base.astype(">f4"),
        "jax": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        "abc": np.ones(1, dtype=np.int8),  # odd sizes force padding
    })
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8 : 8 + n].decode().endswith((" ", "}"))
    assert "__metadata__" not in json.loads(raw[8 : 8 + n])
    f = SafetensorsFile(tmp_path / "a.safetensors")
    _same(np.ascontiguousarray(base.T), f.get("transposed"))
    _same(base, f.get("bigendian"))
    _same(np.arange(6).astype(ml_dtypes.bfloat16).reshape(2, 3), f.get("jax"))


def test_get_is_readonly_zero_copy_view(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"w": np.arange(8, dtype=np.float32)})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    a, b = f.get("w"), f.get("w")
    assert type(a) is np.ndarray and not a.flags.writeable and not a.flags.owndata
    assert np.shares_memory(a, b)  # both views of the same mapping, no copy
    with pytest.raises(ValueError):
        a[0] = 1.0


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_sharded_writer_readable_by_transformers_safetensors_and_us(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = tmp_path / "out"
    with ShardedWriter(out, max_shard_bytes=3000) as w:
        for k, v in sd.items():
            w.add(k, v)
    names = w.close()
    n = len(names)
    assert n > 2
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    model.config.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "config.json", "model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(v.nbytes for v in sd.values())}
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(names)

    order = list(sd)
    for i, name in enumerate(names):  # under the limit unless one oversized tensor; greedy: next one didn't fit
        with safe_open(str(out / name), framework="pt") as sf:
            keys = list(sf.keys())
            size = sum(sd[k].nbytes for k in keys)
            assert size <= 3000 or len(keys) == 1
            last = max(order.index(k) for k in keys)
            if i + 1 < n:
                assert index["weight_map"][order[last + 1]] == names[i + 1]
                assert size + sd[order[last + 1]].nbytes > 3000
            for k in keys:
                assert index["weight_map"][k] == name
                assert torch.equal(sf.get_tensor(k), torch.from_numpy(sd[k]))

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    got = reloaded.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], torch.from_numpy(v)), k

    r = CheckpointReader(out)
    assert sorted(r.keys()) == sorted(sd)
    for k, v in sd.items():
        assert r.has(k) and r.shape(k) == v.shape and r.dtype(k) == v.dtype
        _same(v, r.get(k))
    assert r.bytes_read == sum(v.nbytes for v in sd.values())


def test_shard_boundaries_exact(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path, max_shard_bytes=250)
    for i in range(5):
        w.add(f"t{i}", np.full(25, i, dtype=np.float32))  # 100 bytes each
        assert (tmp_path / f".shard-{i // 2 + 1:05d}.data.tmp").stat().st_size == (i % 2 + 1) * 100  # on disk now
    w.add("big", np.zeros(100, dtype=np.float32))  # 400 bytes > limit: a shard of its own
    w.add("last", np.zeros(1, dtype=np.uint8))
    assert w.close() == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    wm = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert wm == {"t0": "model-00001-of-00005.safetensors", "t1": "model-00001-of-00005.safetensors",
                  "t2": "model-00002-of-00005.safetensors", "t3": "model-00002-of-00005.safetensors",
                  "t4": "model-00003-of-00005.safetensors", "big": "model-00004-of-00005.safetensors",
                  "last": "model-00005-of-00005.safetensors"}
    assert not list(tmp_path.glob(".shard-*"))
    r = CheckpointReader(tmp_path)
    for i in range(5):
        _same(np.full(25, i, dtype=np.float32), r.get(f"t{i}"))


def test_writer_rejects_duplicates_and_bad_dtypes(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path)
    w.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        w.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="cannot be stored in safetensors"):
        w.add("c", np.zeros(2, np.complex64))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def _two_tensor_file(path: Path) -> int:
    write_safetensors(path, {"model.embed.weight": np.zeros((4, 4), np.float32),
                             "model.norm.weight": np.ones(4, np.float32)})
    return path.stat().st_size


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    size = _two_tensor_file(p)
    with open(p, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(p)
    msg = str(e.value)
    assert msg == f"{p}: truncated: tensor 'model.norm.weight' ends at byte {size} but the file has {size - 3} bytes"
    assert "\n" not in msg

    with open(p, "r+b") as f:
        f.truncate(20)  # inside the JSON header
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: the header ends at byte \d+ but the "
                                              r"file has 20 bytes"):
        SafetensorsFile(p)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        CheckpointReader(tmp_path)


def test_corrupt_headers_rejected(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"{not json" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="x.safetensors: header is not valid JSON"):
        SafetensorsFile(p)
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'w' has data_offsets \[0, 12\] \(12 bytes\) but F32 "
                                              r"\[2, 2\] needs 16"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsFile(p)


def test_pickle_only_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-read")
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "unpickling can execute code" in msg
    assert "save_pretrained(safe_serialization=True)" in msg and "\n" not in msg


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights found"):
        CheckpointReader(tmp_path)
    w = ShardedWriter(tmp_path, max_shard_bytes=16)
    for i in range(3):
        w.add(f"t{i}", np.zeros(4, np.float32))
    w.close()
    r = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=f"tensor 'nope' not found in {tmp_path}"):
        r.get("nope")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00003.safetensors' which is missing"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match="malformed index JSON"):
        CheckpointReader(tmp_path)


def test_single_file_and_unindexed_directories(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"a": np.arange(3, dtype=np.int32)})
    r = CheckpointReader(tmp_path)
    assert r.keys() == ["a"] and r.shard_of("a") == "model.safetensors"
    other = tmp_path / "other"
    other.mkdir()
    write_safetensors(other / "part1.safetensors", {"a": np.arange(3, dtype=np.int32)})
    write_safetensors(other / "part2.safetensors", {"b": np.ones(2, dtype=np.uint8)})
    r = CheckpointReader(other)
    assert sorted(r.keys()) == ["a", "b"] and r.shard_of("b") == "part2.safetensors"


def test_get_slice_reads_only_the_slice(tmp_path: Path) -> None:
    full = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    write_safetensors(tmp_path / "model.safetensors", {"w": full, "b": np.arange(5, dtype=np.int64)})
    r = CheckpointReader(tmp_path)
    rows = r.get_slice("w", (slice(2, 4), slice(None)))
    _same(full[2:4], rows)
    assert r.bytes_read == 2 * 16 * 4
    cols = r.get_slice("w", (slice(None), slice(8, 16)))
    _same(full[:, 8:], cols)
    assert r.bytes_read == 128 + 8 * 8 * 4
    _same(full[3], r.get_slice("w", 3))  # a bare int or slice works too
    _same(full[5:], r.get_slice("w", slice(5, None)))
    assert r.bytes_read == 384 + 64 + 3 * 64
    whole = r.get("w")
    assert r.bytes_read == 640 + full.nbytes
    _same(whole[2:4], rows)
    assert np.shares_memory(rows, whole) and not rows.flags.writeable  # a view of the mapping, not a copy


def test_atomic_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output_dir(out) as d:
                assert d.parent == tmp_path and d.name.startswith("OUT.tmp-")
                with ShardedWriter(d) as w:
                    w.add("a", np.zeros(3, np.float32))
                    raise exc
        assert list(tmp_path.iterdir()) == []


def test_atomic_success_refusal_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    with atomic_output_dir(out) as d:
        write_safetensors(d / "model.safetensors", {"v": np.array([1], np.int8)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    assert SafetensorsFile(out / "model.safetensors").get("v").tolist() == [1]

    with pytest.raises(CheckpointError) as e:
        with atomic_output_dir(out):
            pytest.fail("must refuse before yielding")
    assert str(e.value) == f"{out} exists; pass --overwrite to replace it"

    (out / "stale.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as d:
        write_safetensors(d / "model.safetensors", {"v": np.array([2], np.int8)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert SafetensorsFile(out / "model.safetensors").get("v").tolist() == [2]

    with pytest.raises(ValueError):  # failed overwrite keeps the old model untouched
        with atomic_output_dir(out, overwrite=True) as d:
            (d / "x").write_text("partial")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    assert SafetensorsFile(out / "model.safetensors").get("v").tolist() == [2]


def test_atomic_sigkill_leaves_only_tmp_sibling(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from converters.atomic import atomic_output_dir
        from converters.hf.safetensors_writer import ShardedWriter
        with atomic_output_dir({str(tmp_path / 'OUT')!r}) as d:
            w = ShardedWriter(d)
            w.add("a", np.zeros(4, np.float32))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith("OUT.tmp-")


# ---- PlannedWriter: header first, every tensor straight to its place ----------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [64, 5_000_000_000])
def test_planned_writer_writes_what_sharded_writer_writes(tmp_path: Path, max_shard_bytes: int) -> None:
    tensors = _all_dtypes()
    with ShardedWriter(tmp_path / "a", max_shard_bytes=max_shard_bytes) as w:
        for k, v in tensors.items():
            w.add(k, v)
    plan = [(k, np.asarray(v).dtype, np.shape(v)) for k, v in tensors.items()]
    with PlannedWriter(tmp_path / "b", plan, max_shard_bytes=max_shard_bytes) as p:
        names, errors = list(tensors), []

        def write(keys: list[str]) -> None:
            try:
                for k in keys:
                    p.write(k, tensors[k])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=write, args=(names[i::3],)) for i in range(3)]  # any order, 3 threads
        for t in reversed(threads):
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "b").iterdir())
    assert len(files) == (1 if max_shard_bytes > 1000 else len(p.names) + 1) and len(p.names) == len(w.close())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("in_kernel", [True, False])
def test_planned_writer_copies_and_casts_file_bytes(tmp_path: Path, monkeypatch, in_kernel: bool) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = np.arange(4, dtype=np.float32)
    c = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "src.safetensors", {"a": a, "b": b, "c": c})
    src = SafetensorsFile(tmp_path / "src.safetensors")
    monkeypatch.setattr(pw, "_BUFFER_BYTES", 8)  # many small chunks on the read/write paths
    if not in_kernel:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    plan = [("a", np.float32, (3, 5)), ("ab", np.float32, (19,)), ("a16", ml_dtypes.bfloat16, (3, 5)),
            ("c32", np.float32, (2, 3)), ("empty", np.float32, (0, 2))]
    with PlannedWriter(tmp_path / "out", plan) as w:
        w.copy("c32", [src.locate("c")])
        w.copy("ab", [src.locate("a"), src.locate("b")])
        w.copy("a", [src.locate("a")])
        w.copy("a16", [src.locate("a")])
        w.copy("empty", [])
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    _same(a, out.get("a"))
    _same(np.concatenate([a.reshape(-1), b]), out.get("ab"))
    _same(a.astype(ml_dtypes.bfloat16), out.get("a16"))
    _same(c.astype(np.float32), out.get("c32"))
    assert out.get("empty").shape == (0, 2)
    t = src.locate("b")
    assert (t.dtype, t.shape, t.nbytes) == (np.dtype("<f4"), (4,), 16)
    assert (tmp_path / "src.safetensors").read_bytes()[t.offset:t.offset + 16] == b.tobytes()


def test_planned_writer_refuses_wrong_and_missing_tensors(tmp_path: Path) -> None:
    plan = [("x", np.float32, (2, 2)), ("y", np.float32, (3,))]
    w = PlannedWriter(tmp_path / "o", plan)
    with pytest.raises(ValueError, match=r"tensor 'x': got float32 \[4\], planned float32 \[2, 2\]"):
        w.write("x", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="planned float32"):
        w.write("x", np.zeros((2, 2), np.float64))
    w.write("x", np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="'x' was already written"):
        w.write("x", np.ones((2, 2), np.float32))
    with pytest.raises(KeyError, match="'z' is not in the plan"):
        w.write("z", np.ones(1, np.float32))
    with pytest.raises(ValueError, match="do not make its planned shape"):
        w.copy("y", [TensorBytes(tmp_path, 0, np.dtype(np.float32), (2,))])
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="short.bin: ends before byte 8"):
        w.copy("y", [TensorBytes(short, 0, np.dtype(np.float32), (3,))])
    with pytest.raises(RuntimeError, match="never written"):
        PlannedWriter(tmp_path / "o2", plan).close()
    w.abort()
    assert list((tmp_path / "o").iterdir()) == []
    with pytest.raises(CheckpointError, match="already holds safetensors"):
        (tmp_path / "o" / "model.safetensors").write_bytes(b"")
        PlannedWriter(tmp_path / "o", plan)
