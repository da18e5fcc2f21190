"""The MPI side of joining a job: whether mpiexec started this process (and as which rank of how
many, on a host with how many), the coordinator's address that rank 0 picks and broadcasts,
and mpich's shared-memory files, whose names go once every local rank has mapped them.
"""

from __future__ import annotations

import os
from typing import Any

from dinb.errors import DinbError
from dinb.job import addresses
from dinb.job.addresses import free_port

MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def mpi_world() -> tuple[int, int, int, int] | None:
    """``(rank, size, local_rank, local_size)`` when mpiexec launched more than one process."""
    if not any(v in os.environ for v in MPI_SIZE_VARS):
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size == 1:
        return None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    _unlink_mpi_shm(node)
    return comm.rank, comm.size, node.rank, node.size


def _unlink_mpi_shm(node: Any) -> None:
    """Remove the names of mpich's shared-memory files (``/dev/shm/mpich_shm_*``) once every
    process of this host has mapped them. mpich removes them in ``MPI_Finalize``, which a killed
    rank never reaches (a dead rank, the peers its launcher ends, a restarted notebook cluster):
    every such test left one behind. The mapped memory stays valid; only the name goes."""
    node.Barrier()  # every local rank has mapped them
    if node.rank != 0:
        return
    try:
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        return
    for path in {line.split(maxsplit=5)[-1] for line in maps if "/dev/shm/mpich_shm_" in line}:
        if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
            try:
                os.unlink(path)
            except OSError:
                pass


def mpi_coordinator(choice: tuple[str, str] | None, multi_host: bool) -> str:
    """Rank 0 decides the coordinator's ``host:port`` and broadcasts it (or its error, so that
    every rank raises the same one instead of waiting for rank 0)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    mine = addresses.local_addresses() if multi_host and choice is None else []
    if multi_host and choice is None:  # each host's addresses, with the first world rank on it
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        gathered = comm.gather((node.bcast(comm.rank, root=0), mine), root=0)
    decided: tuple[str | None, str | None] = (None, None)
    if comm.rank == 0:
        try:
            if choice is not None:
                host, port = addresses.split_address(*choice)
            elif multi_host:
                hosts = {leader: addrs for leader, addrs in gathered if leader != 0}
                host, port = addresses.pick_reachable(mine, list(hosts.values())), None
            else:
                host, port = addresses.LOOPBACK, None
            decided = (f"{host}:{port or free_port(host)}", None)
        except DinbError as e:
            decided = (None, str(e))
    address, error = comm.bcast(decided, root=0)
    if error is not None:
        raise addresses.AddressError(f"rank 0 could not pick the coordinator's address: {error}")
    return str(address)
