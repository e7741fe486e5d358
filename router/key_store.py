"""The Redis hash of API keys, `{prefix}:api_keys`: sha256 hex of each key -> its scope; keys are never stored."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from lorafleet.infra.adapter_ids import validate_adapter_id
from lorafleet.infra.errors import LoRAFleetError
from lorafleet.infra.redis_conn import unavailable_as_error

KEY_BYTES = 32   # secrets.token_urlsafe(32): 256 random bits in 43 characters
MIN_PREFIX_CHARS = 4
MAX_NAME_CHARS = 64
_DIGEST = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX_CHARS},64}}")


class ApiKeyNotFound(LoRAFleetError):
    """No stored API key has this digest prefix."""

    http_status = 404
    code = "api_key_not_found"


class AmbiguousKeyPrefix(LoRAFleetError):
    """More than one stored API key has this digest prefix."""

    http_status = 409
    code = "ambiguous_key_prefix"


def key_digest(key: str | bytes) -> str:
    """sha256 hex of a key: the hash field that stands for it (a Redis dump or MONITOR shows no key)."""
    data = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key: `adapter_ids` None = every adapter, () = the base model only."""

    digest: str
    adapter_ids: tuple[str, ...] | None
    name: str = ""
    created: float | None = None

    def to_json(self) -> str:
        scope = "*" if self.adapter_ids is None else list(self.adapter_ids)
        return json.dumps({"adapters": scope, "name": self.name, "created": self.created})

    @classmethod
    def from_json(cls, digest: str, raw: bytes | str) -> KeyRecord:
        """A value `"*"`, `[adapter ids]` or {"adapters": either, "name": str, "created": unix time}; ValueError
        otherwise (its message never quotes the value)."""
        value = json.loads(raw)
        name, created = "", None
        if isinstance(value, dict):
            name, created, value = value.get("name") or "", value.get("created"), value.get("adapters")
            if not isinstance(name, str) or not (created is None or isinstance(created, int | float)):
                raise ValueError("'name' must be a string and 'created' a number")
        if value == "*":
            return cls(digest, None, name, created)
        if isinstance(value, list) and all(isinstance(a, str) for a in value):
            return cls(digest, tuple(value), name, created)
        raise ValueError('the scope must be "*" or a list of adapter ids')

    def scope(self) -> str:
        """'*', 'a,b', or '(base model only)'."""
        if self.adapter_ids is None:
            return "*"
        return ",".join(self.adapter_ids) or "(base model only)"


def parse_keys(raw: dict[bytes, bytes], hash_key: str) -> tuple[list[KeyRecord], list[str]]:
    """The valid records of an HGETALL answer (oldest first), and one line per entry skipped. A line names a digest
    by its first 12 characters, and never a field that is not a digest: that may be a key stored by mistake."""
    records, problems, num_bad_fields = [], [], 0
    for field, value in raw.items():
        digest = field.decode("ascii", "replace")
        if not _DIGEST.fullmatch(digest):
            num_bad_fields += 1
            continue
        try:
            records.append(KeyRecord.from_json(digest, value))
        except (ValueError, TypeError) as exc:   # bad JSON (UnicodeDecodeError is a ValueError too) or bad scope
            problems.append(f"API key {digest[:12]} in {hash_key} skipped: {exc.__class__.__name__}: {exc}")
    if num_bad_fields:
        problems.append(f"{num_bad_fields} field(s) of {hash_key} skipped: not a sha256 hex digest (store the "
                        "digest of a key, never the key: `lorafleet keys add`)")
    records.sort(key=lambda r: (r.created or 0.0, r.digest))
    return records, problems


class ApiKeyStore:
    """Adds, lists and removes keys in `{prefix}:api_keys`; Redis down = StoreUnavailable."""

    def __init__(self, redis_client: Any, prefix: str) -> None:
        self.redis, self.hash_key = redis_client, f"{prefix}:api_keys"

    def read(self) -> dict[bytes, bytes]:
        """The raw hash (one HGETALL)."""
        with unavailable_as_error(self.redis, "API keys (read)"):
            return self.redis.hgetall(self.hash_key)

    def load(self) -> tuple[list[KeyRecord], list[str]]:
        """Every valid record, and one line per entry skipped (see parse_keys)."""
        return parse_keys(self.read(), self.hash_key)

    def add(self, adapter_ids: list[str] | None, name: str = "") -> tuple[str, KeyRecord]:
        """A new random key bound to `adapter_ids` (None = all): returns the key, which only its caller ever sees."""
        ids = None if adapter_ids is None else tuple(dict.fromkeys(validate_adapter_id(a) for a in adapter_ids))
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ValueError(f"a key name has at most {MAX_NAME_CHARS} printable characters")
        key = secrets.token_urlsafe(KEY_BYTES)
        record = KeyRecord(key_digest(key), ids, name, round(time.time(), 3))
        with unavailable_as_error(self.redis, "API keys (add)"):
            self.redis.hset(self.hash_key, record.digest, record.to_json())
        return key, record

    def remove(self, digest_prefix: str) -> str:
        """Delete the one key whose digest starts with `digest_prefix`; returns its digest."""
        prefix = digest_prefix.strip().lower()
        if not _PREFIX.fullmatch(prefix):   # not echoed: it might be the key itself, given by mistake
            raise ApiKeyNotFound(f"not a digest prefix: give {MIN_PREFIX_CHARS} to 64 hex characters from the DIGEST "
                                 "column of `lorafleet keys list` (never the key itself)")
        with unavailable_as_error(self.redis, "API keys (remove)"):
            fields = [f.decode("ascii", "replace") for f in self.redis.hkeys(self.hash_key)]
            matches = [f for f in fields if f.startswith(prefix)]
            if not matches:
                raise ApiKeyNotFound(f"no API key with digest prefix '{prefix}'")
            if len(matches) > 1:
                raise AmbiguousKeyPrefix(f"digest prefix '{prefix}' matches {len(matches)} API keys; give more "
                                         "characters")
            self.redis.hdel(self.hash_key, matches[0])
        return matches[0]
