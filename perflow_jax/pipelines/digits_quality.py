"""Sample quality of the built-in digits models: a fixed feature classifier, Fréchet distance and accuracy.

The features are the 128 hidden ReLU units of a small MLP classifier (64 → 128 → 10) fitted once on the real
training digits (``scripts/eval_digits.py fit-classifier``) and shipped as ``assets/digits/classifier.npz``. It is
loaded, never refitted: a refit depends on the scikit-learn version and on BLAS threading, and every FD in
``docs/results.md`` and in the tests must come from the same feature space.

FD is the Fréchet distance between Gaussians fitted to the features of samples and of the held-out real
digits; accuracy is the classifier's agreement with the requested class. Samples are scored as displayed
(clipped to [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from perflow_jax.pipelines import digits

CLASSIFIER = os.path.join(digits.ASSETS, "classifier.npz")
HIDDEN = 128


@dataclasses.dataclass(frozen=True)
class FeatureClassifier:
    """The MLP's weights: hidden = relu(x·w1 + b1), logits = hidden·w2 + b2 on flattened 8×8 images."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def __post_init__(self) -> None:
        side = digits.IMAGE_SIZE**2
        shapes = {"w1": (side, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, digits.NUM_CLASSES),
                  "b2": (digits.NUM_CLASSES,)}
        for name, shape in shapes.items():
            a = getattr(self, name)
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise ValueError(f"classifier weight {name} must be a finite {shape} array, got {a.shape}.")

    @classmethod
    def load(cls, path: str = CLASSIFIER) -> FeatureClassifier:
        """The shipped (or another saved) classifier."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"No digits classifier at {path!r}; fit one with "
                                    "`python scripts/eval_digits.py fit-classifier`.")
        with np.load(path) as z:
            missing = {"w1", "b1", "w2", "b2"} - set(z.files)
            if missing:
                raise ValueError(f"{path!r} is not a digits classifier: it lacks {sorted(missing)}.")
            return cls(*(np.asarray(z[k], np.float64) for k in ("w1", "b1", "w2", "b2")))

    def save(self, path: str) -> None:
        """Write the weights (float32) atomically."""
        from perflow_jax.io import atomic_file

        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(getattr(self, k), np.float32) for k in ("w1", "b1", "w2", "b2")})

    def features(self, x: np.ndarray) -> np.ndarray:
        """(N, 128) hidden features of images (N, 1, 8, 8) or (N, 64) in [-1, 1]."""
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        return np.maximum(flat @ self.w1 + self.b1, 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.features(x) @ self.w2 + self.b2, axis=1)

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == np.asarray(labels)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets (N, D): |μa − μb|² + tr Σa + tr Σb − 2 tr √(Σa Σb)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr √(Σa Σb) = Σ √λ over the (real, non-negative) eigenvalues of Σa Σb.
    eig = np.linalg.eigvals(ca @ cb)
    tr_covmean = np.sum(np.sqrt(np.clip(np.real(eig), 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr_covmean)


class Scorer:
    """FD and accuracy of samples against the held-out digits, in the shipped classifier's features."""

    def __init__(self, classifier: FeatureClassifier | None = None):
        self.classifier = classifier or FeatureClassifier.load()
        x_test, self.test_labels = digits.load_digits_data("test")
        self.test_features = self.classifier.features(x_test)
        self.test_accuracy = self.classifier.accuracy(x_test, self.test_labels)

    def floor(self, n: int = 1000, seed: int = 0) -> float:
        """The real-vs-real FD: `n` real training digits against the held-out ones."""
        x_train, _ = digits.load_digits_data("train")
        pick = np.random.default_rng(seed).permutation(len(x_train))[:n]
        return frechet_distance(self.classifier.features(x_train[pick]), self.test_features)

    def score(self, samples: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """(FD, accuracy) of samples (N, 1, 8, 8) in [-1, 1] generated for class `labels` (N,)."""
        x = np.clip(np.asarray(samples, np.float64), -1.0, 1.0)
        if not np.all(np.isfinite(x)):
            raise ValueError("samples contain NaN or inf; nothing to score.")
        return frechet_distance(self.classifier.features(x), self.test_features), self.classifier.accuracy(x, labels)


def balanced_labels(n: int) -> np.ndarray:
    """`n` class labels, n/10 of each digit in order (n a multiple of 10)."""
    if n <= 0 or n % digits.NUM_CLASSES:
        raise ValueError(f"n must be a positive multiple of {digits.NUM_CLASSES}, got {n}.")
    return np.repeat(np.arange(digits.NUM_CLASSES), n // digits.NUM_CLASSES).astype(np.int32)


__all__ = ["CLASSIFIER", "FeatureClassifier", "Scorer", "balanced_labels", "frechet_distance"]
