"""The sampling parameters llama-server echoes in `/props`, `/slots` and `generation_settings`."""

from __future__ import annotations

from typing import Any

_SAMPLERS = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]


def sampling_params(n_predict: int = -1, stream: bool = False, *, full: bool = False) -> dict[str, Any]:
    """As a task's `params`; `full` adds what only completion results carry (stop, grammar...)."""
    params: dict[str, Any] = {
        "seed": 4294967295,
        "temperature": 0.800000011920929,
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": 40,
        "top_p": 0.949999988079071,
        "min_p": 0.05000000074505806,
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.10000000149011612,
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 64,
    }
    if full:
        params["dry_sequence_breakers"] = ["\n", ":", '"', "*"]
    params |= {
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.10000000149011612,
        "adaptive_target": -1.0,
        "adaptive_decay": 0.8999999761581421,
    }
    if full:
        params["stop"] = []
    params |= {
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "n_discard": 0,
        "ignore_eos": False,
        "stream": stream,
    }
    if full:
        params["logit_bias"] = []
    params |= {"n_probs": 0, "min_keep": 0}
    if full:
        params |= {"grammar": "", "grammar_lazy": False, "grammar_triggers": [], "preserved_tokens": []}
    params |= {
        "chat_format": "Content-only",
        "reasoning_format": "deepseek",
        "reasoning_in_content": False,
        "generation_prompt": "",
        "samplers": list(_SAMPLERS),
        "speculative.types": "none",
        "timings_per_token": False,
        "post_sampling_probs": False,
        "backend_sampling": False,
        "lora": [],
    }
    return params
