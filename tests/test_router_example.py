"""examples/vllm_disagg/router.py routes prefill (max_tokens=1) before decode and relays decode's reply.

The upstreams here are small HTTP servers standing in for `vllm serve`; the engine side of
the story (a real prefill and decode engine sharing the pool) is tests/integrations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROUTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "vllm_disagg", "router.py")


def _load_router():
    spec = importlib.util.spec_from_file_location("vllm_disagg_router", ROUTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Upstream:
    """Records every request; answers like a completions endpoint (SSE when stream=true)."""

    def __init__(self, name: str, log: list, status: int = 200) -> None:
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # silence
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                log.append((name, self.path, body, time.monotonic()))
                if outer.status != 200:
                    data = b'{"error": "nope"}'
                    self.send_response(outer.status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for tok in ("a", "b", "c"):
                        self.wfile.write(f"data: {json.dumps({'text': tok, 'from': name})}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.close_connection = True
                    return
                data = json.dumps({"from": name, "max_tokens": body.get("max_tokens")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.status = status
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def rig():
    router = _load_router()
    log: list = []
    pre, dec = Upstream("prefill", log), Upstream("decode", log)
    server = router.make_server(pre.url, dec.url, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", log, pre, dec
    server.shutdown()
    server.server_close()
    pre.close()
    dec.close()


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=30)


def test_prefill_runs_first_with_one_token_then_decode_gets_the_original(rig):
    url, log, _, _ = rig
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 16}
    with _post(url + "/v1/completions", body) as r:
        reply = json.loads(r.read())
    assert reply == {"from": "decode", "max_tokens": 16}
    assert [(n, p) for n, p, _, _ in log] == [("prefill", "/v1/completions"), ("decode", "/v1/completions")]
    assert log[0][2] == {**body, "max_tokens": 1, "stream": False}
    assert log[1][2] == body


def test_streamed_decode_reply_is_relayed(rig):
    url, log, _, _ = rig
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    with _post(url + "/v1/chat/completions", body) as r:
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["text"] for e in events[:-1]] == ["a", "b", "c"]
    assert "stream_options" not in log[0][2] and log[0][2]["stream"] is False and log[0][2]["max_tokens"] == 1


def test_upstream_errors_and_unrouted_paths(rig):
    url, log, pre, _ = rig
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url + "/v1/embeddings", {"input": "x"})
    assert e.value.code == 404
    pre.status = 503
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url + "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 4})
    assert e.value.code == 503 and "prefill server" in e.value.read().decode()
    assert all(n == "prefill" for n, *_ in log)  # decode was never asked


@pytest.mark.parametrize("raw", [b"[1, 2, 3]", b'"a string"', b"42", b"null"])
def test_a_json_body_that_is_no_object_is_a_400_and_the_router_lives_on(rig, raw):
    url, log, _, _ = rig
    req = urllib.request.Request(url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "must be an object" in e.value.read().decode()
    assert log == []  # neither upstream was asked
    with _post(url + "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}) as r:  # still serving
        assert json.loads(r.read())["from"] == "decode"


def test_tokenize_goes_to_the_decode_server_only(rig):
    url, log, _, _ = rig
    for path in ("/tokenize", "/detokenize"):
        with _post(url + path, {"model": "m", "prompt": "hello"}) as r:
            assert json.loads(r.read())["from"] == "decode"
    assert [(n, p) for n, p, *_ in log] == [("decode", "/tokenize"), ("decode", "/detokenize")]


SERVE_LOCAL = os.path.join(os.path.dirname(ROUTER), "serve_local.sh")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_serve_local_fails_fast_on_a_dead_server_and_writes_nothing_here(tmp_path, where):
    """A server that cannot start (here: an interpreter without vLLM) stops the script within
    seconds with the end of its log, instead of waiting 10 minutes on health checks; logs go to
    LOG_DIR, never to the directory it was started from (the repository root included)."""
    import subprocess
    import sys

    cwd = REPO if where == "repo-root" else str(tmp_path / "cwd")
    os.makedirs(cwd, exist_ok=True)
    before = set(os.listdir(cwd))
    logs = tmp_path / "logs"
    env = dict(os.environ, MODEL="/nonexistent-model", PYTHON=sys.executable, LOG_DIR=str(logs),
               POOL=f"serve-local-test-{os.getpid()}")
    t0 = time.monotonic()
    r = subprocess.run(["bash", SERVE_LOCAL], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 60
    assert "server exited while starting" in r.stderr and "No module named" in r.stderr
    assert (logs / "kv_producer.log").exists() and set(os.listdir(cwd)) == before
