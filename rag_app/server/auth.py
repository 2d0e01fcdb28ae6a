"""API keys: ``Authorization: Bearer KEY``, each key allowed every collection or some.

The keys come from ``server.api_keys`` (the environment or the secrets file only). They
are compared in constant time and never written to a response or a log line.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from rag_app.server.errors import ApiError


@dataclass(frozen=True)
class Principal:
    """Who is asking: the collections they may use (``None``: every one)."""

    collections: frozenset[str] | None = None

    def may_use(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


OPEN = Principal()  # no keys configured: loopback (or explicitly allowed) access


class KeyRing:
    def __init__(self, scopes: Mapping[str, frozenset[str] | None]) -> None:
        self._keys = [(key.encode(), Principal(names)) for key, names in scopes.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization`` header; 401 without a valid key."""
        if not self._keys:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key: send the header Authorization: Bearer YOUR_KEY",
                "missing_api_key",
            )
        given = token.strip().encode()
        found: Principal | None = None
        for key, principal in self._keys:  # every key compared: no timing hint of which
            if hmac.compare_digest(given, key):
                found = principal
        if found is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        return found


def require_collection(principal: Principal, collection: str) -> None:
    """403 unless the caller's key may use ``collection``."""
    if not principal.may_use(collection):
        raise ApiError(
            403,
            f"this API key may not use collection {collection!r}",
            "collection_forbidden",
            param="model",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (then no key is needed by default)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
