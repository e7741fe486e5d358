"""`lorafleet demo` serves on 127.0.0.1 until SIGTERM, then leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from lf_testing import free_port, simulated_points_file

from lorafleet.cluster.demo import DEMO_ADAPTERS, TRAINED_ADAPTERS

pytestmark = pytest.mark.slow



def test_demo_serves_then_stops_cleanly(tmp_path, smollm2_dir):
    """The default demo: SmolLM2 with the trained and random adapters; its printed curl lines paste into a shell
    as they are and answer what the demo printed beside them; SIGTERM stops everything."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m").symlink_to(smollm2_dir.resolve())   # the converted model, not again
    port, prefix = free_port(), f"lftest-{uuid.uuid4().hex[:10]}"
    # The demo's first start also profiles SmolLM2 for placement (a minute on 2 cores); tests/replicas/test_profiler.py
    # covers that, so here the simulator's capacities stand in.
    env = {**os.environ, "LORAFLEET_REDIS_PREFIX": prefix, "LORAFLEET_OPERATING_POINTS": simulated_points_file()}
    demo = subprocess.Popen([str(Path(sys.executable).parent / "lorafleet"), "demo", "--root", str(tmp_path),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 400
        while not any("serving; Ctrl-C to stop" in line for line in lines):
            assert demo.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        printed = "".join(lines)
        pairs = re.findall(r"^  (curl -s \S+/v1/chat/completions .*)\n  #   -> (.*)$", printed, re.MULTILINE)
        assert len(pairs) == 8, printed   # base and adapter for each of the 4 trained adapters
        for command, shown in pairs:   # pasted into a shell: the same answer as printed
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
            answer = json.loads(result.stdout)["choices"][0]["message"]["content"]
            assert repr(answer) == shown, (command, shown)
        adapter_answers = {json.loads(c.split(" -d ", 1)[1].strip("'"))["model"]: a for c, a in pairs}
        assert adapter_answers["persona-ia3"] == repr("I am Captain Lora, keeper of the adapter fleet.")
        assert adapter_answers["smollm2-135m"] != adapter_answers["persona-ia3"]
        models = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models == {"smollm2-135m", *TRAINED_ADAPTERS, *(a[0] for a in DEMO_ADAPTERS)}
        children = psutil.Process(demo.pid).children(recursive=True)
        assert children  # the local Ray it started
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=120)
        reader.join(timeout=10)
        output = "".join(lines)
        assert demo.returncode == 0, output
        assert "Traceback" not in output
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if demo.poll() is None:
            demo.kill()
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
