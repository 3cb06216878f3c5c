"""ΔW load/merge/extract/export, Flax msgpack checkpoints, `perflow-jax convert`, and weight-file errors.

Tolerances: merge adds in float32 on both sides (PyTorch: base + ΔW; here: W + ΔW), so results agree to the
last bit or within 1e-6; export → reload is a pure re-layout and must be exact.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from perflow_jax import delta as delta_lib
from perflow_jax.cli import main as cli_main
from perflow_jax.models import weights_io
from perflow_jax.models.convert import torch_to_flax
from perflow_jax.models.host_memory import host_array
from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.unet import load_unet, unet_param_shapes
from perflow_jax.models.weights_io import SafetensorsStateDict, load_state_dict
from tests.support.tiny_sd import _unet, make_tiny_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD1-style PyTorch UNet saved in diffusers format, plus a random ΔW over all of its keys."""
    folder = tmp_path_factory.mktemp("unet")
    unet = _unet("sd15", 0)
    unet.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    delta = {k: (0.01 * torch.randn(v.shape, generator=g)).numpy() for k, v in unet.state_dict().items()}
    return folder, unet, delta


def test_merge_equals_pytorch_base_plus_delta(base, tmp_path) -> None:
    folder, unet, delta = base
    save_file(delta, str(tmp_path / "delta_weights.safetensors"))
    cfg, params = load_unet(folder)
    merged = delta_lib.merge(params, delta_lib.load_delta(tmp_path, params))
    # PyTorch side: base + ΔW in float32, converted with the same converter.
    pt_merged = {k: (v + torch.from_numpy(delta[k])).numpy() for k, v in unet.state_dict().items()}
    want = torch_to_flax(pt_merged, unet_param_shapes(cfg))
    got_flat, want_flat = _flat(merged), _flat(want)
    diff = max(float(np.max(np.abs(np.asarray(got_flat[k]) - want_flat[k]))) for k in want_flat)
    print(f"merge vs PyTorch base+ΔW: max abs diff {diff:.1e}")
    assert diff <= 1e-6
    # extract recovers ΔW
    dw = delta_lib.extract(merged, params)
    back = delta_lib.torch_unet_state_dict(dw)
    assert max(float(np.max(np.abs(back[k] - delta[k]))) for k in delta) <= 1e-6


def test_export_reload_exact_and_pytorch_readable(base, tmp_path) -> None:
    folder, unet, delta = base
    _, params = load_unet(folder)
    dw = torch_to_flax(delta, params)
    path = delta_lib.export(dw, tmp_path / "out")
    assert path.endswith("delta_weights.safetensors") and not [f for f in os.listdir(tmp_path / "out")
                                                               if f.startswith(".")]
    sd = load_state_dict(path)
    assert set(sd) == set(unet.state_dict()) and all(np.array_equal(sd[k], delta[k]) for k in delta)
    reloaded = delta_lib.load_delta(path, params)
    assert _same(reloaded, dw)
    # The PyTorch reference merges with unet.state_dict()[k] + ΔW[k]: its strict load must accept the keys.
    from safetensors.torch import load_file

    pt = load_file(path)
    unet_copy = _unet("sd15", 0)
    unet_copy.load_state_dict({k: v + pt[k] for k, v in unet_copy.state_dict().items()}, strict=True)


def test_unet_format_delta_folder_with_variant(base, tmp_path) -> None:
    folder, _, delta = base
    _, params = load_unet(folder)
    sub = tmp_path / "perflow-delta" / "unet"
    sub.mkdir(parents=True)
    (sub / "config.json").write_text((folder / "config.json").read_text())
    fp16 = {k: v.astype(np.float16) for k, v in delta.items()}
    save_file(fp16, str(sub / "diffusion_pytorch_model.fp16.safetensors"))
    dw = delta_lib.load_delta(tmp_path / "perflow-delta", params, variant="fp16")
    assert next(iter(_flat(dw).values())).dtype == np.float16
    # No plain file: the folder's single variant is used (the released ΔW folders hold only variants).
    assert _same(delta_lib.load_delta(tmp_path / "perflow-delta", params), dw)
    with pytest.raises(FileNotFoundError, match="holds no PeRFlow ΔW"):
        delta_lib.load_delta(tmp_path / "perflow-delta", params, variant="bf16")


def test_delta_errors(base, tmp_path) -> None:
    folder, _, delta = base
    _, params = load_unet(folder)
    bad = dict(delta)
    bad.pop("conv_in.bias")
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    save_file(bad, str(tmp_path / "delta_weights.safetensors"))
    with pytest.raises(ConversionError, match=r"does not match this UNet(.|\n)*missing(.|\n)*conv_in/bias"
                                              r"(.|\n)*unexpected(.|\n)*extra\.weight(.|\n)*mis-shaped"):
        delta_lib.load_delta(tmp_path, params)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        delta_lib.load_delta(tmp_path / "missing", params)
    small = {k: v for k, v in params.items() if k != "conv_in"}
    with pytest.raises(ValueError, match="parameter trees differ"):
        delta_lib.merge(params, small)


def test_truncated_and_pickle_files(base, tmp_path) -> None:
    folder, _, _ = base
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "unet"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        load_unet(bad)
    # A destination of a failed conversion is not left behind, half-written or otherwise.
    with pytest.raises(ConversionError):
        from perflow_jax.models.components import convert_to_flax

        convert_to_flax(bad, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    os.remove(bad / "diffusion_pytorch_model.safetensors")
    torch.save({"x": torch.zeros(1)}, bad / "diffusion_pytorch_model.bin")
    with pytest.raises(ConversionError, match="allow_pickle=True"):
        load_unet(bad)


def test_convert_cli_round_trip(tmp_path, capsys) -> None:
    """`perflow-jax convert` writes msgpack checkpoints that load without conversion and equal the source."""
    src = tmp_path / "sd"
    make_tiny_pipeline(str(src), "sd15")
    g = np.random.default_rng(0)
    _, unet_params = load_unet(src / "unet")
    dw = {k: 0.01 * g.standard_normal(v.shape).astype(np.float32)
          for k, v in delta_lib.torch_unet_state_dict(unet_params).items()}
    save_file(dw, str(tmp_path / "delta_weights.safetensors"))
    assert cli_main(["--no-cache", "convert", str(src), str(tmp_path / "flax"), "--delta", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "converted unet, vae, text_encoder" in out
    assert sorted(os.listdir(tmp_path / "flax")) == [".perflow-jax-manifest.json", "model_index.json", "scheduler",
                                                     "text_encoder", "tokenizer", "unet", "vae"]
    assert os.path.isfile(tmp_path / "flax" / "unet" / "flax_model.msgpack")
    _, flax_unet = load_unet(tmp_path / "flax" / "unet")
    merged = delta_lib.merge(unet_params, delta_lib.load_delta(tmp_path, unet_params))
    assert _same(flax_unet, merged)
    # A second convert onto an existing folder is refused unless --overwrite.
    assert cli_main(["--no-cache", "convert", str(src), str(tmp_path / "flax")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["--no-cache", "convert", str(src / "vae"), str(tmp_path / "vae_flax"), "--dtype", "bf16"]) == 0
    # A tampered msgpack is rejected by strict checking.
    cfg = json.loads((tmp_path / "flax" / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 128]
    (tmp_path / "flax" / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="Flax checkpoint does not match"):
        load_unet(tmp_path / "flax" / "unet")


def test_cli_sample_errors(tmp_path, capsys) -> None:
    assert cli_main(["--no-cache", "sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out",
                     str(tmp_path / "o")]) == 2
    assert "neither an existing file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["sample", "--model", "m", "--prompt", "x", "--out", "o", "--steps", "0"])


def _flat(tree) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree))


def _same(a, b) -> bool:
    """Same keys and bit-identical arrays."""
    fa, fb = _flat(a), _flat(b)
    return set(fa) == set(fb) and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


@pytest.mark.parametrize("dtype", [None, np.float16, "bfloat16"])
def test_host_array_is_an_aligned_contiguous_copy(dtype) -> None:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    sources = [rng.standard_normal((70, 130)).astype(np.float32).T,  # a linear's (out, in) → (in, out)
               rng.standard_normal((8, 6, 3, 3)).astype(np.float32).transpose(2, 3, 1, 0),  # conv OIHW → HWIO
               rng.standard_normal((5,)).astype(np.float32)[1:], np.float32(2.5)]
    want_dtype = jnp.bfloat16 if dtype == "bfloat16" else dtype
    for src in sources:
        out = host_array(src, want_dtype)
        assert out.flags.c_contiguous and out.ctypes.data % 64 == 0 and out.shape == src.shape
        np.testing.assert_array_equal(out, src.astype(want_dtype) if want_dtype is not None else src)
        if out.ndim and jax.default_backend() == "cpu":  # XLA:CPU uses the buffer in place
            assert jax.device_put(out).unsafe_buffer_pointer() == out.ctypes.data


def test_lazy_state_dict_reads_the_same_tensors(base, tmp_path, monkeypatch) -> None:
    """The lazy mapping used while loading models gives the eager dict's keys and arrays, across shards and
    across the periodic re-mapping of its file (forced after every tensor here)."""
    monkeypatch.setattr(weights_io, "_REMAP_BYTES", 0)
    folder, _, _ = base
    path = folder / "diffusion_pytorch_model.safetensors"
    eager = load_state_dict(path)
    lazy = load_state_dict(path, lazy=True)
    assert isinstance(lazy, SafetensorsStateDict) and len(lazy) == len(eager) and set(lazy) == set(eager)
    for k, v in eager.items():
        np.testing.assert_array_equal(lazy[k], v)
    keys = sorted(eager)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: eager[k] for k in ks}, tmp_path / name)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    sharded = load_state_dict(index, lazy=True)
    assert set(sharded) == set(eager)
    np.testing.assert_array_equal(sharded[keys[-1]], eager[keys[-1]])
    with pytest.raises(KeyError):
        sharded["no.such.key"]
