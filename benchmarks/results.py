"""The one result writer: every benchmark's raw JSON, stamped with hardware, date and the command that made it."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks/results")
HEADER_KEYS = ("benchmark", "date", "command", "hardware")


def command_line(argv: list[str] | None = None) -> str:
    """The command line of this process as a user would type it (`lorafleet ...` or `python script ...`)."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "python"
    head = ["lorafleet"] if program == "lorafleet" else ["python", argv[0]] if argv else ["python"]
    return shlex.join([*head, *argv[1:]])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, Python, torch version and threads, GPU (when torch sees one)."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "num_cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    try:
        import torch
    except ImportError:   # the store benchmark needs no torch on its own
        return info | {"torch": None}
    info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["num_gpus"] = torch.cuda.device_count()
    return info


def write_result(name: str, result: dict[str, Any], out_dir: Path | str = RESULTS_DIR,
                 command: str | None = None) -> Path:
    """Write `out_dir/<name>-<UTC timestamp>.json`: {benchmark, date, command, hardware, **result}.

    The header is also put into `result` itself (in place), so the tables printed afterwards show the same
    hardware and date as the file. `command` defaults to this process's command line.
    """
    now = dt.datetime.now(dt.UTC)
    header = {"benchmark": name, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": command_line() if command is None else command, "hardware": hardware()}
    record = header | {k: v for k, v in result.items() if k not in HEADER_KEYS}
    result.clear()
    result.update(record)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    path, n = directory / f"{name}-{stamp}.json", 1
    while path.exists():  # two runs in one second keep both files
        path, n = directory / f"{name}-{stamp}-{n}.json", n + 1
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
