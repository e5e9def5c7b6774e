"""What one emulated llama-server is: its model, slots, speed and features."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimConfig:
    """One emulated llama-server, as its command line would describe it.

    `n_ctx` is the context of one slot (what `/slots` and `/props` report), not
    llama-server's `-c` total. `prefill_ms` is the cost of each prompt token the
    chosen slot has not cached; `decode_ms` the cost of each generated token.
    `n_predict` is how many tokens a request that sets no limit gets before the
    emulated model "emits EOS" (the real server would run until EOS or a full
    context).

    `cache_ram_tokens` bounds the RAM prompt cache (`--cache-ram`, which counts
    MiB: 8192 by default, so about 65k tokens of an 8B model's f16 KV cache and
    millions of a tiny model's); 0 disables it, like `--cache-ram 0`.
    `cache_load_fraction` is the cost of restoring a token from it, as a share of
    `prefill_ms`. Restoring is a copy of the saved KV state, far cheaper than
    prefill, so by default it is free.
    """

    model: str = "sim-model"
    slots: int = 2
    n_ctx: int = 4096
    prefill_ms: float = 0.5
    decode_ms: float = 5.0
    load_seconds: float = 0.0
    api_key: str | None = None
    embeddings: bool = True
    infill: bool = True
    metrics: bool = True
    slots_endpoint: bool = True
    seed: int = 0
    n_predict: int = 16
    cache_ram_tokens: int = 1_000_000
    cache_load_fraction: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append("model must not be empty")
        if self.slots < 1:
            problems.append(f"slots must be at least 1, got {self.slots}")
        if self.n_ctx < 8:
            problems.append(f"n_ctx must be at least 8, got {self.n_ctx}")
        for name in ("prefill_ms", "decode_ms", "load_seconds", "cache_ram_tokens", "cache_load_fraction"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.n_predict < 1:
            problems.append(f"n_predict must be at least 1, got {self.n_predict}")
        if problems:
            raise ValueError("; ".join(problems))
