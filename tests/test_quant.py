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
    assert m.generate(input_ids=ids, max_new_tokens=16, tree="calibrated").ids == ref


def test_4bit_decoding_dequantized_and_kept_4bit_export(tiny_dirs, tiny_data, tokenizer, tmp_path):
    """--decode-dtype float32 decodes with dense copies of the 4-bit weights, token for token as
    greedy decoding with those weights (bitsandbytes' own 4-bit kernels round differently, so the
    reference is the dequantized backbone's generate); 4bit keeps the quantized projections and
    matches their generate; --keep-4bit writes an export that loads back 4-bit."""
    from graft.backbone import decode_weights
    from graft.export import export
    from graft.config import GraftError

    g, out = str(tmp_path / "g"), str(tmp_path / "e")
    add_heads(tiny_dirs["llama"], heads="eagle", num_heads=2, out=g, device="cpu", load_in_4bit=True)
    train(g, tiny_data, {"max_steps": 3, "seq_len": 16, "batch_size": 4, "warmup": 1, "eval_every": 100},
          device="cpu", progress=False)
    m = load(g, device="cpu")
    ids = tokenizer("the quick brown")["input_ids"]
    ref = m.backbone.hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, len(ids):].tolist()
    dense = load(g, device="cpu", decode_dtype="float32")
    assert not dense.backbone.quantized and dense.backbone.identity.load_in_4bit
    assert "dequantized to float32" in dense.backbone.weights_note
    assert type(dense.backbone.layers[0].mlp.up_proj) is torch.nn.Linear
    dense_ref = dense.backbone.hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                           pad_token_id=0)[0, len(ids):].tolist()
    assert dense.generate(input_ids=ids, max_new_tokens=16, tree="calibrated").ids == dense_ref
    kept = load(g, device="cpu", decode_dtype="4bit")
    assert kept.backbone.quantized and kept.generate(input_ids=ids, max_new_tokens=16, tree="calibrated").ids == ref
    plain = str(tmp_path / "d")
    add_heads(tiny_dirs["llama"], heads="medusa", out=plain, device="cpu")
    with pytest.raises(GraftError, match="applies to 4-bit backbones"):
        decode_weights(load(plain, device="cpu").backbone, "bfloat16")

    export(g, out, keep_4bit=True)
    e = load(out, device="cpu", decode_dtype="4bit")
    assert e.backbone.quantized and e.config.backbone.load_in_4bit
    assert e.generate(input_ids=ids, max_new_tokens=16, tree="calibrated").ids == ref
    with pytest.raises(GraftError, match="--keep-4bit"):
        export(plain, str(tmp_path / "e2"), keep_4bit=True)
