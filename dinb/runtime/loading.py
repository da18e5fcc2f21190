"""Reading this process's slice files of an export, agreed among the ranks before anything runs.

A process reads the files of the ranks it hosts: its own under mpiexec, all of them in the
simulated mode. Before the first collective, the ranks compare notes through the job's
coordinator: if any rank failed to load, or the files come from different exports, every rank
raises the same error naming the rank at fault instead of hanging in the collective.
"""

from __future__ import annotations

from pathlib import Path

from dinb.errors import DinbError, RankFailedError, RankMismatchError, SliceFileError
from dinb.export.slicefile import SliceFile, find_slice_files, read_slice_file
from dinb.job import ranks


def load_slice_files(path: Path, job: ranks.Job, verify: bool,
                     rank_id: int | None = None) -> dict[int, SliceFile]:
    """The slice files of this process's ranks from ``path`` (a directory or one rank's file),
    checked against the job on every rank (``rank_id``: the rank the context names, if any)."""
    error: DinbError | None = None
    files: dict[int, SliceFile] = {}
    try:
        if rank_id is not None and job.process_count > 1 and rank_id != job.process_index:
            raise RankMismatchError(
                f"Context rank_id={rank_id} but this process is rank {job.process_index} of the job; "
                "leave rank_id unset under mpiexec or pass the process's rank")
        files = read_local(path, job, verify)
    except DinbError as e:
        error = e
    try:
        job.agree("load slice files", None if error is None else f"{type(error).__name__}: {error}")
    except RankFailedError:
        if error is not None:
            raise error from None  # this rank's own typed error; the others name this rank
        raise
    ids = job.allgather("export id", next(iter(files.values())).export_id)
    if len(set(ids)) > 1:
        odd = [r for r, i in enumerate(ids) if i != ids[0]]
        raise SliceFileError(f"ranks {odd} loaded slice files from a different export than rank 0; give "
                             "every rank the files of one export (one directory)")
    return files


def read_local(path: Path, job: ranks.Job, verify: bool) -> dict[int, SliceFile]:
    """Read (and check) the slice files of the job's local ranks."""
    local = job.local_ranks
    if not path.exists():
        raise SliceFileError(f"{path} does not exist; pass an export directory or a .dinb file")
    if path.is_dir() or len(local) > 1:
        directory = path if path.is_dir() else path.parent
        by_rank = find_slice_files(directory)
        if len(by_rank) != job.world_size:
            raise RankMismatchError(
                f"{directory} holds slice files for {len(by_rank)} ranks but this job has "
                f"{job.world_size}; launch {len(by_rank)} ranks (mpiexec -n {len(by_rank)} or "
                f"--simulate {len(by_rank)}), or export again for {job.world_size} ranks")
        paths = {r: by_rank[r] for r in local}
    else:
        paths = {local[0]: path}
    files: dict[int, SliceFile] = {}
    for rank, p in paths.items():
        sf = read_slice_file(p, verify=verify)
        if sf.world_size != job.world_size:
            raise RankMismatchError(
                f"{p} was exported for {sf.world_size} ranks but this job has {job.world_size}; "
                f"launch {sf.world_size} ranks, or export again for {job.world_size} ranks")
        if sf.rank != rank:
            raise RankMismatchError(
                f"{p} holds rank {sf.rank}'s slices but this process is rank {rank}; pass the export "
                "directory and each rank picks its own file")
        files[rank] = sf
    return files
