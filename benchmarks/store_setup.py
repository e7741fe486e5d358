"""What the store benchmark measures with: Llama-7B-shaped adapters, a local S3 server, raw readers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lorafleet.infra.base_spec import TARGET_MODULES, BaseModelSpec
from lorafleet.infra.version_record import BUNDLE_FILES

CONFIG_FILE, WEIGHTS_FILE = BUNDLE_FILES
# Llama-2-7B: d_model 4096, d_ff 11008, 32 layers, 32 heads (no GQA).
LLAMA_7B_CONFIG = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32}


@dataclass(frozen=True, slots=True)
class AdapterPreset:
    rank: int
    targets: tuple[str, ...]


# rank 8 on q,k,v,o = 16 MiB in fp16; rank 64 on every linear = 305 MiB in fp16; r1-q (0.5 MiB) for smoke tests.
PRESETS: dict[str, AdapterPreset] = {
    "r8-qkvo": AdapterPreset(8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "r64-all": AdapterPreset(64, tuple(TARGET_MODULES)),
    "r1-q": AdapterPreset(1, ("q_proj",)),
}


def llama7b_spec() -> BaseModelSpec:
    return BaseModelSpec.from_config(LLAMA_7B_CONFIG, source="llama-7b shapes")


def make_llama7b_adapter(preset: AdapterPreset, seed: int = 0) -> dict[str, bytes]:
    """A PEFT LoRA bundle {adapter_config.json, adapter_model.safetensors} in fp16 for Llama-7B shapes."""
    import torch
    from safetensors.torch import save

    spec = llama7b_spec()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for name in preset.targets:
            d_out, d_in = spec.module_shapes[name]
            key = f"base_model.model.model.layers.{layer}.{TARGET_MODULES[name]}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(preset.rank, d_in, generator=gen) * 0.02).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, preset.rank, generator=gen) * 0.02).half()
    config = {"peft_type": "LORA", "r": preset.rank, "lora_alpha": 2 * preset.rank, "target_modules":
              list(preset.targets), "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "llama-7b"}
    return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServerProcess:
    """A local S3-compatible HTTP server (moto's `moto_server`) in its own process, so it does not share the
    benchmark's GIL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str | None:
        local = Path(sys.executable).parent / "moto_server"
        return str(local) if local.exists() else shutil.which("moto_server")

    def start(self) -> MotoServerProcess:
        binary = self.binary()
        assert binary is not None, "moto_server not installed (pip install 'moto[server]')"
        self.proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)  # noqa: S310 - our own local server
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def s3_client(endpoint: str):
    """A boto3 S3 client for a local server (dummy credentials unless the environment has real ones)."""
    import boto3
    from botocore.config import Config

    creds = {} if os.environ.get("AWS_ACCESS_KEY_ID") else {"aws_access_key_id": "bench",
                                                            "aws_secret_access_key": "bench"}
    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                        config=Config(max_pool_connections=64, retries={"max_attempts": 2}), **creds)


def drop_page_cache(paths: list[Path]) -> None:
    """Evict files from the OS page cache (clean pages; no root needed) so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def redis_cli_get(host: str, port: int, keys: list[str]) -> None:
    """The raw baseline for Redis: `redis-cli --raw GET key > /dev/null` (a fresh process and connection)."""
    for key in keys:
        subprocess.run(["redis-cli", "-h", host, "-p", str(port), "--raw", "GET", key], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

