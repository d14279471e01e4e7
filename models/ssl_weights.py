"""Where SSL upstream weights come from: torchaudio bundles, or `upstream.ckpt` on disk.

`upstream.ckpt` is read by what is at the path (load_checkpoint): a torchaudio weights file
(the bundle's .pth), a Hugging Face `transformers` folder (transformers is optional, imported
here only), or a fairseq wav2vec 2.0 / HuBERT / microsoft-unilm WavLM checkpoint, also as s3prl's
converted file (fairseq is not needed: the architecture comes from the checkpoint's own config,
the keys through torchaudio's mapping). Every file is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re

import torch
import torch.nn as nn
import torchaudio
import torchaudio.pipelines as pipelines
from torchaudio.models.wav2vec2.utils import import_huggingface_model
# torchaudio's fairseq key mapping: private, but it is what import_fairseq_model applies after fairseq builds the model
from torchaudio.models.wav2vec2.utils.import_fairseq import _convert_state_dict as fairseq_to_torchaudio_keys
from torchaudio.models.wav2vec2.utils.import_huggingface import transform_wavlm_encoder_state

# name -> torchaudio bundle. A plain dict: greppable, no import tricks.
SSL_BUNDLES = {
    "wavlm_base": pipelines.WAVLM_BASE,
    "wavlm_base_plus": pipelines.WAVLM_BASE_PLUS,
    "wavlm_large": pipelines.WAVLM_LARGE,
    "hubert_base": pipelines.HUBERT_BASE,
    "hubert_large": pipelines.HUBERT_LARGE,
    "wav2vec2_base": pipelines.WAV2VEC2_BASE,
    "wav2vec2_large": pipelines.WAV2VEC2_LARGE,
    "wav2vec2_large_lv60k": pipelines.WAV2VEC2_LARGE_LV60K,
    "xlsr53": pipelines.WAV2VEC2_XLSR53,
    "xlsr_300m": pipelines.WAV2VEC2_XLSR_300M,
}


def family(name: str) -> str:
    """The model family of an upstream name: wavlm | hubert | wav2vec2 (xlsr* are wav2vec 2.0)."""
    return "wavlm" if name.startswith("wavlm") else "hubert" if name.startswith("hubert") else "wav2vec2"


def check_family(path: str, found: str, name: str):
    if found != family(name):
        example = next(n for n in SSL_BUNDLES if family(n) == found)
        raise ValueError(f"{path}: a {found} checkpoint, but upstream.name={name} is a {family(name)} model; "
                         f"set upstream.name to a {found} name (e.g. {example})")


def build_architecture(name: str, params: dict) -> nn.Module:
    factory = torchaudio.models.wavlm_model if family(name) == "wavlm" else torchaudio.models.wav2vec2_model
    try:
        return factory(**params)
    except TypeError as e:
        raise ValueError(f"upstream.arch does not fit {name}: {e}") from None


def load_checkpoint(path: str, name: str, arch: dict) -> tuple[nn.Module, bool | None]:
    """upstream.ckpt -> (torchaudio model, normalise the waveform? None: as the bundle), by what is at `path`:
    a folder: a Hugging Face transformers checkpoint; a file whose dict has 'cfg' or 'args' beside 'model':
    fairseq (or microsoft/unilm WavLM); 'model_cfg' beside 'model_weight': fairseq converted by s3prl;
    any other file: a torchaudio state dict (the bundle's file)."""
    path = os.path.expanduser(path)
    own_config = f"{path}: carries its own architecture; upstream.arch is only for torchaudio weights files"
    if os.path.isdir(path):
        if arch:
            raise ValueError(own_config)
        return load_huggingface_folder(path, name)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or folder (upstream.ckpt)")
    ckpt = read_torch_file(path)
    if isinstance(ckpt, dict) and "model_weight" in ckpt and isinstance(ckpt.get("model_cfg"), dict):
        # s3prl's converted fairseq file (s3prl/upstream/{hubert,wav2vec2}/convert.py): fairseq's own model and
        # task configs and weights under other names; only HuBERT's carries its label dictionaries
        model_cfg = {"_name": "hubert" if "dictionaries_symbols" in ckpt else "wav2vec2", **ckpt["model_cfg"]}
        ckpt = {"cfg": {"model": model_cfg, "task": ckpt.get("task_cfg") or {}}, "model": ckpt["model_weight"]}
    if isinstance(ckpt, dict) and "model" in ckpt and (ckpt.get("cfg") or ckpt.get("args")):
        if arch:
            raise ValueError(own_config)
        return load_fairseq_checkpoint(path, ckpt, name)
    return load_torchaudio_state(path, ckpt, name, arch), None


class FairseqStandIn:
    """Receives the attributes of a fairseq object pickled beside the weights (HuBERT's label
    Dictionary in task_state): fairseq is not needed to read them, and they are never used."""


# argparse.Namespace: the whole config of fairseq < 0.10 checkpoints
CHECKPOINT_GLOBALS = [argparse.Namespace, (FairseqStandIn, "fairseq.data.dictionary.Dictionary")]


def read_torch_file(path: str):
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the class or function it refused
        if refused:
            raise ValueError(f"{path}: holds a pickled {refused[1]}, which loading with weights_only=True "
                             "refuses (code could run); only weights and plain configs are read") from None
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_torchaudio_state(path: str, state, name: str, arch: dict) -> nn.Module:
    """A state dict of torchaudio's model; the architecture is the bundle's plus upstream.arch."""
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a weights file (expected a torchaudio state dict, a fairseq checkpoint "
                         "or a Hugging Face model folder)")
    model = build_architecture(name, {**SSL_BUNDLES[name]._params, **arch})
    try:  # strict=False: a fine-tuned ASR checkpoint may carry an extra `aux` head
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a {name} checkpoint of this size ({' '.join(str(e).split())[:200]})") from None
    unexpected = [k for k in unexpected if k.startswith(("feature_extractor.", "encoder."))]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ValueError(f"{path}: not a {name} checkpoint of this architecture "
                         f"({len(missing)} missing, {len(unexpected)} unexpected weights, e.g. {key})")
    return model


def load_huggingface_folder(path: str, name: str) -> tuple[nn.Module, bool]:
    """A transformers model folder (config.json + model.safetensors or pytorch_model.bin), through
    torchaudio's import_huggingface_model."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: a folder without config.json (upstream.ckpt takes a Hugging Face model folder, "
                         "a fairseq checkpoint or a torchaudio weights file)")
    config = read_json(config_file)
    model_type = config.get("model_type")
    if model_type not in ("wavlm", "hubert", "wav2vec2"):
        raise ValueError(f"{config_file}: model_type {model_type!r} is not wavlm, hubert or wav2vec2")
    check_family(path, model_type, name)
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{path} is a Hugging Face model folder: pip install transformers to read it") from None
    try:
        hf_model, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    except Exception as e:
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise ValueError(f"{path}: transformers cannot load it ({detail})") from None
    # transformers fills weights missing from the file with random ones. Not missing: masked_spec_embed
    # (pre-training only), and the positional convolution stored as weight_g / weight_v, which torch's
    # weight_norm loads although transformers 4 lists it as missing
    new_names = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    loaded_by_torch = {re.sub(r"weight_[gv]$", lambda m: new_names[m[0]], k) for k in info["unexpected_keys"]}
    missing = [k for k in info["missing_keys"] if "masked_spec_embed" not in k and k not in loaded_by_torch]
    if missing:
        raise ValueError(f"{path}: {len(missing)} weights are missing from the checkpoint, e.g. {missing[0]}")
    quiet = logging.getLogger("torchaudio.models.wav2vec2.utils.import_huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that a CTC head is not imported: an upstream never uses one
    try:
        model = import_huggingface_model(hf_model)
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{path}: torchaudio's {model_type} cannot hold this model ({detail})") from None
    finally:
        quiet.setLevel(level)
    # fairseq trained layer-norm extractors on normalised input; the preprocessor config, where saved, says so
    normalize = config.get("feat_extract_norm") == "layer"
    preprocessor = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(preprocessor):
        normalize = bool(read_json(preprocessor).get("do_normalize", normalize))
    return model, normalize


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


# fairseq's Wav2Vec2Config defaults (fairseq/models/wav2vec/wav2vec2.py; unilm WavLM's for the buckets),
# for keys an older checkpoint does not store
FAIRSEQ_DEFAULTS = dict(extractor_mode="default",
                        conv_feature_layers="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2", conv_bias=False,
                        encoder_embed_dim=768, dropout_input=0.0, conv_pos=128, conv_pos_groups=16, encoder_layers=12,
                        encoder_attention_heads=12, attention_dropout=0.1, encoder_ffn_embed_dim=3072,
                        activation_dropout=0.0, dropout=0.1, layer_norm_first=False, encoder_layerdrop=0.0,
                        activation_fn="gelu", layer_type="transformer", pos_conv_depth=1, num_buckets=320,
                        max_distance=1280)

# unilm WavLM's names for the gated relative position bias -> torchaudio's (as in transformers' WavLM)
WAVLM_ATTENTION_KEYS = {"grep_linear": "gru_rel_pos_linear", "grep_a": "gru_rel_pos_const",
                        "relative_attention_bias": "rel_attn_embed"}


def load_fairseq_checkpoint(path: str, ckpt: dict, name: str) -> tuple[nn.Module, bool | None]:
    """A fairseq wav2vec 2.0 / HuBERT checkpoint (pre-trained or fine-tuned) or microsoft/unilm's WavLM,
    without fairseq: the torchaudio architecture from the checkpoint's own config, torchaudio's key mapping."""
    model_cfg, task_cfg = fairseq_sections(path, ckpt.get("cfg") or ckpt.get("args"))
    # fairseq >= 0.10 names the model `_name`, older fairseq `arch`; unilm's WavLM config names nothing
    kind = model_cfg.get("_name") or model_cfg.get("arch")
    kind = kind or ("wavlm" if "relative_position_embedding" in model_cfg else "")
    found = next((f for f in ("wavlm", "hubert", "wav2vec2") if str(kind).startswith(f)), None)
    if found is None:
        raise ValueError(f"{path}: a fairseq {kind or 'unnamed'!r} model; only wav2vec2, hubert and WavLM are read")
    check_family(path, found, name)
    params = fairseq_params(path, model_cfg, found)
    state = fairseq_state(path, ckpt["model"], found, params["encoder_num_layers"])
    model = build_architecture(name, params)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{path}: weights do not fit the checkpoint's own config ({detail})") from None
    normalize = task_cfg.get("normalize")
    return model, None if normalize is None else bool(normalize)


def fairseq_sections(path: str, cfg) -> tuple[dict, dict]:
    """The model and task configs as plain dicts, whatever the fairseq era: >= 0.10 stores a dict with
    'model' and 'task'; older ones one flat argparse.Namespace; unilm WavLM one flat dict. A fine-tuned
    checkpoint describes the pre-trained model under 'w2v_args'."""
    cfg = vars(cfg) if isinstance(cfg, argparse.Namespace) else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the checkpoint's 'cfg'/'args' is a {type(cfg).__name__}, not a config")
    if isinstance(cfg.get("model"), dict):
        model, task = cfg["model"], cfg.get("task") or {}
    else:
        model, task = cfg, cfg
    if "w2v_path" in model or "w2v_args" in model:  # fine-tuned
        if not model.get("w2v_args"):
            raise ValueError(f"{path}: a fine-tuned checkpoint without its pre-trained model's config (w2v_args)")
        inner_model, inner_task = fairseq_sections(path, model["w2v_args"])
        return inner_model, {"normalize": task.get("normalize", inner_task.get("normalize"))}
    return model, task


def fairseq_params(path: str, cfg: dict, found: str) -> dict:
    """fairseq model config -> torchaudio wav2vec2_model / wavlm_model arguments (torchaudio's
    import_fairseq reads them from a live fairseq module instead)."""
    get = lambda key: cfg.get(key, FAIRSEQ_DEFAULTS[key])  # noqa: E731
    torchaudio_has = {"activation_fn": "gelu", "layer_type": "transformer", "pos_conv_depth": 1}
    unsupported = {k: get(k) for k, ok in torchaudio_has.items() if get(k) != ok}
    if found == "wavlm" and not (cfg.get("relative_position_embedding", True) and cfg.get("gru_rel_pos", True)):
        unsupported["relative_position_embedding/gru_rel_pos"] = False
    if unsupported:
        raise ValueError(f"{path}: torchaudio's model has no {unsupported}")
    params = dict(extractor_mode="layer_norm" if get("extractor_mode") == "layer_norm" else "group_norm",
                  extractor_conv_layer_config=parse_conv_layers(path, get("conv_feature_layers")),
                  extractor_conv_bias=bool(get("conv_bias")), encoder_embed_dim=get("encoder_embed_dim"),
                  encoder_projection_dropout=get("dropout_input"), encoder_pos_conv_kernel=get("conv_pos"),
                  encoder_pos_conv_groups=get("conv_pos_groups"), encoder_num_layers=get("encoder_layers"),
                  encoder_num_heads=get("encoder_attention_heads"), encoder_attention_dropout=get("attention_dropout"),
                  encoder_ff_interm_features=get("encoder_ffn_embed_dim"),
                  encoder_ff_interm_dropout=get("activation_dropout"), encoder_dropout=get("dropout"),
                  encoder_layer_norm_first=bool(get("layer_norm_first")), encoder_layer_drop=get("encoder_layerdrop"),
                  aux_num_out=None)
    if found == "wavlm":
        params.update(encoder_num_buckets=get("num_buckets"), encoder_max_distance=get("max_distance"))
    return params


def parse_conv_layers(path: str, spec) -> list[tuple[int, int, int]]:
    """fairseq's conv_feature_layers, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", read without eval():
    only integers, tuples, lists, + and *."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = [tuple(layer) for layer in value(ast.parse(str(spec), mode="eval").body)]
        if layers and all(len(layer) == 3 and all(type(x) is int for x in layer) for layer in layers):
            return layers
    except (SyntaxError, ValueError, TypeError):
        pass
    raise ValueError(f"{path}: cannot read conv_feature_layers {spec!r} (expected e.g. \"[(512, 10, 5)] * 2\")")


def fairseq_state(path: str, state: dict, found: str, num_layers: int) -> dict:
    """fairseq / unilm weight names -> torchaudio's, through torchaudio's own fairseq mapping; only
    WavLM's relative position bias and fused q/k/v projection are added here."""
    state = {k.removeprefix("w2v_encoder."): v for k, v in state.items()}  # fine-tuned: w2v_encoder.w2v_model.*
    wavlm = {}
    for key in list(state):
        m = re.fullmatch(r"(?:w2v_model\.)?encoder\.layers\.(\d+)\.self_attn\."
                         r"(grep_linear|grep_a|relative_attention_bias)(.*)", key)
        if m:
            wavlm[f"encoder.transformer.layers.{m[1]}.attention.{WAVLM_ATTENTION_KEYS[m[2]]}{m[3]}"] = state.pop(key)
    try:
        state = fairseq_to_torchaudio_keys(state)  # drops the pre-training heads (mask_emb, quantizer, final_proj)
    except ValueError as e:  # torchaudio's "Unexpected key: ..."
        raise ValueError(f"{path}: not a wav2vec 2.0 / HuBERT / WavLM checkpoint ({e})") from None
    # the CTC head (aux.*) and HuBERT's label embeddings are not part of an upstream
    state = {k: v for k, v in state.items() if k.startswith(("feature_extractor.", "encoder."))}
    if found == "wavlm":
        # torchaudio's WavLM attention is an nn.MultiheadAttention with q, k, v in one matrix: the same
        # rearrangement torchaudio applies to transformers' WavLM
        prefix = "encoder.transformer."
        encoder = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        try:
            transform_wavlm_encoder_state(encoder, num_layers)
        except KeyError as e:
            raise ValueError(f"{path}: weight {e} missing for a {num_layers}-layer WavLM") from None
        state.update({prefix + k: v for k, v in encoder.items()})
    state.update(wavlm)  # in another family's checkpoint, the strict load refuses them
    return state
