"""`jaxmoe train`: router learning on a task with known experts, exact resume after SIGKILL, mesh vs one
device, export of the trained router, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from converters.load import load_orbax_model
from jaxmoe.train.checkpoint import flat_params, save_orbax_model
from jaxmoe.cli import main
from jaxmoe.nn.config import ModelConfig
from jaxmoe.nn.model import Transformer, param_slots
from jaxmoe.train.loop import TrainConfigError, Trainer, parse_config
from tests.tiny_tokenizer import VOCAB, WORDS, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
A, B = np.arange(4, 66), np.arange(66, 128)  # the two token vocabularies (ids of the tiny tokenizer)
H = 64


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the runs below (in-process and subprocess) compile the same
    steps, so each compiles once."""
    d = str(tmp_path_factory.mktemp("xla_cache"))
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield d
    for k, v in old.items():
        jax.config.update(k, v)


def _numpy_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.2) -> Transformer:
    """A Transformer with N(0, scale) weights drawn by numpy (no per-shape jax.random compiles); norms 1."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg)))
    flat = {}
    for path, v in nnx.to_flat_state(state):
        shape = v.get_value().shape
        x = np.ones(shape) if path[-1] == "weight" else rng.normal(0, scale, shape)
        flat[path] = jnp.asarray(x, jnp.float32)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- a task where the right expert is known --------------------------------------------------------
def _two_vocab_task(seed: int = 0):
    """Successor maps on A and on B (the task) and a wrong map on each (what the other expert knows)."""
    rng = np.random.default_rng(seed)
    succ, wrong = {}, {}
    for v in (A, B):
        succ.update(zip(v.tolist(), rng.permutation(v).tolist()))
        wrong.update(zip(v.tolist(), rng.permutation(v).tolist()))
    return succ, wrong


def _expert_model(succ: dict, wrong: dict) -> Transformer:
    """A one-layer, two-expert Mixtral whose expert 0 predicts succ() on vocabulary A (and wrong() on B)
    and expert 1 predicts succ() on B (and wrong() on A), by construction: each expert's MLP unit j
    fires on token j and writes the direction of its successor, which the head reads out. Attention is
    off (o_proj = 0); embedding dimension 0 tells A (+3) from B (-3), so a linear router can separate them."""
    cfg = ModelConfig(model_type="mixtral", vocab_size=128, hidden_size=H, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, num_experts=2, num_experts_per_tok=2,
                      max_position_embeddings=128, rms_norm_eps=1e-5, eos_token_id=(2,), bos_token_id=1)
    model = _numpy_model(cfg)
    rng = np.random.default_rng(1)
    emb = rng.normal(0, 1, (128, H))
    emb[:, 0] = 0
    emb[A, 0], emb[B, 0] = 3.0, -3.0
    u = emb.copy()
    u[:, 0] = 0
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    g = np.zeros((2, H, 128))
    d = np.zeros((2, 128, H))
    for e, own in enumerate((A, B)):
        for t in range(4, 128):
            g[e, :, t] = u[t]
            d[e, t, :] = u[(succ if t in own else wrong)[t]]
    layer = model.layer(0)
    set_ = lambda var, x: var.set_value(jnp.asarray(x, jnp.float32))  # noqa: E731
    set_(model.embed, emb)
    set_(model.lm_head, 2.0 * u.T)
    set_(layer.attn.o_proj, np.zeros(layer.attn.o_proj.get_value().shape))
    set_(layer.mlp.gate_proj, g)
    set_(layer.mlp.up_proj, g)
    set_(layer.mlp.down_proj, d)
    set_(layer.mlp.router, np.asarray(jax.random.normal(jax.random.key(3), (H, 2))) * 0.01)  # undecided
    model.set_layer(0, layer)
    return model


def _docs(succ: dict, n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for i in range(n):
        t = int(rng.choice(A if i % 2 == 0 else B))
        ids = [t]
        for _ in range(int(rng.integers(10, 40))):
            t = succ[t]
            ids.append(t)
        out.append(" ".join(VOCAB[i] for i in ids))
    return out


def _top1_share(model: Transformer, vocab: np.ndarray, expert: int) -> float:
    z = model.forward(jnp.asarray(vocab[None, :], jnp.int32)).router_logits[0][0]
    return float(np.mean(np.asarray(jnp.argmax(z, -1)) == expert))


@pytest.fixture(scope="module")
def router_run(tmp_path_factory):
    """Router-only training of `_expert_model` on mixed A/B text, through `jaxmoe train`."""
    d = tmp_path_factory.mktemp("router_run")
    succ, wrong = _two_vocab_task()
    make_tokenizer(d / "tok")
    start = _expert_model(succ, wrong)
    save_orbax_model(start, d / "start", tokenizer=str(d / "tok"))
    rng = np.random.default_rng(2)
    for name, n in (("train.jsonl", 300), ("heldout.jsonl", 40)):
        (d / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(succ, n, rng)))
    cfg = _write_config(d / "router.yml", model=str(d / "start"), output_dir=str(d / "run"), steps=120,
                        trainable="router", seed=0, log_every=1000,
                        data={"train": str(d / "train.jsonl"), "eval": str(d / "heldout.jsonl"), "seq_len": 32,
                              "batch_size": 8, "shuffle_buffer": 64},
                        optimizer={"lr": 0.03, "warmup_steps": 10}, checkpoint={"every": 50, "keep": 2},
                        eval={"every": 60, "sequences": 32})
    assert main(["train", str(cfg)]) == 0
    return d, start


def test_router_learns_the_known_experts(router_run):
    d, start = router_run
    assert _top1_share(start, A, 0) < 0.9 or _top1_share(start, B, 1) < 0.9  # not solved before training
    trained = load_orbax_model(d / "run")
    share_a, share_b = _top1_share(trained, A, 0), _top1_share(trained, B, 1)
    assert share_a > 0.9 and share_b > 0.9, (share_a, share_b)
    evals = _rows(d / "run" / "eval.jsonl")
    assert [r["step"] for r in evals] == [0, 60, 120]
    assert evals[-1]["loss"] < 0.6 * evals[0]["loss"], evals
    train = _rows(d / "run" / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 121))
    assert np.mean([r["ce"] for r in train[-20:]]) < 0.6 * np.mean([r["ce"] for r in train[:5]])
    # only the router changed; every other parameter is bit-identical
    before, after = flat_params(nnx.state(start)), flat_params(nnx.state(trained))
    assert before.keys() == after.keys()
    for k in before:
        same = np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
        assert same != k.endswith("mlp.router"), k
    # the end-of-run outputs
    assert (d / "run" / "loss_curve.png").stat().st_size > 1000
    report = json.loads((d / "run" / "routing_report.json").read_text())
    assert report["before"]["step"] == 0 and report["after"]["step"] == 120
    assert "layer  expert  before  after" in (d / "run" / "routing_report.txt").read_text()


def test_trained_router_exports_to_transformers(router_run, tmp_path):
    import torch
    import transformers as tf
    d, _ = router_run
    trained = load_orbax_model(d / "run")
    out = tmp_path / "hf"
    assert main(["convert", str(d / "run"), str(out), "--to", "hf", "--no-progress"]) == 0  # the newest step
    assert tf.AutoTokenizer.from_pretrained(out)("the a")["input_ids"] == [VOCAB.index("the"), VOCAB.index("a")]
    hf = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    layer = hf.model.layers[0]
    moe = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe  # Mixtral's block: `mlp` from transformers 5 on
    gate = moe.gate.weight.detach().numpy()
    np.testing.assert_array_equal(gate, np.asarray(trained.layer(0).mlp.router.get_value()).T)
    with torch.no_grad():
        ids = torch.as_tensor(np.concatenate([A, B])[None], dtype=torch.long)
        router_logits = hf(ids, output_router_logits=True).router_logits[0]
    top1 = router_logits.argmax(-1).numpy()
    assert np.mean(top1[: len(A)] == 0) > 0.9 and np.mean(top1[len(A):] == 1) > 0.9


def test_bf16_params_with_float32_master_weights(router_run, tmp_path):
    from jaxmoe.cli.train import load_model

    d, _ = router_run
    cfg = parse_config({"model": str(d / "start"), "output_dir": str(tmp_path / "bf16"), "steps": 4, "trainable": "all",
                        "precision": {"param_dtype": "bfloat16", "master_dtype": "float32"},
                        "data": {"train": str(d / "train.jsonl"), "seq_len": 32, "batch_size": 4},
                        "optimizer": {"lr": 1e-3}, "eval": {"sequences": 0}})
    model, tok, _ = load_model(cfg.model, cfg.param_dtype)
    trainer = Trainer(cfg, model, tok, print_fn=lambda s: None)
    trainer.run()
    s = trainer.state
    assert {str(v.dtype) for v in s.trainable.values()} == {"float32"} and not s.frozen  # fp32 master copy
    adam = s.opt_state[1][0]  # chain(clip, adamw): adamw's first state is ScaleByAdamState
    assert {str(v.dtype) for v in jax.tree.leaves((adam.mu, adam.nu))} == {"float32"}
    assert str(trainer.model().embed.get_value().dtype) == "bfloat16"  # the forward runs in bf16
    rows = _rows(tmp_path / "bf16" / "metrics.jsonl")
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    saved = load_orbax_model(tmp_path / "bf16")
    assert saved.config.dtype == "bfloat16" and str(saved.embed.get_value().dtype) == "bfloat16"
    np.testing.assert_array_equal(np.asarray(saved.embed.get_value()),
                                  np.asarray(s.trainable["embed"].astype(jnp.bfloat16)))


def test_packed_stream_is_deterministic_and_resumable(tmp_path):
    from jaxmoe.train.data import DataState, PackedStream, eval_sequences

    tok = make_tokenizer()
    docs = [" ".join(WORDS[i % 50: i % 50 + 1 + i % 7]) for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:25]))
    (tmp_path / "b.txt").write_text("".join(t + "\n\n" for t in docs[25:]))
    files = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    in_order, _ = eval_sequences(files, tok, 8)
    per_epoch = len(in_order)

    def take(stream, n):
        return [stream.next_sequence()[0].tolist() for _ in range(n)]

    s1 = PackedStream(files, tok, 8, seed=1, shuffle_buffer=5)
    first = take(s1, 7)
    state = DataState.from_json(json.loads(json.dumps(s1.state.to_json())))
    rest = take(s1, 2 * per_epoch)
    resumed = PackedStream(files, tok, 8, seed=1, shuffle_buffer=5, state=state)
    assert take(resumed, 2 * per_epoch) == rest  # from a saved position: the same sequences
    epoch1 = (first + rest)[:per_epoch]
    assert sorted(epoch1) == sorted(in_order.tolist())  # every packed sequence once per epoch
    assert epoch1 != in_order.tolist()  # shuffled
    assert (first + rest)[per_epoch:2 * per_epoch] != epoch1  # a new order in the next epoch
    assert take(PackedStream(files, tok, 8, seed=2, shuffle_buffer=5), 7) != first  # the seed matters


# --- resume ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_moe(tmp_path_factory):
    """A one-layer, 4-expert Mixtral (random weights) saved as an orbax checkpoint with the offline
    tokenizer, and a small random-word corpus."""
    d = tmp_path_factory.mktemp("small_moe")
    make_tokenizer(d / "tok")
    cfg = ModelConfig(model_type="mixtral", vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=256, eos_token_id=(2,))
    save_orbax_model(_numpy_model(cfg, seed=4), d / "model", tokenizer=str(d / "tok"))
    rng = np.random.default_rng(0)
    words = WORDS[:100]
    docs = [" ".join(rng.choice(words, int(rng.integers(3, 30)))) for _ in range(120)]
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return d


def _resume_config(d: Path, out: Path, name: str) -> Path:
    return _write_config(out.parent / f"{name}.yml", model=str(d / "model"), output_dir=str(out), steps=150,
                         trainable="router+experts", seed=3, log_every=1000,
                         data={"train": str(d / "train.jsonl"), "seq_len": 16, "batch_size": 4, "grad_accum": 2,
                               "shuffle_buffer": 6},
                         optimizer={"lr": 0.01, "warmup_steps": 5, "weight_decay": 0.01},
                         checkpoint={"every": 15, "keep": 2}, eval={"sequences": 0})


def test_sigkill_then_resume_continues_exactly(small_moe, tmp_path, capsys, compile_cache):
    d = small_moe
    cfg_a, cfg_b = _resume_config(d, tmp_path / "a", "a"), _resume_config(d, tmp_path / "b", "b")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(ROOT))
    ckpts = tmp_path / "b" / "checkpoints"

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    with open(tmp_path / "b.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from jaxmoe.cli import main; sys.exit(main())",
                                 "train", str(cfg_b)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            kill_after_first_checkpoint()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "b.log").read_text()[-2000:]
    assert main(["train", str(cfg_a)]) == 0  # the uninterrupted run (its compiles come from the cache)
    capsys.readouterr()
    assert main(["train", str(cfg_b), "--resume"]) == 0
    resumed_at = int(capsys.readouterr().out.split("resumed from step ")[1].split()[0])
    assert 15 <= resumed_at < 150 and resumed_at % 15 == 0
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 151))  # steps logged after the checkpoint were dropped
    assert [r["batch_crc"] for r in b] == [r["batch_crc"] for r in a]  # same batches, same order
    for ra, rb in zip(a[resumed_at:], b[resumed_at:]):
        assert rb["loss"] == ra["loss"] and rb["grad_norm"] == ra["grad_norm"], (ra["step"], ra["loss"], rb["loss"])
    assert a[-1]["loss"] != a[resumed_at]["loss"]  # the comparison covers a moving curve
    fa, fb = load_orbax_model(tmp_path / "a"), load_orbax_model(tmp_path / "b")
    for k, v in flat_params(nnx.state(fa)).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_params(nnx.state(fb))[k]), err_msg=k)


# --- mesh -----------------------------------------------------------------------------------------
def test_mesh_training_matches_one_device(small_moe, tmp_path):
    from jaxmoe.cli.train import load_tokenizer
    from jaxmoe.parallel.mesh import make_mesh

    d = small_moe
    tok = load_tokenizer(d / "tok")
    losses = {}
    for name, mesh in (("one", None), ("mesh", make_mesh("expert=4,data=2"))):
        cfg = parse_config({"model": str(d / "model"), "output_dir": str(tmp_path / name), "steps": 3,
                            "trainable": "router+experts", "data": {"train": str(d / "train.jsonl"), "seq_len": 16,
                                                                     "batch_size": 8},
                            "optimizer": {"lr": 0.01}, "eval": {"sequences": 0}, "log_every": 1000})
        model = load_orbax_model(d / "model")
        slot = param_slots(model)["layers.0.mlp.gate_proj"]  # [L, E, H, I] in the layer stack
        trainer = Trainer(cfg, model, tok, mesh=mesh, print_fn=lambda s: None)
        trainer.run()
        losses[name] = [r["loss"] for r in _rows(tmp_path / name / "metrics.jsonl")]
        if mesh is not None:
            experts = trainer.state.trainable[slot.path]
            assert experts.sharding.shard_shape(experts.shape)[1] == 1  # 4 experts over expert=4: really split
    assert len(losses["one"]) == 3
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=0, atol=1e-5)


def test_remat_training_gives_the_same_losses(small_moe, tmp_path):
    """remat: full recomputes every layer's activations in the backward pass; the losses of 3 steps are those of
    the run that keeps them."""
    from jaxmoe.cli.train import load_tokenizer

    d = small_moe
    tok = load_tokenizer(d / "tok")
    losses = {}
    for remat in ("none", "full"):
        cfg = parse_config({"model": str(d / "model"), "output_dir": str(tmp_path / remat), "steps": 3, "remat": remat,
                            "trainable": "router+experts", "data": {"train": str(d / "train.jsonl"), "seq_len": 16,
                                                                     "batch_size": 8},
                            "optimizer": {"lr": 0.01}, "eval": {"sequences": 0}, "log_every": 1000})
        Trainer(cfg, load_orbax_model(d / "model"), tok, print_fn=lambda s: None).run()
        losses[remat] = [r["loss"] for r in _rows(tmp_path / remat / "metrics.jsonl")]
    assert len(losses["none"]) == 3 and losses["none"][0] > losses["none"][-1]
    np.testing.assert_allclose(losses["full"], losses["none"], rtol=0, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------------
def _train_error(capsys, cfg: Path, *extra: str) -> str:
    capsys.readouterr()
    assert main(["train", str(cfg), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_errors(tiny_hf, small_moe, router_run, tmp_path, capsys):
    d = small_moe
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    base = {"model": str(d / "model"), "output_dir": str(tmp_path / "out"), "steps": 2,
            "data": {"train": str(d / "train.jsonl"), "seq_len": 16, "batch_size": 2}, "eval": {"sequences": 0}}
    no_text = {**base, "data": {**base["data"], "train": str(empty)}}
    err = _train_error(capsys, _write_config(tmp_path / "e1.yml", **no_text))
    assert "data.train" in err and "empty.jsonl" in err and "no text" in err
    err = _train_error(capsys, _write_config(tmp_path / "e2.yml", **{**base, "data": {**base["data"], "seq_len": 300}}))
    assert "data.seq_len: 300 is longer than the model's max_position_embeddings 256" in err
    dense = tmp_path / "llama"
    shutil.copytree(tiny_hf("llama")[0], dense)
    make_tokenizer(dense)
    err = _train_error(capsys, _write_config(tmp_path / "e3.yml", **{**base, "model": str(dense)}))
    assert "trainable: 'router' selects no parameters of a dense llama model" in err
    # resuming a run whose checkpoint is of another model shape (router_run's model has hidden size 64)
    rd, _ = router_run
    other = _write_config(tmp_path / "e4.yml", **{**base, "output_dir": str(rd / "run")})
    err = _train_error(capsys, other, "--resume")
    assert "another model shape" in err and "hidden_size 64 in the checkpoint, this run has 32" in err
    err = _train_error(capsys, other)
    assert "already holds checkpoints" in err and "--resume" in err
    err = _train_error(capsys, _write_config(tmp_path / "e5.yml", **base), "--resume")
    assert "--resume: no checkpoint in" in err
    err = _train_error(capsys, _write_config(tmp_path / "e6.yml", **{**base, "optimizer": {"lr": "fast"}}))
    assert "optimizer.lr: expected a number, got 'fast'" in err


@pytest.mark.parametrize("change,message", [
    ({"optimizer": {"lr": -1}}, "optimizer.lr: must be positive"),
    ({"optimizer": {"learning_rate": 1}}, "optimizer.learning_rate: unknown field"),
    ({"trainable": "attention"}, "trainable: 'attention' is not one of router, experts, router+experts, mlp, all"),
    ({"data": {"train": "x.jsonl", "batch_size": 6, "grad_accum": 4}}, "data.grad_accum: 4 does not divide"),
    ({"data": {"train": []}}, "data.train: expected a file path or a list of file paths"),
    ({"data": {"train": "x.jsonl", "seq_len": "long"}}, "data.seq_len: expected an integer"),
    ({"steps": 10, "optimizer": {"warmup_steps": 20}}, "optimizer.warmup_steps: 20 > steps 10"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep: must be positive"),
    ({"model": None}, "model: is required"),
    ({"precision": {"master_dtype": "float64"}}, "precision.master_dtype: 'float64' is not one of"),
    ({"remat": "some"}, "remat: 'some' is not one of none, full, dots"),
])
def test_config_validation_names_the_field(change, message):
    d = {"model": "m", "output_dir": "o", "data": {"train": "x.jsonl"}, **change}
    if d["model"] is None:
        del d["model"]
    with pytest.raises(TrainConfigError, match=None) as e:
        parse_config(d, "cfg.yml")
    assert str(e.value).startswith("cfg.yml: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_trainable_mlp_selects_exactly_the_mlps():
    """`trainable: mlp` trains what a frankenMoE takes from each source: every MLP weight (dense MLPs and routed
    experts), never the router, attention, norms or embeddings."""
    from jaxmoe.train.step import trainable_filter

    for moe in (False, True):
        cfg = ModelConfig(model_type="mixtral" if moe else "llama", vocab_size=64, hidden_size=32,
                          intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          num_experts=4 if moe else 0)
        pick = trainable_filter(cfg, "mlp")
        paths = [tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param))]
        chosen = sorted(".".join(p) for p in paths if pick(tuple(int(x) if x.isdigit() else x for x in p), None))
        names = {c.split(".", 3)[-1] for c in chosen}
        assert names == {"gate_proj", "up_proj", "down_proj"}, names  # the MoE block holds the stacked experts
        assert all(c.startswith("stacks.") and ".mlp." in c and "router" not in c for c in chosen)
        rest = [p for p in paths if ".".join(p) not in chosen]
        assert any("attn" in ".".join(p) for p in rest) and any("embed" in ".".join(p) for p in rest)
        assert moe == any("router" in ".".join(p) for p in rest)
