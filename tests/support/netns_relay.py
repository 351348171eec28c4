"""A network namespace for one participant whose link we impair, joined to the LiveKit server by a relay.

    python -m tests.support.netns_relay --tcp-port 7880 --udp-port 7882 --ready-file /tmp/x

The process moves itself into a new network namespace of its own (it must run as root, or inside
`unshare -r`), brings up that namespace's loopback, and relays, on the namespace's 127.0.0.1, the LiveKit
server's signalling port (TCP) and its single ICE/UDP port to the same ports on the outer namespace's
127.0.0.1 (the namespace also gets a veth pair with addresses of its own, 10.233.0.0/30, for WebRTC's
candidates): each connection or UDP peer gets an upstream socket created in the outer namespace. A participant
started in this namespace (`nsenter --net=/proc/<pid>/ns/net ...`) reaches LiveKit at the usual URL, and
all its traffic crosses the namespace's loopback, where `tc ... tbf` (bandwidth cap, small queue: delay and
loss) impairs it. Only loopback addresses, in two namespaces. `netem` is not available on this kernel (no
sch_netem); tbf is.

When ready it writes its pid into the ready file.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import socket
import subprocess
from pathlib import Path
from typing import cast

CLONE_NEWNET = 0x40000000
LOOPBACK = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


class Namespaces:
    """The outer network namespace (kept open) and our own: sockets are created in one or the other."""

    def __init__(self) -> None:
        self.outer = os.open("/proc/self/ns/net", os.O_RDONLY)
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        self.inner = os.open("/proc/self/ns/net", os.O_RDONLY)
        for command in (
            "ip link set lo up",
            # WebRTC gathers no candidate on a loopback-only host: a veth pair (both ends here) gives it an
            # interface with a namespace-local address; the traffic to LiveKit (127.0.0.1) still crosses lo.
            "ip link add sf0 type veth peer name sf1",
            "ip addr add 10.233.0.2/30 dev sf0",
            "ip addr add 10.233.0.1/30 dev sf1",
            "ip link set sf0 up",
            "ip link set sf1 up",
        ):
            subprocess.run(command.split(), check=True)

    def outer_socket(self, kind: int) -> socket.socket:
        """A socket in the outer namespace (where LiveKit listens); we stay in ours."""
        _check(_libc.setns(self.outer, CLONE_NEWNET), "setns(outer)")
        try:
            sock = socket.socket(socket.AF_INET, kind)
        finally:
            _check(_libc.setns(self.inner, CLONE_NEWNET), "setns(inner)")
        sock.setblocking(False)
        return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def relay_tcp(ns: Namespaces, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = ns.outer_socket(socket.SOCK_STREAM)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
        except OSError:
            sock.close()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=sock)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return await asyncio.start_server(handle, LOOPBACK, port)


class UdpRelay(asyncio.DatagramProtocol):
    """The namespace's side of the UDP port: one upstream socket (outer namespace) per participant address."""

    def __init__(self, ns: Namespaces, port: int) -> None:
        self.ns, self.port = ns, port
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: dict[tuple[str, int], asyncio.DatagramTransport] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # a datagram endpoint's (not a subclass in 3.11)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self.upstream.get(addr)
        if up is not None:
            up.sendto(data)
            return
        asyncio.get_running_loop().create_task(self._open(addr, data))

    async def _open(self, addr: tuple[str, int], first: bytes) -> None:
        if addr in self.upstream:
            self.upstream[addr].sendto(first)
            return
        sock = self.ns.outer_socket(socket.SOCK_DGRAM)
        sock.connect((LOOPBACK, self.port))
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: tuple[str, int]) -> None:
                assert relay.transport is not None
                relay.transport.sendto(data, addr)

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Back, sock=sock)
        self.upstream[addr] = transport
        transport.sendto(first)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--udp-port", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    ns = Namespaces()
    server = await relay_tcp(ns, args.tcp_port)
    await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: UdpRelay(ns, args.udp_port), local_addr=(LOOPBACK, args.udp_port)
    )
    args.ready_file.write_text(str(os.getpid()))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
