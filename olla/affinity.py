"""KV-cache affinity: which endpoint last served a conversation, so its next turn reuses the cache.

llama-server keeps each slot's processed prompt; a request whose prompt extends
it skips re-processing the shared prefix. The router remembers, per request, a
key for its whole prompt and the endpoint that took it. The next turn looks up
its own prefixes, longest first, and finds that key:

- chat (`messages`): keys are chained hashes at message boundaries. A turn is
  remembered under all of its messages; the next turn looks up the messages
  before its last user message, then shorter prefixes. A system prompt alone
  is never remembered, so conversations that share one do not pile onto one
  endpoint (a known failure of prefix-hash stickiness).
- completion and infill (`prompt`, `input_extra` + `input_prefix`): chained
  hashes over 256-byte blocks; a prompt shorter than one block has no key.
- an `X-Olla-Session-ID` header: one key for the session, whatever the prompt.

Every key includes the model. The map is an LRU bounded by `max_entries`, and
entries idle longer than `ttl` are ignored and dropped, so memory does not grow
with traffic.

Keys are Python's own `hash()` of (previous key, part): keys never leave the
process, so its per-process random seed does no harm, and it is a third of the
cost of a blake2b chain (measured in bench/results/overhead-notes.md). Two
conversations sharing a 61-bit key would only share an endpoint preference.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

BLOCK = 256
CHAT_ROUTES = frozenset({"/v1/chat/completions", "/v1/messages"})
PROMPT_ROUTES = frozenset({"/completion", "/v1/completions", "/infill"})


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen one takes twice as long to make
class Keys:
    lookup: tuple[int, ...]  # longest prefix first
    record: int | None


def keys_for(model: str, route: str, document: Any, session_id: str | None) -> Keys | None:
    """The request's conversation keys, or None when it has nothing worth remembering."""
    root = hash(("olla-affinity", model))
    if session_id:
        key = hash((root, "session", session_id))
        return Keys((key,), key)
    if not isinstance(document, dict):
        return None
    try:
        if route in CHAT_ROUTES:
            return _chat_keys(root, document)
        if route in PROMPT_ROUTES:
            return _prompt_keys(root, document)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255 levels): nothing to remember
        return None
    return None


def _chat_keys(root: int, document: dict[str, Any]) -> Keys | None:
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    system = document.get("system")  # the Anthropic form keeps the system prompt beside the messages
    key = hash((root, orjson.dumps(system, option=orjson.OPT_SORT_KEYS))) if system else root
    chain = []  # chain[i]: the key of the first i + 1 messages
    before_last_user = len(messages)
    for i, message in enumerate(messages):
        key = hash((key, orjson.dumps(message, option=orjson.OPT_SORT_KEYS)))
        chain.append(key)
        if isinstance(message, dict) and message.get("role") == "user":
            before_last_user = i
    return Keys(tuple(reversed(chain[:before_last_user])), key)


def _prompt_keys(root: int, document: dict[str, Any]) -> Keys | None:
    prompt = document.get("prompt")
    if prompt is None and "input_prefix" in document:
        prompt = [document.get("input_extra"), document.get("input_prefix")]
    if prompt is None:
        return None
    text = prompt.encode() if isinstance(prompt, str) else orjson.dumps(prompt)
    blocks = len(text) // BLOCK
    if blocks == 0:
        return None
    chain = [root]
    for b in range(blocks):
        chain.append(hash((chain[-1], text[b * BLOCK : (b + 1) * BLOCK])))
    return Keys(tuple(reversed(chain[1:])), chain[-1])


class AffinityMap:
    """Key → endpoint name, least recently used evicted first, idle entries ignored after `ttl`."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[int, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, keys: Keys, now: float) -> str | None:
        for key in keys.lookup:
            entry = self._entries.get(key)
            if entry is None:
                continue
            name, used = entry
            if now - used > self.ttl:
                del self._entries[key]
                continue
            self._entries[key] = (name, now)
            self._entries.move_to_end(key)
            return name
        return None

    def remember(self, keys: Keys, endpoint: str, now: float) -> None:
        if keys.record is None:
            return
        self._entries[keys.record] = (endpoint, now)
        self._entries.move_to_end(keys.record)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
