"""PeRFlow training: the window solver against a float64 NumPy oracle and against sampling.guided, targets
against the scheduler, the student fn against the model adapter, the training loop (loss goes down,
bit-identical resume, 4-device data parallel = 1 device) and config errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import sampling
from perflow_jax.models.adapter import UNetCondition, unet_apply
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, init_unet_params
from perflow_jax.schedulers import common
from perflow_jax.schedulers import perflow as pf
from perflow_jax.training import reflow, solver
from perflow_jax.training import train as train_lib

T = 1000


# ----------------------------------------------------------------------------------------------------------
# Solver vs. an independent float64 oracle of the reference solver's formulas
# ----------------------------------------------------------------------------------------------------------


def _toy_teacher(x, timesteps, cond):
    """A smooth, condition- and time-dependent stand-in for a UNet (works for NumPy and JAX inputs)."""
    xp = jnp if isinstance(x, jax.Array) else np
    t = xp.asarray(timesteps).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
    c = xp.asarray(cond).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.6 * x * (1.0 - 0.3 * t) + 0.2 * c + 0.1 * xp.sin(3 * x)


def _oracle_solve(x, t_start, t_end, cond, n, k, prediction_type, ac, final, uncond=None, w=1.0):
    x = np.asarray(x, np.float64)
    ac = np.asarray(ac, np.float64)
    stride = T // (k * n)
    for i in range(n):
        tp = t_start + (t_end - t_start) / n * i
        ts = np.round(T * tp - 1).astype(np.int64)
        prev = ts - stride
        a = ac[ts][:, None, None, None]
        a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, T - 1)], final)[:, None, None, None]
        out = _toy_teacher(x, ts, cond)
        if uncond is not None:
            out_u = _toy_teacher(x, ts, uncond)
            out = out_u + w * (out - out_u)
        if prediction_type == "epsilon":
            x0, eps = (x - np.sqrt(1 - a) * out) / np.sqrt(a), out
        else:
            x0, eps = np.sqrt(a) * x - np.sqrt(1 - a) * out, np.sqrt(a) * out + np.sqrt(1 - a) * x
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_solver_matches_float64_oracle(prediction_type, guidance):
    k, n = 4, 3
    cfg = solver.SolverConfig(num_steps=n, num_windows=k, prediction_type=prediction_type)
    starts = np.array([1.0, 0.75, 0.5, 0.25, 1.0, 0.25], np.float32)
    ends = np.array([0.75, 0.5, 0.25, 0.0, 0.75, 0.0], np.float32)
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    cond = np.linspace(-1, 1, 6).astype(np.float32)
    uncond = np.zeros(6, np.float32) if guidance else None
    ac64 = common.alphas_cumprod(common.make_betas(T, 0.00085, 0.012, "scaled_linear"))
    want = _oracle_solve(x, starts.astype(np.float64), ends.astype(np.float64), cond, n, k, prediction_type,
                         ac64.astype(np.float32).astype(np.float64), float(np.float32(ac64[0])), uncond,
                         guidance or 1.0)
    got = jax.jit(lambda x, s, e, c, u: solver.solve(cfg, _toy_teacher, x, s, e, c, uncond=u,
                                                     guidance_scale=guidance or 1.0))(x, starts, ends, cond, uncond)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    # The time grid itself is exact.
    ts = np.asarray(solver.solver_timesteps(cfg, starts, ends))
    np.testing.assert_array_equal(ts[0], [999, 916, 832])
    np.testing.assert_array_equal(ts[3], [249, 166, 82])


def test_solver_set_alpha_to_one_and_validation():
    with pytest.raises(ValueError, match="prediction_type"):
        solver.SolverConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="DDIM step would be 0"):
        solver.SolverConfig(num_steps=400, num_windows=4)
    cfg = solver.SolverConfig(num_steps=1, num_windows=1, set_alpha_to_one=True)
    x = jnp.ones((1, 1, 2, 2))
    # One step over the whole range with ᾱ_prev = 1 gives the predicted x0 exactly.
    out = solver.solve(cfg, lambda x, t, c: jnp.zeros_like(x), x, jnp.ones(1), jnp.zeros(1), jnp.zeros(1))
    ac = common.alphas_cumprod(common.make_betas(T, 0.00085, 0.012, "scaled_linear")).astype(np.float32)
    np.testing.assert_allclose(np.asarray(out), 1 / np.sqrt(ac[999]), rtol=1e-5)


def test_solver_guidance_is_sampling_guided():
    # Per-sample windows give per-sample (B,) timesteps at every step; the scale is per sample too.
    cfg = solver.SolverConfig(num_steps=3, num_windows=4)
    starts = jnp.asarray([1.0, 0.75, 0.5, 0.25])
    ends = jnp.asarray([0.75, 0.5, 0.25, 0.0])
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 1, 4, 4)), jnp.float32)
    cond, uncond = jnp.linspace(-1, 1, 4), jnp.zeros(4)
    w = jnp.asarray([1.0, 2.0, 4.5, 7.5])
    got = jax.jit(lambda: solver.solve(cfg, _toy_teacher, x, starts, ends, cond, uncond=uncond, guidance_scale=w))()
    by_hand = jax.jit(lambda: solver.solve(cfg, sampling.guided(_toy_teacher, uncond, w), x, starts, ends, cond))()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(by_hand))
    # guided itself: u + w·(c − u) from separate calls, with per-sample timesteps.
    t = jnp.asarray([999, 700, 420, 10])
    u, c = _toy_teacher(x, t, uncond), _toy_teacher(x, t, cond)
    np.testing.assert_allclose(np.asarray(sampling.guided(_toy_teacher, uncond, w)(x, t, cond)),
                               np.asarray(u + w[:, None, None, None] * (c - u)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_update_equals_explicit_formula(prediction_type):
    """ddim_update (built on schedulers.common.predict_x0/predict_epsilon) is the DDIM formula bit for bit."""
    rng = np.random.default_rng(4)
    x, out = (jnp.asarray(rng.standard_normal((3, 1, 4, 4)), jnp.float32) for _ in range(2))
    a, a_prev = jnp.asarray([0.05, 0.4, 0.9]), jnp.asarray([0.3, 0.7, 0.9991])
    got = jax.jit(solver.ddim_update, static_argnums=0)(prediction_type, out, x, a, a_prev)

    @jax.jit
    def explicit(out, x, a, a_prev):
        a, a_prev = a[:, None, None, None], a_prev[:, None, None, None]
        if prediction_type == "epsilon":
            x0, eps = (x - jnp.sqrt(1 - a) * out) / jnp.sqrt(a), out
        else:
            x0, eps = jnp.sqrt(a) * x - jnp.sqrt(1 - a) * out, jnp.sqrt(a) * out + jnp.sqrt(1 - a) * x
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

    np.testing.assert_array_equal(np.asarray(got), np.asarray(explicit(out, x, a, a_prev)))


# ----------------------------------------------------------------------------------------------------------
# Targets: training and sampling agree
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["ddim_eps", "diff_eps", "velocity"])
def test_targets_land_on_window_end(prediction_type):
    cfg = pf.PeRFlowConfig(num_time_windows=4, prediction_type=prediction_type)
    rng = np.random.default_rng(1)
    x_s = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    x_e = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    t_s = jnp.asarray([1.0, 0.75, 0.5, 0.25])
    t_e = jnp.asarray([0.75, 0.5, 0.25, 0.0])
    target = reflow.targets(cfg, jnp.asarray(x_s), jnp.asarray(x_e), t_s, t_e)
    # One scheduler step per window starts exactly at t_s and moves to t_e.
    state = pf.set_timesteps(cfg, 4)
    for i in range(4):
        out, _ = pf.step(cfg, state, target[i:i + 1], i, jnp.asarray(x_s[i:i + 1]))
        np.testing.assert_allclose(np.asarray(out)[0], x_e[i], rtol=1e-4, atol=1e-4)
    # Mid-window: the velocity from the same target at x_t on the line also ends at x_e.
    t = jnp.asarray([0.9, 0.6, 0.3, 0.1])
    frac = ((t - t_s) / (t_e - t_s))[:, None, None, None]
    x_t = x_s + (x_e - x_s) * frac
    v = pf.model_output_to_velocity(cfg, target, x_t, t)
    np.testing.assert_allclose(np.asarray(x_t + (t_e - t)[:, None, None, None] * v), x_e, rtol=1e-4, atol=1e-4)


def test_make_batch_shapes_grid_and_line():
    pcfg = pf.PeRFlowConfig(num_time_windows=2, prediction_type="diff_eps")
    rcfg = reflow.ReflowConfig(perflow=pcfg, solver=solver.SolverConfig.from_perflow(pcfg, num_steps=2),
                               discrete_timesteps=40, cond_dropout=0.5)
    x0 = jnp.asarray(np.random.default_rng(2).standard_normal((64, 1, 4, 4)), jnp.float32)
    cond = jnp.arange(64, dtype=jnp.float32)
    b = reflow.make_batch(rcfg, _toy_teacher, x0, cond, jnp.float32(-1.0), jax.random.key(0))
    t = np.asarray(b.t)
    np.testing.assert_allclose(t * 40, np.round(t * 40), atol=1e-4)
    assert t.min() > 0 and t.max() <= 1
    assert set(np.unique(np.asarray(b.t_start)).tolist()) <= {1.0, 0.5}
    dropped = np.asarray(b.cond) == -1
    assert 0 < dropped.sum() < 64
    frac = ((b.t - b.t_start) / (b.t_end - b.t_start))[:, None, None, None]
    np.testing.assert_allclose(np.asarray(b.x_t), np.asarray(b.x_start + (b.x_end - b.x_start) * frac), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.timesteps), t * 1000, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------

TINY = UNetConfig(sample_size=8, in_channels=1, out_channels=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, cross_attention_dim=4, attention_head_dim=2, num_class_embeds=11)


def _tiny_setup(tmp_path, name, *overrides):
    cfg_path = tmp_path / "unet.json"
    cfg_path.write_text(json.dumps(TINY.to_dict()))
    cfg = train_lib.load_config(None, [
        "model.kind=unet", f"model.unet_config={cfg_path}", f"output_dir={tmp_path / name}", "teacher.weights=x",
        "perflow.num_time_windows=2", "perflow.prediction_type=velocity", "solver.num_steps=2",
        "train.batch_size=8", "train.learning_rate=3e-3", "train.warmup_steps=0", "train.ema_decay=0.9",
        "train.log_every=1", "train.progress=false", "data.kind=npz", "data.path=unused", *overrides])
    rng = np.random.default_rng(0)
    ds = train_lib.ArrayDataset(np.tanh(rng.standard_normal((24, 1, 8, 8))).astype(np.float32),
                                {"class_labels": rng.integers(0, 10, 24).astype(np.int32)},
                                {"class_labels": np.int32(10)})
    teacher = init_unet_params(TINY, jax.random.key(0))
    # A teacher predicting ε = 0 gives smooth, deterministic targets the tiny student can fit in a few steps.
    teacher["conv_out"] = jax.tree_util.tree_map(jnp.zeros_like, teacher["conv_out"])
    return cfg, ds, teacher


def test_student_fn_is_unet_apply():
    """The trainer's student fn is the shared adapter (bit for bit; each side jitted, as the trainer runs it)."""
    params = init_unet_params(TINY, jax.random.key(1))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 1, 8, 8)), jnp.float32)
    t = jnp.asarray([999.0, 420.5, 3.0])
    labels = jnp.asarray([1, 7, 10], jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((3, 2, TINY.cross_attention_dim)), jnp.float32)
    module = UNet2DConditionModel(TINY)
    student = jax.jit(train_lib.make_apply_fn(TINY, jnp.float32))
    adapter = jax.jit(functools.partial(unet_apply, module))
    for cond in (UNetCondition(class_labels=labels), UNetCondition(encoder_hidden_states=ctx, class_labels=labels)):
        got = student(params, x, t, cond)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(adapter(params, x, t, cond)))
    # No text: one zero token, as the trainer's own condition handling did before the adapter.
    zero_token = jax.jit(lambda p: module.apply({"params": p}, x, t, jnp.zeros((3, 1, TINY.encoder_dim)),
                                                class_labels=labels))(params)
    np.testing.assert_array_equal(np.asarray(student(params, x, t, UNetCondition(class_labels=labels))),
                                  np.asarray(zero_token))


def test_array_dataset_conditions():
    x = np.zeros((4, 1, 8, 8), np.float32)
    ds = train_lib.ArrayDataset(x, {"class_labels": np.arange(4)}, {"class_labels": np.int32(10)})
    assert isinstance(ds.cond, UNetCondition) and isinstance(ds.null_cond, UNetCondition)
    xs, cond = ds.rows(np.asarray([[3, 1], [0, 2]]))
    assert xs.shape == (2, 2, 1, 8, 8)
    np.testing.assert_array_equal(cond.class_labels, [[3, 1], [0, 2]])
    assert cond.encoder_hidden_states is None
    with pytest.raises(ValueError, match="no null value"):
        train_lib.ArrayDataset(x, UNetCondition(class_labels=np.arange(4)), UNetCondition())
    with pytest.raises(ValueError, match="but cond does not"):
        train_lib.ArrayDataset(x, UNetCondition(class_labels=np.arange(4)),
                               UNetCondition(class_labels=np.int32(10), time_ids=np.zeros(6)))
    with pytest.raises(ValueError, match="rows for 4 samples"):
        train_lib.ArrayDataset(x, UNetCondition(class_labels=np.arange(3)), UNetCondition(class_labels=np.int32(10)))
    with pytest.raises(ValueError, match="Unknown UNet condition keys"):
        train_lib.ArrayDataset(x, {"labels": np.arange(4)}, {"labels": np.int32(10)})


@pytest.mark.slow(reason="40 optimizer steps of the tiny UNet, enough for the loss to fall")
def test_training_lowers_loss(tmp_path):
    cfg, ds, teacher = _tiny_setup(tmp_path, "run", "train.steps=40", "train.checkpoint_every=100",
                                   "train.learning_rate=1e-2", "train.grad_clip=100.0", "train.ema_decay=0.0")
    res = train_lib.train(cfg, ds, teacher_params=teacher)
    # Loss on one fixed reflow batch, before and after training.
    rcfg = train_lib.reflow_config(cfg)
    apply = train_lib.make_apply_fn(TINY, jnp.float32)
    batch = reflow.make_batch(rcfg, lambda x, t, c: apply(teacher, x, t, c), jnp.asarray(ds.x),
                              UNetCondition(class_labels=jnp.asarray(ds.cond.class_labels)),
                              UNetCondition(class_labels=jnp.int32(10)), jax.random.key(123))
    before = float(reflow.loss(rcfg, apply, teacher, batch))
    after = float(reflow.loss(rcfg, apply, res["params"], batch))
    assert after < 0.7 * before, (before, after)
    assert os.path.isfile(res["delta_path"])
    sched = json.loads(open(res["scheduler_config"]).read())
    assert sched["_class_name"] == "PeRFlowScheduler" and sched["num_time_windows"] == 2
    assert all(json.loads(line)["loss"] > 0 for line in open(tmp_path / "run" / "metrics.jsonl"))


@pytest.mark.slow(reason="a run killed mid-way and resumed, against an uninterrupted one")
def test_kill_and_resume_is_bit_identical(tmp_path):
    common_ov = ("train.steps=6", "train.checkpoint_every=3", "train.grad_accum=2")
    cfg, ds, teacher = _tiny_setup(tmp_path, "straight", *common_ov)
    straight = train_lib.train(cfg, ds, teacher_params=teacher)["params"]

    cfg, ds, teacher = _tiny_setup(tmp_path, "killed", *common_ov)

    def kill(step, loss):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_lib.train(cfg, ds, teacher_params=teacher, callback=kill)
    res = train_lib.train(cfg, ds, teacher_params=teacher)
    assert res["resumed_from"] == 3
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(res["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _finite_file(path) -> bool:
    from safetensors.numpy import load_file

    return all(np.isfinite(v).all() for v in load_file(str(path)).values())


@pytest.mark.slow(reason="three short training runs: diverge, refused resume, allowed resume")
def test_training_nonfinite_loss_and_config_change_on_resume(tmp_path):
    """A run whose loss turns NaN stops with a clear error and keeps its last good checkpoint (no NaN checkpoint,
    no ΔW); resuming it under another learning rate needs allow_config_change; train.steps may grow without it."""
    run = tmp_path / "run"
    first = ("train.steps=5", "train.checkpoint_every=1", "solver.num_steps=1")
    cfg, ds, teacher = _tiny_setup(tmp_path, "run", *first)
    poisoned = np.array(ds.x)
    poisoned[train_lib.batch_indices(len(ds), 0, 2, 8)[0]] = np.nan  # one NaN sample in step 3's batch
    bad_ds = train_lib.ArrayDataset(poisoned, ds.cond, ds.null_cond)
    with pytest.raises(train_lib.NonFiniteLossError, match=r"^Training diverged: the loss is nan at step 3; .*"
                       r"the last good checkpoint, step 2, is kept in .*--allow-config-change train\.learning_rate"
                       ) as err:
        train_lib.train(cfg, bad_ds, teacher_params=teacher)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", train_lib.RUN_CONFIG]
    assert not (run / "delta_weights.safetensors").exists() and not (run / "train_config.json").exists()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]

    lower = (*first, "train.learning_rate=1e-3")
    cfg, _, _ = _tiny_setup(tmp_path, "run", *lower)
    with pytest.raises(ValueError, match=r"\(train\.learning_rate: 0\.003 → 0\.001\).*--allow-config-change "
                                         r"train\.learning_rate"):
        train_lib.train(cfg, ds, teacher_params=teacher)
    before = sorted(os.listdir(run / "checkpoints"))
    cfg, _, _ = _tiny_setup(tmp_path, "run", *lower, "perflow.num_time_windows=1")
    with pytest.raises(ValueError, match=r"\(perflow\.num_time_windows: 2 → 1\)\. "):
        train_lib.check_resume(cfg, ["train.learning_rate"])
    assert sorted(os.listdir(run / "checkpoints")) == before

    # Allowed: resume the last good checkpoint (clean data) under the new learning rate, for longer.
    cfg, _, _ = _tiny_setup(tmp_path, "run", *lower, "train.steps=6")
    res = train_lib.train(cfg, ds, teacher_params=teacher, allow_config_change=["train.learning_rate"])
    assert res["resumed_from"] == 2 and res["steps"] == 6
    assert _finite_file(res["delta_path"])
    stored = json.loads((run / "checkpoints" / train_lib.RUN_CONFIG).read_text())
    assert stored["train"]["learning_rate"] == 1e-3 and stored["train"]["steps"] == 6
    assert json.loads((run / "train_config.json").read_text()) == stored
    with pytest.raises(ValueError, match=r"train\.steps=5 is below the latest checkpoint, step 6"):
        train_lib.check_resume(_tiny_setup(tmp_path, "run", *lower)[0], ["*"])
    # Longer again: no allow_config_change needed; cosmetic keys (progress, logging, checkpoints) are free.
    cfg, _, _ = _tiny_setup(tmp_path, "run", *lower, "train.steps=9", "train.log_every=5", "train.checkpoint_every=3")
    assert train_lib.check_resume(cfg) == (6, ["train.steps: 6 → 9"])


def test_training_huge_learning_rate_never_saves_nonfinite(tmp_path):
    """A finite but absurd learning rate diverges within a few steps: a one-line error, no ΔW, and every kept
    checkpoint (and the logged losses) finite."""
    import orbax.checkpoint as ocp

    cfg, ds, teacher = _tiny_setup(tmp_path, "run", "train.steps=8", "train.checkpoint_every=1",
                                   "train.keep_checkpoints=8", "train.learning_rate=1e30", "solver.num_steps=1")
    with pytest.raises(train_lib.NonFiniteLossError, match=r"^Training diverged: the loss is (nan|inf) at step"):
        train_lib.train(cfg, ds, teacher_params=teacher)
    run = tmp_path / "run"
    assert not (run / "delta_weights.safetensors").exists()
    assert all(np.isfinite(json.loads(line)["loss"]) for line in open(run / "metrics.jsonl"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 8
    for step in steps:
        restored = ocp.StandardCheckpointer().restore(run / "checkpoints" / str(step) / "default")
        for leaf in jax.tree_util.tree_leaves((restored["params"], restored["ema"])):
            assert np.isfinite(np.asarray(leaf)).all(), step


def test_training_cli_digits_without_sklearn_or_matplotlib(tmp_path, monkeypatch, capsys):
    """`perflow-jax train` on the built-in digits model with neither scikit-learn nor matplotlib importable (a
    default install): it trains, exports a finite ΔW, and a rerun under another learning rate is refused."""
    import sys

    from perflow_jax.cli import main

    for name in [m for m in sys.modules if m.split(".")[0] in ("sklearn", "matplotlib")] + ["sklearn", "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    config = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "digits_perflow.yaml")
    out = tmp_path / "digits"
    argv = ["--no-cache", "train", "--config", config, "train.steps=2", f"output_dir={out}", "train.progress=false",
            "train.batch_size=8", "solver.num_steps=2"]  # the README's command, made small
    assert main(argv) == 0, capsys.readouterr().err
    assert _finite_file(out / "delta_weights.safetensors")
    assert json.loads((out / "scheduler_config.json").read_text())["num_time_windows"] == 1
    assert main([*argv, "train.learning_rate=1e-3"]) == 2
    assert "--allow-config-change train.learning_rate" in capsys.readouterr().err


def test_digits_data_file_equals_sklearn():
    """The shipped digits.npz is sklearn's load_digits() and its stratified split, bit for bit."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split

    from perflow_jax.pipelines import digits

    d = sklearn_datasets.load_digits()
    x, y = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None], d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=400, random_state=0, stratify=y)
    for split, (want_x, want_y) in {"all": (x, y), "train": (x_tr, y_tr), "test": (x_te, y_te)}.items():
        got_x, got_y = digits.load_digits_data(split)
        assert got_x.dtype == np.float32 and got_y.dtype == np.int32
        np.testing.assert_array_equal(got_x, want_x)
        np.testing.assert_array_equal(got_y, want_y)


_DP_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import numpy as np, jax
    sys.path.insert(0, os.path.dirname({test_file!r}))
    from pathlib import Path
    import test_training as tt
    from perflow_jax.training import train as train_lib
    cfg, ds, teacher = tt._tiny_setup(Path({tmp!r}), {name!r}, "train.steps=2", "train.checkpoint_every=100")
    res = train_lib.train(cfg, ds, teacher_params=teacher)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(res["params"])]
    np.savez({out!r}, *leaves)
    print("DEVICES", jax.device_count())
""")


@pytest.mark.slow(reason="a 4-device subprocess run against a 1-device run, each compiling the train step")
def test_four_device_data_parallel_equals_one_device(tmp_path):
    outs = {}
    for n in (1, 4):
        out = str(tmp_path / f"params{n}.npz")
        script = _DP_SCRIPT.format(test_file=os.path.abspath(__file__), tmp=str(tmp_path), name=f"dp{n}", out=out)
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"DEVICES {n}" in proc.stdout
        outs[n] = np.load(out)
    for key in outs[1].files:
        np.testing.assert_allclose(outs[4][key], outs[1][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("train.steps=0", "train.steps"),
    ("train.batch_size=10", "divisible by train.grad_accum"),
    ("train.bogus=1", "Unknown config key 'train.bogus'"),
    ("perflow.prediction_type=x0", "prediction_type"),
    ("reflow.loss_weighting=l1", "loss_weighting"),
    ("reflow.cond_dropout=1.5", "cond_dropout"),
    ("train.ema_decay=1.0", "ema_decay"),
    ("model.dtype=float16", "model.dtype"),
    ("train", "key=value"),
    ("solver.num_steps=0", "num_steps"),
    ("train.learning_rate=inf", r"train\.learning_rate=inf: must be a finite number"),
    ("train.learning_rate=nan", r"train\.learning_rate=nan: must be a finite number"),
    ("train.learning_rate=1e39", r"train\.learning_rate=1e\+39: must be a finite number"),  # float32 overflow
    ("train.grad_clip=-inf", "train.grad_clip"),
    ("perflow.beta_end=nan", "perflow.beta_end"),
    ("reflow.cond_dropout=nan", "reflow.cond_dropout"),
    ("output_dir=", "output_dir='': must be a non-empty string path"),
    ("train.seed=-1", r"train\.seed=-1: must be an integer"),
    ("train.seed=true", "train.seed"),
    ("train.steps=2.0", "train.steps"),
    ("train.steps=99999999999", "train.steps"),
    ("train.progress=1", "train.progress"),
    ("train.adam_b2=1.0", r"train\.adam_b2=1\.0: must be a finite number in \[0\.0, 1\.0\)"),
    ("train.steps=[", "invalid YAML"),
])
def test_bad_config_values_raise(override, match):
    ov = ["output_dir=/tmp/x", "train.grad_accum=4", "train.batch_size=8"]
    with pytest.raises(ValueError, match=match):
        train_lib.load_config(None, [*ov, override])


def test_every_config_key_is_typed():
    """validate() checks a type for every key of DEFAULTS (a new key must get one)."""
    flat = train_lib._flatten(train_lib.DEFAULTS)
    assert set(train_lib._SCHEMA) == set(flat)
    assert train_lib.RESUME_FREE_KEYS <= set(flat)


def test_config_text_fields_stay_text(tmp_path):
    """Paths and names are strings as written: a quoted "123" in YAML, or any override text; an unquoted YAML
    number is an error; numbers as YAML 1.1 strings (3e-3) are still read as numbers."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text('output_dir: "123"\ndata:\n  kind: npz\n  path: "nan"\ntrain:\n  learning_rate: 3e-3\n')
    loaded = train_lib.load_config(str(cfg))
    assert loaded["output_dir"] == "123" and loaded["data"]["path"] == "nan"
    assert loaded["train"]["learning_rate"] == 3e-3
    loaded = train_lib.load_config(str(cfg), ["output_dir=456", "teacher.weights=1e5", "teacher.weights=null",
                                              "train.steps=7"])
    assert loaded["output_dir"] == "456" and loaded["teacher"]["weights"] is None and loaded["train"]["steps"] == 7
    cfg.write_text("output_dir: 123\n")
    with pytest.raises(ValueError, match=r"output_dir=123: must be a non-empty string path"):
        train_lib.load_config(str(cfg))


def test_config_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  learning_rate: [\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:4:1: invalid YAML"):
        train_lib.load_config(str(bad))
    tag = tmp_path / "tag.yaml"
    tag.write_text(f"output_dir: !!python/object/apply:os.mkdir [{str(tmp_path / 'pwned')!r}]\n")
    with pytest.raises(ValueError, match=r"tag\.yaml:1:\d+: YAML tags like !!python"):
        train_lib.load_config(str(tag))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="Cannot read the config"):
        train_lib.load_config(str(tmp_path / "missing.yaml"))


def test_example_configs_validate():
    root = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml"):
            train_lib.load_config(os.path.join(root, name), [])
