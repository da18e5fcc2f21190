"""Two hosts on one machine: two Linux network namespaces joined by a veth pair.

Each namespace ("host") has its own address on an interface named ``dinb0`` (the same name on
both, so ``mpiexec -iface dinb0`` fits either). ``ssh`` is a script: ``ssh [options] HOST
COMMAND`` runs COMMAND in HOST's namespace under HOST's own host name (a UTS namespace), which
is how hydra (``-launcher ssh -launcher-exec``) and ipyparallel's SSH launcher reach a host.
Needs root; :func:`make` raises ``Unavailable`` with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """Namespaces cannot be made here (not root, no iproute2, or the kernel refuses)."""


@dataclass
class Host:
    name: str  # host name inside the namespace
    netns: str  # the namespace
    address: str

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run a command on this host (in its namespace, under its host name)."""
        shell = f"hostname {self.name}; exec \"$0\" \"$@\""
        return subprocess.run(["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", shell,
                               *cmd], **kw)

    def listening(self) -> list[tuple[str, str]]:
        """``(local address:port, process)`` of every TCP socket listening on this host."""
        out = subprocess.run(["ip", "netns", "exec", self.netns, "ss", "-ltnpH"], capture_output=True,
                             text=True, check=True).stdout
        return [(line.split()[3], line.split()[-1]) for line in out.splitlines() if line.strip()]


@dataclass
class TwoHosts:
    a: Host
    b: Host
    ssh: Path  # the "ssh" into a host

    def remove(self) -> None:
        for host in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)


SSH_SCRIPT = """#!/bin/sh
# ssh [options] HOST COMMAND...: the host is a network namespace of this machine
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case $host in
  {a.address}|{a.name}) ns={a.netns}; name={a.name};;
  {b.address}|{b.name}) ns={b.netns}; name={b.name};;
  *) echo "no such host: $host" >&2; exit 255;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; $*"
"""


def make(tmp: Path) -> TwoHosts:
    """Create the two namespaces and the link between them (``remove()`` deletes them)."""
    if os.geteuid() != 0:
        raise Unavailable("creating network namespaces needs root")
    if shutil.which("ip") is None or shutil.which("unshare") is None or shutil.which("ss") is None:
        raise Unavailable("needs ip and ss (iproute2) and unshare (util-linux)")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    hosts = TwoHosts(Host("hosta", f"dinb{tag}a", f"{subnet}.1"), Host("hostb", f"dinb{tag}b", f"{subnet}.2"),
                     tmp / "ssh")
    steps = [["ip", "netns", "add", hosts.a.netns], ["ip", "netns", "add", hosts.b.netns],
             ["ip", "link", "add", f"d{tag}a", "type", "veth", "peer", "name", f"d{tag}b"]]
    for host, veth in ((hosts.a, f"d{tag}a"), (hosts.b, f"d{tag}b")):
        steps += [["ip", "link", "set", veth, "netns", host.netns],
                  ["ip", "-n", host.netns, "link", "set", veth, "name", "dinb0"],
                  ["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "dinb0"],
                  ["ip", "-n", host.netns, "link", "set", "dinb0", "up"],
                  ["ip", "-n", host.netns, "link", "set", "lo", "up"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            hosts.remove()
            raise Unavailable(f"{' '.join(step)} failed: {done.stderr.strip()}")
    hosts.ssh.write_text(SSH_SCRIPT.format(a=hosts.a, b=hosts.b))
    hosts.ssh.chmod(0o755)
    return hosts
