"""The only module that knows graft's file formats.

A graft folder holds `graft.json` (backbone identity, head spec, training summary, decoding
tree) and `heads.safetensors` (trained tensors only). An export adds the backbone itself as
Hugging Face safetensors with its config and tokenizer. Everything is written to a temporary
file and renamed into place; nothing is ever unpickled.
"""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .config import (GRAFT_VERSION, HEADS_FILE, LORA_FILE, TRAIN_STATE_FILE, GraftConfig, GraftError,
                     atomic_write_bytes, read_json, write_json)

CONFIG_NAME = "graft.json"
HEADS_NAME = HEADS_FILE
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = TRAIN_STATE_FILE  # heads, optimizer, RNG and LoRA of one step, in one file
HEADS_FORMAT = "graft-heads"
CHECKPOINT_FORMAT = "graft-checkpoint"
LORA_NAME = LORA_FILE
LOCK_NAME = ".graft.lock"


def prepare_out_dir(path: str, force: bool, what: str = "--out") -> None:
    from .files import refuse_link

    refuse_link(path, what)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise GraftError(f"{what} {path} exists and is a file: choose another path")
        if os.listdir(path) and not force:
            raise GraftError(f"{what} {path} exists and is not empty: choose another folder or pass --force")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise GraftError(f"cannot create {what} {path} ({e.strerror}): choose a writable folder")
    if not os.access(path, os.W_OK):
        raise GraftError(f"{what} {path} is not writable: choose a writable folder")


def is_graft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def save_config(path: str, config: GraftConfig) -> None:
    write_json(os.path.join(path, CONFIG_NAME), config.to_dict())


def load_config(path: str) -> GraftConfig:
    if not os.path.isdir(path):
        raise GraftError(f"{path} {'is a file, not a folder' if os.path.exists(path) else 'does not exist'}: give a "
                         "folder made by `graft add-heads` or `graft export`")
    if not is_graft_dir(path):
        raise GraftError(f"{path} has no {CONFIG_NAME}: give a folder made by `graft add-heads` or `graft export`")
    file = os.path.join(path, CONFIG_NAME)
    d = read_json(file, "recreate it with `graft add-heads`")
    if not isinstance(d, dict):
        raise GraftError(f"{file} is not a graft config: recreate it with `graft add-heads`")
    try:
        return GraftConfig.from_dict(d)
    except GraftError as e:
        raise GraftError(f"{file}: {e}") from None


def save_tensors(file: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    out, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        where = v.untyped_storage().data_ptr()
        if where in storages:  # views of one buffer (fused projections): safetensors wants each its own
            v = v.clone()
        storages.add(where)
        out[k] = v
    atomic_write_bytes(file, st_save(out, metadata=metadata))


def load_tensors(file: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(file):
        raise GraftError(f"{file} is missing: {what}")
    try:
        with safe_open(file, framework="pt") as f:  # one read: tensors and metadata together
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError, ImportError) as e:
        raise GraftError(f"{file} is corrupt or not safetensors ({str(e).splitlines()[0][:80]}): {what}")
    return tensors, meta


def save_heads(path: str, heads, config: GraftConfig) -> None:
    meta = {"format": HEADS_FORMAT, "family": config.heads.family, "graft_version": GRAFT_VERSION}
    save_tensors(os.path.join(path, HEADS_NAME), heads.storage_state(), meta)


STORED = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes graft stores head tensors in


def load_heads_into(path: str, heads, config: GraftConfig) -> None:
    """Load strictly: same family, same tensor names and shapes, or a one-line error."""
    file = os.path.join(path, HEADS_NAME)
    fix = "re-run `graft add-heads` / `graft train`, or restore the file"
    tensors, meta = load_tensors(file, fix)
    if meta.get("format") != HEADS_FORMAT:
        raise GraftError(f"{file} is not a graft heads file (format {meta.get('format')!r}): {fix}")
    if meta.get("family") != config.heads.family:
        raise GraftError(f"{file} holds {meta.get('family')} heads but graft.json says {config.heads.family}: {fix}")
    own = heads.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise GraftError(f"{file} does not match the head spec (missing {missing[:3]}, unexpected {extra[:3]}): {fix}")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise GraftError(f"{file}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)} "
                             f"(heads made for another backbone?): {fix}")
        if v.is_floating_point() != own[k].is_floating_point() or (
                v.dtype not in STORED if v.is_floating_point() else v.dtype != own[k].dtype):
            want = "a float32, bfloat16 or float16 tensor" if own[k].is_floating_point() else f"{own[k].dtype} ids"
            raise GraftError(f"{file}: tensor {k} is {v.dtype}, expected {want}: {fix}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise GraftError(f"{file}: tensor {k} holds NaN or inf: {fix}")
        if not v.is_floating_point() and v.numel() and (v.min() < 0 or v.max() >= config.backbone.vocab_size):
            raise GraftError(f"{file}: tensor {k} holds token ids outside the vocabulary: {fix}")
    heads.load_state_dict(tensors, strict=True)


def lora_spec(model_type: str, r: int) -> dict:
    """The adapters --lora-r trains: rank r, alpha 2r, on the attention's query and value."""
    return {"r": r, "alpha": 2 * r, "target_modules": ["c_attn"] if model_type == "gpt2" else ["q_proj", "v_proj"]}


def apply_lora(hf, lora: dict, state: dict | None = None, *, trainable: bool = False) -> dict:
    """Inject LoRA adapters (`lora_spec`) into the backbone, optionally with saved tensors;
    returns the adapters' parameters by name (float32 and trainable when `trainable`)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise GraftError("LoRA adapters on the backbone need peft: run `pip install peft`")
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"], lora_dropout=0.0)
    inject_adapter_in_model(cfg, hf)
    params = {n: p for n, p in hf.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, t in (state or {}).items():
            if name not in params:
                raise GraftError(f"saved LoRA tensor {name} does not fit this backbone: re-train")
            params[name].copy_(t.to(params[name].dtype))
    hf.requires_grad_(False)
    for p in params.values():
        if trainable:
            p.data = p.data.float()
        p.requires_grad_(trainable)
    return params


def load_lora_into(path: str, model, lora: dict) -> None:
    """Re-apply LoRA adapters trained with --lora-r (the backbone then differs from the original)."""
    tensors, _ = load_tensors(os.path.join(path, LORA_NAME), "re-run `graft train` with --lora-r")
    apply_lora(model.backbone.hf, lora, tensors)


# -- training checkpoints: one file per step, written then renamed, so a reader sees one step's
#    heads, optimizer, RNG and adapters together or the previous checkpoint whole

def optimizer_tensors(opt) -> dict:
    """AdamW's state as flat tensors: opt.{group}.{param}.{key}."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, v in opt.state.get(p, {}).items():
                out[f"opt.{gi}.{pi}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_optimizer(opt, tensors: dict) -> None:
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            prefix = f"opt.{gi}.{pi}."
            st = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                opt.state[p] = st


def save_checkpoint(path: str, *, heads, opt, step: int, meta: dict, lora_params: dict, extra=None) -> None:
    """Refuses non-finite heads: a diverged run never overwrites the last good checkpoint."""
    state = {f"heads.{k}": v for k, v in heads.storage_state().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GraftError(f"the heads hold NaN or inf at step {step} ({bad[0]}); the last good checkpoint is kept in "
                         f"{path}: lower --lr and --resume")
    state.update(optimizer_tensors(opt))
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    state.update({f"lora.{n}": p.detach() for n, p in lora_params.items()})
    state.update(extra or {})  # other processes' random states
    save_tensors(os.path.join(path, CHECKPOINT_NAME), state,
                 {"format": CHECKPOINT_FORMAT, "step": str(step), "meta": json.dumps(meta)})


def load_checkpoint(path: str) -> tuple[int, dict, dict]:
    """(step, meta, tensors) of the checkpoint in `path`."""
    fix = "start again without --resume"
    file = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(file):
        raise GraftError(f"--resume: {path} has no checkpoint ({CHECKPOINT_NAME}): start without --resume")
    tensors, m = load_tensors(file, fix)
    try:
        if m.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(m.get("format"))
        step, meta = int(m["step"]), json.loads(m["meta"])
    except (KeyError, ValueError, TypeError):
        raise GraftError(f"{file} is not a graft checkpoint of this version: {fix}")
    return step, meta, tensors


def clear_training_state(path: str) -> None:
    """What an earlier run left (checkpoint, metrics, adapters): removed by add-heads --force."""
    for name in (CHECKPOINT_NAME, METRICS_NAME, LORA_NAME, "train_state.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            os.unlink(f)


@contextmanager
def folder_lock(path: str, what: str, reading: bool = False):
    """One writer per graft folder: a lock file with the holder's PID. A lock whose process is
    gone is stale and taken over. `reading`: the caller only reads the folder, so a folder that
    cannot be written (read-only, not ours) needs no lock: nobody can be writing it either."""
    file = os.path.join(path, LOCK_NAME)
    fd = None
    for _ in range(2):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(open(file).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise GraftError(f"{path} is in use by another graft process (PID {pid}): wait for it to finish, "
                                 f"or stop it, before {what}")
            _unlink(file)  # stale
        except OSError as e:  # a read-only folder, one that is not ours, a full disk
            if reading and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                yield
                return
            raise GraftError(f"cannot write in {path} ({e.strerror or e}) before {what}: check its permissions and "
                             "the disk") from None
    if fd is None:
        raise GraftError(f"could not lock {path}: remove {file} if no graft process uses the folder")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        try:
            os.unlink(file)
        except OSError:
            pass


def _unlink(file: str) -> None:
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise GraftError(f"cannot remove the stale lock {file} ({e.strerror or e}): check the folder's permissions") \
            from None


def _alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie (killed, not yet reaped: in a container whose first
    process reaps nothing it stays one) holds no lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): kill's answer stands
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False  # gone since
    except (OSError, IndexError):
        return True


def merge_lora(hf) -> None:
    """Fold each LoRA adapter into its base weight and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(hf.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
