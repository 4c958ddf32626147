#!/usr/bin/env python3
"""Serve the real `mcp-server-time` over Streamable HTTP on 127.0.0.1.

`mcp-server-time` itself only speaks stdio. This wrapper serves the very server object the
package builds (`mcp_server_time.server.create_server`) through the Python SDK's own
Streamable HTTP transport, which answers both protocol eras: the initialize handshake with
`Mcp-Session-Id` (2025-06-18, 2025-11-25) and sessionless 2026-07-28 requests (`server/discover`,
`_meta` envelope, `MCP-Protocol-Version`/`Mcp-Method`/`Mcp-Name` checked against the body).

    <peers>/venv/bin/python tests/clients/time_http_server.py [--port 0] [--path /mcp]
        [--json-response] [--stateless] [--local-timezone UTC]
        [--tls-cert CERT.pem --tls-key KEY.pem]     (serve https:// instead of http://)

It binds before serving and prints one line `MCP_PEER_LISTENING <port>` on stderr, so
`--port 0` (the default) gives a free port without a race. SIGTERM/SIGINT stop it.
"""

import argparse

import anyio
from announced_listener import serve_announced
from mcp_server_time.server import create_server, get_local_tz


async def serve(args):
    server = create_server(str(get_local_tz(args.local_timezone)))
    app = server.streamable_http_app(
        streamable_http_path=args.path,
        json_response=args.json_response,
        stateless_http=args.stateless,
        host="127.0.0.1",
    )
    await serve_announced(app, args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--json-response", action="store_true", help="answer POSTs with JSON, not SSE")
    parser.add_argument("--stateless", action="store_true", help="no Mcp-Session-Id for the handshake era")
    parser.add_argument("--local-timezone", default="UTC")
    parser.add_argument("--tls-cert", help="PEM certificate: serve https")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    anyio.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
