"""The training loop: only the heads (and optional LoRA adapters) learn; the backbone is frozen.

No Click and no printing here beyond the progress bar and the metrics log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time

import torch

from . import checkpoint as ckpt
from .config import GraftError, TrainConfig, atomic_write_bytes, write_json
from .data import batch_indices, load_records, pack, split_blocks
from .losses import RANKS, distill_step


def load_recipe(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise GraftError(f"recipe {path} not found: check the path")
    except yaml.YAMLError as e:
        raise GraftError(f"recipe {path} is not valid YAML ({e.__class__.__name__}): fix it")
    if not isinstance(d, dict):
        raise GraftError(f"recipe {path} must be a mapping of option: value")
    d = {k.replace("-", "_"): v for k, v in d.get("train", d).items()}
    return d


def make_train_config(values: dict, num_heads: int) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"num_heads"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise GraftError(f"unknown training option(s) {', '.join(unknown)}: see `graft train --help`")
    return TrainConfig(**values, num_heads=num_heads)


def time_horizon(step: int, total: int, seconds_per_step: float, seconds_left: float) -> int:
    """The step the learning-rate decay should end at under a time budget: the steps that still
    fit at the recent pace, never more than `total` nor fewer than the next step."""
    return min(total, step + 1 + int(max(0.0, seconds_left) / max(seconds_per_step, 1e-9)))


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _apply_lora(model, r: int, state: dict | None = None):
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise GraftError("--lora-r needs peft: run `pip install peft`")
    from peft import LoraConfig, inject_adapter_in_model

    targets = ["q_proj", "v_proj"] if model.backbone.model_type != "gpt2" else ["c_attn"]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(cfg, model.backbone.hf)
    params = {n: p for n, p in model.backbone.hf.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
        p.data = p.data.float()
    if state:
        for n, p in params.items():
            p.data.copy_(state[n])
    return params, {"r": r, "alpha": 2 * r, "target_modules": targets}


def _save_checkpoint(path, model, opt, sched, step, tc, lora_params, extra):
    state = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, v in opt.state.get(p, {}).items():
                state[f"opt.{gi}.{pi}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    for n, p in lora_params.items():
        state[f"lora.{n}"] = p.detach()
    meta = {"step": step, "sched": sched.state_dict(), "train_config": dataclasses.asdict(tc), **extra}
    # heads first, then the state that names their step: a reader checks both agree
    ckpt.save_heads(path, model.heads, model.config)
    ckpt.save_tensors(os.path.join(path, ckpt.TRAIN_STATE_NAME), state, {"format": "graft-train-state",
                                                                         "step": str(step)})
    write_json(os.path.join(path, ckpt.TRAIN_META_NAME), meta)
    ckpt.save_config(path, model.config)


def _rewrite_metrics(path: str, upto: int) -> None:
    """On resume, drop log lines written after the checkpoint (a killed run may have logged more)."""
    file = os.path.join(path, ckpt.METRICS_NAME)
    if not os.path.exists(file):
        return
    keep = []
    with open(file) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= upto:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                break
    atomic_write_bytes(file, "".join(keep).encode())


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, tc: TrainConfig, autocast) -> dict:
    bb, heads = model.backbone, model.heads
    K = heads.num_heads
    agg = {"n": [0] * K, "top1": [0] * K, "top5": [0] * K, "rank": [[0] * RANKS for _ in range(K)], "loss": 0.0}
    nb = 0
    for start in range(0, min(len(blocks), tc.eval_batches * tc.batch_size), tc.batch_size):
        ids = blocks[start:start + tc.batch_size].to(bb.device)
        st = micro_step(bb, heads, ids, tc, autocast, backward=False, ranks=True)
        nb += 1
        agg["loss"] += st["loss"]
        for k in range(K):
            for key in ("n", "top1", "top5"):
                agg[key][k] += st[key][k]
            for r in range(RANKS):
                agg["rank"][k][r] += st["rank"][k][r]
    n = [max(x, 1) for x in agg["n"]]
    return {"loss": agg["loss"] / max(nb, 1), "top1": [a / b for a, b in zip(agg["top1"], n)],
            "top5": [a / b for a, b in zip(agg["top5"], n)],
            "rank_accuracy": [[c / nk for c in row] for row, nk in zip(agg["rank"], n)]}


def micro_step(bb, heads, ids, tc: TrainConfig, autocast, backbone_grad: bool = False, backward: bool = True,
               ranks: bool = False) -> dict:
    """One backbone forward (no grad unless LoRA trains it), all heads, the chunked loss and, with
    `backward`, its backward: gradients accumulate in the heads; the optimizer step is the
    caller's. `ranks` adds the per-rank statistics of evaluation."""
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with autocast:
        with contextlib.nullcontext() if backbone_grad else torch.no_grad():
            trunk, final = bb.forward(ids, pos, features=heads.features)
        hs = heads.hidden(bb, trunk, final, ids)
    return distill_step(bb, heads, hs, final.detach(), ids, loss=tc.loss, decay=tc.head_decay,
                        chunk=tc.vocab_chunk, backward=backward, autocast=autocast, ranks=ranks)


def train(graft_dir: str, data: str, values: dict, *, resume: bool = False, load_in_4bit: bool = False,
          device: str = "auto", progress: bool = True) -> dict:
    """Train the heads in `graft_dir` on `data`. Returns the training summary (also in graft.json)."""
    from tqdm.auto import tqdm

    from .model import load

    config = ckpt.load_config(graft_dir)
    tc = make_train_config(values, config.heads.num_heads)
    meta_file = os.path.join(graft_dir, ckpt.TRAIN_META_NAME)
    meta, state = None, {}
    if resume:
        if not os.path.exists(meta_file):
            raise GraftError(f"--resume: {graft_dir} has no checkpoint ({ckpt.TRAIN_META_NAME}): start without --resume")
        from .config import read_json

        meta = read_json(meta_file, "start again without --resume")
        state, st_meta = ckpt.load_tensors(os.path.join(graft_dir, ckpt.TRAIN_STATE_NAME),
                                           "start again without --resume")
        if st_meta.get("step") != str(meta["step"]):
            raise GraftError(f"the checkpoint in {graft_dir} is inconsistent (state step {st_meta.get('step')}, "
                             f"log step {meta['step']}): start again without --resume")
        tc = make_train_config({k: v for k, v in meta["train_config"].items() if k != "num_heads"},
                               config.heads.num_heads)
    model = load(graft_dir, device=device, load_in_4bit=load_in_4bit or None, heads_dtype="float32")
    bb, heads = model.backbone, model.heads
    heads.train().requires_grad_(True)
    lora_params, lora_info = {}, None
    if tc.lora_r:
        lora_state = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        lora_params, lora_info = _apply_lora(model, tc.lora_r, lora_state or None)
    if bb.tokenizer is None:
        raise GraftError("the backbone has no tokenizer: graft train needs one to read --data")
    blocks = pack(load_records(data), bb.tokenizer, tc.seq_len)
    train_blocks, eval_blocks = split_blocks(blocks, tc.eval_fraction, tc.seed)
    micro_per_step = tc.grad_accum
    total = tc.max_steps or max(1, math.ceil(tc.epochs * len(train_blocks) / (tc.batch_size * micro_per_step)))
    params = list(heads.parameters()) + list(lora_params.values())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    # With --max-minutes the cosine decay ends when time runs out, not at a max_steps never reached:
    # the horizon is re-estimated every step from the pace so far (evaluations included).
    horizon = [total]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, tc.warmup, horizon[0]))
    step = 0
    if meta is not None:
        step = meta["step"]
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                st = {key.split(".")[-1]: v.to(p.device) for key, v in state.items()
                      if key.startswith(f"opt.{gi}.{pi}.")}
                if st:
                    opt.state[p] = st
        sched.load_state_dict(meta["sched"])
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # load_state_dict leaves lr stale
            group["lr"] = lr
        torch.set_rng_state(state["rng.cpu"])
        if "rng.cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng.cuda"])
        _rewrite_metrics(graft_dir, step)
    else:
        if os.path.exists(os.path.join(graft_dir, ckpt.METRICS_NAME)):
            os.unlink(os.path.join(graft_dir, ckpt.METRICS_NAME))
        torch.manual_seed(tc.seed)
    cuda = bb.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    metrics = open(os.path.join(graft_dir, ckpt.METRICS_NAME), "a")
    kill_at = int(os.environ.get("GRAFT_TEST_KILL_AT_STEP", "0"))  # tests: SIGKILL mid-run
    bar = tqdm(total=total, initial=step, desc=f"train {config.heads.family}", unit="step", disable=not progress)
    last_saved, t_start, tokens_seen = step, time.perf_counter(), 0
    pace_from = None  # (step, time) once a few steps have warmed up: the pace under --max-minutes
    first_step = step
    last = {"loss": float("nan"), "top1": [0.0] * heads.num_heads}
    history_tps = []
    try:
        while step < total:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            agg = {"loss": 0.0, "n": [0] * heads.num_heads, "top1": [0] * heads.num_heads}
            for micro in range(micro_per_step):
                idx = batch_indices(step * micro_per_step + micro, tc.batch_size, len(train_blocks), tc.seed)
                ids = train_blocks[idx].to(bb.device)
                st = micro_step(bb, heads, ids, tc, autocast, backbone_grad=bool(lora_params))
                agg["loss"] += st["loss"] / micro_per_step
                for k in range(heads.num_heads):
                    agg["n"][k] += st["n"][k]
                    agg["top1"][k] += st["top1"][k]
                tokens_seen += ids.numel()
            if not math.isfinite(agg["loss"]):
                raise GraftError(f"the loss became {agg['loss']} at step {step + 1}; the last good checkpoint "
                                 f"(step {last_saved}) is kept in {graft_dir}: lower --lr and --resume")
            if micro_per_step > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(micro_per_step)
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            step += 1
            if cuda:
                torch.cuda.synchronize()
            if tc.max_minutes:
                now = time.perf_counter()
                if pace_from is None and step >= first_step + 5:
                    pace_from = (step, now)
                elif pace_from is not None:
                    pace = (now - pace_from[1]) / (step - pace_from[0])
                    horizon[0] = time_horizon(step, total, pace, tc.max_minutes * 60 - (now - t_start))
            sched.step()
            tps = tc.batch_size * micro_per_step * tc.seq_len / (time.perf_counter() - t0)
            history_tps.append(tps)
            top1 = [a / max(b, 1) for a, b in zip(agg["top1"], agg["n"])]
            last = {"loss": agg["loss"], "top1": top1}
            bar.set_postfix(loss=f"{agg['loss']:.3f}", top1="/".join(f"{a:.2f}" for a in top1), tok_s=f"{tps:.0f}")
            bar.update(1)
            if step % tc.log_every == 0 or step == total:
                rec = {"step": step, "loss": agg["loss"], "top1": top1, "lr": sched.get_last_lr()[0],
                       "tokens_per_s": tps}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            if step % tc.eval_every == 0 and len(eval_blocks) and step < total:  # the last: below
                ev = evaluate(model, eval_blocks, tc, autocast)
                metrics.write(json.dumps({"step": step, "eval": ev}) + "\n")
                metrics.flush()
            if step % tc.save_every == 0 or step == total:
                _save_checkpoint(graft_dir, model, opt, sched, step, tc, lora_params, {})
                last_saved = step
            if tc.max_minutes and (time.perf_counter() - t_start) / 60 >= tc.max_minutes and step < total:
                _save_checkpoint(graft_dir, model, opt, sched, step, tc, lora_params, {})
                break
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        metrics.close()
    ev = evaluate(model, eval_blocks if len(eval_blocks) else train_blocks[:tc.batch_size], tc, autocast)
    summary = {"steps": step, "loss": last["loss"], "train_top1": last["top1"], "eval_loss": ev["loss"],
               "top1": ev["top1"], "top5": ev["top5"], "rank_accuracy": ev["rank_accuracy"],
               "data": data, "seq_len": tc.seq_len, "batch_size": tc.batch_size * micro_per_step,
               "minutes_this_run": (time.perf_counter() - t_start) / 60,
               "tokens_per_s": sum(history_tps) / max(len(history_tps), 1),
               "device": str(bb.device), "load_in_4bit": bb.identity.load_in_4bit}
    model.config.training = summary
    model.config.lora = lora_info
    ckpt.save_config(graft_dir, model.config)
    if lora_params:
        ckpt.save_tensors(os.path.join(graft_dir, ckpt.LORA_NAME), {n: p for n, p in lora_params.items()},
                          {"format": "graft-lora"})
    with open(os.path.join(graft_dir, ckpt.METRICS_NAME), "a") as f:
        f.write(json.dumps({"step": step, "eval": ev, "final": True}) + "\n")
    return summary
