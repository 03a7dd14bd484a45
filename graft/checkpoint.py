"""The only module that knows graft's file formats.

A graft folder holds `graft.json` (backbone identity, head spec, training summary, decoding
tree) and `heads.safetensors` (trained tensors only). An export adds the backbone itself as
Hugging Face safetensors with its config and tokenizer. Everything is written to a temporary
file and renamed into place; nothing is ever unpickled.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .config import GRAFT_VERSION, HEADS_FILE, LORA_FILE, TRAIN_STATE_FILE, GraftConfig, GraftError, atomic_write_bytes, read_json, write_json

CONFIG_NAME = "graft.json"
HEADS_NAME = HEADS_FILE
METRICS_NAME = "metrics.jsonl"
TRAIN_STATE_NAME = TRAIN_STATE_FILE
TRAIN_META_NAME = "train_state.json"
HEADS_FORMAT = "graft-heads"
LORA_NAME = LORA_FILE


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
    try:
        with safe_open(file, framework="pt") as f:  # one read: tensors and metadata together
            tensors = {k: f.get_tensor(k) for k in f.keys()}
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


def load_lora_into(path: str, model, lora: dict) -> None:
    """Re-apply LoRA adapters trained with --lora-r (the backbone then differs from the original)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise GraftError(f"{path} has LoRA adapters on its backbone; loading them needs peft: `pip install peft`")
    from peft import LoraConfig, inject_adapter_in_model

    tensors, _ = load_tensors(os.path.join(path, LORA_NAME), "re-run `graft train` with --lora-r")
    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"], lora_dropout=0.0)
    hf = model.backbone.hf
    inject_adapter_in_model(cfg, hf)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params:
                raise GraftError(f"{path}/{LORA_NAME} holds {name}, which the backbone lacks: re-train")
            params[name].copy_(t.to(params[name].dtype))
    hf.requires_grad_(False)


def _merge_lora(hf) -> None:
    """Fold each LoRA adapter into its base weight and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(hf.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())


def export(src: str, out: str, *, dtype: str = "auto", merge_lora: bool = False, tree_size: int = 0,
           force: bool = False, max_shard_size: str = "2GB") -> None:
    """Write a self-contained export of the graft folder `src` into `out` (see `graft export --help`)."""
    import shutil
    import tempfile

    from .backbone import _folder_fingerprint
    from .model import load
    from .tree import build_tree, default_accuracies

    config = load_config(src)
    if config.lora and not merge_lora:
        raise GraftError(f"{src} trained LoRA adapters on the backbone: pass --merge-lora to fold them into the "
                         "exported backbone")
    if os.path.abspath(src) == os.path.abspath(out):
        raise GraftError("--out must differ from the graft folder: choose a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not force)):
        raise GraftError(f"--out {out} exists and is not empty: choose another folder or pass --force")
    target = config.backbone.dtype if dtype == "auto" else dtype
    # The export holds a full-precision backbone: a 4-bit training backbone is reloaded unquantized.
    model = load(src, device="cpu", dtype=target, load_in_4bit=False, heads_dtype="float32")
    hf = model.backbone.hf
    if config.lora:
        _merge_lora(hf)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".graft-export-")
    if ident_is_gguf(hf):
        # A GGUF load is already dequantized in memory; only the quantizer tag forbids saving it.
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
    try:
        hf.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        ident = config.backbone
        training = dict(config.training or {})
        training["trained_on"] = ident.describe()
        acc = training.get("rank_accuracy") or default_accuracies(config.heads.num_heads)
        size = tree_size or (64 if torch.cuda.is_available() else 24)
        new_ident = type(ident)(**{**ident.__dict__, "source": ".", "sha256": _folder_fingerprint(tmp),
                                   "gguf_file": None, "dtype": target, "load_in_4bit": False, "revision": None})
        new = GraftConfig(backbone=new_ident, heads=config.heads, training=training,
                          tree=build_tree(acc, size), lora=None)
        save_heads(tmp, model.heads, new)
        save_config(tmp, new)
        if os.path.exists(out):
            old = out.rstrip("/") + ".old-" + os.path.basename(tmp)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ident_is_gguf(hf) -> bool:
    q = getattr(hf, "hf_quantizer", None)
    return q is not None and type(q).__name__.lower().startswith("gguf")
