#!/usr/bin/env python3
"""Serve an MCP server that closes a call's event stream mid-call, to be polled, on 127.0.0.1.

Protocol revision 2025-11-25 lets a Streamable HTTP server close a POST's SSE stream before the
answer once it has sent an event with an id: the client is to come back with a GET carrying
`Last-Event-ID` (after the `retry` time the server gave) and gets what was sent meanwhile, then
the rest. The Python SDK does this with an event store and `Context.close_sse_stream()`. This is
the SDK's own server (`MCPServer`) and transport; only the event store, which the SDK leaves to
the application, is written here (in memory).

    <peers>/venv/bin/python tests/clients/polling_http_server.py [--port 0] [--path /mcp]
        [--retry-ms 100] [--resume-log FILE]

Tool `slow_echo(text, pauses)`: for each pause, logs `step N` to the client, closes the call's
stream and waits 200 ms; then answers `text`. Tool `announce(uri)` sends
`notifications/resources/updated` for `uri` on the session's GET stream (the stream for what the
server sends on its own). Tool `drop_notification_stream(uris)` closes that stream, then
announces each of `uris`: they wait in the event store for a client that resumes the stream.
Each resumption (a GET with `Last-Event-ID`) is appended to `--resume-log` as one line, the
event id it resumed after.

It binds before serving and prints one line `MCP_PEER_LISTENING <port>` on stderr, so
`--port 0` (the default) gives a free port without a race. SIGTERM/SIGINT stop it.
"""

import argparse
import itertools

import anyio
from announced_listener import serve_announced
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventMessage, EventStore


class MemoryEventStore(EventStore):
    """Every event of every stream, in order, for as long as the server runs."""

    def __init__(self, resume_log):
        self.events = []
        self.ids = itertools.count(1)
        self.resume_log = resume_log

    async def store_event(self, stream_id, message):
        event_id = str(next(self.ids))
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        if self.resume_log:
            with open(self.resume_log, "a") as log:
                log.write(f"{last_event_id}\n")
        found = [i for i, (event_id, _, _) in enumerate(self.events) if event_id == last_event_id]
        if not found:
            return None
        stream_id = self.events[found[0]][1]
        for event_id, stream, message in self.events[found[0] + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def build_server():
    server = MCPServer("polling-server")

    @server.tool()
    async def slow_echo(text: str, pauses: int, ctx: Context) -> str:
        """Answers `text` after closing its own event stream `pauses` times."""
        for step in range(1, pauses + 1):
            await ctx.info(f"step {step}")
            await ctx.close_sse_stream()
            await anyio.sleep(0.2)
        return text

    @server.tool()
    async def announce(uri: str, ctx: Context) -> str:
        """Announces an update of `uri` on the session's GET stream."""
        await ctx.session.send_resource_updated(uri)
        return "announced"

    @server.tool()
    async def drop_notification_stream(uris: list[str], ctx: Context) -> str:
        """Closes the session's GET stream, then announces updates of `uris` on it."""
        await ctx.close_standalone_sse_stream()
        for uri in uris:
            await ctx.session.send_resource_updated(uri)
        return "dropped"

    return server


async def serve(args):
    app = build_server().streamable_http_app(
        streamable_http_path=args.path,
        event_store=MemoryEventStore(args.resume_log),
        retry_interval=args.retry_ms,
        host="127.0.0.1",
    )
    await serve_announced(app, args.port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--retry-ms", type=int, default=100, help="the retry time the server gives")
    parser.add_argument("--resume-log", help="append each resumption's Last-Event-ID here")
    anyio.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
