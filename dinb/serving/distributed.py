"""MindSpore Serving's ``distributed`` functions: declare a servable, start it, start its agents.

In a servable's ``servable_config.py``::

    model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=False)

In the server script (Main and the Distributed Worker)::

    distributed.start_servable(servable_dir, "matmul", distributed_address="127.0.0.1:6200")
    server.start_grpc_server("127.0.0.1:5500")
    server.start_restful_server("127.0.0.1:1500")

In the agents' script (one Agent process per rank's slice file)::

    distributed.startup_agents("127.0.0.1:6200", ["model/matmul0.dinb", "model/matmul1.dinb"])

MindSpore's ``rank_table_json_file`` is accepted and checked against ``rank_size``, and
``group_config_files`` are accepted; dinb needs neither (JAX/XLA's collectives replace HCCL, and
the agents find each other through the JAX coordinator that rank 0 hosts).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinb.errors import DinbError, SliceFileError
from dinb.serving import register
from dinb.serving.agent_launcher import AgentLauncher
from dinb.serving.register import DistributedModel, ServableError, ServableSpec
from dinb.serving.servable_key import keys_for, make_key_file

log = logging.getLogger("dinb.serving")


def declare_servable(
    rank_size: int,
    stage_size: int = 1,
    with_batch_dim: bool = True,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
) -> DistributedModel:
    """Declare the servable's model: ``rank_size`` agents (ranks) in ``stage_size`` pipeline stages.

    ``stage_size > 1`` serves an export with that many pipeline stages (``python -m dinb export
    --pipeline-stages``): the worker sends each request to the first stage's ranks only and takes
    the result from the last stage's, whose ranks must agree. Agents of an export with another
    stage count are refused at registration, naming both counts.

    ``with_batch_dim``: the model's first input axis is the batch, and concurrent requests are
    merged along it; ``without_batch_dim_inputs``: the indices of inputs without that axis.
    """
    if not isinstance(rank_size, int) or rank_size < 1:
        raise ServableError(f"rank_size must be a positive number of ranks, got {rank_size!r}")
    if not isinstance(stage_size, int) or stage_size < 1 or rank_size % stage_size:
        raise ServableError(f"stage_size {stage_size!r} must divide rank_size {rank_size}")
    skip = (
        (without_batch_dim_inputs,)
        if isinstance(without_batch_dim_inputs, int)
        else tuple(without_batch_dim_inputs or ())
    )
    return register.declare(DistributedModel(rank_size, stage_size, bool(with_batch_dim), skip))


def load_servable(servable_directory: str | Path, servable_name: str) -> ServableSpec:
    """Run ``{servable_directory}/{servable_name}/servable_config.py`` and collect what it declares."""
    path = Path(servable_directory) / servable_name / "servable_config.py"
    if not path.is_file():
        raise ServableError(
            f"{path} does not exist: a servable {servable_name!r} is a folder of "
            f"{servable_directory} holding servable_config.py"
        )
    spec = ServableSpec(servable_name)
    module_spec = importlib.util.spec_from_file_location(f"dinb_servable_{servable_name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    register._collecting = spec
    try:
        module_spec.loader.exec_module(module)
    except DinbError:
        raise
    except Exception as e:
        raise ServableError(f"{path} failed: {type(e).__name__}: {e}") from e
    finally:
        register._collecting = None
    if spec.model is None:
        raise ServableError(f"{path} declares no model: call distributed.declare_servable(rank_size=...)")
    if not spec.methods:
        raise ServableError(f"{path} registers no method: decorate one with @register.register_method(...)")
    return spec


def rank_table_devices(path: str | Path) -> int:
    """The number of devices a MindSpore rank table lists."""
    try:
        table = json.loads(Path(path).read_text())
        return sum(len(server["device"]) for server in table["server_list"])
    except FileNotFoundError:
        raise ServableError(f"rank table {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServableError(f"{path} is not a MindSpore rank table (server_list[].device[]): {e}") from None


def _worker_keys(servable_dir: Path, distributed_address: str, key_file: str | Path | None) -> Any:
    """The servable's keys where the worker listens off loopback (its key file, made when missing)."""
    from dinb.job.addresses import is_loopback

    if key_file is None and not is_loopback(distributed_address.rpartition(":")[0].strip("[]")):
        key_file = make_key_file(servable_dir / "servable.key")
        log.warning("servable %r listens off loopback at %s: its agents need the key file %s "
                    "(key_file= / --key-file)", servable_dir.name, distributed_address, key_file)
    return keys_for(distributed_address, key_file, f"servable {servable_dir.name!r}")


def start_servable(
    servable_directory: str | Path,
    servable_name: str,
    rank_table_json_file: str | None = None,
    version_number: int = 1,
    distributed_address: str = "127.0.0.1:6200",
    wait_agents_time_in_seconds: float = 0,
    *,
    batch_delay_ms: float = 0.0,
    max_queue: int = 1024,
    heartbeat_timeout_s: float = 1.5,
    request_timeout_s: float = 60.0,
    handle_sigterm: bool = True,
    local_link: bool = True,
    key_file: str | Path | None = None,
) -> None:
    """Load the servable and start its Distributed Worker at ``distributed_address``; return once
    all ``rank_size`` agents have registered.

    ``wait_agents_time_in_seconds``: how long to wait for them; 0 keeps MindSpore's meaning (no
    limit), saying every 5 s which ranks are still missing. ``batch_delay_ms``: how long the first
    request of a batch waits for others to merge with (0: none; it merges with those that queued
    while the ranks ran the batch before); ``max_queue``: requests waiting at most.
    ``handle_sigterm``: in the main thread, SIGTERM drains and stops the server (as MindSpore's does).
    ``local_link``: agents of this host take requests over a Unix socket instead of ZeroMQ
    (:mod:`dinb.serving.local_link`; off: ZeroMQ for every agent). ``key_file``: the servable's
    key (:mod:`dinb.serving.servable_key`), used where ``distributed_address`` is off loopback;
    without one, ``{servable_directory}/{servable_name}/servable.key`` (made when missing).
    """
    from dinb.serving.main import Main, stop_on_sigterm

    spec = load_servable(servable_directory, servable_name)
    assert spec.model is not None
    if rank_table_json_file is not None:
        devices = rank_table_devices(rank_table_json_file)
        if devices != spec.model.rank_size:
            raise ServableError(
                f"{rank_table_json_file} lists {devices} devices but servable {servable_name!r} "
                f"declares rank_size={spec.model.rank_size}"
            )
    keys = _worker_keys(Path(servable_directory) / servable_name, distributed_address, key_file)
    if handle_sigterm:
        stop_on_sigterm()
    Main.get().add_servable(
        spec,
        distributed_address,
        version_number,
        wait_agents_time_in_seconds or None,
        batch_delay_ms,
        max_queue,
        heartbeat_timeout_s,
        request_timeout_s,
        local_link,
        keys,
    )


# ---- agents --------------------------------------------------------------------------------------
def _agent_files(model_files: Sequence[str | Path], group_config_files: Sequence[str | Path] | None,
                 rank_start: int | None) -> list[Path]:
    """``startup_agents``' slice files, checked: one per rank, all of one job on this machine."""
    files = [Path(f) for f in model_files]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise SliceFileError(f"startup_agents needs one slice file per rank; missing: {missing or 'all'}")
    if group_config_files is not None:
        if len(group_config_files) != len(files):
            raise DinbError(f"{len(group_config_files)} group_config_files for {len(files)} model_files")
        gone = [str(g) for g in group_config_files if not Path(g).is_file()]
        if gone:
            raise DinbError(f"group config file(s) {gone} do not exist")
    if rank_start not in (None, 0):
        raise DinbError(
            f"rank_start={rank_start}: startup_agents starts all ranks of one job on this machine; for "
            "agents spread over several machines start them as one MPI job: mpiexec -f HOSTFILE -n N "
            "python -m dinb serve-agent --distributed-address HOST:PORT --model-dir DIR --key-file KEY"
        )
    return files


def startup_agents(
    distributed_address: str,
    model_files: Sequence[str | Path],
    group_config_files: Sequence[str | Path] | None = None,
    agent_start_port: int = 7000,
    agent_ip: str | None = None,
    rank_start: int | None = None,
    *,
    target: str = "cpu",
    restart: str = "always",
    max_restarts: int = 3,
    worker_timeout_s: float = 300.0,
    log_dir: str | Path | None = None,
    block: bool = True,
    launcher: str = "auto",
    key_file: str | Path | None = None,
) -> AgentLauncher:
    """Start one Agent process per slice file on this machine: rank r loads ``model_files[r]``.

    The agents join one JAX job, register with the worker at ``distributed_address`` and serve.
    ``launcher="mpiexec"`` (what ``"auto"`` picks for CPU agents where mpiexec is found) starts
    them as one MPI job, so they run their collectives over MPI; ``"processes"`` (GPUs) starts
    one process each, rank 0 hosting the JAX coordinator on the first free port from
    ``agent_start_port`` on ``agent_ip`` or 127.0.0.1 (see :mod:`dinb.serving.agent_launcher`).
    ``restart="always"`` relaunches all of them (a new job) when one dies, at most
    ``max_restarts`` times; ``"never"`` leaves them down. ``log_dir`` collects each agent's
    output in ``agent_{rank}.log`` (default: this process's). ``block`` waits until the agents
    stop (the server stopped them, or SIGTERM / Ctrl-C here); otherwise the returned
    :class:`AgentLauncher` runs them in the background. ``key_file``: the servable's key, needed
    when ``distributed_address`` is off loopback (the worker on another host).
    """
    files = _agent_files(model_files, group_config_files, rank_start)
    keys_for(distributed_address, key_file, "startup_agents")  # the key is there when one is needed
    if restart not in ("always", "never"):
        raise DinbError(f"restart must be 'always' or 'never', not {restart!r}")
    launcher = AgentLauncher(
        distributed_address,
        files,
        target,
        agent_ip or "127.0.0.1",
        agent_start_port,
        restart,
        max_restarts,
        worker_timeout_s,
        Path(log_dir) if log_dir is not None else None,
        launcher,
        Path(key_file) if key_file is not None else None,
    )
    launcher.start()
    if block:
        launcher.wait()
    return launcher
