"""Putting an export's weights and inputs on the ranks' devices, and reading outputs back.

A parameter of full shape ``s`` under layout ``L`` is one global ``jax.Array``: each local
rank ``r`` contributes its slice ``L.slice_of(r, s)`` (read from its own slice file) on its own
device, and ``jax.make_array_from_single_device_arrays`` joins them, so no process ever holds
a whole tensor. Inputs the same on every rank become global arrays the same way (in one process
XLA splits numpy arrays itself, which is faster than building the shards here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dinb.export.slicefile import SliceFile
from dinb.job import ranks
from dinb.sharding.layout import Layout, one_mesh_shardings


def xla_collectives(job: ranks.Job) -> str:
    """What joins the ranks inside one SPMD program: ``in-process``, ``nccl`` or ``gloo``."""
    return "in-process" if job.process_count == 1 else "nccl" if job.target == "gpu" else "gloo"


def place_params(files: dict[int, SliceFile], job: ranks.Job, others: Sequence[Layout] = (),
                 devices: Sequence[Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Every parameter of ``files`` (the local ranks' slice files) as one global array, and the
    shardings of ``others`` (inputs, outputs, a cache) on the same mesh, over ``devices``
    (default: the job's; a pipeline stage's own)."""
    import jax

    pmeta = next(iter(files.values())).param_meta()
    names = list(pmeta)
    shardings = one_mesh_shardings([pmeta[n].layout for n in names] + list(others),
                                   job.devices if devices is None else devices)
    params = {
        n: jax.make_array_from_single_device_arrays(
            m.shape, s, [jax.device_put(sf.params[n], job.device_of(r)) for r, sf in files.items()])
        for (n, m), s in zip(pmeta.items(), shardings)
    }
    return params, shardings[len(names):]


def device_array(a: np.ndarray, sharding: Any, job: ranks.Job) -> Any:
    """``a`` (the same on every rank) as a program's input: numpy in one process, else this
    process's shards of one global array."""
    if job.process_count == 1:
        return a
    import jax

    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def host_copy(arr: Any) -> np.ndarray:
    """A replicated output as numpy: this process's first copy (no gather across processes)."""
    if isinstance(arr, np.ndarray):  # (what MPI brought)
        return arr
    if arr.is_fully_addressable:
        return np.asarray(arr)
    return np.asarray(arr.addressable_data(0))


def rank_shards(arrays: Sequence[Any], job: ranks.Job) -> dict[int, list[np.ndarray]]:
    """Each local rank's own part of every array in ``arrays``."""
    rank_of = {d: r for r, d in enumerate(job.devices)}
    result: dict[int, list[np.ndarray]] = {r: [] for r in job.local_ranks}
    for arr in arrays:
        for shard in arr.addressable_shards:
            result[rank_of[shard.device]].append(np.asarray(shard.data))
    return result
