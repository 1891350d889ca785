"""A real gRPC app for tests/grpc.rs (grpcio, generic handlers: no codegen).

svc.Echo/Say (unary): answers b"echo:" + request, with trailing metadata
x-trailer: said. svc.Echo/Items (server streaming): the request is
b"N" or b"N,MS": N messages b"item-I", MS milliseconds apart, then trailing
metadata x-trailer: streamed. svc.Echo/Sleep (unary): sleeps int(request)
milliseconds. svc.Echo/Calls (unary): the number of calls served so far,
itself excluded. grpc.health.v1.Health/Check answers SERVING (a bare
HealthCheckResponse{status: SERVING}). Prints its port, then serves.
"""
import sys
import threading
import time
from concurrent import futures

import grpc

lock = threading.Lock()
calls = 0


def count():
    global calls
    with lock:
        calls += 1


def say(req, ctx):
    count()
    ctx.set_trailing_metadata((("x-trailer", "said"),))
    return b"echo:" + req


def items(req, ctx):
    count()
    parts = req.decode().split(",")
    n, gap = int(parts[0]), (int(parts[1]) if len(parts) > 1 else 0)
    for i in range(n):
        if i and gap:
            time.sleep(gap / 1000)
        yield b"item-%d" % i
    ctx.set_trailing_metadata((("x-trailer", "streamed"),))


def sleep(req, ctx):
    count()
    time.sleep(int(req) / 1000)
    return b"slept"


def get_calls(req, ctx):
    with lock:
        return str(calls).encode()


def check(req, ctx):
    count()
    return b"\x08\x01"


handlers = [
    grpc.method_handlers_generic_handler(
        "svc.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Items": grpc.unary_stream_rpc_method_handler(items),
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
            "Calls": grpc.unary_unary_rpc_method_handler(get_calls),
        },
    ),
    grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    ),
]
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers(handlers)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()  # until the test drops our stdin
server.stop(0)
