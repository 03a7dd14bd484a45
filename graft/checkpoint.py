"""The only module that knows graft's file formats.

A graft folder holds `graft.json` (backbone identity, head spec, training summary, decoding
tree) and `heads.safetensors` (trained tensors only). An export adds the backbone itself as
Hugging Face safetensors with its config and tokenizer. Everything is written to a temporary
file and renamed into place; nothing is ever unpickled.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import GRAFT_VERSION, GraftConfig, GraftError, atomic_write_bytes, read_json, write_json

CONFIG_NAME = "graft.json"
HEADS_NAME = "heads.safetensors"
METRICS_NAME = "metrics.jsonl"
TRAIN_STATE_NAME = "train_state.safetensors"
TRAIN_META_NAME = "train_state.json"
HEADS_FORMAT = "graft-heads"


def prepare_out_dir(path: str, force: bool, what: str = "--out") -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise GraftError(f"{what} {path} exists and is a file: choose another path")
        if os.listdir(path) and not force:
            raise GraftError(f"{what} {path} exists and is not empty: choose another folder or pass --force")
    os.makedirs(path, exist_ok=True)


def is_graft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def save_config(path: str, config: GraftConfig) -> None:
    write_json(os.path.join(path, CONFIG_NAME), config.to_dict())


def load_config(path: str) -> GraftConfig:
    if not os.path.isdir(path):
        raise GraftError(f"{path} does not exist: give a folder made by `graft add-heads` or `graft export`")
    if not is_graft_dir(path):
        raise GraftError(f"{path} has no {CONFIG_NAME}: give a folder made by `graft add-heads` or `graft export`")
    d = read_json(os.path.join(path, CONFIG_NAME), "recreate it with `graft add-heads`")
    if not isinstance(d, dict):
        raise GraftError(f"{CONFIG_NAME} in {path} is not a graft config: recreate it with `graft add-heads`")
    return GraftConfig.from_dict(d)


def save_tensors(file: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(file, st_save(tensors, metadata=metadata))


def load_tensors(file: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(file):
        raise GraftError(f"{file} is missing: {what}")
    with open(file, "rb") as f:
        data = f.read()
    try:
        from safetensors import deserialize  # noqa: F401  (metadata via safe_open below)
        from safetensors import safe_open

        tensors = st_load(data)
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError, ImportError) as e:
        raise GraftError(f"{file} is corrupt or not safetensors ({str(e).splitlines()[0][:80]}): {what}")
    return tensors, meta


def save_heads(path: str, heads, config: GraftConfig) -> None:
    meta = {"format": HEADS_FORMAT, "family": config.heads.family, "graft_version": GRAFT_VERSION}
    state = {k: v.float() if v.is_floating_point() else v for k, v in heads.state_dict().items()}
    save_tensors(os.path.join(path, HEADS_NAME), state, meta)


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
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise GraftError(f"{file}: tensor {k} holds NaN or inf: {fix}")
    heads.load_state_dict(tensors, strict=True)
