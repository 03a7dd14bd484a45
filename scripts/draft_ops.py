"""Count the tensor operations (and time) of one deepseek-mtp tree draft on CPU.

    python scripts/draft_ops.py [MODEL] [--nodes 64]

Fresh heads, so the drafted tokens mean nothing; the count is what a GPU pays in launches for the
part of a step that runs outside the captured verification graph.
"""
import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from graft.model import add_heads
from graft.speculative import Tree, build_tree, default_accuracies


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    m = add_heads(a.model, heads="deepseek-mtp", num_heads=a.heads, device="cpu")
    bb, heads = m.backbone, m.heads
    tree = Tree(build_tree(default_accuracies(a.heads), a.nodes))
    ids = torch.tensor(bb.tokenizer("Explain how a bicycle works in detail, please.")["input_ids"])
    with torch.inference_mode():
        P = ids.numel()
        state, cache = heads.new_state(bb, 256), bb.new_cache(256)
        trunk, final = bb.forward(ids[None], torch.arange(P)[None], cache, 0, None)
        nxt = torch.cat([ids[1:], bb.logits(final[0, -1]).argmax()[None]])
        heads.commit(bb, state, trunk, final, nxt[None], 0)
        heads.draft_tree(bb, state, tree)
        count = Count()
        with count:
            heads.draft_tree(bb, state, tree)
        t = time.perf_counter()
        for _ in range(5):
            heads.draft_tree(bb, state, tree)
        ms = 1000 * (time.perf_counter() - t) / 5
    top = ", ".join(f"{k.split('.')[1]} {v}" for k, v in sorted(count.ops.items(), key=lambda x: -x[1])[:8])
    print(f"draft_tree, {tree.n}-node tree, {a.heads} modules: {sum(count.ops.values())} aten ops, {ms:.1f} ms ({top})")


if __name__ == "__main__":
    main()
