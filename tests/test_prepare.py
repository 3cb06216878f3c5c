"""perflow-jax prepare: image folders and webdataset shards → VAE posteriors and text embeddings in ArrayRecord.

Parity: the stored mean/log-variance against diffusers' ``AutoencoderKL.encode`` and the text embeddings against
transformers' CLIP encoders on the same preprocessed images and captions, with float32 storage. Tolerance 1e-5:
both sides compute in float32 on the CPU; the tiny models' outputs are O(1), so 1e-5 is float32 rounding
accumulated over a few layers (the model parity tests see ~1e-6), while any layout or layer mistake is O(0.1).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from perflow_jax import cli
from perflow_jax.training import prepare as prep
from perflow_jax.training import records
from perflow_jax.training.data import PreparedDataset
from tests.support.tiny_data import write_image_folder, write_webdataset
from tests.support.tiny_sd import make_tiny_pipeline

RES = 16  # 16x16 images -> 8x8 latents with the tiny VAE (downscale 2)
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    out = {"root": root}
    for family in ("sd15", "sdxl"):
        out[family] = make_tiny_pipeline(str(root / family), family)
    out["folder_captions"] = write_image_folder(str(root / "images"), 24, metadata=True)
    out["txt_captions"] = write_image_folder(str(root / "images_txt"), 6, metadata=False, seed=3)
    out["tar_captions"] = write_webdataset(str(root / "shard.tar"), 12, corrupt=(5,))
    return out


def _records(path: str) -> list[dict[str, np.ndarray]]:
    src = PreparedDataset.open(path).source()
    return [records.decode(src[i]) for i in range(len(src))]


def _sample_bytes(shards, rid):
    shard, pos = divmod(int(rid), prep.ID_STRIDE)
    return list(prep.iter_samples(shards[shard]))[pos]


def test_sd15_parity_corrupt_skipped_and_resume(data, tmp_path):
    root, pipe = data["root"], data["sd15"]
    inputs = [str(root / "images"), str(root / "shard.tar")]
    out = str(tmp_path / "prep")
    report = prep.prepare(str(root / "sd15"), inputs, out, resolution=RES, batch_size=8, shard_size=10,
                          storage_dtype="float32", progress=False)
    # 24 folder images in shards of 10 (3 shards) + the tar (1 shard); its sample 5 is corrupt.
    assert report["complete"] and report["shards"] == 4 and report["records"] == 35 and report["skipped"] == 1
    (bad,) = report["skipped_samples"]
    assert bad["sample"].endswith("shard.tar:000000005") and "not a readable image" in bad["reason"]
    assert prep.collect_report(out)["skipped_samples"] == report["skipped_samples"]

    recs = _records(out)
    assert len(recs) == 35 and len({int(r["id"]) for r in recs}) == 35
    shards = prep.list_inputs(inputs, 10)
    samples = [_sample_bytes(shards, r["id"]) for r in recs]
    pixels = np.stack([prep.load_image(s.image, RES) for s in samples])
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist
        tok = pipe.tokenizer([s.caption for s in samples], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        hidden = pipe.text_encoder(tok.input_ids).last_hidden_state.numpy()
        null_tok = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                  return_tensors="pt")
        null = pipe.text_encoder(null_tok.input_ids).last_hidden_state.numpy()[0]
    mean = np.stack([r["mean"] for r in recs])
    logvar = np.stack([r["logvar"] for r in recs])
    err = {"mean": np.abs(mean - dist.mean.numpy()).max(), "logvar": np.abs(logvar - dist.logvar.numpy()).max(),
           "text": np.abs(np.stack([r["encoder_hidden_states"] for r in recs]) - hidden).max()}
    print("sd15 parity max abs:", err)
    assert max(err.values()) <= TOL, err
    assert mean.shape == (35, 4, RES // 2, RES // 2) and set(recs[0]) == {"id", "mean", "logvar",
                                                                         "encoder_hidden_states"}
    ds = PreparedDataset.open(out)
    np.testing.assert_allclose(ds.null_cond.encoder_hidden_states, null, atol=TOL, rtol=0)
    assert ds.null_cond.text_embeds is None

    # Resume: a killed run left shard 1 unfinished; the rerun encodes only it, identically.
    before = open(os.path.join(out, "shard-00001.array_record"), "rb").read()
    os.remove(os.path.join(out, "shard-00001.json"))
    with pytest.raises(ValueError, match="1 of 4 shards are not prepared yet"):
        PreparedDataset.open(out)
    again = prep.prepare(str(root / "sd15"), inputs, out, resolution=RES, batch_size=8, shard_size=10,
                         storage_dtype="float32", progress=False)
    assert again["encoded_now"] == 10 and again["records"] == 35
    assert open(os.path.join(out, "shard-00001.array_record"), "rb").read() == before
    # Other settings into the same folder are refused before any work, through the CLI too (one line, exit 2).
    with pytest.raises(ValueError, match="other settings .*resolution"):
        prep.prepare(str(root / "sd15"), inputs, out, resolution=8, storage_dtype="float32", progress=False)
    assert cli.main(["--no-cache", "prepare", str(root / "images"), "--model", str(root / "sd15"), "--out",
                     str(root / "images")]) == 2


def test_sdxl_parity_text_txt_captions_and_bf16(data, tmp_path, capsys):
    root, pipe = data["root"], data["sdxl"]
    out = str(tmp_path / "prep_xl")
    assert cli.main(["--no-cache", "prepare", str(root / "images_txt"), "--model", str(root / "sdxl"), "--out", out,
                     "--resolution", str(RES), "--batch-size", "4", "--storage-dtype", "fp32", "--no-progress"]) == 0
    assert '"records": 6' in capsys.readouterr().out
    recs = _records(out)
    shards = prep.list_inputs([str(root / "images_txt")])
    samples = [_sample_bytes(shards, r["id"]) for r in recs]
    assert [s.caption for s in samples] == data["txt_captions"]  # NAME.txt captions, stripped, in file order

    def encode(texts):
        kw = dict(padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                  return_tensors="pt")
        with torch.no_grad():
            o1 = pipe.text_encoder(pipe.tokenizer(texts, **kw).input_ids, output_hidden_states=True)
            o2 = pipe.text_encoder_2(pipe.tokenizer_2(texts, **kw).input_ids, output_hidden_states=True)
        return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1).numpy(), o2.text_embeds.numpy()

    hidden, pooled = encode([s.caption for s in samples])
    pixels = np.stack([prep.load_image(s.image, RES) for s in samples])
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist
    err = {"mean": np.abs(np.stack([r["mean"] for r in recs]) - dist.mean.numpy()).max(),
           "logvar": np.abs(np.stack([r["logvar"] for r in recs]) - dist.logvar.numpy()).max(),
           "concat": np.abs(np.stack([r["encoder_hidden_states"] for r in recs]) - hidden).max(),
           "pooled": np.abs(np.stack([r["text_embeds"] for r in recs]) - pooled).max()}
    print("sdxl parity max abs:", err)
    assert max(err.values()) <= TOL, err
    assert hidden.shape[-1] == 64  # 32 + 32: both encoders' penultimate states
    np.testing.assert_array_equal(np.stack([r["time_ids"] for r in recs]),
                                  np.tile([RES, RES, 0, 0, RES, RES], (6, 1)).astype(np.float32))
    null_hidden, null_pooled = encode([""])
    ds = PreparedDataset.open(out)
    np.testing.assert_allclose(ds.null_cond.encoder_hidden_states, null_hidden[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ds.null_cond.text_embeds, null_pooled[0], atol=TOL, rtol=0)

    # bf16 (the default) stores the float32 values rounded to bfloat16.
    out16 = str(tmp_path / "prep_xl16")
    prep.prepare(str(root / "sdxl"), [str(root / "images_txt")], out16, resolution=RES, batch_size=4, progress=False)
    recs16 = _records(out16)
    assert recs16[0]["mean"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(recs16[0]["mean"], recs[0]["mean"].astype(recs16[0]["mean"].dtype))


def test_load_image_resizes_shorter_side_and_center_crops():
    # A 4x8 image whose columns are 0..7 (x 30): bilinear to 8x16, then the centre 8 columns (4..11).
    from PIL import Image

    img = np.repeat((np.arange(8, dtype=np.uint8) * 30)[None, :, None], 4, axis=0).repeat(3, axis=2)
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    out = prep.load_image(buf.getvalue(), 8)
    big = np.asarray(Image.fromarray(img).resize((16, 8), Image.BILINEAR), np.float32) / 127.5 - 1
    np.testing.assert_array_equal(out, big[:, 4:12].transpose(2, 0, 1))
    assert out.shape == (3, 8, 8)
    with pytest.raises(OSError):
        prep.load_image(b"not an image", 8)


def test_record_codec_round_trip_and_refusal():
    import ml_dtypes

    rec = {"id": np.asarray(7, np.int64), "mean": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
           "h": np.ones((2, 2), ml_dtypes.bfloat16)}
    back = records.decode(records.encode(rec))
    for k, v in rec.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    with pytest.raises(ValueError, match="not a perflow-jax prepared record"):
        records.decode(records.encode(rec)[:-3])
    with pytest.raises(ValueError, match="dtype"):
        records.encode({"x": np.zeros(2, np.complex64)})


@pytest.mark.slow(reason="two prepare processes in a jax.distributed group, against one process")
def test_two_processes_prepare_their_shares(data, tmp_path):
    """`perflow-jax prepare` in a real 2-process jax.distributed group (2 host devices each) writes the same
    records as one process: process i encodes shards i, i+2, ... into the shared folder (float32; TOL as above:
    the batch is split over other devices, so XLA may block the matmuls differently, ~1e-6 on O(1) values)."""
    import json
    import socket
    import subprocess
    import sys

    from perflow_jax import sharding

    root = data["root"]
    inputs = [str(root / "images"), str(root / "shard.tar")]
    single = str(tmp_path / "single")
    prep.prepare(str(root / "sd15"), inputs, single, resolution=RES, batch_size=8, shard_size=10,
                 storage_dtype="float32", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = str(tmp_path / "group")
    env = {k: v for k, v in os.environ.items() if k not in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES,
                                                             sharding.ENV_PROCESS_ID)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               **{sharding.ENV_COORDINATOR: f"127.0.0.1:{port}", sharding.ENV_NUM_PROCESSES: "2"})
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-m", "perflow_jax.cli", "--no-cache", "prepare", *inputs, "--model",
                               str(root / "sd15"), "--out", group, "--resolution", str(RES), "--batch-size", "8",
                               "--shard-size", "10", "--storage-dtype", "fp32", "--no-progress"], cwd=root_dir,
                              env={**env, sharding.ENV_PROCESS_ID: str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, logs[-1][-3000:]
    # Process 0 encoded shards 0 and 2 (10 + 4 images), process 1 shards 1 and 3 (10 + 11 of the tar's 12).
    encoded = sorted(json.loads(log[log.index("{"):log.rindex("}") + 1])["encoded_now"] for log in logs)
    assert encoded == [14, 21]
    assert json.load(open(os.path.join(group, prep.REPORT)))["records"] == 35
    a, b = _records(single), _records(group)
    assert [int(r["id"]) for r in a] == [int(r["id"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], atol=TOL, rtol=0, err_msg=k)
