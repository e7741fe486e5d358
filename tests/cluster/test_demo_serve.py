"""`lorafleet demo` serves on 127.0.0.1 until SIGTERM, then leaves no process behind."""

from __future__ import annotations

import os
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
from lf_testing import free_port

pytestmark = pytest.mark.slow



def test_demo_serves_then_stops_cleanly(tmp_path):
    port, prefix = free_port(), f"lftest-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "LORAFLEET_REDIS_PREFIX": prefix}
    demo = subprocess.Popen([str(Path(sys.executable).parent / "lorafleet"), "demo", "--root", str(tmp_path),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("serving; Ctrl-C to stop" in line for line in lines):
            assert demo.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"model": "sql-lora-r8", "prompt": "SELECT", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        assert len(httpx.get(f"{url}/v1/models").json()["data"]) == 21
        children = psutil.Process(demo.pid).children(recursive=True)
        assert children  # the local Ray it started
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=120)
        reader.join(timeout=10)
        output = "".join(lines)
        assert demo.returncode == 0, output
        assert "curl" in output and "Traceback" not in output
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
