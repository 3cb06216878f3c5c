"""The diffusers scheduler family (DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++, UniPC, LCM) against
diffusers' PyTorch schedulers.

Parity: whole trajectories for 4, 10 and 25 steps, the same model (a fixed function of sample and timestep)
on both sides, the same configs (the torch scheduler is built from our ``to_dict``), and for stochastic steps
the same noise: each step's N(0, 1) draw comes from the JAX key the JAX step gets, and diffusers'
``randn_tensor`` is patched to return exactly those values. Bound: max |Δ| ≤ 1e-5 in float32 (measured
≲ 5e-6, printed with ``-s``); the JAX side runs eager, step by step. A few tests then run the jitted
``lax.scan`` loop of :func:`perflow_jax.sampling.sample` and check it compiles once.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax import sampling, schedulers
from perflow_jax.schedulers import common, ddim, ddpm, dpmpp_2m, euler, euler_ancestral, lcm, unipc

diffusers.utils.logging.set_verbosity_error()

T = 1000
SHAPE = (2, 4, 4, 4)
TOL = 1e-5
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TORCH_MODULES = {
    "ddim": "scheduling_ddim",
    "ddpm": "scheduling_ddpm",
    "euler": "scheduling_euler_discrete",
    "euler_ancestral": "scheduling_euler_ancestral_discrete",
    "dpmpp_2m": "scheduling_dpmsolver_multistep",
    "unipc": "scheduling_unipc_multistep",
    "lcm": "scheduling_lcm",
}
# Options diffusers takes per step() call that are config fields here.
STEP_KWARGS = {"ddim": ("eta", "use_clipped_model_output"), "euler": ("s_churn", "s_tmin", "s_tmax", "s_noise")}


def model_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tf = t.to(torch.float32)
    return 0.7 * x * torch.cos(tf / T) + 0.2 * torch.sin(x)


def model_jax(x: jax.Array, t: jax.Array) -> jax.Array:
    tf = jnp.asarray(t).astype(jnp.float32)
    return 0.7 * x * jnp.cos(tf / T) + 0.2 * jnp.sin(x)


def torch_scheduler(sched: schedulers.Scheduler) -> Any:
    """diffusers' scheduler with the same config (through our ``to_dict``)."""
    cls = getattr(diffusers, sched.config.class_name)
    return cls.from_config(sched.config.to_dict())


def torch_trajectory(sched: schedulers.Scheduler, n: int, latents: np.ndarray, noises: list[np.ndarray],
                     monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, list[np.ndarray]]:
    """(timesteps, the sample after each step) from diffusers, with step i's noise = ``noises[i]``."""
    ts = torch_scheduler(sched)
    ts.set_timesteps(n)
    current = {"i": 0}

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **kw: Any):
        return torch.from_numpy(np.array(noises[current["i"]])).to(dtype or torch.float32)

    monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{TORCH_MODULES[sched.name]}"),
                        "randn_tensor", fake_randn, raising=False)
    step_kw = {k: getattr(sched.config, k) for k in STEP_KWARGS.get(sched.name, ())}
    x = torch.from_numpy(latents) * ts.init_noise_sigma
    out = []
    for i, t in enumerate(ts.timesteps):
        current["i"] = i
        x = ts.step(model_torch(ts.scale_model_input(x, t), t), t, x, **step_kw).prev_sample
        out.append(x.numpy().copy())
    monkeypatch.undo()
    return ts.timesteps.numpy(), out


def step_keys(seed: int, n: int) -> jax.Array:
    """One key per step, split exactly as :func:`sampling.sample` splits its key."""
    return jax.random.split(jax.random.key(seed), n)


def check_trajectory(name: str, n: int, monkeypatch: pytest.MonkeyPatch, seed: int = 0, **cfg: Any) -> float:
    """Eager JAX steps vs diffusers for one config; asserts the timesteps and returns the max |Δ|."""
    sched = schedulers.get(name, **cfg)
    state = sched.set_timesteps(n, sample_shape=SHAPE)
    latents = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    keys = step_keys(seed, state.timesteps.shape[0])
    noises = [np.asarray(common.step_noise(k, SHAPE, name)) for k in keys]
    ref_t, ref = torch_trajectory(sched, n, latents, noises, monkeypatch)
    if np.issubdtype(ref_t.dtype, np.integer):
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref_t)
    else:  # float timesteps from log-σ interpolation may differ in the last bit
        np.testing.assert_allclose(np.asarray(state.timesteps), ref_t, rtol=1e-6)
    x = jnp.asarray(latents) * sched.init_noise_sigma(state)
    worst = 0.0
    for i, r in enumerate(ref):
        out = model_jax(sched.scale_model_input(state, x, i), state.timesteps[i])
        x, state = sched.step(state, out, i, x, keys[i])
        assert np.all(np.isfinite(np.asarray(x))) and np.all(np.isfinite(r)), f"non-finite at step {i}"
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - r))))
    return worst


PRED3 = ("epsilon", "v_prediction", "sample")
PRED2 = ("epsilon", "v_prediction")
CASES = {  # id: (scheduler, config, prediction types)
    "ddim/sd-leading": ("ddim", {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, PRED3),
    "ddim/linspace-clip": ("ddim", {"timestep_spacing": "linspace"}, PRED2),
    "ddim/trailing-eta1": ("ddim", {**SD, "clip_sample": False, "timestep_spacing": "trailing", "eta": 1.0}, PRED2),
    "ddim/eta-clipped-output": ("ddim", {"eta": 0.5, "use_clipped_model_output": True}, ("epsilon",)),
    "ddim/thresholding": ("ddim", {"thresholding": True, "sample_max_value": 1.5}, ("epsilon",)),
    "ddim/cosine-zero-snr": ("ddim", {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True,
                                      "timestep_spacing": "trailing", "clip_sample": False}, ("v_prediction",)),
    "ddpm/sd": ("ddpm", {**SD, "clip_sample": False}, PRED3),
    "ddpm/fixed-large-trailing": ("ddpm", {"variance_type": "fixed_large", "timestep_spacing": "trailing"},
                                  ("epsilon",)),
    "ddpm/small-log-linspace": ("ddpm", {"variance_type": "fixed_small_log", "timestep_spacing": "linspace"},
                                ("epsilon",)),
    "euler/sd": ("euler", SD, PRED3),
    "euler/karras-leading": ("euler", {**SD, "use_karras_sigmas": True, "timestep_spacing": "leading",
                                       "steps_offset": 1}, PRED2),
    "euler/churn-trailing-sigma_min": ("euler", {**SD, "s_churn": 1.0, "s_tmin": 0.5, "timestep_spacing": "trailing",
                                                 "final_sigmas_type": "sigma_min"}, ("epsilon",)),
    "euler/exponential-continuous": ("euler", {**SD, "use_exponential_sigmas": True,
                                               "timestep_type": "continuous"}, ("v_prediction",)),
    "euler/beta-sigmas": ("euler", {**SD, "use_beta_sigmas": True}, ("epsilon",)),
    "euler_ancestral/sd": ("euler_ancestral", SD, PRED2),
    "euler_ancestral/leading": ("euler_ancestral", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, PRED2),
    "dpmpp_2m/sd": ("dpmpp_2m", SD, PRED3),
    "dpmpp_2m/karras": ("dpmpp_2m", {**SD, "use_karras_sigmas": True}, PRED2),
    "dpmpp_2m/heun-sigma_min-no-lower-final": ("dpmpp_2m", {**SD, "solver_type": "heun", "lower_order_final": False,
                                                            "final_sigmas_type": "sigma_min"}, ("epsilon",)),
    "dpmpp_2m/order3-leading": ("dpmpp_2m", {**SD, "solver_order": 3, "timestep_spacing": "leading",
                                             "steps_offset": 1}, ("epsilon",)),
    "dpmpp_2m/sde-karras": ("dpmpp_2m", {**SD, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
                            ("epsilon",)),
    "dpmpp_2m/karras-sigma_min": ("dpmpp_2m", {**SD, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
                                  ("epsilon",)),  # the last step does not move σ: identity
    "dpmpp_2m/clipped-lambda-leading": ("dpmpp_2m", {**SD, "lambda_min_clipped": -5.1, "timestep_spacing": "leading"},
                                        ("epsilon",)),
    "dpmpp_2m/thresholding": ("dpmpp_2m", {**SD, "thresholding": True, "sample_max_value": 1.2}, ("sample",)),
    "dpmpp_2m/order1-trailing": ("dpmpp_2m", {**SD, "solver_order": 1, "timestep_spacing": "trailing"},
                                 ("epsilon",)),
    "unipc/sd": ("unipc", SD, PRED3),
    "unipc/karras-order3": ("unipc", {**SD, "use_karras_sigmas": True, "solver_order": 3}, ("epsilon",)),
    "unipc/bh1-eps-space-sigma_min": ("unipc", {**SD, "solver_type": "bh1", "predict_x0": False,
                                                "final_sigmas_type": "sigma_min"}, PRED2),
    "unipc/karras-sigma_min": ("unipc", {**SD, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
                               ("epsilon",)),
    "unipc/disable-corrector-trailing": ("unipc", {**SD, "disable_corrector": [0, 2],
                                                   "timestep_spacing": "trailing"}, ("epsilon",)),
    "lcm/default": ("lcm", {}, PRED3),
    "lcm/clip-scaling": ("lcm", {"clip_sample": True, "timestep_scaling": 5.0, "original_inference_steps": 30},
                         ("epsilon",)),
}
GRID = [pytest.param(case, pred, id=f"{case}/{pred}") for case, (_, _, preds) in CASES.items() for pred in preds]


@pytest.mark.parametrize("case,pred", GRID)
def test_trajectories_match_diffusers(case: str, pred: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, cfg, _ = CASES[case]
    diffs = {n: check_trajectory(name, n, monkeypatch, prediction_type=pred, **cfg) for n in (4, 10, 25)}
    print(f"{case}/{pred}: " + ", ".join(f"n={n}: {d:.1e}" for n, d in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


# ----------------------------------------------------------------------------------------------------------
# The jitted lax.scan loop
# ----------------------------------------------------------------------------------------------------------

JIT_CASES = {
    "ddim": {**SD, "clip_sample": False, "eta": 0.3},
    "ddpm": {**SD, "clip_sample": False},
    "euler": {**SD, "use_karras_sigmas": True},
    "euler_ancestral": SD,
    "dpmpp_2m": {**SD, "use_karras_sigmas": True},
    "unipc": SD,
    "lcm": {},
}


@pytest.mark.parametrize("name", list(JIT_CASES))
def test_jitted_sampling_loop_compiles_once_and_matches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sampling.sample under jit: one trace/compile for two different inputs, each matching diffusers."""
    sched = schedulers.get(name, **JIT_CASES[name])
    n = 10
    state = sched.set_timesteps(n, sample_shape=SHAPE)
    traces = []

    def denoise(x: jax.Array, t: jax.Array, i: jax.Array) -> jax.Array:
        return model_jax(x, t)

    @jax.jit
    def run(state: Any, latents: jax.Array, key: jax.Array) -> jax.Array:
        traces.append(1)
        return sampling.sample(sched, state, denoise, latents * sched.init_noise_sigma(state), key=key)

    for seed in (1, 2):
        latents = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
        keys = step_keys(seed, n)
        noises = [np.asarray(common.step_noise(k, SHAPE, name)) for k in keys]
        _, ref = torch_trajectory(sched, n, latents, noises, monkeypatch)
        out = run(state, jnp.asarray(latents), jax.random.key(seed))
        diff = float(np.max(np.abs(np.asarray(out) - ref[-1])))
        print(f"{name} jit seed {seed}: {diff:.1e}")
        assert diff <= TOL
    assert len(traces) == 1 and run._cache_size() == 1


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler"])
def test_start_step_matches_diffusers_begin_index(name: str) -> None:
    """img2img: sampling.sample(start_step=s) against diffusers' set_begin_index(s) loop (multistep warm-up
    restarts at s: the order counter lives in the state, not in the step index)."""
    n, start = 10, 4
    sched = schedulers.get(name, **SD, **({"use_karras_sigmas": True} if name != "unipc" else {}))
    state = sched.set_timesteps(n, sample_shape=SHAPE)
    latents = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    ts = torch_scheduler(sched)
    ts.set_timesteps(n)
    ts.set_begin_index(start)
    x = torch.from_numpy(latents)
    for t in ts.timesteps[start:]:
        x = ts.step(model_torch(ts.scale_model_input(x, t), t), t, x).prev_sample
    out = sampling.sample(sched, state, lambda x, t, i: model_jax(x, t), jnp.asarray(latents), start_step=start)
    diff = float(np.max(np.abs(np.asarray(out) - x.numpy())))
    print(f"{name} start_step={start}: {diff:.1e}")
    assert diff <= TOL


def test_multistep_history_is_a_fixed_shape_carry() -> None:
    """The state a multistep step returns has the same tree, shapes and dtypes as the one it got."""
    for name in ("dpmpp_2m", "unipc"):
        sched = schedulers.get(name, solver_order=3)
        state = sched.set_timesteps(6, sample_shape=SHAPE)
        x = jnp.ones(SHAPE, jnp.bfloat16)
        out, new = sched.step(state, x, 0, x)
        assert out.dtype == jnp.bfloat16
        assert jax.tree.structure(new) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_low_precision_samples_use_float32_math() -> None:
    """bfloat16 in, bfloat16 out; the step itself is the float32 step rounded once."""
    sched = schedulers.get("euler", **SD)
    state = sched.set_timesteps(5)
    x = jax.random.normal(jax.random.key(0), SHAPE).astype(jnp.bfloat16)
    eps = model_jax(x.astype(jnp.float32), 900.0)
    low, _ = sched.step(state, eps.astype(jnp.bfloat16), 1, x)
    high, _ = sched.step(state, eps.astype(jnp.bfloat16).astype(jnp.float32), 1, x.astype(jnp.float32))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(low), np.asarray(high.astype(jnp.bfloat16)))


# ----------------------------------------------------------------------------------------------------------
# add_noise, init_noise_sigma
# ----------------------------------------------------------------------------------------------------------

ADD_NOISE_CASES = {
    "ddim": SD, "ddpm": {}, "lcm": {}, "euler": {**SD, "timestep_spacing": "leading"},
    "euler_ancestral": SD, "dpmpp_2m": {**SD, "use_karras_sigmas": True}, "unipc": SD,
}


@pytest.mark.parametrize("name", list(ADD_NOISE_CASES))
def test_add_noise_and_init_noise_sigma_match_diffusers(name: str) -> None:
    sched = schedulers.get(name, **ADD_NOISE_CASES[name])
    state = sched.set_timesteps(8, sample_shape=SHAPE)
    ts = torch_scheduler(sched)
    ts.set_timesteps(8)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t = ts.timesteps[[1, 5]]
    ref = ts.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    out = sched.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t.numpy()), state)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched.init_noise_sigma(state)), float(ts.init_noise_sigma), rtol=1e-6)


def test_add_noise_errors() -> None:
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"timesteps in \[0, 999\]"):
        schedulers.get("ddim").add_noise(x, x, jnp.array([1000, 3]))
    euler_sched = schedulers.get("euler")
    with pytest.raises(ValueError, match="needs the state"):
        euler_sched.add_noise(x, x, jnp.array([999.0, 3.0]))
    with pytest.raises(ValueError, match="not all in the schedule"):
        euler_sched.add_noise(x, x, jnp.array([998.5, 3.0]), euler_sched.set_timesteps(4))


# ----------------------------------------------------------------------------------------------------------
# Errors at the API boundary
# ----------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (ddim.DDIMConfig, {"timestep_spacing": "evenly"}, "timestep_spacing"),
    (ddim.DDIMConfig, {"prediction_type": "flow_prediction"}, "prediction_type"),
    (ddim.DDIMConfig, {"beta_schedule": "sigmoid"}, "beta_schedule"),
    (ddim.DDIMConfig, {"eta": -0.1}, "eta"),
    (ddim.DDIMConfig, {"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    (ddpm.DDPMConfig, {"variance_type": "learned_range"}, "variance_type"),
    (ddpm.DDPMConfig, {"steps_offset": -1}, "steps_offset"),
    (euler.EulerConfig, {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "Only one of"),
    (euler.EulerConfig, {"interpolation_type": "log_linear"}, "interpolation_type"),
    (euler.EulerConfig, {"final_sigmas_type": "one"}, "final_sigmas_type"),
    (euler_ancestral.EulerAncestralConfig, {"prediction_type": "sample"}, "prediction_type"),
    (dpmpp_2m.DPMSolverConfig, {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    (dpmpp_2m.DPMSolverConfig, {"solver_order": 4}, "solver_order"),
    (dpmpp_2m.DPMSolverConfig, {"use_lu_lambdas": True}, "use_lu_lambdas=True is not supported"),
    (dpmpp_2m.DPMSolverConfig, {"variance_type": "learned_range"}, "variance_type"),
    (unipc.UniPCConfig, {"predict_x0": False}, "final_sigmas_type='sigma_min'"),
    (unipc.UniPCConfig, {"lower_order_final": False}, "final_sigmas_type='sigma_min'"),
    (unipc.UniPCConfig, {"use_flow_sigmas": True}, "use_flow_sigmas"),
    (lcm.LCMConfig, {"original_inference_steps": 0}, "original_inference_steps"),
    (lcm.LCMConfig, {"timestep_scaling": 0.0}, "timestep_scaling"),
]


@pytest.mark.parametrize("cls,kw,match", BAD_CONFIGS, ids=[f"{c.__name__}-{m}" for c, _, m in BAD_CONFIGS])
def test_bad_config_values_are_rejected(cls: type, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kw)
    with pytest.raises(ValueError, match=match):  # the JSON route validates too
        cls.from_dict({"_class_name": cls.class_name, **kw})


def test_bad_step_counts() -> None:
    for name in TORCH_MODULES:
        sched = schedulers.get(name)
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(0)
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(T + 1)
    with pytest.raises(ValueError, match="distillation grid"):
        schedulers.get("lcm").set_timesteps(51)
    with pytest.raises(ValueError, match="strength"):
        schedulers.get("lcm").set_timesteps(4, strength=0.0)


@pytest.mark.parametrize("name,cfg", [("ddpm", {}), ("euler_ancestral", {}), ("lcm", {}), ("ddim", {"eta": 1.0}),
                                      ("euler", {"s_churn": 1.0}),
                                      ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"})])
def test_stochastic_steps_need_a_key(name: str, cfg: dict[str, Any]) -> None:
    sched = schedulers.get(name, **cfg)
    state = sched.set_timesteps(4, sample_shape=SHAPE)
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="PRNG key"):
        sched.step(state, x, 0, x)
    sched.step(state, x, 0, x, jax.random.key(0))  # fine with one


def test_deterministic_steps_ignore_the_key() -> None:
    for name in ("ddim", "euler", "dpmpp_2m", "unipc"):
        sched = schedulers.get(name)
        state = sched.set_timesteps(4, sample_shape=SHAPE)
        x = jnp.ones(SHAPE)
        a, _ = sched.step(state, x, 1, x)
        b, _ = sched.step(state, x, 1, x, jax.random.key(3))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_multistep_state_needs_the_sample_shape() -> None:
    for name in ("dpmpp_2m", "unipc"):
        sched = schedulers.get(name)
        state = sched.set_timesteps(4)
        x = jnp.ones(SHAPE)
        with pytest.raises(ValueError, match="sample_shape=latents.shape"):
            sched.step(state, x, 0, x)


def test_step_argument_checks() -> None:
    sched = schedulers.get("ddim")
    state = sched.set_timesteps(4)
    x = jnp.ones(SHAPE)
    with pytest.raises(IndexError, match="outside 0..3"):
        sched.step(state, x, 4, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        sched.step(state, x[:1], 0, x)


# ----------------------------------------------------------------------------------------------------------
# Configs and the registry
# ----------------------------------------------------------------------------------------------------------

CLASS_NAMES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "lcm": "LCMScheduler",
}


@pytest.mark.parametrize("name", list(CLASS_NAMES))
def test_registry_picks_the_scheduler_from_diffusers_configs(name: str) -> None:
    cls_name = CLASS_NAMES[name]
    assert schedulers.resolve_name(cls_name) == name
    assert schedulers.get(cls_name).name == name
    ts = getattr(diffusers, cls_name)(**SD)
    saved = json.loads(ts.to_json_string())  # what scheduler_config.json holds (with _class_name)
    sched = schedulers.from_config(saved)
    assert sched.name == name
    assert sched.config == schedulers.get(name, **SD).config
    # diffusers' in-memory `scheduler.config` lacks _class_name: name it.
    assert schedulers.from_config(ts.config, name=cls_name).config == sched.config
    # Defaults mirror diffusers' constructor for every field both have.
    ours = dataclasses.asdict(schedulers.get(name).config)
    theirs = dict(getattr(diffusers, cls_name)().config)
    for key in ours.keys() & theirs.keys():
        value = list(ours[key]) if isinstance(ours[key], tuple) else ours[key]
        assert value == theirs[key], key


def test_config_round_trip_and_unknown_keys(tmp_path: Any) -> None:
    sd15 = {  # Stable Diffusion 1.5's scheduler_config.json (a PNDM config) used for another scheduler
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    }
    (tmp_path / "scheduler_config.json").write_text(json.dumps(sd15))
    cfg = ddim.DDIMConfig.from_json(tmp_path)
    assert (cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (1, False, False)
    assert schedulers.from_config(sd15, name="dpmpp_2m").config.steps_offset == 1
    for name in CLASS_NAMES:
        c = schedulers.get(name, trained_betas=list(np.linspace(1e-4, 0.02, T))).config
        hash(c)
        assert type(c).from_dict(json.loads(json.dumps(c.to_dict()))) == c
    u = unipc.UniPCConfig.from_dict({"disable_corrector": [1, 3]})
    assert u.disable_corrector == (1, 3)
    assert dpmpp_2m.DPMSolverConfig(solver_type="bh2").solver_type == "midpoint"  # as diffusers maps it
