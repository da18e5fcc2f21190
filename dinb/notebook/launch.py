"""How a cluster's engines are started: the ipyparallel launcher for ``mpi``, ``ssh``,
``slurm`` and ``local`` engines, their hosts, and where the controller listens.

:class:`Launch` is the part of a :class:`~dinb.notebook.cluster.RankCluster` that knows this;
it holds only the launch settings (and the hostfile it may write, removed by :meth:`Launch.close`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinb.errors import ClusterError
from dinb.job import addresses
from dinb.job.launchers import find_mpiexec, is_open_mpi


def _mpiexec() -> str:
    return find_mpiexec() or "mpiexec"


def _mpi_launch_args(mpiexec: str, hostfile: str | None) -> list[str]:
    """The engines' ``mpiexec`` flags, in the dialect of the MPI it belongs to.

    mpich's hydra: ``-disable-auto-cleanup`` asks it not to end the other ranks when one dies (it
    ends them anyway, measured, so the death watch orders the exits), ``-f`` names the hostfile.
    Open MPI (what GPU clusters ship): ``--hostfile``, and ``--allow-run-as-root`` when root;
    hydra's flags would make it refuse to start.
    """
    if is_open_mpi(mpiexec):
        args = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return args + (["--hostfile", hostfile] if hostfile else [])
    return ["-disable-auto-cleanup"] + (["-f", hostfile] if hostfile else [])


@dataclass
class Launch:
    """Where ``n`` engines and the controller go (see :class:`~dinb.notebook.cluster.RankCluster`
    for the meaning of each setting)."""

    n: int
    engines: str = "mpi"
    hosts: list[str] | str | Path | None = None
    controller_ip: str | None = None
    mpi_args: list[str] = field(default_factory=list)
    ssh_cmd: list[str] | None = None
    warm: bool | None = None
    hostfile: str | None = None  # the one this launch wrote for hosts=[...], if any

    def controller_address(self) -> str:
        """Where the controller listens: the given address; loopback when every engine runs on
        this host; else this host's address on the route to the first other host."""
        if self.controller_ip:
            return addresses.split_address(self.controller_ip, "controller_ip")[0]
        if self.engines == "slurm":
            source = addresses.route_source("192.0.2.1")  # the interface of the default route
            if source is None:
                raise ClusterError("Slurm engines need the controller on an address the nodes reach; "
                                   "pass controller_ip='ADDRESS of this host'")
            return source
        mine = addresses.local_addresses()
        for host in self.host_list():
            ip = addresses.split_address(host, "hosts")[0]
            if not addresses.is_loopback(ip) and ip not in mine:
                return addresses.own_address(ip)
        return addresses.LOOPBACK

    def host_list(self) -> list[str]:
        if self.hosts is None:
            return []
        if isinstance(self.hosts, (str, Path)):
            path = Path(self.hosts)
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise ClusterError(f"hostfile {path} cannot be read ({e.strerror or e})") from None
            names = [ln.split("#")[0].split()[0].split(":")[0] for ln in lines if ln.split("#")[0].strip()]
            if not names:
                raise ClusterError(f"hostfile {path} names no host")
            return names
        return [str(h) for h in self.hosts]

    def uses_warm_start(self) -> bool:
        """Whether the engines and the controller are forked from the warm factory
        (:mod:`dinb.notebook.warm_start`): ``warm=None`` takes it for local engines and for mpich's
        engines on this host."""
        if self.warm is False or self.engines not in ("local", "mpi") or self.hosts:
            return False
        fits = self.engines == "local" or not is_open_mpi(_mpiexec())
        if self.warm and not fits:
            raise ClusterError("warm=True forks engines on this host from a warm process: local "
                               "engines, or MPI engines under mpich's mpiexec (not Open MPI's)")
        return fits

    def configure(self, config: Any) -> None:
        """ipyparallel's launcher configuration for ``engines`` and ``hosts``."""
        config.EngineLauncher.engine_args = [
            "--IPEngine.startup_command=import dinb.notebook.engine; dinb.notebook.engine.preload()"]
        if self.uses_warm_start():
            from dinb.notebook.warm_start import factory

            warm = factory()
            config.LocalControllerLauncher.controller_cmd = warm.command("ipyparallel.controller")
            for launcher in ("LocalEngineLauncher", "LocalEngineSetLauncher", "MPIEngineSetLauncher"):
                config[launcher].engine_cmd = warm.command("ipyparallel.engine")
        if self.engines == "mpi":
            mpiexec = _mpiexec()
            config.MPILauncher.mpi_cmd = [mpiexec]
            hostfile = str(self.hosts) if isinstance(self.hosts, (str, Path)) else None
            if self.hosts and hostfile is None:
                fd, self.hostfile = tempfile.mkstemp(prefix="dinb-hosts-", suffix=".txt")
                with os.fdopen(fd, "w") as f:
                    f.write("".join(f"{h}\n" for h in self.host_list()))
                hostfile = self.hostfile
            config.MPILauncher.mpi_args = _mpi_launch_args(mpiexec, hostfile) + self.mpi_args
        elif self.engines == "ssh":
            hosts = self.host_list()
            counts = {h: 0 for h in hosts}
            for r in range(self.n):  # round robin, as a hostfile without counts
                counts[hosts[r % len(hosts)]] += 1
            config.SSHEngineSetLauncher.engines = {h: c for h, c in counts.items() if c}
            if self.ssh_cmd:
                config.SSHLauncher.ssh_cmd = list(self.ssh_cmd)

    def close(self) -> None:
        """Remove the hostfile this launch wrote."""
        if self.hostfile is not None:
            os.unlink(self.hostfile)
            self.hostfile = None
