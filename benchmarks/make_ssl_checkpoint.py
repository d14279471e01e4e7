"""A random-weight WavLM or HuBERT checkpoint in the files s3prl reads, for benchmarks and parity fixtures.

    python benchmarks/make_ssl_checkpoint.py --kind wavlm --out /tmp/wavlm_base_plus_random.pt
    python benchmarks/make_ssl_checkpoint.py --kind hubert --out /tmp/tiny_hubert.pt --tiny

Formats (what s3prl 0.4.18's `wavlm_local` / `hubert_local` upstreams load, and what
models/ssl_weights.py reads as `upstream.ckpt`):
  wavlm:  microsoft/unilm's file, {"cfg": WavLMConfig fields (plain dict), "model": state dict}
          (s3prl/upstream/wavlm/expert.py)
  hubert: s3prl's converted fairseq file, {"task_cfg": dict, "model_cfg": dict, "model_weight": state dict,
          "dictionaries_symbols": [[str, ...]]} (load_converted_model in s3prl/upstream/hubert/convert.py)
Architecture: Base (WavLM Base+ / HuBERT Base: 12 layers, 768 dim, 12 heads, FFN 3072, conv 512 channels,
~95M weights, ~380 MB: write it outside the repository) or --tiny (2 layers, 32 dim, 2 heads, FFN 64, conv 24
channels, ~37k weights, ~170 kB): the same conv kernels and strides (hop 320), positional convolution (128 taps, 16
groups), and for WavLM the gated relative position bias (320 buckets, max distance 800). The tiny conv has 24
channels, not 32, so that post_extract_proj (conv -> embed dim) exists as in every released model.

Weights: one torch.Generator seeded with --seed, drawn key by key in the order of weight_shapes(): matrices and
conv kernels N(0, 1) / sqrt(fan_in) (fan_in = product of shape[1:]); norm weights, the weight-norm gains and
WavLM's gate constants 1 + 0.1 N(0, 1); other vectors 0.1 N(0, 1). No weight is a plain one or zero, so a
mis-mapped one shows in the outputs.
Torch only: no s3prl, no fairseq.
"""
from __future__ import annotations

import argparse
import math

import torch

SIZES = {"base": dict(layers=12, dim=768, heads=12, ffn=3072, conv=512, final_dim=256, classes=504),
         "tiny": dict(layers=2, dim=32, heads=2, ffn=64, conv=24, final_dim=16, classes=12)}
CONV_POS, CONV_POS_GROUPS, NUM_BUCKETS, MAX_DISTANCE = 128, 16, 320, 800
CONV_LAYERS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # (kernel, stride): hop 320, receptive field 400


def configs(kind: str, size: dict) -> dict:
    """The config part of the checkpoint (every key its reader needs; the rest take the readers' defaults)."""
    c = size["conv"]
    model = dict(extractor_mode="default", encoder_layers=size["layers"], encoder_embed_dim=size["dim"],
                 encoder_ffn_embed_dim=size["ffn"], encoder_attention_heads=size["heads"], activation_fn="gelu",
                 layer_norm_first=False, conv_bias=False,
                 conv_feature_layers=f"[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c}, 2, 2)] * 2",
                 conv_pos=CONV_POS, conv_pos_groups=CONV_POS_GROUPS, dropout=0.1, attention_dropout=0.1,
                 activation_dropout=0.0, encoder_layerdrop=0.05, dropout_input=0.1, dropout_features=0.1,
                 feature_grad_mult=0.1)
    if kind == "wavlm":
        model.update(normalize=False, relative_position_embedding=True, num_buckets=NUM_BUCKETS,
                     max_distance=MAX_DISTANCE, gru_rel_pos=True)
        return {"cfg": model}
    model.update(_name="hubert", label_rate=50, final_dim=size["final_dim"], untie_final_proj=False,
                 layer_type="transformer", logit_temp=0.1, target_glu=False)
    task = dict(_name="hubert_pretraining", labels=["km"], label_rate=50, sample_rate=16000, normalize=False,
                enable_padding=False, max_sample_size=250000, min_sample_size=32000, random_crop=True,
                pad_audio=False)
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(size["classes"] - 4)]
    return {"task_cfg": task, "model_cfg": model, "dictionaries_symbols": [symbols]}


def weight_shapes(kind: str, size: dict) -> list[tuple[str, tuple]]:
    """(name, shape) of every weight, named as unilm's WavLM / fairseq's HuBERT name them."""
    d, c, h, f = size["dim"], size["conv"], size["heads"], size["ffn"]
    shapes = [("mask_emb", (d,))]
    if kind == "hubert":
        shapes.append(("label_embs_concat", (size["classes"], size["final_dim"])))
    for i, (kernel, _) in enumerate(CONV_LAYERS):
        shapes.append((f"feature_extractor.conv_layers.{i}.0.weight", (c, 1 if i == 0 else c, kernel)))
        if i == 0:  # extractor_mode "default": one group norm, in the first block
            shapes += [(f"feature_extractor.conv_layers.0.2.{w}", (c,)) for w in ("weight", "bias")]
    shapes += [("post_extract_proj.weight", (d, c)), ("post_extract_proj.bias", (d,)),
               ("encoder.pos_conv.0.bias", (d,)), ("encoder.pos_conv.0.weight_g", (1, 1, CONV_POS)),
               ("encoder.pos_conv.0.weight_v", (d, d // CONV_POS_GROUPS, CONV_POS))]
    for i in range(size["layers"]):
        p = f"encoder.layers.{i}."
        if kind == "wavlm":
            shapes.append((p + "self_attn.grep_a", (1, h, 1, 1)))
            if i == 0:  # only the first layer holds the bias table; the others reuse its output
                shapes.append((p + "self_attn.relative_attention_bias.weight", (NUM_BUCKETS, h)))
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes += [(p + f"self_attn.{proj}.weight", (d, d)), (p + f"self_attn.{proj}.bias", (d,))]
        if kind == "wavlm":
            shapes += [(p + "self_attn.grep_linear.weight", (8, d // h)), (p + "self_attn.grep_linear.bias", (8,))]
        shapes += [(p + "self_attn_layer_norm.weight", (d,)), (p + "self_attn_layer_norm.bias", (d,)),
                   (p + "fc1.weight", (f, d)), (p + "fc1.bias", (f,)),
                   (p + "fc2.weight", (d, f)), (p + "fc2.bias", (d,)),
                   (p + "final_layer_norm.weight", (d,)), (p + "final_layer_norm.bias", (d,))]
    shapes += [("encoder.layer_norm.weight", (d,)), ("encoder.layer_norm.bias", (d,)),
               ("layer_norm.weight", (c,)), ("layer_norm.bias", (c,))]
    if kind == "hubert":
        shapes += [("final_proj.weight", (size["final_dim"], d)), ("final_proj.bias", (size["final_dim"],))]
    return shapes


def random_weights(shapes: list[tuple[str, tuple]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes:
        x = torch.randn(shape, generator=gen)
        if name.endswith(("grep_a", "weight_g")) or (len(shape) == 1 and name.endswith(".weight")
                                                     and ("norm" in name or ".2." in name)):
            x = 1 + 0.1 * x  # gains: around one
        elif len(shape) == 1:
            x = 0.1 * x  # biases, mask embedding
        else:
            x = x / math.sqrt(math.prod(shape[1:]))
        weights[name] = x
    return weights


def make_checkpoint(kind: str, tiny: bool = False, seed: int = 0) -> dict:
    """The object to torch.save: a random `kind` ("wavlm" | "hubert") model in the format s3prl reads."""
    if kind not in ("wavlm", "hubert"):
        raise ValueError(f"kind must be wavlm or hubert, got {kind!r}")
    size = SIZES["tiny" if tiny else "base"]
    ckpt = configs(kind, size)
    ckpt["model" if kind == "wavlm" else "model_weight"] = random_weights(weight_shapes(kind, size), seed)
    return ckpt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kind", choices=("wavlm", "hubert"), default="wavlm",
                        help="wavlm: unilm WavLM file (Base+ size); hubert: s3prl's converted HuBERT file (Base size)")
    parser.add_argument("--out", required=True, help="where to write the checkpoint (Base: ~380 MB, use /tmp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture of tests/fixtures (~170 kB)")
    args = parser.parse_args()
    ckpt = make_checkpoint(args.kind, args.tiny, args.seed)
    torch.save(ckpt, args.out)
    weights = ckpt.get("model") or ckpt["model_weight"]
    print(f"{args.out}: {'tiny' if args.tiny else 'Base'} {args.kind}, {len(weights)} tensors, "
          f"{sum(w.numel() for w in weights.values()):,} weights, seed {args.seed}")


if __name__ == "__main__":
    main()
