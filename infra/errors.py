"""Error types of LoRAFleet; mapped to HTTP codes and CLI exit codes in one place each."""

from __future__ import annotations


class LoRAFleetError(Exception):
    """Base of every error LoRAFleet raises on purpose. `http_status` is what the router answers."""

    http_status = 500
    code = "internal_error"


class ConfigError(LoRAFleetError):
    """A setting, env var or config file is invalid."""

    http_status = 500
    code = "config_error"


class InvalidAdapter(LoRAFleetError):
    """An adapter directory, file or field is invalid; the message names the file and field."""

    http_status = 400
    code = "invalid_adapter"


class InvalidAdapterId(InvalidAdapter):
    """An adapter id does not match `[A-Za-z0-9._-]{1,128}` or contains path parts."""

    code = "invalid_adapter_id"


class UnsupportedAdapter(InvalidAdapter):
    """A valid adapter this deployment's engine cannot run (a FLoRA or IA3 adapter on a vLLM replica, a rank above
    its max_lora_rank, a module outside vllm_lora_target_modules); the message says which and why."""

    code = "unsupported_adapter"


class AdapterTooLarge(InvalidAdapter):
    """An adapter file or upload exceeds the configured byte limit."""

    http_status = 413
    code = "adapter_too_large"


class AdapterNotFound(LoRAFleetError):
    """No adapter with this id (or version) is registered."""

    http_status = 404
    code = "adapter_not_found"


class InvalidModel(LoRAFleetError):
    """A base model directory is missing files or has an unsupported config."""

    http_status = 500
    code = "invalid_model"


class StoreUnavailable(LoRAFleetError):
    """Redis or the object store cannot be reached."""

    http_status = 503
    code = "store_unavailable"


class ReplicaUnavailable(LoRAFleetError):
    """The replica serving a request died or could not be reached (e.g. killed mid-request); safe to retry."""

    http_status = 503
    code = "replica_unavailable"


class Overloaded(LoRAFleetError):
    """Queues are full; the client should retry later."""

    http_status = 429
    code = "overloaded"


class InvalidPlacement(LoRAFleetError):
    """A routing table, operating points file, workload or placement argument is invalid."""

    http_status = 400
    code = "invalid_placement"


class PlacementInfeasible(LoRAFleetError):
    """No placement satisfies the constraints (e.g. an adapter larger than every replica's adapter memory)."""

    http_status = 503
    code = "placement_infeasible"


class PlacementConflict(LoRAFleetError):
    """Another publisher changed the routing table since it was read (compare-and-set failed)."""

    http_status = 409
    code = "placement_conflict"


class AdapterCorrupt(LoRAFleetError):
    """A stored blob of an adapter is missing or does not match its sha256 (checked on every fetch)."""

    http_status = 502
    code = "adapter_corrupt"


class VersionConflict(LoRAFleetError):
    """A concurrent push of the same adapter id registered a newer version first; this push was not made current."""

    http_status = 409
    code = "version_conflict"


class ObjectNotFound(LoRAFleetError):
    """An object store key (blob or manifest) does not exist."""

    http_status = 404
    code = "object_not_found"


class InvalidRequest(LoRAFleetError):
    """A request's own values are out of range (too many tokens, a prompt over max_model_len, bad sampling values)."""

    http_status = 400
    code = "invalid_value"


def _subclasses(cls: type[LoRAFleetError]) -> list[type[LoRAFleetError]]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def error_for_code(code: str, message: str) -> LoRAFleetError:
    """The LoRAFleetError type that owns `code` (errors cross process boundaries as code + message);
    an unknown code is a plain LoRAFleetError (500)."""
    for cls in _subclasses(LoRAFleetError):
        if cls.code == code and cls is not LoRAFleetError:
            return cls(message)
    return LoRAFleetError(message)
