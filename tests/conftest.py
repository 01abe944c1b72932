"""Shared fixtures: build inventory folders on disk from a valid base plus per-test changes."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# A minimal valid fleet: two GPU hosts (4x RTX 4090D), a gateway and a monitoring host.
BASE_FILES: dict[str, str] = {
    "hosts.yml": """
        all:
          children:
            gpu:
              hosts:
                gpu-01: {ansible_host: 192.0.2.11}
                gpu-02: {ansible_host: 192.0.2.12}
            gateway:
              hosts:
                gw-01: {ansible_host: 192.0.2.10}
            monitoring:
              hosts:
                mon-01: {ansible_host: 192.0.2.20}
    """,
    "group_vars/all.yml": """
        slo:
          ttft_p99_ms: 500
          itl_p99_ms: 80
          max_error_rate: 0.01
          min_output_tokens_per_s: 500
          availability_target: 0.999
        monitoring:
          exporter_address: 0.0.0.0  # mon-01 scrapes every host's exporters at its ansible_host
    """,
    "group_vars/gpu.yml": """
        gpus:
          model: rtx-4090d
          count: 4
        model:
          name: Qwen/Qwen2.5-7B-Instruct
          max_model_len: 32768
        serving:
          gpu_memory_utilization: 0.95
          max_num_seqs: 256
          max_num_batched_tokens: 4096
        layout:
          instances: 1
          tensor_parallel_size: 4
        engine:
          listen_address: 0.0.0.0  # gw-01 reaches each host at its ansible_host
    """,
    "group_vars/gateway.yml": """
        gateway:
          api_keys_file: secrets/api_keys
    """,
}

VALID_KEYS = "web sk-gf-0123456789abcdefghijklmnopqrstuvwxyz\n"


def base_file(name: str) -> str:
    """A base file's text exactly as `make_inventory` writes it (tests compute line numbers from it)."""
    return textwrap.dedent(BASE_FILES[name]).lstrip("\n")

InventoryFactory = Callable[..., Path]


@pytest.fixture
def make_inventory(tmp_path: Path) -> InventoryFactory:
    """Write an inventory folder: the valid base, with `files` replacing or adding files.

    A value of None removes that base file. Text is dedented. `keys` writes secrets/api_keys with
    mode 0600 (None leaves it out).
    """

    def build(files: dict[str, str | None] | None = None, keys: str | None = VALID_KEYS, name: str = "fleet") -> Path:
        root = tmp_path / name
        merged: dict[str, str | None] = {**BASE_FILES, **(files or {})}
        for rel, text in merged.items():
            if text is None:
                continue
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")  # as base_file()
        if keys is not None:
            secret = root / "secrets" / "api_keys"
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_text(keys, encoding="utf-8")
            os.chmod(secret, 0o600)
        return root

    return build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier from its folder, so `pytest -m unit` (or integration, e2e) runs one tier."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "integration", "e2e"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
