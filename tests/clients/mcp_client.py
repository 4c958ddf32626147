#!/usr/bin/env python3
"""A real MCP client for the integration tests: the official Python SDK (`mcp` 2.x) driving one
server over stdio or Streamable HTTP through a script of operations.

Run it with the peers venv's python (see PEERS.md):

    <peers>/venv/bin/python tests/clients/mcp_client.py \
        --transport http --url http://127.0.0.1:PORT/mcp \
        [--protocol-version auto|2025-06-18|2025-11-25|2026-07-28] \
        [--header 'Name: value']... [--timeout SECONDS] [--no-output-validation] \
        [--ca-file CA.pem]               (https:// URLs: trust this CA, not the system's) \
        [--oauth]                        (authenticate with the SDK's OAuth client, below) \
        --script FILE|-

    <peers>/venv/bin/python tests/clients/mcp_client.py \
        --transport stdio [--env KEY=VALUE]... [--cwd DIR] \
        [--protocol-version ...] --script FILE|- \
        --command CMD ARGS...            (last: everything after it is the server command)

The script is a JSON list of operations (or `{"ops": [...]}`):

    {"op": "list_tools"}
    {"op": "call_tool", "name": "echo", "arguments": {"message": "hi"}}
    {"op": "list_resources"}            {"op": "list_resource_templates"}
    {"op": "read_resource", "uri": "note://hello"}
    {"op": "list_prompts"}
    {"op": "get_prompt", "name": "greet", "arguments": {"name": "Ada"}}
    {"op": "ping"}                      (handshake-era only; removed in 2026-07-28)
    {"op": "call_tool", ..., "progress": true}
                                        (sends a progressToken; the line gets "progress": the
                                        notifications/progress received for the call, in order)
    {"op": "cancel_tool", "name": ..., "arguments": ..., "after_ms": 500 [, "progress": true]}
                                        (starts the call, then abandons it after `after_ms`: the
                                        SDK sends notifications/cancelled for it. Result:
                                        {"cancelled": true, "elapsed_ms": ...}, or
                                        {"cancelled": false, "elapsed_ms": ..., "result": {...}}
                                        when the answer came first)
    {"op": "sleep", "ms": 500}          (lets server-initiated traffic arrive between ops)
    {"op": "configure", "sampling": "TEXT", "elicitation": {...}, "roots": [{"uri": ..., "name": ...}]}
                                        (client callbacks, each optional; see below)

Server-to-client requests: the callbacks a `configure` op names are registered before the
client connects, wherever the op stands in the script (their capabilities are declared at
connect), and the op answers in its place with what it registered. `sampling` answers every
sampling/createMessage with an assistant message of that text (model "mcp-guard-tests"),
`elicitation` accepts every elicitation/create with that content, `roots` answers roots/list
with that list. Without a callback the SDK declines such requests and declares no capability.
With any callback configured, every later line carries "callbacks": the invocations since the
previous line, in order, each {"callback": "sampling"|"elicitation"|"roots", "params": {...}}.

Every operation may carry `"meta": {...}` (sent as the request's `params._meta`, next to the
keys the SDK stamps itself) and, over HTTP, `"headers": {...}` (added to that operation's HTTP
requests only), and `"cursor"` for the list operations.

Output, one JSON object per line on stdout:

    {"op": "initialize", "ok": true, "protocol_version": "2025-11-25", "requested": "...",
     "era": "handshake"|"modern", "server_info": {...}|null, "capabilities": {...}}
    {"op": "call_tool", "ok": true, "result": {...}}
    {"op": "call_tool", "ok": false, "error": {"code": -32602, "message": "...", "data": ...}}

A JSON-RPC error (`MCPError`) does not stop the script; any other failure of an operation is
reported as `"error": {"code": null, "message": "...", "type": "ExceptionClass"}` and the
script also continues. Exit status: 0 when the client connected (whatever the operations'
outcomes), 1 when connecting failed (the initialize line then has `"ok": false`), 2 on usage
errors.

Protocol version (`--protocol-version`):
  auto        the SDK's default: probe `server/discover`, fall back to `initialize`.
  2025-11-25  `initialize` handshake offering 2025-11-25 (`Client(mode="legacy")`).
  2025-06-18  (or any older handshake revision) the same handshake, offering that revision.
              The SDK always offers its newest handshake revision, so the driver rebinds
              `mcp.client.session.LATEST_HANDSHAKE_VERSION`, the value `initialize()` reads.
  2026-07-28  stateless: `Client(mode="2026-07-28")` adopts the revision without a probe, then
              the driver sends one real `server/discover` at that revision and adopts its
              result, so a server that does not speak 2026-07-28 fails the connect.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import traceback
from typing import Any

import anyio
import httpx2
import mcp.client.session as sdk_session
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.auth import OAuthClientProvider
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from pydantic import AnyUrl
from urllib.parse import parse_qs, urlparse
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

LIST_OPS = {
    "list_tools": "list_tools",
    "list_resources": "list_resources",
    "list_resource_templates": "list_resource_templates",
    "list_prompts": "list_prompts",
}


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


EXCLUDE_UNSET = False
"""`--wire-fields`: dump only the fields the server sent, not the SDK model's defaults."""


def dump(model: Any) -> Any:
    if model is None:
        return None
    if hasattr(model, "model_dump"):
        return model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=EXCLUDE_UNSET)
    return model


def error_record(op: str, error: BaseException) -> dict[str, Any]:
    if isinstance(error, MCPError):
        return {
            "op": op,
            "ok": False,
            "error": {"code": error.code, "message": error.message, "data": error.data},
        }
    return {
        "op": op,
        "ok": False,
        "error": {"code": None, "message": str(error) or repr(error), "type": type(error).__name__},
    }


class MemoryTokenStorage:
    """The SDK's `TokenStorage`, kept for the life of the process."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class HeadlessBrowser:
    """Stands in for the user's browser in the authorization-code flow: opens the authorization
    URL without following its redirect, and hands the code in the redirect to the SDK."""

    def __init__(self) -> None:
        self.result: AuthorizationCodeResult | None = None

    async def open(self, authorization_url: str) -> None:
        async with httpx2.AsyncClient() as browser:
            answer = await browser.get(authorization_url)
        location = answer.headers.get("location")
        if answer.status_code not in (302, 303, 307) or not location:
            raise RuntimeError(f"authorization endpoint answered {answer.status_code}: {answer.text[:200]}")
        query = parse_qs(urlparse(location).query)
        self.result = AuthorizationCodeResult(
            code=query.get("code", [""])[0],
            state=query.get("state", [None])[0],
            iss=query.get("iss", [None])[0],
        )

    async def callback(self) -> AuthorizationCodeResult:
        assert self.result is not None, "the authorization URL was never opened"
        return self.result


def oauth_provider(url: str) -> OAuthClientProvider:
    """The SDK's OAuth client for `url`: discovers the authorization server from the 401 the
    server answers (RFC 9728), registers itself (RFC 7591) and gets a token with PKCE."""
    return OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="mcp-guard-tests",
            redirect_uris=[AnyUrl("http://127.0.0.1:9/callback")],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
        ),
        storage=MemoryTokenStorage(),
        redirect_handler=HeadlessBrowser.shared.open,
        callback_handler=HeadlessBrowser.shared.callback,
    )


HeadlessBrowser.shared = HeadlessBrowser()  # type: ignore[attr-defined]


def oauth_record(provider: OAuthClientProvider) -> dict[str, Any]:
    """What the OAuth client found: the resource's metadata and the authorization server."""
    context = provider.context
    return {
        "protected_resource_metadata": dump(context.protected_resource_metadata),
        "authorization_server": context.auth_server_url,
        "token_scope": context.current_tokens.scope if context.current_tokens else None,
    }


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def parse_env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def load_script(source: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()
    script = json.loads(text)
    if isinstance(script, dict):
        script = script.get("ops")
    if not isinstance(script, list) or not all(isinstance(op, dict) and "op" in op for op in script):
        raise ValueError('the script must be a JSON list of {"op": ...} objects (or {"ops": [...]})')
    return script


class ScopedHeaders:
    """Adds an operation's extra headers to the shared HTTP client while the operation runs.

    Operations run one at a time, so mutating the client's default headers scopes them to the
    requests of exactly that operation.
    """

    def __init__(self, http_client: Any | None, headers: dict[str, str] | None):
        self.http_client = http_client
        self.headers = headers or {}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        if self.http_client is None:
            return
        for name, value in self.headers.items():
            self.saved[name] = self.http_client.headers.get(name)
            self.http_client.headers[name] = str(value)

    def __exit__(self, *exc: Any) -> None:
        if self.http_client is None:
            return
        for name, value in self.saved.items():
            if value is None:
                del self.http_client.headers[name]
            else:
                self.http_client.headers[name] = value


SAMPLING_MODEL = "mcp-guard-tests"


class ServerRequests:
    """The callbacks for server-to-client requests that `configure` ops register, and a record
    of every time the server's request reached one of them."""

    def __init__(self, script: list[dict[str, Any]]):
        self.sampling_text: str | None = None
        self.elicitation_content: dict[str, Any] | None = None
        self.roots: list[dict[str, Any]] | None = None
        for op in script:
            if op["op"] == "configure":
                self.sampling_text = op.get("sampling", self.sampling_text)
                self.elicitation_content = op.get("elicitation", self.elicitation_content)
                self.roots = op.get("roots", self.roots)
        self.invocations: list[dict[str, Any]] = []

    @property
    def configured(self) -> bool:
        return any(x is not None for x in (self.sampling_text, self.elicitation_content, self.roots))

    def registered(self) -> dict[str, bool]:
        return {
            "sampling": self.sampling_text is not None,
            "elicitation": self.elicitation_content is not None,
            "roots": self.roots is not None,
        }

    def client_arguments(self) -> dict[str, Any]:
        """`Client(...)` keyword arguments: only the callbacks configured, so the SDK declares
        only their capabilities."""
        arguments: dict[str, Any] = {}
        if self.sampling_text is not None:
            arguments["sampling_callback"] = self.sample
        if self.elicitation_content is not None:
            arguments["elicitation_callback"] = self.elicit
        if self.roots is not None:
            arguments["list_roots_callback"] = self.list_roots
        return arguments

    def drain(self) -> list[dict[str, Any]]:
        """The invocations since the last drain."""
        taken, self.invocations = self.invocations, []
        return taken

    async def sample(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.invocations.append({"callback": "sampling", "params": dump(params)})
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=self.sampling_text or ""),
            model=SAMPLING_MODEL,
            stop_reason="endTurn",
        )

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.invocations.append({"callback": "elicitation", "params": dump(params)})
        return types.ElicitResult(action="accept", content=self.elicitation_content)

    async def list_roots(self, context: Any) -> types.ListRootsResult:
        self.invocations.append({"callback": "roots", "params": None})
        return types.ListRootsResult(roots=[types.Root.model_validate(root) for root in self.roots or []])


class ProgressLog:
    """A `progress_callback` that keeps every notifications/progress of one call."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.received.append({"progress": progress, "total": total, "message": message})


async def run_op(client: Client, op: dict[str, Any], extra: dict[str, Any]) -> Any:
    """Runs one operation and returns its result; `extra` gets fields for the output line
    (progress received, also when the operation fails)."""
    kind = op["op"]
    meta = op.get("meta")
    progress = None
    if op.get("progress"):
        progress = ProgressLog()
        extra["progress"] = progress.received
    if kind in LIST_OPS:
        method = getattr(client, LIST_OPS[kind])
        return await method(cursor=op.get("cursor"), meta=meta)
    if kind == "call_tool":
        return await client.call_tool(op["name"], op.get("arguments"), progress_callback=progress, meta=meta)
    if kind == "cancel_tool":
        started = time.monotonic()
        result = None
        # Leaving the scope cancels the call: the SDK then sends notifications/cancelled for it.
        with anyio.move_on_after(op["after_ms"] / 1000) as scope:
            result = await client.call_tool(op["name"], op.get("arguments"), progress_callback=progress, meta=meta)
        outcome: dict[str, Any] = {
            "cancelled": scope.cancelled_caught,
            "elapsed_ms": round((time.monotonic() - started) * 1000),
        }
        if not scope.cancelled_caught:
            outcome["result"] = dump(result)
        return outcome
    if kind == "sleep":
        await anyio.sleep(op["ms"] / 1000)
        return {}
    if kind == "read_resource":
        return await client.read_resource(op["uri"], meta=meta)
    if kind == "get_prompt":
        return await client.get_prompt(op["name"], op.get("arguments"), meta=meta)
    if kind == "ping":
        return await client.session.send_ping(meta=meta)
    raise ValueError(f"unknown op {kind!r}")


def connect_mode(version: str) -> str:
    if version == "auto":
        return "auto"
    if version in MODERN_PROTOCOL_VERSIONS:
        return version
    if version in HANDSHAKE_PROTOCOL_VERSIONS:
        # The SDK offers its newest handshake revision; make `initialize()` offer this one.
        sdk_session.LATEST_HANDSHAKE_VERSION = version
        return "legacy"
    raise SystemExit(
        f"mcp_client.py: unknown --protocol-version {version!r}; "
        f"use auto or one of {list(HANDSHAKE_PROTOCOL_VERSIONS + MODERN_PROTOCOL_VERSIONS)}"
    )


async def rediscover(session: ClientSession, version: str) -> None:
    """Replaces the synthesized discover result of a pinned modern mode with the server's own."""
    raw = await session.send_discover(version)
    session.adopt(types.DiscoverResult.model_validate(raw))


def initialize_record(client: Client, requested: str) -> dict[str, Any]:
    session = client.session
    era = "modern" if session.discover_result is not None else "handshake"
    return {
        "op": "initialize",
        "ok": True,
        "protocol_version": client.protocol_version,
        "requested": requested,
        "era": era,
        "server_info": dump(client.server_info),
        "capabilities": dump(client.server_capabilities),
    }


async def drive(args: argparse.Namespace, script: list[dict[str, Any]]) -> int:
    mode = connect_mode(args.protocol_version)
    http_client = None
    oauth = None
    if args.transport == "http":
        oauth = oauth_provider(args.url) if args.oauth else None
        http_client = create_mcp_http_client(headers=dict(args.header), auth=oauth)
        if args.ca_file:
            # The SDK's client, trusting the given CA instead of the system's.
            http_client = httpx2.AsyncClient(
                headers=dict(args.header),
                timeout=http_client.timeout,
                verify=ssl.create_default_context(cafile=args.ca_file),
            )
        server: Any = streamable_http_client(args.url, http_client=http_client)
    else:
        env = dict(os.environ)
        env.update(dict(args.env))
        server = StdioServerParameters(command=args.command[0], args=args.command[1:], env=env, cwd=args.cwd)

    server_requests = ServerRequests(script)
    client = Client(
        server,
        mode=mode,
        cache=None,  # every operation must reach the wire
        read_timeout_seconds=args.timeout,
        client_info=types.Implementation(name="mcp-guard-tests", version="0"),
        **server_requests.client_arguments(),
    )
    try:
        async with http_client if http_client is not None else _nullcontext():
            async with client:
                try:
                    with anyio.fail_after(args.timeout):
                        if mode in MODERN_PROTOCOL_VERSIONS:
                            await rediscover(client.session, mode)
                except Exception as error:  # noqa: BLE001 - reported, then the client exits
                    emit(error_record("initialize", error))
                    return 1
                record = initialize_record(client, args.protocol_version)
                if oauth is not None:
                    record["oauth"] = oauth_record(oauth)
                emit(record)
                for op in script:
                    extra: dict[str, Any] = {}
                    try:
                        with ScopedHeaders(http_client, op.get("headers")), anyio.fail_after(args.timeout):
                            if op["op"] == "configure":
                                result = server_requests.registered()
                            else:
                                result = await run_op(client, op, extra)
                        record = {"op": op["op"], "ok": True, "result": dump(result)}
                    except Exception as error:  # noqa: BLE001 - one failed op must not end the script
                        record = error_record(op["op"], error)
                    record.update(extra)
                    if server_requests.configured:
                        record["callbacks"] = server_requests.drain()
                    emit(record)
    except Exception as error:  # noqa: BLE001
        if args.verbose:
            traceback.print_exc()
        emit(error_record("initialize", _unwrap(error)))
        return 1
    return 0


def _unwrap(error: BaseException) -> BaseException:
    """The first real cause inside anyio's exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class _nullcontext:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: Any) -> None:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", choices=["stdio", "http"], required=True)
    parser.add_argument("--url", help="Streamable HTTP endpoint (http transport)")
    parser.add_argument(
        "--command",
        nargs=argparse.REMAINDER,
        help="server command and its arguments (stdio transport); must come last",
    )
    parser.add_argument("--protocol-version", default="auto")
    parser.add_argument("--script", default="-", help="JSON file of operations, or - for stdin")
    parser.add_argument("--header", type=parse_header, action="append", default=[], help="'Name: value' for every HTTP request")
    parser.add_argument("--oauth", action="store_true", help="authenticate with the SDK's OAuth client (http)")
    parser.add_argument("--ca-file", help="PEM CA certificate to trust for an https:// URL (instead of the system's)")
    parser.add_argument("--env", type=parse_env, action="append", default=[], help="KEY=VALUE for the stdio server")
    parser.add_argument("--cwd", help="working directory of the stdio server")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per operation (and for connecting)")
    parser.add_argument(
        "--no-output-validation",
        action="store_true",
        help="do not validate structuredContent against outputSchema; the SDK otherwise sends its "
        "own tools/list before the first call of a tool it has not listed",
    )
    parser.add_argument(
        "--wire-fields",
        action="store_true",
        help="print only result fields the server sent (exclude_unset), not defaults the SDK's "
        "models add such as isError=false, resultType, ttlMs, cacheScope",
    )
    parser.add_argument("--verbose", action="store_true", help="tracebacks on stderr")
    args = parser.parse_args()

    if args.transport == "http" and not args.url:
        parser.error("--transport http needs --url")
    if args.transport == "stdio" and not args.command:
        parser.error("--transport stdio needs --command CMD ARGS... (last)")
    global EXCLUDE_UNSET
    EXCLUDE_UNSET = args.wire_fields
    if args.no_output_validation:

        async def skip_validation(self: ClientSession, name: str, result: Any) -> None:
            return None

        ClientSession.validate_tool_result = skip_validation  # type: ignore[method-assign]

    try:
        script = load_script(args.script)
    except (OSError, ValueError) as error:
        print(f"mcp_client.py: bad script: {error}", file=sys.stderr)
        return 2
    return anyio.run(drive, args, script)


if __name__ == "__main__":
    sys.exit(main())
