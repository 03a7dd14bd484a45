import pytest
import torch

from graft import checkpoint as ckpt
from graft.config import GraftError, HeadSpec
from graft.heads import check_spec
from graft.registry import FAMILIES
from graft.model import add_heads, load

from conftest import tiny_backbone

PARALLEL_IDENTITY = ["blockwise", "medusa", "meta-mtp"]


@pytest.mark.parametrize("mt", ["llama", "gpt2", "qwen3", "gemma3"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_shapes(family, mt, tokenizer):
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads=family, num_heads=3, head_layers=1 if family == "eagle" else 2)
    out = m(torch.randint(0, len(tokenizer), (2, 9)))
    assert out.logits.shape == (2, 9, len(tokenizer))
    assert len(out.head_logits) == 3
    assert all(h.shape == (2, 9, len(tokenizer)) for h in out.head_logits)
    assert m.trainable_parameters() > 0
    assert all(not p.requires_grad for p in bb.hf.parameters())


@pytest.mark.parametrize("family", PARALLEL_IDENTITY)
def test_fresh_heads_reproduce_the_backbone(family, tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=2)
    out = m(torch.randint(0, len(tokenizer), (1, 7)))
    for h in out.head_logits:
        torch.testing.assert_close(h, out.logits, atol=1e-5, rtol=1e-5)


def test_random_init_does_not_reproduce(tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="meta-mtp", num_heads=1, init="random")
    out = m(torch.randint(0, len(tokenizer), (1, 7)))
    assert (out.head_logits[0] - out.logits).abs().max() > 1e-2


def test_layers_are_separate_modules(tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="medusa", num_heads=2, head_layers=2)
    blocks = [b for seq in m.heads.blocks for b in seq]
    assert len({id(b.linear.weight) for b in blocks}) == 4
    assert m.heads.lm_heads[0].weight.data_ptr() != bb.lm_head.weight.data_ptr()
    shared = add_heads(bb, heads="medusa", num_heads=2, shared_lm_head=True)
    assert shared.trainable_parameters() < m.trainable_parameters()


def test_deepseek_shares_embedding_and_head(tokenizer):
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads="deepseek-mtp", num_heads=2)
    names = [n for n, _ in m.heads.named_parameters()]
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert m.heads.modules_[0].proj.weight.shape == (64, 128)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip_is_bit_exact(family, tiny_dirs, tmp_path):
    out = str(tmp_path / "g")
    m = add_heads(tiny_dirs["llama"], heads=family, num_heads=2, out=out, device="cpu")
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.save(out, force=True)
    m2 = load(out, device="cpu")
    a, b = m.heads.state_dict(), m2.heads.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m2.config.heads == m.config.heads


def test_spec_validation():
    """The shared options in HeadSpec; the family and its own options by its class, before any
    backbone is loaded."""
    with pytest.raises(GraftError, match="unknown head family 'hydra': choose one of blockwise"):
        check_spec(HeadSpec(family="hydra"))
    with pytest.raises(GraftError, match="--aux-layers is not an option of medusa heads"):
        check_spec(HeadSpec(family="medusa", aux_layers=[1]))
    with pytest.raises(GraftError, match="--shared-lm-head is not an option of eagle heads"):
        check_spec(HeadSpec(family="eagle", shared_lm_head=True))
    with pytest.raises(GraftError, match="one decoder layer"):
        check_spec(HeadSpec(family="eagle", head_layers=2))
    with pytest.raises(GraftError, match="unknown head family"):
        add_heads("/nonexistent/model", heads="hydra")  # refused before the backbone is looked for
    for k in (0, 9):
        with pytest.raises(GraftError, match="between 1 and 8"):
            HeadSpec(num_heads=k)


def test_corrupt_and_foreign_files_are_refused(tiny_dirs, tmp_path):
    out = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=out, device="cpu")
    heads_file = tmp_path / "g" / ckpt.HEADS_NAME
    good = heads_file.read_bytes()
    heads_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(GraftError, match="corrupt"):
        load(out, device="cpu")
    # a safetensors file of another graft (other family)
    other = str(tmp_path / "o")
    add_heads(tiny_dirs["llama"], heads="blockwise", num_heads=2, out=other, device="cpu")
    heads_file.write_bytes((tmp_path / "o" / ckpt.HEADS_NAME).read_bytes())
    with pytest.raises(GraftError, match="blockwise heads"):
        load(out, device="cpu")
    heads_file.write_bytes(good)
    (tmp_path / "g" / ckpt.CONFIG_NAME).write_text("{not json")
    with pytest.raises(GraftError, match="not valid JSON"):
        load(out, device="cpu")
    (tmp_path / "g" / ckpt.CONFIG_NAME).write_text('{"hello": 1}')
    with pytest.raises(GraftError, match="not a graft config"):
        load(out, device="cpu")


def test_heads_for_another_backbone_are_refused(tiny_dirs, tmp_path):
    from graft.backbone import load_backbone

    out = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=out, device="cpu")
    other = load_backbone(tiny_dirs["gpt2"], device="cpu")
    with pytest.raises(GraftError, match="were made for"):
        load(out, backbone=other)


@pytest.mark.parametrize("mt", ["llama", "gpt2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_drafting_sees_what_training_saw(family, mt, tokenizer):
    """Drafting a chain whose choices are the real next tokens gives, at every depth, the logits
    that training computes for that depth at the same position (eagle: the training-time test
    unrolls what drafting does; deepseek-mtp: the chain's recomputed tail)."""
    from graft.tree import Tree, chain

    torch.manual_seed(0)
    bb = tiny_backbone(mt, tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # small: attention stays spread, so every key counts
    seq = torch.randint(4, len(tokenizer), (14,))
    n = 9  # positions committed; t_n is the root, t_{n+1}.. the depths' targets
    with torch.inference_mode():
        trunk, final = bb.forward(seq[None], torch.arange(14)[None], features=m.heads.features)
        trained = m.heads.hidden(bb, trunk, final, seq[None])
        state = m.heads.new_state(bb, 64)
        m.heads.commit(bb, state, trunk[:, :n], final[:, :n], seq[1:n + 1], 0, n)
        got = []

        def real(d, logits, width):  # rows from depth d on (one row, or every depth at once)
            got.extend(logits)
            return seq[n + d:n + d + len(logits)].view(-1, 1)

        m.heads.draft(bb, state, Tree(chain(3)), n, real)
        for d in range(3):
            want = m.heads.logits(bb, d, trained[d][0, n - 1])
            torch.testing.assert_close(got[d], want, atol=1e-4, rtol=1e-4)
