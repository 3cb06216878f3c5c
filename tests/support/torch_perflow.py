"""A small PyTorch transcription of the reference PeRFlow scheduler (written for these tests).

It follows the reference's float32 torch arithmetic step by step (window lookup per sample, ᾱ indexing,
λ/η formulas, dt from the timestep list) and is a diffusers ConfigMixin, so configs written by
perflow_jax's ``to_dict`` are read by the real diffusers config machinery.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


class TorchPeRFlowScheduler(SchedulerMixin, ConfigMixin):
    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, set_alpha_to_one: bool = False,
                 prediction_type: str = "ddim_eps", t_noise: float = 1, t_clean: float = 0,
                 num_time_windows: int = 4):
        T = num_train_timesteps
        if trained_betas is not None:
            b = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            b = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            b = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

            b = betas_for_alpha_bar(T)
        self.alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
        K = num_time_windows
        self.starts = [1.0 * i / K for i in range(1, K + 1)][::-1]
        self.ends = self.starts[1:] + [t_clean]
        self.timesteps = None

    def _window(self, tp: torch.Tensor):
        tol = 0.1 / self.config.num_train_timesteps
        s, e = torch.zeros_like(tp), torch.zeros_like(tp)
        for j in range(tp.numel()):
            w = 0
            while (tp.view(-1)[j] - tol) <= self.ends[w]:
                w += 1
            s.view(-1)[j], e.view(-1)[j] = self.starts[w], self.ends[w]
        return s, e

    def set_timesteps(self, n: int, device=None):
        K = self.config.num_time_windows
        n = max(n, K)
        pts = [np.linspace(self.starts[i], self.ends[i], num=n // K + (1 if i < n % K else 0), endpoint=False)
               for i in range(K)]
        self.timesteps = torch.from_numpy((np.concatenate(pts) * self.config.num_train_timesteps).astype(np.int64))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True):
        T = self.config.num_train_timesteps
        if self.config.prediction_type == "velocity":
            v = model_output
        else:
            t_c = timestep / T
            t_s, t_e = self._window(t_c)
            a_s = self.alphas_cumprod[(t_s * T - 1).long()]
            a_e = self.alphas_cumprod[torch.clamp((t_e * T - 1).long(), min=0)]
            if self.config.prediction_type == "ddim_eps":
                lam_s = (a_e / a_s) ** 0.5
                eta_s = (1 - a_e) ** 0.5 - (a_e / a_s * (1 - a_s)) ** 0.5
            else:
                g = (a_s / a_e) ** 0.5
                lam_s, eta_s = 1 / g, -1 * (1 - g**2) ** 0.5 / g
            den = lam_s * (t_c - t_s) + (t_e - t_c)
            lam_t, eta_t = lam_s * (t_e - t_s) / den, eta_s * (t_e - t_c) / den
            v = (lam_t * sample + eta_t * model_output - sample) / (t_e - (t_s + (t_c - t_s)))
        idx = int(torch.argwhere(self.timesteps == timestep)[0, 0])
        nxt = self.timesteps[idx + 1] if idx + 1 < len(self.timesteps) else 0
        dt = ((nxt - timestep) / T).to(sample.dtype)
        prev = sample + dt * v
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
