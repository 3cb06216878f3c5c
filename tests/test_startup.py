"""Startup: the header-first, threaded loader gives today's params bit for bit; param shapes and whole compiled
programs are cached beside the compilation cache and reused.

The reference converter below is the loader as it was before the fast path (one tensor at a time: NumPy view →
Flax layout → contiguous copy), so "bit for bit" is against today's converter, on SD1-, SD2- and SDXL-style tiny
models, for every component, in the file's dtype and cast. Equality is exact (``array_equal`` and same dtype):
the loader only moves bytes.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import perflow_jax.models.convert as convert
from perflow_jax import executable_cache
from perflow_jax.models import shape_cache
from perflow_jax.models.clip import CLIPTextConfig, clip_param_shapes, load_clip_text_model, rename_clip_torch_key
from perflow_jax.models.convert import param_shapes
from perflow_jax.models.keymap import TorchKeyIndex, rename_torch_attention, to_flax_layout
from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.unet import UNetConfig, load_unet, unet_param_shapes
from perflow_jax.models.vae import VAEConfig, load_vae, vae_param_shapes
from perflow_jax.models.weights_io import SafetensorsStateDict
from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline, load_components, make_scheduler
from tests.support.tiny_sd import make_tiny_pipeline

FAMILIES = ("sd15", "sd21", "sdxl")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One saved tiny pipeline per family."""
    root = tmp_path_factory.mktemp("startup")
    for family in FAMILIES:
        make_tiny_pipeline(str(root / family), family)
    return root


def reference(path: str, target: dict, rename=None, ignore=(), dtype=None) -> dict:
    """Today's converter: every tensor read whole, re-laid as a NumPy view, copied contiguous (and cast)."""
    shapes = param_shapes(target)
    index = TorchKeyIndex(shapes, rename)
    out = {}
    for key, value in load_file(path).items():
        if any(re.search(p, key) for p in ignore):
            continue
        p = index.flax_path(key)
        arr = np.ascontiguousarray(to_flax_layout(value, p[-1], shapes[p]))
        out[p] = arr.astype(dtype) if dtype is not None else arr
    return out


def assert_bitwise(params: dict, ref: dict) -> None:
    flat = traverse_util.flatten_dict(jax.device_get(params))
    assert set(flat) == set(ref)
    for p, want in ref.items():
        got = np.asarray(flat[p])
        assert got.dtype == want.dtype and got.shape == want.shape, p
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), p  # bits, not values (NaN-safe)


def _components(root, family):
    folder = root / family
    out = [("unet", lambda dtype: load_unet(folder / "unet", dtype=dtype)[1],
            reference_for(folder / "unet" / WEIGHTS, unet_param_shapes(UNetConfig.from_json(folder / "unet")))),
           ("vae", lambda dtype: load_vae(folder / "vae", dtype=dtype)[1],
            reference_for(folder / "vae" / WEIGHTS, vae_param_shapes(VAEConfig.from_json(folder / "vae")),
                          rename=rename_torch_attention))]
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in encoders:
        sub = folder / name
        projection = name == "text_encoder_2"
        out.append((name, lambda dtype, sub=sub, projection=projection: load_clip_text_model(
            sub, dtype=dtype, with_projection=projection)[1],
            reference_for(sub / "model.safetensors", clip_param_shapes(CLIPTextConfig.from_json(sub), projection),
                          rename=rename_clip_torch_key, ignore=[r"(^|\.)position_ids$"])))
    return out


def reference_for(path, target, **kw):
    return lambda dtype: reference(str(path), target, dtype=dtype, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_loaders_match_todays_converter_bit_for_bit(tiny, family, monkeypatch) -> None:
    """Every component of every family, in the file's dtype and cast to bfloat16, with 4 reader threads and
    with one; UNet params are 64-byte-aligned and C-contiguous (XLA:CPU adopts them without a copy)."""
    for threads in (4, 1):
        monkeypatch.setattr(convert, "LOAD_THREADS", threads)
        for _name, load, ref in _components(tiny, family):
            for dtype in (None, jnp.bfloat16):
                assert_bitwise(load(dtype), ref(dtype))
    unet = load_unet(tiny / family / "unet")[1]
    for leaf in jax.tree_util.tree_leaves(unet):
        assert leaf.flags.c_contiguous and leaf.ctypes.data % 64 == 0


def test_fp16_file_and_sharded_index_load_bit_for_bit(tiny, tmp_path) -> None:
    """A half-precision file (kept as stored, or cast up) and a two-shard index read like one file."""
    src = tiny / "sd15" / "unet"
    sd = load_file(str(src / WEIGHTS))
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(half / WEIGHTS))
    target = unet_param_shapes(UNetConfig.from_json(src))
    for dtype in (None, jnp.float32):
        assert_bitwise(load_unet(half, dtype=dtype)[1], reference(str(half / WEIGHTS), target, dtype=dtype))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((src / "config.json").read_bytes())
    keys = sorted(sd)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(sharded / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    assert_bitwise(load_unet(sharded)[1], reference(str(src / WEIGHTS), target))


def test_truncated_and_mismatched_files_keep_their_errors(tiny, tmp_path) -> None:
    """A truncated file is refused as unreadable; a wrong-architecture file lists its mismatches, checked from
    the header before any tensor is read."""
    src = tiny / "sd15" / "vae"
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / WEIGHTS).read_bytes()
    (cut / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"Could not read .* as safetensors .*truncated"):
        load_vae(cut)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_bytes((src / "config.json").read_bytes())
    sd = load_file(str(src / WEIGHTS))
    key = next(k for k in sd if k.endswith("conv_in.weight"))
    sd[key] = np.zeros((1, *sd[key].shape[1:]), np.float32)
    sd["extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(other / WEIGHTS))
    with pytest.raises(ConversionError) as e:
        load_vae(other)
    msg = str(e.value)
    assert "unexpected" in msg and "extra.weight (3,)" in msg and "mis-shaped" in msg and key in msg


def test_read_into_refuses_a_file_that_shrank(tiny, tmp_path) -> None:
    """Bytes vanishing after the header was checked are a ConversionError naming the file, not garbage."""
    path = tmp_path / "w.safetensors"
    save_file({"a": np.arange(1000, dtype=np.float32)}, str(path))
    sd = SafetensorsStateDict([path])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ConversionError, match="ends inside tensor 'a'"):
        sd.read_into("a", np.empty(1000, np.float32))


@pytest.fixture
def cache_dir(tmp_path):
    """JAX's compilation cache pointed at a fresh folder for one test, then restored."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    shape_cache.clear_memory_cache()
    try:
        yield tmp_path / "cache"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        shape_cache.clear_memory_cache()


def test_param_shapes_are_cached_on_disk_and_reused(tiny, cache_dir, monkeypatch) -> None:
    """The first call traces and writes ``<cache>-param-shapes/unet-*.json``; a new process (memory cleared)
    reads it without tracing and gets the same tree; a torn file is traced again and replaced."""
    config = UNetConfig.from_json(tiny / "sdxl" / "unet")
    first = unet_param_shapes(config)
    files = list((cache_dir.parent / "cache-param-shapes").glob("unet-*.json"))
    assert len(files) == 1
    shape_cache.clear_memory_cache()
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: pytest.fail("traced despite the disk cache"))
    again = unet_param_shapes(config)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(first)
    assert jax.tree_util.tree_leaves(again) == jax.tree_util.tree_leaves(first)  # ShapeDtypeStruct equality
    monkeypatch.undo()
    files[0].write_text("{ torn")
    shape_cache.clear_memory_cache()
    assert jax.tree_util.tree_leaves(unet_param_shapes(config)) == jax.tree_util.tree_leaves(first)
    assert files[0].read_text().startswith("{")
    assert '"params"' in files[0].read_text()


def test_executable_cache_reloads_a_program_without_lowering(cache_dir) -> None:
    """A stored program is loaded (no lowering) and computes the same; other avals or another description get
    their own entry; a torn file is compiled again."""
    f = jax.jit(lambda x, y: jnp.sin(x) * y + 1)
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.float32(2.5)
    want = f(x, y)
    first = executable_cache.load_or_compile("f", (x, y), lambda: f.lower(x, y))
    stored = list((cache_dir.parent / "cache-executables").glob("*.jaxexec"))
    assert len(stored) == 1
    loaded = executable_cache.load_or_compile("f", (x, y), lambda: pytest.fail("lowered despite the store"))
    np.testing.assert_array_equal(loaded(x, y), want)
    np.testing.assert_array_equal(first(x, y), want)
    x4 = jnp.ones((4, 3))
    executable_cache.load_or_compile("f", (x4, y), lambda: f.lower(x4, y))
    executable_cache.load_or_compile("g", (x, y), lambda: f.lower(x, y))
    assert len(list(stored[0].parent.glob("*.jaxexec"))) == 3
    stored[0].write_bytes(b"torn")
    again = executable_cache.load_or_compile("f", (x, y), lambda: f.lower(x, y))
    np.testing.assert_array_equal(again(x, y), want)


def test_pipeline_loads_its_stored_program_and_gives_the_same_images(tiny, cache_dir, monkeypatch) -> None:
    """With executable_cache=True a second pipeline on the same model (a new process in practice) loads the
    stored generation program without lowering it, and its images equal the first's bit for bit."""
    comps = load_components(str(tiny / "sd15"))
    kw = dict(num_inference_steps=4, height=32, width=32, seed=3)
    pipe = StableDiffusionPipeline(comps, make_scheduler(comps), executable_cache=True)
    first = pipe(["a cat"], **kw)
    assert len(list((cache_dir.parent / "cache-executables").glob("*.jaxexec"))) == 1
    again = StableDiffusionPipeline(comps, make_scheduler(comps), executable_cache=True)
    real = executable_cache.load_or_compile
    monkeypatch.setattr(executable_cache, "load_or_compile",
                        lambda d, a, lower: real(d, a, lambda: pytest.fail("lowered despite the store")))
    np.testing.assert_array_equal(again(["a cat"], **kw), first)
    np.testing.assert_array_equal(again(["a dog"], **kw), pipe(["a dog"], **kw))  # new prompt: same program


def test_a_stored_program_that_fails_is_compiled_afresh_and_retired(cache_dir, monkeypatch) -> None:
    """A loaded executable that fails on its first call (XLA:CPU executables are not always self-contained)
    gives the right result from a fresh compile; its file is retired and the key never stored again."""
    import jax.experimental.serialize_executable as se

    f = jax.jit(lambda x: jnp.cos(x) + 2)
    x = jnp.arange(5.0)
    executable_cache.load_or_compile("h", (x,), lambda: f.lower(x))
    (stored,) = (cache_dir.parent / "cache-executables").glob("*.jaxexec")

    def broken(*args):
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Function wrapped_iota not found")

    monkeypatch.setattr(se, "deserialize_and_load", lambda *a, **k: broken)
    loaded = executable_cache.load_or_compile("h", (x,), lambda: f.lower(x))
    np.testing.assert_array_equal(loaded(x), f(x))
    np.testing.assert_array_equal(loaded(x), f(x))
    assert not stored.exists() and stored.with_name(stored.name + ".unusable").exists()
    lowered = []
    executable_cache.load_or_compile("h", (x,), lambda: lowered.append(1) or f.lower(x))
    assert lowered == [1] and not stored.exists()
