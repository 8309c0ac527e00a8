"""Which local address and interface reach the rendezvous endpoint: gloo and NCCL otherwise
bind to whatever the hostname resolves to (127.0.1.1 on Ubuntu-style hosts files), and the
peers of another node get "connection refused"."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
import time

from dist_train.errors import InfraError

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for_endpoint(endpoint: str, timeout_s: float) -> bool:
    """True once HOST:PORT accepts a TCP connection (node 0's rendezvous store is up), False if
    it does not within `timeout_s`. torch's own store client, given the same timeout, retries
    with a backoff that overshoots it by seconds; this poll keeps a node left alone to it."""
    host, port = split_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, left))):
                return True
        except OSError:
            if left <= 0:
                return False
            time.sleep(min(0.2, max(0.0, left)))


def is_loopback(host: str) -> bool:
    """A loopback address, or the name every machine gives its own (a one-machine test)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def local_addr_to(endpoint: str) -> str:
    """The source address this machine uses to reach HOST:PORT (a UDP "connect" only looks up
    the route: nothing is sent)."""
    host, port = split_endpoint(endpoint)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        # IPv4 first: interfaces are matched by their IPv4 address.
        family, _, _, _, sockaddr = min(found, key=lambda a: a[0] != socket.AF_INET)
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except OSError as e:
        # Retryable: a typo fails every time, but a name not resolvable yet (a PyTorchJob's
        # worker pod can start before the master's service is in DNS) comes with a retry.
        raise InfraError(
            f"--rdzv-endpoint={endpoint!r}: cannot reach {host} from this machine "
            f"({e.strerror or e}); use node 0's address as the other nodes see it"
        ) from None


def default_route_addr() -> str | None:
    """This machine's address on its default route (None without one): a UDP "connect" to a
    documentation address (TEST-NET-2) picks the route without sending anything."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("198.51.100.1", 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def _ipv4_of(ifname: str) -> str | None:
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            request = struct.pack("256s", ifname.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, request)[20:24])
        except OSError:  # no IPv4 address on it
            return None


def interface_of(addr: str) -> str | None:
    """The interface holding `addr` (Linux, IPv4); None elsewhere or when none does."""
    if not sys.platform.startswith("linux") or ":" in addr:
        return None
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == addr:
            return name
    return None
