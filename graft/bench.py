"""Side-by-side timing of graft's speculative decoding against plain decoding of the same backbone.

Columns: transformers `generate` (default dynamic cache), `generate` with a static cache (which
compiles the forward; warmed up before timing), graft's own loop with drafting off, and graft.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict

import torch

from . import files
from .config import GraftError, atomic_write_bytes
from .data import read_jsonl


def read_prompts(path: str, limit: int | None, per_category: int | None = None, turns: str = "first") -> list[dict]:
    """Questions of a JSONL file, in file order: the first `limit`, or the first `per_category` of
    each category (a slice that keeps every category, never a choice by hand). A line holds a
    `prompt`, or Spec-Bench / MT-Bench `turns` (with `category` and `question_id`); `turns`
    "first" keeps each question's first turn, "all" every turn. Returns {"turns", "category",
    "question_id"} rows."""
    if limit is not None and limit < 1:
        raise GraftError(f"--limit must be at least 1, got {limit}")
    if per_category is not None and per_category < 1:
        raise GraftError(f"--per-category must be at least 1, got {per_category}")
    if turns not in ("first", "all"):
        raise GraftError(f"--turns must be first or all, got {turns!r}")
    if not os.path.isfile(path):
        raise GraftError(f"prompts file {path} does not exist: check the path")
    rows = []
    for n, rec in read_jsonl(path):
        if isinstance(rec.get("turns"), list) and rec["turns"] and all(isinstance(t, str) for t in rec["turns"]):
            qs = rec["turns"] if turns == "all" else rec["turns"][:1]
        elif isinstance(rec.get("prompt"), str):
            qs = [rec["prompt"]]
        else:
            raise GraftError(f"{path} line {n} has no string `prompt` nor a list of `turns`: each line needs one")
        cat = str(rec.get("category") or rec.get("source") or "all")
        if per_category and sum(r["category"] == cat for r in rows) >= per_category:
            continue
        rows.append({"turns": qs, "category": cat, "question_id": rec.get("question_id", len(rows))})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise GraftError(f"{path} holds no prompts: give a JSONL file with one {{\"prompt\": ...}} per line")
    return rows


def sync(dev) -> None:
    """Wait for the device, so that a wall-clock timing covers the work queued on it."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _hf_generate(hf, ids, max_new, temperature, eos, **kw):
    x = torch.tensor([ids], device=hf.device)
    sample = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, pad_token_id=eos, **sample, **kw)
    return out[0, len(ids):].tolist()


BASELINES = {"eager": {}, "static": {"cache_implementation": "static"}, "lookup": {"prompt_lookup_num_tokens": 10},
             "nodraft": None}


def bench(graft_dir: str, prompts: str, *, limit=None, per_category=None, turns="first", max_new_tokens=256,
          temperature=0.0, chat=True, baselines=("eager", "static", "nodraft"), engine="auto", tree="auto",
          tree_size=0, json_path=None, answers_path=None, plot_path=None, device="auto", dtype=None, progress=True,
          verify_backbone=True, decode_dtype="auto", force=False) -> dict:
    """Run every prompt through each decoder; returns the report (also written to json_path).
    `answers_path` gets Spec-Bench answer records (graft's own answers, per turn: the text, new
    tokens, wall time, decoding steps and accepted lengths), which Spec-Bench's scripts read.
    An output path that holds a file graft did not write is refused before anything runs, unless
    `force` (graft.files)."""
    from tqdm.auto import tqdm

    from .data import encode_chat
    from .model import load
    from .engine import resolve_engine
    from .speculative import DecodeConfig, SpeculativeDecoder

    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise GraftError(f"unknown baseline(s) {', '.join(sorted(unknown))}: choose from {', '.join(BASELINES)}")
    if plot_path:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise GraftError("--plot needs matplotlib: run `pip install 'graft[plot]'`")
    outputs = [(p, what, ours) for p, what, ours in ((json_path, "--json", files.is_bench_report),
                                                     (answers_path, "--answers", files.is_answers),
                                                     (plot_path, "--plot", files.is_plot)) if p]
    if len({os.path.realpath(p) for p, _, _ in outputs} | {os.path.realpath(prompts)}) < len(outputs) + 1:
        raise GraftError("--json, --plot, --answers and --prompts must be different files: choose other paths")
    for path, what, ours in outputs:  # before the slow part
        files.check_output_file(path, what, force, ours)
    rows = read_prompts(prompts, limit, per_category, turns)
    model = load(graft_dir, device=device, dtype=dtype, verify_backbone=verify_backbone, decode_dtype=decode_dtype)
    bb, hf, tok = model.backbone, model.backbone.hf, model.tokenizer
    dev = bb.device
    eos = tok.eos_token_id if tok is not None else 0
    dec = SpeculativeDecoder(model)
    # the loop without drafts keeps a decoder of its own: the fixed-shape steps read their cache in
    # buckets of an eighth of it, and one sized for the draft tree's room would slow it
    plain = SpeculativeDecoder(model)
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=0, engine=engine, tree=tree,
                       tree_size=tree_size)
    plain_cfg = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=0, draft=False,
                             engine=engine)
    if tok is None:
        raise GraftError(f"{graft_dir} has no tokenizer: graft bench reads text prompts")
    encoded = [encode_chat(tok, [{"role": "user", "content": r["turns"][0]}], chat) for r in rows]
    notes = {"engine": resolve_engine(engine, bb)}
    if bb.identity.load_in_4bit:
        notes["backbone"] = bb.weights_note
    # Warm-up on the longest prompt at full length, so that no timed run allocates a larger cache:
    # graft's static/graph engines size their cache and capture graphs once, and transformers'
    # static cache keeps the largest length it has seen, so torch.compile does not recompile.
    t0 = time.perf_counter()
    warm = max(encoded, key=len)
    short = dataclasses.replace(cfg, max_new_tokens=8)
    warm_cfgs = (cfg, plain_cfg) if notes["engine"] != "eager" else (short, dataclasses.replace(short, draft=False))
    dec.generate(warm, warm_cfgs[0])
    if "nodraft" in baselines:
        plain.generate(warm, warm_cfgs[1])
    hf_kw = {b: kw for b, kw in BASELINES.items() if b in baselines and kw is not None}
    for name, kw in list(hf_kw.items()):
        try:
            for _ in range(2 if name == "static" else 1):
                _hf_generate(hf, warm, max_new_tokens if name == "static" else 8, temperature, eos, **kw)
        except Exception as e:  # the compiled path fails on some setups; report instead of dying
            notes[name] = f"failed: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
            baselines = [b for b in baselines if b != name]
            del hf_kw[name]
    notes["warmup_s"] = time.perf_counter() - t0

    per, tree_note, answers = [], None, []
    for r in tqdm(rows, desc="bench", unit="prompt", disable=not progress):
        msgs, ans = [], {"question_id": r["question_id"], "model_id": f"graft-{model.config.heads.family}",
                         "choices": [{"index": 0, "turns": [], "new_tokens": [], "wall_time": [],
                                      "decoding_steps": [], "accept_lengths": []}]}
        for turn in r["turns"]:  # later turns see graft's own earlier answers, as in MT-Bench
            msgs.append({"role": "user", "content": turn})
            ids = encode_chat(tok, msgs, chat)
            rec, g = _time_one(dec, plain, hf, ids, cfg, plain_cfg, hf_kw, baselines, temperature, max_new_tokens,
                               eos, dev)
            rec["category"] = r["category"]
            tree_note = tree_note or {"draft_nodes": g.draft_nodes, "chosen": g.tree_note}
            per.append(rec)
            text = tok.decode(g.ids, skip_special_tokens=True)
            msgs.append({"role": "assistant", "content": text})
            c = ans["choices"][0]
            c["turns"].append(text)
            c["new_tokens"].append(len(g.ids))
            c["wall_time"].append(g.prefill_s + g.decode_s)
            c["decoding_steps"].append(g.steps)
            c["accept_lengths"].append(g.step_lengths)
        answers.append(ans)
    if answers_path:
        files.write_output_file(answers_path, "".join(json.dumps(a) + "\n" for a in answers).encode(), "--answers",
                                force, files.is_answers)
    report = summarize(per, baselines)
    report.update({"graft_dir": graft_dir, "prompts": prompts, "n_prompts": len(per), "max_new_tokens": max_new_tokens,
                   "temperature": temperature, "device": device_name(dev),
                   "dtype": str(bb.dtype).removeprefix("torch."), "family": model.config.heads.family,
                   "num_heads": model.config.heads.num_heads,
                   "tree_nodes": tree_note["draft_nodes"], "tree_choice": tree_note["chosen"],
                   "training_minutes": (model.config.training or {}).get("minutes_this_run"),
                   "notes": notes, "per_prompt": per})
    if json_path:
        files.write_output_file(json_path, (json.dumps(report, indent=2) + "\n").encode(), "--json", force,
                                files.is_bench_report)
    if plot_path:
        files.check_output_file(plot_path, "--plot", force, files.is_plot)
        plot(report, plot_path)
    return report


def _time_one(dec, plain, hf, ids, cfg, plain_cfg, hf_kw, baselines, temperature, max_new_tokens, eos, dev):
    """One prompt through graft and each baseline, each timed alone."""
    rec = {"prompt_tokens": len(ids)}
    sync(dev)
    g = dec.generate(ids, cfg)
    rec["graft"] = {"tokens": len(g.ids), "seconds": g.prefill_s + g.decode_s, "tau": g.tau,
                    "steps": g.steps, "step_tokens": g.step_tokens, "accepted": g.accepted,
                    "proposed": g.proposed, "drafted_steps": g.drafted_steps, "tree": g.tree_note}
    if "nodraft" in baselines:
        p = plain.generate(ids, plain_cfg)
        rec["nodraft"] = {"tokens": len(p.ids), "seconds": p.prefill_s + p.decode_s}
        if temperature == 0:
            rec["identical_nodraft"] = p.ids == g.ids
    for name, kw in hf_kw.items():
        sync(dev)
        t = time.perf_counter()
        out = _hf_generate(hf, ids, max_new_tokens, temperature, eos, **kw)
        sync(dev)
        rec[name] = {"tokens": len(out), "seconds": time.perf_counter() - t}
        if name == "eager" and temperature == 0:
            rec["identical"] = out == g.ids
            if not rec["identical"]:
                rec["first_diff"] = next((i for i, (a, b) in enumerate(zip(out, g.ids)) if a != b),
                                         min(len(out), len(g.ids)))
    return rec, g


def _rate(recs, key):
    toks = sum(r[key]["tokens"] for r in recs)
    secs = sum(r[key]["seconds"] for r in recs)
    return toks / secs if secs else 0.0


def summarize(per, baselines) -> dict:
    def block(recs):
        steps = sum(r["graft"]["steps"] for r in recs)
        out = {"n": len(recs), "tau": sum(r["graft"]["step_tokens"] for r in recs) / max(steps, 1),
               "tokens_per_s": {"graft": _rate(recs, "graft")}}
        for b in baselines:
            out["tokens_per_s"][b] = _rate(recs, b)
        out["speedup"] = {b: out["tokens_per_s"]["graft"] / v for b, v in out["tokens_per_s"].items()
                          if b != "graft" and v > 0}
        ident = [r["identical"] for r in recs if "identical" in r]
        out["identical_rate"] = sum(ident) / len(ident) if ident else None
        ident = [r["identical_nodraft"] for r in recs if "identical_nodraft" in r]
        # the same check against graft's own loop without drafting, where no eager run was made
        out["identical_nodraft_rate"] = sum(ident) / len(ident) if ident else None
        K = max(len(r["graft"]["accepted"]) for r in recs)
        acc = [sum(r["graft"]["accepted"][k] for r in recs if k < len(r["graft"]["accepted"])) for k in range(K)]
        prop = [sum(r["graft"]["proposed"][k] for r in recs if k < len(r["graft"]["proposed"])) for k in range(K)]
        # acceptance by depth: the share of verification steps that kept a draft at depth k+1
        out["acceptance_by_depth"] = [a / p if p else 0.0 for a, p in zip(acc, prop)]
        g = [r["graft"] for r in recs]
        # generations that drafted at all, and those of them that stopped where the drafts did not pay
        out["drafting"] = {"drafted": sum(x["drafted_steps"] > 0 for x in g),
                           "stopped": sum(0 < x["drafted_steps"] < x["steps"] for x in g)}
        return out

    report = block(per)
    cats = defaultdict(list)
    for r in per:
        cats[r["category"]].append(r)
    report["by_category"] = {c: block(rs) for c, rs in sorted(cats.items())}
    return report


def print_table(report: dict) -> None:
    import click

    tps = report["tokens_per_s"]
    click.echo(f"\n{report['family']} x{report['num_heads']} on {report['device']} ({report['dtype']}), "
               f"{report['n_prompts']} prompts, {report['max_new_tokens']} new tokens, T={report['temperature']}")
    click.echo(f"{'decoder':<10}{'tok/s':>10}{'graft speedup':>16}")
    for name, v in tps.items():
        sp = "" if name == "graft" else f"{report['speedup'].get(name, 0):.2f}x"
        click.echo(f"{name:<10}{v:>10.1f}{sp:>16}")
    acc = " ".join(f"{a:.2f}" for a in report["acceptance_by_depth"])
    ident = report["identical_rate"]
    click.echo(f"tau (tokens per verification forward) {report['tau']:.2f}; acceptance by depth [{acc}]; "
               f"identical_rate {'n/a' if ident is None else f'{ident:.2f}'}")
    click.echo(f"draft tree: {report['tree_nodes']} nodes ({report['tree_choice']})")
    d = report["drafting"]
    if d["stopped"] or d["drafted"] < report["n_prompts"]:
        plain = report["n_prompts"] - d["drafted"]
        click.echo(f"drafting: {d['drafted']} of {report['n_prompts']} generations drafted ({d['stopped']} of them "
                   f"stopped partway, where the drafts did not pay); {plain} decoded without drafts")
    if len(report["by_category"]) > 1:
        click.echo(f"{'category':<20}{'n':>4}{'tau':>7}  {'speedups':<28}acceptance by depth")
        for c, b in report["by_category"].items():
            sp = " ".join(f"{k}:{v:.2f}x" for k, v in b["speedup"].items())
            acc = " ".join(f"{a:.2f}" for a in b["acceptance_by_depth"])
            click.echo(f"{c[:19]:<20}{b['n']:>4}{b['tau']:>7.2f}  {sp:<28}{acc}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    acc = report["acceptance_by_depth"]
    a.bar([str(i + 1) for i in range(len(acc))], acc)
    a.set_xlabel("draft depth (head)")
    a.set_ylabel("acceptance rate")
    a.set_title(f"{report['family']}: tau {report['tau']:.2f}")
    cats = list(report["by_category"])
    base = next(iter(report["speedup"]), None)
    b.barh(cats, [report["by_category"][c]["speedup"].get(base, 0) for c in cats])
    b.set_xlabel(f"speedup over {base}")
    b.set_title("speedup by category")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=dict([files.PLOT_TAG]))
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
