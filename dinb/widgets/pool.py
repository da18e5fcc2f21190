"""``PoolPicture``: a paged KV cache's blocks as a generation runs, and a slider to go back.

A paged export's cache is one pool of blocks for all sequences (:mod:`dinb.runtime.block_pool`);
every rank holds the same blocks, each for its own key/value heads, so one picture is every
rank's. :meth:`PoolPicture.follow` runs ``Model.generate`` and redraws the pool after each
decode step: blocks join a sequence as its tokens cross into them, go back when it ends (or is
preempted), and stay cached (grey) when they hold a prompt's full block. Each redraw is kept
as a *frame*; afterwards the slider shows any of them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import ipywidgets as w

from dinb.errors import InputError
from dinb.widgets.pictures import block_pool_svg


class PoolPicture(w.VBox):
    """``PoolPicture(model)`` for a paged decoder's ``Model``; ``follow(prompts, n)`` generates
    and draws."""

    def __init__(self, model: Any, width: int = 560):
        if model.block_pool() is None:
            raise InputError("this export's cache is slots of max_len positions, not a pool of blocks; "
                             "export it with a paged cache (the default, or cache='paged')")
        self.model, self.width = model, width
        self.frames: list[dict[str, Any]] = []
        self.picture = w.HTML(block_pool_svg(model.block_pool().snapshot(), width))
        self.caption = w.HTML()
        self.slider = w.IntSlider(value=0, min=0, max=0, description="step", disabled=True,
                                  continuous_update=True)
        self.slider.observe(lambda change: self._show(change["new"]), names="value")
        super().__init__([self.picture, self.caption, self.slider])
        self.add_class("dinb-pool-picture")
        self._caption(model.block_pool().snapshot(), "before")

    def follow(self, prompts: Any, max_new_tokens: int, **generate: Any) -> Any:
        """``Model.generate(prompts, max_new_tokens, **generate)``, the pool drawn at each decode
        step (the rows' tokens come row by row within a step: a row not after the last one
        starts the next step); its tokens."""
        pool = self.model.block_pool()
        self.frames = [pool.snapshot()]
        last = [-1]
        given = generate.pop("on_token", None)

        def on_token(row: int, token: int) -> None:
            if given is not None:
                given(row, token)
            if row <= last[0]:
                self.frames.append(pool.snapshot())
                self._show(len(self.frames) - 1)
            last[0] = row

        out = self.model.generate(prompts, max_new_tokens, on_token=on_token, **generate)
        self.frames.append(pool.snapshot())
        self.slider.max = len(self.frames) - 1
        self.slider.disabled = False
        self.slider.value = self.slider.max
        self._show(self.slider.max)
        return out

    def _show(self, i: int) -> None:
        if not self.frames:
            return
        frame = self.frames[min(i, len(self.frames) - 1)]
        self.picture.value = block_pool_svg(frame, self.width)
        self._caption(frame, "after" if i == len(self.frames) - 1 else f"step {i}")

    def _caption(self, frame: Mapping[str, Any], when: str) -> None:
        free, cached = len(frame["free"]), len(frame["evictable"])
        held = frame["blocks"] - free - cached
        tables = "; ".join(f"seq {s}: {t}" for s, t in frame["tables"].items())
        self.caption.value = (f'<div class="dinb-pool-caption" style="font-size:12px">{html.escape(when)}: '
                              f"{held} blocks held, {cached} cached, {free} free"
                              f"{'. ' + html.escape(tables) if tables else ''}</div>")

