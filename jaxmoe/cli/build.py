"""`jaxmoe build RECIPE.yml OUT_DIR`: a frankenMoE from a mergekit-moe or Gemma-2-MoE recipe."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `jaxmoe build`."""
    p.description = (
        "Build a Mixture-of-Experts model from dense checkpoints. RECIPE is mergekit-moe YAML (base_model, "
        "gate_mode, experts[] with source_model and prompts, ...) or the Gemma-2-MoE toolkit's YAML. Sources are "
        "HF directories, .gguf files or Hub ids (org/name[@revision], read from the local Hugging Face cache; set "
        "JAXMOE_HUB_DOWNLOAD=1 to download missing ones). Output: an HF directory that transformers loads "
        "(Mixtral, Qwen2-MoE, "
        "Qwen3-MoE from Qwen3 sources; "
        "Gemma2-MoE with trust_remote_code=True). The output is written atomically: an interrupted build leaves "
        "no OUT_DIR.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("out_dir", help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="output dtype (default: the recipe's dtype, else the base model's)")
    p.add_argument("--seed", type=int, default=0, help="seed for random gates and expert noise (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--layout", choices=("legacy", "fused"), default="legacy",
                   help="legacy per-expert tensor names (default; transformers v4 and v5) or fused tensors (transformers "
                        ">= 5 only: 4.x cannot read them and would start the experts from random weights)")
    p.add_argument("--gate-input", choices=("residual", "router_input"), default="residual",
                   help="hidden gates from the residual stream entering each layer (mergekit) or from the "
                        "normalised MLP input the router actually sees")
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="devices of the gate pass, e.g. data=8 or tensor=2,data=4 (axes data, fsdp, expert, tensor; "
                        "or a preset such as v4-32): the prompt batch is split over data/fsdp/expert, the base's "
                        "layers over tensor/fsdp where they divide, replicated otherwise; multi-host: each process "
                        "reads only its devices' slices. Default: none on CPU; on TPU/GPU with more than one "
                        "device, data=<all devices>. The output is written by file copies either way")
    p.add_argument("--heldout", metavar="FILE",
                   help='JSONL of {"expert": NAME, "text": ...} (NAME: an expert\'s name in the recipe, or its index): '
                        "report how often each layer's router sends a held-out text's tokens to its expert "
                        "(token-level top-1 / top-k per domain, confusion), here and in the model card")
    p.add_argument("--shard-size", default="5GB", help="max bytes per safetensors shard, e.g. 500MB (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2e9' -> bytes."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"--shard-size: '{text}' is not a size like 5GB or 500MB") from None


@contextlib.contextmanager
def _imports_frozen():
    """Keep everything alive now (jax, flax, ...: hundreds of thousands of objects that live as long as the
    process) out of the garbage collector's full passes for the duration, and out of the collection at
    interpreter exit (an atexit freeze): together about a second of CPU time per build. Unfrozen again on
    return, so a long-lived caller (tests, notebooks) collects as usual."""
    global _EXIT_FREEZE
    if not _EXIT_FREEZE:
        atexit.register(gc.freeze)
        _EXIT_FREEZE = True
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_EXIT_FREEZE = False


def run(args: argparse.Namespace) -> int:
    """Build and print the routing preview."""
    import converters.moe.build  # noqa: F401 - imported before the freeze: its modules live as long as we do

    with _imports_frozen():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import time

    from converters.moe.build import build_moe, expert_names, routing_table
    from converters.moe.recipe import load_recipe

    from jaxmoe.parallel.mesh import make_mesh

    start = time.perf_counter()
    recipe = load_recipe(args.recipe)
    mesh = make_mesh(args.mesh) if args.mesh else None  # MeshError (a ValueError): one line, exit 2
    result = build_moe(recipe, args.out_dir, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
                       layout=args.layout, gate_input=args.gate_input, max_shard_bytes=parse_size(args.shard_size),
                       progress=not args.no_progress, mesh=mesh, heldout=args.heldout)
    c = result.config
    print(f"built {c.model_type}: {c.num_experts} experts, top-{c.num_experts_per_tok}, {c.num_layers} layers, "
          f"{c.dtype} -> {result.out_dir} in {time.perf_counter() - start:.1f}s")
    print("routing preview (share of each expert's prompt tokens sent to each expert, top-1, all layers):")
    print(routing_table(expert_names(recipe), result.routing))
    if result.heldout is not None:
        from converters.moe.heldout import format_scores

        print(format_scores(result.heldout, expert_names(recipe), os.path.basename(args.heldout)))
    return 0
