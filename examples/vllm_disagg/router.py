#!/usr/bin/env python3
"""A minimal prefill -> decode router for two `vllm serve` instances sharing a pykvshm pool.

    python router.py --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000

For each OpenAI completions or chat request it first sends the same request to the prefill
server with max_tokens=1 (so prefill computes the prompt's KV and PykvshmConnector saves it
into the pool), then forwards the original request to the decode server and relays its
response (streamed or not). The decode engine finds the prompt's blocks in the pool by their
prefix hashes; no transfer handles travel through the router, and a decode instance may serve
a request whose prefill ran on any prefill instance that maps the pool.

Standard library only; one thread per request. Not hardened for production (no retries,
no auth, no load balancing across several prefill or decode servers).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROUTED = ("/v1/completions", "/v1/chat/completions")
# Answered by the decode server alone (no KV involved): what benchmark clients ask besides completions.
PASSED = ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize")


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request the prefill server gets: same prompt, one token, no streaming."""
    pre = dict(body, max_tokens=1, stream=False)
    pre.pop("max_completion_tokens", None)
    pre.pop("stream_options", None)
    return pre


class Router(BaseHTTPRequestHandler):
    prefill_url = ""
    decode_url = ""
    timeout = 600.0

    def log_message(self, fmt: str, *args: Any) -> None:  # quieter than the default
        sys.stderr.write("router: " + fmt % args + "\n")

    def _send_error(self, code: int, msg: str) -> None:
        data = json.dumps({"error": {"message": msg, "code": code}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # /v1/models, /health: ask the decode server
        try:
            with urllib.request.urlopen(self.decode_url + self.path, timeout=self.timeout) as r:
                data = r.read()
                self.send_response(r.status)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        except urllib.error.URLError as e:
            self._send_error(502, f"decode server unreachable: {e}")

    def do_POST(self) -> None:
        if self.path not in ROUTED and self.path not in PASSED:
            self._send_error(404, f"not routed: {self.path}")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except (ValueError, json.JSONDecodeError) as e:
            self._send_error(400, f"bad JSON body: {e}")
            return
        if not isinstance(body, dict):
            self._send_error(400, f"the JSON body must be an object, got {type(body).__name__}")
            return
        if self.path in PASSED:
            self._relay(self._call("decode", self.decode_url, body), stream=False)
            return
        prefill = self._call("prefill", self.prefill_url, prefill_request(body))
        if prefill is None:
            return
        with prefill:
            prefill.read()
        self._relay(self._call("decode", self.decode_url, body), stream=bool(body.get("stream")))

    def _relay(self, upstream: Any, stream: bool) -> None:
        """Answer the client with the upstream's response (relayed line by line when streaming)."""
        if upstream is None:
            return
        with upstream:
            self.send_response(upstream.status)
            self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
            if not stream:
                data = upstream.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for line in upstream:  # server-sent events, relayed as they arrive
                self.wfile.write(line)
                self.wfile.flush()

    def _call(self, role: str, base: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to the same path on ``base``; on failure answer the client and return None."""
        req = urllib.request.Request(base + self.path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            self._send_error(e.code, f"{role} server: {e.read().decode(errors='replace')[:500]}")
        except urllib.error.URLError as e:
            self._send_error(502, f"{role} server unreachable: {e}")
        return None


def make_server(prefill: str, decode: str, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("ConfiguredRouter", (Router,), {"prefill_url": prefill.rstrip("/"), "decode_url": decode.rstrip("/")})
    return ThreadingHTTPServer((host, port), handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", required=True, help="base URL of the prefill vllm serve")
    ap.add_argument("--decode", required=True, help="base URL of the decode vllm serve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    server = make_server(args.prefill, args.decode, args.host, args.port)
    print(f"routing {args.host}:{args.port} -> prefill {args.prefill} -> decode {args.decode}", file=sys.stderr)
    server.serve_forever()


if __name__ == "__main__":
    main()
