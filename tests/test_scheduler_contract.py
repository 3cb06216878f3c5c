"""Every registered scheduler satisfies the contract of :mod:`perflow_jax.schedulers.base`.

One table over ``schedulers.available()``, so a newly registered scheduler is covered without editing this
file: the bundle's fields are its module's five functions bound to the config, with the contract's
parameters; ``step`` returns ``(sample, state)`` in the sample's shape and dtype with a state of the same
tree (a scan carry); the jitted ``lax.scan`` loop with a traced step index equals the eager loop;
``add_noise`` keeps the sample's shape and dtype.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import sampling, schedulers
from perflow_jax.schedulers import base

SHAPE = (2, 4, 8, 8)
STEPS = 4
P = inspect.Parameter
POS, KW = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY
# (name, kind, default) of each function's parameters, as the contract fixes them.
SIGNATURES = {
    "set_timesteps": [("config", POS, P.empty), ("num_inference_steps", POS, P.empty), ("sample_shape", KW, None)],
    "step": [("config", POS, P.empty), ("state", POS, P.empty), ("model_output", POS, P.empty),
             ("step_index", POS, P.empty), ("sample", POS, P.empty), ("key", POS, None)],
    "add_noise": [("config", POS, P.empty), ("original", POS, P.empty), ("noise", POS, P.empty),
                  ("timesteps", POS, P.empty), ("state", POS, None)],
    "scale_model_input": [("config", POS, P.empty), ("state", POS, P.empty), ("sample", POS, P.empty),
                          ("step_index", POS, P.empty)],
    "init_noise_sigma": [("config", POS, P.empty), ("state", POS, P.empty)],
}


def linear_model(x: jax.Array, t: jax.Array) -> jax.Array:
    """A tiny model, linear in the sample, with a timestep dependence; float32 out whatever x's dtype."""
    return 0.5 * x.astype(jnp.float32) + 1e-4 * jnp.asarray(t, jnp.float32)


def set_timesteps(sched: schedulers.Scheduler) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # STEPS must suit every default config (PeRFlow warns below K steps)
        return sched.set_timesteps(STEPS, sample_shape=SHAPE)


def same_tree(a: Any, b: Any) -> bool:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        (x.shape, x.dtype) == (y.shape, y.dtype) for x, y in leaves)


@pytest.fixture(params=schedulers.available())
def sched(request: pytest.FixtureRequest) -> schedulers.Scheduler:
    return schedulers.get(request.param)


def test_every_builtin_scheduler_is_registered() -> None:
    assert set(schedulers.available()) >= {"perflow", "ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m",
                                             "unipc", "lcm"}


def test_bundle_binds_the_modules_contract_functions(sched: schedulers.Scheduler) -> None:
    assert isinstance(sched, base.Scheduler) and base.Scheduler._fields == ("name", "config", *base.FUNCTIONS)
    assert sched.name in schedulers.available() and schedulers.resolve_name(sched.config.class_name) == sched.name
    assert isinstance(sched.config, base.ConfigMixin) and hash(sched.config) == hash(type(sched.config)())
    module = sys.modules[type(sched.config).__module__]  # the scheduler's module defines its Config
    for field in base.FUNCTIONS:
        bound, fn = getattr(sched, field), getattr(module, field)
        assert isinstance(bound, functools.partial) and bound.func is fn and bound.args == (sched.config,), field
        params, want = inspect.signature(fn).parameters, SIGNATURES[field]
        where = f"{module.__name__}.{field}{inspect.signature(fn)}"
        assert [(n, params[n].kind, params[n].default) for n, *_ in want if n in params] == want, where
        assert [n for n, p in params.items() if p.kind != KW] == [n for n, k, _ in want if k == POS], where
        extra = [p for n, p in params.items() if n not in {n for n, *_ in want}]
        assert all(p.kind == KW and p.default is not P.empty for p in extra), f"{where}: extras must be optional"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_step_returns_sample_and_state(sched: schedulers.Scheduler, dtype: Any) -> None:
    state = set_timesteps(sched)
    assert state.timesteps.shape == (STEPS,)
    x = jax.random.normal(jax.random.key(0), SHAPE).astype(dtype)
    keys = jax.random.split(jax.random.key(1), STEPS)
    for i in range(STEPS):
        model_in = sched.scale_model_input(state, x, i)
        assert (model_in.shape, model_in.dtype) == (SHAPE, dtype)
        out, new = sched.step(state, linear_model(model_in, state.timesteps[i]).astype(dtype), i, x, keys[i])
        assert (out.shape, out.dtype) == (SHAPE, dtype)
        assert same_tree(new, state)
        x, state = out, new
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
    assert np.shape(sched.init_noise_sigma(state)) == ()


def test_jit_and_scan_match_the_eager_loop(sched: schedulers.Scheduler) -> None:
    state = set_timesteps(sched)
    x0 = jax.random.normal(jax.random.key(2), SHAPE) * sched.init_noise_sigma(state)
    key = jax.random.key(3)
    keys = jax.random.split(key, STEPS)  # as sampling.sample splits its key

    x, st = x0, state
    for i in range(STEPS):
        x, st = sched.step(st, linear_model(sched.scale_model_input(st, x, i), st.timesteps[i]), i, x, keys[i])

    @jax.jit
    def one_step(st: Any, x: jax.Array, i: jax.Array, k: jax.Array) -> tuple[jax.Array, Any]:
        return sched.step(st, linear_model(sched.scale_model_input(st, x, i), st.timesteps[i]), i, x, k)

    xj, stj = x0, state
    for i in range(STEPS):
        xj, stj = one_step(stj, xj, jnp.int32(i), keys[i])  # a traced step index: one compile for all steps
    assert one_step._cache_size() == 1

    scanned = jax.jit(lambda st, x, k: sampling.sample(sched, st, lambda x, t, i: linear_model(x, t), x, key=k))
    xs = scanned(state, x0, key)
    scale = max(1.0, float(jnp.max(jnp.abs(x))))
    np.testing.assert_allclose(np.asarray(xj), np.asarray(x), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(xs), np.asarray(x), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_add_noise_keeps_the_sample_shape(sched: schedulers.Scheduler, dtype: Any) -> None:
    state = set_timesteps(sched)
    x0 = jnp.ones(SHAPE, dtype)
    noise = jax.random.normal(jax.random.key(4), SHAPE).astype(dtype)
    for timesteps in (state.timesteps[jnp.array([0, STEPS - 1])], state.timesteps[1]):  # per sample, scalar
        noisy = sched.add_noise(x0, noise, timesteps, state)
        assert (noisy.shape, noisy.dtype) == (SHAPE, dtype)
        assert np.all(np.isfinite(np.asarray(noisy, np.float32)))


def test_bundle_names_what_a_module_lacks() -> None:
    module = types.ModuleType("my_scheduler")
    module.set_timesteps = module.step = lambda *a, **k: None
    with pytest.raises(TypeError, match="lacks add_noise, scale_model_input, init_noise_sigma"):
        base.bundle("mine", None, module)
