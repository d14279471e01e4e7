"""upstream.ckpt with weights users already have: a Hugging Face transformers folder, a fairseq
checkpoint (new `cfg` dict, old `args` Namespace, fine-tuned) and microsoft/unilm's WavLM file.

Every checkpoint is a small random transformers model written in the real on-disk format; what
the upstream computes is checked against transformers' own hidden states. The fairseq files get
their weight names from the fairseq -> transformers table of transformers' conversion scripts,
inverted here, never from torchaudio's mapping that the code under test uses.
(The torchaudio state-dict file is covered in tests/test_models.py.)
"""
import argparse
import os
import re
import sys
import types

import pytest
import torch

from asv.config import UpstreamConfig
from asv.models import build_upstream

transformers = pytest.importorskip("transformers")

SR = 16000
HF_CLASSES = {"wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
              "hubert": (transformers.HubertConfig, transformers.HubertModel),
              "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model)}
NAMES = {"wavlm": "wavlm_base_plus", "hubert": "hubert_base", "wav2vec2": "wav2vec2_base"}  # *_base names on purpose
# hop 5*2*2 = 20 samples, receptive field 40 samples
SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32, 32),
             conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
CONV_SPEC = "[(32, 10, 5)] + [(32, 3, 2)] * 2"  # the same layers, as fairseq writes conv_feature_layers


def hf_model(kind, large=False, seed=0):
    """A small random transformers model; `large`: the layer-norm extractor and pre-LN transformer of the
    large models. Every weight is nudged so that no two are equal (ones/zeros) and a swap would show."""
    config_cls, model_cls = HF_CLASSES[kind]
    extra = dict(feat_extract_norm="layer", do_stable_layer_norm=True) if large else {}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def upstream(name, ckpt, **kw):
    return build_upstream(UpstreamConfig(name=name, ckpt=str(ckpt), **kw), SR)


def waves(n=2, samples=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, samples, generator=g) * 0.1 + 0.05  # an offset, so that normalising changes the input


def assert_hidden_states_match(up, model, wavs, normalize):
    """Our layers vs transformers' output_hidden_states=True on the same (normalised if asked) input."""
    hf_input = wavs
    if normalize:
        fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
        hf_input = fe(list(wavs.numpy()), sampling_rate=SR, return_tensors="pt").input_values
    with torch.no_grad():
        ours, frames = up(wavs, torch.full((wavs.shape[0],), wavs.shape[1]))
        out = model(hf_input, output_hidden_states=True)
        # the last layer against last_hidden_state: pre-LN (large) models end with a layer norm there, which
        # s3prl and this toolkit leave out of the last layer (transformers 4 also put it in hidden_states[-1])
        last = up.model.encoder.transformer.layer_norm(ours[-1]) if model.config.do_stable_layer_norm else ours[-1]
    theirs = list(out.hidden_states[:-1]) + [out.last_hidden_state]
    assert len(ours) == len(out.hidden_states) == up.num_layers == SMALL["num_hidden_layers"] + 1
    assert frames.tolist() == [theirs[0].shape[1]] * wavs.shape[0]
    for i, (a, b) in enumerate(zip(ours[:-1] + [last], theirs)):
        assert a.shape == b.shape, i
        # tolerance: two implementations (transformers, torchaudio) of one float32 model, other op order and
        # fused kernels: ~1e-6 typical on O(1)-O(10) activations; 2e-5 + 1e-4 relative is 10x+ that
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"layer {i}: {m}")

# ---------------------------------------------------------------- Hugging Face folders

@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
@pytest.mark.parametrize("kind", list(HF_CLASSES))
def test_huggingface_folder_gives_transformers_hidden_states(tmp_path, kind, large):
    model = hf_model(kind, large)
    model.save_pretrained(tmp_path / kind)
    up = upstream(NAMES[kind], tmp_path / kind)
    # the sizes are the checkpoint's, not those of the *_base bundle upstream.name names
    assert (up.num_layers, up.hidden_size, up.hop, up.min_samples) == (3, 64, 20, 40)
    assert up.normalize_waveform == large  # layer-norm extractors were trained on normalised input
    assert not up.training and not any(p.requires_grad for p in up.parameters())
    assert_hidden_states_match(up, model, waves(), normalize=large)


def test_huggingface_folder_with_old_weight_norm_names(tmp_path):
    # checkpoints on the Hub store the positional convolution as weight_g / weight_v
    from safetensors.torch import load_file, save_file
    model = hf_model("hubert")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_hidden_states_match(upstream("hubert_large", tmp_path), model, waves(), normalize=False)


def test_huggingface_fine_tuned_folder(tmp_path):
    # e.g. facebook/wav2vec2-base-960h: the encoder under `wav2vec2.`, a CTC head the upstream leaves out
    torch.manual_seed(0)
    ctc = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**SMALL, vocab_size=32)).eval()
    ctc.save_pretrained(tmp_path)
    assert_hidden_states_match(upstream("wav2vec2_base", tmp_path), ctc.wav2vec2, waves(), normalize=False)


@pytest.mark.parametrize("large, do_normalize", [(True, False), (False, True)])
def test_preprocessor_config_decides_waveform_normalisation(tmp_path, large, do_normalize):
    model = hf_model("wav2vec2", large)
    model.save_pretrained(tmp_path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(tmp_path)
    up = upstream("wav2vec2_base", tmp_path)
    assert up.normalize_waveform == do_normalize
    assert_hidden_states_match(up, model, waves(), normalize=do_normalize)


# ---------------------------------------------------------------- fairseq checkpoints

# fairseq -> transformers names, from transformers' convert_wav2vec2_original_pytorch_checkpoint_to_pytorch.py
# and convert_wavlm_original_pytorch_checkpoint_to_pytorch.py (MAPPING), inverted below
FAIRSEQ_TO_HF = {
    "post_extract_proj": "feature_projection.projection",
    "encoder.pos_conv.0": "encoder.pos_conv_embed.conv",
    "self_attn.k_proj": "encoder.layers.*.attention.k_proj",
    "self_attn.v_proj": "encoder.layers.*.attention.v_proj",
    "self_attn.q_proj": "encoder.layers.*.attention.q_proj",
    "self_attn.out_proj": "encoder.layers.*.attention.out_proj",
    "self_attn.grep_linear": "encoder.layers.*.attention.gru_rel_pos_linear",
    "self_attn.relative_attention_bias": "encoder.layers.*.attention.rel_attn_embed",
    "self_attn.grep_a": "encoder.layers.*.attention.gru_rel_pos_const",
    "self_attn_layer_norm": "encoder.layers.*.layer_norm",
    "fc1": "encoder.layers.*.feed_forward.intermediate_dense",
    "fc2": "encoder.layers.*.feed_forward.output_dense",
    "final_layer_norm": "encoder.layers.*.final_layer_norm",
    "encoder.layer_norm": "encoder.layer_norm",
    "layer_norm": "feature_projection.layer_norm",  # "w2v_model.layer_norm" in the scripts: fine-tuned files
    "mask_emb": "masked_spec_embed",
}


def fairseq_name(hf_key, layer_norm_extractor):
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)", hf_key)
    if m:  # fairseq's conv block: Sequential(conv, dropout, GroupNorm | Sequential(Transpose, LayerNorm, ...), GELU)
        part = "0" if m[2] == "conv" else "2.1" if layer_norm_extractor else "2"
        return f"feature_extractor.conv_layers.{m[1]}.{part}.{m[3]}"
    # torch's weight-norm parametrization: original0 is g, original1 is v
    hf_key = hf_key.replace("parametrizations.weight.original0", "weight_g")
    hf_key = hf_key.replace("parametrizations.weight.original1", "weight_v")
    for fs, hf in FAIRSEQ_TO_HF.items():
        m = re.fullmatch(re.escape(hf).replace(r"\*", r"(\d+)") + r"(\..*)?", hf_key)
        if m and "*" in hf:
            return f"encoder.layers.{m[1]}.{fs}{m[2] or ''}"
        if m:
            return fs + (m[1] or "")
    raise KeyError(hf_key)


def fairseq_model_cfg(model, kind):
    """The model section of a fairseq config, in fairseq's own key names."""
    c = model.config
    cfg = {"_name": kind, "extractor_mode": "layer_norm" if c.feat_extract_norm == "layer" else "default",
           "conv_feature_layers": CONV_SPEC, "conv_bias": c.conv_bias, "encoder_layers": c.num_hidden_layers,
           "encoder_embed_dim": c.hidden_size, "encoder_ffn_embed_dim": c.intermediate_size,
           "encoder_attention_heads": c.num_attention_heads, "activation_fn": "gelu",
           "layer_norm_first": c.do_stable_layer_norm, "conv_pos": c.num_conv_pos_embeddings,
           "conv_pos_groups": c.num_conv_pos_embedding_groups, "dropout": 0.1, "attention_dropout": 0.1,
           "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.1, "final_dim": 16}
    if kind == "wavlm":
        cfg.update(relative_position_embedding=True, gru_rel_pos=True, num_buckets=c.num_buckets,
                   max_distance=c.max_bucket_distance)
    return cfg


def fairseq_state(model, kind, prefix=""):
    layer_norm = model.config.feat_extract_norm == "layer"
    state = {prefix + fairseq_name(k, layer_norm): v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    # pre-training heads, which an upstream leaves out
    state.update({f"{prefix}final_proj.weight": torch.randn(16, 64, generator=g),
                  f"{prefix}final_proj.bias": torch.randn(16, generator=g)})
    if kind == "hubert":
        state[f"{prefix}label_embs_concat"] = torch.randn(10, 16, generator=g)
    return state


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalised"])
@pytest.mark.parametrize("kind, large", [("wav2vec2", False), ("hubert", True), ("wav2vec2", True)])
def test_fairseq_checkpoint_gives_transformers_hidden_states(tmp_path, monkeypatch, kind, large, normalize):
    model = hf_model(kind, large)
    ckpt = {"args": None, "cfg": {"_name": None, "model": fairseq_model_cfg(model, kind),
                                  "task": {"_name": f"{kind}_pretraining", "normalize": normalize}},
            "model": fairseq_state(model, kind), "optimizer_history": [{"num_updates": 400000}]}
    with monkeypatch.context() as m:
        ckpt["task_state"] = {"dictionaries": [fake_fairseq_dictionary(m)]}  # as in HuBERT's released files
        torch.save(ckpt, tmp_path / "ckpt.pt")
    up = upstream(NAMES[kind], tmp_path / "ckpt.pt")
    assert up.normalize_waveform == normalize  # the checkpoint's own task setting, not the bundle's
    assert (up.num_layers, up.hidden_size, up.hop, up.min_samples) == (3, 64, 20, 40)
    assert_hidden_states_match(up, model, waves(), normalize)


def fake_fairseq_dictionary(monkeypatch):
    """An object that pickles as fairseq.data.dictionary.Dictionary, fairseq not being installed."""
    cls = type("Dictionary", (), {"__module__": "fairseq.data.dictionary"})
    for mod in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    sys.modules["fairseq.data.dictionary"].Dictionary = cls
    d = cls()
    d.symbols, d.count, d.indices = ["<s>", "0", "1"], [1, 5, 7], {"<s>": 0, "0": 1, "1": 2}
    return d


def test_old_fairseq_checkpoint_with_an_args_namespace(tmp_path):
    model = hf_model("wav2vec2")
    cfg = fairseq_model_cfg(model, "wav2vec2")
    del cfg["_name"], cfg["activation_fn"]  # fairseq < 0.10 names the model `arch`; absent keys take fairseq's defaults
    args = argparse.Namespace(arch="wav2vec2", task="audio_pretraining", normalize=False, **cfg)
    torch.save({"args": args, "model": fairseq_state(model, "wav2vec2")}, tmp_path / "wav2vec_small.pt")
    assert_hidden_states_match(upstream("wav2vec2_base", tmp_path / "wav2vec_small.pt"), model, waves(), False)


def test_fine_tuned_fairseq_checkpoint(tmp_path):
    model = hf_model("wav2vec2", large=True)
    pretrained = {"model": fairseq_model_cfg(model, "wav2vec2"), "task": {"normalize": True}}
    state = fairseq_state(model, "wav2vec2", prefix="w2v_encoder.w2v_model.")
    state.update({"w2v_encoder.proj.weight": torch.randn(32, 64), "w2v_encoder.proj.bias": torch.randn(32)})
    ckpt = {"cfg": {"model": {"_name": "wav2vec_ctc", "w2v_path": "/gone/pretrained.pt", "w2v_args": pretrained},
                    "task": {"_name": "audio_finetuning", "normalize": True}}, "model": state}
    torch.save(ckpt, tmp_path / "ft.pt")
    up = upstream("xlsr53", tmp_path / "ft.pt")
    assert_hidden_states_match(up, model, waves(), normalize=True)


@pytest.mark.parametrize("large", [False, True], ids=["base_plus", "large"])
def test_unilm_wavlm_checkpoint(tmp_path, large):
    # microsoft/unilm WavLM files: {'cfg': WavLMConfig's flat dict, 'model': state}
    model = hf_model("wavlm", large)
    cfg = fairseq_model_cfg(model, "wavlm")
    del cfg["_name"]
    torch.save({"cfg": {**cfg, "normalize": large}, "model": fairseq_state(model, "wavlm")}, tmp_path / "WavLM.pt")
    up = upstream("wavlm_base_plus", tmp_path / "WavLM.pt")
    assert up.normalize_waveform == large
    assert_hidden_states_match(up, model, waves(), normalize=large)


# ---------------------------------------------------------------- bad input: one line naming the path

def test_checkpoint_of_another_family_names_both(tmp_path):
    hf_model("hubert").save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"hf: a hubert checkpoint, but upstream.name=wavlm_base_plus"):
        upstream("wavlm_base_plus", tmp_path / "hf")
    model = hf_model("wavlm")
    torch.save({"cfg": fairseq_model_cfg(model, "wavlm"), "model": fairseq_state(model, "wavlm")}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"w.pt: a wavlm checkpoint, but upstream.name=xlsr53"):
        upstream("xlsr53", tmp_path / "w.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="broken.pt: unreadable checkpoint"):
        upstream("wavlm_base_plus", path)


def test_folder_without_config_json(tmp_path):
    hf_model("wav2vec2").save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}: a folder without config.json"):
        upstream("wav2vec2_base", tmp_path)


def test_unknown_model_type_and_missing_path(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="config.json: model_type 'bert'"):
        upstream("hubert_base", tmp_path)
    with pytest.raises(ValueError, match="nowhere: no such file or folder"):
        upstream("hubert_base", tmp_path / "nowhere")


def test_folder_with_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model("wav2vec2").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights are missing"):  # transformers alone would fill them with noise
        upstream("wav2vec2_base", tmp_path)


def test_arch_overrides_do_not_apply_to_a_checkpoint_with_its_own_config(tmp_path):
    hf_model("wav2vec2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="carries its own architecture"):
        upstream("wav2vec2_base", tmp_path, arch={"encoder_num_layers": 1})


class Trap:
    """Unpickling this runs os.makedirs(marker): reading a checkpoint must never execute code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    model = hf_model("hubert")
    marker = tmp_path / "code_ran"
    ckpt = {"cfg": {"model": fairseq_model_cfg(model, "hubert"), "task": {}}, "model": fairseq_state(model, "hubert"),
            "extra_state": Trap(str(marker))}
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: holds a pickled"):
        upstream("hubert_base", tmp_path / "evil.pt")
    assert not marker.exists()
