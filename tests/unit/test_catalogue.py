"""The planner's catalogue of models and GPUs, and reading a model's own config.json."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.fleet import load_fleet
from gpufleet.planner import memory
from gpufleet.planner.catalogue import ModelSpec, find_model, gpus, model_from_config_json, models, variant_of
from gpufleet.planner.plan import PlanInput, plan_instance

FIXTURES = Path(__file__).parent / "fixtures"

REQUIRED_MODELS = {
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b-instruct": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2.5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-72b-instruct": "Qwen/Qwen2.5-72B-Instruct",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "mistral-7b-instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
}
REQUIRED_GPUS = ("rtx-4090", "rtx-4090d", "l40s", "a100-40gb", "a100-80gb", "h100-80gb", "h200")

# The architecture fields memory depends on (not names, ids or the checkpoint's dtype label)
ARCHITECTURE = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "head_size",
)


def architecture(spec: ModelSpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in ARCHITECTURE}


def plan_for(model: ModelSpec, tp: int = 4, gpu_id: str = "rtx-4090d") -> PlanInput:
    return PlanInput(
        model=model, gpu=gpus()[gpu_id], tensor_parallel_size=tp, quantization=model.quantization,
        dtype="bfloat16", kv_cache_dtype="auto", max_model_len=32768, rope_factor=None,
        gpu_memory_utilization=0.95, max_num_seqs=256, max_num_batched_tokens=4096, block_size=16,
        enforce_eager=False,
    )


# The catalogue ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_id", "hf_id"), sorted(REQUIRED_MODELS.items()))
def test_required_models_and_their_int4_variants(model_id: str, hf_id: str):
    spec = models()[model_id]
    assert spec.hf_id == hf_id
    assert spec.quantization is None
    assert spec.base_id is None
    for quant in ("awq", "gptq"):
        variant = variant_of(spec, quant)
        assert variant is not None, f"{model_id} has no {quant} variant"
        assert variant.quantization == quant
        assert variant.base_id == model_id
        assert variant.hf_id != spec.hf_id
        assert variant.num_hidden_layers == spec.num_hidden_layers
        assert variant.num_key_value_heads == spec.num_key_value_heads
        # variant_of finds siblings from a variant too
        assert variant_of(variant, quant) == variant
        assert variant_of(variant, "awq") == variant_of(spec, "awq")
    assert variant_of(spec, "fp8") is None  # dynamic FP8 needs no separate checkpoint


def test_variant_hf_ids_name_their_quantization():
    for spec in models().values():
        if spec.quantization == "awq":
            assert "awq" in spec.hf_id.lower()
        elif spec.quantization == "gptq":
            assert "gptq" in spec.hf_id.lower()


def test_catalogue_ids_and_hf_ids_are_unique():
    specs = list(models().values())
    assert len({s.id.lower() for s in specs}) == len(specs)
    assert len({s.hf_id.lower() for s in specs}) == len(specs)


def test_catalogue_models_are_consistent():
    for spec in models().values():
        assert spec.num_attention_heads % spec.num_key_value_heads == 0, spec.id
        assert spec.head_size * spec.num_attention_heads == spec.hidden_size, spec.id
        assert spec.head_size == 128, spec.id
        assert spec.torch_dtype in memory.DTYPE_BYTES, spec.id
        assert spec.max_position_embeddings >= 32768, spec.id


def test_required_gpus():
    catalogue = gpus()
    for gpu_id in REQUIRED_GPUS:
        assert gpu_id in catalogue, gpu_id
    assert catalogue["rtx-4090d"].memory_mib == catalogue["rtx-4090"].memory_mib == 24564
    assert catalogue["a100-40gb"].memory_mib == 40960
    assert catalogue["a100-80gb"].memory_mib == 81920
    assert catalogue["h100-80gb"].memory_mib == 81559
    assert catalogue["h200"].memory_mib == 143771
    assert catalogue["h100-80gb"].memory_bytes == 81559 * 1024 * 1024
    assert not catalogue["a100-80gb"].fp8
    assert catalogue["h100-80gb"].fp8
    for spec in catalogue.values():
        assert spec.memory_mib > 16 * 1024
        assert spec.memory_bandwidth_gb_s > 0


# find_model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qwen2.5-7b-instruct", "qwen2.5-7b-instruct"),
        ("Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
        ("qwen/qwen2.5-7b-instruct", "qwen2.5-7b-instruct"),
        ("  QWEN/QWEN2.5-7B-INSTRUCT ", "qwen2.5-7b-instruct"),
        ("Qwen/Qwen2.5-7B-Instruct-AWQ", "qwen2.5-7b-instruct-awq"),
        ("qwen/qwen2.5-72b-instruct-gptq-int4", "qwen2.5-72b-instruct-gptq-int4"),
        ("META-LLAMA/LLAMA-3.1-70B-INSTRUCT", "llama-3.1-70b-instruct"),
        ("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", "llama-3.1-8b-instruct-awq"),
        ("mistralai/mistral-7b-instruct-v0.3", "mistral-7b-instruct-v0.3"),
    ],
)
def test_find_model(name: str, expected: str):
    found = find_model(name)
    assert found is not None
    assert found.id == expected


@pytest.mark.parametrize("name", ["", "Qwen/Qwen2.5-7B", "qwen2.5-7b", "gpt-4", "Qwen/Qwen2.5-7B-Instruct-GGUF"])
def test_find_model_unknown(name: str):
    assert find_model(name) is None


def test_every_model_is_found_by_id_and_hf_id():
    for spec in models().values():
        assert find_model(spec.id) == spec
        assert find_model(spec.hf_id.upper()) == spec


# model_from_config_json -------------------------------------------------------------------------


def test_llama_config_json_matches_the_catalogue():
    spec = model_from_config_json(FIXTURES / "llama-3.1-8b-instruct.config.json", "config.json",
                                  "meta-llama/Llama-3.1-8B-Instruct")
    catalogue = models()["llama-3.1-8b-instruct"]
    assert architecture(spec) == architecture(catalogue)
    assert spec.quantization is None
    assert spec.torch_dtype == "bfloat16"
    assert spec.id == spec.hf_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert memory.param_counts(spec) == memory.param_counts(catalogue)
    assert plan_instance(plan_for(spec)) == plan_instance(plan_for(catalogue))


def test_qwen2_awq_config_json_matches_the_catalogue():
    spec = model_from_config_json(FIXTURES / "qwen2.5-7b-instruct-awq.config.json", "config.json",
                                  "Qwen/Qwen2.5-7B-Instruct-AWQ")
    catalogue = models()["qwen2.5-7b-instruct-awq"]
    assert spec.quantization == "awq"
    assert spec.attention_bias  # Qwen2 has q/k/v biases without saying so in config.json
    assert spec.torch_dtype == "float16"
    assert architecture(spec) == architecture(catalogue)
    for tp in (1, 2, 4):
        from_json = plan_instance(plan_for(spec, tp))
        from_catalogue = plan_instance(plan_for(catalogue, tp))
        assert from_json == from_catalogue
        assert from_json.kv_bytes_per_token == 57_344
    assert 5.5e9 < plan_instance(plan_for(spec, 1)).model_weight_bytes < 5.7e9


def test_config_json_with_head_dim_and_text_config(tmp_path: Path):
    config = json.loads((FIXTURES / "llama-3.1-8b-instruct.config.json").read_text())
    nested = {"model_type": "llava", "text_config": {**config, "head_dim": 96}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nested))
    spec = model_from_config_json(path, "config.json", "someone/multimodal")
    assert spec.num_hidden_layers == 32
    assert spec.head_size == 96
    assert memory.kv_bytes_per_token(spec, 1, 2) == 2 * 32 * 8 * 96 * 2


def test_unsupported_quantization_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        model_from_config_json(FIXTURES / "unsupported-quant.config.json", "models/bnb.json", "someone/bnb")
    problem = caught.value.problems[0]
    assert problem.file == "models/bnb.json"
    assert problem.key == "quantization_config.quant_method"
    assert "bitsandbytes" in problem.message
    assert problem.fix


def test_eight_bit_gptq_is_a_config_error(tmp_path: Path):
    config = json.loads((FIXTURES / "qwen2.5-7b-instruct-awq.config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": 128}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as caught:
        model_from_config_json(path, "config.json", "someone/gptq-int8")
    assert caught.value.problems[0].key == "quantization_config.bits"


def test_malformed_json_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        model_from_config_json(FIXTURES / "malformed.config.json", "models/broken.json", "someone/broken")
    problem = caught.value.problems[0]
    assert problem.file == "models/broken.json"
    assert "JSON" in problem.message
    assert "models/broken.json" in str(caught.value)


def test_missing_config_json_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        model_from_config_json(tmp_path / "nope" / "config.json", "nope/config.json", "someone/nope")
    problem = caught.value.problems[0]
    assert problem.file == "nope/config.json"
    assert "does not exist" in problem.message


@pytest.mark.parametrize("body", ["[1, 2, 3]", '"a string"', "null"])
def test_config_json_that_is_not_an_object_is_a_config_error(tmp_path: Path, body: str):
    path = tmp_path / "config.json"
    path.write_text(body)
    with pytest.raises(ConfigError):
        model_from_config_json(path, "config.json", "someone/odd")


def test_config_json_missing_a_field_names_it(tmp_path: Path):
    config = json.loads((FIXTURES / "llama-3.1-8b-instruct.config.json").read_text())
    del config["num_hidden_layers"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as caught:
        model_from_config_json(path, "config.json", "someone/partial")
    assert caught.value.problems[0].key == "num_hidden_layers"


def test_config_json_inventory_plans_like_the_catalogue(make_inventory):
    """A host naming the AWQ model by config.json is planned exactly like the catalogue's entry."""
    gpu_vars = """
        gpus:
          model: rtx-4090d
          count: 4
        model:
          name: {name}
          {extra}
          max_model_len: 32768
        engine:
          listen_address: 0.0.0.0
        serving:
          gpu_memory_utilization: 0.95
          max_num_seqs: 256
          max_num_batched_tokens: 4096
        layout:
          instances: 2
          tensor_parallel_size: 2
    """
    by_catalogue = make_inventory(
        {"group_vars/gpu.yml": gpu_vars.format(name="Qwen/Qwen2.5-7B-Instruct-AWQ", extra="")}, name="catalogue"
    )
    by_json = make_inventory(
        {"group_vars/gpu.yml": gpu_vars.format(name="local/qwen7b-awq", extra="config_json: models/config.json")},
        name="json",
    )
    (by_json / "models").mkdir()
    shutil.copy(FIXTURES / "qwen2.5-7b-instruct-awq.config.json", by_json / "models" / "config.json")

    expected = load_fleet(by_catalogue).host("gpu-01").plan
    got = load_fleet(by_json).host("gpu-01").plan
    assert expected is not None and got is not None
    assert got.spec.quantization == expected.spec.quantization == "awq"
    assert architecture(got.model) == architecture(expected.model)
    assert [i.plan for i in got.instances] == [i.plan for i in expected.instances]
    plan = got.instances[0].plan
    assert plan.kv_bytes_per_token_per_gpu == 28_672
    # the numbers agree field by field, not just as a whole
    for field in fields(plan):
        assert getattr(plan, field.name) == getattr(expected.instances[0].plan, field.name), field.name
    # the json model is served under the name the inventory gave it
    assert got.served_name == "local/qwen7b-awq"
    # the published AWQ config.json says float16 where the catalogue says bfloat16: the same 2 bytes
    assert {got.spec.dtype, expected.spec.dtype} <= {"float16", "bfloat16"}
    assert replace(got.spec, model=expected.model, dtype=expected.spec.dtype) == expected.spec
