"""Serving exports, read back the way the serving engines read them."""
import json

import pytest
import torch
from safetensors.torch import load_file

from graft.config import GraftError
from graft.export import export
from graft.model import add_heads, load


def vllm_medusa_logits(folder, normed):
    """vLLM's Medusa drafter on the target's normalised hidden states, following its config and
    weight loading rules (vllm-project/vllm@01dbb08, models/medusa.py; @0531c22, configs/medusa.py)."""
    cfg = json.load(open(folder / "config.json"))
    for k in list(cfg):  # MedusaConfig.from_pretrained's renaming
        if "num" in k and "heads" in k:
            cfg["num_heads"] = cfg.pop(k)
        elif "num" in k and "layers" in k:
            cfg["num_hidden_layers"] = cfg.pop(k)
    w = {k.replace("medusa_heads.", ""): v.float() for k, v in load_file(folder / "model.safetensors").items()}
    bias = cfg.get("medusa_fc_bias", False)
    out = []
    for h in range(cfg["num_heads"]):
        x = normed
        for l in range(cfg["num_hidden_layers"]):
            y = x @ w[f"blocks.{h}.layers.{l}.weight"].T
            if bias:
                y = y + w[f"blocks.{h}.layers.{l}.bias"]
            x = x + torch.nn.functional.silu(y)
        head = w["lm_heads.0.weight"] if cfg.get("original_lm_head", False) else w[f"lm_heads.{h}.weight"]
        assert head.shape[0] == cfg.get("truncated_vocab_size", cfg.get("vocab_size", 32001))
        out.append(x @ head.T)
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_vllm_medusa_export_reproduces_the_heads(shared, tiny_dirs, tmp_path):
    g = str(tmp_path / "g")
    m = add_heads(tiny_dirs["llama"], heads="medusa", num_heads=3, head_layers=2, shared_lm_head=shared, out=g,
                  device="cpu")
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.save(g, force=True)
    export(g, str(tmp_path / "v"), format="vllm-medusa")
    m = load(g, device="cpu", heads_dtype="float32")
    ids = torch.randint(4, 40, (1, 9))
    with torch.no_grad():
        want = m(ids).head_logits
        _, final = m.backbone.forward(ids, torch.arange(9)[None])
        got = vllm_medusa_logits(tmp_path / "v", m.backbone.norm(final).float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_serving_formats_refuse_other_families(tiny_dirs, tmp_path):
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="blockwise", num_heads=2, out=g, device="cpu")
    with pytest.raises(GraftError, match="medusa heads"):
        export(g, str(tmp_path / "v"), format="vllm-medusa")
    with pytest.raises(GraftError, match="unknown --format"):
        export(g, str(tmp_path / "v"), format="onnx")
