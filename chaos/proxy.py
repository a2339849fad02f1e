"""A loopback TCP proxy that can delay or stall one master's traffic (``python -m chaos.proxy``).

The run starts one proxy process; the workers reach every lock master through it. The process
reads one JSON command per line on stdin and answers each with one JSON line on stdout:

* ``{"op": "listen", "name": N, "upstream": PORT}`` -> ``{"port": P}``: a new link ``N``
  listening on 127.0.0.1:P and forwarding to 127.0.0.1:PORT;
* ``{"op": "delay", "name": N, "seconds": S}``: every chunk, both ways, is held S seconds;
* ``{"op": "partition", "name": N}``: nothing is forwarded either way (connections stay open
  and new ones are accepted, as when packets are dropped and TCP keeps retransmitting);
* ``{"op": "heal", "name": N}``: no delay, no partition; what was held is delivered in order.

Bytes are never dropped or reordered (TCP would not do that either), only held back. The
process exits when stdin closes, so it never outlives the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from typing import Any

__all__ = ["Link", "ProxyProcess", "main"]

LOOPBACK = "127.0.0.1"
CHUNK = 65536


class Link:
    """One listening port forwarding to one upstream port, with its fault state."""

    def __init__(self, name: str, upstream: int) -> None:
        self.name = name
        self.upstream = upstream
        self.delay_s = 0.0
        #: Set while traffic flows; cleared during a partition.
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            try:
                up_r, up_w = await asyncio.open_connection(LOOPBACK, self.upstream)
            except OSError:  # the master is down: the client sees the connection close
                return
            pumps = [asyncio.ensure_future(self._pump(client_r, up_w)),
                     asyncio.ensure_future(self._pump(up_r, client_w))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for pump in pumps:  # one side failed (or we are shutting down): end both
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                up_w.close()
        except (asyncio.CancelledError, OSError):  # shutting down, or a peer reset
            pass
        finally:
            client_w.close()
            if task is not None:
                self.connections.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy ``src`` to ``dst``, each chunk held until its due time and while partitioned."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                while True:
                    await self.open.wait()
                    wait = due - loop.time()
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                try:
                    data = await src.read(CHUNK)
                except OSError:
                    data = b""
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:
                    break
            await sender
        finally:
            if not sender.done():
                sender.cancel()

    def heal(self) -> None:
        self.delay_s = 0.0
        self.open.set()


async def _control(links: dict[str, Link]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        reply: dict[str, Any] = {"ok": True}
        try:
            cmd = json.loads(line)
            op, name = cmd["op"], cmd["name"]
            if op == "listen":
                link = links[name] = Link(name, int(cmd["upstream"]))
                reply["port"] = await link.start()
            elif op == "delay":
                links[name].delay_s = float(cmd["seconds"])
            elif op == "partition":
                links[name].open.clear()
            elif op == "heal":
                links[name].heal()
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # answer every command, also a bad one
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


async def _main() -> None:
    links: dict[str, Link] = {}
    try:
        await _control(links)
    finally:
        for link in links.values():
            if link.server is not None:
                link.server.close()
            for task in list(link.connections):
                task.cancel()


def main() -> None:
    asyncio.run(_main())


class ProxyProcess:
    """The run's side of the proxy: starts ``python -m chaos.proxy`` and sends it commands."""

    def __init__(self, preexec_fn: Any = None) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "chaos.proxy"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec_fn,
        )
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def command(self, **cmd: Any) -> dict[str, Any]:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        with self._lock:
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the proxy exited ({proc.poll()}) on {cmd}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"proxy command {cmd} failed: {reply.get('error')}")
        return reply

    def listen(self, name: str, upstream_port: int) -> int:
        """Open link ``name`` to 127.0.0.1:``upstream_port``; returns its own port."""
        return int(self.command(op="listen", name=name, upstream=upstream_port)["port"])

    def delay(self, name: str, seconds: float) -> None:
        self.command(op="delay", name=name, seconds=seconds)

    def partition(self, name: str) -> None:
        self.command(op="partition", name=name)

    def heal(self, name: str) -> None:
        self.command(op="heal", name=name)

    def close(self) -> None:
        """Close stdin (the proxy exits on EOF); kill it if it does not within 5 s."""
        proc = self._proc
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    main()
