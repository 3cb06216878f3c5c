"""A tiny random diffusers ``MotionAdapter`` for the tiny SD1.5 UNet of :mod:`tests.support.tiny_sd`.

Every parameter is perturbed (AnimateDiff zero-initialises ``proj_out``, which would make the motion modules a
no-op and parity tests unable to fail).
"""

from __future__ import annotations

import torch

from tests.support.tiny_sd import _perturb


def make_tiny_motion_adapter(folder: str, seed: int = 20, block_out_channels: tuple[int, ...] = (32, 64)):
    """Build, ``save_pretrained`` to `folder` and return a tiny MotionAdapter (2 heads, 8 groups, mid block)."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=block_out_channels, motion_layers_per_block=1,
                            motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=8,
                            use_motion_mid_block=True)
    adapter = _perturb(adapter, seed)
    adapter.save_pretrained(folder)
    return adapter
