"""The CUDA engines (graph, fused, compiled) against plain greedy decoding, float32, on the device.
Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m cuda`."""
import pytest
import torch

from graft.registry import FAMILIES
from graft.model import add_heads

from conftest import tiny_backbone

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["the quick brown fox", "to be or not to be that", "hello world this is", "numbers one two three"]


def plain_greedy(bb, ids, n):
    x = torch.tensor([ids], device=bb.device)
    out = bb.hf.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    return out[0, len(ids):].tolist()


def greedy_past_eos(bb, ids, n):
    """Plain greedy decoding that goes on past the end-of-text token (as `eos=False` does)."""
    x = torch.tensor([ids], device=bb.device)
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, bb.hf(x).logits[:, -1:].argmax(-1)], dim=1)
    return x[0, len(ids):].tolist()


def cuda_model(family, tokenizer, noise):
    """A tiny Llama on the GPU with heads of `family` x3, perturbed by `noise` (drafts sometimes
    right at 0.05-0.1, noise at 3)."""
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    bb.hf.to("cuda")
    m = add_heads(bb, heads=family, num_heads=3)
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * noise)
    return bb, m


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every case fits its tree from scratch (measuring and capturing trees of 4-128 nodes), so
    that a case fails or passes alone as it does in the module run."""
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("mt", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_engine_is_lossless(family, mt, tokenizer):
    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    bb.hf.to("cuda")
    m = add_heads(bb, heads=family, num_heads=3)
    with torch.no_grad():  # perturbed: drafts are sometimes right, sometimes wrong
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # as if trained to a high accuracy: the fit then drafts (untrained heads would decode without drafts)
    m.config.training = {"rank_accuracy": [[0.9 * 0.5 ** r for r in range(4)] for _ in range(3)]}
    for p in PROMPTS:
        ids = tokenizer(p)["input_ids"]
        ref = plain_greedy(bb, ids, 40)
        trees = [{}, {"tree": "chain"}, {"tree_size": 40}]  # {}: the tree the fit chose
        if m.heads.dynamic_trees:  # the chained families: EAGLE-2's tree too
            trees += [{"tree": "dynamic"}, {"tree": "dynamic", "tree_size": 12}]
        for kw in trees:
            if getattr(m, "_decoder", None) is not None:  # the fit as for a first generation: drafts
                m._decoder.seen = [0.0, 0.0]  # that landed less than promised would shrink later trees
            g = m.generate(input_ids=ids, max_new_tokens=40, engine="graph", **kw)
            assert g.ids == ref, (family, mt, p, kw, g.tree_note)
            assert g.draft_nodes > 0, (family, mt, kw, g.tree_note)  # the fit drafts for accurate heads


@pytest.mark.parametrize("family", ["blockwise", "deepseek-mtp"])
def test_graph_engine_stops_drafting_where_it_does_not_pay(family, tokenizer, monkeypatch):
    """Drafts that never land: after WINDOW steps the generation goes on with a plain captured step
    (captured mid-generation, beside the tree's), token for token plain decoding."""
    from graft import speculative
    from graft.speculative import SpeculativeDecoder

    monkeypatch.setattr(SpeculativeDecoder, "step_costs",  # a tree's step costs 1.3 plain ones
                        lambda dec, engine, trees, *a: [10.0 if t is None else 13.0 for t in trees])
    bb, m = cuda_model(family, tokenizer, 3.0)  # drafts that are noise
    m.config.training = {"rank_accuracy": [[0.9] * 4] * 3}
    for p in PROMPTS:
        ids = tokenizer(p)["input_ids"]
        m._decoder = None  # a first generation each time: the fit drafts
        g = m.generate(input_ids=ids, max_new_tokens=40, engine="graph", eos=False)
        assert g.ids == greedy_past_eos(bb, ids, 40), (family, p, g.tree_note)
        assert g.drafted_steps == speculative.WINDOW and "drafting stopped" in g.tree_note, (family, p, g.tree_note)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_engine_reads_the_live_prefix(family, tokenizer, monkeypatch):
    """One captured pair of graphs per bucket of cache slots (buckets of 32 here, so that one
    generation crosses several; every bucket captured before the prefill), the output of plain
    greedy decoding and the same steps as the eager engine."""
    from graft import engine

    monkeypatch.setattr(engine, "SPAN_UNIT", 16)
    bb, m = cuda_model(family, tokenizer, 0.05)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    ref = greedy_past_eos(bb, ids, 90)
    for kw in ({"tree": "calibrated"}, {"tree": "chain"}, {"draft": False}):
        g = m.generate(input_ids=ids, max_new_tokens=90, engine="graph", eos=False, **kw)
        assert g.ids == ref, (family, kw)
        eager = m.generate(input_ids=ids, max_new_tokens=90, engine="eager", eos=False, **kw)
        assert g.step_lengths == eager.step_lengths, (family, kw)
        steps = m._decoder._pool["graph"]["steps"].values()
        assert max(len(s.graphs) for s in steps) >= 3, (family, kw)


@pytest.mark.parametrize("family", ["medusa", "eagle"])
def test_compiled_engine_is_lossless(family, tokenizer):
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    bb.hf.to("cuda")
    m = add_heads(bb, heads=family, num_heads=3)
    for p in PROMPTS[:2]:
        ids = tokenizer(p)["input_ids"]
        g = m.generate(input_ids=ids, max_new_tokens=30, engine="compiled", tree="calibrated")
        assert g.ids == plain_greedy(bb, ids, 30), (family, p)


@pytest.mark.parametrize("mt", ["llama", "gemma3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_engine_is_lossless(family, mt, tokenizer):
    """The layers' elementwise runs compiled into fused kernels, then captured: plain greedy
    decoding's output (float32), and the graph engine's steps."""
    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    bb.hf.to("cuda")
    m = add_heads(bb, heads=family, num_heads=3)
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.config.training = {"rank_accuracy": [[0.9 * 0.5 ** r for r in range(4)] for _ in range(3)]}
    for p in PROMPTS[:2]:
        ids = tokenizer(p)["input_ids"]
        ref = greedy_past_eos(bb, ids, 40)
        for kw in ({"tree": "calibrated"}, {"tree": "chain"}, {"draft": False}):
            g = m.generate(input_ids=ids, max_new_tokens=40, engine="fused", eos=False, **kw)
            assert g.ids == ref, (family, mt, p, kw)
            graph = m.generate(input_ids=ids, max_new_tokens=40, engine="graph", eos=False, **kw)
            assert g.step_lengths == graph.step_lengths, (family, mt, p, kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_rotary_cache_kernel(dtype, rows):
    """graft's Triton kernel rotates queries and keys and writes keys and values to their slots as
    the compiled piece does: float32 to rounding, bf16 within one rounding of the float32 result;
    nothing else of the cache is written."""
    from graft import kernels
    from graft.modeling import _rotary_cache, signed_sin

    torch.manual_seed(0)
    B, H, Hkv, D, S = 1, 9, 3, 64, 50
    qkv = torch.randn(B, rows, (H + 2 * Hkv) * D, device="cuda")
    q, k, v = (t.view(B, rows, -1, D).transpose(1, 2) for t in qkv.split([H * D, Hkv * D, Hkv * D], -1))
    cos = torch.randn(B, rows, D, device="cuda").unsqueeze(1)
    sin = signed_sin(torch.randn(B, rows, D, device="cuda")).unsqueeze(1)
    slots = torch.arange(rows, device="cuda") * 3 + 5
    ref_kv = torch.zeros(2, 2, B, Hkv, S, D, device="cuda")
    ref_q = _rotary_cache(q, k, v, cos, sin, ref_kv[:, 1], slots)
    kv = torch.zeros(2, 2, B, Hkv, S, D, dtype=dtype, device="cuda")
    args = [t.to(dtype) for t in (q, k, v, cos, sin)]
    assert kernels.fits(*args, kv[:, 1], slots)
    out = kernels.rotary_cache(*args, kv[:, 1], slots)
    tol = (1e-6 if dtype == torch.float32 else 2 ** -7) * (ref_q.abs().max().item() + 1)  # float32: an FMA
    assert (out.float() - ref_q).abs().max().item() <= tol
    assert (kv.float() - ref_kv).abs().max().item() <= tol
    assert kv[:, 0].count_nonzero() == 0 and kv[:, 1].count_nonzero() == ref_kv[:, 1].count_nonzero()


def test_fused_engine_runs_the_kernel(tokenizer, monkeypatch):
    """The fused engine's layers write the cache through graft's kernel, and still decode as
    plain greedy decoding does."""
    from graft import kernels

    calls = []
    real = kernels.rotary_cache
    monkeypatch.setattr(kernels, "rotary_cache", lambda *a: calls.append(1) or real(*a))
    bb, m = cuda_model("eagle", tokenizer, 0.1)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    g = m.generate(input_ids=ids, max_new_tokens=30, engine="fused", eos=False, tree="chain")
    assert calls and g.ids == greedy_past_eos(bb, ids, 30)


@pytest.mark.parametrize("family", ["deepseek-mtp", "eagle"])
def test_graph_engine_samples_as_static(family, tokenizer):
    """Sampling drafts outside the captured step: the Python state a captured commit sets
    (deepseek-mtp's owed commits) must be there after each replay, or the drafts (not the
    output's law) change. Seeded, float32: the same tokens as the static engine."""
    bb, m = cuda_model(family, tokenizer, 0.05)
    for seed, p in enumerate(PROMPTS):
        ids = tokenizer(p)["input_ids"]
        runs = [m.generate(input_ids=ids, max_new_tokens=30, temperature=0.8, seed=seed, engine=e, tree="chain")
                for e in ("static", "graph")]
        assert runs[0].ids == runs[1].ids and runs[0].accepted == runs[1].accepted, (family, p)


def test_no_collection_while_capturing(tokenizer, monkeypatch):
    """A captured graph left in a dead reference cycle is freed by Python's cycle collector,
    whenever it runs; freed during another capture, it fails that capture (destroying a graph is
    not permitted while a stream captures) and every later random draw on the device. Here the
    collector runs at the start of every capture where it may (enabled, as automatic collection
    would at any allocation): graft holds it off while it captures. Last in the module: where it
    fails, the device's generator fails every later test."""
    import gc

    real = torch.cuda.CUDAGraph.capture_begin
    enabled = []

    def begin(self, *a, **kw):
        real(self, *a, **kw)
        enabled.append(gc.isenabled())
        if gc.isenabled():
            gc.collect()

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", begin)
    bb, m = cuda_model("medusa", tokenizer, 0.05)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    ref = greedy_past_eos(bb, ids, 12)
    threshold = gc.get_threshold()
    gc.set_threshold(10 ** 9)  # no automatic collection before the capture: the cycle lives until then
    try:
        assert m.generate(input_ids=ids, max_new_tokens=12, engine="graph", tree="calibrated", eos=False).ids == ref
        cycle = [m._decoder]  # the decoder and its captured graphs, dead in a reference cycle
        cycle.append(cycle)
        m._decoder = None
        del cycle
        g = m.generate(input_ids=ids, max_new_tokens=12, engine="graph", tree="calibrated", eos=False)  # captures anew
    finally:
        gc.set_threshold(*threshold)
    assert g.ids == ref
    assert enabled and not any(enabled), enabled
