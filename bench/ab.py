"""Before/after: run one benchmark in two checkouts, alternating, on the same machine.

    unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.ab \\
        --before ../base --rounds 2 --label issue20 -- capacity --steps 1,2,3,4 --memory-steps ""'

Round r runs the benchmark in the ``--before`` checkout, then in this one (the order flips
every other round, so a machine that slows down over time does not favour one side). Each run
is the benchmark's own command (``python -m bench.<name> ...``, its ``bench/results/*.json``
collected and the checkout's committed file put back). Writes
``bench/results/ab-<label>-<name>.json`` with every run's result, labelled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine


def run_in(checkout: Path, name: str, args: list[str]) -> dict[str, Any]:
    """Run ``bench.<name>`` in ``checkout`` and return the JSON result it wrote."""
    results = checkout / "bench" / "results"
    before = {p: p.stat().st_mtime for p in results.glob("*.json")}
    t0 = time.time()
    cmd = [str(checkout / ".venv" / "bin" / "python"), "-m", f"bench.{name}", *args]
    subprocess.run(cmd, cwd=checkout, check=True)
    written = [p for p in results.glob("*.json")
               if p.stat().st_mtime >= t0 and before.get(p) != p.stat().st_mtime]
    if not written:
        raise RuntimeError(f"bench.{name} in {checkout} wrote no result")
    path = max(written, key=lambda p: p.stat().st_mtime)
    data: dict[str, Any] = json.loads(path.read_text())
    # leave the checkout's committed results as they were
    subprocess.run(["git", "checkout", "--", str(path.relative_to(checkout))], cwd=checkout,
                   check=False, capture_output=True)
    return {"file": path.name, "wall_s": round(time.time() - t0, 1), "result": data}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="the other checkout")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--label", default="ab")
    ap.add_argument("bench", help="benchmark module name, e.g. capacity")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    before = a.before.resolve()
    sides = {"before": before, "after": ROOT}
    commits = {k: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=v,
                                 capture_output=True, text=True).stdout.strip()
               for k, v in sides.items()}
    runs = []
    for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for side in order:
            print(f"== round {r + 1}: {side} ({commits[side]})", flush=True)
            runs.append({"round": r + 1, "side": side, "commit": commits[side],
                         **run_in(sides[side], a.bench, args)})
    out = RESULTS / f"ab-{a.label}-{a.bench}.json"
    out.write_text(json.dumps({"benchmark": f"ab:{a.bench}", "args": args, "commits": commits,
                               "machine": machine(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
