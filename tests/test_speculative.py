"""Losslessness, tested: speculative output against plain decoding of the same backbone."""
import json

import pytest
import torch

from graft.config import GraftError
from graft.registry import FAMILIES
from graft.model import add_heads, load
from graft.speculative import DecodeConfig, SpeculativeDecoder, accept_sample, warp
from graft.tree import Tree, accept, build_tree

from conftest import tiny_backbone

PROMPTS = ["the quick brown", "to be or not", "hello world this is", "numbers one two", "say 3"]


@pytest.fixture(scope="session")
def trained(tiny_dirs, tmp_path_factory):
    """Each family trained briefly on text the tiny llama wrote itself."""
    from graft.data import distill
    from graft.train import train

    d = tmp_path_factory.mktemp("trained")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{w} {i}"}) + "\n" for i in range(6)
                               for w in ("the", "hello", "numbers", "to be")))
    data = str(d / "data.jsonl")
    distill(tiny_dirs["llama"], str(prompts), data, max_new_tokens=48, batch_size=24, device="cpu")
    out = {}
    for fam in FAMILIES:
        g = str(d / fam)
        add_heads(tiny_dirs["llama"], heads=fam, num_heads=3, out=g, device="cpu")
        train(g, data, {"max_steps": 60, "seq_len": 32, "batch_size": 8, "lr": 3e-3, "warmup": 5,
                        "eval_every": 1000, "save_every": 1000}, device="cpu", progress=False)
        out[fam] = g
    return out


def plain_greedy(bb, ids, n):
    out = bb.hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def greedy_past_eos(bb, ids, n):
    """Plain greedy decoding that goes on past the end-of-text token (as `eos=False` does)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, bb.hf(x).logits[:, -1:].argmax(-1)], dim=1)
    return x[0, len(ids):].tolist()


def encode(tok, p):
    return tok(p)["input_ids"]


def perturb(model, scale):
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("mt", ["llama", "gpt2", "qwen3", "gemma3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_identical_untrained_and_random(family, mt, tokenizer):
    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    for heads_state in ("fresh", "random"):
        if heads_state == "random":
            perturb(m, 0.5)  # random heads must be slow, never wrong
        for p in PROMPTS[:3]:
            ids = encode(tokenizer, p)
            ref = plain_greedy(bb, ids, 30)
            for tree in ("calibrated", "chain"):
                for engine in ("eager", "static"):
                    g = m.generate(input_ids=ids, max_new_tokens=30, tree=tree, engine=engine)
                    assert g.ids == ref, (family, mt, heads_state, p, tree, engine)
                    assert g.draft_nodes > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_identical_trained(family, trained, tokenizer):
    m = load(trained[family], device="cpu")
    taus = []
    for p in PROMPTS:
        ids = encode(tokenizer, p)
        ref = plain_greedy(m.backbone, ids, 40)
        for kw in ({}, {"tree": "calibrated"}, {"tree": "chain"}, {"tree_size": 6}, {"engine": "static"},
                   {"engine": "static", "tree_size": 40}):
            g = m.generate(input_ids=ids, max_new_tokens=40, **kw)
            assert g.ids == ref, (family, p, kw)
            if kw:  # {}: the tree the CPU's step costs chose, perhaps none
                taus.append(g.tau)
    # trained heads must actually speculate: more than one token per verification forward
    assert sum(taus) / len(taus) > 1.2, taus


def test_a_dropped_model_frees_its_decoder_without_the_cycle_collector(tokenizer):
    """The decoder keeps the static engines' cache and steps (CUDA graphs on a GPU). Nothing may
    hold it in a reference cycle: what sits in a dead cycle is freed by Python's cycle collector,
    whenever it runs, and a captured graph freed while another is being captured fails that
    capture. Dropped, a model takes its decoder and steps with it at once."""
    import weakref

    from graft.engine import no_collection

    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="eagle", num_heads=2)
    ids = encode(tokenizer, PROMPTS[0])
    m.generate(input_ids=ids, max_new_tokens=8, engine="static", tree="calibrated")
    dec = weakref.ref(m._decoder)
    steps = [weakref.ref(s) for s in m._decoder._pool["static"]["steps"].values()]
    assert steps
    with no_collection():
        del m
        assert dec() is None and all(s() is None for s in steps)


def test_no_collection_holds_the_collector_off():
    import gc

    from graft.engine import no_collection

    assert gc.isenabled()
    with no_collection():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with no_collection():
            raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


def test_engine_without_drafting_is_plain_greedy(tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=2)
    ids = encode(tokenizer, PROMPTS[0])
    for engine in ("eager", "static"):
        g = m.generate(input_ids=ids, max_new_tokens=25, draft=False, engine=engine)
        assert g.ids == plain_greedy(bb, ids, 25)
        assert g.tau == 1.0


def test_eos_max_tokens_and_stop_strings(tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=3)
    ids = max((encode(tokenizer, p) for p in PROMPTS), key=lambda i: len(plain_greedy(bb, i, 30)))
    full = plain_greedy(bb, ids, 30)
    assert len(full) >= 12
    for n in (1, 2, 7):
        assert m.generate(input_ids=ids, max_new_tokens=n, tree="calibrated").ids == full[:n]
    # make the 6th generated token the end-of-sequence token: both decoders must stop there
    eos = full[5]
    bb.hf.generation_config.eos_token_id = eos
    ref = plain_greedy(bb, ids, 30)
    g = m.generate(input_ids=ids, max_new_tokens=30, tree="calibrated")
    assert g.ids == ref and g.ids[-1] == eos and g.stopped == "eos"
    bb.hf.generation_config.eos_token_id = 0
    # a stop string: generation ends on the first token whose text completes it
    text = [tokenizer.decode(full[:i]) for i in range(1, len(full) + 1)]
    stop = text[9][-3:]
    want = next(i for i, t in enumerate(text) if stop in t) + 1
    g = m.generate(input_ids=ids, max_new_tokens=30, stop=(stop,), eos=False, tree="calibrated")
    assert g.ids == full[:want] and g.stopped == "stop"


def tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_follows_the_backbone(temperature, top_p, tokenizer):
    """Speculative sampling: the empirical law of the 2nd new token (which comes from an accepted
    or corrected draft) matches the exact marginal sum_t1 p(t1) p(t2 | t1) of the backbone."""
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=2)
    perturb(m, 0.05)
    ids = encode(tokenizer, "hello world")
    V = len(tokenizer)
    with torch.no_grad():
        p1 = warp(bb.hf(torch.tensor([ids])).logits[0, -1], temperature, top_p)
        batch = torch.tensor([ids + [t] for t in range(V)])
        p2_given = warp(bb.hf(batch).logits[:, -1], temperature, top_p)  # (V, V)
        exact = p1 @ p2_given
        head_q = warp(m(torch.tensor([ids])).head_logits[0][0, -1], temperature, top_p)
    N = 2500
    counts = torch.zeros(V)
    dec = SpeculativeDecoder(m)
    accepted = 0
    for s in range(N):
        g = dec.generate(ids, DecodeConfig(max_new_tokens=2, temperature=temperature, top_p=top_p, seed=s,
                                           eos=False, tree="chain"))
        counts[g.ids[1]] += 1
        accepted += g.accepted[0]
    emp = counts / N
    assert accepted > N * 0.2  # drafts were really accepted, so the test exercises acceptance
    assert tv(emp, exact) < 0.07, tv(emp, exact)
    assert tv(head_q, exact) > 0.15  # blind acceptance of the head's draws would fail this test


def test_accept_sample_reproduces_the_target():
    torch.manual_seed(0)
    V = 6
    p = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    q = torch.tensor([0.05, 0.05, 0.3, 0.3, 0.2, 0.1])
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(20000):
        x = int(torch.multinomial(q, 1, generator=gen))
        _, t = accept_sample(p, q, x, gen)
        counts[t] += 1
    assert tv(counts / counts.sum(), p) < 0.015


def test_build_tree_is_prefix_closed_and_best_first():
    acc = [[0.8, 0.1, 0.05], [0.6, 0.2, 0.1], [0.4, 0.2, 0.1]]
    paths = build_tree(acc, 8)
    assert len(paths) == 8
    assert all(tuple(p[:-1]) in {tuple(q) for q in paths} | {()} for p in paths)
    assert [0] in paths and [0, 0] in paths and [0, 0, 0] in paths
    t = Tree(paths)
    assert t.n == 9 and t.max_depth == 3
    with pytest.raises(GraftError, match="prefix-closed"):
        Tree([[0, 1]])


def test_bad_decode_options():
    with pytest.raises(GraftError, match="temperature"):
        DecodeConfig(temperature=-1)
    with pytest.raises(GraftError, match="top-p"):
        DecodeConfig(top_p=0)
    with pytest.raises(GraftError, match="--stop"):
        DecodeConfig(stop=("</s>", ""))
    with pytest.raises(GraftError, match="--tree-size"):
        DecodeConfig(tree_size=100_000)


def test_prompt_longer_than_context(tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=2)
    with pytest.raises(GraftError, match="context window"):
        m.generate(input_ids=[5] * 300, max_new_tokens=4)


@pytest.mark.parametrize("family", ["medusa", "deepseek-mtp"])
def test_static_engine_samples_as_eager(family, tokenizer):
    """The static engine changes shapes, not results: seeded sampling draws the same tokens."""
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    perturb(m, 0.05)
    for seed, p in enumerate(PROMPTS):
        ids = encode(tokenizer, p)
        runs = [m.generate(input_ids=ids, max_new_tokens=20, temperature=0.8, seed=seed, engine=e, tree="chain").ids
                for e in ("eager", "static")]
        assert runs[0] == runs[1], (p, runs)
    assert set(m._decoder._pool) == {"static"}  # the static run really used its preallocated cache


def test_graph_engine_needs_cuda(tokenizer):
    m = add_heads(tiny_backbone("llama", tokenizer), heads="medusa", num_heads=2)
    with pytest.raises(GraftError, match="CUDA"):
        m.generate(input_ids=[1, 2], max_new_tokens=2, engine="graph")
    with pytest.raises(GraftError, match="engine"):
        DecodeConfig(engine="fast")


def test_auto_engine_fuses_on_cuda_where_triton_and_a_compiler_are(monkeypatch):
    import torch.utils._triton as triton_probe
    from types import SimpleNamespace

    from graft.engine import resolve_engine

    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), SimpleNamespace(device=torch.device("cpu"))
    assert resolve_engine("auto", cpu) == "eager"
    for triton, compiler, engine in ((True, True, "fused"), (False, True, "graph"), (True, False, "graph")):
        monkeypatch.setattr(triton_probe, "has_triton", lambda: triton)
        monkeypatch.setattr("shutil.which", lambda c: "/usr/bin/" + c if compiler else None)
        assert resolve_engine("auto", cuda) == engine
    assert resolve_engine("graph", cuda) == "graph"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_engine_reads_the_live_prefix(family, tokenizer, monkeypatch):
    """Attention in a fixed-shape step reads the narrowest bucket of cache slots that holds the
    step's (here buckets of 32 slots, so that one generation crosses several), with the output of
    plain greedy decoding, drafted steps and plain ones alike."""
    from graft import engine

    monkeypatch.setattr(engine, "SPAN_UNIT", 16)
    spans = []
    real = engine.Step._spanned
    monkeypatch.setattr(engine.Step, "_spanned", lambda step, span: (spans.append(span), real(step, span))[1])
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    perturb(m, 0.05)
    ids = encode(tokenizer, PROMPTS[1])
    ref = greedy_past_eos(bb, ids, 90)
    for kw in ({"tree": "calibrated"}, {"tree": "chain"}, {"draft": False}):
        spans.clear()
        g = m.generate(input_ids=ids, max_new_tokens=90, engine="static", eos=False, **kw)
        assert g.ids == ref, (family, kw)
        # the same steps as the eager engine's (which reads the valid entries alone): every
        # node's verification, drafts that land or not, read what it should
        eager = m.generate(input_ids=ids, max_new_tokens=90, engine="eager", eos=False, **kw)
        assert g.step_lengths == eager.step_lengths, (family, kw)
        assert m._decoder._pool["static"]["max_len"] == 256
        assert len(set(spans)) >= 3 and min(spans) < 256, (family, kw, sorted(set(spans)))
        assert all(c.span == c.max_len for c in [m._decoder._pool["static"]["cache"]])  # restored after each step


@pytest.mark.parametrize("mt,family", [("llama", "eagle"), ("llama", "deepseek-mtp"), ("qwen3", "blockwise"),
                                       ("gemma3", "meta-mtp"), ("gpt2", "medusa")])
def test_fused_pieces_decode_as_plain_operations(mt, family, tokenizer):
    """The layers' elementwise runs compiled (`fused_pieces`, the fused engine's capture; here
    through torch.compile's aot_eager backend, which traces as the GPU's does without generating
    kernels): the output of plain greedy decoding and the eager engine's step lengths, drafted
    steps and plain ones; each piece ran where its layer has it."""
    from graft import modeling

    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    perturb(m, 0.05)
    ids = encode(tokenizer, PROMPTS[1])
    ref = greedy_past_eos(bb, ids, 40)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    bb.fuse_projections()  # as decoding does: the gate and up projections in one matmul, which the pieces need
    slots, caches = pos[0], (bb.new_cache(64), bb.new_cache(64))  # keys written at slots, as a fixed-shape step does
    mask = modeling.cache_mask(slots, 64, bb.dtype)
    with torch.no_grad():
        plain = bb.forward(x, pos)[1], bb.forward(x, pos, caches[0], slots, mask)[1]
        with modeling.fused_pieces("aot_eager"):
            # the final states themselves (a tiny model's greedy text hardly depends on its MLP),
            # and the cache's keys and values
            torch.testing.assert_close(bb.forward(x, pos)[1], plain[0])
            torch.testing.assert_close(bb.forward(x, pos, caches[1], slots, mask)[1], plain[1])
    torch.testing.assert_close(caches[1].k, caches[0].k)
    torch.testing.assert_close(caches[1].v, caches[0].v)
    with modeling.fused_pieces("aot_eager"):
        pieces = modeling._PIECE_USE[0]
        calls, real = {}, dict(vars(pieces))
        for name, f in real.items():
            setattr(pieces, name, lambda *a, _f=f, _n=name: (calls.__setitem__(_n, calls.get(_n, 0) + 1), _f(*a))[1])
        for kw in ({"tree": "calibrated"}, {"draft": False}):
            g = m.generate(input_ids=ids, max_new_tokens=40, engine="static", eos=False, **kw)
            assert g.ids == ref, (mt, family, kw)
            eager = m.generate(input_ids=ids, max_new_tokens=40, engine="eager", eos=False, **kw)
            assert g.step_lengths == eager.step_lengths, (mt, family, kw)
        vars(pieces).update(real)
    expected = {"llama": {"rotary", "rotary_cache", "add_norm", "silu_gate"},
                "qwen3": {"rotary", "rotary_cache", "add_norm", "silu_gate"},
                "gemma3": {"rotary", "rotary_cache"}, "gpt2": set()}[mt]
    assert set(calls) == expected, calls
    assert modeling._PIECE_USE[0] is None  # off again


def test_fused_pieces_compile_a_few_graphs_for_every_tree_size(tokenizer):
    """A piece compiles for its first shapes, then with the changing sizes symbolic: five tree
    sizes of deepseek-mtp (whose drafting meets the most shapes) take a dozen graphs, where one
    per shape took 46 (and a fit over 4-128 nodes on SmolLM2 passed dynamo's limit of 64 for one
    piece, which fails the capture)."""
    from torch._dynamo.utils import counters

    from graft import modeling

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    perturb(m, 0.05)
    ids = encode(tokenizer, PROMPTS[1])
    with modeling.fused_pieces("aot_eager"):
        for size in (4, 8, 16, 32, 64):
            g = m.generate(input_ids=ids, max_new_tokens=20, engine="static", eos=False, tree_size=size)
            assert g.ids == greedy_past_eos(bb, ids, 20), size
    assert counters["stats"]["unique_graphs"] <= 16, dict(counters["stats"])


def test_span_buckets():
    from graft.engine import span_buckets

    assert span_buckets(256) == [256]
    assert span_buckets(1024) == [256, 512, 768, 1024]
    assert span_buckets(8192) == [1024 * i for i in range(1, 9)]


def test_static_engine_grows_its_cache(tokenizer):
    """A longer generation than the pooled cache holds reallocates it (and its steps) correctly."""
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="meta-mtp", num_heads=3)
    perturb(m, 0.05)
    short = encode(tokenizer, PROMPTS[1])
    assert m.generate(input_ids=short, max_new_tokens=10, engine="static", tree="calibrated").ids == plain_greedy(bb, short, 10)
    assert m._decoder._pool["static"]["max_len"] == 256
    long = (short * 60)[:180]
    assert len(long) == 180
    g = m.generate(input_ids=long, max_new_tokens=60, engine="static", tree="calibrated")
    assert m._decoder._pool["static"]["max_len"] == 512
    assert g.ids == plain_greedy(bb, long, 60)


def test_static_engine_shrinks_a_cache_a_long_prompt_left(tokenizer):
    """The fixed-shape steps read the cache in buckets of an eighth of it: after a long prompt, a short one gets
    a cache of its own size again (four times too large is too large), and the same output."""
    bb = tiny_backbone("llama", tokenizer)
    bb.max_positions = 2048
    m = add_heads(bb, heads="medusa", num_heads=3)
    perturb(m, 0.05)
    short = encode(tokenizer, PROMPTS[1])
    long = (short * 300)[:900]
    m.generate(input_ids=long, max_new_tokens=10, engine="static", tree="calibrated")
    assert m._decoder._pool["static"]["max_len"] == 1024
    m.generate(input_ids=long[:400], max_new_tokens=10, engine="static", tree="calibrated")
    assert m._decoder._pool["static"]["max_len"] == 1024  # within four times: kept, steps and all
    assert m.generate(input_ids=short, max_new_tokens=10, engine="static", tree="calibrated").ids == plain_greedy(bb, short, 10)
    assert m._decoder._pool["static"]["max_len"] == 256


@pytest.mark.parametrize("family", ["blockwise", "medusa", "meta-mtp"])
@pytest.mark.parametrize("draft_vocab", [None, 24])
def test_parallel_tree_node_holds_its_depths_ranked_candidate(family, draft_vocab, tokenizer):
    """A parallel family draws every depth's candidates in one go; node v must still hold depth
    d's rank-r candidate (d, r its depth and rank), as each depth's own top-(r+1) gives it, with
    and without a draft vocabulary; and a sampler sees one row per depth, in depth order."""
    from graft.engine import greedy_choose

    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3, draft_vocab=draft_vocab)
    perturb(m, 0.3)
    heads = m.heads
    if draft_vocab:
        heads.set_draft_vocab(torch.randperm(bb.vocab_size).float())
    tree = Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [1, 0, 1], [0, 3]])
    ids = torch.tensor(encode(tokenizer, PROMPTS[1]))
    with torch.inference_mode():
        state = heads.new_state(bb, 64)
        trunk, final = bb.forward(ids[None], torch.arange(len(ids))[None], features=heads.features)
        heads.commit(bb, state, trunk, final, torch.cat([ids[1:], ids[:1]]), 0, len(ids))
        got = heads.draft(bb, state, tree, len(ids), greedy_choose).tolist()
        h = heads.last_hidden(bb, state)
        for v in range(1, tree.n):
            d, r = tree.depths[v], tree.ranks[v]
            want = heads.to_vocab(heads.draft_logits(bb, d - 1, h[d - 1]).topk(r + 1).indices[r])
            assert got[v] == int(want), (v, d, r)
        rows = []
        heads.draft(bb, state, Tree([[0], [0, 0], [0, 0, 0]]), len(ids),
                    lambda d, lg, R: rows.append(lg.clone()) or lg.argmax(-1, keepdim=True))
        assert len(rows) == 1 and rows[0].shape[0] == 3
        for k in range(3):
            torch.testing.assert_close(rows[0][k], heads.draft_logits(bb, k, h[k]))


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("mt", ["llama", "gpt2"])
def test_deepseek_tree_drafts_what_the_chain_drafts(mt, engine, tokenizer):
    """Every path of deepseek-mtp's batched tree draft equals the chain drafted one path at a
    time with the same choices (rank r at a node is the chain's rank-r pick there), with int
    positions (eager) and with device positions and padded commits (the static engines)."""
    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    perturb(m, 0.3)
    heads = m.heads
    tree = Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [1, 0, 0], [1, 0, 1], [2, 0, 0]])
    prompt = encode(tokenizer, PROMPTS[1])
    seq = torch.tensor(prompt)
    with torch.inference_mode():
        for _ in range(12):  # t_0, t_1, ...: the backbone's own continuation (past any EOS)
            seq = torch.cat([seq, bb.hf(seq[None]).logits[0, -1].argmax()[None]])
    static = engine == "static"
    greedy = lambda d, lg, R: lg.topk(R, dim=-1).indices
    with torch.inference_mode():
        state = heads.new_state(bb, 128)
        n = len(prompt)  # positions committed; tokens t_0..t_n known
        trunk, final = bb.forward(seq[None, :n], torch.arange(n)[None])
        heads.commit(bb, state, trunk, final, seq[1:n + 1], 0, n)
        for steps in range(4):  # after the prefill, and after further commits
            at = torch.tensor(n) if static else n
            got = heads.draft(bb, state, tree, at, greedy).tolist()
            for v in range(1, tree.n):
                ranks = [tree.ranks[u] for u in tree.lineage[v][1:]]
                path = Tree([[0] * d for d in range(1, len(ranks) + 1)])
                pick = lambda d, lg, R: lg.topk(ranks[d - 1] + 1, dim=-1).indices[:, -1:]
                assert got[v] == heads.draft(bb, state, path, at, pick).tolist()[-1], (steps, v)
            a = 1 + steps % 3  # accept a positions: n..n+a-1; static commits pad them to 4
            trunk, final = bb.forward(seq[None, :n + a], torch.arange(n + a)[None])
            tr, fi, nt = trunk[:, n:], final[:, n:], seq[n + 1:n + a + 1]
            if static:
                pad = 4 - a
                tr, fi = (torch.cat([x, torch.randn(1, pad, x.shape[-1])], dim=1) for x in (tr, fi))
                nt = torch.cat([nt, torch.zeros(pad, dtype=torch.long)])
                heads.commit(bb, state, tr, fi, nt, torch.tensor(n), torch.tensor(a))
            else:
                heads.commit(bb, state, tr, fi, nt, n, a)
            n += a


@pytest.mark.parametrize("mt", ["llama", "gpt2"])
def test_deepseek_padded_commits_leave_what_training_sees(mt, tokenizer):
    """Fixed-shape commits (device positions, padded with junk) leave the modules in the state
    training computes: after a prefill and three such commits, with drafts between them, a
    chain drafted with the real next tokens gives training's logits at every depth."""
    from graft.tree import chain

    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    perturb(m, 0.05)
    heads, tree, A = m.heads, Tree(chain(3)), 4
    seq = torch.randint(4, len(tokenizer), (24,))
    greedy = lambda d, lg, R: lg.topk(R, dim=-1).indices
    with torch.inference_mode():
        trunk, final = bb.forward(seq[None], torch.arange(24)[None], features=heads.features)
        trained = heads.hidden(bb, trunk, final, seq[None])
        state = heads.new_state(bb, 64)
        n = 9
        heads.commit(bb, state, trunk[:, :n], final[:, :n], seq[1:n + 1], 0, n)
        for a in (2, 1, 3):
            heads.draft(bb, state, tree, torch.tensor(n), greedy)  # as decoding drafts between commits
            pad = A - a
            tr, fi = (torch.cat([x[:, n:n + a], torch.randn(1, pad, x.shape[-1])], dim=1) for x in (trunk, final))
            nt = torch.cat([seq[n + 1:n + a + 1], torch.randint(4, 50, (pad,))])
            heads.commit(bb, state, tr, fi, nt, torch.tensor(n), torch.tensor(a))
            n += a
        got = []

        def real(d, logits, width):
            got.append(logits[0])
            return seq[n + d].view(1, 1)

        heads.draft(bb, state, tree, torch.tensor(n), real)
        for d in range(3):
            torch.testing.assert_close(got[d], heads.logits(bb, d, trained[d][0, n - 1]), atol=1e-4, rtol=1e-4)


def test_deepseek_first_step_commits_again_what_the_prefill_committed(tokenizer):
    """A captured step runs what modules 2..K owe from the last commit with their drafts, so it
    does so after the prefill too (whose exact commit owes nothing): there the step's inputs say
    that the prompt's last position was the accepted path, and committing it again changes no
    draft. (Read as the root's position instead, the owed commit would embed the root as the
    token after it.)"""
    from graft.tree import chain

    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    perturb(m, 0.05)
    heads, tree, P = m.heads, Tree(chain(3)), 9
    seq = torch.randint(4, len(tokenizer), (P + 1,))
    with torch.inference_mode():
        trunk, final = bb.forward(seq[None, :P], torch.arange(P)[None], features=heads.features)
        state = heads.new_state(bb, 64)
        heads.commit(bb, state, trunk, final, seq[1:], 0, P)

        def drafted():
            got = []
            heads.draft(bb, state, tree, torch.tensor(P), lambda d, lg, R: got.append(lg[0]) or lg.topk(R).indices)
            return torch.stack(got)

        assert state["pending"] is None
        alone = drafted()
        pad = torch.randint(4, 50, (3,))
        state["pending"] = (torch.tensor(P - 1), torch.tensor(1), torch.cat([seq[P:], pad]))  # as Step.load says
        torch.testing.assert_close(drafted(), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_deepseek_step_stays_within_its_cache_room(dynamic, tokenizer):
    """A fixed-shape step writes at most `scratch` slots past the committed length: the owed
    commit rows (all of them when one position was accepted) and every module's tails, in a
    cache of exactly that size (a slot past it raises)."""
    from graft.tree import DynamicTree

    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    heads = m.heads
    # the dynamic tree: few nodes, wide levels, so that its tails and not its nodes set the room
    tree = DynamicTree(8, 8, 3) if dynamic else Tree(build_tree(SpeculativeDecoder(m).accuracies(), 40))
    n, A = 12, tree.max_depth + 1
    seq = torch.randint(4, len(tokenizer), (n + 1,))
    with torch.inference_mode():
        trunk, final = bb.forward(seq[None, :n], torch.arange(n)[None], features=heads.features)
        state = heads.new_state(bb, n + heads.scratch(tree))
        heads.commit(bb, state, trunk[:, :n - 1], final[:, :n - 1], seq[1:n], 0, n - 1)
        pad = lambda x: torch.cat([x[:, n - 1:n], torch.zeros(1, A - 1, x.shape[-1])], dim=1)
        heads.commit(bb, state, pad(trunk), pad(final), torch.cat([seq[n:], torch.zeros(A - 1, dtype=torch.long)]),
                     torch.tensor(n - 1), torch.tensor(1))
        if dynamic:
            heads.draft_dynamic(bb, state, tree, torch.tensor(n))
        else:
            heads.draft(bb, state, tree, torch.tensor(n), lambda d, lg, R: lg.topk(R, dim=-1).indices)
    cache = state["cache"]
    written = (cache.k != 0).any(dim=4).any(dim=2).any(dim=1).any(dim=0).nonzero().max().item()  # the last slot
    assert cache.max_len == n + heads.scratch(tree)
    assert n <= written < cache.max_len, (written, n, heads.scratch(tree))  # the tails went past the prefix
    if dynamic:  # here the tails, not the nodes, set the room: the step uses most of it
        assert written >= n + heads.scratch(tree) // 2, (written, n, heads.scratch(tree))


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_step_refuses_inputs_outside_its_cache_tree_or_vocabulary(engine, tokenizer):
    """What a (captured) step may index is checked on the host before it runs: a cache length
    that would write past the cache, a path outside the tree, a token outside the vocabulary
    each raise one clear error instead of reaching the device's kernels."""
    from graft.engine import Step, StepBoundsError

    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="eagle", num_heads=3)
    tree = Tree(build_tree(SpeculativeDecoder(m).accuracies(), 10))
    cache = bb.new_cache(64)
    step = Step.make(engine, bb, cache, tree, heads=m.heads, state=m.heads.new_state(bb, 64), drafts=True)
    V = bb.vocab_size
    step.load(19, [0, 1], [5, 6], 21)  # fine
    room = m.heads.scratch(tree)
    step.load(63 - room, [0], [5], 64 - room)  # the last slot the step may write is the cache's last
    for args in [(64 - room, [0], [5], 65 - room),  # one slot past the cache
                 (19, [0, 11], [5, 6], 21),  # node 11 of an 11-node tree
                 (19, [1, 2], [5, 6], 21),  # a path that does not start at the root
                 (18, [0, 1], [5, 6], 21),  # lengths that do not match the path
                 (19, [0, 1], [5, V], 21),  # a token past the vocabulary
                 (19, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 24)]:  # longer than the tree is deep
        with pytest.raises(StepBoundsError, match="stopped before running"):
            step.load(*args)


def test_deepseek_greedy_drafts_a_tree(tokenizer):
    from graft.speculative import SpeculativeDecoder

    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    assert not m.heads.training  # drafting never runs dropout
    dec = SpeculativeDecoder(m)
    assert dec._tree(DecodeConfig(tree_size=10))[0].n == 11
    assert dec._tree(DecodeConfig(tree="chain"))[0].n == 4
    assert dec._tree(DecodeConfig(temperature=1.0, tree="calibrated"))[0].n == 4


def test_tree_fitted_to_the_measured_cost(tokenizer, tmp_path, monkeypatch):
    """fit_tree keeps the tree with the most expected tokens per ms, decodes without drafts where
    none pays, and measures a card once (the costs are cached)."""
    from graft import fit

    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path))
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=3)
    calls = []

    def fake(per_node):
        def step_costs(dec, engine, trees, context, new):
            calls.append(len(trees))
            return [10.0 + (0 if t is None else per_node * t.n) for t in trees]
        return step_costs

    biggest = max(fit.SIZES["cpu"])
    monkeypatch.setattr(SpeculativeDecoder, "step_costs", fake(0.0))  # size costs nothing: the biggest tree wins
    tree, note = fit.fit_tree(SpeculativeDecoder(m), "static")
    assert tree.n == biggest + 1 and f"{biggest} nodes fit this CPU" in note
    monkeypatch.setattr(SpeculativeDecoder, "step_costs", fake(100.0))  # the cached costs are used, not these
    assert fit.fit_tree(SpeculativeDecoder(m), "static")[0].n == biggest + 1
    assert calls == [len(fit.SIZES["cpu"]) + 2]  # once: no drafting, a chain and each size
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "other"))
    tree, note = fit.fit_tree(SpeculativeDecoder(m), "static")  # every node costs 10 steps: none pays
    assert tree is None and "no tree pays" in note


def test_untrained_heads_do_not_draft_unless_asked(tokenizer, tmp_path, monkeypatch):
    """Drafting with heads that never trained only slows decoding: `--tree auto` decodes without
    drafts there (and says why), on any device, greedy or sampling; an explicit tree still drafts.
    Once trained (a measured rank accuracy), auto fits a tree to this device's measured costs."""
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path))
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="blockwise", num_heads=3)
    ids = encode(tokenizer, PROMPTS[0])
    for kw in ({}, {"temperature": 1.0, "seed": 0}, {"engine": "static"}):
        g = m.generate(input_ids=ids, max_new_tokens=8, **kw)
        assert g.draft_nodes == 0 and g.tau == 1.0 and "untrained" in g.tree_note, kw
    assert m.generate(input_ids=ids, max_new_tokens=8, tree="calibrated").draft_nodes > 0
    m.config.training = {"rank_accuracy": [[0.9] * 4] * 3}
    measured = []
    real = SpeculativeDecoder.step_costs
    monkeypatch.setattr(SpeculativeDecoder, "step_costs",
                        lambda dec, engine, *a: measured.append(engine) or real(dec, engine, *a))
    g = m.generate(input_ids=ids, max_new_tokens=8)
    assert measured == ["eager"] and ("fit this CPU" in g.tree_note or "no tree pays" in g.tree_note)
    assert g.ids == plain_greedy(bb, ids, 8)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_drafting_stops_where_the_drafts_do_not_pay(tokenizer, tmp_path, monkeypatch, engine):
    """Heads whose held-out accuracy promises much but whose drafts never land: the fitted tree
    drafts for WINDOW steps, then the generation goes on without drafts, token for token what plain
    decoding gives. The next generations size their tree with what was seen (none pays), and one in
    PROBE_EVERY drafts again to see whether the text changed."""
    from graft import speculative

    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr(SpeculativeDecoder, "step_costs",  # a tree's step costs 1.3 plain ones
                        lambda dec, engine, trees, *a: [10.0 if t is None else 13.0 for t in trees])
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="blockwise", num_heads=3)
    torch.manual_seed(0)
    for lin in m.heads.out:  # drafts that are noise
        torch.nn.init.normal_(lin.weight, std=3.0)
    m.config.training = {"rank_accuracy": [[0.9] * 4] * 3}  # what training's held-out text promised
    dec = SpeculativeDecoder(m)
    ids = encode(tokenizer, PROMPTS[0])
    cfg = DecodeConfig(max_new_tokens=40, eos=False, engine=engine)
    g = dec.generate(ids, cfg)
    W = speculative.WINDOW
    assert g.draft_nodes > 0 and g.drafted_steps == W and g.step_lengths[W:] == [1] * (g.steps - W) and g.steps > W
    assert f"drafting stopped after {W} steps" in g.tree_note
    assert g.ids == plain_greedy(bb, ids, 40)
    for i in range(2, speculative.PROBE_EVERY + 1):
        g = dec.generate(ids, cfg)
        assert g.draft_nodes == 0 and "no tree pays" in g.tree_note and "as often as expected" in g.tree_note, i
        assert g.ids == plain_greedy(bb, ids, 40)
    g = dec.generate(ids, cfg)  # the probe
    assert g.drafted_steps == W and "drafting again" in g.tree_note and g.ids == plain_greedy(bb, ids, 40)


def test_measuring_trees_leaves_the_decoders_cache_as_it_was(tokenizer):
    """Each tree is timed with a cache of the size it decodes with (attention reads all of it),
    not one grown for a larger tree timed before; the decoder's own cache comes back afterwards."""
    from graft import fit

    bb = tiny_backbone("llama", tokenizer)
    bb.max_positions = 2048  # room for the measuring prompt
    m = add_heads(bb, heads="deepseek-mtp", num_heads=3)
    dec = SpeculativeDecoder(m)
    dec.generate(list(range(4, 20)), DecodeConfig(max_new_tokens=4, engine="static", tree_size=4))
    mine = dec._pool["static"]
    sizes = []
    real = dec._generate

    def spy(ids, cfg, tree="cfg", **kw):
        out = real(ids, cfg, tree=tree, **kw)
        sizes.append(dec._pool["static"]["max_len"])
        return out

    dec._generate = spy
    trees = [Tree(build_tree(dec.accuracies(), 256)), None]  # 257 nodes: past 512 slots with the prompt
    costs = dec.step_costs("static", trees, fit.CONTEXT["cpu"], fit.NEW["cpu"])
    assert len(costs) == len(trees) and all(v > 0 for v in costs)
    assert sizes == [512, 512, 256, 256]  # the CPU's measuring prompt: 64 tokens
    assert dec._pool["static"] is mine


def test_frozen_heads_decode_with_fused_projections_and_still_save(tokenizer, tmp_path):
    from graft.model import load

    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="eagle", num_heads=3)
    m.heads.requires_grad_(False)  # as `load` leaves them
    perturb(m, 0.05)
    ids = list(range(4, 30))
    ref = plain_greedy(bb, ids, 24)
    g = m.generate(input_ids=ids, max_new_tokens=24, engine="static", eos=False, tree="calibrated")
    assert hasattr(m.heads.layer.self_attn, "_graft_fused") and hasattr(m.heads.layer.mlp, "_graft_fused")
    assert g.ids == ref
    m.save(str(tmp_path / "g"))  # views of one buffer are saved as tensors of their own
    back = load(str(tmp_path / "g"), backbone=bb)
    for k, v in m.heads.state_dict().items():
        assert torch.equal(back.heads.state_dict()[k], v), k


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_drafting_up_to_the_end_of_the_context(engine, tokenizer):
    """GPT-2's positions are a learned table: tree nodes past the window must not index it, and
    the output up to the window's end is still the plain greedy output."""
    torch.manual_seed(0)
    bb = tiny_backbone("gpt2", tokenizer)  # a 256-position window
    m = add_heads(bb, heads="medusa", num_heads=3)
    perturb(m, 0.05)
    bb.hf.generation_config.eos_token_id = None
    for P in range(238, 243):  # the last step lands at every offset from the window's end
        ids = torch.randint(4, len(tokenizer), (P,)).tolist()
        ref = plain_greedy(bb, ids, 256 - P)
        g = m.generate(input_ids=ids, max_new_tokens=40, engine=engine, eos=False, tree="calibrated")
        assert g.ids == ref and g.stopped == "context", P


@pytest.mark.parametrize("family", list(FAMILIES))
def test_draft_vocabulary_keeps_greedy_output(family, tokenizer):
    """Drafts scored over a subset of the vocabulary (FR-Spec) are verified by the backbone as
    any drafts: the output is plain greedy decoding's, for every family and engine."""
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3, draft_vocab=24)
    perturb(m, 0.1)
    counts = torch.zeros(len(tokenizer))
    for p in PROMPTS:  # the prompts' tokens and the continuations' are the "frequent" ones
        counts[encode(tokenizer, p) + plain_greedy(bb, encode(tokenizer, p), 20)] += 1
    m.heads.set_draft_vocab(counts)
    assert set(m.heads.draft_ids.tolist()) == set(counts.topk(24).indices.tolist())
    taus = []
    for p in PROMPTS[:3]:
        ids = encode(tokenizer, p)
        ref = plain_greedy(bb, ids, 30)
        for engine in ("eager", "static"):
            g = m.generate(input_ids=ids, max_new_tokens=30, engine=engine, tree="calibrated")
            assert g.ids == ref, (family, p, engine)
            taus.append(g.tau)
    assert max(taus) > 1.0  # some drafts from the subset were accepted


def test_draft_vocabulary_keeps_sampling_exact(tokenizer):
    """With a draft vocabulary q is zero outside it; rejection sampling stays exact."""
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=2, draft_vocab=20)
    perturb(m, 0.05)
    ids = encode(tokenizer, "hello world")
    V = len(tokenizer)
    with torch.no_grad():
        p1 = warp(bb.hf(torch.tensor([ids])).logits[0, -1], 1.0, 1.0)
        p2_given = warp(bb.hf(torch.tensor([ids + [t] for t in range(V)])).logits[:, -1], 1.0, 1.0)
        exact = p1 @ p2_given
    m.heads.set_draft_vocab(exact + p1)  # the subset holds the likely tokens, so drafts are accepted
    N, counts, accepted = 2500, torch.zeros(V), 0
    dec = SpeculativeDecoder(m)
    for s in range(N):
        g = dec.generate(ids, DecodeConfig(max_new_tokens=2, temperature=1.0, seed=s, eos=False, tree="chain"))
        counts[g.ids[1]] += 1
        accepted += g.accepted[0]
    assert accepted > N * 0.2
    assert tv(counts / N, exact) < 0.07, tv(counts / N, exact)


@pytest.mark.parametrize("tree", ["abc", 5, [[0], [-1]], [[0], ["x"]], [[1, 0], [0]], [[]]])
def test_a_tampered_tree_is_one_line(tree):
    with pytest.raises(GraftError):
        Tree(tree)


@pytest.mark.parametrize("mt,family", [("llama", "eagle"), ("gpt2", "eagle"), ("llama", "deepseek-mtp"),
                                       ("gpt2", "deepseek-mtp")])
def test_dynamic_tree_is_lossless(mt, family, tokenizer):
    """EAGLE-2's tree, shaped by the drafts at every step, verified and accepted by its parents:
    the output is plain greedy decoding's, with fresh and perturbed heads, in both engines."""
    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    for state in ("fresh", "random"):
        if state == "random":
            perturb(m, 0.3)
        for p in PROMPTS[:3]:
            ids = encode(tokenizer, p)
            ref = plain_greedy(bb, ids, 30)
            for engine in ("eager", "static"):
                for size in (5, 16):
                    g = m.generate(input_ids=ids, max_new_tokens=30, tree="dynamic", tree_size=size, engine=engine)
                    assert g.ids == ref, (mt, state, p, engine, size)
                    assert g.draft_nodes == size


@pytest.mark.parametrize("family", ["eagle", "deepseek-mtp"])
def test_dynamic_tree_with_trained_heads(trained, tokenizer, family):
    m = load(trained[family], device="cpu")
    taus = {"calibrated": [], "dynamic": []}
    for p in PROMPTS:
        ids = encode(tokenizer, p)
        ref = plain_greedy(m.backbone, ids, 40)
        for tree in taus:
            g = m.generate(input_ids=ids, max_new_tokens=40, tree=tree, tree_size=12)
            assert g.ids == ref, (p, tree)
            taus[tree].append(g.tau)
    assert sum(taus["dynamic"]) / len(PROMPTS) > 1.2, taus


def test_dynamic_tree_acceptance_follows_the_parents():
    from graft.tree import DynamicTree, ancestors

    # root 0; 1 and 2 under the root; 3 under 2; 4 under 3
    parents = [0, 0, 0, 2, 3]
    tokens = [9, 5, 6, 7, 8]
    target = [6, 1, 7, 8, 4]  # the backbone follows 6 -> 7 -> 8, then says 4
    path, new = accept(tokens, target, parents)
    assert path == [0, 2, 3, 4] and new == [6, 7, 8, 4]
    anc = ancestors(torch.tensor(parents), 3)
    assert anc[4].tolist() == [True, False, True, True, True] and anc[1].tolist() == [True, True, False, False, False]
    with pytest.raises(GraftError, match="lower --tree-size"):
        DynamicTree(100, 2, 3)


@pytest.mark.parametrize("family", ["eagle", "deepseek-mtp"])
def test_dynamic_tree_nodes_are_what_their_paths_draft(tokenizer, family):
    """The children of each node of an EAGLE-2 tree are the top candidates, in number as many as
    it has children, that a chain drafted along the node's own path proposes: the batched
    frontier sees what one path at a time sees."""
    from graft.tree import DynamicTree

    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    perturb(m, 0.5)  # large: the draft layer's keys must differ from node to node for the test to see
    heads = m.heads
    ids = torch.tensor(encode(tokenizer, PROMPTS[1]))
    n = ids.numel()
    with torch.inference_mode():
        state = heads.new_state(bb, 128)
        trunk, final = bb.forward(ids[None], torch.arange(n)[None], features=heads.features)
        nxt = torch.cat([ids[1:], bb.logits(final[0, -1]).argmax()[None]])
        heads.commit(bb, state, trunk, final, nxt, 0, n)
        tree = DynamicTree(20, 3, 3)
        tokens, parents, depths = (t.tolist() for t in heads.draft_dynamic(bb, state, tree, n))
        children, proposed = {}, {}
        for v in range(1, tree.n):
            line = [v]
            while parents[line[-1]] != 0:
                line.append(parents[line[-1]])
            line = line[::-1]  # the node's path below the root
            assert depths[v] == len(line)

            def forced(d, lg, R):  # the path's own tokens above, the top candidates at the node
                if d < len(line):
                    return torch.tensor([[tokens[line[d - 1]]]])
                return lg.topk(tree.width, dim=-1).indices

            chain_tree = Tree([[0] * d for d in range(1, len(line) + 1)])
            cands = []
            heads.draft(bb, state, chain_tree, n, lambda d, lg, R: (cands.append(forced(d, lg, R)),
                                                                     forced(d, lg, R)[:, :1])[1])
            children.setdefault(parents[v], []).append(tokens[v])
            proposed[parents[v]] = cands[len(line) - 1][0].tolist()
        assert len(children) > 3 and max(depths) == 3  # the tree branches and reaches the last depth
        for p, kids in children.items():
            assert sorted(kids) == sorted(proposed[p][:len(kids)]), p
