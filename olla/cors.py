"""CORS for browser clients: which origins may call olla, and the headers that tell a browser so.

Pure: it sees an origin and header names and returns headers. The admission
middleware answers preflights with `preflight()` and adds `response()` to every
other response. olla, not an endpoint, decides CORS: an endpoint's own
`Access-Control-*` headers (llama-server echoes any Origin) never reach a client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from olla.admission_config import CorsConfig

PREFLIGHT_STATUS = 204
# Exposed whenever a response carries them, so new X-Olla-* headers need no list to keep in step.
OWN_PREFIXES = ("x-olla-", "x-ratelimit-")
OWN_HEADERS = frozenset({"retry-after"})


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


class CorsPolicy:
    def __init__(self, config: CorsConfig) -> None:
        self.any_origin = config.allowed_origins == ("*",)
        self.origins = frozenset(config.allowed_origins)
        self.methods = ", ".join(config.allowed_methods)
        self.any_header = "*" in config.allowed_headers
        self.headers = ", ".join(h for h in config.allowed_headers if h != "*")
        self.exposed = tuple(config.exposed_headers)
        self.credentials = config.allow_credentials
        self.max_age = str(config.max_age)

    @property
    def varies(self) -> bool:
        """Whether answers depend on the Origin header, so caches must keep them apart (`Vary: Origin`)."""
        return not self.any_origin

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        return self.any_origin or origin.lower() in self.origins

    def preflight(self, origin: str | None, requested_headers: str | None) -> dict[str, str]:
        """Headers for the answer to a preflight; none for an origin that is not allowed."""
        if not self.allows(origin):
            return {}
        headers = self._origin(origin or "")
        headers["Access-Control-Allow-Methods"] = self.methods
        # `Access-Control-Allow-Headers: *` never covers Authorization, so "*" echoes what was asked for.
        allowed = requested_headers.strip() if self.any_header and requested_headers else self.headers
        if allowed:
            headers["Access-Control-Allow-Headers"] = allowed
        headers["Access-Control-Max-Age"] = self.max_age
        return headers

    def response(self, origin: str | None, present: Iterable[str]) -> dict[str, str]:
        """Headers for any other response to an allowed origin: who may read it, and which headers."""
        if not self.allows(origin):
            return {}
        headers = self._origin(origin or "")
        own = [n for n in present if n.lower().startswith(OWN_PREFIXES) or n.lower() in OWN_HEADERS]
        exposed = list(dict.fromkeys([*self.exposed, *own]))
        if exposed:
            headers["Access-Control-Expose-Headers"] = ", ".join(exposed)
        return headers

    def _origin(self, origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": "*" if self.any_origin else origin}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers
