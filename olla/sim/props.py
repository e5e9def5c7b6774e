"""What the emulated server says about itself: `/v1/models`, `/props` and `/slots`.

The numbers describe the tiny F32 llama model the integration tests generate,
so discovery sees the same kind of model from the emulator and the real thing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from olla.sim import tokens
from olla.sim.config import SimConfig
from olla.sim.engine import N_EMBD
from olla.sim.params import sampling_params
from olla.sim.slots import Slot

BUILD_INFO = "b1-sim"
N_PARAMS = 395_648
SIZE_BYTES = 1_582_592
FTYPE = "all F32"


def models(config: SimConfig) -> dict[str, Any]:
    name = config.model
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": "",
                "size": "",
                "digest": "",
                "type": "model",
                "description": "",
                "tags": [""],
                "capabilities": ["completion"],
                "parameters": "",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "",
                    "families": [""],
                    "parameter_size": "",
                    "quantization_level": "",
                },
            }
        ],
        "object": "list",
        "data": [
            {
                "id": name,
                "aliases": [name],
                "tags": [],
                "object": "model",
                "created": int(time.time()),
                "owned_by": "llamacpp",
                "meta": {
                    "vocab_type": 1,
                    "n_vocab": tokens.N_VOCAB,
                    "n_ctx": config.n_ctx,
                    "n_ctx_train": max(config.n_ctx, 4096),
                    "n_embd": N_EMBD,
                    "n_params": N_PARAMS,
                    "size": SIZE_BYTES,
                    "ftype": FTYPE,
                },
            }
        ],
    }


def props(config: SimConfig, media_marker: str, sleeping: bool = False) -> dict[str, Any]:
    params = sampling_params() | {"reasoning_format": "none"}
    return {
        "default_generation_settings": {"params": params, "n_ctx": config.n_ctx},
        "total_slots": config.slots,
        "model_alias": config.model,
        "model_ftype": FTYPE,
        "model_path": config.model,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": media_marker,
        "endpoint_slots": config.slots_endpoint,
        "endpoint_props": False,
        "endpoint_metrics": config.metrics,
        "ui": True,
        "ui_settings": {},
        "chat_template": tokens.CHAT_TEMPLATE,
        "chat_template_caps": {
            "supports_object_arguments": False,
            "supports_parallel_tool_calls": False,
            "supports_preserve_reasoning": False,
            "supports_reasoning_effort": False,
            "supports_string_content": True,
            "supports_system_role": True,
            "supports_tool_calls": False,
            "supports_tools": False,
            "supports_typed_content": False,
        },
        "bos_token": tokens.SPECIAL[tokens.BOS],
        "eos_token": tokens.SPECIAL[tokens.EOS],
        "build_info": BUILD_INFO,
        "is_sleeping": sleeping,
        "cors_proxy_enabled": False,
    }


def slots(config: SimConfig, pool: Sequence[Slot]) -> list[dict[str, Any]]:
    out = []
    for slot in pool:
        entry: dict[str, Any] = {
            "id": slot.id,
            "n_ctx": config.n_ctx,
            "speculative": False,
            "is_processing": slot.busy,
        }
        if slot.id_task >= 0:
            entry |= {
                "id_task": slot.id_task,
                "n_prompt_tokens": len(slot.cache),
                "n_prompt_tokens_processed": slot.n_prompt_processed,
                "n_prompt_tokens_cache": slot.n_prompt_cached,
                "params": slot.params if slot.params is not None else sampling_params(),
                "next_token": [
                    {
                        "has_next_token": slot.busy,
                        "has_new_line": slot.has_new_line,
                        "n_remain": slot.n_remain,
                        "n_decoded": slot.n_decoded,
                    }
                ],
            }
        out.append(entry)
    return out
