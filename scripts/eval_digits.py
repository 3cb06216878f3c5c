"""The digits quality table: teacher DDIM, DPM++ 2M and UniPC vs the PeRFlow students, at 1-8 (and 50) steps.

    python scripts/eval_digits.py table --student "PeRFlow (K=4)=/tmp/digits/k4" \
        --student "PeRFlow (K=4, CFG-fixed)=/tmp/digits/k4g" --out docs [--teacher DIR] [--seeds 0,1,2]
    python scripts/eval_digits.py fit-classifier       # once: refit the shipped feature classifier

For each method, step count, guidance w and seed: 1000 samples (100 per class), scored by
:mod:`perflow_jax.pipelines.digits_quality` with the shipped classifier (FD in its hidden features against the
400 held-out digits, and accuracy). CFG-sync students are sampled at every w; a CFG-fixed student (trained with
the teacher at guidance w) is sampled without guidance and listed under its training w. Writes
``<out>/results_table.md`` (the table), ``<out>/digits_fd_steps.png`` (FD against steps, one panel per w),
``<out>/digits_samples.png`` (sample grids) and, with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from perflow_jax.compilation_cache import enable_compilation_cache
from perflow_jax.pipelines import digits
from perflow_jax.pipelines import digits_quality as dq

TEACHER_SOLVERS = {"DDIM (teacher)": "ddim", "DPM++ 2M (teacher)": "dpmpp_2m", "UniPC (teacher)": "unipc"}


def fit_classifier(out: str, seed: int = 0) -> dq.FeatureClassifier:
    """Fit the 64-128-10 MLP on the real training digits (scikit-learn) and save its weights to `out`."""
    from sklearn.neural_network import MLPClassifier

    x, y = digits.load_digits_data("train")
    clf = MLPClassifier(hidden_layer_sizes=(dq.HIDDEN,), max_iter=600, random_state=seed, alpha=1e-3)
    clf.fit(x.reshape(len(x), -1), y)
    fc = dq.FeatureClassifier(*(np.asarray(a, np.float64) for a in (clf.coefs_[0], clf.intercepts_[0],
                                                                   clf.coefs_[1], clf.intercepts_[1])))
    fc.save(out)
    return fc


def load_student(teacher: dict, folder: str) -> tuple[digits.DigitsPipeline, dict]:
    """A student pipeline (teacher + ΔW) and its training config."""
    from perflow_jax.delta import load_delta, merge

    delta = load_delta(os.path.join(folder, "delta_weights.safetensors"), teacher)
    with open(os.path.join(folder, "scheduler_config.json"), encoding="utf-8") as f:
        sched = json.load(f)
    with open(os.path.join(folder, "train_config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    return digits.DigitsPipeline(merge(teacher, delta), sched, "perflow"), tcfg


def cells(teacher: dict, students: dict[str, str], steps: list[int], teacher_steps: list[int],
          guidances: list[float]):
    """(method, pipeline, scheduler, steps, table w, sampling w) for every cell of the table."""
    tpipe = digits.DigitsPipeline(teacher, dict(digits.SCHEDULE), "ddim")
    for w in guidances:
        for name, sched in TEACHER_SOLVERS.items():
            for n in (teacher_steps if sched == "ddim" else steps):
                yield name, tpipe, sched, n, w, w
    for name, folder in students.items():
        pipe, tcfg = load_student(teacher, folder)
        k = tcfg["perflow"]["num_time_windows"]
        fixed = tcfg["reflow"]["cfg_mode"] == "fixed"
        for w in ([tcfg["reflow"]["guidance_scale"]] if fixed else guidances):
            for n in steps:
                if n >= k:
                    yield name, pipe, "perflow", n, w, (1.0 if fixed else w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit-classifier")
    f.add_argument("--out", default=dq.CLASSIFIER)
    t = sub.add_parser("table")
    t.add_argument("--teacher", default=digits.ASSETS, help="folder with teacher.safetensors")
    t.add_argument("--student", action="append", default=[], help="NAME=DIR of a trained student")
    t.add_argument("--steps", default="1,2,4,8")
    t.add_argument("--teacher-steps", default="50,8,4,2,1", help="DDIM steps (DPM++ and UniPC use --steps)")
    t.add_argument("--guidance", default="1.0,2.0")
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--out", default="docs")
    t.add_argument("--json", default=None, help="also write the raw results here")
    a = p.parse_args()
    if a.cmd == "fit-classifier":
        fc = fit_classifier(a.out)
        print(f"saved {a.out}; held-out accuracy {dq.Scorer(fc).test_accuracy:.3f}")
        return
    enable_compilation_cache()
    scorer = dq.Scorer()
    floor = scorer.floor()
    print(f"classifier held-out accuracy {scorer.test_accuracy:.3f}; real-vs-real FD floor {floor:.3f}", flush=True)
    teacher = digits.load_unet_weights(os.path.join(a.teacher, "teacher.safetensors"))
    students = dict(s.rsplit("=", 1) for s in a.student)  # the name may hold "=", the folder not
    labels = dq.balanced_labels(1000)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for name, pipe, sched, n, w, sample_w in cells(teacher, students, [int(s) for s in a.steps.split(",")],
                                                   [int(s) for s in a.teacher_steps.split(",")],
                                                   [float(g) for g in a.guidance.split(",")]):
        t0, fds, accs = time.time(), [], []
        for seed in seeds:
            x = pipe.sample_float(labels, n, guidance_scale=sample_w, seed=seed, scheduler=sched)
            fd, acc = scorer.score(x, labels)
            fds.append(fd)
            accs.append(acc)
            if seed == seeds[0]:
                grid = digits.to_uint8(np.clip(x, -1, 1).reshape(10, 100, 1, 8, 8)[:, :4].transpose(
                    1, 0, 2, 3, 4).reshape(40, 1, 8, 8))
        rows.append(dict(method=name, steps=n, guidance=w, fd=fds, acc=accs, seconds=time.time() - t0,
                         grid=grid.tolist()))
        print(f"{name:34s} steps={n:2d} w={w:.1f} FD={np.mean(fds):.3f}±{np.ptp(fds) / 2:.3f} "
              f"acc={np.mean(accs):.3f}", flush=True)
        result = dict(floor=floor, clf_acc=scorer.test_accuracy, seeds=seeds, rows=rows)
        if a.json:  # after every cell: a long evaluation that stops keeps what it measured
            with open(a.json + ".tmp", "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
            os.replace(a.json + ".tmp", a.json)
    os.makedirs(a.out, exist_ok=True)
    write_table(os.path.join(a.out, "results_table.md"), result)
    write_fd_plot(os.path.join(a.out, "digits_fd_steps.png"), rows)
    write_grids(os.path.join(a.out, "digits_samples.png"), rows)


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.ptp(values) / 2:.3f}"


def write_table(path: str, result: dict) -> None:
    """The markdown table: one row per method and w, FD and accuracy per step count."""
    rows = result["rows"]
    steps = sorted({r["steps"] for r in rows})
    lines = [f"Real-vs-real FD floor: **{result['floor']:.3f}**; classifier accuracy on held-out real digits: "
             f"{result['clf_acc']:.3f}. Values: mean ± half the range over {len(result['seeds'])} sampling seeds "
             f"({', '.join(map(str, result['seeds']))}), 1000 samples each.", ""]
    for metric, key in (("FD ↓", "fd"), ("accuracy ↑", "acc")):
        lines += ["| method | w | " + " | ".join(f"{metric} {n} steps" for n in steps) + " |",
                  "|---|---:|" + "---:|" * len(steps)]
        for name, w in dict.fromkeys((r["method"], r["guidance"]) for r in sorted(rows, key=lambda r: r["guidance"])):
            by = {r["steps"]: r for r in rows if r["method"] == name and r["guidance"] == w}
            lines.append(f"| {name} | {w:g} | " + " | ".join(_fmt(by[n][key]) if n in by else "" for n in steps)
                         + " |")
        lines.append("")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)


def write_fd_plot(path: str, rows: list[dict]) -> None:
    """FD against steps (log-log), one line per method, one panel per guidance w; error bars: seed range."""
    plt = _pyplot()
    ws = sorted({r["guidance"] for r in rows})
    fig, axes = plt.subplots(1, len(ws), figsize=(5.5 * len(ws), 4.2), squeeze=False)
    for ax, w in zip(axes[0], ws, strict=True):
        for name in dict.fromkeys(r["method"] for r in rows if r["guidance"] == w):
            pts = sorted((r["steps"], np.mean(r["fd"]), np.ptp(r["fd"]) / 2) for r in rows
                         if r["method"] == name and r["guidance"] == w)
            n, m, e = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(n, m, yerr=e, marker="o", ms=3, capsize=2, label=name,
                        ls="--" if "teacher" in name else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("FD (lower is better)")
        ax.set_title(f"CFG w = {w:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def write_grids(path: str, rows: list[dict], steps: tuple[int, ...] = (1, 2, 4, 8)) -> None:
    """4 samples per class for each method (rows) at each step count (columns), at the first guidance w."""
    plt = _pyplot()
    w = min(r["guidance"] for r in rows)
    grids = {(r["method"], r["steps"]): np.asarray(r["grid"], np.uint8) for r in rows if r["guidance"] == w}
    names = list(dict.fromkeys(r["method"] for r in rows if r["guidance"] == w))
    fig, axes = plt.subplots(len(names), len(steps), figsize=(2.6 * len(steps), 1.3 * len(names) + 0.4),
                             squeeze=False)
    for i, name in enumerate(names):
        for j, n in enumerate(steps):
            ax = axes[i, j]
            ax.axis("off")
            img = grids.get((name, n))
            if img is None:
                continue
            canvas = np.full((4 * 9 + 1, 10 * 9 + 1), 255, np.uint8)
            for k, im in enumerate(img):
                r, c = divmod(k, 10)
                canvas[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = 255 - im
            ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"{name}, {n} steps (w={w:g})", fontsize=6)
    fig.tight_layout()
    _save(fig, path)


if __name__ == "__main__":
    main()
