"""The pieces of `pykvshm demo --workload multiturn|rag` that run without vLLM: the cache-unaware router,
the servers' counters, the root cause of a server that cannot start, and the offline tokenizer.

The workloads themselves, on real vLLM servers, are tests/integrations/test_vllm_workloads.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pykvshm.vllm_demo.servers import Router, parse_counters, root_cause, shm_race


class Backend:
    """A completions endpoint that says who it is (server-sent events when stream=true)."""

    def __init__(self, name: str) -> None:
        outer = self
        self.paths: list[str] = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                self._reply(json.dumps({"from": name}).encode(), "application/json")

            def do_POST(self):
                outer.paths.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if body.get("stream"):
                    data = b"".join(f"data: {json.dumps({'from': name, 'i': i})}\n\n".encode() for i in range(3))
                    self._reply(data + b"data: [DONE]\n\n", "text/event-stream")
                else:
                    self._reply(json.dumps({"from": name, "prompt": body.get("prompt")}).encode(), "application/json")

            def _reply(self, data: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends():
    bs = [Backend("a"), Backend("b")]
    yield bs
    for b in bs:
        b.close()


def _post(url: str, body: object, headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def test_round_robin_alternates_and_records_each_conversations_servers(backends) -> None:
    router = Router([b.url for b in backends], "round_robin").start()
    try:
        got = [json.loads(_post(router.url + "/v1/completions", {"prompt": "x"},
                                {"X-Conversation": f"c{i % 2}"}))["from"] for i in range(6)]
        assert got == ["a", "b", "a", "b", "a", "b"]
        # c0 got turns 0, 2, 4 -> a, a, a; c1 -> b, b, b: no follow-up moved.
        assert router.turns == {"c0": [0, 0, 0], "c1": [1, 1, 1]} and router.moved_share() == 0.0
        _post(router.url + "/v1/completions", {"prompt": "x"}, {"X-Conversation": "c0"})  # lands on a again
        _post(router.url + "/v1/completions", {"prompt": "x"}, {"X-Conversation": "c0"})  # on b: moved
        assert router.turns["c0"] == [0, 0, 0, 0, 1]
        assert router.moved_share() == pytest.approx(1 / 6)
        assert router.served == [4, 4] and router.inflight == [0, 0]
        # Streaming is relayed; other paths go to the first server.
        stream = _post(router.url + "/v1/completions", {"prompt": "x", "stream": True}).decode()
        assert stream.count("data: ") == 4 and stream.endswith("data: [DONE]\n\n")
        with urllib.request.urlopen(router.url + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["from"] == "a"
        assert json.loads(_post(router.url + "/tokenize", {"prompt": "x"}))["from"] == "a"
    finally:
        router.shutdown()
        router.server_close()


def test_least_loaded_skips_a_busy_server(backends) -> None:
    router = Router([b.url for b in backends], "least_loaded")
    try:
        router.inflight = [1, 0]  # a is busy
        assert [router.pick(None) for _ in range(2)] == [1, 0]  # b first, then a (now both at 1), in turn
    finally:
        router.server_close()


def test_router_misuse_and_dead_backend() -> None:
    with pytest.raises(ValueError, match="routing policy"):
        Router(["http://127.0.0.1:1"], "cache_aware")
    with pytest.raises(ValueError, match="at least one backend"):
        Router([], "round_robin")
    dead = Backend("dead")
    url = dead.url
    dead.close()
    router = Router([url]).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(router.url + "/v1/completions", {"prompt": "x"})
        assert e.value.code == 502 and "unreachable" in e.value.read().decode()
        deadline = time.monotonic() + 10
        while router.inflight != [0] and time.monotonic() < deadline:  # the handler ends after its reply
            time.sleep(0.01)
        assert router.inflight == [0]  # released on failure too
    finally:
        router.shutdown()
        router.server_close()


def test_counters_are_summed_over_label_sets_and_junk_is_ignored() -> None:
    text = "\n".join([
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 1200.0',
        'vllm:prompt_tokens_total{engine="1",model_name="m"} 300.0',
        'vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 640.0',
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 512.0',
        "vllm:prefix_cache_hits_total not-a-number",
        'vllm:prompt_tokens_by_source_total{source="local_compute"} 99.0',
    ])
    c = parse_counters(text)
    assert c["vllm:prompt_tokens_total"] == 1500.0
    assert c["vllm:prompt_tokens_cached_total"] == 640.0
    assert c["vllm:external_prefix_cache_hits_total"] == 512.0
    assert c["vllm:prefix_cache_hits_total"] == 0.0 and "vllm:prompt_tokens_by_source_total" not in c


def test_root_cause_skips_warnings_and_vllms_wrapper() -> None:
    log = "\n".join([
        "(APIServer pid=1) WARNING [system_utils.py:255] ... fd limit errors like `OSError: [Errno 24] Too many open files`.",
        "(EngineCore pid=2) ERROR [core.py:1510] RuntimeError: Worker failed with error 'CPU Offloading is "
        "currently only supported on CUDA-alike and XPU GPUs', please check the stack trace above for the root cause",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    assert root_cause(log).startswith("RuntimeError: Worker failed with error 'CPU Offloading is currently only")
    assert root_cause("nothing wrong here\n") == ""


_SPAWN_AFTER_UNLINK = """
import multiprocessing as mp, os

def use(lock):
    with lock:
        pass

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    os.unlink("/dev/shm/sem." + lock._semlock.name.lstrip("/"))  # as another session's clean-up did
    p = ctx.Process(target=use, args=(lock,))
    p.start()
    p.join()
    open("/no/such/model/config.json")  # the error a broken alternative itself would raise
"""


def test_a_server_killed_by_another_sessions_shm_clean_up_is_told_apart(tmp_path) -> None:
    """The real traceback of a spawned child whose semaphore was unlinked before it opened it (how
    `offload` and `lmcache` once failed) is recognised, so the demo restarts that alternative and
    records its own error; an alternative's own FileNotFoundError is not mistaken for it."""
    script = tmp_path / "race.py"
    script.write_text(_SPAWN_AFTER_UNLINK)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "SemLock._rebuild" in r.stderr and r.returncode != 0
    assert shm_race(r.stderr)
    own = [t for t in r.stderr.split("Traceback") if "config.json" in t]  # the parent's own error only
    assert len(own) == 1 and not shm_race(own[0])
    assert not shm_race("FileNotFoundError: [Errno 2] No such file or directory: 'model/config.json'\n")


def test_offline_tokenizer_round_trips_and_keeps_history_a_prefix(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from pykvshm.vllm_demo.model import VOCAB, words, write_tokenizer

    ws = words(VOCAB - 3)
    assert len(set(ws)) == len(ws) == VOCAB - 3
    write_tokenizer(str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == VOCAB
    history = " ".join(ws[100:400])
    ids = tok.encode(history, add_special_tokens=False)
    assert ids == list(range(103, 403))  # one word, one token
    assert tok.decode(ids) == history  # decoded with single spaces: re-encodes to the same ids
    turn = tok.encode(history + " " + " ".join(ws[7:20]), add_special_tokens=False)
    assert turn[: len(ids)] == ids  # the next turn's prompt starts with the history's tokens


def test_workloads_without_a_vllm_environment_say_so(tmp_path) -> None:
    env = {"PYKVSHM_VLLM_PYTHON": str(tmp_path / "no-such-python"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "pykvshm", "demo", "--workload", "rag", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "--workload rag: error" in r.stderr and "setup_vllm_env.sh" in r.stderr


def test_rag_refuses_a_server_cache_that_cannot_hold_one_request(tmp_path, capsys) -> None:
    """vLLM would refuse to start (it keeps one block back); the demo says what to give instead."""
    import argparse

    from pykvshm.vllm_demo.command import add_arguments
    from pykvshm.vllm_demo.workloads import main

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--workload", "rag", "--kv-blocks", "64", "--out", str(tmp_path / "o")])
    args.engine_version = "test"
    assert main(args, sys.executable) == 2
    out = capsys.readouterr().out
    assert "--kv-blocks 64 cannot hold one 2048-token request" in out and "at least 65" in out
    assert not (tmp_path / "o").exists()  # refused before writing anything
