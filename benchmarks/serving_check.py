"""graft's eagle3 exports, loaded by the serving engine's released code: vLLM 0.34.0.

For each eagle3 option graft offers (default aux layers, a draft vocabulary, two aux layers given
out of order, the embeddings and the last layer's output as features, a Qwen3 backbone), this
grafts perturbed eagle heads on a tiny random target saved to a folder, exports them, and in an
environment of its own (`.venv-serving`: vLLM 0.34.0 without its CUDA dependencies, a CPU torch)
runs vLLM's own code over the export:
- `SpeculativeConfig` parses it (the speculators format: which drafter class, which aux layers);
- its drafter class (`Eagle3LlamaForCausalLM` / `Eagle3Qwen3ForCausalLM`) is built on the CPU,
  every parameter set to NaN, and its `load_weights` run over the export's tensors: a tensor
  it has no parameter for, or one of the wrong shape, raises there; a parameter still NaN after
  loading was missing;
- vLLM's target model is built and told the aux layers as vLLM's runner tells it, which fixes
  the order in which it captures them, and the drafter's own `combine_hidden_states` (its `fc`)
  runs on random per-layer features in that order; graft's `fc` runs on the same features in
  the order the heads were trained on; the two must agree.
Prints a table (also `--json`). Needs the package registry the first time (to make the venv).

    python benchmarks/serving_check.py [--venv .venv-serving] [--json report.json]
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


def venv_python(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".graft-serving-ok")
    if os.path.exists(stamp):
        return py
    print(f"creating {venv} ({VLLM} without its CUDA dependencies, a CPU torch)", file=sys.stderr)
    pip = [py, "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + ["--no-deps", VLLM], check=True)
    subprocess.run(pip + ["-r", os.path.join(ROOT, "benchmarks", "serving-requirements.txt")], check=True)
    open(stamp, "w").close()
    return py


def build_cases(work: str) -> list[dict]:
    """Tiny targets, eagle heads grafted with each option, each exported as eagle3."""
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
               ("aux 5,2 (out of order, two)", "llama", {"aux_layers": [5, 2]}),
               ("aux 8,0,4 (last output, embeddings)", "llama", {"aux_layers": [8, 0, 4]}),
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
        export(g, x, format="eagle3", verifier="graft-tests/tiny-target")
        heads = load(g, device="cpu", heads_dtype="float32").heads
        feats = {str(l): torch.randn(5, 64) for l in range(9)}
        fpath = os.path.join(work, f"features{i}.safetensors")
        save_file(feats, fpath)
        with torch.no_grad():
            want = heads.fc(torch.cat([feats[str(l)] for l in heads.features], dim=-1))
        cases.append({"name": name, "target": targets[mt], "export": x, "k": 3, "features": fpath,
                      "trained_order": list(heads.features), "want": want})
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=os.path.join(ROOT, ".venv-serving"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    py = venv_python(args.venv)
    with tempfile.TemporaryDirectory() as work:
        cases = build_cases(work)
        spec = os.path.join(work, "cases.json")
        json.dump([{k: v for k, v in c.items() if k != "want"} for c in cases], open(spec, "w"))
        r = subprocess.run([py, "-c", CHILD, spec], capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            sys.exit(f"vLLM's side failed:\n{r.stderr[-3000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        rows, ok = [], True
        for c in cases:
            g = got[c["name"]]
            if g.get("loaded"):
                fused = load_file(c["features"] + ".vllm.safetensors")["fused"]
                g["fc_max_diff"] = float((fused - c["want"]).abs().max())
            good = g.get("loaded") and not g["missing"] and g["fc_max_diff"] < 1e-5
            ok &= bool(good)
            rows.append({"case": c["name"], "trained_order": c["trained_order"], **g, "ok": bool(good)})
    print(f"| {VLLM} | drafter | loads | missing | trained order -> vLLM captures | fc on vLLM's features |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r.get('drafter', '-')} | {'yes' if r['loaded'] else 'no: ' + r['error']} | "
              f"{len(r.get('missing', [])) if r['loaded'] else '-'} of {r.get('params', '-')} | "
              f"{r['trained_order']} -> {r.get('captured', '-')} | "
              f"{'max diff %.1e' % r['fc_max_diff'] if 'fc_max_diff' in r else '-'} |")
    if args.json:
        json.dump({"engine": VLLM, "torch": torch.__version__, "cases": rows}, open(args.json, "w"), indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
