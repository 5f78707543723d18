"""A small Trio TCP proxy on loopback that can misbehave on request.

One :class:`FaultyProxy` sits between one worker slot and the PostgreSQL
server. Its modes:

* ``latency(d)``: every chunk is forwarded ``d`` seconds after it arrived
  (order is kept), in both directions;
* ``blackhole()``: connections stay open and everything sent is read and
  *held*, silently (no FIN, no RST); new connections are accepted and held
  too. ``heal()`` delivers the held bytes, in order;
* ``reset()``: every open connection is closed with an RST, at once;
* ``refuse()``: new connections are reset as soon as they are accepted
  (established ones keep working).
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct

import trio

_CHUNK = 65536


def _rst(stream: trio.SocketStream) -> None:
    """Make the next close of ``stream`` send an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Link:
    """One proxied connection: a client socket, a server socket, four tasks."""

    def __init__(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        self.client = client
        self.server = server
        self.scope = trio.CancelScope()

    def reset(self) -> None:
        _rst(self.client)
        _rst(self.server)
        self.scope.cancel()


class FaultyProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``, with faults on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.delay = 0.0
        self.refusing = False
        self._flowing = trio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()

    # ------------------------------------------------------------ fault switches

    def latency(self, delay: float) -> None:
        self.delay = delay

    def blackhole(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def refuse(self) -> None:
        self.refusing = True

    def reset(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        return len(links)

    def heal(self) -> None:
        """Back to a plain proxy; held bytes are delivered now."""
        self.delay = 0.0
        self.refusing = False
        self._flowing.set()

    # ------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            _rst(client)
            await client.aclose()
            return
        # A black hole holds new connections too, without opening one to the server
        # (so that held connections cannot exhaust max_connections).
        await self._flowing.wait()
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            _rst(client)  # the server is down: the client sees a reset, like a refusal
            await client.aclose()
            return
        link = _Link(client, server)
        self._links.add(link)
        try:
            with link.scope:
                async with client, server, trio.open_nursery() as nursery:
                    for src, dst in ((client, server), (server, client)):
                        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
                        nursery.start_soon(self._read, src, send, nursery.cancel_scope)
                        nursery.start_soon(self._write, receive, dst, nursery.cancel_scope)
        finally:
            self._links.discard(link)

    async def _read(
        self,
        src: trio.SocketStream,
        out: trio.MemorySendChannel[tuple[float, bytes]],
        scope: trio.CancelScope,
    ) -> None:
        await trio.lowlevel.checkpoint()
        try:
            while True:
                data = await src.receive_some(_CHUNK)
                if not data:
                    break
                out.send_nowait((trio.current_time(), data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()
        finally:
            out.close()  # the writer forwards what is queued, then ends the link

    async def _write(
        self,
        queue: trio.MemoryReceiveChannel[tuple[float, bytes]],
        dst: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        await trio.lowlevel.checkpoint()
        try:
            async for arrived, data in queue:
                await self._flowing.wait()
                if self.delay > 0:
                    await trio.sleep_until(arrived + self.delay)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()
