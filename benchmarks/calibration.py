"""How well training's held-out figures predict decoding. For trained heads: the tokens per step
that the decoding fit expects from held-out accuracies, counted over every position of the packed
data (prompts and chat template included) and over the answers alone, against the tokens per step
that decoding gets with the same tree on unseen prompts. A ratio near 1 is a fit that sizes trees
by what will land.

    python benchmarks/calibration.py GRAFT_DIR --prompts bench.jsonl [--data DATA] [--per-category 2]
        [--max-new-tokens 64] [--tree-size 8] [--json OUT]

DATA defaults to the data the heads were trained on (graft.json); the held-out slice is the one
training held out (its seed and fraction are the defaults).
"""
import argparse
import contextlib
import json

import torch

from graft.bench import read_prompts
from graft.config import TrainConfig
from graft.data import load_records, pack, split_blocks
from graft.model import encode_prompt, load
from graft.train import evaluate
from graft.tree import build_tree, chain, expected_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graft_dir")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--data")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tree-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()

    m = load(args.graft_dir, device=args.device)
    trained = m.config.training or {}
    data = args.data or trained.get("data")
    if not data or "seq_len" not in trained:
        raise SystemExit("these heads record no training data: train them with graft train, or give --data")
    tc = TrainConfig(seq_len=trained["seq_len"], batch_size=args.eval_batch_size)
    blocks, answers = pack(load_records(data), m.tokenizer, tc.seq_len)
    _, held = split_blocks(len(blocks), tc.eval_fraction, tc.seed)
    cuda = m.backbone.device.type == "cuda"
    auto = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    acc = {"every position": evaluate(m, blocks[held], tc, auto)["rank_accuracy"],
           "answers": evaluate(m, blocks[held], tc, auto, answers=answers[held])["rank_accuracy"]}
    counted = answers[held][:, 1:].float().mean().item()

    prompts = read_prompts(args.prompts, None, args.per_category)
    K = m.heads.num_heads
    trees = {"chain": chain(K), f"{args.tree_size} nodes": build_tree(acc["every position"], args.tree_size)}
    report = {"graft_dir": args.graft_dir, "data": data, "answer_share": counted, "n_prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "depth1_top1": {k: a[0][0] for k, a in acc.items()}, "trees": {}}
    for name, paths in trees.items():
        tokens = steps = 0
        kw = {"tree": "chain"} if name == "chain" else {"tree_size": args.tree_size}
        for p in prompts:
            ids = encode_prompt(m.tokenizer, p["turns"][0], True)
            g = m.generate(input_ids=ids, max_new_tokens=args.max_new_tokens, **kw)
            tokens, steps = tokens + g.step_tokens, steps + g.steps
        got = tokens / max(steps, 1)
        expected = {k: expected_tokens(a, paths) for k, a in acc.items()}
        report["trees"][name] = {"decoded": got, **{f"expected ({k})": e for k, e in expected.items()}}
        print(f"{name:>10}: decoded {got:.2f} tokens a step; the fit expects "
              + ", ".join(f"{e:.2f} from {k} ({got / e:.2f}x)" for k, e in expected.items()))
    print("held-out top-1 at depth 1: " + ", ".join(f"{a[0][0]:.3f} over {k}" for k, a in acc.items())
          + f"; answers are {counted:.1%} of the held-out positions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
