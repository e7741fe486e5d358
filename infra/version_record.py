"""VersionRecord: the registry's plain-data description of one pushed adapter version (JSON in Redis and S3)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from lorafleet.infra.errors import AdapterCorrupt

# = adapter_files.CONFIG_FILE, WEIGHTS_FILE; not imported from there: that module pulls in torch, and
# `lorafleet adapters list` / the registry must stay light.
BUNDLE_FILES = ("adapter_config.json", "adapter_model.safetensors")


def bundle_sha256(files: dict[str, tuple[str, int]]) -> str:
    """One digest for a bundle: sha256 over its sorted 'name sha256' lines (changes if any file changes)."""
    lines = "".join(f"{name} {sha}\n" for name, (sha, _) in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """adapter_id@version: type, rank per target module, sizes, content hashes, when and by whom it was pushed.

    files: {file name: (sha256 hex, num_bytes)} for adapter_config.json and adapter_model.safetensors.
    """

    adapter_id: str
    version: int
    peft_type: str
    max_rank: int
    module_ranks: dict[str, int]
    files: dict[str, tuple[str, int]]
    created: float
    owner: str
    sha256: str = ""
    num_bytes: int = 0

    def __post_init__(self) -> None:
        assert self.version >= 1, f"versions start at 1, got {self.version}"
        assert set(self.files) == set(BUNDLE_FILES), f"a bundle has {BUNDLE_FILES}, got {sorted(self.files)}"
        files = {name: (str(sha), int(size)) for name, (sha, size) in self.files.items()}
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "sha256", bundle_sha256(files))
        object.__setattr__(self, "num_bytes", sum(size for _, size in files.values()))

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.module_ranks.values()))

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.module_ranks)

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = {name: [sha, size] for name, (sha, size) in self.files.items()}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionRecord:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in json.loads(raw).items() if k in known}  # newer writers may add fields
        data["files"] = {name: (sha, size) for name, (sha, size) in data["files"].items()}
        stored_sha = data.pop("sha256", None)
        data.pop("num_bytes", None)
        record = cls(**data)
        if stored_sha not in (None, record.sha256):
            raise AdapterCorrupt(f"adapter '{record.adapter_id}' version {record.version}: registry record's "
                                 f"bundle sha256 does not match its files")
        return record

    def summary(self) -> dict:
        """Plain data for CLIs and the admin API."""
        return {
            "adapter_id": self.adapter_id, "version": self.version, "peft_type": self.peft_type,
            "max_rank": self.max_rank, "ranks": self.ranks, "module_ranks": dict(sorted(self.module_ranks.items())),
            "num_bytes": self.num_bytes, "sha256": self.sha256, "created": self.created, "owner": self.owner,
            "files": {name: {"sha256": sha, "num_bytes": size} for name, (sha, size) in sorted(self.files.items())},
        }
