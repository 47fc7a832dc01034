"""Driver side of an engine process (pykvshm.vllm_demo.engine) started in the vLLM environment."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable

from ..integrations.vllm_env import group_segments, shm_segments, stop_group


class EngineError(RuntimeError):
    pass


class Engine:
    """One vLLM engine in its own process group; requests in, completion events out."""

    def __init__(self, name: str, python: str, config: dict[str, Any], env: dict[str, str], log_path: str,
                 on_done: Callable[[str, dict[str, Any]], None]) -> None:
        self.name = name
        self._on_done = on_done
        fd, self._config_path = tempfile.mkstemp(prefix=f"pykvshm-demo-{name}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        self.log_path = log_path
        self._shm_before = shm_segments()
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(
            [python, "-m", "pykvshm.vllm_demo.engine", self._config_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **env}, start_new_session=True, cwd=os.path.dirname(log_path),
        )
        self._ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self.start_s: float | None = None
        self.error: str | None = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = ev.get("event")
            if kind in ("ready", "stopped"):
                self._ready.put(ev)
            elif kind == "error":
                self.error = ev.get("error")
                self._ready.put(ev)
            elif kind == "done":
                self._on_done(self.name, ev)
        self._ready.put({"event": "exited"})

    def wait_ready(self, timeout: float) -> float:
        try:
            ev = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise EngineError(f"engine {self.name} not ready after {timeout:.0f} s; log: {self.log_path}") from None
        if ev.get("event") != "ready":
            raise EngineError(f"engine {self.name} failed to start ({ev.get('error') or 'exited'}); "
                              f"log tail:\n{self.log_tail()}")
        self.start_s = float(ev["start_s"])
        return self.start_s

    def submit(self, rid: str, prompt: list[int], max_tokens: int, kv_transfer_params: dict[str, Any] | None = None) -> None:
        cmd = {"op": "generate", "rid": rid, "prompt": prompt, "max_tokens": max_tokens,
               "kv_transfer_params": kv_transfer_params}
        with self._lock:
            if self._proc.poll() is not None or self._proc.stdin is None:
                raise EngineError(f"engine {self.name} has exited; log tail:\n{self.log_tail()}")
            self._proc.stdin.write(json.dumps(cmd) + "\n")
            self._proc.stdin.flush()

    def alive(self) -> bool:
        return self._proc.poll() is None and self.error is None

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the engine to finish and exit; then kill its whole process group (EngineCore too)."""
        owned = group_segments(self._proc.pid)  # what it holds now, in case it dies before the kill
        try:
            with self._lock:
                if self._proc.poll() is None and self._proc.stdin is not None:
                    self._proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                    self._proc.stdin.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    ev = self._ready.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if ev.get("event") in ("stopped", "exited", "error"):
                    break
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                self._proc.wait(timeout=10)  # let it exit on its own: vLLM cleans up its shared memory
            except subprocess.TimeoutExpired:
                pass
            stop_group(self._proc.pid, self._shm_before, owned)  # EngineCore and workers outlive their parent
            self._proc.wait()
            self._log.close()
            try:
                os.unlink(self._config_path)
            except OSError:
                pass

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""
