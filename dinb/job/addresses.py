"""Which network address a rank listens on and gives to the others.

A job on one host keeps everything on loopback (127.0.0.1): nothing is reachable from the
network. A job whose ranks are on several hosts needs addresses the other hosts can reach, and
dinb picks them the way a user would, never the wildcard 0.0.0.0:

* the user names one (``--coordinator-address``, ``DINB_COORDINATOR_ADDRESS``, the config key
  ``coordinator_address``): rank 0 hosts the JAX coordinator there;
* otherwise rank 0 takes its own address on the interface that routes to the other hosts
  (:func:`pick_reachable`): the kernel's route lookup for a UDP socket "connected" to a peer's
  address gives the local address packets to that peer leave from; no packet is sent.

Every other socket of a rank (the gloo collectives, the notebook's predict socket) binds the
rank's own address on the route back to the coordinator (or the notebook's controller), so each
rank listens on one interface only.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from dinb.errors import DinbError

LOOPBACK = "127.0.0.1"
ENV_COORDINATOR = "DINB_COORDINATOR_ADDRESS"
_SIOCGIFADDR = 0x8915


class AddressError(DinbError):
    """An address given by the user cannot be used, or no address reaches the other hosts."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def split_address(text: str, source: str) -> tuple[str, int | None]:
    """``"host"`` or ``"host:port"`` -> ``(host, port or None)``; ``source`` names where the text
    came from (an option, a variable, a config file) in the error."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    if not host or host in ("0.0.0.0", "*", "::"):
        raise AddressError(
            f"{source} = {text!r}: give the address other hosts reach rank 0 at (host or host:port), "
            "not a wildcard: the coordinator binds exactly that address")
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise AddressError(f"{source} = {text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        raise AddressError(f"{source} = {text!r}: host {host!r} does not resolve on this machine") from None
    return resolved, port


def coordinator_choice(option: str | None, config_value: str | None = None) -> tuple[str, str] | None:
    """The coordinator address the user asked for and where it came from: the command-line
    option, then the environment variable, then the config file; None when none was given."""
    for text, source in ((option, "--coordinator-address"),
                         (os.environ.get(ENV_COORDINATOR), ENV_COORDINATOR),
                         (config_value, "config coordinator_address")):
        if text:
            return text, source
    return None


def local_addresses() -> list[str]:
    """The IPv4 addresses of this host's interfaces that are up, loopback excluded."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(packed[20:24])
            if not is_loopback(address) and address not in found:
                found.append(address)
    return found


def route_source(peer: str) -> str | None:
    """The local address that packets to ``peer`` leave from (None: no route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))
        except OSError:
            return None
        return str(s.getsockname()[0])


def pick_reachable(mine: list[str], others: list[list[str]]) -> str:
    """Rank 0's address that reaches every other host, given each host's own addresses.

    An address present on this host too (a docker bridge's 172.17.0.1 exists on every host)
    says nothing about the route, so it is skipped; the first remaining address of each other
    host must be routed from the same local address.
    """
    chosen: set[str] = set()
    for theirs in others:
        sources = [route_source(a) for a in theirs if a not in mine]
        sources = [s for s in sources if s and not is_loopback(s)]
        if not sources:
            raise AddressError(
                f"no route from rank 0's addresses {mine} to another host's {theirs}; set "
                f"--coordinator-address (or {ENV_COORDINATOR}) to rank 0's address on the network "
                "the hosts share")
        chosen.add(sources[0])
    if len(chosen) != 1:
        raise AddressError(
            f"rank 0 reaches the other hosts from several addresses {sorted(chosen)}; name the one "
            f"they all reach with --coordinator-address (or {ENV_COORDINATOR})")
    return chosen.pop()


def own_address(towards: str) -> str:
    """This process's address for listening sockets: loopback when ``towards`` (the coordinator
    or controller) is loopback, else the local address on the route to it."""
    if is_loopback(towards):
        return LOOPBACK
    if towards in local_addresses():
        return towards
    source = route_source(towards)
    if source is None:
        raise AddressError(f"this host has no route to {towards}; check the network between the hosts")
    return source


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now, on ``host``."""
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise AddressError(f"cannot listen on {host} ({e.strerror}); it is not an address of "
                               "this host") from None
        return int(s.getsockname()[1])


def host_key() -> str:
    """Which host (and network namespace) this process is on: processes with the same key reach
    each other on loopback and see each other's process ids."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    try:
        net = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        net = 0
    return f"{socket.gethostname()}/{boot}/{net}"
