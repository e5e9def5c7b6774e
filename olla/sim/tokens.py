"""The vocabulary of the tiny test models: SPM with byte fallback.

Every UTF-8 byte is one token (id = byte + 3); ids 0-2 are <unk>, <s>, </s> and
259-261 the FIM tokens. Unlike real SPM there is no leading "▁", so counts are
one or two tokens lower than a real tiny model's for the same text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

UNK, BOS, EOS = 0, 1, 2
BYTE_BASE = 3
FIM_PRE, FIM_SUF, FIM_MID = 259, 260, 261
N_VOCAB = 262

SPECIAL = {
    UNK: "<unk>",
    BOS: "<s>",
    EOS: "</s>",
    FIM_PRE: "<|fim_prefix|>",
    FIM_SUF: "<|fim_suffix|>",
    FIM_MID: "<|fim_middle|>",
}

# The built-in ChatML template llama-server falls back to, verbatim.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)

_GENERATED = "abcdefghijklmnopqrstuvwxyz     ,."


def tokenize(text: str, add_bos: bool = False) -> list[int]:
    ids = [b + BYTE_BASE for b in text.encode("utf-8")]
    return [BOS, *ids] if add_bos else ids


def is_valid(token: Any) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and 0 <= token < N_VOCAB


def piece(token: int) -> str | list[int]:
    """A token's text as /tokenize shows it: a string, or its bytes when not valid UTF-8."""
    if token in SPECIAL:
        return SPECIAL[token]
    raw = bytes([token - BYTE_BASE])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def detokenize(tokens: Iterable[int]) -> str:
    out = bytearray()
    for token in tokens:
        if token in SPECIAL:
            out += SPECIAL[token].encode()
        elif BYTE_BASE <= token < BYTE_BASE + 256:
            out.append(token - BYTE_BASE)
    return out.decode("utf-8", errors="replace")


def message_text(content: Any) -> str:
    """OpenAI message content: a string, null, or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    raise ValueError("Invalid 'content' type")


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    parts = [f"<|im_start|>{m.get('role', '')}\n{message_text(m.get('content'))}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def infill_prompt(prefix: str, suffix: str, prompt: str, extra: Sequence[dict[str, Any]]) -> list[int]:
    """FIM layout as llama-server builds it: context chunks, then prefix+prompt, suffix, middle."""
    tokens: list[int] = []
    for chunk in extra:
        tokens += tokenize(f"\n\n--- snippet ---\n\n{chunk.get('text', '')}")
    tokens += [BOS, FIM_PRE, *tokenize(prefix + prompt), FIM_SUF, *tokenize(suffix), FIM_MID]
    return tokens


def generated_tokens(seed: int, prompt: Sequence[int]) -> Iterable[int]:
    """Endless printable-ASCII tokens, the same for the same seed and prompt."""
    rng = random.Random(f"{seed}:{bytes(t % 256 for t in prompt[-64:]).hex()}:{len(prompt)}")
    while True:
        yield ord(rng.choice(_GENERATED)) + BYTE_BASE
