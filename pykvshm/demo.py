"""``pykvshm demo``: disaggregated prefill -> decode on a real transformer's KV cache.

A seeded random Llama (written here with ``transformers``, no download) runs in two
processes: a prefill worker and a decode worker.  Requests arrive as a Poisson process;
some share a long system prompt.  The prefill worker computes each prompt's KV and hands
it to the decode worker, which continues greedy decoding.  The same workload runs through:

* ``pool``: the pykvshm pool in /dev/shm.  Prefill streams each layer into the pool as the
  layer finishes (layer-wise transfer, decode loads layer 0 while prefill computes layer 1);
  blocks already in the pool (the shared prefix) are neither recomputed nor sent again.
* ``tcp`` / ``nixl`` / ``mooncake``: the same layer-wise handoff through those transports
  (each skipped when not installed).  Their prefill worker keeps a local prefix cache (as an
  engine would), but every block still has to cross to the decode worker.
* ``recompute``: no KV handoff at all: the decode worker prefills the prompt again.

Every run is checked: the decode worker's tokens must be identical to a single-engine run
(prefill and decode in one process), and the KV it received must be bit-identical to what the
prefill computed.
Reports TTFT, TPOT and KV handoff time (p50/p99), the prefix-hit rate, and writes a JSON
report and a PNG plot of the latency distributions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

POOL_NAME_DEFAULT = "pykvshm-demo"


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------

@dataclass
class Request:
    rid: str
    arrival: float  # seconds after the start of the run
    prompt: list[int]
    shared: bool


def make_workload(args: argparse.Namespace) -> list[Request]:
    # Independent streams for arrivals, sharing, lengths and tokens.
    r_arrive, r_share, r_len, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(4))
    vocab = 1000
    system = rng.integers(5, vocab, size=args.shared_prefix).tolist()
    t = 0.0
    reqs = []
    for i in range(args.requests):
        t += float(r_arrive.exponential(1.0 / args.rate))
        shared = bool(r_share.random() < args.shared_fraction)
        n = max(args.block_tokens + 1, int(r_len.normal(args.prompt_tokens, args.prompt_tokens / 8)))
        if shared:
            tail = rng.integers(5, vocab, size=max(1, n - len(system))).tolist()
            prompt = system + tail
        else:
            prompt = rng.integers(5, vocab, size=n).tolist()
        reqs.append(Request(f"req-{i}", t, prompt, shared))
    return reqs


def model_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192, initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def write_model(args: argparse.Namespace, folder: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args)).eval()
    model.save_pretrained(folder)


def load_model(folder: str) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def run_model(model: Any, ids: list[int] | list[list[int]], cache: Any) -> Any:
    """One forward pass that appends to ``cache`` (transformers renamed past_key_values to cache in 5.x)."""
    import inspect

    import torch

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    t = torch.tensor(ids if isinstance(ids[0], list) else [ids])
    return model(input_ids=t, use_cache=True, **{name: cache})


# ---------------------------------------------------------------------------------------------
# KV cache <-> blocks
# ---------------------------------------------------------------------------------------------

def cache_kv(cache: Any, layer: int) -> tuple[Any, Any]:
    """(K, V) of one layer of a transformers DynamicCache, each (1, kv_heads, seq, head_dim)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def kv_to_blocks(k: Any, v: Any, first: int, count: int, bt: int) -> np.ndarray:
    """Blocks [first, first+count) of one layer as (count, 2, bt, kv_heads, head_dim)."""
    import torch

    seg_k = k[0, :, first * bt : (first + count) * bt, :]  # (h, count*bt, d)
    seg_v = v[0, :, first * bt : (first + count) * bt, :]
    both = torch.stack([seg_k, seg_v])  # (2, h, count*bt, d)
    h, d = both.shape[1], both.shape[3]
    both = both.reshape(2, h, count, bt, d).permute(2, 0, 3, 1, 4)  # (count, 2, bt, h, d)
    return np.ascontiguousarray(both.detach().numpy())


def blocks_to_cache(blocks: np.ndarray, model_cfg: Any) -> Any:
    """A DynamicCache holding full blocks (num_blocks, layers, 2, bt, kv_heads, head_dim)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model_cfg)
    t = torch.from_numpy(np.ascontiguousarray(blocks))
    n, layers, _, bt, h, d = t.shape
    for layer in range(layers):
        kv = t[:, layer]  # (n, 2, bt, h, d)
        k = kv[:, 0].permute(2, 0, 1, 3).reshape(1, h, n * bt, d)
        v = kv[:, 1].permute(2, 0, 1, 3).reshape(1, h, n * bt, d)
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


def digest(blocks: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(blocks).tobytes(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

def _spec_for(args: argparse.Namespace) -> Any:
    import pykvshm

    return pykvshm.KVSpec(args.layers, args.kv_heads, args.hidden // args.heads, args.block_tokens, "float32")


def prefill_worker(args: argparse.Namespace, transport: str, folder: str, inbox: Any, to_decode: Any,
                   meta_out: Any, meta_in: Any, instance: int = 0) -> None:
    """Runs requests as they arrive; streams each layer's new full blocks to the decode worker.

    Several instances may run; with the pool they share one prefix cache, with a baseline each
    keeps its own (as separate engines do)."""
    try:
        import torch

        import pykvshm
        from pykvshm.transfer import TransferProducer

        model = load_model(folder)
        cfg = model.config
        spec = _spec_for(args)
        bt = args.block_tokens
        salt = b"pykvshm-demo-model-%d" % args.seed
        pool = side = None
        local_cache: dict[bytes, np.ndarray] = {}  # baselines: the prefill engine's own prefix cache
        if transport == "pool":
            pool = pykvshm.Pool.open(args.pool, spec=spec)
        elif transport != "recompute":
            from pykvshm.transfer.baselines import get_transport

            side = get_transport(transport).producer()
            meta_out.put(side.metadata())
            side.connect(meta_in.get(timeout=60), timeout=60)
        to_decode.put(("ready", instance))
        t0 = inbox.get()  # the driver's clock origin, once both workers are up
        while True:
            msg = inbox.get()
            if msg is None:
                break
            req: Request = msg
            delay = t0 + req.arrival - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            start = time.monotonic()
            keys = pykvshm.block_keys(req.prompt, bt, salt=salt)
            nfull = len(keys)
            # The last prompt token is always computed (its logits give the first token).
            max_hit = (len(req.prompt) - 1) // bt
            cache = None
            hit = 0
            if transport == "pool":
                with pool.acquire(keys[:max_hit]) as lease:
                    hit = len(lease)
                    blocks = np.empty((hit, *spec.block_shape), dtype=np.float32)
                    lease.copy_to(blocks)
            elif transport != "recompute":
                while hit < max_hit and keys[hit] in local_cache:
                    hit += 1
                blocks = np.stack([local_cache[k] for k in keys[:hit]]) if hit else None
            to_decode.put(("start", {"rid": req.rid, "prompt": req.prompt, "hit": hit, "nfull": nfull,
                                     "arrival": t0 + req.arrival, "start": start, "instance": instance}))
            # Cached prefix into a DynamicCache; compute only the rest.
            if hit:
                cache = blocks_to_cache(blocks, cfg)
            new = nfull - hit
            producer = None
            buf = None
            if transport == "pool" and new:
                producer = TransferProducer(pool, req.rid, keys[hit:nfull])
            elif side is not None and nfull:
                buf = np.empty((spec.num_layers, nfull, *spec.layer_shape), dtype=np.float32)
                side.register(req.rid, buf, spec.num_layers)
                if hit:
                    for layer in range(spec.num_layers):
                        buf[layer, :hit] = blocks[:, layer]
            from transformers import DynamicCache

            cache = cache if cache is not None else DynamicCache(config=cfg)
            handles = []
            sent_digests: list[str] = []
            if producer is not None or buf is not None:
                def hook(layer: int):
                    def fn(_mod: Any, _inp: Any, _out: Any) -> None:
                        k, v = cache_kv(cache, layer)
                        if producer is not None:
                            producer.put_layer(layer, kv_to_blocks(k, v, hit, new, bt))
                        else:
                            buf[layer, hit:nfull] = kv_to_blocks(k, v, hit, new, bt)
                            side.send_layer(req.rid, layer, timeout=60)
                    return fn

                for layer, mod in enumerate(model.model.layers):
                    handles.append(mod.register_forward_hook(hook(layer)))
            try:
                with torch.no_grad():
                    out = run_model(model, req.prompt[hit * bt :], cache)
                first = int(out.logits[0, -1].argmax())
            finally:
                for h in handles:
                    h.remove()
            if producer is not None:
                producer.finish()
            # What was computed, for the bit-for-bit check on the decode side.
            full = np.stack([kv_to_blocks(*cache_kv(cache, layer), 0, nfull, bt) for layer in range(spec.num_layers)],
                            axis=1) if nfull else np.zeros((0,), np.float32)
            sent_digests.append(digest(full))
            if side is not None:
                for i in range(hit, nfull):
                    local_cache[keys[i]] = full[i]
            end = time.monotonic()
            to_decode.put(("prefilled", {"rid": req.rid, "first": first, "end": end, "kv_digest": sent_digests[0]}))
            if side is not None and nfull:
                side.release(req.rid)
        if pool is not None:
            pool.close()
        to_decode.put(("done", instance))
    except BaseException:
        to_decode.put(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        to_decode.close()
        to_decode.join_thread()  # flush the queue before leaving without interpreter shutdown
        os._exit(0)


def decode_worker(args: argparse.Namespace, transport: str, folder: str, from_prefill: Any, results: Any,
                  meta_outs: list[Any], meta_ins: list[Any]) -> None:
    """Receives the KV of each request, then decodes greedily."""
    try:
        import torch

        import pykvshm
        from pykvshm.transfer import TransferConsumer

        model = load_model(folder)
        cfg = model.config
        spec = _spec_for(args)
        bt = args.block_tokens
        salt = b"pykvshm-demo-model-%d" % args.seed
        pool = None
        sides: list[Any] = []  # one consumer per prefill instance (baselines)
        if transport == "pool":
            pool = pykvshm.Pool.open(args.pool, spec=spec)
        elif transport != "recompute":
            from pykvshm.transfer.baselines import get_transport

            for meta_out in meta_outs:
                side = get_transport(transport).consumer()
                meta_out.put(side.metadata())
                sides.append(side)
            for side, meta_in in zip(sides, meta_ins):
                side.connect(meta_in.get(timeout=60), timeout=60)
        # warm up
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
        pending: dict[str, dict[str, Any]] = {}

        def load_kv(info: dict[str, Any]) -> None:
            try:
                rid, nfull, hit = info["rid"], info["nfull"], info["hit"]
                keys = pykvshm.block_keys(info["prompt"], bt, salt=salt)
                blocks = np.empty((nfull, *spec.block_shape), dtype=np.float32)
                if transport == "pool":
                    if hit:
                        with pool.acquire(keys[:hit]) as lease:
                            got = len(lease)
                            lease.copy_to(blocks[:got])
                        if got != hit:
                            raise RuntimeError(f"{rid}: {hit - got} prefix blocks were evicted before decode read them")
                    if nfull > hit:
                        with TransferConsumer(pool, rid, timeout=60) as rx:
                            rx.read_all(blocks[hit:], timeout=60)  # layer by layer, as prefill produces them
                elif sides and nfull:
                    side = sides[info["instance"]]
                    buf = np.empty((spec.num_layers, nfull, *spec.layer_shape), dtype=np.float32)
                    side.register(rid, buf, spec.num_layers)
                    for layer in range(spec.num_layers):
                        side.wait_layer(rid, layer, timeout=60)
                    blocks[:] = buf.transpose(1, 0, 2, 3, 4, 5)
                    side.release(rid)
                info["kv_loaded"] = time.monotonic()
                info["blocks"] = blocks
            except BaseException:
                info["error"] = traceback.format_exc()
        # A receiver thread starts each request's KV load the moment prefill announces it,
        # as an engine's connector does, so the handoff overlaps the decoding of earlier
        # requests; the decode loop below only sees "prefilled" (and the end).
        decode_queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        lock = threading.Lock()

        def receive() -> None:
            readies = dones = 0
            while True:
                kind, payload = from_prefill.get()
                if kind == "start":
                    payload["loader"] = threading.Thread(target=load_kv, args=(payload,), daemon=True)
                    with lock:
                        pending[payload["rid"]] = payload
                    payload["loader"].start()
                    continue
                if kind == "ready":
                    readies += 1
                    if readies == len(meta_outs):  # every prefill instance is up
                        decode_queue.put(("ready", None))
                    continue
                if kind == "done":
                    dones += 1
                    if dones < len(meta_outs):
                        continue
                decode_queue.put((kind, payload))
                if kind in ("done", "error"):
                    return

        threading.Thread(target=receive, daemon=True).start()
        while True:
            kind, payload = decode_queue.get()
            if kind == "ready":
                results.put(("ready", None))
                continue
            if kind in ("done", "error"):
                results.put((kind, payload))
                break
            # "prefilled": the first token is out; finish the prompt tail and decode.
            with lock:
                info = pending.pop(payload["rid"])
            info["loader"].join()
            if "error" in info:
                raise RuntimeError(info["error"])
            info.update(payload)
            prompt, nfull = info["prompt"], info["nfull"]
            t_begin = time.monotonic()
            with torch.no_grad():
                if transport == "recompute":
                    from transformers import DynamicCache

                    cache = DynamicCache(config=cfg)
                    run_model(model, prompt, cache)
                    blocks_got = np.stack([kv_to_blocks(*cache_kv(cache, layer), 0, nfull, bt)
                                           for layer in range(spec.num_layers)], axis=1) if nfull else None
                else:
                    blocks_got = info["blocks"]
                    cache = blocks_to_cache(blocks_got, cfg) if nfull else None
                    tail = prompt[nfull * bt :]
                    if tail:
                        from transformers import DynamicCache

                        cache = cache if cache is not None else DynamicCache(config=cfg)
                        run_model(model, tail, cache)
                handoff_done = time.monotonic()
                tokens = [info["first"]]
                step_times = []
                for _ in range(args.new_tokens - 1):
                    s = time.monotonic()
                    out = run_model(model, [tokens[-1]], cache)
                    tokens.append(int(out.logits[0, -1].argmax()))
                    step_times.append(time.monotonic() - s)
            kv_ok = digest(blocks_got) == info["kv_digest"] if nfull else True
            results.put(("result", {
                "rid": info["rid"], "tokens": tokens, "hit_blocks": info["hit"], "full_blocks": nfull,
                "ttft": info["end"] - info["arrival"],
                # Time from the end of prefill until the decode worker holds every full block
                # of the prompt's KV (0: the layers streamed in before prefill finished).
                "handoff": max(0.0, info["kv_loaded"] - info["end"]) if transport != "recompute"
                else handoff_done - info["end"],
                "tpot": float(np.mean(step_times)) if step_times else 0.0,
                "kv_identical": kv_ok, "decode_begin": t_begin,
                "kv_loaded_after_prefill": info["kv_loaded"] - info["end"],
                "tail_done_after_prefill": handoff_done - info["end"],
                "decode_begin_after_prefill": t_begin - info["end"],
            }))
        if pool is not None:
            pool.close()
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        results.close()
        results.join_thread()
        os._exit(0)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def reference_tokens(args: argparse.Namespace, folder: str, reqs: list[Request]) -> dict[str, list[int]]:
    """The single-engine run: prefill and greedy decode of every prompt in one process, with no
    KV handoff and no prefix cache.  Every transport's decode output must equal it."""
    import torch
    from transformers import DynamicCache

    model = load_model(folder)
    ref = {}
    with torch.no_grad():
        for r in reqs:
            cache = DynamicCache(config=model.config)
            out = run_model(model, r.prompt, cache)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(args.new_tokens - 1):
                out = run_model(model, [tokens[-1]], cache)
                tokens.append(int(out.logits[0, -1].argmax()))
            ref[r.rid] = tokens
    return ref


def run_transport(args: argparse.Namespace, transport: str, folder: str, reqs: list[Request],
                  progress: Any) -> dict[str, Any]:
    import pykvshm

    ctx = mp.get_context("spawn")
    n_pre = max(1, int(args.prefill_instances))
    inboxes = [ctx.Queue() for _ in range(n_pre)]
    to_decode, results = ctx.Queue(), ctx.Queue()
    m1 = [ctx.Queue() for _ in range(n_pre)]  # prefill i -> decode: its transport metadata
    m2 = [ctx.Queue() for _ in range(n_pre)]  # decode -> prefill i
    if transport == "pool":
        try:
            pykvshm.Pool.destroy(args.pool)
        except pykvshm.errors.PoolNotFoundError:
            pass
        pool = pykvshm.Pool.create(args.pool, spec=_spec_for(args), capacity=args.capacity, prefault=True)
    pres = [ctx.Process(target=prefill_worker, args=(args, transport, folder, inboxes[i], to_decode, m1[i], m2[i], i))
            for i in range(n_pre)]
    dec = ctx.Process(target=decode_worker, args=(args, transport, folder, to_decode, results, m2, m1))
    for p in pres:
        p.start()
    dec.start()
    out: list[dict[str, Any]] = []
    error = None
    try:
        kind, payload = results.get(timeout=300)
        if kind != "ready":
            raise RuntimeError(payload)
        t0 = time.monotonic() + 0.2
        for inbox in inboxes:
            inbox.put(t0)
        for j, r in enumerate(reqs):  # round robin over the prefill instances
            inboxes[j % n_pre].put(r)
        for inbox in inboxes:
            inbox.put(None)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                kind, payload = results.get(timeout=5)
            except queue.Empty:
                if not dec.is_alive() and not any(p.is_alive() for p in pres):
                    break
                continue
            if kind == "result":
                out.append(payload)
                progress(transport, len(out), len(reqs))
            elif kind == "error":
                error = payload
                break
            elif kind == "done":
                break
    finally:
        for p in (*pres, dec):
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        if transport == "pool":
            stats = pool.stats()
            pool.close()
            pykvshm.Pool.destroy(args.pool)
    rep: dict[str, Any] = {"transport": transport, "results": out, "error": error}
    if transport == "pool":
        rep["pool_stats"] = stats
    return rep


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def latency_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """p50 and p99 in ms of each request's ``ttft``, ``tpot`` and ``handoff`` (seconds)."""
    return {f"{key}_ms_p{q}": percentile([r[key] * 1e3 for r in results], q)
            for key in ("ttft", "tpot", "handoff") for q in (50, 99)}


def summarize(rep: dict[str, Any], ref: dict[str, list[int]], reqs: list[Request]) -> dict[str, Any]:
    res = rep["results"]
    shared = {r.rid for r in reqs if r.shared}
    identical = sum(1 for r in res if r["tokens"] == ref[r["rid"]])
    kv_ok = sum(1 for r in res if r["kv_identical"])
    hits = sum(r["hit_blocks"] for r in res)
    fulls = sum(r["full_blocks"] for r in res)
    shared_hits = sum(r["hit_blocks"] for r in res if r["rid"] in shared)
    return {
        "transport": rep["transport"],
        "requests": len(res),
        "error": rep["error"],
        "tokens_identical": identical,
        "kv_identical": kv_ok,
        "prefix_hit_rate": hits / fulls if fulls else 0.0,
        "shared_prefix_hit_blocks": shared_hits,
        **latency_summary(res),
    }


def ms_columns(keys: list[str]) -> list[tuple[str, int, Any]]:
    """Table columns for summary keys like ``ttft_ms_p50`` ("TTFT p50", in ms)."""
    def col(key: str) -> tuple[str, int, Any]:
        name, _, q = key.partition("_ms_")
        return (f"{name.upper() if name in ('ttft', 'tpot') else name} {q}", 12,
                lambda s: f"{s[key]:.1f}ms" if s[key] == s[key] else "-")  # nan: not measured in this mode
    return [col(k) for k in keys]


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, int, Any]]) -> None:
    """Print ``rows`` as a fixed-width table: columns are (header, width, row -> text)."""
    def line(cells: list[str]) -> str:
        return " ".join(f"{c:{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, (_, w, _)) in enumerate(zip(cells, columns)))

    hdr = line([h for h, _, _ in columns])
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(line([f(r) for _, _, f in columns]))


def plot(reports: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft", "handoff", "tpot"),
                              ("TTFT (ms)", "KV handoff: prefill end -> decode holds the KV (ms)", "TPOT (ms)")):
        data = [[r[key] * 1e3 for r in rep["results"]] for rep in reports]
        labels = [rep["transport"] for rep in reports]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_title(title)
        if key == "handoff":
            ax.set_yscale("symlog", linthresh=1.0)  # a handoff of 0 ms (fully overlapped) stays visible
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("pykvshm demo: disaggregated prefill -> decode, per-request latency distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def available(transport: str) -> tuple[bool, str]:
    if transport in ("pool", "recompute"):
        return True, ""
    try:
        from pykvshm.transfer.baselines import get_transport

        cls = get_transport(transport)
    except KeyError as e:
        return False, str(e)
    if not cls.available():
        return False, f"{transport} is not installed (see docs/baselines.md)"
    return True, ""


def main(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"pykvshm demo needs torch and transformers: pip install torch==2.13.0 'pykvshm[demo]' ({e})",
              file=sys.stderr)
        return 1
    args.capacity = getattr(args, "capacity", None) or "256MiB"
    transports = ["pool"] + [t.strip() for t in args.baselines.split(",") if t.strip() and t.strip() != "pool"]
    os.makedirs(args.out, exist_ok=True)
    reqs = make_workload(args)
    print(f"pykvshm demo: {len(reqs)} requests, ~{args.prompt_tokens}-token prompts "
          f"({sum(r.shared for r in reqs)} share a {args.shared_prefix}-token system prompt), "
          f"{args.new_tokens} new tokens each, Poisson arrivals at {args.rate}/s", flush=True)
    print(f"model: seeded random Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"{args.kv_heads} kv heads, fp32; {args.block_tokens}-token KV blocks; pool /dev/shm/{args.pool}", flush=True)
    print(f"{args.prefill_instances} prefill instance(s), requests round robin; with the pool they share one prefix "
          f"cache, with a baseline each keeps its own; 1 decode instance", flush=True)
    with tempfile.TemporaryDirectory(prefix="pykvshm-demo-") as folder:
        t = time.monotonic()
        write_model(args, folder)
        ref = reference_tokens(args, folder, reqs)
        print(f"reference: single-engine run (prefill + decode in one process) of every request "
              f"({time.monotonic() - t:.1f} s)", flush=True)

        def progress(name: str, done: int, total: int) -> None:
            bar = "#" * (20 * done // total)
            print(f"\r  {name:10s} [{bar:20s}] {done}/{total}", end="" if done < total else "\n", flush=True)

        reports, skipped = [], {}
        for tr in transports:
            ok, why = available(tr)
            if not ok:
                skipped[tr] = why
                print(f"  {tr:10s} skipped: {why}", flush=True)
                continue
            rep = run_transport(args, tr, folder, reqs, progress)
            if rep["error"]:
                print(f"\n  {tr:10s} FAILED:\n{rep['error']}", flush=True)
            reports.append(rep)
    summaries = [summarize(r, ref, reqs) for r in reports]
    print()
    print_table(summaries, [
        ("transport", 10, lambda s: s["transport"]),
        ("reqs", 5, lambda s: str(s["requests"])),
        ("tokens =", 9, lambda s: f"{s['tokens_identical']}/{s['requests']}"),
        ("KV =", 7, lambda s: f"{s['kv_identical']}/{s['requests']}"),
        ("hit rate", 9, lambda s: f"{100 * s['prefix_hit_rate']:.1f}%"),
        *ms_columns(["ttft_ms_p50", "ttft_ms_p99", "handoff_ms_p50", "handoff_ms_p99", "tpot_ms_p50", "tpot_ms_p99"]),
    ])
    print("handoff = time from the end of prefill until the decode worker holds all of the prompt's full KV "
          "blocks (0 when the layers streamed in before prefill returned; for recompute: the re-prefill)")
    base = {s["transport"]: s for s in summaries}
    if "pool" in base and base["pool"]["ttft_ms_p50"] > 0:
        for s in summaries:
            if s["transport"] != "pool":
                print(f"  vs {s['transport']:10s}: TTFT p50 {s['ttft_ms_p50'] / base['pool']['ttft_ms_p50']:.2f}x the "
                      f"pool's, p99 {s['ttft_ms_p99'] / max(base['pool']['ttft_ms_p99'], 1e-9):.2f}x; handoff p99 "
                      f"{s['handoff_ms_p99']:.2f} ms vs the pool's {base['pool']['handoff_ms_p99']:.2f} ms")
    ok = all(s["tokens_identical"] == s["requests"] == len(reqs) and s["kv_identical"] == s["requests"]
             and not s["error"] for s in summaries)
    print("every output token-identical to the single-engine run, every KV bit-identical to what prefill computed: "
          + ("yes" if ok else "NO"))
    report = {"args": {k: v for k, v in vars(args).items() if k != "fn"}, "summaries": summaries,
              "skipped": skipped, "requests": [{"rid": r.rid, "arrival": r.arrival, "prompt_tokens": len(r.prompt),
                                                "shared": r.shared} for r in reqs],
              "runs": [{"transport": r["transport"], "results": r["results"], "pool_stats": r.get("pool_stats")}
                       for r in reports], "ok": ok}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    png = os.path.join(args.out, "latency.png")
    if plot(reports, png):
        print(f"wrote {os.path.join(args.out, 'report.json')} and {png}")
    return 0 if ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:  # kept for embedding the demo in other CLIs
    p.add_argument("--capacity", default="256MiB")
