"""Bearer keys, each naming a tenant.

Keys come from an environment variable (`RLM_SERVE_KEYS` unless configured otherwise) and/or
a file, one entry per line (or comma-separated in the variable): `tenant:key`, or a bare
`key` whose tenant is named after a hash of it. A presented key is compared with every
configured one in constant time (`hmac.compare_digest`), so timing tells nothing about how
much of it matched; keys are never logged, never put in an error, never in a metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ConfigError

__all__ = ["KeyRing", "Tenant"]

ANONYMOUS = "local"
"""The tenant of every request when no keys are configured (loopback only)."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str


def _parse(entries: list[str], where: str) -> dict[str, str]:
    """key -> tenant."""
    keys: dict[str, str] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        tenant, sep, key = entry.partition(":")
        if not sep:
            key = tenant
            tenant = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        tenant, key = tenant.strip(), key.strip()
        if len(key) < 16:
            raise ConfigError(
                f"{where}: a key for tenant {tenant!r} is shorter than 16 characters; use a long random key"
            )
        keys[key] = tenant
    return keys


class KeyRing:
    """The configured keys; `authenticate(header)` gives the tenant or `None`."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(k.encode(), t) for k, t in keys.items()]

    @classmethod
    def load(cls, *, env: str | None = "RLM_SERVE_KEYS", file: str | None = None) -> KeyRing:
        keys: dict[str, str] = {}
        if env and os.environ.get(env):
            keys.update(_parse(os.environ[env].replace(",", "\n").splitlines(), f"${env}"))
        if file:
            path = Path(file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"keys file {path} cannot be read ({exc.strerror}); fix the path") from None
            keys.update(_parse(text.splitlines(), str(path)))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key the `Authorization: Bearer <key>` header holds, else `None`.
        With no keys configured every request is the anonymous tenant."""
        if not self._keys:
            return Tenant(ANONYMOUS)
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        candidate = presented.strip().encode()
        found: str | None = None
        for key, tenant in self._keys:  # every key is compared: no early exit on a match
            if hmac.compare_digest(candidate, key):
                found = tenant
        return Tenant(found) if found is not None else None
