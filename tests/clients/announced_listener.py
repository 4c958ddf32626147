"""Serves an ASGI app under uvicorn on 127.0.0.1, announcing the port before serving.

Binding first and printing `MCP_PEER_LISTENING <port>` on stderr lets a test start a peer on
port 0 and learn the free port it got, without a race.
"""

import socket
import sys

import uvicorn


async def serve_announced(app, port, **uvicorn_settings):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sys.stderr.write(f"MCP_PEER_LISTENING {sock.getsockname()[1]}\n")
    sys.stderr.flush()
    config = uvicorn.Config(app, log_level="warning", **uvicorn_settings)
    await uvicorn.Server(config).serve(sockets=[sock])
