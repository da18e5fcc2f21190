"""Exploring a strategy before running it: ``plan`` (tiles, bytes, the cost of each collective),
``xla_view`` (compiling on simulated devices in a helper process), ``hlo`` (the collectives in
compiled HLO), ``plotting`` (the pictures of a split), ``paged`` (a paged KV cache's blocks).
Imports the core, export and checkpoints, never the runtime, serving or the notebook side;
``dinb.widgets`` draws what it computes.
"""

from dinb.explore.paged import describe_block_pool, draw_block_pool
from dinb.explore.plotting import describe_slices, draw_layout, draw_reshard

__all__ = ["describe_block_pool", "describe_slices", "draw_block_pool", "draw_layout", "draw_reshard"]
