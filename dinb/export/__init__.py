"""A model's export: per-rank slice files, each with its rank's weights and the programs.

:mod:`~dinb.export.distributed` (``export_distributed``: trace, split, write),
:mod:`~dinb.export.tracing` (a program traced over an abstract mesh), the programs of
pipeline stages (:mod:`~dinb.export.stage_programs`) and of decoders
(:mod:`~dinb.export.decode_programs`), and the slice file format (:mod:`~dinb.export.slicefile`).
"""

from dinb.export.distributed import export_distributed
from dinb.export.slicefile import read_meta, read_slice_file

__all__ = ["export_distributed", "read_meta", "read_slice_file"]
