"""The four head families behind one small registry.

Every family implements the same two faces:
- training: `hidden(bb, trunk, final, ids)` -> K per-head representations (B, T, d), and
  `logits(bb, k, h)` -> vocabulary logits, so losses can be computed in vocabulary chunks;
- decoding: `new_state`, `commit` (feed the backbone states of newly accepted positions) and
  `draft` (logits for the next K tokens after the last accepted one).

Head k (0-based) at position i predicts token i+k+2: the backbone itself predicts i+1.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import GraftError, HeadSpec


class Heads(nn.Module):
    family = ""
    parallel = True  # heads draft independently of each other's choices -> tree drafting works
    chained_tree = False  # a chained family that drafts a tree depth by depth (draft_tree)

    @property
    def drafts_trees(self) -> bool:
        """Greedy decoding drafts a tree: per-depth top-k (parallel) or depth by depth (chained)."""
        return self.parallel or self.chained_tree

    def __init__(self, spec: HeadSpec, bb):
        super().__init__()
        self.spec = spec
        self.num_heads = spec.num_heads

    def hidden(self, bb, trunk, final, ids) -> list[torch.Tensor]:
        raise NotImplementedError

    def logits(self, bb, k: int, h: torch.Tensor) -> torch.Tensor:
        """Default: the backbone's shared final norm and unembedding."""
        return bb.lm_head(bb.norm(h.to(bb.dtype))).float()

    def new_state(self, bb, max_len: int) -> dict:
        return {}

    def commit(self, bb, state, trunk, final, next_tokens, start: int) -> None:
        """Positions start..start+a-1 are accepted; trunk/final: (1, a, d); next_tokens: (1, a)."""
        state["final"] = final[:, -1:]

    def tree_logits(self, bb, state, trunk, final, positions, start, mask) -> torch.Tensor:
        """(K, N, V) logits of every head at every node of a verified tree (parallel heads only).

        trunk, final: (1, N, d) backbone states of the nodes; positions, start and mask as the
        backbone's forward got them, for heads that attend (meta-mtp)."""
        raise NotImplementedError

    def keep(self, state, start: int, path: torch.Tensor) -> None:
        """The tree nodes `path` were accepted: compact whatever the heads cached for the tree."""

    def draft_tree(self, bb, state, tree) -> torch.Tensor:
        """Chained families: (N,) greedy tokens of the tree's nodes on the device, node 0 holding
        the last known token."""
        raise NotImplementedError

    def draft(self, bb, state, pick) -> list[torch.Tensor]:
        """Logits (V,) for the K tokens after the last accepted one. `pick(k, logits) -> token id`
        chooses draft k; chained families feed it forward, parallel families may ignore it."""
        raise NotImplementedError


def copy_last_layer(bb, init: str) -> nn.Module:
    """A trainable full-precision layer of the backbone's own architecture.

    init="copy" copies the backbone's last decoder layer (dequantizing 4-bit weights);
    init="random" draws it with the backbone's own initializer.
    """
    from ..backbone import dense_weight

    src = bb.layers[-1]
    layer = type(src)(bb.config, len(bb.layers) - 1)
    if init == "random":
        layer.apply(bb.hf._init_weights)
    else:
        src_modules = dict(src.named_modules())
        with torch.no_grad():
            for name, mod in layer.named_modules():
                own = dict(mod.named_parameters(recurse=False))
                if "weight" in own:
                    mod.weight.copy_(dense_weight(src_modules[name]).view_as(mod.weight))
                if "bias" in own:
                    mod.bias.copy_(src_modules[name].bias.detach().float())
    return layer.float().train().requires_grad_(True)


def rms_eps(bb) -> float:
    return float(getattr(bb.config, "rms_norm_eps", None) or getattr(bb.config, "layer_norm_epsilon", 1e-6))


def build_heads(spec: HeadSpec, bb) -> Heads:
    from .blockwise import BlockwiseHeads
    from .deepseek_mtp import DeepSeekMTPHeads
    from .medusa import MedusaHeads
    from .meta_mtp import MetaMTPHeads

    registry = {c.family: c for c in (BlockwiseHeads, MedusaHeads, MetaMTPHeads, DeepSeekMTPHeads)}
    if spec.family not in registry:
        raise GraftError(f"unknown head family {spec.family!r}: choose one of {', '.join(registry)}")
    heads = registry[spec.family](spec, bb)
    return heads.to(bb.device).eval()  # graft train switches to train mode (dropout, where a layer has it)


__all__ = ["Heads", "build_heads", "copy_last_layer", "rms_eps"]
