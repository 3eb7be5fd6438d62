"""The gunicorn worker the service runs (`worker_class` in gunicorn.conf.py): uvicorn-worker's, with a shutdown
that loses no request at SIGTERM.

uvicorn's own shutdown closes the listening socket, which resets every connection the kernel had already
accepted into the listen backlog, and closes every connection that is not inside a request at that moment,
which resets a request whose bytes are still on their way or only partly read. A platform's proxy (Cloud Run,
Fly) may hold requests on those connections when it sends SIGTERM: each reset is a request lost (issue 16).
Here, at SIGTERM:

1. the listener is closed, but the connections already in its backlog are accepted first, and served;
2. every connection gets SHUTDOWN_REQUEST_WINDOW seconds to deliver a request; every request that arrives
   (or is already being read) is answered, with `Connection: close`;
3. an idle connection is closed only after that window, and never while the kernel holds unread bytes of it;
4. then uvicorn waits for the answers in flight, and gunicorn's GRACEFUL_TIMEOUT bounds the whole.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import socket
import sys
import termios
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

log = logging.getLogger("uvicorn.error")

POLL_SECONDS = 0.02
# The bounds of reading the rest of a body after an answer that closes the connection: nginx's defaults for its
# lingering close (lingering_time 30s, lingering_timeout 5s; https://nginx.org/en/docs/http/ngx_http_core_module.html#lingering_time,
# read 2026-12-06). Under GRACEFUL_TIMEOUT at shutdown, gunicorn's bound wins.
LINGER_SECONDS = 30.0
LINGER_IDLE_SECONDS = 5.0


class DrainingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that knows when a request has begun arriving, answers every request that
    begins once the server is draining with `Connection: close`, and never resets a connection under an answer
    sent before the request's body was read (a lingering close, as nginx does).

    An answer can go out before its body is read: the 401 of a missing API key, a 413, a 503 while loading.
    On a kept-alive connection uvicorn reads the rest of the body and drops it. But on a connection it closes
    after the answer (the client sent `Connection: close` or HTTP/1.0, the server is draining), closing a socket
    with unread bytes makes the kernel send a reset: the client, still sending its body, gets ECONNRESET instead
    of the answer. Here such a close sends the answer and a FIN (the write side only), reads the rest of the
    body and drops it, then closes: at the body's end, the client's EOF, LINGER_IDLE_SECONDS without a byte or
    LINGER_SECONDS in all, whichever comes first.
    """

    receiving = False  # a request's first bytes are parsed but its headers are not complete yet
    body_done = True  # the request being read has been read to its end
    lingering: asyncio.TimerHandle | None = None  # closing, once the body is read (the bound's timer)
    last_read = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.cycle_transport = _ClosesAfterBody(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lingering is not None:
            self.lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            self.last_read = self.loop.time()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.receiving = True
        self.body_done = False

    def on_headers_complete(self) -> None:
        self.receiving = False
        if self.transport.is_closing():  # a request behind one whose answer closed the connection: not served
            return
        super().on_headers_complete()
        self.cycle.transport = self.cycle_transport  # type: ignore[union-attr]
        if getattr(self.server_state, "draining", False):
            self.cycle.keep_alive = False  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.body_done = True
        if self.lingering is not None:
            self.transport.close()

    def close_after_body(self) -> None:
        """Close the connection now if the request's body has been read, else once it has (within the bounds)."""
        if self.body_done or self.lingering is not None or self.transport.is_closing():
            if self.lingering is None:
                self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer to its end while it still sends
        self.flow.resume_reading()
        now = self.loop.time()
        self.last_read, self.linger_until = now, now + LINGER_SECONDS
        self.lingering = self.loop.call_later(LINGER_IDLE_SECONDS, self._linger_bound)

    def _linger_bound(self) -> None:
        now = self.loop.time()
        ends = min(self.linger_until, self.last_read + LINGER_IDLE_SECONDS)
        if now >= ends:
            self.transport.close()
        else:
            self.lingering = self.loop.call_later(ends - now, self._linger_bound)

    def idle(self) -> bool:
        """No request being read or answered, and none waiting unread in the kernel's buffer."""
        if self.receiving or self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            return False
        if self.lingering is not None:
            return False  # it closes itself once the body is read
        return _unread_bytes(self.transport) == 0


class _ClosesAfterBody:
    """The transport a request's cycle writes its answer to: uvicorn's, but for `close`, which waits for the
    request's body (DrainingProtocol.close_after_body)."""

    __slots__ = ("protocol", "transport", "write", "is_closing")

    def __init__(self, protocol: DrainingProtocol, transport: asyncio.Transport):
        self.protocol, self.transport = protocol, transport
        self.write, self.is_closing = transport.write, transport.is_closing

    def close(self) -> None:
        self.protocol.close_after_body()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _unread_bytes(transport: asyncio.Transport) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]


def _closed(sock: Any) -> bool:
    """Whether the event loop has closed this listener (gunicorn's wrapper drops its socket when closed)."""
    inner = getattr(sock, "sock", sock)
    return inner is None or inner.fileno() == -1


class DrainingServer(Server):
    """uvicorn's Server with the shutdown described in this module's docstring."""

    request_window = 1.0  # SHUTDOWN_REQUEST_WINDOW; gunicorn.conf.py sets it in the master, before the fork

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("Shutting down: answering every request that reached this worker")
        self.server_state.draining = True  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        window_ends = loop.time() + self.request_window
        # The event loop closes its listeners on its next turns, and with the last descriptor of a listener the
        # kernel resets the connections still in its backlog: hold a duplicate until the backlog is taken.
        held = [socket.socket(fileno=os.dup(sock.fileno())) for sock in sockets or []]
        for server in self.servers:
            server.close()
        give_up = loop.time() + 1.0
        while not all(_closed(sock) for sock in sockets or []) and loop.time() < give_up:
            await asyncio.sleep(0.001)
        taken = [task for listener in held for task in self._take_backlog(listener)]
        for listener in held:
            listener.close()  # right after: the kernel has (next to) nothing left to reset
        if taken:
            await asyncio.gather(*taken, return_exceptions=True)  # each connection is in `connections` now

        while self.server_state.connections and not self.force_exit:
            past_window = loop.time() >= window_ends
            for connection in list(self.server_state.connections):
                if not isinstance(connection, DrainingProtocol):
                    connection.shutdown()
                elif connection.cycle is not None and not connection.cycle.response_complete:
                    connection.cycle.keep_alive = False
                elif past_window and connection.idle():
                    connection.transport.close()
            await asyncio.sleep(POLL_SECONDS)

        while self.server_state.tasks and not self.force_exit:
            await asyncio.sleep(POLL_SECONDS)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _take_backlog(self, listener: socket.socket) -> list[asyncio.Task]:
        """Accept every connection the kernel has completed on the listener, to be served like any other."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        tasks = []
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return tasks
            conn.setblocking(False)
            tasks.append(loop.create_task(loop.connect_accepted_socket(self._new_protocol, conn)))

    def _new_protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )


_serving: Any = None  # this process's uvicorn ServerState, once a Worker serves


def requests_in_flight() -> int | None:
    """The requests this worker has begun (headers read) and not yet answered, this one included; None when the
    app is not served by this module's Worker (in-process tests, other servers). The batching scheduler reads it:
    a request alone in the worker has no one to wait a loop turn for."""
    return None if _serving is None else len(_serving.tasks)


class Worker(UvicornWorker):
    """uvicorn-worker's UvicornWorker (uvloop, httptools) serving through DrainingServer."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": DrainingProtocol}

    async def _serve(self) -> None:
        # As UvicornWorker._serve, with DrainingServer.
        global _serving
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        _serving = server.server_state
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
