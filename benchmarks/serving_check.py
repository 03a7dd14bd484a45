"""graft's EAGLE-3 exports, loaded by the serving engines' released code: vLLM 0.34.0 (`--format
eagle3`) and SGLang 0.5.23 (`--format sglang-eagle3`).

For each option graft offers, this grafts perturbed eagle heads on a tiny random target saved to a
folder, exports them, and in an environment of the engine's own (made once from the package
registry, a CPU machine is enough) runs the engine's code over the export.

vLLM (`.venv-serving`: vLLM without its CUDA dependencies, a CPU torch):
- `SpeculativeConfig` parses it (the speculators format: which drafter class, which aux layers);
- its drafter class (`Eagle3LlamaForCausalLM` / `Eagle3Qwen3ForCausalLM`) is built on the CPU,
  every parameter set to NaN, and its `load_weights` run over the export's tensors: a tensor
  it has no parameter for, or one of the wrong shape, raises there; a parameter still NaN after
  loading was missing;
- vLLM's target model is built and told the aux layers as vLLM's runner tells it, which fixes
  the order in which it captures them, and the drafter's own `combine_hidden_states` (its `fc`)
  runs on random per-layer features in that order; graft's `fc` runs on the same features in
  the order the heads were trained on; the two must agree.

SGLang (`.venv-sglang`: SGLang with its Python dependencies and the torch it pins; its CPU engine,
`SGLANG_USE_CPU_ENGINE=1`; `sgl_kernel`'s CPU build, compiled from source and not on the
registry, is replaced by names that raise if called, and none is):
- `ServerArgs` takes the export as the EAGLE3 draft of the target; SGLang's model loader resolves
  the drafter class from the export's config and loads the export's weights into it; every
  parameter is then set to NaN and the drafter's own `load_weights` run again over the export's
  tensors: a parameter still NaN was missing (SGLang skips names it does not know, silently);
- SGLang's own Llama target is built, and told the aux layers as SGLang's model runner tells it
  (`resolve_spec_aux_hidden_state_config`, `configure_aux_hidden_state_capture`): the layers
  whose inputs it captures, in the order its forward appends them;
- the drafter's own forward (`LlamaModel.forward`: its `fc`, norms, decoder layer, final norm)
  drafts depth 1 at a one-token context, where attention over the one key returns its value (the
  attention backend, which needs SGLang's memory pools, is the one part replaced), then its LM
  head and hot-token map; graft's heads draft the same position from the same features and token.
  The two distributions and the drafted token must agree.

Prints a table (also `--json`).

    python benchmarks/serving_check.py [--engine vllm|sglang] [--venv DIR] [--json report.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM = "vllm==0.34.0"
SGLANG = "sglang==0.5.23"

CHILD = r'''
import json, os, sys, torch
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
from safetensors.torch import load_file, save_file
from vllm.config import (DeviceConfig, ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig,
                         set_current_vllm_config)
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.platforms import current_platform
from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config
from vllm.model_executor.model_loader.utils import get_model_architecture, process_weights_after_loading

# vLLM's CPU platform wants triton-cpu to run a model; building one and loading weights need none
type(current_platform).check_and_update_config = classmethod(lambda cls, c: None)
cases, out = json.load(open(sys.argv[1])), {}
first = True
for case in cases:
    r = out[case["name"]] = {}
    try:
        mc = ModelConfig(model=case["target"], tokenizer=case["target"], dtype="float32")
        pc = ParallelConfig()
        sc = SpeculativeConfig(model=case["export"], method="eagle3", num_speculative_tokens=case["k"],
                               target_model_config=mc, target_parallel_config=pc)
        vc = VllmConfig(model_config=mc, parallel_config=pc, speculative_config=sc, device_config=DeviceConfig("cpu"))
        with set_current_vllm_config(vc):
            if first:
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method="tcp://127.0.0.1:29553")
                ensure_model_parallel_initialized(1, 1)
                first = False
            draft_cls, arch = get_model_architecture(sc.draft_model_config)
            r["drafter"] = arch
            model = draft_cls(vllm_config=vc)
            unset = 2 ** 62  # integer parameters (the draft vocabulary's map): a value no map holds
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan") if p.is_floating_point() else unset)
            w = load_file(os.path.join(case["export"], "model.safetensors"))
            model.load_weights(iter(w.items()))
            r["missing"] = [n for n, p in model.named_parameters()
                            if (torch.isnan(p).any() if p.is_floating_point() else (p == unset).any())]
            process_weights_after_loading(model, sc.draft_model_config, torch.device("cpu"))
            r["params"] = sum(1 for _ in model.parameters())
            target_cls, _ = get_model_architecture(mc)
            target = target_cls(vllm_config=vc)
            target.set_aux_hidden_state_layers(get_eagle3_aux_layers_from_config(sc))
            order = list(target.model.aux_hidden_state_layers)
            r["captured"] = order
            feats = load_file(case["features"])
            with torch.no_grad():
                fused = model.combine_hidden_states(torch.cat([feats[str(i)] for i in order], dim=-1))
            save_file({"fused": fused.contiguous()}, case["features"] + ".vllm.safetensors")
            r["loaded"] = True
    except Exception as e:
        r["loaded"], r["error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
print(json.dumps(out))
'''

CHILD_SGLANG = r'''
import importlib.abc, importlib.machinery, json, os, sys, types
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"


class Stub:
    # a name from sgl_kernel's CPU build: importing and reading it work, calling it raises
    def __init__(self, name):
        self.name = name
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self.name}.{attr}")
    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.name} called: sgl_kernel's CPU build is not installed")


class Absent(types.ModuleType):
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub(f"{self.__name__}.{name}")


class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "sgl_kernel" or name.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        return Absent(spec.name)
    def exec_module(self, module):
        pass


sys.meta_path.insert(0, Finder())
import torch
from types import SimpleNamespace
from safetensors.torch import load_file, save_file
from sglang.srt.server_args import ServerArgs
from sglang.srt.runtime_context import publish, get_parallel
from sglang.srt.distributed import parallel_state as ps
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader import get_model
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.model_executor.model_runner_components.spec_aux_hidden_state import (
    resolve_spec_aux_hidden_state_config)
from sglang.srt.model_executor.model_runner_components.attention_backend_setup import (
    configure_aux_hidden_state_capture)


class OneKey(torch.nn.Module):
    # attention of each query over one key, its own position's: that key's value, per query head
    def __init__(self, heads, kv_heads):
        super().__init__()
        self.kv, self.group = kv_heads, heads // kv_heads

    def forward(self, q, k, v, forward_batch):
        return v.view(v.shape[0], self.kv, -1).repeat_interleave(self.group, dim=1).reshape(v.shape[0], -1)


class NoRope(torch.nn.Module):
    def forward(self, positions, q, k):
        return q, k  # a query over its own key alone: the rotation changes no weight


cases, out = json.load(open(sys.argv[1])), {}
first = True
dc, lc = DeviceConfig("cpu"), LoadConfig()
for case in cases:
    r = out[case["name"]] = {}
    try:
        sa = ServerArgs(model_path=case["target"], speculative_algorithm="EAGLE3",
                        speculative_draft_model_path=case["export"], device="cpu", dtype="float32",
                        skip_server_warmup=True)
        publish(sa, role="scheduler")
        if first:
            get_parallel().override_permanently(tp_rank=0, pp_rank=0)
            ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                            distributed_init_method="tcp://127.0.0.1:29554")
            ps.initialize_model_parallel(backend="gloo")
            first = False
        dmc = ModelConfig.from_server_args(sa, model_path=case["export"], is_draft_model=True)
        draft = get_model(model_config=dmc, load_config=lc, device_config=dc)
        r["drafter"] = type(draft).__name__
        with torch.no_grad():
            for p in draft.parameters():
                p.fill_(float("nan"))
        draft.load_weights(iter(load_file(os.path.join(case["export"], "model.safetensors")).items()))
        cfg = dmc.hf_config
        rows = {"model.embed_tokens.weight": cfg.vocab_size, "lm_head.weight": cfg.draft_vocab_size}
        r["missing"] = [n for n, p in draft.named_parameters() if torch.isnan(p[:rows.get(n, len(p))]).any()]
        r["params"] = sum(1 for _ in draft.parameters())
        tmc = ModelConfig.from_server_args(sa, model_path=case["target"])
        target = get_model(model_config=tmc, load_config=lc, device_config=dc)
        aux = resolve_spec_aux_hidden_state_config(server_args=sa, model_config=tmc,
                                                   spec_algorithm=SpeculativeAlgorithm.from_string("EAGLE3"),
                                                   is_draft_worker=False)
        configure_aux_hidden_state_capture(model=target, eagle_use_aux_hidden_state=aux.eagle_use_aux_hidden_state,
                                           eagle_aux_hidden_state_layer_ids=aux.eagle_aux_hidden_state_layer_ids,
                                           dflash_use_aux_hidden_state=False, dflash_target_layer_ids=None,
                                           is_dspark=False)
        order = sorted(target.model.layers_to_capture)  # its forward appends them layer by layer
        r["captured"] = order
        if not r["missing"]:
            feats = load_file(case["features"])
            for layer in draft.model.layers:
                layer.self_attn.attn = OneKey(layer.self_attn.num_heads, layer.self_attn.num_kv_heads)
                layer.self_attn.rotary_emb = NoRope()
            mode = SimpleNamespace(is_extend=lambda: False, is_decode=lambda: False, is_draft_extend_v2=lambda: False)
            hidden = torch.cat([feats[str(i)] for i in order], dim=-1)
            fb = SimpleNamespace(mm_input_embeds=None, forward_mode=mode, contains_mm_inputs=lambda: False,
                                 spec_info=SimpleNamespace(hidden_states=hidden))
            with torch.no_grad():
                fused = draft.model.fc(hidden)
                h, _ = draft.model(feats["token"], torch.zeros_like(feats["token"]), fb)
                logits = h @ draft.lm_head.weight[:cfg.draft_vocab_size].t()
                hot = draft.get_hot_token_id()
                token = logits.argmax(-1) if hot is None else hot[logits.argmax(-1)]
            save_file({"fused": fused.contiguous(), "logits": logits.contiguous(), "token": token},
                      case["features"] + ".sglang.safetensors")
        r["loaded"] = True
    except Exception as e:
        r["loaded"], r["error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
print(json.dumps(out))
'''


ENGINES = {  # engine -> (what pip installs without dependencies, the pinned rest, the child, the venv)
    "vllm": (VLLM, "serving-requirements.txt", CHILD, ".venv-serving"),
    "sglang": (SGLANG, "sglang-requirements.txt", CHILD_SGLANG, ".venv-sglang"),
}


def venv_python(venv: str, engine: str) -> str:
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".graft-serving-ok")
    if os.path.exists(stamp):
        return py
    package, requirements, _, _ = ENGINES[engine]
    print(f"creating {venv} ({package} and the pinned packages of benchmarks/{requirements})", file=sys.stderr)
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    if engine == "vllm":  # vLLM pins torch 2.14 and CUDA packages that the check never runs: a CPU torch
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + ["--no-deps", package], check=True)
    subprocess.run(pip + ["-r", os.path.join(ROOT, "benchmarks", requirements)], check=True)
    open(stamp, "w").close()
    return py


def build_cases(work: str, engine: str) -> list[dict]:
    """Tiny targets, eagle heads grafted with each option, each exported in the engine's format;
    random per-layer features, and what graft's heads make of them."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import transformers as tf
    from conftest import make_tokenizer

    from graft.export import export
    from graft.model import add_heads, load

    tok = make_tokenizer()
    targets = {}
    for mt, (cfg_cls, cls) in {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                               "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}.items():
        torch.manual_seed(0)
        cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                      vocab_size=len(tok), eos_token_id=0, bos_token_id=0, pad_token_id=0)
        d = os.path.join(work, f"target-{mt}")
        cls(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        targets[mt] = d
    options = [("default (aux 2,4,5)", "llama", {}), ("draft vocabulary 32", "llama", {"draft_vocab": 32}),
               ("aux 5,2 (out of order, two)", "llama", {"aux_layers": [5, 2]})]
    if engine == "vllm":  # features SGLang never captures, and a drafter it has no class for, are refused
        options += [("aux 8,0,4 (last output, embeddings)", "llama", {"aux_layers": [8, 0, 4]}),
                    ("qwen3, draft vocabulary 32", "qwen3", {"draft_vocab": 32})]
    cases = []
    for i, (name, mt, kw) in enumerate(options):
        g, x = os.path.join(work, f"g{i}"), os.path.join(work, f"x{i}")
        m = add_heads(targets[mt], heads="eagle", num_heads=3, out=g, device="cpu", **kw)
        with torch.no_grad():
            for p in m.heads.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            if kw.get("draft_vocab"):
                m.heads.set_draft_vocab(torch.rand(m.backbone.vocab_size))
        m.save(g, force=True)
        if engine == "vllm":
            export(g, x, format="eagle3", verifier="graft-tests/tiny-target")
        else:
            export(g, x, format="sglang-eagle3")
        model = load(g, device="cpu", heads_dtype="float32")
        heads, bb = model.heads, model.backbone
        rows = 5 if engine == "vllm" else 1  # SGLang's drafter runs at one position
        feats = {str(l): torch.randn(rows, 64) for l in range(9)}
        feats["token"] = torch.randint(0, bb.vocab_size, (rows,))
        fpath = os.path.join(work, f"features{i}.safetensors")
        save_file(feats, fpath)
        with torch.no_grad():
            fused = heads.fc(torch.cat([feats[str(l)] for l in heads.features], dim=-1))
            want = {"fused": fused}
            if engine == "sglang":  # depth 1 at one position: graft's own drafting step
                g1 = heads._step(bb, fused[None], feats["token"][None], torch.zeros(1, 1, dtype=torch.long))
                want["logits"] = heads.draft_logits(bb, 0, g1[0])
                want["token"] = heads.to_vocab(want["logits"].argmax(-1))
        cases.append({"name": name, "target": targets[mt], "export": x, "k": 3, "features": fpath,
                      "trained_order": list(heads.features), "want": want})
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=list(ENGINES), default="vllm")
    ap.add_argument("--venv", default=None, help="the engine's environment (default: .venv-serving for vLLM, "
                    ".venv-sglang for SGLang), made on first use")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    package, _, child, venv = ENGINES[args.engine]
    py = venv_python(args.venv or os.path.join(ROOT, venv), args.engine)
    with tempfile.TemporaryDirectory() as work:
        cases = build_cases(work, args.engine)
        spec = os.path.join(work, "cases.json")
        json.dump([{k: v for k, v in c.items() if k != "want"} for c in cases], open(spec, "w"))
        r = subprocess.run([py, "-c", child, spec], capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            sys.exit(f"{package}'s side failed:\n{r.stderr[-3000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        rows, ok = [], True
        for c in cases:
            g = got[c["name"]]
            out = c["features"] + f".{args.engine}.safetensors"
            if g.get("loaded") and os.path.exists(out):
                res, want = load_file(out), c["want"]
                g["fc_max_diff"] = float((res["fused"] - want["fused"]).abs().max())
                if "logits" in want:
                    g["logits_max_diff"] = float((res["logits"] - want["logits"]).abs().max())
                    g["same_draft"] = bool(torch.equal(res["token"], want["token"]))
            good = (g.get("loaded") and not g["missing"] and g.get("fc_max_diff", 1) < 1e-5
                    and g.get("logits_max_diff", 0) < 1e-4 and g.get("same_draft", True))
            ok &= bool(good)
            rows.append({"case": c["name"], "trained_order": c["trained_order"], **g, "ok": bool(good)})
    name = "vLLM" if args.engine == "vllm" else "SGLang"
    extra = " | depth-1 draft (logits, token)" if args.engine == "sglang" else ""
    print(f"| {package} | drafter | loads | missing | trained order -> {name} captures | fc on {name}'s features{extra} |")
    print("|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for r in rows:
        line = (f"| {r['case']} | {r.get('drafter', '-')} | {'yes' if r['loaded'] else 'no: ' + r['error']} | "
                f"{len(r.get('missing', [])) if r['loaded'] else '-'} of {r.get('params', '-')} | "
                f"{r['trained_order']} -> {r.get('captured', '-')} | "
                f"{'max diff %.1e' % r['fc_max_diff'] if 'fc_max_diff' in r else '-'} |")
        if extra:
            line += (f" max diff {r['logits_max_diff']:.1e}, {'same token' if r['same_draft'] else 'OTHER TOKEN'} |"
                     if "logits_max_diff" in r else " - |")
        print(line)
    if args.json:
        json.dump({"engine": package, "torch": torch.__version__, "cases": rows}, open(args.json, "w"), indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
