"""LoRA loading and merging against PyTorch diffusers (+ peft) with the same LoRA loaded and fused.

Files: a diffusers/PEFT LoRA written by diffusers' own ``save_lora_weights`` (α ≠ rank in its metadata, an
``alpha_pattern``, conv LoRAs on resnet convs, text-encoder LoRA); kohya LoRAs with ``.alpha`` keys, UNet
module names in diffusers spelling (SD1) and in the original SGM spelling (SDXL, both text encoders), with
3×3 conv (LoCon) entries. Flax outputs after :func:`merge_loras` must match diffusers' after
``load_lora_weights`` + ``fuse_lora(lora_scale=...)`` to ≤ 1e-5 in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import peft  # noqa: F401  (diffusers needs peft to load LoRAs; a test dependency)
import pytest
import torch
from safetensors.numpy import save_file

from perflow_jax.lora import LoRAError, load_lora, merge_loras
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.models.single_file import unet_ldm_table
from perflow_jax.models.unet import UNetConfig
from tests.support.tiny_sd import make_tiny_pipeline
from tests.test_single_file import torch_vs_flax_outputs

TOL = 1e-5
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in ("sd15", "sdxl"):
        folder = str(tmp_path_factory.mktemp(family))
        make_tiny_pipeline(folder, family)
        out[family] = folder
    return out


def _pipe(folder: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _modules(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Linear / Conv2d layers whose name ends with one of `targets`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
            and any(n == t or n.endswith("." + t) for t in targets)}


def _random_lora(module: torch.nn.Module, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    w = module.weight
    if w.ndim == 4:
        down = rng.standard_normal((rank, w.shape[1], *w.shape[2:]), np.float32) * 0.1
        up = rng.standard_normal((w.shape[0], rank, 1, 1), np.float32) * 0.1
    else:
        down = rng.standard_normal((rank, w.shape[1]), np.float32) * 0.1
        up = rng.standard_normal((w.shape[0], rank), np.float32) * 0.1
    return down, up


def write_kohya(pipe, path: str, sgm: bool, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> None:
    """A kohya LoRA over the pipeline's attention, projection, resnet conv1 (3×3, LoCon) and text-encoder layers;
    with `sgm`, UNet names use the original SGM spelling (kohya's SDXL files). One α for all modules, as kohya
    writes (diffusers mis-assigns per-module α of kohya attention / text-encoder modules)."""
    rng = np.random.default_rng(seed)
    inverse = {v: k for k, v in unet_ldm_table(UNetConfig.from_dict(dict(pipe.unet.config))).items()}
    sd = {}
    encoders = [("te1" if hasattr(pipe, "text_encoder_2") else "te", pipe.text_encoder)]
    if hasattr(pipe, "text_encoder_2"):
        encoders.append(("te2", pipe.text_encoder_2))
    named = [("unet", n, m) for n, m in _modules(pipe.unet, UNET_TARGETS).items()
             if not (sgm and n.endswith("time_emb_proj"))]  # diffusers' SGM mapping mangles emb_layers
    named += [(p, n, m) for p, enc in encoders for n, m in _modules(enc, TEXT_TARGETS).items()]
    for prefix, name, module in named:
        if prefix == "unet" and sgm:
            head = next(h for h in sorted(inverse, key=len, reverse=True) if name == h or name.startswith(h + "."))
            name = inverse[head] + name[len(head):]
        elif prefix != "unet":
            name = name if name.startswith("text_model.") else "text_model." + name
        key = f"lora_{prefix}_" + name.replace(".", "_")
        down, up = _random_lora(module, rank, rng)
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
               f"{key}.alpha": np.array(alpha, np.float32)}
    save_file(sd, path)


def write_peft(folder: str, out_dir: str, seed: int = 0) -> str:
    """A diffusers/PEFT LoRA saved by diffusers itself (lora_alpha 8 ≠ rank 4, alpha_pattern for to_k)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe(folder)
    g = torch.Generator().manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, target_modules=list(UNET_TARGETS),
                                     init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=list(TEXT_TARGETS),
                                             init_lora_weights=False))
    with torch.no_grad():
        for n, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    type(pipe).save_lora_weights(
        out_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    return f"{out_dir}/pytorch_lora_weights.safetensors"


def _check(folder: str, files_scales: list[tuple[str, float]]) -> dict[str, float]:
    """diffusers: load, then fuse (one LoRA) or activate with weights (several); Flax: merge_loras; max diffs."""
    pipe = _pipe(folder)
    names = [f"l{i}" for i in range(len(files_scales))]
    for name, (path, _) in zip(names, files_scales, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)
    if len(names) == 1:
        pipe.fuse_lora(lora_scale=files_scales[0][1])
    else:
        pipe.set_adapters(names, adapter_weights=[s for _, s in files_scales])
    merged = merge_loras(load_pipeline_components(folder), [(load_lora(p), s) for p, s in files_scales])
    return torch_vs_flax_outputs(pipe, merged, seed=3)


@pytest.mark.slow(reason="builds PEFT LoRAs on tiny SD1 and SDXL PyTorch models and runs both sides")
def test_diffusers_peft_layout(folders, tmp_path) -> None:
    path = write_peft(folders["sd15"], str(tmp_path))
    lora = load_lora(path)
    assert lora.layout == "diffusers" and lora.components() == {"unet", "text_encoder"}
    assert any(m.down.ndim == 4 and m.down.shape[2:] == (3, 3) for m in lora.modules.values())  # conv LoRA
    diffs = _check(folders["sd15"], [(path, 0.7)])
    print("diffusers/PEFT LoRA vs PyTorch fuse_lora: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_layout(folders, tmp_path, family) -> None:
    """SD1: diffusers module spelling; SDXL: SGM spelling (input_blocks_4_1_...), te1 + te2."""
    path = str(tmp_path / "kohya.safetensors")
    write_kohya(_pipe(folders[family]), path, sgm=family == "sdxl")
    lora = load_lora(path)
    assert lora.layout == "kohya"
    if family == "sdxl":
        assert lora.components() == {"unet", "text_encoder", "text_encoder_2"}
        assert any(name.startswith("input_blocks_") for _, name in lora.modules)
    diffs = _check(folders[family], [(path, 0.8)])
    print(f"kohya LoRA ({family}) vs PyTorch fuse_lora: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_several_loras_and_delta_order(folders, tmp_path) -> None:
    """Two LoRAs at once equal diffusers with both adapters active (``set_adapters`` weights); the merge order
    with ΔW does not matter in float32 (ΔW first is the documented order)."""
    from perflow_jax import delta as delta_lib

    a = write_peft(folders["sd15"], str(tmp_path / "a"), seed=1)
    b = str(tmp_path / "b.safetensors")
    write_kohya(_pipe(folders["sd15"]), b, sgm=False, seed=2)
    diffs = _check(folders["sd15"], [(a, 0.6), (b, -0.4)])
    print("two LoRAs vs PyTorch set_adapters: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs

    comps = load_pipeline_components(folders["sd15"])
    rng = np.random.default_rng(0)
    dw = {k: 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in
          delta_lib.torch_unet_state_dict(comps.unet_params).items()}
    save_file(dw, str(tmp_path / "delta_weights.safetensors"))
    delta = delta_lib.load_delta(tmp_path, comps.unet_params)
    loras = [(load_lora(b), 0.5)]
    first = merge_loras(dataclasses.replace(comps, unet_params=delta_lib.merge(comps.unet_params, delta)), loras)
    last = merge_loras(comps, loras)
    last_unet = delta_lib.merge(last.unet_params, delta)
    leaves = jax.tree_util.tree_leaves
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(leaves(first.unet_params), leaves(last_unet), strict=True))
    assert diff <= 1e-6


def test_per_module_alpha_and_conv_math(folders, tmp_path) -> None:
    """Per-module α (kohya ``.alpha`` keys) and 3×3 conv LoRAs follow W + scale·(α/r)·up∘down exactly, with the
    conv product computed as peft does (a conv of down by up)."""
    from perflow_jax.delta import torch_unet_state_dict

    pipe = _pipe(folders["sd15"])
    path = str(tmp_path / "k.safetensors")
    write_kohya(pipe, path, sgm=False)
    lora = load_lora(path)
    lora.modules = {k: dataclasses.replace(m, alpha=float(1 + i % 5)) for i, (k, m) in enumerate(lora.modules.items())}
    merged = torch_unet_state_dict(merge_loras(load_pipeline_components(folders["sd15"]), [(lora, 0.3)]).unet_params)
    convs = 0
    for name, module in _modules(pipe.unet, UNET_TARGETS).items():
        m = lora.modules[("unet", name.replace(".", "_"))]
        down, up = torch.from_numpy(m.down), torch.from_numpy(m.up)
        if down.ndim == 4:
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            convs += down.shape[-1] == 3
        else:
            delta = up @ down
        want = module.weight.detach() + 0.3 * m.alpha / m.rank * delta
        assert np.abs(merged[name + ".weight"] - want.numpy()).max() <= 1e-6, name
    assert convs > 0


# -- errors -------------------------------------------------------------------------------------------------


def test_errors_say_what_was_found(folders, tmp_path) -> None:
    comps = load_pipeline_components(folders["sd15"])
    bad = str(tmp_path / "bad.safetensors")
    save_file({"model.diffusion_model.conv_in.weight": np.zeros((2, 2), np.float32)}, bad)
    with pytest.raises(LoRAError, match=r"not a LoRA in a known layout.*model\.diffusion_model\.conv_in\.weight"):
        load_lora(bad)
    save_file({"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32),
               "lora_unet_x.dora_scale": np.zeros((1, 2), np.float32)}, bad)
    with pytest.raises(LoRAError, match="dora_scale"):
        load_lora(bad)
    save_file({"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32)}, bad)
    with pytest.raises(LoRAError, match="lack their down or up weight.*unet:x"):
        load_lora(bad)
    # modules that do not exist
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": np.zeros((2, 32), np.float32),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": np.zeros((32, 2), np.float32)}, bad)
    with pytest.raises(LoRAError, match=r"(?s)target modules the model does not have \(1\).*down_blocks_7"):
        merge_loras(comps, [(load_lora(bad), 1.0)])
    # an SDXL LoRA on an SD1 model: text_encoder_2 missing and cross-attention shapes differ
    xl = str(tmp_path / "xl.safetensors")
    write_kohya(_pipe(folders["sdxl"]), xl, sgm=False)
    found = r"(?s)text_encoder_2: 12 modules \(this model has no text_encoder_2\).*shape mismatches.*attn2_to_k"
    with pytest.raises(LoRAError, match=found):
        merge_loras(comps, [(load_lora(xl), 1.0)])


def _digits_components():
    """Minimal components around the built-in digits UNet (zero weights), for merge checks without a pipeline."""
    from perflow_jax.models.components import PipelineComponents
    from perflow_jax.models.unet import unet_param_shapes
    from perflow_jax.pipelines import digits

    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), unet_param_shapes(digits.UNET_CONFIG))
    return PipelineComponents("digits", "sd", {}, digits.UNET_CONFIG, params, None, None, None, None, None, None)


def test_non_finite_loras_are_refused(tmp_path) -> None:
    """NaN/inf or non-float LoRA tensors are refused on load (file and tensor named); a non-finite scale and a
    merge that overflows float32 are refused at merge, naming the LoRA."""
    comps = _digits_components()
    ok = str(tmp_path / "ok.safetensors")
    save_file({"unet.time_embedding.linear_1.lora_A.weight": np.full((1, 16), 1e20, np.float32),
               "unet.time_embedding.linear_1.lora_B.weight": np.full((64, 1), 1e20, np.float32)}, ok)
    lora = load_lora(ok)  # each tensor is finite; up @ down (1e40) overflows float32
    with pytest.raises(LoRAError, match=r"Merging the LoRA\(s\) ok.safetensors: unet:time_embedding/linear_1/kernel "
                                        r"has NaN or infinite values"):
        merge_loras(comps, [(lora, 1.0)])
    for scale in (float("nan"), float("inf"), "1"):
        with pytest.raises(LoRAError, match=r"scale of LoRA '.*ok.safetensors' must be a"):
            merge_loras(comps, [(lora, scale)])
    bad = str(tmp_path / "bad.safetensors")
    save_file({"lora_unet_a.lora_down.weight": np.ones((1, 2), np.float32),
               "lora_unet_a.lora_up.weight": np.ones((2, 1), np.float32),
               "lora_unet_a.alpha": np.array(np.inf, np.float32)}, bad)
    with pytest.raises(LoRAError, match=r"bad.safetensors': tensor 'lora_unet_a.alpha' holds NaN or infinite"):
        load_lora(bad)
    save_file({"lora_unet_a.lora_down.weight": np.ones((1, 2), np.float32),
               "lora_unet_a.lora_up.weight": np.ones((2, 1), np.float32),
               "lora_unet_a.alpha": np.array(4, np.int64)}, bad)
    assert load_lora(bad).modules[("unet", "a")].alpha == 4.0  # an integer alpha is fine
    save_file({"unet.time_embedding.linear_1.lora_A.weight": np.ones((1, 16), np.float32),
               "unet.time_embedding.linear_1.lora_B.weight": np.ones((64, 1), np.float32)}, ok)
    merged = merge_loras(comps, [(load_lora(ok), np.float32(0.5))])  # NumPy scalars are numbers too
    np.testing.assert_array_equal(merged.unet_params["time_embedding"]["linear_1"]["kernel"], 0.5)
