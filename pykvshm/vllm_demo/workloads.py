"""``pykvshm demo --workload multiturn|rag``: several vLLM servers behind a cache-unaware router.

The driver (this process) writes the workload model (``pykvshm.vllm_demo.model``: a seeded random
Llama with Llama-3.2-1B's layer geometry and an offline word-level tokenizer), then, for each
alternative in turn, starts ``--instances`` OpenAI-compatible vLLM servers (one CPU core each where
there are enough), puts a round-robin (or least-loaded) router in front of them, and drives it with
a benchmark client in the vLLM environment (``pykvshm.vllm_demo.client``):

* ``rag``: many questions over a few long shared documents: vLLM's own ``vllm bench serve`` with
  its ``prefix_repetition`` dataset (``documents`` prefixes of ``document_tokens`` tokens, each
  followed by a ``question_tokens``-token question), Poisson arrivals at ``rate``.
* ``multiturn``: chats of ``turns`` turns, each prompt the whole history, through vLLM's request
  function (the project's generator, ``client.run_multiturn``: vLLM's datasets have no multi-turn
  chat whose next turn depends on the answer).

Alternatives (the same workload, model and servers, one after the other in the same run):

* ``pool``: every server has ``PykvshmConnector`` (``kv_both``) on one pool: a prompt's blocks
  computed by any server are loaded by every other; plus vLLM's own prefix cache.
* ``prefix``: vLLM alone, its own prefix cache per server (no connector).
* ``offload``: vLLM's ``OffloadingConnector`` (CPU offloading), per server.
* ``lmcache``: ``LMCacheConnectorV1`` (LMCache's local CPU backend), per server.
* ``recompute``: no cache at all (``--no-enable-prefix-caching``): the reference outputs.

Reported per alternative: TTFT and TPOT p50/p99 (vLLM's client timing), request and output-token
throughput, the share of prompt tokens served from a cache (from the servers' own counters:
``vllm:prompt_tokens_cached`` over ``vllm:prompt_tokens``), the share of follow-up turns that
landed on another server, whether every output equals the ``recompute`` run's, and the load
average. Writes ``report.json`` and ``workload.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import numpy as np

from .servers import Router, Server, ServerError, free_port, run_client, wait_healthy

ALTERNATIVES = ("pool", "prefix", "offload", "lmcache", "recompute")
RAG_RATE = 0.3  # requests/s: ~70% of what two servers serve when they recompute ~80% of the documents (measured)
FELL_BEHIND = 1.25  # a rag run this much longer than its arrivals' span fell behind them (its queue grew)
SHM_RACE_RETRIES = 2  # restarts of an alternative whose server died of another process's /dev/shm clean-up

DEFAULTS: dict[str, dict[str, Any]] = {
    # Sizes for a 2-core machine: a workload runs in ~1-2 minutes per alternative.
    "multiturn": {"conversations": 12, "turns": 4, "system_words": 128, "user_words": 192, "new_tokens": 16,
                  "rate": 0.5, "kv_blocks": None},
    # A corpus (12 documents of 1024 tokens, 384 blocks) three times what one server's own KV cache holds
    # (128 blocks), each document asked about 4 times in a shuffled stream, at a rate both servers serve even
    # when every document is recomputed. Why these numbers: docs/design/workloads.md.
    "rag": {"requests": 48, "documents": 12, "document_tokens": 1024, "question_tokens": 32, "new_tokens": 16,
            "rate": RAG_RATE, "kv_blocks": 128},
}


def setting(args: argparse.Namespace, name: str) -> Any:
    v = getattr(args, name, None)
    return DEFAULTS[args.workload][name] if v is None else v


def server_args(alt: str, args: argparse.Namespace) -> list[str]:
    base = ["--dtype", "float32", "--block-size", str(args.block_tokens), "--enforce-eager", "--max-model-len",
            str(args.max_model_len), "--seed", "0", "--max-num-batched-tokens", "2048",
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
    if setting(args, "kv_blocks"):
        base += ["--num-gpu-blocks-override", str(setting(args, "kv_blocks"))]
    kvt: dict[str, Any] | None = None
    if alt == "pool":
        kvt = {"kv_connector": "PykvshmConnector", "kv_connector_module_path": "pykvshm.integrations.vllm",
               "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
               "kv_connector_extra_config": {"pool": args.pool, "create": "open"}}
    elif alt == "offload":
        kvt = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"cpu_bytes_to_use": args.capacity_bytes}}
    elif alt == "lmcache":
        kvt = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    elif alt == "recompute":
        base.append("--no-enable-prefix-caching")
    if kvt is not None:
        base += ["--kv-transfer-config", json.dumps(kvt)]
    return base


def client_config(args: argparse.Namespace, model: str, url: str) -> dict[str, Any]:
    if args.workload == "multiturn":
        return {"kind": "multiturn", "base_url": url, "model": model, "seed": args.seed,
                **{k: setting(args, k) for k in ("conversations", "turns", "system_words", "user_words", "rate")},
                "output_tokens": setting(args, "new_tokens")}
    argv = ["--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", model, "--dataset-name", "prefix_repetition", "--seed", str(args.seed),
            "--num-prompts", str(setting(args, "requests")),
            "--prefix-repetition-prefix-len", str(setting(args, "document_tokens")),
            "--prefix-repetition-suffix-len", str(setting(args, "question_tokens")),
            "--prefix-repetition-num-prefixes", str(setting(args, "documents")),
            "--prefix-repetition-output-len", str(setting(args, "new_tokens")),
            "--request-rate", str(setting(args, "rate")), "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm"]
    return {"kind": "vllm_bench", "argv": argv}


def _cores(n: int) -> list[str]:
    cpus = os.cpu_count() or 1
    if cpus < n:
        return ["all"] * n
    per = cpus // n
    return [f"{i * per}-{(i + 1) * per - 1}" if per > 1 else str(i * per) for i in range(n)]


def run_alternative(alt: str, args: argparse.Namespace, python: str, model: str, work: str) -> dict[str, Any]:
    servers: list[Server] = []
    router: Router | None = None
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_LOGGING_LEVEL": "WARNING",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    if alt == "lmcache":  # LMCache's local CPU backend, sized like the pool
        env.update({"LMCACHE_LOCAL_CPU": "True", "LMCACHE_CHUNK_SIZE": str(8 * args.block_tokens),
                    "LMCACHE_MAX_LOCAL_CPU_SIZE": str(max(1, args.capacity_bytes >> 30))})
    t = time.monotonic()
    try:
        for i, cores in enumerate(_cores(args.instances)):
            servers.append(Server(f"{alt}-{i}", python, model, free_port(), server_args(alt, args),
                                  {**env, "VLLM_CPU_OMP_THREADS_BIND": cores}, work))
        wait_healthy(servers, args.engine_timeout)
        up = time.monotonic() - t
        print(f"  {alt:10s} {len(servers)} servers up ({up:.0f} s)", flush=True)
        # Warm-up, not measured: one short request per server, on words the workload never uses.
        warm = " ".join(["zazo"] * (args.block_tokens + 3))
        for s in servers:
            _post(s.url + "/v1/completions", {"model": model, "prompt": warm, "max_tokens": 2, "temperature": 0})
        before = [s.metrics() for s in servers]
        router = Router([s.url for s in servers], args.router).start()
        load0 = os.getloadavg()
        res = run_client(python, client_config(args, model, router.url), work, f"{alt}-client", args.request_timeout)
        load1 = os.getloadavg()
        after = [s.metrics() for s in servers]
    finally:
        if router is not None:
            router.shutdown()
            router.server_close()
        for s in servers:
            s.stop()
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before)) for k in before[0]}
    return {"alternative": alt, "client": res, "counters": delta, "served": router.served if router else [],
            "moved_share": router.moved_share() if router else None, "servers_up_s": up,
            "loadavg_before": load0, "loadavg_after": load1, "error": None}


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return dict(json.loads(r.read()))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else float("nan")


def summarize(rep: dict[str, Any], ref: list[str] | None) -> dict[str, Any]:
    c = rep["client"]
    ok = [i for i, e in enumerate(c["error"]) if not e]
    ttft = [c["ttft"][i] * 1e3 for i in ok]
    tpot = [(c["latency"][i] - c["ttft"][i]) / (c["output_tokens"][i] - 1) * 1e3
            for i in ok if c["output_tokens"][i] > 1]
    out_tokens = sum(c["output_tokens"][i] for i in ok)
    k = rep["counters"]
    identical = None if ref is None else sum(1 for i in ok if i < len(ref) and c["generated_text"][i] == ref[i])
    return {
        "alternative": rep["alternative"], "requests": len(c["error"]), "completed": len(ok),
        "tokens_identical": identical,
        "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
        "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p99": _pct(tpot, 99),
        "request_throughput": len(ok) / c["duration"], "output_throughput": out_tokens / c["duration"],
        "duration_s": c["duration"],
        "prompt_tokens": k["vllm:prompt_tokens_total"],
        "cached_share": (k["vllm:prompt_tokens_cached_total"] / k["vllm:prompt_tokens_total"]
                         if k["vllm:prompt_tokens_total"] else 0.0),
        "computed_prompt_tokens": k["vllm:prompt_tokens_total"] - k["vllm:prompt_tokens_cached_total"],
        "local_hit_tokens": k["vllm:prefix_cache_hits_total"], "external_hit_tokens": k["vllm:external_prefix_cache_hits_total"],
        "moved_share": rep["moved_share"], "served": rep["served"],
        "shm_race_restarts": len(rep.get("shm_race_restarts", [])),
        "loadavg": [round(x, 2) for x in (*rep["loadavg_before"], *rep["loadavg_after"])],
    }


def plot(reports: list[dict[str, Any]], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["alternative"] for r in reports]
    for ax, key, name in zip(axes, ("ttft", "tpot"), ("TTFT (ms)", "TPOT (ms)")):
        data = []
        for r in reports:
            c = r["client"]
            ok = [i for i, e in enumerate(c["error"]) if not e]
            if key == "ttft":
                data.append([c["ttft"][i] * 1e3 for i in ok])
            else:
                data.append([(c["latency"][i] - c["ttft"][i]) / (c["output_tokens"][i] - 1) * 1e3
                             for i in ok if c["output_tokens"][i] > 1])
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args: argparse.Namespace, python: str) -> int:
    from ..demo import print_table
    from ..pool import Pool
    from ..spec import KVSpec, parse_size
    from .model import SHAPES

    alts = [a.strip() for a in (args.alternatives or ",".join(ALTERNATIVES[1:])).split(",") if a.strip()]
    bad = [a for a in alts if a not in ALTERNATIVES]
    if bad:
        print(f"pykvshm demo: unknown alternative(s) {bad}; choose from {', '.join(ALTERNATIVES)}")
        return 2
    alts = ["pool"] + [a for a in alts if a != "pool"]
    if "recompute" not in alts:
        alts.append("recompute")  # the reference outputs
    args.block_tokens = args.block_tokens or 32
    args.max_model_len = 4096
    if args.workload == "rag":  # a document, a question and the answer; vLLM refuses a model length its KV cache cannot hold
        need = setting(args, "document_tokens") + setting(args, "question_tokens") + setting(args, "new_tokens")
        args.max_model_len = max(2048, -(-need // 1024) * 1024)
    blocks = setting(args, "kv_blocks")
    if blocks and (blocks - 1) * args.block_tokens < args.max_model_len:
        print(f"pykvshm demo: --kv-blocks {blocks} cannot hold one {args.max_model_len}-token request "
              f"(vLLM keeps one block back); give at least {args.max_model_len // args.block_tokens + 1}")
        return 2
    g = SHAPES[args.model_shape](args.model_layers)
    spec = KVSpec(num_layers=g["num_hidden_layers"], num_kv_heads=g["num_key_value_heads"], head_dim=g["head_dim"],
                  block_tokens=args.block_tokens, dtype="float32")
    args.capacity_bytes = parse_size(args.capacity or "1GiB")
    os.makedirs(args.out, exist_ok=True)
    w = args.workload
    if w == "multiturn":
        what = (f"{setting(args, 'conversations')} conversations x {setting(args, 'turns')} turns (system prompt "
                f"{setting(args, 'system_words')} tokens, {setting(args, 'user_words')} new user tokens and "
                f"{setting(args, 'new_tokens')} answer tokens per turn), chats start at {setting(args, 'rate')}/s; "
                "client: the project's generator on vLLM's request function")
    else:
        what = (f"{setting(args, 'requests')} questions ({setting(args, 'question_tokens')} tokens) over "
                f"{setting(args, 'documents')} documents of {setting(args, 'document_tokens')} tokens, "
                f"{setting(args, 'new_tokens')} answer tokens, Poisson {setting(args, 'rate')}/s, each server's own "
                f"KV cache {setting(args, 'kv_blocks') or 'as --kv-cache-gib allows'} blocks; "
                "client: vllm bench serve (prefix_repetition dataset)")
    print(f"pykvshm demo --workload {w} (vLLM {args.engine_version}): {what}", flush=True)
    print(f"model: seeded random Llama, {'Llama-3.2-1B layer geometry' if args.model_shape == 'llama-1b' else 'tiny'} "
          f"(hidden {g['hidden_size']}, {g['num_attention_heads']}/{g['num_key_value_heads']} heads of 64, MLP "
          f"{g['intermediate_size']}), {args.model_layers} layers, vocabulary 8192, fp32, {args.block_tokens}-token blocks; "
          f"{args.instances} servers behind a {args.router} router; alternatives: {', '.join(alts)}", flush=True)
    work = tempfile.mkdtemp(prefix="pykvshm-workload-")
    reports: list[dict[str, Any]] = []
    try:
        model = os.path.join(work, "model")
        subprocess.run([python, "-m", "pykvshm.vllm_demo.model", model, str(args.model_layers), str(args.seed),
                        args.model_shape],
                       check=True, capture_output=True, cwd=work)
        for alt in alts:
            pool = Pool.create(args.pool, spec, args.capacity_bytes) if alt == "pool" else None
            races: list[str] = []
            try:
                while True:
                    try:
                        rep = run_alternative(alt, args, python, model, work)
                        break
                    except ServerError as e:
                        # Another process removed a semaphore or segment a server was opening (a
                        # clean-up of another session's, on a shared machine): not this alternative's
                        # error; start its servers again so the report holds its real outcome.
                        if not e.shm_race or len(races) >= SHM_RACE_RETRIES:
                            raise
                        races.append(str(e).splitlines()[0])
                        print(f"  {alt:10s} restarting its servers: {races[-1]}", flush=True)
                rep["shm_race_restarts"] = races
                if pool is not None:
                    rep["pool_stats"] = pool.stats()
                reports.append(rep)
            except (ServerError, OSError, subprocess.SubprocessError) as e:
                msg = str(e)
                print(f"  {alt:10s} FAILED: {msg.splitlines()[0] if msg else type(e).__name__}", flush=True)
                reports.append({"alternative": alt, "error": msg, "reason": msg.splitlines()[0] if msg else "",
                                "shm_race_restarts": races})
            finally:
                if pool is not None:
                    pool.close()
                    Pool.destroy(args.pool)
        if args.keep_logs:
            dst = os.path.join(args.out, f"logs-{w}")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(work, dst, ignore=shutil.ignore_patterns("model"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ran = [r for r in reports if not r["error"]]
    by = {r["alternative"]: r for r in ran}
    ref = by["recompute"]["client"]["generated_text"] if "recompute" in by else None
    summaries = [summarize(r, ref) for r in ran]
    if w == "rag":  # Poisson arrivals span ~requests / rate; a run much longer than that fell behind them
        window = setting(args, "requests") / setting(args, "rate")
        for s in summaries:
            s["arrivals_span_s"] = window
            s["fell_behind"] = s["duration_s"] > FELL_BEHIND * window
    print()
    print_table(summaries, [
        ("alternative", 11, lambda s: s["alternative"]),
        ("reqs", 5, lambda s: f"{s['completed']}/{s['requests']}"),
        ("tokens =", 9, lambda s: "-" if s["tokens_identical"] is None else f"{s['tokens_identical']}/{s['requests']}"),
        ("cached", 7, lambda s: f"{100 * s['cached_share']:.0f}%"),
        ("computed", 9, lambda s: f"{s['computed_prompt_tokens'] / 1000:.1f}k"),
        ("TTFT p50", 10, lambda s: f"{s['ttft_ms_p50']:.0f}ms"), ("TTFT p99", 10, lambda s: f"{s['ttft_ms_p99']:.0f}ms"),
        ("TPOT p50", 10, lambda s: f"{s['tpot_ms_p50']:.0f}ms"), ("TPOT p99", 10, lambda s: f"{s['tpot_ms_p99']:.0f}ms"),
        ("req/s", 7, lambda s: f"{s['request_throughput']:.2f}"), ("tok/s", 7, lambda s: f"{s['output_throughput']:.1f}"),
        ("moved", 6, lambda s: "-" if s["moved_share"] is None else f"{100 * s['moved_share']:.0f}%"),
        ("load avg", 16, lambda s: "/".join(f"{x:.1f}" for x in s["loadavg"][3:])),
    ])
    print("cached = prompt tokens served from a cache (vLLM's own prefix cache or a connector) over all prompt tokens, "
          "from the servers' counters; computed = prompt tokens the servers prefilled themselves; moved = follow-up turns routed to another server than the turn before; "
          "load avg = 1/5/15-min load after the run")
    for r in reports:
        if r["error"]:
            print(f"  {r['alternative']}: could not run: {r['reason']}")
    for s in summaries:
        if s.get("fell_behind"):
            print(f"  {s['alternative']}: fell behind the arrivals: {s['completed']} requests took {s['duration_s']:.0f} s, "
                  f"arriving over ~{s['arrivals_span_s']:.0f} s (beyond what its servers served at this load: "
                  "its tail is queueing)")
    s_by = {s["alternative"]: s for s in summaries}
    if "pool" in s_by:
        for name, s in s_by.items():
            if name != "pool":
                p = s_by["pool"]
                print(f"  vs {name:10s}: TTFT p50 {s['ttft_ms_p50'] / p['ttft_ms_p50']:.2f}x the pool's, p99 "
                      f"{s['ttft_ms_p99'] / p['ttft_ms_p99']:.2f}x; pool throughput "
                      f"{p['output_throughput'] / s['output_throughput']:.2f}x")
    ok = (ref is not None and "pool" in s_by
          and all(s["completed"] == s["requests"] and s["tokens_identical"] == s["requests"] for s in summaries))
    print("every output identical to the recompute run: " + ("yes" if ok else "NO"))
    report = {"engine": "vllm", "vllm": args.engine_version, "workload": w,
              "args": {k: v for k, v in vars(args).items() if k != "fn"}, "summaries": summaries,
              "failed": {r["alternative"]: r["reason"] for r in reports if r["error"]},
              "failed_logs": {r["alternative"]: r["error"] for r in reports if r["error"]},
              "runs": ran, "ok": ok}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    png = os.path.join(args.out, "workload.png")
    if plot(ran, png, f"pykvshm demo --workload {w}: {args.instances} vLLM servers, {args.router} router"):
        print(f"wrote {os.path.join(args.out, 'report.json')} and {png}")
    return 0 if ok else 1
