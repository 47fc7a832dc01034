"""A file rendezvous for the shared-pool test: each engine process, once attached to the
pool, says it is ready and waits for the test's go, so that the engines of one phase
(store, then load) work on the pool at the same moment rather than whenever each
framework has finished importing.  Standard library only: it is imported by the SGLang
and LMCache drivers and, through vllm_support's "call" hook, inside a vLLM engine
process.

With $PYKVSHM_RENDEZVOUS_DIR unset, meet() returns at once (the drivers' own tests).
"""

from __future__ import annotations

import os
import time

ENV = "PYKVSHM_RENDEZVOUS_DIR"
TIMEOUT = 300.0


def meet(who: str, phase: str) -> None:
    """Write DIR/<who>-<phase>.ready, then wait for DIR/<phase>.go (the test writes it once
    every engine of the phase is ready)."""
    d = os.environ.get(ENV)
    if not d:
        return
    with open(os.path.join(d, f"{who}-{phase}.ready"), "w") as f:
        f.write(str(os.getpid()))
    go, deadline = os.path.join(d, f"{phase}.go"), time.monotonic() + TIMEOUT
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit(f"rendezvous: no {phase}.go in {d} after {TIMEOUT} s")
        time.sleep(0.02)


# vllm_support's batches take a "call": "module:function" with no arguments.
def vllm_store() -> None:
    meet("vllm", "store")


def vllm_load() -> None:
    meet("vllm", "load")
