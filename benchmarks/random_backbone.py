"""A backbone of a real model's shape with random weights, for GPU checks that need no model
transfer (the lent GPU machine can download nothing, and a model travels in several calls).
Random weights say nothing about acceptance; they exercise every index a decoding step takes:
cache slots to the context window's end, trees of any size, the vocabulary's width.

    python benchmarks/random_backbone.py shape MODEL OUT   # any machine: MODEL's config and tokenizer (a few MB)
    python benchmarks/random_backbone.py build SHAPE OUT   # where the check runs: random weights, bf16 on CUDA

MODEL is anything `graft add-heads` takes (smollm2-135m, gemma3-270m, a folder, a .gguf file).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shape(model: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from graft.backbone import resolve_source

    kind, loc, gguf = resolve_source(model)
    where, kw = (os.path.dirname(loc), {"gguf_file": gguf}) if kind == "gguf" else (loc, {})
    AutoConfig.from_pretrained(where, **kw).save_pretrained(out)
    AutoTokenizer.from_pretrained(where, **kw).save_pretrained(out)


def build(shape_dir: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(shape_dir)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["shape", "build"])
    ap.add_argument("source")
    ap.add_argument("out")
    args = ap.parse_args()
    (shape if args.what == "shape" else build)(args.source, args.out)


if __name__ == "__main__":
    main()
