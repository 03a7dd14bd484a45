"""Print one Markdown table from several `graft bench --json` reports (one per head family).

Baselines that decode with the backbone alone (eager, static, lookup) may have been measured in
one report only; each family's speedup over them is computed from that report's tokens/s. The
no-draft column is each report's own (graft's loop with the same engine).

  python benchmarks/bench_table.py runs/bench-*.json
"""
import json
import sys


def main(paths):
    reports = [json.load(open(p)) for p in paths]
    shared = {}
    for r in reports:
        for k, v in r["tokens_per_s"].items():
            if k not in ("graft", "nodraft"):
                shared.setdefault(k, v)
    cols = [k for k in ("eager", "static", "lookup") if k in shared]
    r0 = reports[0]
    print(f"{r0['device']}, {r0['dtype']}, batch 1, {r0['n_prompts']} prompts, {r0['max_new_tokens']} new tokens, "
          f"engine {r0['notes'].get('engine', '?')}; baselines (tok/s): "
          + ", ".join(f"{k} {shared[k]:.1f}" for k in cols))
    head = ["family", "engine", "train min", "tau", "graft tok/s", "nodraft tok/s", "x nodraft"] + \
        [f"x {c}" for c in cols] + ["identical (eager / nodraft)", "acceptance by depth"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in reports:
        t = r["tokens_per_s"]
        g = t["graft"]
        ident = "/".join("-" if r.get(k) is None else f"{r[k]:.2f}"
                         for k in ("identical_rate", "identical_nodraft_rate"))
        minutes = r.get("training_minutes")
        row = [r["family"], r["notes"].get("engine", "?"), f"{minutes:.1f}" if minutes else "?",
               f"{r['tau']:.2f}", f"{g:.1f}",
               f"{t['nodraft']:.1f}" if "nodraft" in t else "-",
               f"{g / t['nodraft']:.2f}x" if t.get("nodraft") else "-"]
        row += [f"{g / shared[c]:.2f}x" for c in cols]
        row += [ident, " ".join(f"{a:.2f}" for a in r["acceptance_by_depth"])]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
