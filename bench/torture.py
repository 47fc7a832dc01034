"""kill -9 torture of one pool, longer than CI runs it.

    python bench/torture.py --kills 2000 --procs 4 [--coherence noncoherent] [--json out.json]

Prints kills, recoveries, leaked blocks (must be 0), leaked pins (must be 0), wrong reads (must be 0).
Exit status 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from pykvshm.testing.torture import TortureReport, run_torture


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--kills-per-round", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coherence", choices=["coherent", "noncoherent"], default="coherent")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.kills, unit="kill")
    except ImportError:
        bar = None
    last = [0]

    def progress(rep: TortureReport) -> None:
        if bar is not None:
            bar.update(rep.kills - last[0])
            last[0] = rep.kills
        else:
            print(f"  {rep.kills} kills, {rep.rounds} rounds, {rep.members_recovered} recovered", file=sys.stderr)

    name = f"pykvshm-torture-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rep = run_torture(name, kills=args.kills, procs=args.procs, kills_per_round=args.kills_per_round,
                      seed=args.seed, coherence=args.coherence, progress=progress)
    if bar is not None:
        bar.close()
    print(f"kills            {rep.kills}")
    print(f"rounds           {rep.rounds}")
    print(f"workers started  {rep.workers_started}")
    print(f"members recovered {rep.members_recovered}")
    print(f"leaked blocks    {rep.leaked_blocks}")
    print(f"leaked pins      {rep.leaked_pins}")
    print(f"wrong reads      {rep.wrong_reads}  (of {rep.verified_reads} verified block reads)")
    print(f"check failures   {len(rep.check_failures)}")
    for f in rep.check_failures[:10]:
        print(f"  {f}")
    print(f"seconds          {rep.seconds:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.as_dict(), f, indent=2)
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
