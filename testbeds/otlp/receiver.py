#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver for sidetrack's tests.

Accepts `POST /v1/traces` (protobuf, optionally gzip), decodes each request with the official
OpenTelemetry protobuf definitions (the `opentelemetry-proto` package), and keeps every span as
one flat JSON object. Tests read them back with `GET /spans` (JSON lines; `?trace_id=HEX`
filters) and forget them with `DELETE /spans`. It decodes independently of the Rust SDK on
purpose: a test that reads this receiver checks what was put on the wire, not sidetrack's
structs.

Usage: receiver.py PORT   (binds 127.0.0.1 only)
"""

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

LOCK = threading.Lock()
SPANS = []


def any_value(v):
    """An AnyValue as plain JSON (ints stay ints; arrays and maps recurse)."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def flatten(request):
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "trace_state": s.trace_state,
                        "flags": s.flags,
                        "name": s.name,
                        "kind": Span.SpanKind.Name(s.kind),
                        "start_unix_nano": s.start_time_unix_nano,
                        "end_unix_nano": s.end_time_unix_nano,
                        "attributes": attributes(s.attributes),
                        "events": [
                            {"name": e.name, "attributes": attributes(e.attributes)}
                            for e in s.events
                        ],
                        "links": [
                            {
                                "trace_id": l.trace_id.hex(),
                                "span_id": l.span_id.hex(),
                                "attributes": attributes(l.attributes),
                            }
                            for l in s.links
                        ],
                        "status": {
                            "code": Status.StatusCode.Name(s.status.code),
                            "message": s.status.message,
                        },
                        "scope": ss.scope.name,
                        "resource": resource,
                    }
                )
    return out


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):  # quiet: the tests print what they need
        pass

    def reply(self, code, body, ctype):
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if urlparse(self.path).path != "/v1/traces":
            return self.reply(404, b"not found", "text/plain")
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.headers.get("content-encoding", "") == "gzip":
            body = gzip.decompress(body)
        if "protobuf" not in self.headers.get("content-type", ""):
            return self.reply(415, b"only application/x-protobuf", "text/plain")
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as e:  # a malformed body is the exporter's bug: say so
            return self.reply(400, str(e).encode(), "text/plain")
        spans = flatten(request)
        with LOCK:
            SPANS.extend(spans)
        self.reply(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self.reply(200, b"ok", "text/plain")
        if url.path != "/spans":
            return self.reply(404, b"not found", "text/plain")
        want = parse_qs(url.query).get("trace_id")
        with LOCK:
            spans = [s for s in SPANS if not want or s["trace_id"] in want]
        body = "".join(json.dumps(s, sort_keys=True) + "\n" for s in spans).encode()
        self.reply(200, body, "application/x-ndjson")

    def do_DELETE(self):
        with LOCK:
            SPANS.clear()
        self.reply(200, b"", "text/plain")


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"otlp receiver on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
