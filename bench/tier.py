"""The cluster tier: promote latency and bytes/s per request size against recomputing the prefix.

See pykvshm/benchmarks/tier.py for what is measured.  Needs ``pip install 'pykvshm[tier]'`` and torch.

    python bench/tier.py                      # 256..8192 tokens, 3 runs each
    python bench/tier.py --tokens 1024,4096 --runs 5 --layers 16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from pykvshm.benchmarks import common as pcommon  # noqa: E402
from pykvshm.benchmarks.tier import measure, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="256,1024,4096,8192", help="prefix sizes in tokens (whole blocks)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the recompute baseline")
    ap.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.tokens.split(",")]
    if args.runs < 3:
        ap.error("--runs must be at least 3 (median and spread)")
    if any(s <= 0 or s % args.block_tokens for s in sizes):
        ap.error("--tokens must be positive multiples of --block-tokens")
    res = measure(sizes, args.runs, layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                  block_tokens=args.block_tokens, threads=args.threads)
    tab = table(res)
    print(pcommon.markdown_table(tab["header"], tab["rows"]))
    report = {"benchmark": "tier", "environment": pcommon.environment(), **res}
    common.write_json(os.path.join(args.out_dir, "tier.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
