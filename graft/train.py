"""The training loop: only the heads (and optional LoRA adapters) learn; the backbone is frozen.

No Click and no printing here beyond the progress bar and the metrics log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import torch

from . import checkpoint as ckpt
from .config import GraftError, TrainConfig, WriteError, atomic_write_bytes
from .data import batch_indices, load_records, pack, split_blocks
from .distributed import Dist
from .distributed import setup as dist_setup
from .losses import RANKS, chunk_rows, distill_step
from .optim import adapt_state, make_optimizer


def load_recipe(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise GraftError(f"recipe {path} not found: check the path")
    except yaml.YAMLError as e:
        raise GraftError(f"recipe {path} is not valid YAML ({e.__class__.__name__}): fix it")
    d = d.get("train", d) if isinstance(d, dict) else d
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise GraftError(f"recipe {path} must be a mapping of option: value (under `train:`)")
    return {k.replace("-", "_"): _number(v) for k, v in d.items()}


def _number(v):
    """YAML 1.1 reads `1e-3` as a string: numbers written so are numbers."""
    if isinstance(v, str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
    return v


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
def evaluate(model, blocks: torch.Tensor, tc: TrainConfig, autocast, dd: Dist | None = None,
             answers: torch.Tensor | None = None) -> dict:
    """Held-out loss, and per depth top-1/top-5 agreement and per-rank accuracy: the decoding fit's
    estimate of how often drafts land. `answers` (bool, like `blocks`): count the drafts of those
    tokens only (decoding drafts answers, not prompts or chat templates); None counts every one.
    Under several processes each evaluates its share of the blocks and the counts are summed."""
    dd = dd or Dist()
    bb, heads = model.backbone, model.heads
    K = heads.num_heads
    held_out = dataclasses.replace(tc, topk=0)  # the held-out loss is the KL alone, comparable across runs
    # every process runs as many batches (a sharded backbone gathers its layers collectively);
    # one whose share has run out repeats a block and leaves it uncounted
    share = math.ceil(len(blocks) / dd.world)
    spare, blocks = blocks[:1], blocks[dd.rank::dd.world]
    answers = None if answers is None else answers[dd.rank::dd.world]
    # one tensor for one all-reduce: loss sum, batches, then per depth n, top1, top5 and ranks
    agg = torch.zeros(2 + K * (3 + RANKS), dtype=torch.float64)
    counts = agg[2:].view(K, 3 + RANKS)
    for start in range(0, min(share, tc.eval_batches * tc.batch_size), tc.batch_size):
        ids = blocks[start:start + tc.batch_size]
        count = None if answers is None or not len(ids) else answers[start:start + tc.batch_size].to(bb.device)
        st = micro_step(bb, heads, (ids if len(ids) else spare).to(bb.device), held_out, autocast, backward=False,
                        ranks=True, count=count)
        if not len(ids):
            continue
        agg[0] += st["loss"]
        agg[1] += 1
        for k in range(K):
            counts[k, :3] += torch.tensor([st["n"][k], st["top1"][k], st["top5"][k]], dtype=torch.float64)
            counts[k, 3:] += torch.tensor(st["rank"][k], dtype=torch.float64)
    agg = dd.all_reduce_(agg.to(bb.device)).cpu()
    counts = agg[2:].view(K, 3 + RANKS)
    n = counts[:, 0].clamp_min(1)
    return {"loss": float(agg[0] / agg[1].clamp_min(1)), "top1": (counts[:, 1] / n).tolist(),
            "top5": (counts[:, 2] / n).tolist(), "rank_accuracy": (counts[:, 3:] / n[:, None]).tolist()}


def micro_step(bb, heads, ids, tc: TrainConfig, autocast, backbone_grad: bool = False, backward: bool = True,
               ranks: bool = False, count: torch.Tensor | None = None) -> dict:
    """One backbone forward (no grad unless LoRA trains it), all heads, the chunked loss and, with
    `backward`, its backward: gradients accumulate in the heads; the optimizer step is the
    caller's. `ranks` adds the per-rank statistics of evaluation."""
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with autocast:
        with contextlib.nullcontext() if backbone_grad else torch.no_grad():
            trunk, final = bb.forward(ids, pos, features=heads.features)
        hs = heads.hidden(bb, trunk, final, ids)
    return distill_step(bb, heads, hs, final.detach(), ids, loss=tc.loss, decay=tc.head_decay,
                        chunk=chunk_rows(tc.vocab_chunk, bb.vocab_size),
                        backward=backward, autocast=autocast, ranks=ranks, align=tc.align, topk=tc.topk,
                        topk_weight=tc.topk_weight, count=count)


@dataclasses.dataclass
class _Run:
    """One training run's moving parts, set up once and advanced step by step."""

    graft_dir: str
    data: str
    tc: TrainConfig
    model: object
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    train_answers: torch.Tensor  # where the blocks' answers are: the positions the top-1 figures count
    eval_answers: torch.Tensor
    params: list
    lora_params: dict
    opt: object
    sched: object
    horizon: list  # [the step the learning-rate decay ends at]; moves under --max-minutes
    total: int
    autocast: object
    dd: Dist
    lora: dict | None = None  # the adapters' spec, recorded in graft.json when the run ends
    step: int = 0
    started: float = 0.0
    tps: list = dataclasses.field(default_factory=list)
    last: dict = dataclasses.field(default_factory=dict)

    def minutes(self) -> float:
        """Wall minutes of this run (this process's, since its loop started)."""
        return (time.perf_counter() - self.started) / 60


def train(graft_dir: str, data: str, values: dict, *, resume: bool = False, load_in_4bit: bool = False,
          device: str = "auto", progress: bool = True, verify_backbone: bool = True,
          shard_backbone: bool = False) -> dict:
    """Train the heads in `graft_dir` on `data`. Returns the training summary (also in graft.json).

    Under `accelerate launch` or `torchrun` each process trains on its share of every batch
    (`batch_size` sequences a process; the global batch is batch_size x grad_accum x processes)
    and the gradients are averaged; rank 0 alone writes. `shard_backbone` shards the frozen
    backbone's decoder layers over the processes (FSDP2) instead of holding it whole in each.

    Raises:
        GraftError: bad options or data, another process training the same folder, a diverged loss.
    """
    dd = dist_setup()
    config = ckpt.load_config(graft_dir)
    with ckpt.folder_lock(graft_dir, "training it") if dd.main else contextlib.nullcontext():
        run = _setup(graft_dir, data, values, config, resume, load_in_4bit, dd.device(device), verify_backbone, dd,
                     shard_backbone)
        _loop(run, config, progress and dd.main)
        return _finish(run)


def _check_sharding(dd: Dist, load_in_4bit: bool, lora_r) -> None:
    if dd.world < 2:
        raise GraftError("--shard-backbone shards the backbone over several processes: launch with `torchrun "
                         "--nproc_per_node N -m graft train ...` or `accelerate launch --num_processes N -m graft ...`")
    if load_in_4bit:
        raise GraftError("--shard-backbone does not take a 4-bit backbone (FSDP needs bitsandbytes' "
                         "bnb_4bit_quant_storage set to the compute dtype, which graft does not set up): drop one")
    if lora_r:
        raise GraftError("--shard-backbone trains no LoRA adapters (the backbone's sharded weights stay frozen): "
                         "drop --lora-r or the sharding")


def _setup(graft_dir, data, values, config, resume, load_in_4bit, device, verify_backbone=True,
           dd: Dist | None = None, shard_backbone: bool = False) -> _Run:
    """The model, the data, the optimizer and the schedule; from the checkpoint with `resume`."""
    from .backbone import resolve_device
    from .model import load

    dd = dd or Dist()
    tc = make_train_config(values, config.heads.num_heads)
    checkpoint = ckpt.load_checkpoint(graft_dir) if resume else None
    if checkpoint is not None:  # the run continues with its own options, but for those given now
        saved = {k: v for k, v in checkpoint[1]["train_config"].items() if k != "num_heads"}
        tc = make_train_config({**saved, **values}, config.heads.num_heads)
    if shard_backbone:
        _check_sharding(dd, load_in_4bit or config.backbone.load_in_4bit, tc.lora_r)
    # sharded: loaded whole on the CPU, then each process keeps its share on its device
    model = load(graft_dir, device="cpu" if shard_backbone else device, load_in_4bit=load_in_4bit or None,
                 heads_dtype="float32", verify_backbone=verify_backbone)
    if shard_backbone:
        target = resolve_device(device)
        model.backbone.shard(target)
        model.heads.to(target)
    bb, heads = model.backbone, model.heads
    state = checkpoint[2] if checkpoint else {}
    if checkpoint:  # the checkpoint's own heads: heads.safetensors may be of another step
        heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    heads.train().requires_grad_(True)
    lora_params, lora = {}, None
    if tc.lora_r:
        lora = ckpt.lora_spec(bb.model_type, tc.lora_r)
        saved = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        lora_params = ckpt.apply_lora(bb.hf, lora, saved or None, trainable=True)
    if bb.tokenizer is None:
        raise GraftError("the backbone has no tokenizer: graft train needs one to read --data")
    blocks, answers = pack(load_records(data), bb.tokenizer, tc.seq_len)
    train_idx, eval_idx = split_blocks(len(blocks), tc.eval_fraction, tc.seed)
    train_blocks, eval_blocks = blocks[train_idx], blocks[eval_idx]
    if heads.draft_ids is not None and checkpoint is None:  # FR-Spec: the data's most frequent tokens
        heads.set_draft_vocab(torch.bincount(train_blocks.flatten(), minlength=bb.vocab_size)[:bb.vocab_size])
    total = tc.max_steps or max(1, math.ceil(tc.epochs * len(train_blocks) / (tc.batch_size * tc.grad_accum)))
    params = list(heads.parameters()) + list(lora_params.values())
    opt = make_optimizer(params, tc.lr, tc.weight_decay)
    # With --max-minutes the cosine decay ends when time runs out, not at a max_steps never reached:
    # the horizon is re-estimated every step from the pace so far (evaluations included).
    horizon = [total]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, tc.warmup, horizon[0]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bb.device.type == "cuda" else contextlib.nullcontext()
    run = _Run(graft_dir, data, tc, model, train_blocks, eval_blocks, answers[train_idx], answers[eval_idx], params,
               lora_params, opt, sched, horizon, total, autocast, dd, lora)
    if checkpoint:
        run.step = checkpoint[0]
        ckpt.restore_optimizer(opt, state)
        adapt_state(opt)
        sched.load_state_dict(checkpoint[1]["sched"])
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # load_state_dict leaves lr stale
            group["lr"] = lr
        own = f".{dd.rank}" if dd.rank else ""  # each process continues with its own random state
        torch.set_rng_state(state["rng.cpu" + own])
        if "rng.cuda" + own in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng.cuda" + own])
        if dd.main:
            _rewrite_metrics(graft_dir, run.step)
    else:
        if dd.main:
            ckpt.clear_training_state(graft_dir)
        torch.manual_seed(tc.seed + dd.rank)
    dd.barrier()
    return run


def _step(run: _Run) -> dict:
    """One optimizer step over grad_accum micro-batches. Returns its loss and per-depth top-1."""
    bb, heads, tc, dd = run.model.backbone, run.model.heads, run.tc, run.dd
    K, micro = heads.num_heads, tc.grad_accum
    run.opt.zero_grad(set_to_none=True)
    agg = torch.zeros(1 + 2 * K, dtype=torch.float64)  # loss, then n and top1 per depth
    for m in range(micro):
        # the global batch of this micro-step, as one process would take it; each its share
        idx = batch_indices(run.step * micro + m, tc.batch_size * dd.world, len(run.train_blocks), tc.seed)
        own = idx[dd.rank * tc.batch_size:(dd.rank + 1) * tc.batch_size]
        ids, count = run.train_blocks[own].to(bb.device), run.train_answers[own].to(bb.device)
        st = micro_step(bb, heads, ids, tc, run.autocast, backbone_grad=bool(run.lora_params), count=count)
        agg[0] += st["loss"] / micro
        agg[1:] += torch.tensor(st["n"] + st["top1"], dtype=torch.float64)
    agg = dd.all_reduce_(agg.to(bb.device)).cpu()
    loss = float(agg[0]) / dd.world
    if not math.isfinite(loss):  # the same figure on every process: all stop together
        raise GraftError(f"the loss became {loss} at step {run.step + 1}; the last good checkpoint is kept "
                         f"in {run.graft_dir}: lower --lr and --resume")
    if micro > 1:
        for p in run.params:
            if p.grad is not None:
                p.grad.div_(micro)
    dd.average_gradients(run.params)
    torch.nn.utils.clip_grad_norm_(run.params, tc.max_grad_norm)
    run.opt.step()
    run.step += 1
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    n, top1 = agg[1:1 + K].tolist(), agg[1 + K:].tolist()
    return {"loss": loss, "top1": [a / max(b, 1) for a, b in zip(top1, n)]}


def _save(run: _Run) -> None:
    """The checkpoint (one file), then the heads and graft.json that `load` and `export` read.
    Every process takes part (their random states go into the checkpoint); rank 0 writes."""
    dd = run.dd
    rng = dd.gather_objects((torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None))
    if not all(torch.isfinite(p).all() for p in run.model.heads.parameters()):  # every process sees it
        raise GraftError(f"the heads hold NaN or inf at step {run.step}; the last good checkpoint is kept in "
                         f"{run.graft_dir}: lower --lr and --resume")
    if not dd.main:
        return
    extra = {}
    for r, (cpu, cuda) in enumerate(rng[1:], start=1):
        extra[f"rng.cpu.{r}"] = cpu
        if cuda is not None:
            extra[f"rng.cuda.{r}"] = cuda
    meta = {"sched": run.sched.state_dict(), "train_config": dataclasses.asdict(run.tc), "processes": dd.world}
    try:
        ckpt.save_checkpoint(run.graft_dir, heads=run.model.heads, opt=run.opt, step=run.step, meta=meta,
                             lora_params=run.lora_params, extra=extra)
        ckpt.save_heads(run.graft_dir, run.model.heads, run.model.config)
        ckpt.save_config(run.graft_dir, run.model.config)
    except WriteError as e:  # a full disk, say: each file is whole or absent, never half-written
        raise GraftError(f"the step-{run.step} checkpoint was not written ({e}); the last complete checkpoint is "
                         "kept: --resume once that is fixed") from None


def _loop(run: _Run, config, progress: bool) -> None:
    from tqdm.auto import tqdm

    tc = run.tc
    run.started = time.perf_counter()
    run.last = {"loss": float("nan"), "top1": [0.0] * run.model.heads.num_heads}
    first, pace_from = run.step, None  # (step, time) once a few steps have warmed up
    bar = tqdm(total=run.total, initial=run.step, desc=f"train {config.heads.family}", unit="step",
               disable=not progress)
    main = run.dd.main
    log = open(os.path.join(run.graft_dir, ckpt.METRICS_NAME), "a") if main else contextlib.nullcontext()
    with log as metrics, bar:
        while run.step < run.total:
            t0 = time.perf_counter()
            st = _step(run)
            if tc.max_minutes:
                now = time.perf_counter()
                if pace_from is None and run.step >= first + 5:
                    pace_from = (run.step, now)
                elif pace_from is not None:
                    pace = (now - pace_from[1]) / (run.step - pace_from[0])
                    run.horizon[0] = time_horizon(run.step, run.total, pace, tc.max_minutes * 60 - (now - run.started))
            run.sched.step()
            tps = tc.batch_size * tc.grad_accum * tc.seq_len / (time.perf_counter() - t0)
            run.tps.append(tps)
            run.last = st
            bar.set_postfix(loss=f"{st['loss']:.3f}", top1="/".join(f"{a:.2f}" for a in st["top1"]), tok_s=f"{tps:.0f}")
            bar.update(1)
            if main and (run.step % tc.log_every == 0 or run.step == run.total):
                metrics.write(json.dumps({"step": run.step, "loss": st["loss"], "top1": st["top1"],
                                          "lr": run.sched.get_last_lr()[0], "tokens_per_s": tps}) + "\n")
                metrics.flush()
            if run.step % tc.eval_every == 0 and len(run.eval_blocks) and run.step < run.total:  # the last: below
                ev = evaluate(run.model, run.eval_blocks, tc, run.autocast, run.dd, run.eval_answers)
                if main:
                    metrics.write(json.dumps({"step": run.step, "minutes": run.minutes(), "eval": ev}) + "\n")
                    metrics.flush()
            out_of_time = torch.tensor(float(bool(tc.max_minutes) and run.minutes() >= tc.max_minutes))
            out_of_time = bool(run.dd.all_reduce_(out_of_time.to(run.model.backbone.device)).item())  # all stop at once
            if run.step % tc.save_every == 0 or run.step == run.total or out_of_time:
                _save(run)
            if out_of_time:
                break


def _finish(run: _Run) -> dict:
    """The final evaluation and the training summary in graft.json."""
    tc, model = run.tc, run.model
    bb = model.backbone
    if len(run.eval_blocks):
        ev = evaluate(model, run.eval_blocks, tc, run.autocast, run.dd, run.eval_answers)
    else:  # one block of data: it is evaluated as trained, every position counted
        ev = evaluate(model, run.train_blocks[:tc.batch_size * run.dd.world], tc, run.autocast, run.dd)
    summary = {"steps": run.step, "loss": run.last["loss"], "train_top1": run.last["top1"], "eval_loss": ev["loss"],
               "top1": ev["top1"], "top5": ev["top5"], "rank_accuracy": ev["rank_accuracy"],
               "data": run.data, "seq_len": tc.seq_len, "batch_size": tc.batch_size * tc.grad_accum,
               "lr": tc.lr, "loss_kind": tc.loss, "head_decay": tc.head_decay, "align": tc.align, "topk": tc.topk,
               "minutes_this_run": run.minutes(),
               "tokens_per_s": sum(run.tps) / max(len(run.tps), 1),
               "device": str(bb.device), "load_in_4bit": bb.identity.load_in_4bit, "processes": run.dd.world,
               "sharded_backbone": bb.sharded}
    if bb.device.type == "cuda":
        summary["peak_gpu_gib"] = torch.cuda.max_memory_allocated(bb.device) / 2 ** 30
    ids = model.heads.draft_ids
    if ids is not None:  # what a draft vocabulary can still hit: a token outside it is never drafted
        held = run.eval_blocks if len(run.eval_blocks) else run.train_blocks
        summary["draft_vocab_coverage"] = torch.isin(held, ids.to(held.device)).float().mean().item()
    if not run.dd.main:
        return summary
    model.config.training = summary
    model.config.lora = run.lora
    if run.lora_params:  # the backbone itself changed: the folder now carries its adapters
        ckpt.save_tensors(os.path.join(run.graft_dir, ckpt.LORA_NAME), run.lora_params, {"format": "graft-lora"})
    ckpt.save_config(run.graft_dir, model.config)
    with open(os.path.join(run.graft_dir, ckpt.METRICS_NAME), "a") as f:
        f.write(json.dumps({"step": run.step, "minutes": summary["minutes_this_run"], "eval": ev, "final": True}) + "\n")
    return summary
