"""Tiny in-process models: 2 layers, width 64, a small BPE tokenizer trained on the spot."""
from __future__ import annotations

import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "all that glitters is not gold", "to be or not to be that is the question",
          "hello world this is a tiny model", "numbers one two three four five six seven"] * 4
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer():
    """A word-level tokenizer: decode then encode gives back the same ids, so text that a tiny
    model writes (graft distill-data) trains heads on exactly its own token sequences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in CORPUS for w in line.split()} | {str(i) for i in range(10)} | {"say"})
    vocab = {w: i for i, w in enumerate(["</s>", "<unk>", "<|user|>", "<|assistant|>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    fast.chat_template = CHAT
    return fast


def make_hf(model_type: str, vocab: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    if model_type == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif model_type == "gemma3":
        # a local layer with an 8-position window before a global one, as Gemma 3's pattern (5:1) in small;
        # tied embeddings, scaled by sqrt(d) on input, as the real ones
        cfg = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                                  **common)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
        c, m = cls[model_type]
        extra = {"head_dim": 16} if model_type == "qwen3" else {}
        cfg = c(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **extra, **common)
        model = m(cfg)
    # Random init has near-flat logits; sharpen the output so greedy text has structure.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """model_type -> a saved HF folder (config, safetensors, tokenizer)."""
    out = {}
    for mt in ("llama", "gpt2", "qwen3", "mistral", "qwen2", "gemma3"):
        d = tmp_path_factory.mktemp(f"tiny-{mt}")
        make_hf(mt, len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[mt] = str(d)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    path = os.path.join(d, "chat.jsonl")
    with open(path, "w") as f:
        for i, line in enumerate(CORPUS):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": line}]}) + "\n")
    return path


def tiny_backbone(model_type: str, tokenizer, dtype=torch.float32):
    from graft.backbone import Backbone

    return Backbone.from_hf(make_hf(model_type, len(tokenizer)).to(dtype), tokenizer)


def packaged_backbone(alias: str):
    """A built-in model (its package installed by scripts/setup.sh), float32 on the CPU, without
    transformers' progress bars."""
    import transformers

    from graft.backbone import load_backbone

    transformers.utils.logging.disable_progress_bar()
    return load_backbone(alias, device="cpu", dtype="float32")
