"""llama-server's `/metrics`: its counters, and the gauges each scrape resets."""

from __future__ import annotations

from dataclasses import dataclass

_HELP = {
    "prompt_tokens_total": ("counter", "Number of prompt tokens processed, excluding cached tokens"),
    "prompt_tokens_cached_total": ("counter", "Number of prompt tokens reused from the cache"),
    "prompt_seconds_total": ("counter", "Total time spent processing prompts"),
    "tokens_predicted_total": ("counter", "Number of generation tokens processed"),
    "tokens_predicted_seconds_total": ("counter", "Total time spent generating tokens"),
    "n_decode_total": (
        "counter",
        "Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding",
    ),
    "n_tokens_max": ("counter", "Largest observed sequence length (prompt + generation)"),
    "spec_decode_num_draft_tokens_total": ("counter", "Speculative: Total draft tokens generated"),
    "spec_decode_num_accepted_tokens_total": (
        "counter",
        "Speculative: Total draft tokens accepted by the target model",
    ),
    "spec_decode_num_drafts_total": ("counter", "Speculative: Total speculative decoding verification steps"),
    "prompt_tokens_seconds": ("gauge", "Average prompt throughput in tokens/s"),
    "predicted_tokens_seconds": ("gauge", "Average generation throughput in tokens/s"),
    "requests_processing": ("gauge", "Number of requests processing"),
    "requests_deferred": ("gauge", "Number of requests deferred"),
    "n_busy_slots_per_decode": ("gauge", "Average number of busy slots per llama_decode() call"),
}


@dataclass
class Metrics:
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    prompt_seconds: float = 0.0
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0
    n_decode: int = 0
    n_busy_slots_sum: int = 0
    n_tokens_max: int = 0
    # Since the last scrape, for the throughput gauges.
    window_prompt_tokens: int = 0
    window_prompt_seconds: float = 0.0
    window_predicted_tokens: int = 0
    window_predicted_seconds: float = 0.0

    def on_prompt(self, processed: int, cached: int, seconds: float, busy_slots: int) -> None:
        self.prompt_tokens += processed
        self.prompt_tokens_cached += cached
        self.prompt_seconds += seconds
        self.window_prompt_tokens += processed
        self.window_prompt_seconds += seconds
        self.on_decode(busy_slots)

    def on_decode(self, busy_slots: int) -> None:
        self.n_decode += 1
        self.n_busy_slots_sum += busy_slots

    def on_predicted(self, tokens: int, seconds: float, sequence_length: int) -> None:
        self.predicted_tokens += tokens
        self.predicted_seconds += seconds
        self.window_predicted_tokens += tokens
        self.window_predicted_seconds += seconds
        self.n_tokens_max = max(self.n_tokens_max, sequence_length)

    def scrape(self, processing: int, deferred: int) -> str:
        """The Prometheus text; resets the throughput window like llama-server does."""
        values: dict[str, float] = {
            "prompt_tokens_total": self.prompt_tokens,
            "prompt_tokens_cached_total": self.prompt_tokens_cached,
            "prompt_seconds_total": self.prompt_seconds,
            "tokens_predicted_total": self.predicted_tokens,
            "tokens_predicted_seconds_total": self.predicted_seconds,
            "n_decode_total": self.n_decode,
            "n_tokens_max": self.n_tokens_max,
            "spec_decode_num_draft_tokens_total": 0,
            "spec_decode_num_accepted_tokens_total": 0,
            "spec_decode_num_drafts_total": 0,
            "prompt_tokens_seconds": _rate(self.window_prompt_tokens, self.window_prompt_seconds),
            "predicted_tokens_seconds": _rate(self.window_predicted_tokens, self.window_predicted_seconds),
            "requests_processing": processing,
            "requests_deferred": deferred,
            "n_busy_slots_per_decode": self.n_busy_slots_sum / self.n_decode if self.n_decode else 0,
        }
        self.window_prompt_tokens = self.window_predicted_tokens = 0
        self.window_prompt_seconds = self.window_predicted_seconds = 0.0
        lines = []
        for name, (kind, text) in _HELP.items():
            lines += [
                f"# HELP llamacpp:{name} {text}",
                f"# TYPE llamacpp:{name} {kind}",
                f"llamacpp:{name} {values[name]:g}",
            ]
        return "\n".join(lines) + "\n"


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
