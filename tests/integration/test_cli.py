"""The gpufleet command line, run as a process."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from tests.integration.conftest import EXAMPLE, gpufleet


def test_plan_of_the_seed_fleet_shows_kv_bytes_weights_and_every_layout():
    result = gpufleet("plan", "inventories/example")
    assert result.code == 0, result.err
    out = result.out
    assert "KV cache per token: 57,344 B across the instance; 14,336 B per GPU" in out
    assert "model weights: 15.23 GB" in out
    # the configured layout, and the alternatives with capacity or the reason they are refused
    assert re.search(r"\*1 x TP4\s+bf16\s+3\.55\s+17\.53\s+1,312,992\s+10 x 1\s+fits", out)
    assert re.search(r"2 x TP2\s+bf16\s+7\.09\s+13\.87\s+519,296\s+3 x 2\s+fits", out)
    assert re.search(r"4 x TP1\s+bf16\s+refused: the KV cache holds 127,136 tokens per instance at TP1", out)
    assert re.search(r"4 x TP1\s+AWQ\s+5\.19", out)
    assert "vllm serve --model Qwen/Qwen2.5-7B-Instruct" in out
    assert "--max-num-seqs 256" in out and "--gpu-memory-utilization 0.95" in out


def test_plan_json_gives_sizes_in_bytes_and_engine_flags():
    result = gpufleet("plan", "inventories/example", "--json")
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    gpu01 = next(h for h in plan["hosts"] if h["host"] == "gpu-01")
    inst = gpu01["instances"][0]
    assert inst["kv_bytes_per_token"] == 57_344
    assert inst["kv_bytes_per_token_per_gpu"] == 14_336
    assert 15.1e9 < inst["model_weight_bytes"] < 15.3e9
    assert inst["gpus"] == [0, 1, 2, 3]
    assert inst["kv_tokens"] == inst["kv_blocks"] * 16
    assert inst["concurrency_at_max_model_len"] == inst["kv_tokens"] // 131_072
    flags = inst["flags"]
    assert flags[flags.index("--tensor-parallel-size") + 1] == "4"
    assert flags[flags.index("--max-model-len") + 1] == "131072"
    refused = [lay for lay in gpu01["layouts"] if lay["refused"]]
    assert [(lay["instances"], lay["tensor_parallel_size"]) for lay in refused] == [(4, 1)]
    # host_vars/gpu-02.yml moves that host's engine to port 8100
    gpu02 = next(h for h in plan["hosts"] if h["host"] == "gpu-02")
    assert gpu02["instances"][0]["port"] == 8100


def _uncomment(block_title: str) -> str:
    """A commented alternative layout from the example's group_vars/gpu.yml, as YAML."""
    text = (EXAMPLE / "group_vars" / "gpu.yml").read_text()
    start = text.index(f"# {block_title}")
    lines = []
    for line in text[start:].splitlines()[1:]:
        if line.strip() == "#":
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines) + "\n"


def test_the_seed_alternative_layouts_in_the_example_plan(example_copy: Path):
    host_vars = example_copy / "host_vars" / "gpu-01.yml"
    own = host_vars.read_text()  # its engine.listen_address stays
    for title, expected in (("Layout B", [[0, 1], [2, 3]]), ("Layout C", [[0], [1], [2], [3]])):
        host_vars.write_text(own + _uncomment(title))
        result = gpufleet("plan", str(example_copy), "--json", "--host", "gpu-01")
        assert result.code == 0, result.err
        host = json.loads(result.out)["hosts"][0]
        assert [i["gpus"] for i in host["instances"]] == expected
        assert host["model"]["quantization"] == "awq"
        assert all(i["concurrency_at_max_model_len"] >= 1 for i in host["instances"])


def test_a_layout_that_cannot_fit_is_refused_with_the_nearest_that_does(example_copy: Path):
    gpu_vars = example_copy / "group_vars" / "gpu.yml"
    text = gpu_vars.read_text().replace("  instances: 1\n", "  instances: 4\n", 1)
    gpu_vars.write_text(text.replace("  tensor_parallel_size: 4\n", "  tensor_parallel_size: 1\n", 1))
    result = gpufleet("plan", "example", cwd=example_copy.parent)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert result.err == (
        "error: example/group_vars/gpu.yml:14 (hosts gpu-01, gpu-02): model.max_model_len: the KV cache holds 127,136 "
        "tokens per instance at TP1, fewer than one 131,072-token request (max_model_len)\n"
        "  fix: nearest layout that works: 2 x TP2 (Qwen/Qwen2.5-7B-Instruct, max_model_len 131,072): "
        "519,296 KV tokens per instance, 3 concurrent at 131,072 tokens\n"
    )


def test_validate_needs_the_api_keys_that_keys_add_creates(example_copy: Path):
    missing = gpufleet("validate", str(example_copy))
    assert missing.code == 2
    assert "gateway.api_keys_file: the API keys file" in missing.err and "does not exist" in missing.err
    assert f"fix: create it with: gpufleet keys add {example_copy} <client-name>" in missing.err

    added = gpufleet("keys", "add", str(example_copy), "web-frontend")
    assert added.code == 0, added.err
    key = added.out.strip()
    assert key.startswith("sk-gf-") and len(key) > 40
    keys_file = example_copy / "secrets" / "api_keys"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    again = gpufleet("keys", "add", str(example_copy), "web-frontend")
    assert again.code == 2 and "--replace" in again.err

    valid = gpufleet("validate", str(example_copy))
    assert valid.code == 0, valid.err
    assert "4 hosts, 1 API keys" in valid.out
    assert key not in valid.out + valid.err

    listed = gpufleet("keys", "list", str(example_copy))
    assert listed.out.split() == ["web-frontend"]


def test_bad_inventory_exits_2_with_every_problem_and_no_traceback(example_copy: Path):
    (example_copy / "group_vars" / "gateway.yml").write_text("gateway:\n  burts: 4\n  rate_per_second: -2\n")
    result = gpufleet("validate", str(example_copy))
    assert result.code == 2
    assert "Traceback" not in result.err
    assert "gateway.burts: unknown key 'burts'" in result.err
    assert "did you mean 'burst'?" in result.err
    assert re.search(r"gateway\.rate_per_second: must be > 0(\.0)?, got -2", result.err)

    as_json = gpufleet("validate", str(example_copy), "--json")
    assert as_json.code == 2
    problems = json.loads(as_json.out)["errors"]
    assert {p["key"] for p in problems} == {"gateway.burts", "gateway.rate_per_second"}
    assert all(p["file"].endswith("group_vars/gateway.yml") and p["line"] for p in problems)


def test_inventory_shows_merged_variables_with_their_origin():
    result = gpufleet("inventory", "inventories/example", "--host", "gpu-02")
    assert result.code == 0, result.err
    assert 'engine.port = 8100  # inventories/example/host_vars/gpu-02.yml:4' in result.out
    assert 'engine.image = "vllm/vllm-openai:v0.11.0"  # roles/inference/defaults.yml' in result.out
    assert 'serving.gpu_memory_utilization = 0.95  # inventories/example/group_vars/gpu.yml' in result.out
    assert "serving.block_size = 16  # roles/inference/defaults.yml" in result.out


def test_catalogue_lists_the_models_and_gpus():
    result = gpufleet("plan", "--catalogue", "--json")
    assert result.code == 0
    catalogue = json.loads(result.out)
    assert "qwen2.5-72b-instruct-gptq-int4" in catalogue["models"]
    assert set(catalogue["gpus"]) >= {"rtx-4090", "rtx-4090d", "l40s", "a100-40gb", "a100-80gb", "h100-80gb", "h200"}


def test_help_is_available_for_every_command():
    for args in ((), ("plan",), ("validate",), ("inventory",), ("keys",), ("keys", "add"), ("keys", "list")):
        result = gpufleet(*args, "--help")
        assert result.code == 0, (args, result.err)
        assert "usage: gpufleet" in result.out
