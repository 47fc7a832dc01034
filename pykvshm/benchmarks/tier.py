"""The cluster tier: promoting a prefix from Mooncake Store into a pool against recomputing it.

A Mooncake Store on loopback (master + one storage process, TCP), two pools: rack A publishes
each prompt and demotes it; rack B misses and promotes it (one ``get_batch`` of the prompt's
blocks, header and CRC32C checks, reserve + write + commit).  The baseline recomputes the same
tokens: the prefill of a real torch layer stack with the pool's KV geometry (``layers`` decoder
layers: RMS-normed grouped-query attention with ``kv_heads`` KV heads of ``head_dim``, 2 query
heads per KV head, a SiLU-gated MLP of 4x the hidden size; float32 on the CPU, in this process).

Each size is measured ``runs`` times (fresh keys each run, so every promotion misses the pool);
reported: median and spread (min..max) of promote time and of recompute time, promote bytes/s,
and recompute time / promote time (above 1: the tier is faster than recomputing).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from . import common


def _stack(layers: int, kv_heads: int, head_dim: int, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q_heads = 2 * kv_heads
    hidden = q_heads * head_dim

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1 = torch.nn.RMSNorm(hidden)
            self.q = torch.nn.Linear(hidden, hidden, bias=False)
            self.kv = torch.nn.Linear(hidden, 2 * kv_heads * head_dim, bias=False)
            self.o = torch.nn.Linear(hidden, hidden, bias=False)
            self.n2 = torch.nn.RMSNorm(hidden)
            self.up = torch.nn.Linear(hidden, 8 * hidden, bias=False)
            self.down = torch.nn.Linear(4 * hidden, hidden, bias=False)

        def forward(self, x: Any) -> tuple[Any, Any]:
            t = x.shape[1]
            h = self.n1(x)
            q = self.q(h).view(1, t, q_heads, head_dim).transpose(1, 2)
            k, v = self.kv(h).view(1, t, 2, kv_heads, head_dim).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(1, t, hidden))
            g, u = self.up(self.n2(x)).chunk(2, dim=-1)
            return x + self.down(torch.nn.functional.silu(g) * u), torch.stack([k, v])

    return torch.nn.ModuleList([Layer() for _ in range(layers)]).eval(), hidden


def recompute_seconds(model: Any, hidden: int, tokens: int) -> float:
    import torch

    x = torch.randn(1, tokens, hidden)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for layer in model:
            x, _kv = layer(x)
    return time.perf_counter() - t0


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(token_sizes: list[int], runs: int = 3, *, layers: int = 8, kv_heads: int = 4, head_dim: int = 64,
            block_tokens: int = 16, threads: int = 1) -> dict[str, Any]:
    import pykvshm
    from pykvshm.testing.content import blocks_for_keys, prompt_keys
    from pykvshm.testing.mooncake import MooncakeCluster, mooncake_available

    ok, why = mooncake_available()
    if not ok:
        raise RuntimeError(why)
    spec = pykvshm.KVSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, block_tokens=block_tokens,
                          dtype="float16")
    biggest = max(token_sizes) // block_tokens
    model, hidden = _stack(layers, kv_heads, head_dim, threads)
    recompute_seconds(model, hidden, block_tokens)  # warm up torch
    rows: list[dict[str, Any]] = []
    total_blocks = runs * sum(t // block_tokens for t in token_sizes)
    store_bytes = int(1.25 * total_blocks * (spec.block_bytes + 4096)) + (64 << 20)
    with tempfile.TemporaryDirectory() as d, MooncakeCluster(d, storage=f"{store_bytes >> 20}MB") as mc:
        cap = common.pool_capacity(spec, biggest)
        with common.scratch_pool("tier-a", spec, cap) as a, common.scratch_pool("tier-b", spec, cap) as b:
            url = mc.url(buffer=f"{max(64, (biggest * spec.block_bytes >> 20) * 2 + 16)}MiB")
            with a.tier(url, demoter=False) as ta, b.tier(url, demoter=False) as tb:
                prompt = 0
                for tokens in token_sizes:
                    n = tokens // block_tokens
                    promote, recompute = [], []
                    for _ in range(runs):
                        prompt += 1
                        keys = prompt_keys(spec, prompt, n, b"bench-tier")
                        a.publish(keys, blocks_for_keys(keys, spec))
                        if ta.demote_keys(keys) != n:
                            raise RuntimeError(f"demotion of {n} blocks failed: {ta.stats()}")
                        t0 = time.perf_counter()
                        got = tb.promote(keys)
                        promote.append(time.perf_counter() - t0)
                        if got != n:
                            raise RuntimeError(f"promoted {got} of {n} blocks: {tb.stats()}")
                        recompute.append(recompute_seconds(model, hidden, tokens))
                    p, r = _spread(promote), _spread(recompute)
                    rows.append({"tokens": tokens, "blocks": n, "bytes": n * spec.block_bytes, "promote_s": p,
                                 "recompute_s": r, "promote_bytes_per_s": n * spec.block_bytes / p["median"],
                                 "recompute_vs_promote": r["median"] / p["median"]})
    return {"spec": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "block_tokens": block_tokens,
                     "dtype": "float16", "block_bytes": spec.block_bytes},
            "recompute_model": {"layers": layers, "hidden": hidden, "q_heads": 2 * kv_heads, "kv_heads": kv_heads,
                                "mlp": 4 * hidden, "dtype": "float32", "torch_threads": threads},
            "runs": runs, "rows": rows}


def table(res: dict[str, Any]) -> dict[str, Any]:
    def t(s: dict[str, float]) -> str:
        return f"{common.fmt_time(s['median'])} ({common.fmt_time(s['min'])}..{common.fmt_time(s['max'])})"

    rows = [[str(r["tokens"]), common.fmt_bytes(r["bytes"]), t(r["promote_s"]),
             f"{r['promote_bytes_per_s'] / 1e9:.2f} GB/s", t(r["recompute_s"]),
             common.fmt_ratio(r["recompute_vs_promote"])] for r in res["rows"]]
    return {"header": ["tokens", "KV bytes", "promote (median, min..max)", "promote rate",
                       "recompute (median, min..max)", "tier vs recompute"], "rows": rows}
