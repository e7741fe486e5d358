"""File-level checks of an adapter directory: which files, their size, and a safe safetensors read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from lorafleet.infra.errors import AdapterTooLarge, InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Pickle-based formats can run code on load: refused outright, whatever they are named.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
IGNORED_FILES = ("README.md", ".gitattributes")
MAX_CONFIG_BYTES = 1 << 20
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def read_adapter_dir(path: str | Path, max_bytes: int) -> dict[str, bytes]:
    """{file name: bytes} of an adapter directory after checking its file list and sizes."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidAdapter(f"{root}: adapter directory not found")
    names = sorted(p.name for p in root.iterdir())
    for name in names:
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidAdapter(f"{root / name}: pickle files are refused (unsafe); save with safetensors")
    for name in names:
        if name not in (CONFIG_FILE, WEIGHTS_FILE, *IGNORED_FILES):
            raise InvalidAdapter(
                f"{root / name}: unexpected file; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    files: dict[str, bytes] = {}
    for name, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (WEIGHTS_FILE, max_bytes)):
        file = root / name
        if not file.is_file():
            raise InvalidAdapter(f"{file}: missing (an adapter needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        size = file.stat().st_size
        if size > limit:
            raise AdapterTooLarge(f"{file}: {size} bytes is over the limit of {limit} bytes")
        files[name] = file.read_bytes()
    return files


def parse_config(data: bytes, source: str) -> dict:
    """adapter_config.json as a dict; InvalidAdapter if it is not a JSON object."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterTooLarge(f"{source}: {len(data)} bytes is over the limit of {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{source}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{source}: top level must be a JSON object")
    return config


def parse_safetensors(data: bytes, source: str, max_bytes: int, *, check_finite: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors blob, header checked first (dtype, shape, offsets) so bad files fail clearly.
    `check_finite=False` skips the NaN/Inf scan (the costly part), for bytes already validated once."""
    if len(data) > max_bytes:
        raise AdapterTooLarge(f"{source}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    if len(data) < 8:
        raise InvalidAdapter(f"{source}: truncated safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise InvalidAdapter(f"{source}: truncated safetensors file (header says {header_len} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidAdapter(f"{source}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{source}: corrupt safetensors header")
    body_len = len(data) - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise InvalidAdapter(f"{source}: tensor '{name}': corrupt header entry")
        dtype = info.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise InvalidAdapter(
                f"{source}: tensor '{name}': unsupported dtype {dtype!r} (use {', '.join(SAFETENSORS_DTYPES)})"
            )
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidAdapter(f"{source}: tensor '{name}': corrupt data_offsets")
        if not 0 <= offsets[0] <= offsets[1] <= body_len:
            raise InvalidAdapter(f"{source}: tensor '{name}': data past the end of the file (truncated?)")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # the Rust parser raises its own SafetensorError and ValueErrors
        raise InvalidAdapter(f"{source}: corrupt safetensors file ({exc})") from None
    for name, tensor in tensors.items():
        if check_finite and not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"{source}: tensor '{name}': contains NaN or Inf")
    return tensors
