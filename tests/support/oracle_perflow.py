"""An independent float64 NumPy oracle of the reference PeRFlow scheduler's formulas.

Written from the formulas (arXiv 2405.07510 and the reference scheduler's documented behaviour) with plain
loops; it shares no code with perflow_jax. Used only by the tests.
"""

from __future__ import annotations

import math

import numpy as np


def betas(num_train: int, schedule: str, beta_start: float, beta_end: float, trained=None) -> np.ndarray:
    if trained is not None:
        return np.array(trained, dtype=np.float64)
    out = np.zeros(num_train)
    for i in range(num_train):
        frac = i / (num_train - 1)
        if schedule == "linear":
            out[i] = beta_start + frac * (beta_end - beta_start)
        elif schedule == "scaled_linear":
            out[i] = (math.sqrt(beta_start) + frac * (math.sqrt(beta_end) - math.sqrt(beta_start))) ** 2
        elif schedule == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            out[i] = min(1 - f((i + 1) / num_train) / f(i / num_train), 0.999)
        else:
            raise ValueError(schedule)
    return out


class Oracle:
    def __init__(self, K: int, prediction_type: str, schedule: str = "scaled_linear", num_train: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, trained=None, t_clean: float = 0.0):
        self.K, self.T, self.pred = K, num_train, prediction_type
        # The reference stores β as a float32 tensor; the oracle mirrors that one storage step (it moves ᾱ by
        # up to ~2e-5 relative for the cosine schedule) and computes everything else in float64.
        b = betas(num_train, schedule, beta_start, beta_end, trained).astype(np.float32).astype(np.float64)
        self.ac = np.ones(num_train)
        prod = 1.0
        for i in range(num_train):
            prod *= 1.0 - b[i]
            self.ac[i] = prod
        self.starts = [(K - j) / K for j in range(K)]
        self.ends = self.starts[1:] + [t_clean]

    def timesteps(self, n: int) -> list[int]:
        n = max(n, self.K)
        ts = []
        for w in range(self.K):
            m = n // self.K + (1 if w < n % self.K else 0)
            # The spec is np.linspace's own rounding (e.g. K=1, n=5 gives 0.3999… → 399, not 400).
            for tp in np.linspace(self.starts[w], self.ends[w], m, endpoint=False):
                ts.append(int(tp * self.T))
        return ts

    def window(self, tp: float) -> tuple[float, float]:
        w = 0
        while w < self.K - 1 and tp - 0.1 / self.T <= self.ends[w]:
            w += 1
        return self.starts[w], self.ends[w]

    def coefficients(self, tp: float) -> tuple[float, float, float, float]:
        """(t_s, t_e, λ_t, η_t) at time point tp."""
        ts, te = self.window(tp)
        a_s = self.ac[int(ts * self.T - 1)]
        a_e = self.ac[max(int(te * self.T - 1), 0)]
        if self.pred == "ddim_eps":
            lam_s = math.sqrt(a_e / a_s)
            eta_s = math.sqrt(1 - a_e) - math.sqrt(a_e / a_s * (1 - a_s))
        else:
            g = math.sqrt(a_s / a_e)
            lam_s, eta_s = 1 / g, -math.sqrt(1 - g * g) / g
        den = lam_s * (tp - ts) + (te - tp)
        return ts, te, lam_s * (te - ts) / den, eta_s * (te - tp) / den

    def velocity(self, out: np.ndarray, x: np.ndarray, tp: float) -> np.ndarray:
        if self.pred == "velocity":
            return out
        ts, te, lam, eta = self.coefficients(tp)
        return (lam * x + eta * out - x) / (te - tp)

    def trajectory(self, x: np.ndarray, n: int, model) -> list[np.ndarray]:
        ts = self.timesteps(n)
        xs = []
        for i, t in enumerate(ts):
            nxt = ts[i + 1] if i + 1 < len(ts) else 0
            x = x + (nxt - t) / self.T * self.velocity(model(x, t), x, t / self.T)
            xs.append(x)
        return xs

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        a = self.ac[t - 1]
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
