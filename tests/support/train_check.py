"""Run by tests/test_train_distributed.py: PeRFlow training of a tiny UNet in one process of a real
``jax.distributed`` group (or in a lone process), under every parameter layout.

    PERFLOW_JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT PERFLOW_JAX_NUM_PROCESSES=2 PERFLOW_JAX_PROCESS_ID=I \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.support.train_check OUT_DIR [kill|resume]

For each layout (replicated; fsdp over every device; a 2-D data x fsdp mesh of 2 x 2) it trains 10 steps and
process 0 writes the final params (gathered from all processes) to ``OUT_DIR/<layout>.npz``, then ``done``.
With ``kill`` it then starts the fsdp run again in ``OUT_DIR/<tag>/fsdp_resumed`` and every process SIGKILLs
itself after step 6 (the checkpoint of step 5 is on disk). ``resume`` (new processes, same OUT_DIR) skips the
layouts: first process 1 alone asks for a changed config, which it must refuse while process 0 stops too
instead of waiting for it; then both resume the killed run from step 5 to step 10: ``OUT_DIR/fsdp_resumed.npz``.
"""

from __future__ import annotations

import os
import signal
import sys

LAYOUTS = {"replicated": ["train.sharding=replicated"], "fsdp": ["train.sharding=fsdp"],
           "data2_fsdp2": ["train.sharding=fsdp", "train.fsdp_size=2"]}
STEPS = 10


def main(out: str, mode: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from perflow_jax import sharding

    sharding.initialize_distributed()
    from perflow_jax.compilation_cache import enable_compilation_cache

    # On disk per output folder: the killed and the resumed runs (new processes) reuse the fsdp step's program.
    enable_compilation_cache(os.path.join(out, "jax-cache"))
    import json

    import jax.numpy as jnp
    import numpy as np

    from perflow_jax.models.unet import UNetConfig, init_unet_params
    from perflow_jax.training import train as train_lib

    tiny = UNetConfig(sample_size=8, in_channels=1, out_channels=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
                      norm_num_groups=4, cross_attention_dim=4, attention_head_dim=2, num_class_embeds=11)
    unet_json = os.path.join(out, "unet.json")  # one path for every process: it is part of the run's config
    tmp = f"{unet_json}.{jax.process_index()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tiny.to_dict(), f)
    os.replace(tmp, unet_json)
    rng = np.random.default_rng(0)
    ds = train_lib.ArrayDataset(np.tanh(rng.standard_normal((24, 1, 8, 8))).astype(np.float32),
                                {"class_labels": rng.integers(0, 10, 24).astype(np.int32)},
                                {"class_labels": np.int32(10)})
    teacher = init_unet_params(tiny, jax.random.key(0))
    teacher["conv_out"] = jax.tree_util.tree_map(jnp.zeros_like, teacher["conv_out"])
    teacher = jax.device_get(teacher)
    tag = f"{jax.process_count()}x{jax.local_device_count()}"

    def run(name: str, overrides: list[str], callback=None) -> dict:
        cfg = train_lib.load_config(None, [
            "model.kind=unet", f"model.unet_config={unet_json}", f"output_dir={os.path.join(out, tag, name)}",
            "teacher.weights=x", "perflow.num_time_windows=2", "perflow.prediction_type=velocity",
            "solver.num_steps=2", f"train.steps={STEPS}", "train.batch_size=8", "train.learning_rate=3e-3",
            "train.warmup_steps=0", "train.ema_decay=0.9", "train.checkpoint_every=5", "train.log_every=5",
            "train.progress=false", "data.kind=npz", "data.path=unused", *overrides])
        return train_lib.train(cfg, ds, teacher_params=teacher, callback=callback)

    def save(name: str, params: dict) -> None:
        leaves = [sharding.to_host(x) for x in jax.tree_util.tree_leaves(params)]  # a collective: every process
        if jax.process_index() == 0:
            np.savez(os.path.join(out, f"{name}.npz"), *leaves)

    if mode == "resume":
        refused = None
        try:  # only process 1 changes the config: it refuses, and process 0 must not wait for it forever
            run("fsdp_resumed", LAYOUTS["fsdp"] + (["train.learning_rate=1e-3"] if jax.process_index() else []))
        except (ValueError, RuntimeError) as e:
            refused = e
        want = ValueError if jax.process_index() else RuntimeError
        assert isinstance(refused, want) and ("another config" in str(refused) or "process(es) [1]" in str(refused)), \
            repr(refused)
        result = run("fsdp_resumed", LAYOUTS["fsdp"])
        assert result["resumed_from"] == 5, result["resumed_from"]
        save("fsdp_resumed", result["params"])
        return
    save("teacher", teacher)
    for name, overrides in LAYOUTS.items():
        save(name, run(name, overrides)["params"])
    if jax.process_index() == 0:
        with open(os.path.join(out, "done"), "w", encoding="utf-8") as f:
            f.write(tag)
    if mode == "kill":
        def kill(step: int, loss: float) -> None:
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)

        run("fsdp_resumed", LAYOUTS["fsdp"], kill)
        raise AssertionError("the run was not killed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
