"""The digits quality measure and the shipped models' pinned quality.

The FD's feature classifier is shipped (``assets/digits/classifier.npz``), never refitted at test time. The
pinned values are the ones ``docs/results.md`` documents for the shipped models (500 samples, 50 per class,
seed 0, 4 steps; the table there uses 1000 samples x 3 seeds): a change to sampling or to the weights moves
them far more than the tolerance, which only absorbs float32 reordering across XLA/BLAS builds (FD to 1 %,
accuracy to 1 sample in 100).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from perflow_jax.pipelines import digits
from perflow_jax.pipelines import digits_quality as dq

# (model, steps) -> (FD, accuracy) on 500 samples, seed 0: docs/results.md, "Pinned".
PINNED = {("perflow", 4): (3.2419, 0.838), ("guided", 4): (4.4592, 0.994)}
HELD_OUT_ACCURACY = 0.980


@pytest.fixture(scope="module")
def scorer():
    return dq.Scorer()


def test_frechet_distance_matches_a_float64_sqrtm_oracle():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * covmean)
    np.testing.assert_allclose(dq.frechet_distance(a, b), want, rtol=1e-9)  # both float64: eigvals vs sqrtm
    assert abs(dq.frechet_distance(a, a)) < 1e-9


def test_shipped_classifier_loads_and_scores_real_digits(scorer):
    assert scorer.test_accuracy == pytest.approx(HELD_OUT_ACCURACY, abs=1e-3)
    assert 0.5 < scorer.floor() < 2.0  # real vs real: small, not zero (1000 vs 400 samples)


def test_classifier_and_scorer_refuse_bad_input(tmp_path, scorer):
    with pytest.raises(FileNotFoundError, match="fit-classifier"):
        dq.FeatureClassifier.load(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "bad.npz", w1=np.zeros((64, 128)))
    with pytest.raises(ValueError, match="lacks"):
        dq.FeatureClassifier.load(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="w1"):
        dq.FeatureClassifier(np.zeros((64, 3)), np.zeros(128), np.zeros((128, 10)), np.zeros(10))
    x = np.zeros((10, 1, 8, 8))
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(x, np.arange(10))
    with pytest.raises(ValueError, match="multiple of 10"):
        dq.balanced_labels(15)


def test_save_load_round_trip(tmp_path, scorer):
    path = str(tmp_path / "clf.npz")
    scorer.classifier.save(path)
    back = dq.FeatureClassifier.load(path)
    x, _ = digits.load_digits_data("test")
    np.testing.assert_allclose(back.features(x), scorer.classifier.features(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which,steps", sorted(PINNED))
def test_shipped_model_quality_is_pinned(scorer, which, steps):
    fd_want, acc_want = PINNED[(which, steps)]
    pipe = digits.DigitsPipeline.from_builtin(which)
    labels = dq.balanced_labels(500)
    fd, acc = scorer.score(pipe.sample_float(labels, steps, seed=0), labels)
    assert fd == pytest.approx(fd_want, rel=0.01), fd
    assert acc == pytest.approx(acc_want, abs=0.01), acc
