"""The training optimizer (graft.optim), the in-place gradient of a trained half-precision
unembedding, and medusa heads whose own LM heads are stored in bfloat16."""
import json
import os

import pytest
import torch

from graft import checkpoint as ckpt
from graft import optim
from graft.heads import AccumulatingLinear
from graft.losses import chunk_rows
from graft.model import add_heads, load
from graft.train import train

from conftest import tiny_backbone

FAST = {"max_steps": 8, "seq_len": 16, "batch_size": 4, "lr": 3e-3, "warmup": 2, "eval_every": 4,
        "save_every": 4, "log_every": 1}


def _steps(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.to(p.dtype)
        opt.step()


def test_float32_parameters_take_torchs_adamw_exactly():
    torch.manual_seed(0)
    a = [torch.randn(5, 3), torch.randn(7)]
    half = torch.randn(4, 6, dtype=torch.bfloat16)  # its presence picks HeadsAdamW
    b = [t.clone() for t in a]
    grads = [[torch.randn_like(t) for t in a] for _ in range(6)]
    mine = optim.make_optimizer([*a, half], lr=1e-2, weight_decay=0.1)
    assert isinstance(mine, optim.HeadsAdamW)
    half.grad = torch.zeros_like(half)
    ref = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _steps(mine, a, grads)
    _steps(ref, b, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert isinstance(optim.make_optimizer(b, lr=1e-3, weight_decay=0.0), torch.optim.AdamW)


def _factored_reference(p, grads, lr, beta2=0.95, eps=1e-8):
    """The factored rule written out over whole matrices in float64."""
    x = p.double()
    row = torch.zeros(p.shape[0], dtype=torch.float64)
    col = torch.zeros(p.shape[1], dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        row = beta2 * row + (1 - beta2) * (g * g).mean(1)
        col = beta2 * col + (1 - beta2) * (g * g).mean(0)
        v = torch.outer(row, col) / row.mean() / (1 - beta2 ** t)
        u = g / (v.sqrt() + eps)
        x = x - lr * u / max(1.0, float(u.pow(2).mean().sqrt()))
    return x


@pytest.mark.parametrize("block", [1 << 24, 12])  # whole, and 2 rows at a time
def test_factored_rule_matches_its_definition(block, monkeypatch):
    """float16 rounds to nearest, so the blocked computation can be checked against the formula."""
    monkeypatch.setattr(optim, "BLOCK", block)
    torch.manual_seed(0)
    p = (torch.randn(9, 6) * 0.1).half()
    start = p.clone()
    grads = [torch.randn(9, 6) * s for s in (1.0, 0.3, 2.0, 0.01)]
    opt = optim.HeadsAdamW([p], lr=1e-2)
    _steps(opt, [p], [[g] for g in grads])
    assert set(opt.state[p]) == {"step", "row", "col"}  # V + d numbers of state, not 2 V d
    want = _factored_reference(start.float(), grads, 1e-2)
    torch.testing.assert_close(p.double(), want, atol=2e-3, rtol=2e-3)
    assert not torch.equal(p, start)


def test_stochastic_rounding_is_unbiased():
    """Into bfloat16: one of the two neighbours, the upper one with the probability of the
    fraction, so the mean is kept; updates below half a bfloat16 step are not lost."""
    torch.manual_seed(0)
    for value in (1 + 2 ** -10, -3.3 - 2 ** -9, 0.0123):
        x = torch.full((200_000,), value)
        p = torch.empty_like(x, dtype=torch.bfloat16)
        optim.round_into(p, x.clone())
        lo = torch.tensor(value).bfloat16()
        assert set(p.float().unique().tolist()) <= {lo.float().item(), torch.nextafter(lo, lo * 2).float().item(),
                                                    torch.nextafter(lo, lo * 0).float().item()}
        assert p.double().mean().item() == pytest.approx(value, rel=2e-4)
    # 100 steps of +1e-4 on a weight of 1.0 (a bfloat16 step there is 7.8e-3): about +0.01, not 0
    p = torch.ones(50_000, dtype=torch.bfloat16)
    for _ in range(100):
        optim.round_into(p, p.float() + 1e-4)
    assert p.double().mean().item() == pytest.approx(1.01, abs=1e-3)


def test_rounding_does_not_depend_on_the_global_random_state():
    """Processes of a data-parallel run (seeded apart) must round their replicas alike."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(7)
        p = (torch.randn(16, 8) * 0.05).bfloat16()
        grads = [torch.randn(16, 8) for _ in range(3)]
        torch.manual_seed(seed)
        opt = optim.HeadsAdamW([p], lr=1e-4)
        _steps(opt, [p], [[g] for g in grads])
        out.append(p)
    assert torch.equal(out[0], out[1])


def test_accumulating_linear_gives_autograds_gradients():
    """Two chunks' backward add into w.grad in place; x's gradient as autograd's."""
    torch.manual_seed(0)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    gs = [torch.randn(2, 3, 11, dtype=torch.float64) for _ in range(2)]
    for x, g in zip(xs, gs):
        AccumulatingLinear.apply(x, w).backward(g)
    got_w, got_x = w.grad.clone(), [x.grad.clone() for x in xs]
    w.grad = None
    for x in xs:
        x.grad = None
    for x, g in zip(xs, gs):
        torch.nn.functional.linear(x, w).backward(g)
    torch.testing.assert_close(got_w, w.grad)
    for a, x in zip(got_x, xs):
        torch.testing.assert_close(a, x.grad)


def test_chunk_rows():
    assert chunk_rows(0, 49152) == 1365 and chunk_rows(0, 128256) == 523
    assert chunk_rows(0, 512) == 8192 and chunk_rows(0, 10 ** 7) == 256 and chunk_rows(100, 128256) == 100


def test_medusa_lm_heads_in_bfloat16(tiny_dirs, tiny_data, tmp_path, tokenizer):
    """Stored, trained and checkpointed in bfloat16 (the rest in float32), resumed with the
    optimizer's factored state; decoding with them stays the backbone's greedy output."""
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, lm_head_dtype="bfloat16", out=g, device="cpu")
    before = load(g, device="cpu", heads_dtype="float32").heads
    assert before.lm_heads[0].weight.dtype == torch.bfloat16
    assert before.blocks[0][0].linear.weight.dtype == torch.float32
    train(g, tiny_data, {**FAST, "max_steps": 4}, device="cpu", progress=False)
    state = ckpt.load_checkpoint(g)[2]
    assert state["heads.lm_heads.0.weight"].dtype == torch.bfloat16
    assert state["heads.blocks.0.0.linear.weight"].dtype == torch.float32
    rows = [k for k in state if k.startswith("opt.") and k.endswith(".row")]
    assert len(rows) == 2 and not any(k.endswith("exp_avg") and state[k].dim() == 2 and state[k].shape[0] > 100
                                      for k in state)
    train(g, tiny_data, {"max_steps": 8}, resume=True, device="cpu", progress=False)
    lines = [json.loads(l) for l in open(os.path.join(g, ckpt.METRICS_NAME))]
    losses = [l["loss"] for l in lines if "loss" in l and "eval" not in l]
    assert [l["step"] for l in lines if "eval" not in l][-1] == 8 and losses[-1] < losses[0]
    m = load(g, device="cpu")
    assert m.heads.lm_heads[1].weight.dtype == torch.bfloat16
    changed = any(not torch.equal(a, b) for a, b in zip(before.lm_heads.parameters(), m.heads.lm_heads.parameters()))
    assert changed
    ids = tokenizer("the cat sat on the mat", return_tensors="pt").input_ids[0].tolist()
    out = m.generate(input_ids=ids, max_new_tokens=20, chat=False, tree="calibrated")
    ref = m.backbone.hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert out.ids == ref[:len(out.ids)] and len(out.ids) == 20


def test_lm_head_dtype_is_refused_where_there_is_no_own_lm_head():
    from graft.config import GraftError, HeadSpec
    from graft.heads import check_spec

    with pytest.raises(GraftError, match="--lm-head-dtype is not an option of eagle heads"):
        check_spec(HeadSpec(family="eagle", lm_head_dtype="bfloat16"))
    with pytest.raises(GraftError, match="own LM heads"):
        check_spec(HeadSpec(family="medusa", shared_lm_head=True, lm_head_dtype="bfloat16"))
    with pytest.raises(GraftError, match="auto, bfloat16 or float32"):
        check_spec(HeadSpec(lm_head_dtype="half"))


def test_resume_where_the_lm_heads_dtype_resolves_otherwise(tiny_dirs, tiny_data, tmp_path):
    """A checkpoint of float32 LM heads (AdamW's moments) resumes as bfloat16 heads (the factored
    rule: AdamW's second moment becomes its row and column means), and back again."""
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, lm_head_dtype="float32", out=g, device="cpu")
    train(g, tiny_data, {**FAST, "max_steps": 4}, device="cpu", progress=False)
    assert "opt.0.4.exp_avg_sq" in ckpt.load_checkpoint(g)[2]  # an LM head's (after 2 x 2 block tensors)
    for dtype, key, steps in (("bfloat16", "row", 6), ("float32", "exp_avg_sq", 8)):
        with open(os.path.join(g, "graft.json")) as f:
            cfg = json.load(f)
        cfg["heads"]["lm_head_dtype"] = dtype  # as a float32 or a bf16 backbone would resolve "auto"
        with open(os.path.join(g, "graft.json"), "w") as f:
            json.dump(cfg, f)
        train(g, tiny_data, {"max_steps": steps}, resume=True, device="cpu", progress=False)
        step, _, state = ckpt.load_checkpoint(g)
        assert step == steps and f"opt.0.4.{key}" in state
        assert state["heads.lm_heads.0.weight"].dtype == getattr(torch, dtype)
