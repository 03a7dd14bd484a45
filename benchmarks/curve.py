"""Held-out figures against training time, from the metrics.jsonl of one or more graft folders:
per evaluation, the minutes and steps so far, top-1 by depth (the drafts of answer tokens) and
the tokens per step the decoding fit expects from them with a chain and with a 64-node tree.
For choosing how long to train and on what data; decoding's own figures come from `graft bench`.

  python benchmarks/curve.py runs/eagle-shared runs/eagle-pool [--nodes 64] [--json curve.jsonl]

Evaluations written before training recorded minutes show the minutes as "-". The learning
rate decays over the run's own time budget, so a point at minute 5 of a 15-minute run is not a
5-minute run's final figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def points(graft_dir: str) -> list[dict]:
    out = []
    with open(os.path.join(graft_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "eval" in rec:
                out.append(rec)
    return out


def main(argv=None) -> int:
    from graft.tree import build_tree, chain, expected_tokens

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graft_dirs", nargs="+")
    p.add_argument("--nodes", type=int, default=64, help="draft nodes of the tree whose expectation is shown")
    p.add_argument("--json", help="append one JSON line per evaluation")
    a = p.parse_args(argv)
    for d in a.graft_dirs:
        if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
            print(f"error: {d} has no metrics.jsonl: give a folder that `graft train` wrote to", file=sys.stderr)
            return 2
        print(f"{d}")
        print(f"{'step':>7}{'minutes':>9}  {'top-1 by depth':<44}{'chain':>7}{f'{a.nodes} nodes':>10}")
        for rec in points(d):
            ev = rec["eval"]
            acc = ev["rank_accuracy"]
            K = len(acc)
            tau_chain = expected_tokens(acc, chain(K))
            tau_tree = expected_tokens(acc, build_tree(acc, a.nodes))
            mins = f"{rec['minutes']:.1f}" if "minutes" in rec else "-"
            top1 = " ".join(f"{x:.3f}" for x in ev["top1"])
            print(f"{rec['step']:>7}{mins:>9}  {top1:<44}{tau_chain:>7.2f}{tau_tree:>10.2f}")
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"dir": d, "step": rec["step"], "minutes": rec.get("minutes"), "top1": ev["top1"],
                                        "expected_chain": tau_chain, "expected_tree": tau_tree,
                                        "nodes": a.nodes, "final": bool(rec.get("final"))}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
