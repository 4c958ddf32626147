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
        [--require-bearer-file FILE] [--auth-log FILE] [--header-log FILE]

With `--require-bearer-file`, every HTTP request must carry `Authorization: Bearer <token>`,
the token being what FILE holds (read per request, so a test can rotate it); others get 401,
as a hosted MCP server that wants an API key answers. `--auth-log` appends one line per HTTP
request: its method and the Authorization value it carried (`-` for none). `--header-log`
appends one JSON line per HTTP request: `{"method": ..., "headers": {name: value}}`, names
lower-case (what a server author reads to enrich their own audit log).

It binds before serving and prints one line `MCP_PEER_LISTENING <port>` on stderr, so
`--port 0` (the default) gives a free port without a race. SIGTERM/SIGINT stop it.
"""

import argparse
import json

import anyio
from announced_listener import serve_announced
from mcp_server_time.server import create_server, get_local_tz


class BearerRequired:
    """ASGI middleware: log each request's Authorization, refuse a wrong one with 401."""

    def __init__(self, app, token_file, auth_log):
        self.app = app
        self.token_file = token_file
        self.auth_log = auth_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if self.auth_log:
            with open(self.auth_log, "a") as log:
                log.write(f"{scope['method']} {got or '-'}\n")
        if self.token_file:
            with open(self.token_file) as f:
                expected = "Bearer " + f.read().strip()
            if got != expected:
                body = json.dumps({"error": "invalid_token"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="time"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class HeaderLog:
    """ASGI middleware: append each request's method and headers to a JSON-lines file."""

    def __init__(self, app, path):
        self.app = app
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            with open(self.path, "a") as log:
                log.write(json.dumps({"method": scope["method"], "headers": headers}) + "\n")
        await self.app(scope, receive, send)


async def serve(args):
    server = create_server(str(get_local_tz(args.local_timezone)))
    app = server.streamable_http_app(
        streamable_http_path=args.path,
        json_response=args.json_response,
        stateless_http=args.stateless,
        host="127.0.0.1",
    )
    if args.require_bearer_file or args.auth_log:
        app = BearerRequired(app, args.require_bearer_file, args.auth_log)
    if args.header_log:
        app = HeaderLog(app, args.header_log)
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
    parser.add_argument("--require-bearer-file", help="answer 401 unless Authorization is Bearer <what FILE holds>")
    parser.add_argument("--auth-log", help="append each request's method and Authorization value here")
    parser.add_argument("--header-log", help="append each request's method and headers here (JSON lines)")
    anyio.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
