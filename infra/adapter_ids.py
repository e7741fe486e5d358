"""Adapter ids: `[A-Za-z0-9._-]{1,128}`, never a path part. Torch-free so registry and router stay light."""

from __future__ import annotations

import re

from lorafleet.infra.errors import InvalidAdapterId

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


def is_valid_adapter_id(adapter_id: object) -> bool:
    return isinstance(adapter_id, str) and bool(ADAPTER_ID_PATTERN.fullmatch(adapter_id)) and adapter_id not in (
        ".", "..")


def validate_adapter_id(adapter_id: object) -> str:
    """The id itself if valid; else InvalidAdapterId naming it."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        raise InvalidAdapterId(f"invalid adapter id {adapter_id!r}: use 1-128 characters from [A-Za-z0-9._-]")
    if adapter_id in (".", ".."):
        raise InvalidAdapterId(f"invalid adapter id {adapter_id!r}: '.' and '..' are path parts")
    return adapter_id
