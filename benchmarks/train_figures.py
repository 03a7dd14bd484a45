"""Training figures of `graft train`: throughput and peak GPU memory. Prints them.

  throughput: training tokens/s (backbone forward without grad, all heads, chunked KL loss,
              backward, AdamW step) against the backbone's forward-only tokens/s (logits for
              every position, as `model(ids)` gives them) at the same batch and sequence length.
  memory:     peak GPU memory of training steps with a randomly initialised backbone of a given
              shape (default: Llama-3-8B) quantized to 4 bits (NF4, double quantization).

Examples (GPU):
  python benchmarks/train_figures.py throughput --model smollm2-135m --family medusa --batch 32 --seq 512
  python benchmarks/train_figures.py throughput --shape llama3-8b --family blockwise --batch 1 --seq 2048 [--4bit]
      [--draft-vocab 32768]
  python benchmarks/train_figures.py memory --family medusa --heads 4 --seq 2048 --shared-lm-head
Random token ids stand in for text: speed and memory do not depend on what the tokens say.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from graft.bench import device_name, sync
from graft.config import TrainConfig
from graft.losses import chunk_rows
from graft.model import add_heads
from graft.optim import make_optimizer
from graft.train import micro_step

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
}


def _timed(fn, dev, warmup, steps):
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / steps


def _trainer(model, tc):
    bb, heads = model.backbone, model.heads
    heads.cast(torch.float32).train().requires_grad_(True)  # as `graft train` sets them up
    opt = make_optimizer(heads.parameters(), lr=1e-4, weight_decay=0.0)
    cuda = bb.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(ids):
        opt.zero_grad(set_to_none=True)
        st = micro_step(bb, heads, ids, tc, autocast)
        torch.nn.utils.clip_grad_norm_(heads.parameters(), tc.max_grad_norm)
        opt.step()
        return st["loss"]

    return step, opt


def throughput(a):
    if a.shape:
        bb = random_backbone(a.shape, _device(a), four_bit=a.four_bit)
        model = add_heads(bb, heads=a.family, num_heads=a.heads, draft_vocab=a.draft_vocab)
    else:
        model = add_heads(a.model, heads=a.family, num_heads=a.heads, device=a.device, draft_vocab=a.draft_vocab,
                          load_in_4bit=a.four_bit)
    bb = model.backbone
    if a.draft_vocab:  # which tokens does not matter for the cost
        model.heads.set_draft_vocab(torch.rand(bb.vocab_size))
    dev = bb.device
    tc = TrainConfig(seq_len=a.seq, batch_size=a.batch, num_heads=a.heads, vocab_chunk=a.vocab_chunk)
    ids = torch.randint(0, bb.vocab_size, (a.batch, a.seq), device=dev)
    with torch.no_grad():
        fwd = _timed(lambda: bb.hf(input_ids=ids, use_cache=False).logits, dev, a.warmup, a.steps)
    step, _ = _trainer(model, tc)
    trn = _timed(lambda: step(ids), dev, a.warmup, a.steps)
    n = a.batch * a.seq
    out = {"figure": "throughput", "model": f"random {a.shape}" if a.shape else a.model, "family": a.family,
           "heads": a.heads, "batch": a.batch, "seq": a.seq, "four_bit": a.four_bit, "draft_vocab": a.draft_vocab,
           "vocab_chunk": chunk_rows(a.vocab_chunk, bb.vocab_size),
           "dtype": str(bb.dtype).removeprefix("torch."), "device": device_name(dev),
           "forward_tokens_per_s": n / fwd, "train_tokens_per_s": n / trn, "train_over_forward": fwd / trn}
    print(f"{a.family} x{a.heads} on {out['model']}{' 4-bit' if a.four_bit else ''}, draft vocabulary "
          f"{a.draft_vocab or 'all'}, batch {a.batch} x {a.seq}, {out['dtype']}, {out['device']}: "
          f"backbone forward {out['forward_tokens_per_s']:.0f} tok/s, training {out['train_tokens_per_s']:.0f} tok/s "
          f"({out['train_over_forward']:.2f} of forward)")
    return out


def _quantize_linears(module, dev):
    """Replace every nn.Linear under `module` by a bitsandbytes NF4 Linear4bit (double quantization)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(dev), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(dev)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q)
        else:
            _quantize_linears(child, dev)


def _device(a):
    return torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def random_backbone(shape: str, dev, four_bit: bool = True):
    """A random-weight Llama of `shape` in bf16 on `dev`, its projections quantized to NF4 when
    `four_bit` (one layer at a time: never the whole model in bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from graft.backbone import Backbone

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    for layer in hf.model.layers:
        layer.to_empty(device=dev).to(torch.bfloat16)
        for p in layer.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
            else:
                torch.nn.init.ones_(p)
        if four_bit:
            _quantize_linears(layer, dev)
    for mod in (hf.model.embed_tokens, hf.model.norm, hf.lm_head):
        mod.to_empty(device=dev).to(torch.bfloat16)
    torch.nn.init.normal_(hf.model.embed_tokens.weight, std=0.02)
    torch.nn.init.normal_(hf.lm_head.weight, std=0.02)
    torch.nn.init.ones_(hf.model.norm.weight)
    with torch.device(dev):  # recompute the rotary inv_freq buffer that to_empty would leave unset
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)
    return Backbone.from_hf(hf, source=f"random {shape}")


def memory(a):
    dev = _device(a)
    t0 = time.perf_counter()
    bb = random_backbone(a.shape, dev)
    model = add_heads(bb, heads=a.family, num_heads=a.heads, shared_lm_head=a.shared_lm_head,
                      lm_head_dtype=a.lm_head_dtype, draft_vocab=a.draft_vocab)
    if a.draft_vocab:
        model.heads.set_draft_vocab(torch.rand(bb.vocab_size))
    build_s = time.perf_counter() - t0
    tc = TrainConfig(seq_len=a.seq, batch_size=a.batch, num_heads=a.heads, vocab_chunk=a.vocab_chunk)
    step, opt = _trainer(model, tc)
    ids = torch.randint(0, bb.vocab_size, (a.batch, a.seq), device=dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    weights = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    losses = []
    per_step = _timed(lambda: losses.append(step(ids)), dev, 1, a.steps)
    gib = 2 ** 30
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    reserved = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else 0
    out = {"figure": "memory", "shape": a.shape, "family": a.family, "heads": a.heads,
           "shared_lm_head": a.shared_lm_head, "lm_head_dtype": a.lm_head_dtype, "draft_vocab": a.draft_vocab,
           "batch": a.batch, "seq": a.seq,
           "vocab_chunk": chunk_rows(a.vocab_chunk, bb.vocab_size), "optimizer": type(opt).__name__,
           "backbone": "4-bit NF4 (double quant), random weights", "device": device_name(dev),
           "head_params": sum(p.numel() for p in model.heads.parameters()),
           "before_training_gib": weights / gib, "peak_allocated_gib": peak / gib, "peak_reserved_gib": reserved / gib,
           "seconds_per_step": per_step, "build_seconds": build_s, "loss": losses[-1]}
    print(f"{a.family} x{a.heads} ({'shared' if a.shared_lm_head else 'own'} LM heads, "
          f"{out['head_params'] / 1e6:.0f}M head params) on a 4-bit {a.shape}, batch {a.batch} x {a.seq}, "
          f"{out['device']}: peak {out['peak_allocated_gib']:.1f} GiB allocated ({out['peak_reserved_gib']:.1f} "
          f"reserved; {out['before_training_gib']:.1f} before the first step), {per_step:.2f} s/step, "
          f"loss {losses[-1]:.3f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    t = sub.add_parser("throughput", help="training tokens/s against backbone forward-only tokens/s")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight Llama of this shape instead of --model")
    t.add_argument("--4bit", dest="four_bit", action="store_true", help="the backbone quantized to NF4")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq", type=int, default=512)
    m = sub.add_parser("memory", help="peak GPU memory with a 4-bit backbone of a given shape")
    m.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--seq", type=int, default=2048)
    m.add_argument("--shared-lm-head", action="store_true", help="medusa: heads share the backbone's LM head")
    m.add_argument("--lm-head-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="medusa's own LM heads (auto: bfloat16 on the bf16 backbone)")
    for q in (t, m):
        q.add_argument("--family", default="medusa")
        q.add_argument("--heads", type=int, default=4)
        q.add_argument("--draft-vocab", type=int, default=None, help="heads score only N tokens (FR-Spec)")
        q.add_argument("--vocab-chunk", type=int, default=TrainConfig.vocab_chunk,
                       help="rows of logits per loss chunk (0: graft's default, sized by the vocabulary)")
        q.add_argument("--steps", type=int, default=5)
        q.add_argument("--warmup", type=int, default=2)
        q.add_argument("--device", default="auto")
        q.add_argument("--json", help="append the figure as one JSON line to this file")
    a = p.parse_args(argv)
    out = throughput(a) if a.figure == "throughput" else memory(a)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
