"""What a decoding step's matrix products cost on this CPU, by the number of rows (tokens) they
carry: F.linear against graft.modeling.linear (the weight first, one row padded to two).

A decoding step reads every weight once, so its products are bound by memory. The weights are
random, of SmolLM2-135M's shapes (30 layers of q, k, v, o, gate, up, down; the 49,152-token
unembedding), and each is read once per pass, as in a step: none stays in the processor's cache.

    python benchmarks/cpu_products.py [--rows 1,2,3,4,8,16] [--repeats 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from graft.modeling import linear

D, FFN, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,8,16")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [(D, D), (KV, D), (KV, D), (D, D), (FFN, D), (FFN, D), (D, FFN)] * LAYERS + [(VOCAB, D)]
    weights = [torch.randn(*s) for s in shapes]
    mb = sum(w.numel() for w in weights) * 4 / 2**20
    print(f"{len(weights)} float32 weights, {mb:.0f} MiB, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'rows':>5}{'F.linear ms':>14}{'linear ms':>12}{'ratio':>8}")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(1, rows, w.shape[1]) for w in weights]
            times = {}
            for name, fn in (("F.linear", F.linear), ("linear", linear)):
                runs = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    for w, x in zip(weights, xs):
                        fn(x, w)
                    runs.append(time.perf_counter() - t0)
                times[name] = statistics.median(runs) * 1e3
            print(f"{rows:>5}{times['F.linear']:>14.1f}{times['linear']:>12.1f}{times['F.linear'] / times['linear']:>7.2f}x")


if __name__ == "__main__":
    main()
