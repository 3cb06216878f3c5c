"""The sampling loop and the one classifier-free-guidance combiner (perflow_jax.sampling).

Tolerances: the guidance combiner is checked against a float64 NumPy oracle of u + w·(c − u); float32
rounding of O(1) values over two products stays below 1e-6. The jitted loop is checked against an eager Python
loop over the same step: XLA fuses the compiled step's float32 ops differently, and over 5 steps whose samples
grow to |x| ≈ 20 that moves the last few bits (3e-6 relative seen), so the bound is 1e-5 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import sampling, schedulers

SHAPE = (3, 2, 4, 4)


def model_np(x: np.ndarray, t: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """A fixed nonlinear model of (sample, per-sample timestep, context), float64."""
    tb = t.reshape(-1, 1, 1, 1) / 1000.0
    return 0.6 * x * np.cos(tb) + 0.3 * np.sin(2 * x) + ctx[:, :, None, None] * (1 + tb)


def model_jnp(x: jax.Array, t: jax.Array, ctx: jax.Array) -> jax.Array:
    tb = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1) / 1000.0
    return 0.6 * x * jnp.cos(tb) + 0.3 * jnp.sin(2 * x) + ctx[:, :, None, None] * (1 + tb)


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.standard_normal((SHAPE[0], SHAPE[1])).astype(np.float32)
    uncond = rng.standard_normal((SHAPE[0], SHAPE[1])).astype(np.float32)
    return x, cond, uncond


@pytest.mark.parametrize("scale", [4.5, np.array([1.0, 2.5, 7.5], np.float32)])
def test_guided_per_sample_timesteps_matches_oracle(scale) -> None:
    """Each sample at its own timestep (the solver's case) with a scalar or per-sample guidance scale."""
    x, cond, uncond = _inputs()
    t = np.array([999, 500, 3], np.int32)
    got = jax.jit(sampling.guided(model_jnp, jnp.asarray(uncond), scale))(jnp.asarray(x), jnp.asarray(t),
                                                                           jnp.asarray(cond))
    x64 = x.astype(np.float64)
    u, c = model_np(x64, t, uncond.astype(np.float64)), model_np(x64, t, cond.astype(np.float64))
    w = np.broadcast_to(np.asarray(scale, np.float64), (3,)).reshape(-1, 1, 1, 1)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), u + w * (c - u), atol=1e-6, rtol=1e-6)


def test_cfg_denoiser_is_guided_with_a_shared_timestep() -> None:
    """The loop's denoiser and the solver's guided model are one combiner: bit-identical results."""
    x, cond, uncond = map(jnp.asarray, _inputs())
    den = sampling.classifier_free_guidance(model_jnp, cond, uncond, 3.0)
    fn = sampling.guided(model_jnp, uncond, 3.0)
    a = den(x, jnp.int32(250), jnp.int32(0))
    b = fn(x, jnp.full((3,), 250, jnp.int32), cond)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Guidance 1 is the conditional model (to rounding), and conditional() is exactly the model in float32.
    one = sampling.classifier_free_guidance(model_jnp, cond, uncond, 1.0)(x, jnp.int32(250), 0)
    plain = sampling.conditional(model_jnp, cond)(x, jnp.int32(250), 0)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(model_jnp(x, jnp.full((3,), 250), cond)))
    np.testing.assert_allclose(np.asarray(one), np.asarray(plain), atol=1e-6)


def test_guidance_accepts_pytree_conditions() -> None:
    """Conditions are pytrees (e.g. SDXL's text embeddings plus pooled embeds and time ids)."""
    x, cond, uncond = map(jnp.asarray, _inputs())

    def model(xb, t, c):
        return model_jnp(xb, t, c["a"]) + c["b"][:, None, None, None]

    c_tree = {"a": cond, "b": jnp.arange(3.0)}
    u_tree = {"a": uncond, "b": jnp.zeros(3)}
    got = sampling.guided(model, u_tree, 2.0)(x, jnp.int32(10), c_tree)
    u, c = model(x, jnp.full((3,), 10), u_tree), model(x, jnp.full((3,), 10), c_tree)
    np.testing.assert_allclose(np.asarray(got), np.asarray(u + 2.0 * (c - u)), atol=1e-6)


def test_init_latents_scaled_and_seeded() -> None:
    sched = schedulers.get("euler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    state = sched.set_timesteps(4)
    a = sampling.init_latents(jax.random.key(1), SHAPE, sched, state)
    b = sampling.init_latents(jax.random.key(1), SHAPE, sched, state)
    unit = jax.random.normal(jax.random.key(1), SHAPE, jnp.float32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(unit) * float(sched.init_noise_sigma(state)), rtol=1e-6)
    assert float(sched.init_noise_sigma(state)) > 1.0  # Euler starts at σ_max: the scaling is exercised
    assert sampling.init_latents(jax.random.key(1), SHAPE, sched, state, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["perflow", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("start", [0, 2])
def test_scan_loop_equals_eager_loop(name: str, start: int) -> None:
    """sample() (lax.scan under jit, from start_step) equals a plain Python loop over step()."""
    sched = schedulers.get(name)
    state = sched.set_timesteps(5, sample_shape=SHAPE)
    x, cond, _ = map(jnp.asarray, _inputs())
    den = sampling.conditional(model_jnp, cond)
    got = jax.jit(lambda s, x: sampling.sample(sched, s, den, x, start_step=start))(state, x)
    st, xe = state, x
    for i in range(start, 5):
        out = den(sched.scale_model_input(st, xe, i), st.timesteps[i], i)
        xe, st = sched.step(st, out, i, xe)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xe), rtol=1e-5, atol=1e-5)


def test_trajectory_and_vmap() -> None:
    sched = schedulers.get("perflow")
    state = sched.set_timesteps(4)
    x, cond, _ = map(jnp.asarray, _inputs())
    den = sampling.conditional(model_jnp, cond)
    final, traj = sampling.sample(sched, state, den, x, return_trajectory=True)
    assert traj.shape == (4, *SHAPE)
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(final))


def test_ancestral_needs_a_key_and_is_seeded() -> None:
    sched = schedulers.get("euler_ancestral")
    state = sched.set_timesteps(4)
    x, cond, _ = map(jnp.asarray, _inputs())
    den = sampling.conditional(model_jnp, cond)
    a = sampling.sample(sched, state, den, x, key=jax.random.key(3))
    b = sampling.sample(sched, state, den, x, key=jax.random.key(3))
    c = sampling.sample(sched, state, den, x, key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sampling.sample(sched, state, den, x)


@pytest.mark.parametrize("start", [-1, 4, 9])
def test_start_step_out_of_range(start: int) -> None:
    sched = schedulers.get("perflow")
    state = sched.set_timesteps(4)
    with pytest.raises(ValueError, match="start_step"):
        sampling.sample(sched, state, lambda x, t, i: x, jnp.zeros(SHAPE), start_step=start)
