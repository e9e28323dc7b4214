"""API keys: bearer tokens with scopes, checked before any route does work.

Scopes: `read` (ctr, rank, history), `write` (events, items), `admin` (adapters).
Keys come from LOREC_API_KEYS (JSON `{"<key>": ["read", ...]}`) and/or a JSON file of
the same shape (LOREC_API_KEYS_FILE, default <data_dir>/api-keys.json). With no key
configured the gateway does not run open: it generates one key with every scope,
writes it to that file (mode 0600) and prints it once. Keys are compared in constant
time and never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
log = logging.getLogger(__name__)


class KeyRing:
    def __init__(self, keys: dict[str, frozenset[str]]) -> None:
        self._keys = [(k.encode(), scopes) for k, scopes in keys.items()]

    def scopes(self, presented: str) -> frozenset[str] | None:
        """The presented key's scopes; every stored key is compared, so timing says nothing."""
        found = None
        candidate = presented.encode()
        for key, scopes in self._keys:
            if hmac.compare_digest(key, candidate):
                found = scopes
        return found


def parse_keys(raw: dict) -> dict[str, frozenset[str]]:
    keys = {}
    for key, scopes in raw.items():
        unknown = set(scopes) - set(SCOPES)
        if not isinstance(key, str) or len(key) < 16 or unknown:
            raise ValueError(f"API keys must be strings of 16+ characters with scopes from {SCOPES}")
        keys[key] = frozenset(scopes)
    return keys


def read_key_file(path: Path) -> dict[str, frozenset[str]]:
    return parse_keys(json.loads(path.read_text())) if path.is_file() else {}


def generate_key_file(path: Path) -> str:
    """One key with every scope, written so that only this user can read it."""
    key = "lorec_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({key: list(SCOPES)}, out)
    return key


def configured_keys(settings) -> dict[str, frozenset[str]]:
    """Keys from the settings and the key file together."""
    return {**parse_keys(settings.auth.api_keys), **read_key_file(settings.key_file)}


def load_keyring(settings) -> KeyRing | None:
    """The gateway's keys, generated when none is configured; None when auth is switched off."""
    if not settings.auth.enabled:
        log.warning("API keys are switched off (LOREC_AUTH_ENABLED=false): every caller has every scope")
        return None
    keys = configured_keys(settings)
    if not keys:
        if settings.key_file.exists():
            raise ValueError(f"{settings.key_file} holds no API key: add one, or remove the file to have one "
                             "generated")
        key = generate_key_file(settings.key_file)
        # Printed once to the console for the operator, never through logging.
        print(f"lorec: generated an API key with scopes {', '.join(SCOPES)} (stored in "
              f"{settings.key_file}):\n  {key}", file=sys.stderr, flush=True)
        keys = read_key_file(settings.key_file)
    return KeyRing(keys)


def client_key(settings, scope: Scope = "read") -> str | None:
    """A key for lorec's own clients (eval, benchmarks): LOREC_API_KEY, else the first with `scope`."""
    if settings.auth.client_key is not None:
        return settings.auth.client_key.get_secret_value()
    return next((k for k, scopes in configured_keys(settings).items() if scope in scopes), None)


def auth_headers(settings, scope: Scope = "read") -> dict[str, str]:
    key = client_key(settings, scope)
    return {"Authorization": f"Bearer {key}"} if key else {}


_bearer = HTTPBearer(auto_error=False)


def require(scope: Scope):
    """Route dependency: 401 without a known key, 403 when the key lacks `scope`."""

    async def check(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        keyring: KeyRing | None = request.app.state.keyring
        if keyring is None:
            return
        if credentials is None:
            raise ApiError(401, "unauthenticated", "missing bearer API key", field="Authorization")
        scopes = keyring.scopes(credentials.credentials)
        if scopes is None:
            raise ApiError(401, "unauthenticated", "unknown API key", field="Authorization")
        if scope not in scopes:
            raise ApiError(403, "forbidden", f"this API key lacks the {scope!r} scope", field="Authorization")

    return Depends(check)
