"""Medusa heads for vLLM's Medusa drafter (vLLM 0.30-0.32; later releases have none)."""
from __future__ import annotations

import os

from ..checkpoint import save_tensors
from ..config import GraftError, write_json
from .formats import Format

VLLM_MEDUSA_CHECKED = "vllm-project/vllm@01dbb08 (models/medusa.py), @0531c22 (transformers_utils/configs/medusa.py)"


def save_vllm_medusa(path: str, heads, bb, dtype) -> None:
    """Medusa heads as vLLM's Medusa drafter loads them (checked against VLLM_MEDUSA_CHECKED).

    vLLM applies `blocks.{h}` (residual SiLU layers `layers.{l}`) to the target's final
    normalised hidden state and `lm_heads.{h}` to the result, as graft's medusa heads do. Its
    config loader renames any key holding both "num" and "heads" to num_heads, and defaults
    `medusa_fc_bias` to false and `vocab_size` to 32001, so only Medusa's own keys are written,
    all of them explicitly. A shared LM head is written once, as `lm_heads.0` with
    `original_lm_head: true`."""
    shared = heads.lm_heads is None
    tensors = {}
    for h, seq in enumerate(heads.blocks):
        for l, block in enumerate(seq):
            tensors[f"blocks.{h}.layers.{l}.weight"] = block.linear.weight
            tensors[f"blocks.{h}.layers.{l}.bias"] = block.linear.bias
        if not shared:
            tensors[f"lm_heads.{h}.weight"] = heads.lm_heads[h].weight
    if shared:
        tensors["lm_heads.0.weight"] = bb.lm_head.weight
    tensors = {k: v.detach().to(dtype) for k, v in tensors.items()}
    vocab = bb.vocab_size
    if heads.draft_ids is not None:  # vLLM slices the LM heads by `token_map` itself
        tensors["token_map"] = heads.draft_ids.detach().cpu()
        vocab = heads.draft_ids.numel()
    save_tensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": bb.hidden_size,
              "vocab_size": bb.vocab_size, "truncated_vocab_size": vocab, "num_heads": heads.num_heads,
              "num_hidden_layers": heads.spec.head_layers, "medusa_fc_bias": True, "original_lm_head": shared,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    write_json(os.path.join(path, "config.json"), config)


def _check(config, options) -> None:
    if config.heads.draft_vocab:
        raise GraftError("vLLM's Medusa drafter (vLLM 0.30-0.32; later releases have none) builds its LM heads over "
                         "the whole vocabulary and cannot load a draft vocabulary's rows: export medusa heads grafted "
                         "without --draft-vocab")


VLLM_MEDUSA = Format("vllm-medusa", lambda folder, model, options: save_vllm_medusa(
    folder, model.heads, model.backbone, model.backbone.dtype), family="medusa", check=_check)
