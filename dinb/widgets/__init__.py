"""Notebook widgets: the strategy explorer, the per-rank outputs viewer, the pipeline
schedule and a paged cache's pool as a generation runs (ipywidgets).

They render metadata and small summaries only (shapes, slices, bytes, block-averaged
heatmaps), never a large tensor's values.

Layer: draws what ``dinb.explore`` computes; imports the layers below, never the notebook side
(the ``%dinfer`` magics, above, show the widgets).
"""

from dinb.widgets.explorer import StrategyExplorer
from dinb.widgets.outputs import RankOutputs
from dinb.widgets.pool import PoolPicture
from dinb.widgets.schedule import SchedulePicture

__all__ = ["PoolPicture", "RankOutputs", "SchedulePicture", "StrategyExplorer"]
