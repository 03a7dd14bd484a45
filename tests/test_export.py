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
    w = {k.replace("medusa_heads.", ""): v for k, v in load_file(folder / "model.safetensors").items()}
    token_map = w.pop("token_map", None)
    w = {k: v.float() for k, v in w.items()}
    if token_map is not None:  # vLLM keeps the map only where the vocabulary is truncated
        assert cfg["truncated_vocab_size"] == token_map.numel() < cfg["vocab_size"]
        w = {k: v[token_map] if k.startswith("lm_heads.") else v for k, v in w.items()}
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
        logits = x @ head.T
        if token_map is not None:  # vLLM's compute_logits: -inf outside the map
            logits = torch.full((*logits.shape[:-1], cfg["vocab_size"]), float("-inf")).index_copy(-1, token_map, logits)
        out.append(logits)
    return out


def grafted(tmp_path, tiny_dirs, family, fmt, scale, vocab, verifier=None, **kw):
    """Perturbed heads with an optional draft vocabulary, saved and exported as `fmt`; returns the
    graft folder's model (float32 heads) and the export's folder."""
    g = str(tmp_path / "g")
    m = add_heads(tiny_dirs["llama"], heads=family, num_heads=3, out=g, device="cpu", draft_vocab=vocab, **kw)
    tmp_path.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * scale)
        if vocab:
            m.heads.set_draft_vocab(torch.rand(m.backbone.vocab_size))
    m.save(g, force=True)
    export(g, str(tmp_path / "x"), format=fmt, verifier=verifier)
    return load(g, device="cpu", heads_dtype="float32"), tmp_path / "x"


@pytest.mark.parametrize("shared,vocab", [(False, None), (True, None)])
def test_vllm_medusa_export_reproduces_the_heads(shared, vocab, tiny_dirs, tmp_path):
    m, folder = grafted(tmp_path, tiny_dirs, "medusa", "vllm-medusa", 0.1, vocab, head_layers=2,
                        shared_lm_head=shared)
    ids = torch.randint(4, 40, (1, 9))
    with torch.no_grad():
        want = m(ids).head_logits
        _, final = m.backbone.forward(ids, torch.arange(9)[None])
        got = vllm_medusa_logits(folder, m.backbone.norm(final).float())
    for a, b in zip(got, want):
        if vocab:  # the drafter scores the map's tokens only
            ids = m.heads.draft_ids
            assert torch.isinf(a).sum() == a[..., 0].numel() * (a.shape[-1] - vocab)
            a, b = a[..., ids], b[..., ids]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_vllm_medusa_refuses_a_draft_vocabulary(tiny_dirs, tmp_path):
    """vLLM's Medusa builds its LM heads over the whole vocabulary and asserts on the map's rows."""
    with pytest.raises(GraftError, match="draft vocabulary"):
        grafted(tmp_path, tiny_dirs, "medusa", "vllm-medusa", 0.1, 20)


def test_serving_formats_refuse_other_families(tiny_dirs, tmp_path):
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="blockwise", num_heads=2, out=g, device="cpu")
    with pytest.raises(GraftError, match="medusa heads"):
        export(g, str(tmp_path / "v"), format="vllm-medusa")
    with pytest.raises(GraftError, match="unknown --format"):
        export(g, str(tmp_path / "v"), format="onnx")



def test_gemma3_exports_in_graft_format_and_refuses_the_serving_ones(tiny_dirs, tmp_path):
    """Gemma 3 heads: the default export loads back and decodes as before; the serving formats
    refuse in one line (no engine takes Gemma 3 heads)."""
    g, e = str(tmp_path / "g"), str(tmp_path / "e")
    m = add_heads(tiny_dirs["gemma3"], heads="eagle", num_heads=2, out=g, device="cpu", aux_layers=[1, 2])
    export(g, e)
    back = load(e, device="cpu")
    ids = [5, 9, 3, 7, 11, 2]
    kw = dict(input_ids=ids, max_new_tokens=12, tree="calibrated", eos=False)
    assert back.generate(**kw).ids == m.generate(**kw).ids
    with pytest.raises(GraftError, match="Llama and Qwen3 backbones, not gemma3_text"):
        export(g, str(tmp_path / "v"), format="eagle3", verifier="google/gemma-3-270m")
    with pytest.raises(GraftError, match="SGLang's Llama drafter"):
        export(g, str(tmp_path / "s"), format="sglang-eagle3")


INTEROP = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
from speculators.models.eagle3.core import Eagle3DraftModel

folder, inputs, out = sys.argv[1:4]
x = load_file(inputs)
from speculators.models.eagle3.config import Eagle3SpeculatorConfig
config = Eagle3SpeculatorConfig.from_pretrained(folder)
config.transformer_layer_config._attn_implementation = "eager"  # flex attention wants long sequences
# the verifier's embeddings and LM head come from the hub id the export names (here a local hub cache)
model = Eagle3DraftModel.from_pretrained(folder, config=config).float().eval()
with torch.no_grad():
    drafts = model(hidden_states=x["hidden_states"], input_ids=x["input_ids"],
                   document_ids=torch.zeros_like(x["input_ids"]), ttt_steps=int(x["steps"]))
save_file({f"step{k}": t.contiguous() for k, t in enumerate(drafts)}, out)
"""

HUB_ID = "graft-tests/tiny-llama"  # the verifier an export names, served from a hub cache made here


def hub_cache(tmp_path, folder) -> str:
    """A Hugging Face hub cache holding `folder` as HUB_ID's main revision, as a download leaves it."""
    import shutil

    root = tmp_path / "hub"
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return str(root)


def interop_python():
    import os

    from conftest import ROOT

    py = os.environ.get("GRAFT_INTEROP_PY") or os.path.join(ROOT, ".venv-interop", "bin", "python")
    if not os.path.exists(py):
        pytest.skip("no interop environment with `speculators` (scripts/test.sh makes .venv-interop)")
    return py


@pytest.mark.parametrize("vocab,aux", [(None, None), (30, None), (None, [2, 0, 1]), (30, [2, 1])])
def test_eagle3_export_drafts_what_graft_drafts_in_speculators(vocab, aux, tiny_dirs, tmp_path):
    """The `speculators` package (in its own environment: it pins other library versions) loads
    graft's eagle3 export as written, its verifier by hub id (offline, from a hub cache), and
    run as in its training-time test on the features in the engines' order (ascending layers),
    drafts graft's tokens: with and without a draft vocabulary, for aux layers given out of
    order and for two of them."""
    import os
    import subprocess

    from safetensors.torch import save_file

    py = interop_python()
    kw = {"aux_layers": aux} if aux else {}
    m, folder = grafted(tmp_path, tiny_dirs, "eagle", "eagle3", 0.05, vocab, verifier=HUB_ID, **kw)
    bb, heads = m.backbone, m.heads
    cfg = json.load(open(folder / "config.json"))
    ids_written = cfg["eagle_aux_hidden_state_layer_ids"]
    assert ids_written == sorted(heads.features) and cfg["speculators_config"]["verifier"]["name_or_path"] == HUB_ID
    assert cfg["transformer_layer_config"]["num_aux_hidden_states"] == len(ids_written)
    assert ("d2t" in load_file(folder / "model.safetensors")) == (vocab is not None)
    T = 12
    ids = torch.randint(4, 40, (1, T))
    with torch.no_grad():
        trunk, final = bb.forward(ids, torch.arange(T)[None], features=heads.features)
        hs = heads.hidden(bb, trunk, final, ids)
        want = [heads.draft_logits(bb, k, h)[0].argmax(-1) for k, h in enumerate(hs)]  # draft-vocabulary ids
        served, _ = bb.forward(ids, torch.arange(T)[None], features=tuple(ids_written))  # the engines' order
    # speculators pairs the features at row i with the token at row i: graft's t_{i+1}
    nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    save_file({"hidden_states": served.float().contiguous(), "input_ids": nxt.contiguous(), "steps": torch.tensor(3)},
              str(tmp_path / "in.safetensors"))
    env = dict(os.environ, HF_HUB_CACHE=hub_cache(tmp_path, tiny_dirs["llama"]), HF_HUB_OFFLINE="1")
    r = subprocess.run([py, "-c", INTEROP, str(folder), str(tmp_path / "in.safetensors"),
                        str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    for k in range(3):
        rows = T - k - 1  # rows whose tokens are all real at step k
        assert torch.equal(got[f"step{k}"][0, :rows], want[k][:rows]), k


def test_eagle3_export_names_a_hub_id_as_its_verifier(tiny_dirs, tmp_path):
    """vLLM takes the verifier as the model to serve and accepts a hub id only: the smollm2-135m
    alias maps to its repository; a backbone from a local folder needs --verifier, in one line."""
    from graft.export.eagle3 import serving_verifier

    assert serving_verifier("smollm2-135m", None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert serving_verifier("Qwen/Qwen3-0.6B", None) == "Qwen/Qwen3-0.6B"
    assert serving_verifier("smollm2-135m", "me/my-model") == "me/my-model"
    assert serving_verifier("x", str(tmp_path)) == str(tmp_path)  # a folder the user gives: absolute
    with pytest.raises(GraftError, match="--verifier"):
        grafted(tmp_path, tiny_dirs, "eagle", "eagle3", 0.0, None)
    with pytest.raises(GraftError, match="--verifier names the target model of an eagle3 export: leave it out with --format sglang-eagle3"):
        grafted(tmp_path / "b", tiny_dirs, "eagle", "sglang-eagle3", 0.0, None, verifier=HUB_ID, aux_layers=[1])


def test_eagle3_export_refuses_repeated_aux_layers(tiny_dirs, tmp_path):
    """The engines capture each layer once (vLLM keeps a set): a repeated aux layer cannot be served."""
    with pytest.raises(GraftError, match="twice"):
        grafted(tmp_path, tiny_dirs, "eagle", "eagle3", 0.0, None, verifier=HUB_ID, aux_layers=[1, 1, 2])


def test_sglang_eagle3_export_fills_every_parameter_of_sglangs_drafter(tiny_dirs, tmp_path):
    """SGLang's LlamaForCausalLMEagle3.load_weights (sgl-project/sglang@03d5a77), replayed on the
    export's names: every parameter of its drafter is filled, with graft's tensors."""
    # the tiny llama has 2 layers, and SGLang captures the inputs of layers 1..L-1: one aux layer
    m, folder = grafted(tmp_path, tiny_dirs, "eagle", "sglang-eagle3", 0.05, 30, aux_layers=[1])
    cfg = json.load(open(folder / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 30 and cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0]
    params = {"model.embed_tokens.weight", "model.fc.weight", "model.midlayer.self_attn.qkv_proj.weight",
              "model.midlayer.self_attn.o_proj.weight", "model.midlayer.mlp.gate_up_proj.weight",
              "model.midlayer.mlp.down_proj.weight", "model.midlayer.input_layernorm.weight",
              "model.midlayer.post_attention_layernorm.weight", "model.midlayer.hidden_norm.weight",
              "model.norm.weight", "lm_head.weight"}
    stacked = [(".qkv_proj", ".q_proj"), (".qkv_proj", ".k_proj"), (".qkv_proj", ".v_proj"),
               (".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj")]
    filled = {}
    w = load_file(folder / "model.safetensors")
    for name, t in w.items():
        if "d2t" in name or "t2d" in name:
            continue
        for param, shard in stacked:
            if shard in name:
                name = name.replace(shard, param)
                break
        p = name if name in params else f"model.{name}"
        assert p in params, name
        filled.setdefault(p, []).append(t)
    assert set(filled) == params
    heads = m.heads
    torch.testing.assert_close(w["midlayer.self_attn.q_proj.weight"], heads.layer.self_attn.q_proj.weight)
    torch.testing.assert_close(w["midlayer.hidden_norm.weight"], heads.hidden_norm.weight)
    torch.testing.assert_close(w["lm_head.weight"], m.backbone.lm_head.weight[heads.draft_ids])
    assert torch.equal(w["d2t"] + torch.arange(30), heads.draft_ids)  # SGLang's hot token ids
    with pytest.raises(GraftError, match="embeddings"):
        grafted(tmp_path / "b", tiny_dirs, "eagle", "sglang-eagle3", 0.0, None, aux_layers=[0, 1])
    with pytest.raises(GraftError, match="never the last layer"):  # SGLang never captures layer L's output
        grafted(tmp_path / "c", tiny_dirs, "eagle", "sglang-eagle3", 0.0, None, aux_layers=[1, 2])
