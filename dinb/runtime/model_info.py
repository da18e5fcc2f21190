"""What a built :class:`dinb.runtime.model.Model` can say about itself: its job and ranks, the
export's metadata, bytes per rank, the compiled program, pipeline stages, each rank's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinb.job import ranks
from dinb.sharding.pipeline import StageEvent


class Introspection:
    """The read-only views of :class:`Model`."""

    def rank_outputs(self) -> dict[int, list[np.ndarray]]:
        """Each local rank's own slice of every output of the last predict."""
        job = self._job
        assert job is not None
        if self._pipe is not None:
            return self._pipe.rank_outputs()
        if self._steps is not None:
            return {r: list(v) for r, v in self._last_by_rank.items()}
        rank_of = {d: r for r, d in enumerate(job.devices)}
        result: dict[int, list[np.ndarray]] = {r: [] for r in job.local_ranks}
        for arr in self._last:
            for shard in arr.addressable_shards:
                result[rank_of[shard.device]].append(np.asarray(shard.data))
        return result

    @property
    def job(self) -> ranks.Job:
        self._check_built()
        assert self._job is not None
        return self._job

    @property
    def model_name(self) -> str:
        self._check_built()
        return next(iter(self._files.values())).model

    def export_meta(self) -> dict[str, Any]:
        """The export's metadata as this rank's slice file holds it (model, config, layouts)."""
        self._check_built()
        return dict(next(iter(self._files.values())).meta)

    @property
    def world_size(self) -> int:
        return self.job.world_size

    @property
    def local_ranks(self) -> list[int]:
        return self.job.local_ranks

    def param_bytes(self) -> dict[int, int]:
        """Bytes of parameter slices each local rank holds (with stages: its stage's only)."""
        self._check_built()
        return {r: sum(a.nbytes for a in sf.params.values()) for r, sf in self._files.items()}

    def compiled_text(self) -> str:
        """The partitioned HLO XLA compiled (shows the collectives the layouts imply); with the
        ``tensorrt`` provider, the rank's ONNX steps and collectives."""
        self._check_built()
        if self._pipe is not None:
            return self._pipe.describe()
        if self._gen is not None:
            return self._gen.compiled_text()
        if self._steps is not None:
            return self._steps.describe()
        return str(self._compiled.as_text())

    # ---- pipeline stages ---------------------------------------------------------------------
    def pipeline_info(self) -> dict[str, Any] | None:
        """``stages``, ``stage_ranks``, the ``micro_batches`` counts exported, the stages this
        process hosts and the ``transfer`` between stages; None for a one-stage export."""
        self._check_built()
        if self._pipe is None:
            return None
        p = self._pipe
        return {"stages": p.stages, "stage_ranks": p.t, "micro_batches": list(p.micro_counts),
                "local_stages": list(p.local_stages), "transfer": p.transfer,
                "layers": {s: list(p.meta[s]["layers"]) for s in p.local_stages}}

    def timeline(self) -> list[StageEvent]:
        """When each local rank computed each micro-batch in the last predict (wall-clock
        seconds); empty for a one-stage export. :func:`dinb.sharding.pipeline.measured_bubble` reads it."""
        self._check_built()
        return list(self._pipe.events) if self._pipe is not None else []
