"""GraftModel: a frozen backbone with grafted heads, and the public Python API."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import checkpoint as ckpt
from .backbone import DTYPES, Backbone, decode_weights, load_backbone
from .config import GraftConfig, GraftError, HeadSpec
from .heads import build_heads, check_spec


@dataclass
class GraftOutput:
    logits: torch.Tensor  # (B, T, V): the backbone's next-token logits
    head_logits: list  # K tensors (B, T, V); head_logits[k-1] (depth k) at position i predicts token i+k+1


class GraftModel(nn.Module):
    def __init__(self, backbone: Backbone, heads, config: GraftConfig):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.config = config

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def forward(self, input_ids: torch.Tensor) -> GraftOutput:
        """One backbone forward and every head (deepseek-mtp teacher-forced on input_ids)."""
        bb = self.backbone
        ids = input_ids.to(bb.device)
        B, T = ids.shape
        positions = torch.arange(T, device=ids.device).expand(B, T)
        trunk, final = bb.forward(ids, positions, features=self.heads.features)
        hs = self.heads.hidden(bb, trunk, final, ids)
        return GraftOutput(bb.logits(final).float(), [self.heads.logits(bb, k, h) for k, h in enumerate(hs)])

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    def summary(self) -> dict:
        bb = self.backbone
        n_heads = self.trainable_parameters()
        n_bb = bb.num_parameters()
        head_bytes = sum(p.numel() * p.element_size() for p in self.heads.parameters())
        bb_bytes = bb.hf.get_memory_footprint()
        return {
            "backbone": bb.identity.describe(),
            "family": self.config.heads.family,
            "num_heads": self.config.heads.num_heads,
            "head_layers": self.config.heads.head_layers,
            "trainable_params": n_heads,
            "backbone_params": n_bb,
            "trainable_share": n_heads / max(n_bb, 1),
            "heads_mb": head_bytes / 2**20,
            "backbone_mb": bb_bytes / 2**20,
        }

    def save(self, path: str, force: bool = False) -> None:
        ckpt.prepare_out_dir(path, force)
        with ckpt.folder_lock(path, "grafting new heads into it"):
            ckpt.clear_training_state(path)  # an older run's checkpoint must not resume onto new heads
            ckpt.save_heads(path, self.heads, self.config)
            ckpt.save_config(path, self.config)

    def generate(self, prompt: str | None = None, *, input_ids=None, chat: bool = True, **kwargs):
        """Self-speculative generation; see `graft.speculative.DecodeConfig` for the options.

        Returns a `graft.speculative.Generation` (token ids, text, statistics).
        """
        from .speculative import DecodeConfig, SpeculativeDecoder

        cfg = DecodeConfig(**kwargs)
        if input_ids is None:
            if prompt is None:
                raise GraftError("generate needs a prompt or input_ids")
            input_ids = encode_prompt(self.tokenizer, prompt, chat)
        if getattr(self, "_decoder", None) is None:  # keeps the static engines' cache and graphs
            self._decoder = SpeculativeDecoder(self)
        return self._decoder.generate(input_ids, cfg)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """One user prompt -> ids, as `distill-data` encodes the prompts it answers."""
    from .data import encode_chat

    if tokenizer is None:
        raise GraftError("this model has no tokenizer: pass input_ids")
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}], chat)


def add_heads(model: str | Backbone = "smollm2-135m", heads: str = "medusa", num_heads: int = 4, *,
              head_layers: int = 1, shared_lm_head: bool = False, lm_head_dtype: str = "auto", init: str = "copy",
              aux_layers=None,
              draft_vocab: int | None = None, out: str | None = None,
              force: bool = False, dtype: str = "auto", device: str = "auto", load_in_4bit: bool = False,
              trust_remote_code: bool = False, seed: int = 0) -> GraftModel:
    """Graft fresh heads onto a frozen backbone (and save them to `out` if given).

    Args:
        model: an HF folder, a .gguf file, a hub id, the alias `smollm2-135m`, or a loaded Backbone.
        heads: blockwise, medusa, meta-mtp, deepseek-mtp or eagle.
        num_heads: K, tokens drafted ahead (1..8).

    Raises:
        GraftError: on bad input (see the CLI's help for each option).
    """
    spec = HeadSpec(family=heads, num_heads=num_heads, head_layers=head_layers, shared_lm_head=shared_lm_head,
                    lm_head_dtype=lm_head_dtype, init=init, aux_layers=aux_layers, draft_vocab=draft_vocab)
    check_spec(spec)
    if out is not None:
        ckpt.prepare_out_dir(out, force)  # refuse before the slow load
    bb = model if isinstance(model, Backbone) else load_backbone(
        model, dtype=dtype, device=device, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    head_module = build_heads(spec, bb)
    gm = GraftModel(bb, head_module, GraftConfig(backbone=bb.identity, heads=spec))
    if out is not None:
        gm.save(out, force=True)
    return gm


def load(path: str, *, device: str = "auto", dtype: str | None = None, backbone: Backbone | None = None,
         load_in_4bit: bool | None = None, trust_remote_code: bool = False,
         heads_dtype: str | None = None, verify_backbone: bool = True,
         decode_dtype: str | None = None) -> GraftModel:
    """Load a graft folder (from add-heads, train or export).

    The backbone is loaded from the source recorded in graft.json (an export carries its own),
    and must be the one the heads were made for: the same shape and, unless `verify_backbone`
    is off, the same weights (a hash of the weight files). Heads are cast to the backbone's dtype unless
    `heads_dtype` says otherwise ("float32" for training). `decode_dtype` (decoding only): how a
    4-bit backbone holds its weights, see `graft.backbone.decode_weights`.

    Raises:
        GraftError: not a graft folder, corrupt files, or heads made for another backbone.
    """
    config = ckpt.load_config(path)
    check_spec(config.heads)  # before the backbone's slow load
    ident = config.backbone
    if backbone is None:
        source = ident.source
        if source == ".":
            source = path
        elif ident.gguf_file and not os.path.exists(source) and source.endswith(".gguf"):
            raise GraftError(f"the backbone file {source} recorded in graft.json is gone: restore it or re-graft")
        backbone = load_backbone(source, dtype=dtype or "auto", device=device,
                                 load_in_4bit=ident.load_in_4bit if load_in_4bit is None else load_in_4bit,
                                 trust_remote_code=trust_remote_code)
    if not backbone.identity.same_model(ident, weights=verify_backbone):
        raise GraftError(f"heads in {path} were made for {ident.describe()}, not {backbone.identity.describe()}: "
                         "load them with their own backbone or graft new heads")
    if config.lora:
        ckpt.load_lora_into(path, GraftModel(backbone, None, config), config.lora)
    heads = build_heads(config.heads, backbone)
    ckpt.load_heads_into(path, heads, config)
    target = DTYPES.get(heads_dtype or "", backbone.dtype)
    heads.cast(target).eval().requires_grad_(False)
    if decode_dtype is not None:
        backbone.weights_note = decode_weights(backbone, decode_dtype)
    return GraftModel(backbone, heads, config)
