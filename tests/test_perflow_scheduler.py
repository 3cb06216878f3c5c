"""PeRFlow scheduler: float64 oracle grid, PyTorch transcription, invariants, jit/vmap/grad, errors.

Tolerance: float32 math against a float64 oracle. Each step rounds a handful of float32 products of O(1)
values (~6e-8 relative each), and trajectories of ≤ 16 steps accumulate well under 1e-5 of the sample's
scale, which is the bound asserted (error / max(1, max|x|)).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax import sampling, schedulers
from perflow_jax.schedulers import perflow
from perflow_jax.schedulers.perflow import PeRFlowConfig
from tests.support.oracle_perflow import Oracle
from tests.support.torch_perflow import TorchPeRFlowScheduler

T = 1000
TRAINED = tuple(np.linspace(1e-4, 0.02, T).tolist())
SCHEDULES = {
    "scaled_linear": {"beta_schedule": "scaled_linear"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained": {"trained_betas": TRAINED},
}


def model_np(x: np.ndarray, t: int) -> np.ndarray:
    """A fixed function of (sample, timestep), the same on every side."""
    return 0.6 * x * np.cos(t / T) + 0.3 * np.sin(2 * x) + 0.1 * t / T


def model_jnp(x: jax.Array, t: jax.Array) -> jax.Array:
    tf = jnp.asarray(t, jnp.float32)
    return 0.6 * x * jnp.cos(tf / T) + 0.3 * jnp.sin(2 * x) + 0.1 * tf / T


def _oracle(K: int, pred: str, sched: str) -> Oracle:
    kw = SCHEDULES[sched]
    return Oracle(K, pred, schedule=kw.get("beta_schedule", "linear"), beta_start=kw.get("beta_start", 0.00085),
                  beta_end=kw.get("beta_end", 0.012), trained=kw.get("trained_betas"))


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("pred", perflow.PREDICTION_TYPES)
def test_oracle_grid(sched: str, pred: str) -> None:
    """K ∈ {1,2,3,4,8} × n ∈ 1..16, whole trajectories on a batch, against the float64 oracle."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 4))
    worst = 0.0
    for K in (1, 2, 3, 4, 8):
        cfg = PeRFlowConfig(num_time_windows=K, prediction_type=pred, **SCHEDULES[sched])
        oracle = _oracle(K, pred, sched)
        for n in range(1, 17):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = perflow.set_timesteps(cfg, n)
            ref_ts = oracle.timesteps(n)
            np.testing.assert_array_equal(np.asarray(state.timesteps), ref_ts)
            ref = oracle.trajectory(x0, n, model_np)
            x = jnp.asarray(x0, jnp.float32)
            for i, t in enumerate(ref_ts):
                x, _ = perflow.step(cfg, state, model_jnp(x, jnp.int32(t)), i, x)
                err = float(np.max(np.abs(np.asarray(x, np.float64) - ref[i]))) / max(1.0, np.abs(ref[i]).max())
                worst = max(worst, err)
    print(f"{sched}/{pred}: worst relative error {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("pred", perflow.PREDICTION_TYPES)
@pytest.mark.parametrize("K,n", [(4, 4), (4, 8), (3, 7), (2, 5)])
def test_matches_pytorch_transcription(pred: str, K: int, n: int) -> None:
    """Against the reference's float32 torch arithmetic: the same ᾱ table bit for bit and the same float32
    formulas, so trajectories agree to float32 rounding of fused vs unfused ops (measured ≤ 4e-7 of scale)."""
    cfg = PeRFlowConfig(num_time_windows=K, prediction_type=pred)
    ref = TorchPeRFlowScheduler.from_config(cfg.to_dict())
    ref.set_timesteps(n)
    state = perflow.set_timesteps(cfg, n)
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    x0 = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    xt, xj = torch.from_numpy(x0), jnp.asarray(x0)
    for i, t in enumerate(ref.timesteps):
        xt = ref.step(torch.from_numpy(model_np(xt.numpy(), int(t)).astype(np.float32)), t, xt).prev_sample
        xj, _ = perflow.step(cfg, state, jnp.asarray(model_np(np.asarray(xj), int(t)), jnp.float32), i, xj)
    diff = float(np.max(np.abs(xt.numpy() - np.asarray(xj)))) / max(1.0, float(np.abs(xt.numpy()).max()))
    print(f"K={K} n={n} {pred}: max relative diff vs torch {diff:.2e}")
    assert diff <= 1e-6


def test_config_round_trip_through_diffusers(tmp_path) -> None:
    cfg = PeRFlowConfig(num_time_windows=3, prediction_type="diff_eps", beta_schedule="linear")
    torch_sched = TorchPeRFlowScheduler.from_config(cfg.to_dict())
    torch_sched.save_config(tmp_path)
    back = PeRFlowConfig.from_json(tmp_path / "scheduler_config.json")
    assert back == cfg and hash(back) == hash(cfg)
    # A real released config has extra keys: they are ignored.
    d = {**cfg.to_dict(), "_diffusers_version": "0.27.0", "clip_sample": False, "steps_offset": 1}
    assert PeRFlowConfig.from_dict(d) == cfg
    assert schedulers.from_config(d).config == cfg
    assert schedulers.get("PeRFlowScheduler", num_time_windows=3).config.num_time_windows == 3


def test_add_noise_one_based() -> None:
    cfg = PeRFlowConfig()
    oracle = Oracle(4, "ddim_eps")
    rng = np.random.default_rng(2)
    x0, noise = rng.standard_normal((3, 4, 4, 4)), rng.standard_normal((3, 4, 4, 4))
    ts = np.array([1, 500, 1000])
    got = perflow.add_noise(cfg, jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), ts)
    want = np.stack([oracle.add_noise(x0[i], noise[i], int(t)) for i, t in enumerate(ts)])
    # Like the reference, ᾱ is a float32 table: near t = 1, 1 − ᾱ ≈ 8.5e-4 then carries ~3.5e-5 relative error,
    # ~1e-6 absolute on these samples; the float32 bound of this suite (1e-5 of scale) applies.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * max(1.0, np.abs(want).max()))
    got_bf16 = perflow.add_noise(cfg, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), 500)
    assert got_bf16.dtype == jnp.bfloat16


def _line_eps(oracle: Oracle, x_s: np.ndarray, x_e: np.ndarray, tp: float) -> np.ndarray:
    """The ε that makes the predicted window end x_e at the point tp on the straight line x_s → x_e."""
    ts, te, lam, eta = oracle.coefficients(tp)
    x_t = x_s + (tp - ts) / (te - ts) * (x_e - x_s)
    return x_t, (x_e - lam * x_t) / eta


@pytest.mark.parametrize("pred", ["ddim_eps", "diff_eps"])
@pytest.mark.parametrize("n", [4, 8, 12])
def test_straight_line_lands_on_window_end(pred: str, n: int) -> None:
    """Given the ε of the straight line in each window, steps from t_s land on x_e; v is constant."""
    K = 4
    cfg, oracle = PeRFlowConfig(num_time_windows=K, prediction_type=pred), Oracle(K, pred)
    state = perflow.set_timesteps(cfg, n)
    rng = np.random.default_rng(3)
    ts = oracle.timesteps(n)
    x = rng.standard_normal((2, 3, 4, 4))
    i = 0
    for w in range(K):
        t_s, t_e = oracle.starts[w], oracle.ends[w]
        x_s, x_e = x, rng.standard_normal(x.shape)
        v_line = (x_e - x_s) / (t_e - t_s)
        xj = jnp.asarray(x_s, jnp.float32)
        while i < len(ts) and oracle.window(ts[i] / T)[0] == t_s:
            x_t, eps = _line_eps(oracle, x_s, x_e, ts[i] / T)
            np.testing.assert_allclose(np.asarray(xj), x_t, atol=1e-5)
            v = perflow.model_output_to_velocity(cfg, jnp.asarray(eps, jnp.float32), xj, ts[i] / T)
            np.testing.assert_allclose(np.asarray(v), v_line, atol=1e-5 * max(1, np.abs(v_line).max()))
            xj, _ = perflow.step(cfg, state, jnp.asarray(eps, jnp.float32), i, xj)
            i += 1
        np.testing.assert_allclose(np.asarray(xj), x_e, atol=1e-5)
        x = x_e


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_ddim_eps_one_step_per_window_is_ddim(K: int) -> None:
    """One step per window with ddim_eps = deterministic DDIM (eta 0) from ᾱ[t_s·T−1] to ᾱ[t_e·T−1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(K)  # only num_inference_steps matters: prev = t − T//K
    cfg = PeRFlowConfig(num_time_windows=K, prediction_type="ddim_eps")
    state = perflow.set_timesteps(cfg, K)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for i in range(K):
        eps = rng.standard_normal(x.shape).astype(np.float32)
        t_ddim = int(state.timesteps[i]) - 1  # ᾱ index of the window start
        want = ddim.step(torch.from_numpy(eps), t_ddim, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
        got = np.asarray(perflow.step(cfg, state, jnp.asarray(eps), i, jnp.asarray(x))[0])
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()))  # ≤ 1e-5 of scale
        x = want


def test_predict_window_end_and_last_window_alpha() -> None:
    cfg = PeRFlowConfig(prediction_type="velocity")
    state = perflow.set_timesteps(cfg, 8)
    x = jnp.ones((1, 2, 2, 2))
    v = jnp.full_like(x, 2.0)
    # t_c = 0.875, window end 0.75: x + (0.75 − 0.875)·2 = 0.75
    np.testing.assert_allclose(np.asarray(perflow.predict_window_end(cfg, state, v, 1, x)), 0.75, atol=1e-6)
    w = perflow.window_alpha(PeRFlowConfig(), jnp.array([0.1, 0.25, 1.0]))
    ac = perflow._alphas_cumprod(PeRFlowConfig())
    np.testing.assert_allclose(np.asarray(w.alpha_cumprod_end), [ac[0], ac[0], ac[749]])  # ends at ᾱ[0], not 1
    np.testing.assert_allclose(np.asarray(w.start), [0.25, 0.25, 1.0])  # 0.25 starts its own window


def test_window_bounds_vectorised_any_shape() -> None:
    cfg = PeRFlowConfig(num_time_windows=4)
    # 0.7502 lies above 0.75 + 0.1/T: first window; 0.74999 and 0.75 belong to the window starting at 0.75.
    t = jnp.array([[1.0, 0.75, 0.7502, 0.74999], [0.5, 0.3, 0.0001, 0.0]])
    s, e = perflow.window_bounds(cfg, t)
    np.testing.assert_allclose(np.asarray(s), [[1.0, 0.75, 1.0, 0.75], [0.5, 0.5, 0.25, 0.25]])
    np.testing.assert_allclose(np.asarray(e), [[0.75, 0.5, 0.75, 0.5], [0.25, 0.25, 0.0, 0.0]])


def test_jit_vmap_grad_and_bf16() -> None:
    cfg = PeRFlowConfig(prediction_type="diff_eps")
    state = perflow.set_timesteps(cfg, 8)
    x = jax.random.normal(jax.random.key(0), (4, 4, 8, 8))
    eps = jax.random.normal(jax.random.key(1), x.shape)
    eager, _ = perflow.step(cfg, state, eps, 3, x)
    jitted, _ = jax.jit(perflow.step, static_argnums=0)(cfg, state, eps, jnp.int32(3), x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)
    per_sample = jax.vmap(lambda e, s: perflow.step(cfg, state, e[None], 3, s[None])[0][0])(eps, x)
    np.testing.assert_allclose(np.asarray(per_sample), np.asarray(eager), atol=1e-6)
    g = jax.grad(lambda s: perflow.step(cfg, state, eps, 3, s)[0].sum())(x)
    lam = float(state.lambda_t[3])
    expected = 1 + float(state.dt[3]) * (lam - 1) / float(state.window_end[3] - state.timepoints[3])
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5)
    out16, _ = perflow.step(cfg, state, eps.astype(jnp.bfloat16), 3, x.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(eager), atol=5e-2)


def test_sampling_loop_compiles_once() -> None:
    """Guidance scale, seed, inputs and conditioning are traced: one compile serves them all."""
    sched = schedulers.get("perflow", prediction_type="diff_eps")
    state = sched.set_timesteps(6)
    traces = []

    def model_fn(x, t, ctx):
        return model_jnp(x, t[:, None, None, None]) + ctx[:, :, None, None]

    @jax.jit
    def run(state, key, cond, uncond, scale):
        traces.append(1)
        x = sampling.init_latents(key, (2, 4, 8, 8), sched, state)
        return sampling.sample(sched, state, sampling.classifier_free_guidance(model_fn, cond, uncond, scale), x)

    cond, uncond = jnp.ones((2, 4)), jnp.zeros((2, 4))
    a = run(state, jax.random.key(0), cond, uncond, 4.5)
    b = run(state, jax.random.key(1), cond * 2, uncond, 7.5)
    c = run(state, jax.random.key(0), cond, uncond, 4.5)
    assert len(traces) == 1 and run._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))  # deterministic for a key

    # The jitted loop equals the oracle's trajectory under the same guided model.
    oracle = Oracle(4, "diff_eps")
    x0 = np.asarray(sampling.init_latents(jax.random.key(0), (2, 4, 8, 8), sched, state), np.float64)
    guided = lambda x, t: model_np(x, t) + 4.5 * 1.0  # noqa: E731  (u + w(c − u) with ctx 1 vs 0)
    np.testing.assert_allclose(np.asarray(a), oracle.trajectory(x0, 6, guided)[-1], atol=1e-4)


def test_sample_returns_trajectory_and_vmaps() -> None:
    sched = schedulers.get("perflow")
    state = sched.set_timesteps(4)
    den = lambda x, t, i: model_jnp(x, t)  # noqa: E731
    x = jnp.ones((3, 2, 4, 4))
    final, traj = sampling.sample(sched, state, den, x, return_trajectory=True)
    assert traj.shape == (4, 3, 2, 4, 4)
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(final))
    per = jax.vmap(lambda xi: sampling.sample(sched, state, den, xi[None])[0])(x)
    np.testing.assert_allclose(np.asarray(per), np.asarray(final), atol=1e-6)


def test_too_few_steps_warns() -> None:
    cfg = PeRFlowConfig(num_time_windows=4)
    with pytest.warns(UserWarning, match="below num_time_windows"):
        state = perflow.set_timesteps(cfg, 2)
    assert state.num_inference_steps == 4


@pytest.mark.parametrize("kwargs,match", [
    ({"prediction_type": "v_prediction"}, "prediction_type"),  # "epsilon" is the alias of diff_eps
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"num_time_windows": 0}, "num_time_windows"),
    ({"num_time_windows": -2}, "num_time_windows"),
    ({"t_noise": 0.9}, "t_noise"),
    ({"t_clean": 0.5}, "t_clean"),
    ({"trained_betas": (0.1, 0.2)}, "trained_betas"),
])
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PeRFlowConfig(**kwargs)


def test_bad_inputs(tmp_path) -> None:
    cfg = PeRFlowConfig()
    with pytest.raises(ValueError, match="num_inference_steps must be an integer ≥ 1, got 0"):
        perflow.set_timesteps(cfg, 0)
    with pytest.raises(ValueError, match="t_clean, t_noise"):
        perflow.window_bounds(cfg, jnp.array([0.5, 1.2]))
    with pytest.raises(ValueError, match="t_clean, t_noise"):
        perflow.window_alpha(cfg, -0.1)
    state = perflow.set_timesteps(cfg, 4)
    with pytest.raises(ValueError, match="shape"):
        perflow.step(cfg, state, jnp.ones((2, 4, 8, 8)), 0, jnp.ones((2, 4, 8, 4)))
    with pytest.raises(IndexError, match="outside"):
        perflow.step(cfg, state, jnp.ones((1, 4)), 4, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        perflow.add_noise(cfg, jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match="Unknown scheduler"):
        schedulers.get("nope")
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "bogus"}))
    with pytest.raises(ValueError, match="prediction_type"):
        PeRFlowConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        PeRFlowConfig.from_json(tmp_path / "missing")


@pytest.mark.parametrize("T,K,t_clean", [(1000, 1, 0.0), (1000, 4, 0.0), (1000, 7, 0.0), (37, 3, 0.0),
                                         (100, 4, 0.013), (10, 8, 0.0)])
def test_max_inference_steps_is_exact(T: int, K: int, t_clean: float) -> None:
    """``max_inference_steps`` is the largest step count whose reference timesteps all lie above t_clean (brute
    force over every count up to past it); it runs with finite steps, and one more is refused with the limit named."""
    cfg = PeRFlowConfig(num_train_timesteps=T, num_time_windows=K, t_clean=t_clean, prediction_type="diff_eps")
    limit = perflow.max_inference_steps(cfg)
    ok = []
    for n in range(1, limit + 2 * K + 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = perflow.reference_timesteps(cfg, n)
        ok.append(bool(np.all(ts.astype(np.float32) / np.float32(T) > np.float32(t_clean))))
    assert all(ok[:limit]) and not ok[limit], (limit, ok.index(False) + 1)
    state = perflow.set_timesteps(cfg, limit)
    for name in ("dt", "lambda_t", "eta_t", "window_end"):
        assert np.all(np.isfinite(np.asarray(getattr(state, name)))), name
    x = jnp.ones((1, 4))
    assert np.all(np.isfinite(np.asarray(perflow.step(cfg, state, x, limit - 1, x)[0])))
    with pytest.raises(ValueError, match=rf"num_inference_steps={limit + 1} is too many .* at most {limit} steps"):
        perflow.set_timesteps(cfg, limit + 1)


def test_step_limits_of_the_shipped_configs() -> None:
    """The digits model (K = 1) holds 1000 steps; SD's PeRFlow (K = 4) 1003 (the issue's --steps 1001 and 10000)."""
    assert perflow.max_inference_steps(PeRFlowConfig(num_time_windows=1)) == 1000
    assert perflow.max_inference_steps(PeRFlowConfig(num_time_windows=4)) == 1003


@pytest.mark.parametrize("kwargs,match", [
    ({"beta_start": 0.02, "beta_end": 0.01}, "exceeds beta_end"),
    ({"beta_start": float("nan")}, "beta_start must be a finite number"),
    ({"t_clean": float("inf")}, "t_clean must be a finite number"),
    ({"num_time_windows": 1001}, "num_time_windows=1001 is too many"),
    ({"num_time_windows": 4.0}, "num_time_windows must be a positive integer"),
])
def test_bad_numbers_in_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PeRFlowConfig(**kwargs)


def test_step_counts_accept_numpy_integers() -> None:
    cfg = PeRFlowConfig()
    assert perflow.set_timesteps(cfg, np.int64(4)).num_inference_steps == 4
    for bad in (4.0, True, "4"):
        with pytest.raises(TypeError, match="num_inference_steps must be an int"):
            perflow.set_timesteps(cfg, bad)
