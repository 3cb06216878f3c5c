"""Hub downloads against a real HTTP server on 127.0.0.1 in the Hub's URL layout (tests/support/hub_server.py),
with ``HF_ENDPOINT`` pointed at it and ``HF_HOME`` at a temporary folder; huggingface_hub itself is not mocked.

The served repos mimic the releases: ``hansyan/perflow-sd15-delta-weights`` (a UNet folder holding only the
variants v0-0 and v0-1) and ``hansyan/perflow-sd15-dreamshaper`` (a pipeline, here with extra files perflow-jax
must not fetch: an fp16 UNet, a ``.bin`` text encoder, a ``.ckpt``, a ``.msgpack`` and a root single-file
checkpoint). Downloaded weights are compared bit for bit with the same files read from their local folders.
"""

from __future__ import annotations

import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from flax import traverse_util

from perflow_jax import delta as delta_lib
from perflow_jax import hub
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.models.unet import load_unet
from tests.support.hub_server import HubServer
from tests.support.tiny_sd import _unet, make_tiny_pipeline

DELTA_REPO = "hansyan/perflow-sd15-delta-weights"
PIPE_REPO = "hansyan/perflow-sd15-dreamshaper"
JUNK = ["unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/pytorch_model.bin", "model.ckpt",
        "unet/flax_model.msgpack", "v1-5-pruned.safetensors"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_repos")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    make_tiny_pipeline(str(root / "pipe"), "sd15", seed=0)
    shutil.copytree(root / "pipe", root / "served")
    for name in JUNK[1:]:
        (root / "served" / name).write_bytes(b"not to be downloaded")
    shutil.copy(root / "pipe" / "unet" / "diffusion_pytorch_model.safetensors", root / "served" / JUNK[0])
    for variant, seed in (("v0-0", 2), ("v0-1", 1)):
        unet = _unet("sd15", seed)
        unet.save_pretrained(root / "delta", variant=variant)
    torch.set_num_threads(threads)
    with HubServer({DELTA_REPO: str(root / "delta"), PIPE_REPO: str(root / "served")}) as server:
        yield root, server


@pytest.fixture
def online(repos, tmp_path, monkeypatch):
    """Downloads on, from the local hub, into a fresh cache. conftest.py sets HF_HUB_OFFLINE=1 for the suite,
    and huggingface_hub reads it once at import: both are turned off here."""
    root, server = repos
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server.requests.clear()
    return root, server


def _same(a, b) -> bool:
    fa, fb = traverse_util.flatten_dict(dict(a)), traverse_util.flatten_dict(dict(b))
    return set(fa) == set(fb) and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def _fetched(server, repo: str) -> set[str]:
    return {f.split(":", 1)[1] for f in server.fetched() if f.startswith(repo + ":")}


def test_download_pipeline_and_delta(online) -> None:
    root, server = online
    comps = load_pipeline_components(PIPE_REPO)
    assert comps.path.startswith(hub.hf_cache_dir())
    local = load_pipeline_components(root / "pipe")
    assert _same(comps.unet_params, local.unet_params) and _same(comps.text_encoder_params, local.text_encoder_params)
    got = _fetched(server, PIPE_REPO)
    assert not got & set(JUNK), got & set(JUNK)  # no pickles, .ckpt, .msgpack, other variants or single files
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"} <= got

    _, params = load_unet(root / "pipe" / "unet")
    with pytest.raises(FileNotFoundError, match=r"variants \['v0-0', 'v0-1'\].*--delta-variant"):
        delta_lib.load_delta(DELTA_REPO, params)
    assert _fetched(server, DELTA_REPO) == set()  # refused from the listing, before any download
    dw = delta_lib.load_delta(DELTA_REPO, params, variant="v0-1")
    assert _fetched(server, DELTA_REPO) == {"config.json", "diffusion_pytorch_model.v0-1.safetensors"}
    assert _same(dw, delta_lib.load_delta(root / "delta", params, variant="v0-1"))
    # Cached now: read again without the network (the server sees no new request).
    server.requests.clear()
    assert _same(delta_lib.load_delta(DELTA_REPO, params), dw)  # the cached folder holds the single variant
    assert server.requests == []
    # Another variant completes the cached snapshot with that one file.
    dw0 = delta_lib.load_delta(DELTA_REPO, params, variant="v0-0")
    assert _fetched(server, DELTA_REPO) == {"diffusion_pytorch_model.v0-0.safetensors"}
    assert _same(dw0, delta_lib.load_delta(root / "delta", params, variant="v0-0"))


def test_offline_uses_cache_and_names_what_is_missing(online, monkeypatch) -> None:
    root, server = online
    with pytest.raises(FileNotFoundError, match=rf"{PIPE_REPO}.*not in the Hugging Face cache.*local_files_only"):
        load_pipeline_components(PIPE_REPO, local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=rf"{PIPE_REPO}.*not in the Hugging Face cache.*HF_HUB_OFFLINE") as e:
        load_pipeline_components(PIPE_REPO)
    assert "\n" not in str(e.value)
    _, params = load_unet(root / "pipe" / "unet")
    with pytest.raises(FileNotFoundError, match=rf"{DELTA_REPO}.*HF_HUB_OFFLINE"):
        delta_lib.load_delta(DELTA_REPO, params, variant="v0-1")
    assert server.requests == []  # offline: nothing was asked of the hub
    # Today's behaviour: a cached repo loads offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    path = hub.resolve_model_path(PIPE_REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server.requests.clear()
    assert hub.resolve_model_path(PIPE_REPO) == path
    assert load_pipeline_components(PIPE_REPO, local_files_only=True).path == path
    assert server.requests == []


def test_missing_files_are_named(online) -> None:
    root, server = online
    _, params = load_unet(root / "pipe" / "unet")
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.v9\.safetensors.*\['v0-0', 'v0-1'\]"):
        delta_lib.load_delta(DELTA_REPO, params, variant="v9")
    # No folder has a bf16 variant: refused from the listing, before any download.
    with pytest.raises(FileNotFoundError, match=r"no weights of variant 'bf16'"):
        load_pipeline_components(PIPE_REPO, variant="bf16")
    assert _fetched(server, PIPE_REPO) == set()
    # fp16 exists for the UNet only (as v0-fix in the SDXL releases): the other folders' plain weights are
    # fetched and read instead, as diffusers does, with a warning naming them.
    with pytest.warns(UserWarning, match="vae, text_encoder have no 'fp16' weights"):
        comps = load_pipeline_components(PIPE_REPO, variant="fp16")
    got = _fetched(server, PIPE_REPO)
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= got
    assert "unet/diffusion_pytorch_model.safetensors" not in got
    assert _same(comps.unet_params, load_unet(root / "served" / "unet", variant="fp16")[1])
    with pytest.raises(FileNotFoundError, match=r"Could not fetch 'hansyan/no-such-model' from http://127\.0\.0\.1"):
        load_pipeline_components("hansyan/no-such-model")
    # A file the listing names but the server cannot serve.
    server.unserved.add(f"{DELTA_REPO}:diffusion_pytorch_model.v0-0.safetensors")
    try:
        with pytest.raises(FileNotFoundError, match=rf"Could not fetch '{DELTA_REPO}'.*EntryNotFound"):
            delta_lib.load_delta(DELTA_REPO, params, variant="v0-0")
    finally:
        server.unserved.clear()
