"""lorafleet.infra: adapter formats and validation, adapter sources and store, config, errors.

Kept light on purpose: placement imports infra and must never pull in torch, and the GPU box has no
pydantic. Import from the submodules: `lorafleet.infra.adapters` (torch), `lorafleet.infra.config` (pydantic).
"""

from lorafleet.infra.errors import (
    AdapterNotFound,
    AdapterTooLarge,
    ConfigError,
    InvalidAdapter,
    InvalidAdapterId,
    InvalidModel,
    LoRAFleetError,
    Overloaded,
    ReplicaUnavailable,
    StoreUnavailable,
)

__all__ = [
    "AdapterNotFound",
    "AdapterTooLarge",
    "ConfigError",
    "InvalidAdapter",
    "InvalidAdapterId",
    "InvalidModel",
    "LoRAFleetError",
    "Overloaded",
    "ReplicaUnavailable",
    "StoreUnavailable",
]
