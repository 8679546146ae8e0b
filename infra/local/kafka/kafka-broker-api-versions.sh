#!/usr/bin/python3
"""The healthcheck compose.yaml runs against apache/kafka, answered without a JVM: one real
ApiVersions round trip (v0) to --bootstrap-server; exit 0 only on error code 0."""

import socket
import struct
import sys

args = sys.argv[1:]
server = args[args.index("--bootstrap-server") + 1] if "--bootstrap-server" in args else "localhost:9092"
host, port = server.rsplit(":", 1)
client = b"healthcheck"
body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
with socket.create_connection((host, int(port)), timeout=10) as sock:
    sock.sendall(struct.pack(">i", len(body)) + body)
    size = struct.unpack(">i", sock.recv(4, socket.MSG_WAITALL))[0]
    reply = sock.recv(size, socket.MSG_WAITALL)
correlation, error = struct.unpack(">ih", reply[:6])
sys.exit(0 if correlation == 1 and error == 0 else 1)
