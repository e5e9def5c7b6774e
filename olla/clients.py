"""Who is calling: the client an API key belongs to, and the caller's address.

A **client** is an authenticated caller, named by the `client` id its key was
configured with. Pure functions and one lookup table, no I/O: the admission
middleware feeds them headers and the peer address.

Keys are compared in constant time: the presented key's SHA-256 digest against
every stored digest with `hmac.compare_digest`, all of them every time, so
neither the time taken nor an early exit tells which key (or how much of one)
matched. Keys never leave this module except as that digest.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping

ANONYMOUS = "anonymous"  # the metrics label of a request without a client; no client may take it
GENERATED_PREFIX = "client-"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def generated_client(key: str) -> str:
    """The id of a key configured without one: stable across restarts, and never the key itself."""
    return GENERATED_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_list(text: str) -> list[tuple[str, str | None]]:
    """`key_a:team_a,key_b:team_b,key_c` (the `OPENAI_API_KEYS` format) as (key, client or None) pairs.

    Entries are split at commas and each at its first colon, so such a key can hold
    neither; blanks around either part and empty entries are ignored. Values are not checked here.
    """
    pairs: list[tuple[str, str | None]] = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, _, client = entry.partition(":")
        pairs.append((key.strip(), client.strip() or None))
    return pairs


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer KEY`, else in `X-Api-Key: KEY`; None when neither carries one."""
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("X-Api-Key", "").strip() or None


class Clients:
    """Keys to client ids. Empty means auth is off."""

    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        self._digests = [(_digest(key), client) for key, client in keys]
        self.names = frozenset(client for _, client in self._digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def lookup(self, key: str) -> str | None:
        """The client whose key this is, or None; compares against every key, whatever matches."""
        presented = _digest(key)
        found: str | None = None
        for digest, client in self._digests:
            if hmac.compare_digest(digest, presented) and found is None:
                found = client
        return found


def _digest(key: str) -> bytes:
    # Equal-length digests keep compare_digest's time independent of the key's length.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


# ---- the caller's address ------------------------------------------------------------------


def caller_address(
    peer: str | None, forwarded_for: str | None, trust_forwarded: bool, trusted: tuple[IPNetwork, ...]
) -> str:
    """The address a request came from: the peer, unless the peer is a trusted proxy that says otherwise.

    With `trust_forwarded`, `X-Forwarded-For` is read from right to left, skipping
    trusted proxies; the first address that is not one is the caller. The header is
    ignored when the peer itself is not in `trusted`, so anybody else cannot forge it.
    """
    address = _address(peer)
    if address is None:
        return peer or "unknown"
    if not trust_forwarded or not forwarded_for or not _trusted(address, trusted):
        return str(address)
    for hop in reversed(forwarded_for.split(",")):
        hop_address = _address(hop.strip())
        if hop_address is None:
            break  # a garbled hop: trust nothing further left
        address = hop_address
        if not _trusted(address, trusted):
            break
    return str(address)


def _address(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _trusted(address: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)
