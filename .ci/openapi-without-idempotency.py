"""Reads the proxy's OpenAPI document on stdin and writes it without the Idempotency-Key header.

schemathesis sends the same generated Idempotency-Key with different bodies, which the proxy
rightly answers 422 (42206, reused for another request): state no schema can express. The
header's own format is covered by the proxy's unit and integration tests.
"""
import json
import sys

doc = json.load(sys.stdin)
for item in doc["paths"].values():
    for op in item.values():
        op["parameters"] = [
            p for p in op.get("parameters", []) if p.get("name") != "Idempotency-Key"
        ]
json.dump(doc, sys.stdout)
