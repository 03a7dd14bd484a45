"""4-bit NF4 backbones (bitsandbytes runs them on CPU too)."""
import pytest
import torch

pytest.importorskip("bitsandbytes")

from graft.model import add_heads, load  # noqa: E402
from graft.train import train  # noqa: E402


def test_4bit_backbone_graft_train_and_lossless_decode(tiny_dirs, tiny_data, tokenizer, tmp_path):
    g = str(tmp_path / "g")
    m = add_heads(tiny_dirs["llama"], heads="meta-mtp", num_heads=2, out=g, device="cpu", load_in_4bit=True)
    assert type(m.backbone.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert m.config.backbone.load_in_4bit
    # the head layer is a full-precision, trainable copy of the quantized last layer
    assert all(p.dtype == torch.float32 and p.requires_grad for p in m.heads.parameters())
    train(g, tiny_data, {"max_steps": 3, "seq_len": 16, "batch_size": 4, "warmup": 1, "eval_every": 100},
          device="cpu", progress=False)
    m = load(g, device="cpu")
    assert m.backbone.identity.load_in_4bit
    ids = tokenizer("the quick brown")["input_ids"]
    ref = m.backbone.hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, len(ids):].tolist()
    assert m.generate(input_ids=ids, max_new_tokens=16).ids == ref
