"""How tensors are split over a job's ranks: layouts, strategies, pipeline stages, batch buckets.

Pure numpy, no JAX at import: :mod:`~dinb.sharding.layout` (one tensor over the device matrix,
MindSpore's ``dev_matrix`` + ``tensor_map`` and JAX's ``PartitionSpec``),
:mod:`~dinb.sharding.strategy` (a whole model's layouts, MindSpore's strategy files),
:mod:`~dinb.sharding.pipeline` (which layers each stage holds, GPipe's schedule and its bubble)
and :mod:`~dinb.sharding.batch_buckets` (the batch sizes an input layout can take).
"""

from dinb.sharding.pipeline import (
    bubble_fraction,
    decode_busy_fraction,
    decode_schedule,
    draw_decode_schedule,
    measured_bubble,
)

__all__ = ["bubble_fraction", "decode_busy_fraction", "decode_schedule", "draw_decode_schedule",
           "measured_bubble"]
