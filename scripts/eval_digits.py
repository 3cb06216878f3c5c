"""The digits quality table: teacher DDIM vs PeRFlow at 50/8/4/2/1 steps, with and without CFG.

    python scripts/eval_digits.py --teacher /tmp/digits/teacher --student 4=/tmp/digits/k4 \
        --student 2=/tmp/digits/k2 --student 1=/tmp/digits/k1 --out docs

For each method, step count, guidance and seed: 1000 samples (100 per class), their accuracy under an MLP
classifier trained on the real training digits, and the Fréchet distance (FD) between the classifier's
hidden features of the samples (clipped to [-1, 1], as displayed) and of the 400 held-out real digits.
The real-vs-real floor is the FD of 1000 real training digits against the same held-out set. Writes
``<out>/results.md`` and a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from perflow_jax.compilation_cache import enable_compilation_cache
from perflow_jax.pipelines import digits


class FeatureClassifier:
    """An MLP on real digits; its hidden ReLU layer is the feature space for the FD."""

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        x, y = digits.load_digits_data("train")
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed, alpha=1e-3)
        self.clf.fit(x.reshape(len(x), -1), y)
        xt, yt = digits.load_digits_data("test")
        self.test_accuracy = float(self.clf.score(xt.reshape(len(xt), -1), yt))

    def features(self, x: np.ndarray) -> np.ndarray:
        h = x.reshape(len(x), -1) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0.0)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.clf.predict(x.reshape(len(x), -1)) == y))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr √(Σa Σb) = Σ √λ over the (real, non-negative) eigenvalues of Σa Σb.
    eig = np.linalg.eigvals(ca @ cb)
    tr_covmean = np.sum(np.sqrt(np.clip(np.real(eig), 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr_covmean)


def student_pipeline(teacher_dir: str, student_dir: str):
    from perflow_jax.delta import load_delta, merge

    teacher = digits.load_unet_weights(os.path.join(teacher_dir, "teacher.safetensors"))
    delta = load_delta(os.path.join(student_dir, "delta_weights.safetensors"), teacher)
    with open(os.path.join(student_dir, "scheduler_config.json"), encoding="utf-8") as f:
        sched = json.load(f)
    return digits.DigitsPipeline(merge(teacher, delta), sched, "perflow")


def teacher_pipeline(teacher_dir: str):
    teacher = digits.load_unet_weights(os.path.join(teacher_dir, "teacher.safetensors"))
    sched = dict(digits.SCHEDULE, _class_name="PeRFlowScheduler")
    return digits.DigitsPipeline(teacher, sched, "ddim")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", action="append", default=[], help="K=DIR, a student trained with K windows")
    p.add_argument("--steps", default="50,8,4,2,1")
    p.add_argument("--perflow-steps", default="8,4,2,1")
    p.add_argument("--guidance", default="1.0,2.0")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default="docs")
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--skip-teacher", action="store_true", help="evaluate only the students")
    p.add_argument("--merge", default=None, help="prepend the rows of an earlier --json file")
    a = p.parse_args()
    enable_compilation_cache()

    clf = FeatureClassifier()
    x_test, _ = digits.load_digits_data("test")
    x_train, _ = digits.load_digits_data("train")
    f_test = clf.features(x_test)
    floor = frechet_distance(clf.features(x_train[np.random.default_rng(0).permutation(len(x_train))[:1000]]),
                             f_test)
    print(f"classifier held-out accuracy {clf.test_accuracy:.3f}; real-vs-real FD floor {floor:.3f}", flush=True)

    students = {int(k): v for k, v in (s.split("=", 1) for s in a.student)}
    teacher = teacher_pipeline(a.teacher)
    student_pipes = {k: student_pipeline(a.teacher, d) for k, d in students.items()}
    labels = np.repeat(np.arange(10), 100).astype(np.int32)
    steps = [int(s) for s in a.steps.split(",")]
    pf_steps = [int(s) for s in a.perflow_steps.split(",")]
    guidances = [float(g) for g in a.guidance.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]

    rows: list[dict] = []
    if a.merge:
        with open(a.merge, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    methods = ["PeRFlow"] if a.skip_teacher else ["DDIM (teacher)", "PeRFlow"]
    for method in methods:
        for n in steps if method.startswith("DDIM") else pf_steps:
            if method == "PeRFlow":
                usable = [k for k in student_pipes if k <= n]
                if not usable:
                    continue
                k = max(usable)
                pipe, name = student_pipes[k], f"PeRFlow (K={k})"
            else:
                pipe, name = teacher, method
            for w in guidances:
                fds, accs = [], []
                t0 = time.time()
                for seed in seeds:
                    # Evaluate the images as displayed (clipped to the data range).
                    x = np.clip(pipe.sample_float(labels, n, guidance_scale=w, seed=seed), -1.0, 1.0)
                    fds.append(frechet_distance(clf.features(x), f_test))
                    accs.append(clf.accuracy(x, labels))
                    if seed == seeds[0]:
                        grid = digits.to_uint8(x.reshape(10, 100, 1, 8, 8)[:, :4].transpose(
                            1, 0, 2, 3, 4).reshape(40, 1, 8, 8))
                row = dict(method=name, steps=n, guidance=w, fd=fds, acc=accs, seconds=time.time() - t0,
                           grid=grid.tolist())
                rows.append(row)
                print(f"{name:16s} steps={n:2d} w={w:.1f} FD={np.mean(fds):.3f}±{np.ptp(fds) / 2:.3f} "
                      f"acc={np.mean(accs):.3f} ({row['seconds']:.0f}s)", flush=True)
                if a.json:
                    with open(a.json, "w", encoding="utf-8") as f:
                        json.dump(dict(floor=floor, clf_acc=clf.test_accuracy, rows=rows), f, indent=1)

    grids = {(r["method"], r["steps"], r["guidance"]): np.asarray(r["grid"], np.uint8) for r in rows}
    os.makedirs(a.out, exist_ok=True)
    fig_path = write_figure(grids, os.path.join(a.out, "digits_samples.png"), guidances[0])
    write_markdown(os.path.join(a.out, "results.md"), rows, floor, clf.test_accuracy, fig_path, seeds)


def write_figure(grids: dict, path: str, w: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(n, name) for name, n, g in grids if g == w}, key=lambda k: (-k[0], k[1]))
    ns = sorted({n for n, _ in keys}, reverse=True)
    names = sorted({name for _, name in keys}, key=lambda s: (not s.startswith("DDIM"), s))
    fig, axes = plt.subplots(len(names), len(ns), figsize=(2.6 * len(ns), 1.3 * len(names) + 0.4), squeeze=False)
    for i, name in enumerate(names):
        for j, n in enumerate(ns):
            ax = axes[i, j]
            ax.axis("off")
            img = grids.get((name, n, w))
            if img is None:
                continue
            grid = np.ones((4 * 9 + 1, 10 * 9 + 1), np.uint8) * 255
            for k, im in enumerate(img):
                r, c = divmod(k, 10)
                grid[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = 255 - im
            ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"{name}, {n} steps", fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)
    return path


def write_markdown(path: str, rows: list, floor: float, clf_acc: float, fig_path: str, seeds: list) -> None:
    lines = [
        "# Digits: PeRFlow vs. teacher DDIM",
        "",
        "Generated by `scripts/eval_digits.py`. 1000 samples per cell (100 per class), "
        f"{len(seeds)} sampling seeds ({', '.join(map(str, seeds))}); value = mean ± half the seed-to-seed range.",
        "FD: Fréchet distance in the hidden layer (128 ReLU units) of an MLP classifier trained on the real "
        "training digits, against the 400 held-out real digits (lower is better). Accuracy: that classifier's "
        "accuracy on the samples w.r.t. the requested class.",
        "",
        f"Real-vs-real FD floor (1000 real training digits vs. held-out): **{floor:.3f}**. "
        f"Classifier accuracy on held-out real digits: {clf_acc:.3f}.",
        "",
        "| method | steps | CFG w | FD ↓ | accuracy ↑ |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["guidance"], -r["steps"], not r["method"].startswith("DDIM"))):
        lines.append(f"| {r['method']} | {r['steps']} | {r['guidance']:.1f} | {np.mean(r['fd']):.3f} ± "
                     f"{np.ptp(r['fd']) / 2:.3f} | {np.mean(r['acc']):.3f} ± {np.ptp(r['acc']) / 2:.3f} |")
    lines += ["", f"![samples]({os.path.basename(fig_path)})", ""]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
