# Run on the GPU machine as: python check_cudnn.py $MODEL decode; python check_cudnn.py $MODEL distill PROMPTS.jsonl (512 pool prompts)
# deepseek-mtp (fresh heads) step time on the graph engine with cuDNN attention everywhere (before)
# and only in the captured step (after); then distill speed before/after.
import os, sys, time, json, torch
ENG = os.environ.get("ENGINE", "graph"); NEW = int(os.environ.get("NEW", "256"))
from torch.nn.attention import SDPBackend, sdpa_kernel
import graft.modeling as M, graft.speculative as S, graft.engine as E, graft.data as D
from graft.model import add_heads
from graft.speculative import SpeculativeDecoder, DecodeConfig
model = sys.argv[1]; what = sys.argv[2]
orig = M.attention_backends
def allb(device, static):
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
def use(f):
    for mod in (S, E, D):
        mod.attention_backends = f
if what == "decode":
    m = add_heads(model, heads="deepseek-mtp", num_heads=4, dtype="bfloat16")
    dec = SpeculativeDecoder(m)
    prompts = ["Explain how a bicycle works.", "Write a short poem about the sea and the wind.", "What is 17 times 23? Show your steps."]
    for name, f in (("cudnn everywhere", allb), ("cudnn only in captured steps", orig)):
        use(f)
        for tree in ("auto", "chain"):
            cfg = DecodeConfig(max_new_tokens=NEW, engine=ENG, eos=False, tree=tree)
            dec.generate(m.backbone.tokenizer(prompts[0])["input_ids"], cfg)
            steps = s = 0
            for p in prompts:
                g = dec.generate(m.backbone.tokenizer(p)["input_ids"], cfg)
                steps += g.steps; s += g.decode_s
            print(f"deepseek-mtp fresh heads, graph, tree {tree}, {name}: {1000*s/steps:.2f} ms/step over {steps} steps", flush=True)
    use(orig)
    cfg = DecodeConfig(max_new_tokens=NEW, engine=ENG, eos=False, draft=False)
    g = dec.generate(m.backbone.tokenizer(prompts[0])["input_ids"], cfg)
    g = dec.generate(m.backbone.tokenizer(prompts[0])["input_ids"], cfg)
    print(f"drafting off, graph: {1000*g.decode_s/g.steps:.2f} ms/step", flush=True)
else:
    for name, f in (("cudnn everywhere", allb), ("cudnn left out", orig)):
        use(f)
        out = f"/tmp/d-{len(name)}.jsonl"
        t = time.perf_counter()
        D.distill(model, sys.argv[3], out, max_new_tokens=128, batch_size=256, dtype="bfloat16")
        print(f"distill 512 prompts x 128 tokens, batch 256, {name}: {time.perf_counter()-t:.1f} s (model load included)", flush=True)
