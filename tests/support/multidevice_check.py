"""Run by tests/test_multidevice.py in a subprocess with 4 forced host (CPU) devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.support.multidevice_check MODEL OUT.npz

Generates the same 3 images (seed 0, float output) on a 4-device ("data",) mesh — 3 does not divide 4, so
the batch is padded to 4 and trimmed — and on a 1-device mesh, and saves both plus facts about how the
4-device program shards its batch inputs and output.
"""

from __future__ import annotations

import json
import sys


def main(model: str, out: str) -> None:
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from perflow_jax import enable_compilation_cache, sharding
    from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline

    devices = jax.devices()
    assert len(devices) == 4, f"expected 4 forced host devices, got {devices}"
    prompts = ["a cat on the mat", "the red dog", "a dog"]
    kw = dict(num_inference_steps=4, guidance_scale=3.0, seed=0, height=32, width=32, output_type="float")

    enable_compilation_cache()  # PERFLOW_JAX_CACHE_DIR, set by the test: its persistent cache (or off)
    multi = StableDiffusionPipeline.from_pretrained(model)
    images_4 = multi(prompts, **kw)
    ((spec, compiled),) = multi._compiled.items()
    (params_sh, state_sh, inputs_sh, seed_sh, guidance_sh), _ = compiled.input_shardings
    facts = {
        "mesh_devices": int(multi.mesh.devices.size),
        "padded_batch": int(spec.batch),
        "inputs": {name: {"num_devices": len(s.device_set), "spec": str(s.spec), "batch_sharded": s.spec == P("data"),
                          "shard_rows": s.shard_shape((4, 16))[0]}
                   for name, s in inputs_sh._asdict().items() if s is not None},
        "output": {"num_devices": len(compiled.output_shardings.device_set),
                   "batch_sharded": compiled.output_shardings.spec == P("data")},
        "params_replicated": all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(params_sh)),
    }

    single = StableDiffusionPipeline(multi.components, multi.scheduler, mesh=sharding.data_mesh(devices[:1]))
    images_1 = single(prompts, **kw)
    facts["single_mesh_devices"] = int(single.mesh.devices.size)
    np.savez(out, four=images_4, one=images_1)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
