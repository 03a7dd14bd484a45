import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from graft import checkpoint as ckpt
from graft.config import GraftError, TrainConfig
from graft.data import load_records, pack, record_text
from graft.losses import distill_step
from graft.model import add_heads, load
from graft.export import export
from graft.train import train

from conftest import CORPUS, tiny_backbone

FAST = {"max_steps": 6, "seq_len": 16, "batch_size": 4, "lr": 3e-3, "warmup": 2, "eval_every": 3,
        "save_every": 3, "log_every": 1}


def write(path, text):
    path.write_text(text)
    return str(path)


def test_every_data_format(tmp_path, tokenizer):
    import pandas as pd

    msgs = [{"role": "user", "content": "say 1"}, {"role": "assistant", "content": CORPUS[0]}]
    files = {
        "chat.jsonl": json.dumps({"messages": msgs}) + "\n",
        "pr.jsonl": json.dumps({"prompt": "say 1", "response": CORPUS[0]}) + "\n",
        "text.json": json.dumps([{"text": CORPUS[0]}]),
        "t.csv": "text\n" + CORPUS[0] + "\n",
        "plain.txt": CORPUS[0] + "\n" + CORPUS[1] + "\n",
    }
    for name, body in files.items():
        ds = load_records(write(tmp_path / name, body))
        text = record_text(ds[0], tokenizer)
        assert CORPUS[0].split()[0] in text
    pd.DataFrame({"text": CORPUS}).to_parquet(tmp_path / "d.parquet")
    assert len(load_records(str(tmp_path / "d.parquet"))) == len(CORPUS)
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "a.jsonl", files["chat.jsonl"])
    write(folder / "b.jsonl", files["chat.jsonl"])
    assert len(load_records(str(folder))) == 2
    chat = record_text(load_records(str(tmp_path / "chat.jsonl"))[0], tokenizer)
    assert chat.startswith("<|user|>")  # the tokenizer's chat template was applied


def test_packing(tokenizer, tiny_data, tmp_path):
    blocks, answers = pack(load_records(tiny_data), tokenizer, 16)
    assert blocks.ndim == 2 and blocks.shape[1] == 16 and answers.shape == blocks.shape and answers.dtype == torch.bool
    assert (blocks == tokenizer.eos_token_id).any()
    # the answers: each record's assistant turn and what follows it, never the prompt before it
    one = write(tmp_path / "one.jsonl", json.dumps({"messages": [{"role": "user", "content": "say 0"},
                                                                {"role": "assistant", "content": CORPUS[1]}]}))
    ids, answer = pack(load_records(one), tokenizer, 1)
    said, rest = tokenizer.decode(ids[~answer].flatten()), tokenizer.decode(ids[answer].flatten())
    assert "say 0" in said and CORPUS[1] not in said and CORPUS[1] in rest and "say" not in rest
    assert answer.flatten().tolist() == sorted(answer.flatten().tolist())  # the prompt, then the answer
    text = write(tmp_path / "text.jsonl", json.dumps({"text": CORPUS[0]}))  # plain text is all answer
    assert pack(load_records(text), tokenizer, 1)[1].all()
    asked = write(tmp_path / "asked.jsonl", json.dumps({"messages": [{"role": "user", "content": CORPUS[0]}]}))
    assert pack(load_records(asked), tokenizer, 1)[1].all()  # no answers anywhere: every position counts
    both = write(tmp_path / "both.jsonl", open(asked).read() + "\n" + open(one).read())
    _, answer = pack(load_records(both), tokenizer, 1)
    assert 0 < answer.sum() < answer.numel() and not answer.flatten()[:5].any()  # the unanswered record: none


def test_bad_data(tmp_path, tokenizer):
    with pytest.raises(GraftError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(GraftError, match="empty"):
        load_records(write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(GraftError, match="line 1 is not valid JSON"):
        load_records(write(tmp_path / "bad.jsonl", "{not json\n"))
    ds = load_records(write(tmp_path / "odd.jsonl", json.dumps({"foo": 1}) + "\n"))
    with pytest.raises(GraftError, match="none of the fields"):
        record_text(ds[0], tokenizer)
    with pytest.raises(GraftError, match="fewer than one sequence"):
        pack(load_records(write(tmp_path / "short.jsonl", json.dumps({"text": "hello"}) + "\n")), tokenizer, 64)
    strict = copy.deepcopy(tokenizer)  # a template that refuses turns that do not alternate, as Gemma's
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    twice = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(GraftError, match="must alternate"):
        record_text(twice, strict)


def test_seq_len_must_exceed_heads():
    with pytest.raises(GraftError, match="too short"):
        TrainConfig(seq_len=4, num_heads=3)


@pytest.mark.parametrize("family", ["medusa", "deepseek-mtp"])
def test_counts_take_in_the_counted_tokens_alone(family, tokenizer):
    """Evaluation counts the drafts of some tokens (the answers): per depth the rows whose drafted
    token is counted, and of those the rows where the head's top-1 is the backbone's; the loss
    stays over every row."""
    torch.manual_seed(0)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3)
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ids = torch.randint(0, len(tokenizer), (2, 10))
    count = torch.rand(2, 10) < 0.5

    def stats(**kw):
        trunk, final = bb.forward(ids, torch.arange(10).expand(2, 10))
        hs = m.heads.hidden(bb, trunk, final, ids)
        return distill_step(bb, m.heads, hs, final, ids, chunk=3, backward=False, ranks=True, **kw)

    every, some = stats(), stats(count=count)
    assert some["loss"] == pytest.approx(every["loss"])
    with torch.no_grad():
        out = m(ids)
    target = out.logits.argmax(-1)  # at position j the backbone's next token, j+1
    drafted = torch.cat([count[:, 1:], count[:, -1:]], dim=1)  # position j drafts token j+1 (the last: past the block)
    for k, hl in enumerate(out.head_logits):
        s = k + 1  # head k at position i drafts what the backbone says at position i+s
        hit, seen = hl[:, :10 - s].argmax(-1) == target[:, s:], drafted[:, s:]
        assert (every["n"][k], every["top1"][k]) == (hit.numel(), int(hit.sum()))
        assert (some["n"][k], some["top1"][k]) == (int(seen.sum()), int((hit & seen).sum()))
        assert 0 < some["n"][k] < every["n"][k]


def test_evaluation_counts_the_held_out_answers(tiny_dirs, tiny_data, tmp_path, tokenizer, monkeypatch):
    """The held-out figures the decoding fit reads count the answers' drafts: every position
    marked counts as no mask at all, and the prompts' positions change the figures. Training's
    own top-1 figures count the answers of its batches too."""
    import contextlib

    from graft import train as train_module
    from graft.data import split_blocks
    from graft.train import evaluate

    blocks, answers = pack(load_records(tiny_data), tokenizer, FAST["seq_len"])
    counted = []
    real = train_module.micro_step

    def spy(bb, heads, ids, *a, **kw):
        row = [i for i in range(len(blocks)) if torch.equal(blocks[i], ids[0])][0]
        counted.append(torch.equal(kw["count"][0], answers[row]))
        return real(bb, heads, ids, *a, **kw)

    monkeypatch.setattr(train_module, "micro_step", spy)
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    s = train(g, tiny_data, FAST, device="cpu", progress=False)
    assert len(counted) > FAST["max_steps"] and all(counted)  # training steps and evaluations alike
    monkeypatch.setattr(train_module, "micro_step", real)
    m = load(g, device="cpu")
    tc = TrainConfig(**FAST)
    _, held = split_blocks(len(blocks), tc.eval_fraction, tc.seed)
    ev = evaluate(m, blocks[held], tc, contextlib.nullcontext(), answers=answers[held])
    torch.testing.assert_close(torch.tensor(ev["rank_accuracy"]), torch.tensor(s["rank_accuracy"]))  # what train wrote
    everything = evaluate(m, blocks[held], tc, contextlib.nullcontext())
    assert evaluate(m, blocks[held], tc, contextlib.nullcontext(), answers=torch.ones_like(answers[held])) == everything
    assert ev["rank_accuracy"] != everything["rank_accuracy"]


def _loss_case(tokenizer, family, draft_vocab, T, seed, jitter=False):
    """A tiny backbone with 3 heads (and a draft vocabulary of that size), two random rows of T
    tokens through it: (bb, model, the draft vocabulary's ids, ids, final, the heads' states)."""
    torch.manual_seed(seed)
    bb = tiny_backbone("llama", tokenizer)
    m = add_heads(bb, heads=family, num_heads=3, draft_vocab=draft_vocab)
    if draft_vocab:
        m.heads.set_draft_vocab(torch.rand(bb.vocab_size))
    sub = m.heads.draft_ids if draft_vocab else torch.arange(bb.vocab_size)
    if jitter:
        with torch.no_grad():
            for p in m.heads.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(0, len(tokenizer), (2, T))
    trunk, final = bb.forward(ids, torch.arange(T).expand(2, T))
    return bb, m, sub, ids, final, m.heads.hidden(bb, trunk, final, ids)


@pytest.mark.parametrize("family", ["medusa", "deepseek-mtp"])
@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("draft_vocab", [None, 12])
def test_chunked_loss_matches_direct_reference(family, kind, draft_vocab, tokenizer):
    """distill_step (chunked, per-chunk backward) against a plain full-logits computation; with
    a draft vocabulary, against the same computation over its tokens alone (renormalised)."""
    bb, m, sub, ids, final, hs = _loss_case(tokenizer, family, draft_vocab, 10, seed=0, jitter=True)
    stats = distill_step(bb, m.heads, hs, final, ids, loss=kind, decay=0.5, chunk=3)
    got = {n: p.grad.clone() for n, p in m.heads.named_parameters()}
    m.heads.zero_grad()

    # reference: full logits, explicit shifts
    out = m(ids)
    logp = torch.log_softmax(out.logits[..., sub], -1)
    where = torch.full((bb.vocab_size,), -100).index_put_((sub,), torch.arange(sub.numel()))
    w = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    ref = 0.0
    for k, hl in enumerate(out.head_logits):
        s = k + 1
        logq = torch.log_softmax(hl[:, :10 - s][..., sub], -1)
        if kind == "kl":
            p = logp[:, s:]
            lk = (p.exp() * (p - logq)).sum(-1).mean()
        else:
            tgt = where[ids[:, s + 1:]].reshape(-1)
            lk = torch.nn.functional.nll_loss(logq[:, :-1].reshape(-1, logq.shape[-1]), tgt, reduction="sum")
            lk = lk / (tgt >= 0).sum().clamp_min(1)
        ref = ref + w[k] * lk
    ref.backward()
    assert stats["loss"] == pytest.approx(ref.item(), rel=1e-4)
    for n, p in m.heads.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("draft_vocab", [None, 12])
def test_alignment_mask_matches_its_definition(kind, draft_vocab, tokenizer):
    """align=True (GRIFFIN): depth k's loss over the rows where depths 1..k-1 drafted the
    backbone's argmax, divided by all of the depth's rows; against a full-logits reference."""
    bb, m, sub, ids, final, hs = _loss_case(tokenizer, "blockwise", draft_vocab, 12, seed=1)
    stats = distill_step(bb, m.heads, hs, final, ids, loss=kind, decay=0.5, chunk=4, align=True)
    got = {n: p.grad.clone() for n, p in m.heads.named_parameters()}
    m.heads.zero_grad()

    out = m(ids)
    target = out.logits.argmax(-1)  # the backbone's token after each position
    logp = torch.log_softmax(out.logits[..., sub], -1)
    where = torch.full((bb.vocab_size,), -100).index_put_((sub,), torch.arange(sub.numel()))
    w = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    ref, keep, mixed = 0.0, torch.ones(2, 12, dtype=torch.bool), False
    for k, hl in enumerate(out.head_logits):
        s = k + 1
        logq = torch.log_softmax(hl[:, :12 - s][..., sub], -1)
        kk = keep[:, :12 - s]
        mixed |= bool(kk.any() and not kk.all()) and k > 0
        if kind == "kl":
            p = logp[:, s:]
            lk = ((p.exp() * (p - logq)).sum(-1) * kk).sum() / kk.numel()
        else:
            tgt = where[ids[:, s + 1:]].masked_fill(~kk[:, :-1], -100).reshape(-1)
            lk = torch.nn.functional.nll_loss(logq[:, :-1].reshape(-1, logq.shape[-1]), tgt, reduction="sum")
            lk = lk / (where[ids[:, s + 1:]] >= 0).sum().clamp_min(1)
        ref = ref + w[k] * lk
        keep = keep.clone()
        keep[:, :12 - s] &= sub[logq.argmax(-1)] == target[:, s:]  # depth k+1 right at row r
        keep[:, 12 - s:] = False
    assert mixed  # the mask keeps some rows and drops others: the case tests something
    ref.backward()
    assert stats["loss"] == pytest.approx(ref.item(), rel=1e-4)
    for n, p in m.heads.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("draft_vocab", [None, 12])
@pytest.mark.parametrize("align", [False, True])
def test_topk_term_matches_its_definition(draft_vocab, align, tokenizer):
    """topk (HASS): each row's KL plus topk_weight x the cross-entropy over the backbone's top-K
    tokens, -sum over them of p log q; loss and gradients against a full-logits reference."""
    bb, m, sub, ids, final, hs = _loss_case(tokenizer, "blockwise", draft_vocab, 11, seed=2)
    stats = distill_step(bb, m.heads, hs, final, ids, decay=0.5, chunk=4, topk=3, topk_weight=0.7, align=align)
    got = {n: p.grad.clone() for n, p in m.heads.named_parameters()}
    m.heads.zero_grad()

    out = m(ids)
    target = out.logits.argmax(-1)
    logp = torch.log_softmax(out.logits[..., sub], -1)
    w = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    ref, keep = 0.0, torch.ones(2, 11, dtype=torch.bool)
    for k, hl in enumerate(out.head_logits):
        s = k + 1
        logq = torch.log_softmax(hl[:, :11 - s][..., sub], -1)
        p = logp[:, s:].exp()
        top = p.topk(3, dim=-1)
        row = (p * (logp[:, s:] - logq)).sum(-1) - 0.7 * (top.values * logq.gather(-1, top.indices)).sum(-1)
        kk = keep[:, :11 - s] if align else torch.ones_like(row, dtype=torch.bool)
        ref = ref + w[k] * (row * kk).sum() / row.numel()
        keep = keep.clone()
        keep[:, :11 - s] &= sub[logq.argmax(-1)] == target[:, s:]
        keep[:, 11 - s:] = False
    ref.backward()
    assert stats["loss"] == pytest.approx(ref.item(), rel=1e-4)
    for n, p in m.heads.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)
    with pytest.raises(GraftError, match="--loss kl"):
        TrainConfig(topk=10, loss="ce")


@pytest.mark.parametrize("family", ["blockwise", "medusa", "meta-mtp", "deepseek-mtp"])
def test_training_lowers_the_loss_and_logs(family, tiny_dirs, tiny_data, tmp_path):
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads=family, num_heads=2, out=g, device="cpu")
    s = train(g, tiny_data, {**FAST, "max_steps": 25, "eval_every": 25}, device="cpu", progress=False)
    lines = [json.loads(l) for l in open(os.path.join(g, ckpt.METRICS_NAME))]
    losses = [l["loss"] for l in lines if "loss" in l and "eval" not in l]
    assert losses[-1] < losses[0]
    assert {"step", "loss", "top1", "tokens_per_s"} <= set(lines[0])
    assert any("eval" in l and len(l["eval"]["top5"]) == 2 for l in lines)
    assert s["steps"] == 25 and len(s["rank_accuracy"]) == 2
    assert load(g, device="cpu").config.training["steps"] == 25


def test_resume_after_sigkill_matches_uninterrupted(tiny_dirs, tiny_data, tmp_path):
    """A run killed with SIGKILL from outside, wherever it is, then resumed, ends bit-identical
    to an uninterrupted run: a checkpoint is one file, renamed into place."""
    import signal
    import time

    cfg = {**FAST, "max_steps": 300, "save_every": 3, "eval_every": 1000, "log_every": 1}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=d, device="cpu")
    train(a, tiny_data, cfg, device="cpu", progress=False)
    code = ("import sys; from graft.train import train; "
            f"train({b!r}, {tiny_data!r}, {cfg!r}, device='cpu', progress=False)")
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    file = os.path.join(b, ckpt.CHECKPOINT_NAME)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            if ckpt.load_checkpoint(b)[0] >= 6:
                break
        except GraftError:
            pass  # not written yet
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -9, p.stderr.read().decode()[-500:]
    assert os.path.exists(file) and ckpt.load_checkpoint(b)[0] < 300  # killed mid-run
    train(b, tiny_data, {}, resume=True, device="cpu", progress=False)
    ha = load(a, device="cpu").heads.state_dict()
    hb = load(b, device="cpu").heads.state_dict()
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    steps = [json.loads(l)["step"] for l in open(os.path.join(b, ckpt.METRICS_NAME)) if '"eval"' not in l]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_one_writer_per_folder(tiny_dirs, tiny_data, tmp_path):
    """A second writer gets a one-line error naming the holder; a stale lock is taken over."""
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(g, ckpt.LOCK_NAME), "w") as f:
            f.write(str(holder.pid))
        with pytest.raises(GraftError, match=f"PID {holder.pid}"):
            train(g, tiny_data, FAST, device="cpu", progress=False)
        holder.kill()  # killed, not reaped: a zombie, as a killed run's workers stay in a container
        deadline = time.time() + 30
        while time.time() < deadline and open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        train(g, tiny_data, FAST, device="cpu", progress=False)  # a zombie holds no lock
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(os.path.join(g, ckpt.LOCK_NAME))
    with open(os.path.join(g, ckpt.LOCK_NAME), "w") as f:
        f.write(str(holder.pid))
    train(g, tiny_data, FAST, device="cpu", progress=False)  # the holder is gone: stale
    assert not os.path.exists(os.path.join(g, ckpt.LOCK_NAME))


def test_add_heads_force_clears_the_old_run(tiny_dirs, tiny_data, tmp_path):
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    train(g, tiny_data, FAST, device="cpu", progress=False)
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu", force=True)
    with pytest.raises(GraftError, match="no checkpoint"):
        train(g, tiny_data, {}, resume=True, device="cpu", progress=False)


def test_train_bad_inputs(tiny_dirs, tiny_data, tmp_path):
    with pytest.raises(GraftError, match="has no graft.json"):
        train(str(tmp_path), tiny_data, FAST, device="cpu")
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    with pytest.raises(GraftError, match="no checkpoint"):
        train(g, tiny_data, FAST, resume=True, device="cpu")
    with pytest.raises(GraftError, match="unknown training option"):
        train(g, tiny_data, {"learning_rate": 1}, device="cpu")
    with pytest.raises(GraftError, match="does not exist"):
        train(g, str(tmp_path / "nope.jsonl"), FAST, device="cpu")


def test_nan_loss_stops_and_keeps_the_checkpoint(tiny_dirs, tiny_data, tmp_path):
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    train(g, tiny_data, {**FAST, "max_steps": 3}, device="cpu", progress=False)
    before = open(os.path.join(g, ckpt.HEADS_NAME), "rb").read()
    with pytest.raises(GraftError, match="loss became"):
        train(g, tiny_data, {**FAST, "lr": 1e30, "max_grad_norm": 1e30}, device="cpu", progress=False)
    assert open(os.path.join(g, ckpt.HEADS_NAME), "rb").read() == before  # the last good heads stay
    load(g, device="cpu")


def test_diverged_heads_never_overwrite_a_checkpoint(tiny_dirs, tiny_data, tmp_path):
    """Heads that became NaN or inf on a save step are not written: what is on disk stays finite."""
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    with pytest.raises(GraftError, match="NaN or inf|loss became"):
        train(g, tiny_data, {**FAST, "lr": 1e30, "max_grad_norm": 1e30, "warmup": 1, "save_every": 1}, device="cpu",
              progress=False)
    load(g, device="cpu")  # the heads on disk are finite (load refuses NaN)
    if os.path.exists(os.path.join(g, ckpt.CHECKPOINT_NAME)):
        _, _, tensors = ckpt.load_checkpoint(g)
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("heads."))


def test_lora_without_peft(monkeypatch, tiny_dirs, tiny_data, tmp_path):
    import importlib.util

    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "peft" else real(n, *a))
    with pytest.raises(GraftError, match="peft"):
        train(g, tiny_data, {**FAST, "lora_r": 4}, device="cpu")


def test_lora_training_and_export_merge(tiny_dirs, tiny_data, tmp_path):
    g, out = str(tmp_path / "g"), str(tmp_path / "e")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    train(g, tiny_data, {**FAST, "lora_r": 4}, device="cpu", progress=False)
    m = load(g, device="cpu")
    with pytest.raises(GraftError, match="--merge-lora"):
        export(g, out)
    export(g, out, merge_lora=True)
    e = load(out, device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(e(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-5)


def test_time_budget_ends_the_lr_decay(tiny_dirs, tiny_data, tmp_path):
    """With --max-minutes and a max_steps never reached, the cosine decay still reaches its floor."""
    from graft.train import time_horizon

    assert time_horizon(10, 1000, 0.5, 5.0) == 21
    assert time_horizon(10, 15, 0.5, 5.0) == 15
    assert time_horizon(10, 1000, 0.5, -1.0) == 11
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="blockwise", num_heads=2, out=g, device="cpu")
    s = train(g, tiny_data, {**FAST, "max_steps": 10**6, "max_minutes": 0.1, "eval_every": 10**6},
              device="cpu", progress=False)
    lrs = [json.loads(l)["lr"] for l in open(os.path.join(g, ckpt.METRICS_NAME)) if '"lr"' in l]
    assert 20 < s["steps"] < 10**6
    assert max(lrs) > 0.9 * FAST["lr"] and lrs[-1] < 0.2 * FAST["lr"]


@pytest.mark.parametrize("body,msg", [
    ("train:\n  lr: fast\n", "--lr must be a finite number"),
    ("train:\n  max_steps: 1.5\n", "--max-steps must be an integer"),
    ("train:\n  batch_size: [1, 2]\n", "--batch-size must be an integer"),
    ("train:\n  - lr\n", "must be a mapping"),
    ("train:\n  lr: .nan\n", "--lr must be a finite number"),
])
def test_recipe_values_of_the_wrong_type(body, msg, tiny_dirs, tiny_data, tmp_path):
    from graft.train import load_recipe

    recipe = write(tmp_path / "r.yaml", body)
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    with pytest.raises(GraftError, match=msg):
        train(g, tiny_data, load_recipe(recipe), device="cpu", progress=False)


def test_recipe_numbers_in_exponent_form(tmp_path):
    from graft.train import load_recipe

    assert load_recipe(write(tmp_path / "r.yaml", "train:\n  lr: 1e-3\n  max_steps: 10\n")) == {"lr": 1e-3, "max_steps": 10}


def test_training_sets_the_draft_vocabulary_from_the_data(tiny_dirs, tiny_data, tmp_path, tokenizer):
    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="eagle", num_heads=2, draft_vocab=10, out=g, device="cpu")
    s = train(g, tiny_data, FAST, device="cpu", progress=False)
    blocks, _ = pack(load_records(tiny_data), tokenizer, FAST["seq_len"])
    counts = torch.bincount(blocks.flatten(), minlength=len(tokenizer))
    got = load(g, device="cpu").heads.draft_ids.tolist()
    assert got == sorted(got) and len(got) == 10
    assert min(counts[got]) >= counts.sort(descending=True).values[9]  # the most frequent ten (ties either way)
    # reported with the run: the share of the held-out blocks' tokens inside the subset
    from graft.data import split_blocks

    tc = TrainConfig()
    _, held = split_blocks(len(blocks), tc.eval_fraction, tc.seed)
    held = blocks[held]
    assert s["draft_vocab_coverage"] == pytest.approx(torch.isin(held, torch.tensor(got)).float().mean().item())
    assert 0 < s["draft_vocab_coverage"] < 1
    with pytest.raises(GraftError, match="--draft-vocab"):
        add_heads(tiny_dirs["llama"], heads="eagle", num_heads=2, draft_vocab=0, device="cpu")


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last(tiny_dirs, tiny_data, tmp_path, monkeypatch):
    """A full disk while checkpointing: a one-line error, the last checkpoint whole, no temp files."""
    import errno

    from graft import config as cfg

    g = str(tmp_path / "g")
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=g, device="cpu")
    train(g, tiny_data, {**FAST, "max_steps": 3}, device="cpu", progress=False)
    real = cfg.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cfg.os, "fsync", full)
    with pytest.raises(GraftError, match="No space left on device"):
        train(g, tiny_data, {**FAST, "max_steps": 6}, resume=True, device="cpu", progress=False)
    monkeypatch.setattr(cfg.os, "fsync", real)
    train(g, tiny_data, {**FAST, "max_steps": 3, "save_every": 1}, device="cpu", progress=False)
    calls = []

    def full_later(fd):  # the metrics log and first checkpoints go through; then the disk is full
        calls.append(fd)
        if len(calls) > 3:
            full(fd)
        return real(fd)

    monkeypatch.setattr(cfg.os, "fsync", full_later)
    with pytest.raises(GraftError, match="checkpoint was not written"):
        train(g, tiny_data, {**FAST, "max_steps": 6, "save_every": 1}, resume=True, device="cpu", progress=False)
    monkeypatch.setattr(cfg.os, "fsync", real)
    assert ckpt.load_checkpoint(g)[0] in (3, 4)  # whole: the step before the failure, or the one that failed after it
    assert not [f for f in os.listdir(g) if f.startswith(".tmp-")]
    train(g, tiny_data, {}, resume=True, device="cpu", progress=False)  # and it resumes
    assert oct(os.stat(os.path.join(g, ckpt.HEADS_NAME)).st_mode & 0o044) != oct(0)  # not private


def test_a_bad_data_line_is_named(tmp_path):
    good = json.dumps({"text": "hello"})
    bad = write(tmp_path / "d.jsonl", f"{good}\n{good}\n{{oops\n")
    with pytest.raises(GraftError, match="d.jsonl line 3 is not valid JSON"):
        load_records(bad)
    (tmp_path / "u.jsonl").write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(GraftError, match="u.jsonl line 2 is not UTF-8"):
        load_records(str(tmp_path / "u.jsonl"))
