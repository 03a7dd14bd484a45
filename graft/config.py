"""Typed configuration for graft: head spec, backbone identity, training, decoding.

Every user-facing check lives in a `__post_init__` here, so the CLI and the Python API
fail the same way with the same one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

GRAFT_VERSION = "0.1.0"
MAX_HEADS = 8
MAX_TREE = 1024  # draft-tree nodes besides the root: the fit measures up to 128; EAGLE-2 verifies 60
# graft's own tensor files; they sit beside an exported backbone but are not part of it
HEADS_FILE, LORA_FILE, TRAIN_STATE_FILE = "heads.safetensors", "lora.safetensors", "train_state.safetensors"


class GraftError(Exception):
    """A user-facing error: one line that names the problem and the fix."""


class WriteError(GraftError):
    """A file could not be written (a full disk, a read-only folder); nothing half-written stays."""


def check_types(obj, prefix: str = "--") -> None:
    """Each field of a config dataclass against its annotation (int, float, str, bool, optional),
    so that a recipe's `lr: fast` or `max_steps: 1.5` is one line naming the option (`prefix`:
    "--" for options, "backbone." for graft.json's fields). Floats must be finite."""
    import math

    for f in dataclasses.fields(obj):
        ann, v = str(f.type), getattr(obj, f.name)
        opt = "None" in ann
        kind = next((k for k in ("bool", "int", "float", "str") if k in ann.replace("None", "")), None)
        if kind is None or (opt and v is None):
            continue
        flag = prefix + (f.name.replace("_", "-") if prefix == "--" else f.name)
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, str)
        if not ok:
            want = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}[kind]
            raise GraftError(f"{flag} must be {want}, got {v!r}")


@dataclass
class HeadSpec:
    """What heads to graft.

    family: a registered head family (graft.registry.FAMILIES).
    num_heads: K, the number of future tokens drafted per step (1..8); for eagle, the draft
        steps unrolled in training (training-time test) and the deepest draft.
    head_layers: residual blocks per medusa head, transformer layers per meta-mtp head or
        deepseek-mtp module, hidden FFN layers ignored for blockwise (always one).
    shared_lm_head: medusa only; reuse the backbone's unembedding instead of a copy per head.
    lm_head_dtype: medusa's own LM heads: "auto" stores them in bfloat16 unless the backbone
        computes in float32 (each is a (V, d) matrix: at a 128k vocabulary four of them are
        2.1B parameters), or "bfloat16" / "float32" always. Training updates bfloat16 copies
        with a memory-lean rule (graft.optim).
    aux_layers: eagle only; the backbone layers whose inputs are fused into the draft layer's
        first input (default: a low, a middle and a high one, as EAGLE-3).
    draft_vocab: N: drafts score only the N most frequent tokens of the training data (FR-Spec);
        verification still uses the whole vocabulary, so the output does not change.
    init: "copy" starts transformer layers as copies of the backbone's last decoder layer,
        "random" draws them fresh.
    """

    family: str = "medusa"
    num_heads: int = 4
    head_layers: int = 1
    shared_lm_head: bool = False
    lm_head_dtype: str = "auto"
    init: str = "copy"
    aux_layers: list | None = None
    draft_vocab: int | None = None

    def __post_init__(self):
        """The options every family shares; the family and its own options are checked by its
        heads class (`graft.heads.check_spec`)."""
        if not isinstance(self.family, str) or not self.family:
            raise GraftError(f"the head family must be a name, got {self.family!r}")
        if not isinstance(self.num_heads, int) or not 1 <= self.num_heads <= MAX_HEADS:
            raise GraftError(f"--num-heads must be between 1 and {MAX_HEADS}, got {self.num_heads!r}")
        if not isinstance(self.head_layers, int) or not 1 <= self.head_layers <= 4:
            raise GraftError(f"--head-layers must be between 1 and 4, got {self.head_layers!r}")
        if self.init not in ("copy", "random"):
            raise GraftError(f"--init must be 'copy' or 'random', got {self.init!r}")
        if self.draft_vocab is not None and (not isinstance(self.draft_vocab, int) or self.draft_vocab < 1):
            raise GraftError(f"--draft-vocab must be a positive number of tokens, got {self.draft_vocab!r}")


@dataclass
class BackboneIdentity:
    """Enough to recognise the backbone the heads were grafted on, and to load it again."""

    source: str
    architecture: str
    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    revision: str | None = None
    sha256: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    load_in_4bit: bool = False

    def __post_init__(self):
        check_types(self, "backbone.")
        for k in ("hidden_size", "vocab_size", "num_layers"):
            if getattr(self, k) < 1:
                raise GraftError(f"backbone.{k} must be a positive integer, got {getattr(self, k)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise GraftError(f"backbone.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.source or not self.model_type:
            raise GraftError("backbone.source and backbone.model_type must not be empty")
        hexdigits = "0123456789abcdef"
        if self.sha256 is not None and (len(self.sha256) != 64 or not all(c in hexdigits for c in self.sha256)):
            raise GraftError(f"backbone.sha256 must be 64 hexadecimal digits, got {self.sha256!r}")

    def same_model(self, other: "BackboneIdentity", weights: bool = True) -> bool:
        keys = ("model_type", "hidden_size", "vocab_size", "num_layers")
        if any(getattr(self, k) != getattr(other, k) for k in keys):
            return False
        if not weights:
            return True
        return self.sha256 == other.sha256  # recorded for a folder or file; None only for hub ids

    def describe(self) -> str:
        tag = self.sha256[:12] if self.sha256 else (self.revision or "?")
        return (f"{self.source} [{self.model_type}, d={self.hidden_size}, V={self.vocab_size}, "
                f"{self.num_layers} layers, {tag}]")


@dataclass
class TrainConfig:
    """Self-distillation settings for `graft train` (see `graft train --help`)."""

    max_steps: int | None = None
    max_minutes: float | None = None
    epochs: float = 1.0
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    loss: str = "kl"
    head_decay: float = 0.8
    align: bool = False  # GRIFFIN's token-alignment mask (graft.losses.distill_step)
    topk: int = 0  # HASS's top-K cross-entropy added to the KL over this many tokens; 0: off
    topk_weight: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    log_every: int = 10
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.05
    seed: int = 0
    lora_r: int = 0
    vocab_chunk: int = 0  # rows of logits per loss chunk; 0: sized by the vocabulary (graft.losses.chunk_rows)
    num_heads: int = 1  # filled from the head spec; used to check seq_len

    def __post_init__(self):
        check_types(self)
        if self.loss not in ("kl", "ce"):
            raise GraftError(f"--loss must be 'kl' or 'ce', got {self.loss!r}")
        if self.seq_len < self.num_heads + 2:
            raise GraftError(
                f"--seq-len {self.seq_len} is too short for {self.num_heads} heads: "
                f"use at least {self.num_heads + 2}"
            )
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise GraftError(f"--{name.replace('_', '-')} must be at least 1")
        if self.vocab_chunk < 0:
            raise GraftError("vocab_chunk must be 0 (sized by the vocabulary) or a number of rows")
        if self.max_steps is not None and self.max_steps < 1:
            raise GraftError("--max-steps must be at least 1")
        if self.epochs <= 0:
            raise GraftError("--epochs must be positive")
        if self.lr <= 0:
            raise GraftError("--lr must be positive")
        if not 0 < self.head_decay <= 1:
            raise GraftError("--head-decay must be in (0, 1]")
        if self.lora_r < 0:
            raise GraftError("--lora-r must be 0 (off) or positive")
        if self.topk < 0 or self.topk_weight < 0:
            raise GraftError("--topk and --topk-weight must be 0 (off) or positive")
        if self.topk and self.loss != "kl":
            raise GraftError("--topk adds to the KL loss: use it with --loss kl")


@dataclass
class GraftConfig:
    """The content of `graft.json`."""

    backbone: BackboneIdentity
    heads: HeadSpec
    graft_version: str = GRAFT_VERSION
    training: dict[str, Any] | None = None
    tree: list[list[int]] | None = None
    lora: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GraftConfig":
        """graft.json's content, every field checked (types, choices, ranges, the tree's shape);
        anything else is a GraftError naming the field."""
        try:
            for part in ("backbone", "heads"):
                if not isinstance(d.get(part), dict):
                    raise GraftError(f"not a graft config: `{part}` must be an object, got {type(d.get(part)).__name__}"
                                     "; recreate it with `graft add-heads`")
            config = cls(
                backbone=BackboneIdentity(**d["backbone"]),
                heads=HeadSpec(**d["heads"]),
                graft_version=str(d.get("graft_version", "?")),
                training=d.get("training"),
                tree=d.get("tree"),
                lora=d.get("lora"),
            )
            config.validate()
            return config
        except (KeyError, TypeError) as e:
            raise GraftError(f"graft.json is not a graft config ({e}): recreate it with `graft add-heads`")

    def validate(self) -> None:
        """The free-form parts: training's per-rank accuracy (which sizes draft trees), the
        calibrated tree, the LoRA spec."""
        K = self.heads.num_heads
        if self.training is not None:
            if not isinstance(self.training, dict):
                raise GraftError("`training` must be an object")
            acc = self.training.get("rank_accuracy")
            if acc is not None and (not isinstance(acc, list) or len(acc) != K or not all(
                    isinstance(row, list) and row and all(_prob(x) for x in row) for row in acc)):
                raise GraftError(f"`training.rank_accuracy` must be {K} lists of chances in [0, 1]")
            minutes = self.training.get("minutes_this_run")
            if minutes is not None and not _number(minutes):
                raise GraftError("`training.minutes_this_run` must be a number")
        if self.tree is not None:
            paths = self.tree
            if not isinstance(paths, list) or len(paths) > 4096 or not all(
                    isinstance(p, list) and 1 <= len(p) <= K and all(_count(r) for r in p) for p in paths):
                raise GraftError(f"`tree` must be a list of draft paths, each 1..{K} ranks (integers >= 0)")
            have = {tuple(p) for p in paths}
            if any(len(p) > 1 and tuple(p[:-1]) not in have for p in paths):
                raise GraftError("`tree` is not prefix-closed: every path's parent path must be in it")
        if self.lora is not None:
            lo = self.lora
            if not (isinstance(lo, dict) and _count(lo.get("r")) and lo["r"] >= 1 and _number(lo.get("alpha"))
                    and isinstance(lo.get("target_modules"), list)
                    and all(isinstance(t, str) for t in lo["target_modules"])):
                raise GraftError("`lora` must hold r (a positive integer), alpha (a number) and target_modules "
                                 "(names)")


def _number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _prob(x) -> bool:
    return _number(x) and 0 <= x <= 1


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e}): choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is private; ours are as readable as any
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"could not write {path} ({e.strerror or e}): free some space or fix the folder's "
                             "permissions") from None
        raise


def cache_dir() -> str:
    """graft's cache (`$GRAFT_CACHE`, default ~/.cache/graft): file hashes, measured step costs,
    dense copies of GGUF files (`graft.backbone._dense_copy`)."""
    return os.environ.get("GRAFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graft")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise GraftError(f"{path} not found: {what}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraftError(f"{path} is not valid JSON ({e.__class__.__name__}): {what}")
