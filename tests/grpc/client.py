"""A real gRPC client for tests/grpc.rs: one call, the outcome as JSON.

usage: client.py TARGET unary|stream METHOD REQUEST [TIMEOUT_S]
Prints {"code", "details", "responses", "trailers", "status"}; "status" is
the decoded grpc-status-details-bin (google.rpc.Status with ErrorInfo and
RetryInfo unpacked) or null.
"""
import json
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

target, kind, method, request = sys.argv[1:5]
timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
channel = grpc.insecure_channel(target)
ident = lambda b: b
out = {"code": "OK", "details": None, "responses": [], "trailers": {}, "status": None}
try:
    if kind == "unary":
        call = channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)
        resp, c = call.with_call(request.encode(), timeout=timeout)
        out["responses"] = [resp.decode()]
        out["trailers"] = dict(c.trailing_metadata() or ())
    else:
        call = channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)
        it = call(request.encode(), timeout=timeout)
        for r in it:
            out["responses"].append(r.decode())
        out["trailers"] = dict(it.trailing_metadata() or ())
except grpc.RpcError as e:
    out["code"] = e.code().name
    out["details"] = e.details()
    out["trailers"] = {k: (v if isinstance(v, str) else v.hex()) for k, v in (e.trailing_metadata() or ())}
    s = rpc_status.from_call(e)
    if s is not None:
        st = {"code": s.code, "message": s.message, "error_info": None, "retry_delay_s": None}
        for d in s.details:
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                ei = error_details_pb2.ErrorInfo()
                d.Unpack(ei)
                st["error_info"] = {"reason": ei.reason, "domain": ei.domain, "metadata": dict(ei.metadata)}
            elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                d.Unpack(ri)
                st["retry_delay_s"] = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
        out["status"] = st
print(json.dumps(out))
