"""llama-server's RAM prompt cache (`--cache-ram`): slot prompts kept in host memory.

llama-server saves a slot's tokens here before giving the slot to a prompt that
does not extend them, then restores into the slot the entry that best matches
the new prompt; `--cache-idle-slots` (on by default) also saves every idle slot
whenever a task starts. So a conversation whose slot was taken by another
prompt still finds its prefix on the same server.

The rules are those of llama.cpp's `server_prompt_cache` (alloc, load, update):
- save: nothing when an entry already starts with the tokens; entries the tokens
  extend are dropped; the oldest entries go once the total passes the limit, but
  the newest always stays.
- load: walking from the oldest, an entry wins when it keeps at least a quarter
  of its own tokens ("don't trash large prompts") and beats the best so far both
  in the share of itself it keeps and in the share of the prompt it covers; the
  slot's own tokens are the first "best". The winner leaves the cache: its state
  moves into the slot.

Only tokens are kept, and `limit` counts tokens, not MiB.
"""

from __future__ import annotations

import math

Tokens = list[int] | tuple[int, ...]


def common_prefix(a: Tokens, b: Tokens) -> int:
    """How many leading tokens `a` and `b` (two lists or two tuples) share."""
    n = min(len(a), len(b))
    i = 0
    # Slices compare in C: 64 tokens at a time, then 8, then 1 is several times faster than a loop.
    for step in (64, 8, 1):
        while i + step <= n and a[i : i + step] == b[i : i + step]:
            i += step
    return i


class PromptCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[tuple[int, ...], None] = {}  # an ordered set, oldest first
        self.n_tokens = 0

    @property
    def entries(self) -> list[list[int]]:
        return [list(entry) for entry in self._entries]

    def save(self, tokens: list[int]) -> None:
        saved = tuple(tokens)
        # Idle slots are saved at every task start; most are saved already, which one lookup finds.
        if not saved or saved in self._entries:
            return
        n, extended = len(saved), []
        for entry in self._entries:  # the last token first: it tells most pairs apart at once
            m = len(entry)
            if m >= n:
                if entry[n - 1] == saved[-1] and entry[:n] == saved:
                    return
            elif saved[m - 1] == entry[-1] and saved[:m] == entry:
                extended.append(entry)
        for entry in extended:
            self._remove(entry)
        self._entries[saved] = None
        self.n_tokens += len(saved)
        while self.n_tokens > self.limit and len(self._entries) > 1:
            self._remove(next(iter(self._entries)))

    def load(self, held: list[int], prompt: list[int]) -> list[int] | None:
        """Take out the entry to restore into a slot holding `held` for `prompt`, if one beats it."""
        if not prompt:
            return None
        best_lcp = common_prefix(held, prompt)
        best_keep = best_lcp / len(held) if held else -1.0
        best: tuple[int, ...] | None = None
        wanted = tuple(prompt)
        for entry in self._entries:
            # The shortest prefix that would beat the best so far and keep a quarter of the entry:
            # one token at its end rules most entries out without comparing the rest.
            need = max(best_lcp + 1, math.ceil(0.25 * len(entry)), math.floor(best_keep * len(entry)) + 1)
            if need > min(len(entry), len(wanted)) or entry[need - 1] != wanted[need - 1]:
                continue
            lcp = common_prefix(entry, wanted)
            keep = lcp / len(entry)
            if keep >= 0.25 and keep > best_keep and lcp > best_lcp:
                best, best_lcp, best_keep = entry, lcp, keep
        if best is None:
            return None
        self._remove(best)
        return list(best)

    def clear(self) -> None:
        self._entries.clear()
        self.n_tokens = 0

    def _remove(self, entry: tuple[int, ...]) -> None:
        del self._entries[entry]
        self.n_tokens -= len(entry)
