"""The catalogue of models and GPUs the planner knows, and reading a model's config.json.

Models are described by the config.json fields memory depends on; parameter counts are derived
from them (see memory.py), so adding a model means copying a few numbers from its config.json,
or pointing `model.config_json` at the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpufleet.errors import ConfigError, Problem

QUANT_BITS = {"awq": 4, "gptq": 4, "fp8": 8}


@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture as far as memory is concerned."""

    id: str
    hf_id: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str
    quantization: str | None = None  # the checkpoint's own quantization (awq/gptq), None for full precision
    head_dim: int | None = None
    base_id: str | None = None  # for a quantized variant: the full-precision model it comes from

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class GpuSpec:
    id: str
    name: str
    memory_mib: int
    architecture: str
    compute_capability: str
    memory_bandwidth_gb_s: float
    fp8: bool
    large_batch_defaults: bool

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024


@cache
def models() -> dict[str, ModelSpec]:
    """Every catalogue model and variant by id."""
    raw = yaml.safe_load(resources.files("gpufleet.planner").joinpath("data/models.yml").read_text())
    found: dict[str, ModelSpec] = {}
    for model_id, body in raw.items():
        variants = body.pop("variants", {}) or {}
        base = ModelSpec(id=model_id, **body)
        found[model_id] = base
        for quant, overrides in variants.items():
            variant_id = f"{model_id}-{quant if quant != 'gptq' else 'gptq-int4'}"
            found[variant_id] = replace(base, id=variant_id, quantization=quant, base_id=model_id, **overrides)
    return found


@cache
def gpus() -> dict[str, GpuSpec]:
    raw = yaml.safe_load(resources.files("gpufleet.planner").joinpath("data/gpus.yml").read_text())
    return {gpu_id: GpuSpec(id=gpu_id, **body) for gpu_id, body in raw.items()}


def find_model(name: str) -> ModelSpec | None:
    """A catalogue model by id or Hugging Face repo id, case-insensitively."""
    wanted = name.strip().lower()
    for spec in models().values():
        if wanted in (spec.id.lower(), spec.hf_id.lower()):
            return spec
    return None


def variant_of(spec: ModelSpec, quantization: str) -> ModelSpec | None:
    """The catalogue's `quantization` checkpoint of the same base model, if there is one."""
    base = spec.base_id or spec.id
    for candidate in models().values():
        if (candidate.base_id or candidate.id) == base and candidate.quantization == quantization:
            return candidate
    return None


_REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)


def model_from_config_json(path: Path, shown: str, hf_id: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (Llama/Qwen2/Mistral-style decoders)."""
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            [Problem(file=shown, key="", message="does not exist (named by model.config_json)",
                     fix="download the model's config.json next to the inventory or correct model.config_json")]
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            [Problem(file=shown, key="", message=f"is not a readable JSON config: {exc}",
                     fix="use the model's config.json exactly as published with the weights")]
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(
            [Problem(file=shown, key="", message="is not a JSON object", fix="use the model's config.json")]
        )
    # multimodal and some newer configs nest the language model's settings
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    missing = [k for k in _REQUIRED_CONFIG_KEYS if not isinstance(text.get(k), int)]
    if missing:
        raise ConfigError(
            [Problem(file=shown, key=missing[0], message=f"has no integer {missing[0]!r}",
                     fix="use a decoder-only transformer's config.json (fields: "
                     + ", ".join(_REQUIRED_CONFIG_KEYS) + ")")]
        )
    quant_cfg = config.get("quantization_config") or {}
    method = str(quant_cfg.get("quant_method", "")).lower() or None
    if method not in (None, "awq", "gptq", "fp8"):
        raise ConfigError(
            [Problem(file=shown, key="quantization_config.quant_method",
                     message=f"quantization {method!r} is not one the planner can size",
                     fix="use an AWQ, GPTQ or FP8 checkpoint, or the unquantized model")]
        )
    if method in ("awq", "gptq") and quant_cfg.get("bits", 4) != 4:
        raise ConfigError(
            [Problem(file=shown, key="quantization_config.bits",
                     message=f"{quant_cfg.get('bits')}-bit {method} is not sized by the planner (INT4 only)",
                     fix="use a 4-bit AWQ or GPTQ checkpoint")]
        )
    return ModelSpec(
        id=hf_id,
        hf_id=hf_id,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        vocab_size=text["vocab_size"],
        max_position_embeddings=text["max_position_embeddings"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        attention_bias=bool(text.get("attention_bias", text.get("model_type") == "qwen2")),
        torch_dtype=str(text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16"),
        quantization=method,
        head_dim=text.get("head_dim"),
    )
