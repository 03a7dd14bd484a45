"""graft's own export: the backbone as Hugging Face safetensors with its tokenizer, the heads, and
graft.json with the draft tree calibrated from training's accuracy; `graft.load` and
`graft generate` read it."""
from __future__ import annotations

import torch

from .. import checkpoint as ckpt
from ..backbone import _folder_fingerprint, drop_gguf_tag
from ..config import GraftConfig
from ..tree import build_tree, default_accuracies
from .formats import Format


def write(folder: str, model, options: dict) -> None:
    config, hf = model.config, model.backbone.hf
    if config.lora:
        ckpt.merge_lora(hf)
    # with --keep-4bit, bitsandbytes' own serialisation (safetensors), which loads back 4-bit
    drop_gguf_tag(hf)
    hf.save_pretrained(folder, safe_serialization=True, max_shard_size=options["max_shard_size"])
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    ident = config.backbone
    training = dict(config.training or {})
    training["trained_on"] = ident.describe()
    acc = training.get("rank_accuracy") or default_accuracies(config.heads.num_heads)
    size = options["tree_size"] or (64 if torch.cuda.is_available() else 24)
    new_ident = type(ident)(**{**ident.__dict__, "source": ".", "sha256": _folder_fingerprint(folder),
                               "gguf_file": None, "dtype": options["target"], "load_in_4bit": options["keep_4bit"],
                               "revision": None})
    new = GraftConfig(backbone=new_ident, heads=config.heads, training=training, tree=build_tree(acc, size), lora=None)
    ckpt.save_heads(folder, model.heads, new)
    ckpt.save_config(folder, new)


FORMAT = Format("graft", write, backbone=True)
