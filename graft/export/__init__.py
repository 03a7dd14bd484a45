"""`graft export`: the graft folder's heads (and for the default format its backbone) written in
a format of `graft.registry.FORMATS`, one module each in this package. Above both `model`
(loading) and `checkpoint` (graft's own files).

The export is written into a temporary folder beside `--out` and renamed into place, so an
interrupted export never leaves a half-written folder where a good one stood; leftovers of an
export killed outright are removed at the next export into the same parent.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time

from safetensors import SafetensorError

from .. import checkpoint as ckpt
from .. import files
from ..config import GraftError, WriteError, current_umask
from ..registry import FORMATS, resolve

TMP_PREFIX, OLD_TAG = ".graft-export-", ".old-graft-export-"


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _clean_leftovers(parent: str) -> None:
    """Temporary folders of exports that died: their process (its PID is in the name) is gone, or,
    for names without one, more than an hour ago."""
    for d in glob.glob(os.path.join(parent, TMP_PREFIX + "*")) + glob.glob(os.path.join(parent, "*" + OLD_TAG + "*")):
        tail = os.path.basename(d).split(TMP_PREFIX, 1)[-1]
        pid = int(tail.split("-", 1)[0]) if tail.split("-", 1)[0].isdigit() else None
        try:
            if os.path.islink(d):
                continue
            if (pid is not None and pid != os.getpid() and not ckpt._alive(pid)) or \
                    time.time() - os.path.getmtime(d) > 3600:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _readable(folder: str) -> None:
    """Files as readable as any the user makes (libraries write some through private temporaries)."""
    mode = 0o666 & ~current_umask()
    for name in os.listdir(folder):
        f = os.path.join(folder, name)
        if os.path.isfile(f) and not os.path.islink(f):
            os.chmod(f, mode)


def _replace(tmp: str, out: str, parent: str) -> None:
    """Move the finished export into place; an older one goes only once the new one stands."""
    if os.path.exists(out):
        old = os.path.join(parent, os.path.basename(out.rstrip("/")) + OLD_TAG + os.path.basename(tmp))
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def export(src: str, out: str, *, dtype: str = "auto", merge_lora: bool = False, tree_size: int = 0,
           force: bool = False, max_shard_size: str = "2GB", verify_backbone: bool = True,
           format: str = "graft", keep_4bit: bool = False, verifier: str | None = None) -> None:
    """Write a self-contained export of the graft folder `src` into `out` (see `graft export --help`).

    format "graft": the backbone, its tokenizer, the heads and the draft tree, which `graft.load`
    and `graft generate` read. The serving formats hold the heads alone, in an engine's layout
    (serve the backbone itself as its target model): "vllm-medusa" (medusa heads), "eagle3"
    (eagle heads, the speculators format vLLM serves), "sglang-eagle3" (eagle heads on a Llama).

    Raises:
        GraftError: a bad source or format, an `--out` that exists (without --force) or holds the
            source.
    """
    from ..model import load

    fmt = resolve(FORMATS, format, "--format")
    config = ckpt.load_config(src)
    options = {"dtype": dtype, "merge_lora": merge_lora, "tree_size": tree_size, "max_shard_size": max_shard_size,
               "keep_4bit": keep_4bit, "verifier": verifier}
    fmt.refuse(config, src, options)
    if config.lora and not merge_lora:
        raise GraftError(f"{src} trained LoRA adapters on the backbone: pass --merge-lora to fold them into the "
                         "exported backbone")
    if keep_4bit and (not fmt.backbone or not config.backbone.load_in_4bit):
        raise GraftError("--keep-4bit writes the 4-bit backbone that a graft folder trained with --load-in-4bit "
                         f"holds; {src} " + ("was trained on a full-precision backbone" if fmt.backbone else
                                             f"is exported with --format {format}, which holds no backbone"))
    if keep_4bit and config.lora:
        raise GraftError(f"{src} trained LoRA adapters, which cannot be merged into 4-bit weights: export without "
                         "--keep-4bit")
    if keep_4bit and dtype != "auto":
        raise GraftError("--keep-4bit keeps the backbone's 4-bit weights and their compute dtype: leave --dtype auto")
    files.refuse_link(out, "--out")
    if _inside(src, out):
        raise GraftError(f"--out {out} is or contains the graft folder {src}: choose a new folder")
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not force)):
        raise GraftError(f"--out {out} exists and is not empty: choose another folder or pass --force")
    target = config.backbone.dtype if dtype == "auto" else dtype
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        _clean_leftovers(parent)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.getpid()}-")
    except OSError as e:
        raise GraftError(f"cannot write beside {out} ({e.strerror}): choose a writable folder")
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; an export is as readable as any folder
    try:
        with ckpt.folder_lock(src, "exporting it", reading=True):
            # A full-precision backbone unless --keep-4bit: a 4-bit training backbone is reloaded unquantized.
            model = load(src, device="auto" if keep_4bit else "cpu", dtype=target, load_in_4bit=keep_4bit,
                         heads_dtype="float32", verify_backbone=verify_backbone)
        fmt.write(tmp, model, {**options, "target": target})
        _readable(tmp)
        _replace(tmp, out, parent)
    except (OSError, SafetensorError) as e:  # a full disk reaches safetensors' writer as its own error
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
        raise WriteError(f"writing the export to {out} failed ({why}): free some space or check the permissions; "
                         "nothing was replaced")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
