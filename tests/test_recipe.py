"""Recipe parsing (mergekit-moe and Gemma-2-MoE toolkit YAML) and the cross-model source checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from converters.moe.recipe import ExpertSpec, MoERecipe, OutputPlan, RecipeError, load_recipe, validate_sources

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"

GOOD = """\
base_model: base
gate_mode: hidden
dtype: float32
experts_per_token: 2
experts:
  - source_model: a
    positive_prompts:
      - "write code"
    negative_prompts: ["tell a story"]
  - source_model: b
    positive_prompts:
      - "solve math"
    noise_scale: 0.01
    residual_scale: 0.5
"""

G2M = """\
base_model: base
num_experts_per_tok: 1
experts:
  - name: coder
    source_model: a
    positive_prompts: ["code"]
  - name: poet
    source_model: b
    positive_prompts: ["poems"]
    negative_prompts: ["code"]
"""

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "vocab_size": 100, "hidden_act": "silu", "torch_dtype": "bfloat16"}
GEMMA2 = {**LLAMA, "model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh",
          "hidden_activation": "gelu_pytorch_tanh"}


def write(tmp_path: Path, text: str, models: tuple[str, ...] = ("base", "a", "b", "c")) -> Path:
    """Write recipe `text` to tmp_path/recipe.yml next to empty model directories `models`."""
    for name in models:
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "recipe.yml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(RecipeError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def expect(path: Path, line: int, field: str, *fragments: str) -> None:
    """load_recipe(path) fails with `path:line: field: ...` containing every fragment."""
    message = error_of(load_recipe, path)
    assert message.startswith(f"{path}:{line}: {field}: " if field else f"{path}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message


def reader(configs: dict[str, dict], calls: list[str] | None = None):
    """A fake read_config: the config is looked up by the model path's file name."""
    def read(path: str) -> dict:
        if calls is not None:
            calls.append(path)
        return configs[Path(path).name]
    return read


def expect_source_error(path: Path, configs: dict[str, dict], line: int, field: str, *fragments: str) -> None:
    message = error_of(validate_sources, load_recipe(path), reader(configs))
    assert message.startswith(f"{path}:{line}: {field}: "), message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------- parsing


def test_good_recipe_parses_to_exact_values(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path)
    assert recipe == MoERecipe(
        base_model=str(tmp_path / "base"),
        experts=[ExpertSpec(str(tmp_path / "a"), ["write code"], ["tell a story"]),
                 ExpertSpec(str(tmp_path / "b"), ["solve math"], [], noise_scale=0.01, residual_scale=0.5)],
        gate_mode="hidden", dtype="float32", experts_per_token=2, shared_experts=[], architecture=None,
        source_path=str(path), flavor="mergekit", raw_text=GOOD)
    assert recipe.lines["experts[1].source_model"] == 10
    assert recipe.line_of("experts[1].negative_prompts") == 10  # not written: the expert's line


def test_defaults_aliases_and_torch_dtype(tmp_path):
    text = GOOD.replace("gate_mode: hidden", "gate_mode: hidden_last").replace("float32", "torch.bfloat16")
    recipe = load_recipe(write(tmp_path, text.replace("experts_per_token: 2\n", "")))
    assert (recipe.gate_mode, recipe.dtype, recipe.experts_per_token) == ("hidden", "bfloat16", 2)
    recipe = load_recipe(write(tmp_path, GOOD.replace("dtype: float32", "dtype: null")))
    assert recipe.dtype is None
    recipe = load_recipe(write(tmp_path, GOOD.replace("noise_scale: 0.01", "noise_scale: 1e-2")))
    assert recipe.experts[1].noise_scale == 0.01  # PyYAML reads 1e-2 as a string


def test_relative_paths_try_recipe_dir_then_cwd_then_search_dirs(tmp_path, monkeypatch):
    sub, cwd, cache = tmp_path / "recipes", tmp_path / "work", tmp_path / "cache"
    for d in (sub, cwd, cache):
        d.mkdir()
    (sub / "a").mkdir()
    (cwd / "a").mkdir()  # shadowed by the recipe dir's
    (cwd / "base").mkdir()
    (cache / "b").mkdir()
    path = sub / "recipe.yml"
    path.write_text(GOOD)
    monkeypatch.chdir(cwd)
    recipe = load_recipe(path, search_dirs=[cache])
    assert recipe.base_model == str(cwd / "base")
    assert [e.source_model for e in recipe.experts] == [str(sub / "a"), str(cache / "b")]


def test_unknown_gate_mode(tmp_path):
    expect(write(tmp_path, GOOD.replace("gate_mode: hidden", "gate_mode: hiden")), 2, "gate_mode",
           "unknown gate_mode 'hiden'", "did you mean 'hidden'",
           "hidden, hidden_last, hidden_avg, cheap_embed, random, uniform_random, embed_algebra")


def test_empty_or_missing_prompts_in_hidden_mode(tmp_path):
    text = GOOD.replace('positive_prompts:\n      - "write code"', "positive_prompts: []")
    expect(write(tmp_path, text), 7, "experts[0].positive_prompts",
           "must be a non-empty list of strings in gate_mode 'hidden'")
    text = GOOD.replace('    positive_prompts:\n      - "solve math"\n', "")
    expect(write(tmp_path, text), 10, "experts[1].positive_prompts", "non-empty list of strings")
    text = GOOD.replace('"solve math"', '""')  # accepted as mergekit-moe accepts it: BOS alone
    assert load_recipe(write(tmp_path, text)).experts[1].positive_prompts == [""]
    text = GOOD.replace('positive_prompts:\n      - "solve math"', 'positive_prompts: "solve math"')
    expect(write(tmp_path, text), 11, "experts[1].positive_prompts", "got a single string")


def test_random_modes_need_no_prompts(tmp_path):
    text = GOOD.replace("gate_mode: hidden", "gate_mode: uniform_random")
    text = text.replace('    positive_prompts:\n      - "solve math"\n', "")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.experts[1].positive_prompts == [] and recipe.gate_mode == "uniform_random"


def test_identical_prompts_for_every_expert(tmp_path):
    text = GOOD.replace('"solve math"', '"write code"')
    text = text.replace("    noise_scale", '    negative_prompts: ["tell a story"]\n    noise_scale')
    expect(write(tmp_path, text), 5, "experts", "all 2 experts have the same positive and negative prompts")


def test_experts_per_token_more_than_experts(tmp_path):
    expect(write(tmp_path, GOOD.replace("experts_per_token: 2", "experts_per_token: 3")), 4, "experts_per_token",
           "3 is more than the number of experts (2)")
    one = GOOD.split("  - source_model: b")[0].replace("experts_per_token: 2\n", "")
    expect(write(tmp_path, one), 4, "experts_per_token", "2 (the default) is more than the number of experts (1)")
    expect(write(tmp_path, GOOD.replace("experts_per_token: 2", "experts_per_token: 0")), 4, "experts_per_token",
           "must be an integer >= 1, got 0")


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    expect(write(tmp_path, GOOD.replace("experts_per_token:", "experts_per_tokens:")), 4, "experts_per_tokens",
           "did you mean 'experts_per_token'", "valid keys: base_model, experts, gate_mode")
    expect(write(tmp_path, GOOD.replace("    noise_scale", "    noise_scael")), 13, "experts[1].noise_scael",
           "did you mean 'noise_scale'", "valid keys: source_model, positive_prompts")


def test_bad_dtype_and_bad_numbers(tmp_path):
    expect(write(tmp_path, GOOD.replace("float32", "float64")), 3, "dtype",
           "'float64' is not a dtype we write", "bfloat16, float16, float32")
    expect(write(tmp_path, GOOD.replace("noise_scale: 0.01", "noise_scale: -1")), 13, "experts[1].noise_scale",
           "must be a finite number >= 0, got -1")
    expect(write(tmp_path, GOOD.replace("residual_scale: 0.5", "residual_scale: lots")), 14,
           "experts[1].residual_scale", "must be a finite number, got 'lots'")


def test_lora_and_revision_refs_are_refused(tmp_path, monkeypatch):
    expect(write(tmp_path, GOOD.replace("source_model: a", "source_model: a+loras/code")), 6,
           "experts[0].source_model", "'+lora' references are not supported", "plain local path")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # a Hub id: looked up there (tests/test_hub.py)
    monkeypatch.delenv("JAXMOE_HUB_DOWNLOAD", raising=False)
    recipe = load_recipe(write(tmp_path, GOOD.replace("base_model: base", "base_model: org/model@v2")))
    assert "org/model at revision v2 is not in the Hugging Face cache" in error_of(validate_sources, recipe, dict)
    expect(write(tmp_path, GOOD.replace("base_model: base", "base_model: ./base@v2")), 1, "base_model",
           "'@revision' is for Hub ids")
    (tmp_path / "odd+name").mkdir()  # an existing path is taken literally
    assert load_recipe(write(tmp_path, GOOD.replace("source_model: a", "source_model: odd+name"))) \
        .experts[0].source_model == str(tmp_path / "odd+name")


def test_required_keys_shared_experts_and_yaml_errors(tmp_path):
    expect(write(tmp_path, GOOD.replace("base_model: base\n", "")), 1, "base_model", "required")
    expect(write(tmp_path, GOOD.split("experts:\n")[0] + "experts: []\n"), 5, "experts", "non-empty list")
    shared = GOOD + "shared_experts:\n  - source_model: a\n    positive_prompts: [x]\n  - source_model: b\n"
    expect(write(tmp_path, shared), 15, "shared_experts", "at most one shared expert is supported, got 2")
    expect(write(tmp_path, GOOD + "dtype: float16\n"), 15, "dtype", "key given twice")
    expect(write(tmp_path, GOOD.replace("  - source_model: b", "  - source_model: [b")), 11, "",
           "YAML syntax error")
    expect(write(tmp_path, GOOD + "architecture: deepseek\n"), 15, "architecture",
           "'deepseek' does not name one output architecture", "DeepSeek MoE")


@pytest.mark.parametrize("written, canonical", [("Mixtral", "mixtral"), ("qwen", "qwen2_moe"),
                                                 ("Qwen MoE", "qwen2_moe"), ("Gemma2-MoE", "gemma2_moe"),
                                                 ("MixtralForCausalLM", "mixtral")])
def test_architecture_prefixes(tmp_path, written, canonical):
    assert load_recipe(write(tmp_path, GOOD + f"architecture: {written}\n")).architecture == canonical


def test_gemma2moe_flavor(tmp_path):
    recipe = load_recipe(write(tmp_path, G2M))
    assert (recipe.flavor, recipe.gate_mode, recipe.experts_per_token, recipe.dtype) == \
        ("gemma2moe", "embed_algebra", 1, "bfloat16")  # the toolkit's documented dtype
    assert [(e.name, e.positive_prompts, e.negative_prompts) for e in recipe.experts] == \
        [("coder", ["code"], []), ("poet", ["poems"], ["code"])]
    # A gate_mode makes it a mergekit-style recipe, where num_experts_per_tok is read as experts_per_token.
    recipe = load_recipe(write(tmp_path, G2M + "gate_mode: cheap_embed\n"))
    assert (recipe.flavor, recipe.gate_mode, recipe.experts_per_token) == ("mergekit", "cheap_embed", 1)
    # The toolkit gives an expert without prompts a random vector (converters.moe.gates.embed_algebra_gates).
    assert load_recipe(write(tmp_path, G2M.replace('    positive_prompts: ["poems"]\n', ""))).experts[1] \
        .positive_prompts == []
    expect(write(tmp_path, G2M + "experts_per_token: 1\n"), 2, "num_experts_per_tok", "not both")
    assert load_recipe(write(tmp_path, GOOD.replace("hidden", "embed_algebra"))).flavor == "mergekit"


def test_shipped_recipes_parse(tmp_path):
    smol = load_recipe(RECIPES / "smollm2-4x.yml")
    assert (smol.gate_mode, smol.experts_per_token, smol.dtype, len(smol.experts)) == ("calibrated", 2, "float32", 4)
    assert {Path(e.source_model).name for e in smol.experts} == {"smollm2-135m-instruct.gguf"}
    assert all(len(e.positive_prompts) == 16 and len(e.negative_prompts) == 2 for e in smol.experts)
    (tmp_path / "smollm2-135m-instruct.gguf").write_bytes(b"")
    assert load_recipe(RECIPES / "smollm2-4x.yml", search_dirs=[tmp_path]).base_model == \
        str(tmp_path / "smollm2-135m-instruct.gguf")
    gemma = load_recipe(RECIPES / "gemma2-moe-example.yml")
    assert (gemma.flavor, gemma.gate_mode, gemma.dtype, [e.name for e in gemma.experts]) == \
        ("gemma2moe", "embed_algebra", "bfloat16", ["assistant", "japanese", "math", "code"])
    qwen = load_recipe(RECIPES / "qwen-shared-example.yml")
    assert (qwen.architecture, len(qwen.experts), qwen.shared_experts[0].residual_scale) == ("qwen2_moe", 3, 0.1)


# ------------------------------------------------------------------------------------------ source checks


def test_llama_sources_build_mixtral(tmp_path):
    calls: list[str] = []
    plan = validate_sources(load_recipe(write(tmp_path, GOOD)), reader(dict.fromkeys(("base", "a", "b"), LLAMA), calls))
    assert plan == OutputPlan(architecture="mixtral", num_experts=2, experts_per_token=2, has_shared_expert=False,
                              base_config=LLAMA, model_type="llama", dtype="float32", warnings=[])
    assert len(calls) == 3
    plan = validate_sources(load_recipe(write(tmp_path, GOOD.replace("dtype: float32", "dtype: null"))),
                            reader(dict.fromkeys(("base", "a", "b"), LLAMA)))
    assert plan.dtype == "bfloat16"  # the base config's


def test_one_model_4x_reads_one_config_and_warns(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    text = GOOD.replace("base_model: base", "base_model: m.gguf").replace("source_model: a", "source_model: m.gguf")
    text = text.replace("source_model: b", "source_model: m.gguf")
    text += text[text.index("  - source_model: m.gguf"):].replace("math", "stories")
    calls: list[str] = []
    plan = validate_sources(load_recipe(write(tmp_path, text)), reader({"m.gguf": LLAMA}, calls))
    assert calls == [str(tmp_path / "m.gguf")]
    assert (plan.architecture, plan.num_experts) == ("mixtral", 4)
    assert plan.warnings == ["all 4 experts copy one model (m.gguf): the MoE computes what that model computes "
                             "until its router or experts are trained"]


def test_shared_expert_builds_qwen2_moe(tmp_path):
    text = GOOD + "shared_experts:\n  - source_model: c\n    positive_prompts: [general]\n    residual_scale: 0.1\n"
    path = write(tmp_path, text)
    plan = validate_sources(load_recipe(path), reader(dict.fromkeys(("base", "a", "b", "c"), LLAMA)))
    assert (plan.architecture, plan.has_shared_expert, plan.num_experts) == ("qwen2_moe", True, 2)
    qwen2 = {**LLAMA, "model_type": "qwen2"}
    plan = validate_sources(load_recipe(path), reader(dict.fromkeys(("base", "a", "b", "c"), qwen2)))
    assert (plan.architecture, plan.model_type) == ("qwen2_moe", "qwen2")
    expect_source_error(write(tmp_path, GOOD), dict.fromkeys(("base", "a", "b"), qwen2), 1, "base_model",
                        "qwen2 sources build a Qwen2-MoE here, which needs exactly one shared expert")
    expect_source_error(write(tmp_path, GOOD + "architecture: qwen\n"), dict.fromkeys(("base", "a", "b"), LLAMA),
                        15, "architecture", "needs exactly one shared expert")


def test_shared_expert_with_mixtral_output(tmp_path):
    text = GOOD + "architecture: mixtral\nshared_experts:\n  - source_model: c\n    positive_prompts: [x]\n"
    expect_source_error(write(tmp_path, text), dict.fromkeys(("base", "a", "b", "c"), LLAMA), 16, "shared_experts",
                        "mixtral has no shared expert", "architecture: qwen")


def test_gemma2_sources_build_gemma2moe(tmp_path):
    plan = validate_sources(load_recipe(write(tmp_path, G2M)), reader(dict.fromkeys(("base", "a", "b"), GEMMA2)))
    assert (plan.architecture, plan.num_experts, plan.experts_per_token, plan.warnings) == ("gemma2_moe", 2, 1, [])
    expect_source_error(write(tmp_path, G2M + "architecture: mixtral\n"), dict.fromkeys(("base", "a", "b"), GEMMA2),
                        11, "architecture", "Gemma 2 sources build a gemma2moe (architecture: gemma2moe), not mixtral")
    expect_source_error(write(tmp_path, GOOD + "architecture: gemma2moe\n"),
                        dict.fromkeys(("base", "a", "b"), LLAMA), 15, "architecture",
                        "gemma2moe is built from gemma2 sources, not llama")
    # Gemma 1 sources build a GemMoE now (tests/test_gemmoe.py); Gemma 3's multimodal checkpoints are no source.
    gemma3_vlm = {**GEMMA2, "model_type": "gemma3"}
    expect_source_error(write(tmp_path, G2M), dict.fromkeys(("base", "a", "b"), gemma3_vlm), 1, "base_model",
                        "model_type 'gemma3' cannot be an MoE source")


def test_mixed_model_types(tmp_path):
    configs = {"base": LLAMA, "a": LLAMA, "b": {**LLAMA, "model_type": "mistral"}}
    expect_source_error(write(tmp_path, GOOD), configs, 10, "experts[1].source_model",
                        "model_type 'mistral' differs from base_model's 'llama'")


@pytest.mark.parametrize("field, value", [("hidden_size", 96), ("intermediate_size", 256),
                                          ("num_hidden_layers", 3), ("vocab_size", 101)])
def test_shape_mismatch_names_the_expert_line_and_both_values(tmp_path, field, value):
    configs = {"base": LLAMA, "a": {**LLAMA, field: value}, "b": LLAMA}
    expect_source_error(write(tmp_path, GOOD), configs, 6, "experts[0].source_model",
                        f"{field} {value} differs from base_model's {LLAMA[field]}")


def test_activation_mismatch(tmp_path):
    configs = {"base": LLAMA, "a": LLAMA, "b": {**LLAMA, "hidden_act": "gelu"}}
    expect_source_error(write(tmp_path, GOOD), configs, 10, "experts[1].source_model",
                        "activation 'gelu' differs from base_model's 'silu'")


def test_missing_unreadable_and_wrong_kind_of_source(tmp_path):
    configs = dict.fromkeys(("base", "a", "b"), LLAMA)
    expect_source_error(write(tmp_path, GOOD, models=("base", "a")), configs, 10, "experts[1].source_model",
                        f"not found: {tmp_path / 'b'}")
    (tmp_path / "notes.txt").write_text("x")
    expect_source_error(write(tmp_path, GOOD.replace("source_model: a", "source_model: notes.txt")), configs, 6,
                        "experts[0].source_model", "is a file but not a .gguf")

    def broken(path: str) -> dict:
        raise OSError(f"no config.json in {path}")
    message = error_of(validate_sources, load_recipe(write(tmp_path, GOOD)), broken)
    assert message.startswith(f"{tmp_path / 'recipe.yml'}:1: base_model: cannot read the model config"), message
