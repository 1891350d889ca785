#!/usr/bin/env python3
"""Soak helpers for scripts/soak.sh (stdlib only).

Runs two things in one asyncio loop and prints their ports as
`app=PORT dep=PORT` on the first line of stdout:

* the app: a minimal keep-alive HTTP/1.1 server answering `200 ok`;
* a flapping TCP dependency: listens for FLAP seconds, closes for FLAP
  seconds, and so on, so healthgate's state flips up and down.
"""
import asyncio
import os
import sys

FLAP = float(os.environ.get("SOAK_FLAP_SECONDS", "3"))
BODY = b"ok"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\n" + BODY


class App(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        # Requests from healthgate carry no body (wrk sends GETs).
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self.buf = self.buf[i + 4:]
            self.t.write(RESPONSE)


class Dep(asyncio.Protocol):
    def connection_made(self, transport):
        transport.close()


async def main():
    loop = asyncio.get_running_loop()
    app = await loop.create_server(App, "127.0.0.1", 0, backlog=1024)
    probe = await loop.create_server(Dep, "127.0.0.1", 0)
    dep_port = probe.sockets[0].getsockname()[1]
    probe.close()
    print(f"app={app.sockets[0].getsockname()[1]} dep={dep_port}", flush=True)
    up = False
    while True:
        if up:
            dep.close()
            await dep.wait_closed()
        else:
            dep = await loop.create_server(Dep, "127.0.0.1", dep_port, reuse_address=True)
        up = not up
        print(f"dep {'up' if up else 'down'}", file=sys.stderr, flush=True)
        await asyncio.sleep(FLAP)


asyncio.run(main())
