"""Locust workload for LoRAFleet: open-loop Poisson arrivals, Zipf adapter popularity, streaming OpenAI requests.

One `ArrivalScheduler` user replays a LoadPlan (see load_plan.py): at each planned arrival time it spawns a greenlet
that sends the request, whether or not earlier ones have finished (open loop: a slow server builds a queue
instead of slowing the clients down). Each streamed request fires three Locust metrics:
  POST  /v1/completions | /v1/chat/completions   end-to-end latency (failures counted here)
  TTFT  <rank class>                              time to first token
  TPOT  <rank class>                              (last token time - first token time) / (tokens - 1)
and appends one JSON line per request to LORAFLEET_LOADTEST_RECORDS, which the report reads.

Standalone: `locust -f loadtests/locustfile.py --host http://127.0.0.1:8000` builds a plan from the
LORAFLEET_LOADTEST_* variables (RATE, DURATION_S, ADAPTERS, ZIPF, SEED) and the server's /v1/models.
"""

from __future__ import annotations

import json
import os
import time

import gevent
import requests
from gevent.pool import Group
from locust import User, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC
from requests.adapters import HTTPAdapter

from lorafleet.loadtests.load_plan import LoadPlan, PlannedRequest, prompt_text, rank_class

PLAN_ENV, RECORDS_ENV = "LORAFLEET_LOADTEST_PLAN", "LORAFLEET_LOADTEST_RECORDS"
DRAIN_ENV, TIMEOUT_ENV = "LORAFLEET_LOADTEST_DRAIN_S", "LORAFLEET_LOADTEST_TIMEOUT_S"


class RecordLog:
    """One JSON line per finished request; written synchronously (no gevent switch), so a record exists
    exactly when Locust's POST event was fired."""

    def __init__(self, path: str | None) -> None:
        self.file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed on quitting

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _load_plan(host: str) -> LoadPlan:
    if os.environ.get(PLAN_ENV):
        return LoadPlan.from_json(os.environ[PLAN_ENV])
    from lorafleet.loadtests.runner import plan_for_host

    env = os.environ.get
    return plan_for_host(host, rate=float(env("LORAFLEET_LOADTEST_RATE", "4")),
                         duration_s=float(env("LORAFLEET_LOADTEST_DURATION_S", "60")),
                         num_adapters=int(env("LORAFLEET_LOADTEST_ADAPTERS", "20")),
                         zipf=float(env("LORAFLEET_LOADTEST_ZIPF", "1.1")),
                         seed=int(env("LORAFLEET_LOADTEST_SEED", "0")))


def _body(req: PlannedRequest) -> dict:
    prompt = prompt_text(req.prompt_tokens, req.seed)
    body = {"model": req.adapter_id, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True}
    if req.is_chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict, is_chat: bool) -> str:
    choices = chunk.get("choices") or [{}]
    if is_chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


class ArrivalScheduler(User):
    """Replays the plan's arrivals; run it with exactly one user (`-u 1`): the plan already holds the rate."""

    fixed_count = 1

    def on_start(self) -> None:
        self.plan = _load_plan(self.host)
        self.log = RecordLog(os.environ.get(RECORDS_ENV))
        self.timeout_s = float(os.environ.get(TIMEOUT_ENV, "120"))
        self.session = requests.Session()
        # One pooled connection per concurrent request; open loop can have many in flight.
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=512))
        self.in_flight = Group()

    def on_stop(self) -> None:
        self.in_flight.kill(block=True, timeout=5)
        self.log.close()

    @task
    def replay(self) -> None:
        start = time.monotonic()
        for req in self.plan.requests:
            delay = req.arrival_s - (time.monotonic() - start)
            if delay > 0:
                gevent.sleep(delay)
            self.in_flight.spawn(self.send, req)
        self.in_flight.join(timeout=float(os.environ.get(DRAIN_ENV, "30")))
        options = self.environment.parsed_options
        if self.environment.runner is not None and options is not None and options.headless:
            # Locust's --csv files are snapshots rewritten every CSV_STATS_INTERVAL_SEC, not at quit:
            # wait for two more writes so the CSV holds the final counts.
            gevent.sleep(2 * CSV_STATS_INTERVAL_SEC + 0.5)
            self.environment.runner.quit()  # headless: the plan is done, so is the test
        raise StopUser()

    def send(self, req: PlannedRequest) -> None:
        path = "/v1/chat/completions" if req.is_chat else "/v1/completions"
        klass = rank_class(req.rank)
        started, wall = time.perf_counter(), time.time()
        first = last = None
        num_chunks, num_bytes, usage, error, status = 0, 0, {}, None, 0
        try:
            with self.session.post(self.host.rstrip("/") + path, json=_body(req), stream=True,
                                   timeout=self.timeout_s) as response:
                status = response.status_code
                if status != 200:
                    error = f"HTTP {status}: {response.text[:200]}"
                else:
                    for line in response.iter_lines():
                        num_bytes += len(line)
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = f"in-stream error: {chunk['error'].get('message', '')[:200]}"
                            break
                        now = time.perf_counter()
                        if _chunk_text(chunk, req.is_chat) or first is None:
                            first = now if first is None else first
                            last, num_chunks = now, num_chunks + 1
                        usage = chunk.get("usage") or usage
                    if error is None and first is None:
                        error = "stream ended without a token"
        except (requests.RequestException, ValueError) as exc:
            error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        latency = time.perf_counter() - started
        num_tokens = int(usage.get("completion_tokens") or num_chunks)
        ttft = first - started if first is not None else None
        tpot = (last - first) / (num_tokens - 1) if first is not None and num_tokens > 1 else None
        self.log.write({"t": wall, "endpoint": path, "adapter": req.adapter_id, "rank": req.rank,
                        "rank_class": klass, "ok": error is None, "status": status, "error": error,
                        "latency_s": latency, "ttft_s": ttft, "tpot_s": tpot,
                        "prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": num_tokens})
        self._fire("POST", path, latency, num_bytes, RuntimeError(error) if error else None)
        if error is None and ttft is not None:
            self._fire("TTFT", klass, ttft, 0, None)
        if error is None and tpot is not None:
            self._fire("TPOT", klass, tpot, 0, None)

    def _fire(self, kind: str, name: str, seconds: float, length: int, exception: Exception | None) -> None:
        events.request.fire(request_type=kind, name=name, response_time=seconds * 1000.0,
                            response_length=length, exception=exception, context={})
