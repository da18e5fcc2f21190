"""``SchedulePicture``: a pipeline's schedule, ideal (GPipe's ticks) or as a predict ran it.

GPipe runs micro-batch ``m`` on stage ``s`` at tick ``m + s``; with ``S`` stages and ``M``
micro-batches each stage is idle for ``S - 1`` of the ``M + S - 1`` ticks, the bubble
``(S - 1) / (M + S - 1)`` (:mod:`dinb.sharding.pipeline`). Given the events of a real predict
(``Model.timeline()`` or ``RankCluster.timeline()``), the picture draws when each stage
computed each micro-batch and sets the measured bubble beside the formula: transfers between
stages and stages of unequal cost make the measured one larger.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as w

from dinb.sharding.pipeline import StageEvent, bubble_fraction, gpipe_schedule, measured_bubble
from dinb.widgets.pictures import schedule_svg


class SchedulePicture(w.VBox):
    """``SchedulePicture(events)`` for a measured predict, ``SchedulePicture(stages=S,
    micro_batches=M)`` for GPipe's ideal schedule."""

    def __init__(self, events: Sequence[StageEvent] | None = None, stages: int | None = None,
                 micro_batches: int | None = None, width: int = 520):
        self.events = list(events or [])
        if self.events:
            self.stages = 1 + max(e.stage for e in self.events)
            self.micro_batches = 1 + max(e.micro for e in self.events)
            t0 = min(e.start for e in self.events)
            first = {}
            for e in self.events:  # one rank per stage draws its row (a stage's ranks run together)
                first.setdefault((e.stage, e.micro), e)
            blocks = [(s, m, (e.start - t0) * 1e3, (e.end - t0) * 1e3) for (s, m), e in sorted(first.items())]
            self.measured: float | None = measured_bubble(self.events)
            unit = "ms"
        else:
            if stages is None or micro_batches is None:
                raise ValueError("give the events of a predict, or stages= and micro_batches=")
            self.stages, self.micro_batches = stages, micro_batches
            blocks = [(s, m, float(t), float(t + 1)) for t, s, m in gpipe_schedule(stages, micro_batches)]
            self.measured, unit = None, "ticks"
        self.formula = bubble_fraction(self.stages, self.micro_batches)
        picture = w.HTML(schedule_svg(blocks, self.stages, width, unit))
        caption = w.HTML('<div class="dinb-bubble" style="font-size:12px">'
                         f'{html.escape(self.summary())}</div>')
        super().__init__([picture, caption])
        self.add_class("dinb-schedule-picture")

    def summary(self) -> str:
        s, m = self.stages, self.micro_batches
        text = (f"{s} stages, {m} micro-batch{'es' if m > 1 else ''}: bubble (S-1)/(M+S-1) = "
                f"{s - 1}/{m + s - 1} = {self.formula:.2f}")
        if self.measured is not None:
            text += f"; measured {self.measured:.2f}"
        return text

    def __repr__(self) -> str:
        return self.summary()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = self.summary()
        return bundle
