"""Tiny SD1-, SD2- and SDXL-style pipelines built with PyTorch diffusers/transformers for parity tests.

Weights are random (seeded) and every parameter is perturbed so zero-initialised layers (conv_out, ...)
are not zero and comparisons can fail. The tokenizer files (vocab.json, merges.txt) are written here: a
byte-level BPE vocabulary of the 256 byte symbols (alone and word-final), a few merges, and CLIP's
start/end tokens.
"""

from __future__ import annotations

import json
import os

import torch

VOCAB_SIZE = 1000
MAX_LEN = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(folder: str) -> None:
    """A small CLIP BPE tokenizer: byte symbols, word-final symbols, a few merges, special tokens."""
    os.makedirs(folder, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = ["a t</w>", "t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o n</w>", "r e", "re d</w>"]
    vocab_list = symbols + [s + "</w>" for s in symbols]
    for m in merges:
        vocab_list.append(m.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": MAX_LEN, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"},
                  f)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _clip(hidden_act: str, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act=hidden_act,
                         projection_dim=16, eos_token_id=2, pad_token_id=1, bos_token_id=0)
    # eos_token_id=2 is the legacy value real SD configs carry: pooling takes argmax(ids), i.e. the first
    # <|endoftext|>, which is the highest id in write_tokenizer's vocabulary.
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _perturb(cls(cfg), seed)


def _vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor)
    return _perturb(vae, seed)


def _unet(family: str, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sd15":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)
    elif family == "sd21":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    use_linear_projection=True, upcast_attention=True)
    else:  # sdxl: second encoder's projection 16 + 6 time ids × 8
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8)
    return _perturb(unet, seed)


def make_tiny_pipeline(folder: str, family: str = "sd15", seed: int = 0, scheduler=None):
    """Build, save (``save_pretrained``) and return a tiny diffusers pipeline of `family` in `folder`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if scheduler is None:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction" if family == "sd21" else "epsilon")
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=_vae(seed + 1, 0.13025), text_encoder=_clip("quick_gelu", False, seed + 2),
                                         text_encoder_2=_clip("gelu", True, seed + 3), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=_unet(family, seed), scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=_vae(seed + 1, 0.18215),
                                       text_encoder=_clip("quick_gelu" if family == "sd15" else "gelu", False,
                                                          seed + 2),
                                       tokenizer=tokenizer, unet=_unet(family, seed), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def make_tiny_controlnet(folder: str, family: str = "sd15", seed: int = 10):
    """A tiny random ControlNet for `family`'s tiny UNet (``ControlNetModel.from_unet`` with a two-level
    conditioning embedding, i.e. control images at the tiny VAE's 2× latent size), every parameter perturbed
    so the zero convs are not zero; saved with ``save_pretrained`` in `folder` and returned."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(_unet(family, seed), conditioning_embedding_out_channels=(8, 16))
    net = _perturb(net, seed)
    net.save_pretrained(folder)
    return net
