"""The optional ``config_file`` of ``Model.build_from_file``: run-time options as an .ini file.

::

    [runtime]
    # seconds a rank waits for the others to join the job (a missing rank ends the job)
    init_timeout_s = 30
    # seconds a rank waits for the others at a checkpoint (loading, before predict)
    agree_timeout_s = 60
    # check every tensor's checksum when loading a slice file
    verify_checksums = true
    # pipeline stages: micro-batches a predict is cut into (the export must hold a program for it)
    micro_batches = 1
    # seconds a stage waits for the previous stage's activations (or for the next to take them)
    stage_timeout_s = 60
    # a decoder over pipeline stages: groups of sequence slots that follow each other through
    # the stages, so each stage works on another group at each tick (0: one group per stage on
    # GPUs and on CPU ranks of several hosts, one where the stages share one host's CPU cores)
    decode_groups = 0
    # how activations move between stages: auto (MPI between CPU processes mpiexec started,
    # XLA's collective-permute otherwise), mpi or xla
    stage_transfer = auto
    # collectives between CPU rank processes: auto (mpi where the ranks are MPI's processes and
    # the model has a per-rank program for its strategy, gloo otherwise), mpi or gloo
    collectives = auto
    # ranks on several hosts: where rank 0 hosts the JAX coordinator (host or host:port); the
    # --coordinator-address option and $DINB_COORDINATOR_ADDRESS come first
    coordinator_address = 10.0.0.1
"""

from __future__ import annotations

import configparser
import math
from dataclasses import dataclass, fields
from pathlib import Path

from dinb.errors import DinbError
from dinb.job.addresses import split_address
from dinb.sharding.pipeline import MAX_MICRO_BATCHES

TRANSFERS = ("auto", "mpi", "xla")
COLLECTIVES = ("auto", "mpi", "gloo")


@dataclass(frozen=True)
class RuntimeConfig:
    init_timeout_s: int = 30
    agree_timeout_s: float = 60.0
    verify_checksums: bool = True
    micro_batches: int = 1
    stage_timeout_s: float = 60.0
    decode_groups: int = 0
    stage_transfer: str = "auto"
    collectives: str = "auto"
    coordinator_address: str = ""


def load_config(path: str | Path | None) -> RuntimeConfig:
    """Read the ``[runtime]`` section of an .ini file; unknown keys are errors, not ignored."""
    if path is None:
        return RuntimeConfig()
    path = Path(path)
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    except FileNotFoundError:
        raise DinbError(f"config file {path} does not exist") from None
    except OSError as e:
        raise DinbError(f"config file {path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DinbError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except configparser.Error as e:
        raise DinbError(f"config file {path} is not a valid .ini file: {e}") from None
    known = {f.name: f.type for f in fields(RuntimeConfig)}
    values: dict[str, object] = {}
    for section in parser.sections():
        if section != "runtime":
            raise DinbError(f"config file {path}: unknown section [{section}]; dinb reads [runtime]")
        for key, raw in parser.items(section):
            if key not in known:
                raise DinbError(
                    f"config file {path}: unknown key {key!r} in [runtime]; known keys: {sorted(known)}"
                )
            try:
                if known[key] == "bool":
                    values[key] = parser.getboolean(section, key)
                elif known[key] == "str":
                    values[key] = raw.strip()
                elif known[key] == "int":
                    values[key] = parser.getint(section, key)
                else:
                    values[key] = parser.getfloat(section, key)
            except ValueError:
                raise DinbError(f"config file {path}: {key} = {raw!r} is not a {known[key]}") from None
            if key.endswith("_s") and not 0 < values[key] < math.inf:  # type: ignore[operator]
                raise DinbError(f"config file {path}: {key} = {raw!r}; give a number of seconds above 0")
            if key == "micro_batches" and not 1 <= values[key] <= MAX_MICRO_BATCHES:  # type: ignore[operator]
                raise DinbError(f"config file {path}: micro_batches = {raw!r}; give 1 to {MAX_MICRO_BATCHES}")
            if key == "decode_groups" and values[key] < 0:  # type: ignore[operator]
                raise DinbError(f"config file {path}: decode_groups = {raw!r}; give 0 (one group per "
                                "stage) or a number of groups")
            if key == "stage_transfer" and values[key] not in TRANSFERS:
                raise DinbError(
                    f"config file {path}: stage_transfer = {raw!r}; choose one of {list(TRANSFERS)}")
            if key == "coordinator_address":
                split_address(raw, f"config file {path}: coordinator_address")
            if key == "collectives" and values[key] not in COLLECTIVES:
                raise DinbError(
                    f"config file {path}: collectives = {raw!r}; choose one of {list(COLLECTIVES)}")
    return RuntimeConfig(**values)  # type: ignore[arg-type]
