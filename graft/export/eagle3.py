"""Eagle heads in the EAGLE-3 layouts of the serving engines: the speculators format (which vLLM
serves) and SGLang's Llama drafter."""
from __future__ import annotations

import os

import torch

from ..backbone import ALIAS_HUB_IDS
from ..checkpoint import save_tensors
from ..config import GraftError, write_json
from ..heads.eagle import default_aux_layers
from .formats import Format


def serving_verifier(source: str, given: str | None) -> str:
    """The target model an eagle3 export names (`verifier.name_or_path`): `given` (a hub id, or a
    local folder, written as an absolute path), else the hub repository the backbone came from.
    vLLM's `vllm serve EXPORT` accepts only a hub id there, and speculators loads the target's
    embeddings and LM head from it."""
    if given:
        return os.path.abspath(given) if os.path.exists(given) else given
    if source in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[source]
    if source == "." or os.path.exists(source) or source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise GraftError(f"the backbone came from a local file or folder ({source}), and an eagle3 export names its "
                         "target model: pass --verifier with the hub id it was made from (owner/name), or a folder")
    return source


def eagle3_features(heads) -> tuple[list[int], torch.Tensor]:
    """The aux layers as the serving engines read them, and `fc`'s weight to match. vLLM and
    SGLang capture the features in layer order (vLLM also drops repeats), while graft
    concatenates them in the order given at `add-heads`: the ids are written ascending and
    `fc`'s input columns, one block of d per feature, are put in the same order."""
    ids = list(heads.features)  # distinct (`_check_aux`)
    order = sorted(range(len(ids)), key=lambda j: ids[j])
    w = heads.fc.weight.detach()
    d = w.shape[1] // len(ids)
    return [ids[j] for j in order], torch.cat([w[:, j * d:(j + 1) * d] for j in order], dim=1)


def _save_eagle3_tensors(path: str, heads, bb, dtype, layer: str, mapping: bool) -> tuple[torch.Tensor, list]:
    """The EAGLE-3 tensors both serving layouts share, the draft layer named `layer`: `fc` (its
    columns in ascending aux-layer order, `eagle3_features`), the layer with its `hidden_norm`,
    `norm`, `embed_tokens`, the LM head's rows for the draft vocabulary and, with a draft
    vocabulary or where `mapping` asks for them anyway, the maps `d2t` (draft id i is target
    id i + d2t[i]) and `t2d`. Returns the draft vocabulary's target ids (all of them without one)
    and the aux layers in the order written."""
    V = bb.vocab_size
    ids = torch.arange(V) if heads.draft_ids is None else heads.draft_ids.detach().cpu()
    aux, fc = eagle3_features(heads)
    tensors = {"fc.weight": fc, f"{layer}.hidden_norm.weight": heads.hidden_norm.weight,
               "norm.weight": bb.norm.weight, "lm_head.weight": bb.lm_head.weight.detach().cpu()[ids],
               "embed_tokens.weight": bb.embed_tokens.weight}
    tensors.update({f"{layer}.{k}": v for k, v in heads.layer.state_dict().items()})
    tensors = {k: v.detach().to(dtype) for k, v in tensors.items()}
    if mapping or heads.draft_ids is not None:
        tensors["d2t"] = ids - torch.arange(ids.numel())
        tensors["t2d"] = torch.zeros(V, dtype=torch.bool).index_fill_(0, ids, True)
    save_tensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    return ids, aux


SPECULATORS_CHECKED = "speculators 0.9.0 (models/eagle3: config.py, core.py, model_definitions.py)"


def save_eagle3(path: str, heads, bb, dtype, verifier: str) -> None:
    """An eagle head as the `speculators` EAGLE-3 format (checked against SPECULATORS_CHECKED),
    which vLLM serves: `fc`, the draft layer as `layers.0.*` (its q/k/v read [embedding |
    feature], `hidden_norm` normalises the feature), `norm`, `lm_head` and `embed_tokens` (the
    backbone's, as graft shares them), and with a draft vocabulary its rows of the LM head and
    the maps `d2t`/`t2d` (speculators writes none at full vocabulary, and vLLM then has no
    parameter to load them into). `num_aux_hidden_states` in the layer config sizes vLLM's
    `fc` (it reads the count there, else assumes 3)."""
    V = bb.vocab_size
    ids, aux = _save_eagle3_tensors(path, heads, bb, dtype, "layers.0", mapping=False)
    layer = bb.config.to_diff_dict() if hasattr(bb.config, "to_diff_dict") else bb.config.to_dict()
    layer = {k: v for k, v in layer.items() if k not in ("architectures", "quantization_config", "_name_or_path")}
    layer.update({"model_type": bb.model_type, "num_hidden_layers": 1, "vocab_size": V,
                  "hidden_size": bb.hidden_size, "num_aux_hidden_states": len(aux)})
    if isinstance(layer.get("layer_types"), list):  # one entry per layer (Qwen3): the draft layer copies the last
        layer["layer_types"] = layer["layer_types"][-1:]
    config = {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.9.0",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": heads.num_heads}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(bb.config.architectures or [])},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": ids.numel(),
        "norm_before_residual": False,
        "target_hidden_size": bb.hidden_size,
        "eagle_aux_hidden_state_layer_ids": aux,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    write_json(os.path.join(path, "config.json"), config)


SGLANG_CHECKED = "sglang 0.5.23, its released code run over the export (benchmarks/serving_check.py --engine sglang)"


def save_sglang_eagle3(path: str, heads, bb, dtype) -> None:
    """An eagle head as SGLang's EAGLE-3 drafter for Llama loads it (checked against
    SGLANG_CHECKED): a LlamaConfig with `architectures: ["LlamaForCausalLMEagle3"]`, the draft
    layer as `midlayer.*`, and `eagle_config.eagle_aux_hidden_state_layer_ids` counted SGLang's way,
    as the layer whose output is taken (graft counts the layer whose input is: one less)."""
    V = bb.vocab_size
    ids, aux = _save_eagle3_tensors(path, heads, bb, dtype, "midlayer", mapping=True)
    config = bb.config.to_diff_dict() if hasattr(bb.config, "to_diff_dict") else bb.config.to_dict()
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "_name_or_path")}
    config.update({"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
                   "vocab_size": V, "draft_vocab_size": ids.numel(), "hidden_size": bb.hidden_size,
                   "target_hidden_size": bb.hidden_size, "tie_word_embeddings": False,
                   "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux],
                                    "use_aux_hidden_state": True},
                   "torch_dtype": str(dtype).removeprefix("torch.")})
    write_json(os.path.join(path, "config.json"), config)


def _check_aux(config) -> list[int]:
    """The aux layers the heads read, from graft.json (before the backbone loads): each once, as
    the serving engines capture them."""
    spec = config.heads
    ids = list(spec.aux_layers) if spec.aux_layers else default_aux_layers(config.backbone.num_layers)
    if len(set(ids)) != len(ids):
        raise GraftError(f"the heads read aux layers {','.join(map(str, ids))}, one of them twice, and the serving "
                         "engines take each layer once: graft the heads with distinct --aux-layers")
    return ids


def _check_eagle3(config, options) -> None:
    if config.backbone.model_type not in ("llama", "qwen3"):
        raise GraftError(f"--format eagle3 is defined for Llama and Qwen3 backbones, not {config.backbone.model_type} "
                         "(vLLM 0.34 has EAGLE-3 drafters of those two layer types only): use the default format")
    serving_verifier(config.backbone.source, options.get("verifier"))
    _check_aux(config)


def _check_sglang(config, options) -> None:
    if config.backbone.model_type.startswith("gemma"):
        raise GraftError("--format sglang-eagle3 is SGLang's Llama drafter, and graft's eagle head on Gemma 3 is a "
                         "Gemma 3 layer; SGLang 0.5.23's Gemma 3 also feeds its drafter other features (each layer's "
                         "MLP branch, not the residual stream the heads read): use the default format")
    if config.backbone.model_type != "llama":
        raise GraftError(f"--format sglang-eagle3 is SGLang's Llama drafter, not one for {config.backbone.model_type}: "
                         "use --format eagle3")
    L, aux = config.backbone.num_layers, _check_aux(config)
    if min(aux) < 1:
        raise GraftError("SGLang takes layer outputs as EAGLE-3 features, so the embeddings (aux layer 0) cannot be "
                         "one: graft the heads with --aux-layers of 1 or more")
    if max(aux) >= L:
        raise GraftError(f"SGLang captures the inputs of layers 1..{L - 1} as EAGLE-3 features, never the last layer's "
                         f"output (aux layer {L}): graft the heads with --aux-layers below {L}, or export "
                         "--format eagle3")


EAGLE3 = Format("eagle3", lambda folder, model, options: save_eagle3(
    folder, model.heads, model.backbone, model.backbone.dtype,
    serving_verifier(model.config.backbone.source, options.get("verifier"))), family="eagle", check=_check_eagle3,
                takes=("verifier",))
SGLANG_EAGLE3 = Format("sglang-eagle3", lambda folder, model, options: save_sglang_eagle3(
    folder, model.heads, model.backbone, model.backbone.dtype), family="eagle", check=_check_sglang)
