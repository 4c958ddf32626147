#!/usr/bin/env python3
"""Send one raw HTTP request to an MCP Streamable HTTP endpoint and print what came back.

For the tests an SDK cannot write: 2026-07-28 requests with hand-made `_meta` and headers,
JSON-RPC batches, invalid JSON or UTF-8, mismatched or duplicated headers, unknown sessions.
Stdlib only (http.client), so any python3 runs it.

    raw_http.py --url http://127.0.0.1:PORT/mcp [--method POST|GET|DELETE|...]
                [--body JSON | --body-file FILE|- | --raw-body TEXT | --body-base64 B64]
                [--header 'Name: value']...   (repeatable; a repeated name is sent twice)
                [--no-default-headers] [--envelope 2026-07-28] [--initialize VERSION]
                [--session ID] [--timeout SECONDS] [--max-events N]

Defaults for POST: `Content-Type: application/json` and
`Accept: application/json, text/event-stream` (GET: `Accept: text/event-stream`), unless the same
header is given with --header or --no-default-headers is set.

--envelope VERSION  stamps a 2026-07-28 request the way a conforming client does: adds
                    `params._meta` with `io.modelcontextprotocol/protocolVersion`,
                    `io.modelcontextprotocol/clientCapabilities` ({}) and
                    `io.modelcontextprotocol/clientInfo` to every request in the body that lacks
                    them, and the `MCP-Protocol-Version`, `Mcp-Method` and (tools/call,
                    prompts/get, resources/read) `Mcp-Name` headers from a single request body.
                    Headers given with --header win, so a test can break exactly one of them.
--initialize V      first performs the handshake (initialize at V, then
                    notifications/initialized) and sends the request inside that session:
                    `Mcp-Session-Id` and `MCP-Protocol-Version: V` are added unless given.
--session ID        adds `Mcp-Session-Id: ID`.

Output: one JSON object on stdout:
    {"status": 200, "reason": "OK", "headers": {"content-type": "...", ...},
     "header_list": [["Content-Type", "..."], ...], "content_type": "application/json",
     "body": <parsed JSON> | null, "text": "<body when not JSON>" | null,
     "events": [{"event": "message", "id": "...", "data": <parsed JSON or text>}, ...] | null,
     "timed_out": false, "initialize": {...} | absent}
`headers` keys are lower-case; a header sent more than once maps to a list. SSE bodies are read
until the server ends the stream, --max-events events arrived, or --timeout passed without data
(then `timed_out` is true); the connect and the response's headers may take up to 60 s. Exit status 0 whenever an HTTP response arrived, 1 otherwise.
"""

import argparse
import base64
import http.client
import json
import socket
import sys
import urllib.parse

NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META_KEY = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_META_KEY = "io.modelcontextprotocol/clientInfo"


def parse_header(text):
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def encode_header_value(value):
    """The SDKs' rule: printable ASCII without edge whitespace goes verbatim, else base64-wrapped."""
    printable = all(0x20 <= ord(c) <= 0x7E for c in value)
    if printable and value == value.strip() and not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    return "=?base64?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


def stamp_envelope(body, version):
    """Adds the 2026-07-28 `_meta` envelope to every request; returns the routing headers."""
    items = body if isinstance(body, list) else [body]
    for item in items:
        if isinstance(item, dict) and "method" in item and "id" in item:
            params = item.setdefault("params", {})
            if isinstance(params, dict):
                meta = params.setdefault("_meta", {})
                if isinstance(meta, dict):
                    meta.setdefault(PROTOCOL_VERSION_META_KEY, version)
                    meta.setdefault(CLIENT_CAPABILITIES_META_KEY, {})
                    meta.setdefault(CLIENT_INFO_META_KEY, {"name": "raw_http.py", "version": "0"})
    headers = [("MCP-Protocol-Version", version)]
    if isinstance(body, dict) and isinstance(body.get("method"), str):
        headers.append(("Mcp-Method", body["method"]))
        key = NAME_BEARING_METHODS.get(body["method"])
        value = (body.get("params") or {}).get(key) if key else None
        if isinstance(value, str):
            headers.append(("Mcp-Name", encode_header_value(value)))
    return headers


def parse_sse(lines):
    """Yields SSE events from an iterator of decoded lines (without line endings)."""
    event = {"event": None, "id": None, "data": [], "retry": None}
    for line in lines:
        if line == "":
            if event["data"] or event["id"] is not None or event["event"] is not None:
                data = "\n".join(event["data"])
                try:
                    parsed = json.loads(data) if data else None
                except ValueError:
                    parsed = data
                record = {"event": event["event"] or "message", "id": event["id"], "data": parsed}
                if event["retry"] is not None:
                    record["retry"] = event["retry"]
                yield record
            event = {"event": None, "id": None, "data": [], "retry": None}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            event["data"].append(value)
        elif field == "event":
            event["event"] = value
        elif field == "id":
            event["id"] = value
        elif field == "retry":
            event["retry"] = value


def read_lines(response):
    while True:
        raw = response.readline()
        if not raw:
            return
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


# How long the connect and the response's status line and headers may take.
RESPONSE_TIMEOUT = 60.0


def send(url, method, headers, body_bytes, timeout, max_events):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError("only http:// URLs are supported")
    # The response may wait for a server being started on a loaded machine; --timeout is the
    # silence allowed once it has begun.
    connection = http.client.HTTPConnection(
        parts.hostname, parts.port or 80, timeout=max(timeout, RESPONSE_TIMEOUT)
    )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # A test that sets Host itself (e.g. DNS-rebinding checks) must not get a second one.
    own_host = any(name.lower() == "host" for name, _ in headers)
    connection.putrequest(method, path, skip_host=own_host, skip_accept_encoding=True)
    for name, value in headers:
        connection.putheader(name, value)
    if body_bytes is not None:
        connection.putheader("Content-Length", str(len(body_bytes)))
    connection.endheaders(body_bytes)
    # Taken now: a response that closes the connection takes it from `connection`.
    sock = connection.sock
    response = connection.getresponse()
    sock.settimeout(timeout)

    header_list = [[name, value] for name, value in response.getheaders()]
    folded = {}
    for name, value in header_list:
        key = name.lower()
        if key in folded:
            folded[key] = folded[key] if isinstance(folded[key], list) else [folded[key]]
            folded[key].append(value)
        else:
            folded[key] = value
    content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    result = {
        "status": response.status,
        "reason": response.reason,
        "headers": folded,
        "header_list": header_list,
        "content_type": content_type or None,
        "body": None,
        "text": None,
        "events": None,
        "timed_out": False,
    }
    if content_type == "text/event-stream":
        events = []
        try:
            for event in parse_sse(read_lines(response)):
                events.append(event)
                if max_events is not None and len(events) >= max_events:
                    break
        except (socket.timeout, TimeoutError):
            result["timed_out"] = True
        result["events"] = events
    else:
        try:
            data = response.read()
        except (socket.timeout, TimeoutError):
            data = b""
            result["timed_out"] = True
        text = data.decode("utf-8", errors="replace")
        if text:
            try:
                result["body"] = json.loads(text)
            except ValueError:
                result["text"] = text
    connection.close()
    return result


def response_message(result):
    """The JSON-RPC message of a response, whether it came as JSON or as the first SSE event."""
    if result["body"] is not None:
        return result["body"]
    for event in result["events"] or []:
        if isinstance(event["data"], dict) and ("result" in event["data"] or "error" in event["data"]):
            return event["data"]
    return None


def initialize_session(url, version, extra_headers, timeout):
    """The legacy handshake: returns (session id or None, summary for the output)."""
    body = {
        "jsonrpc": "2.0",
        "id": "raw-http-initialize",
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "raw_http.py", "version": "0"},
        },
    }
    headers = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        *extra_headers,
    ]
    result = send(url, "POST", headers, json.dumps(body).encode(), timeout, None)
    session = result["headers"].get("mcp-session-id")
    session_headers = list(extra_headers)
    if session:
        session_headers.append(("Mcp-Session-Id", session))
    session_headers.append(("MCP-Protocol-Version", version))
    notification = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    acknowledged = send(
        url,
        "POST",
        [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"), *session_headers],
        notification,
        timeout,
        0,
    )
    summary = {
        "status": result["status"],
        "session_id": session,
        "response": response_message(result),
        "initialized_status": acknowledged["status"],
    }
    return session, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--method", default="POST")
    bodies = parser.add_mutually_exclusive_group()
    bodies.add_argument("--body", help="JSON text (a message or a batch)")
    bodies.add_argument("--body-file", help="file holding the JSON body, or - for stdin")
    bodies.add_argument("--raw-body", help="sent verbatim as UTF-8, not parsed (for invalid JSON)")
    bodies.add_argument("--body-base64", help="bytes sent verbatim (for invalid UTF-8)")
    parser.add_argument("--header", type=parse_header, action="append", default=[])
    parser.add_argument("--no-default-headers", action="store_true")
    parser.add_argument("--envelope", metavar="VERSION", help="stamp the 2026-07-28 _meta envelope and headers")
    parser.add_argument("--initialize", metavar="VERSION", help="do the initialize handshake first")
    parser.add_argument("--session", help="Mcp-Session-Id to send")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--max-events", type=int, default=None, help="stop reading SSE after N events")
    args = parser.parse_args()

    body = None
    body_bytes = None
    if args.body is not None:
        body = json.loads(args.body)
    elif args.body_file is not None:
        body = json.load(sys.stdin if args.body_file == "-" else open(args.body_file, encoding="utf-8"))
    elif args.raw_body is not None:
        body_bytes = args.raw_body.encode("utf-8")
    elif args.body_base64 is not None:
        body_bytes = base64.b64decode(args.body_base64)

    given = {name.lower() for name, _ in args.header}
    headers = []
    if not args.no_default_headers:
        method = args.method.upper()
        if method == "POST":
            headers.append(("Content-Type", "application/json"))
            headers.append(("Accept", "application/json, text/event-stream"))
        elif method == "GET":
            headers.append(("Accept", "text/event-stream"))
    if args.envelope and body is not None:
        headers.extend(stamp_envelope(body, args.envelope))
    if args.session:
        headers.append(("Mcp-Session-Id", args.session))

    output_extra = {}
    try:
        if args.initialize:
            forwarded = [(name, value) for name, value in args.header if name.lower() not in ("mcp-session-id",)]
            session, summary = initialize_session(args.url, args.initialize, forwarded, args.timeout)
            output_extra["initialize"] = summary
            if session:
                headers.append(("Mcp-Session-Id", session))
            headers.append(("MCP-Protocol-Version", args.initialize))
        if body is not None:
            body_bytes = json.dumps(body).encode("utf-8")
        # Explicit --header values replace defaults of the same name; repeated --header names
        # are all sent, which is how tests produce duplicated headers.
        headers = [(name, value) for name, value in headers if name.lower() not in given] + args.header
        result = send(args.url, args.method.upper(), headers, body_bytes, args.timeout, args.max_events)
    except (OSError, http.client.HTTPException, ValueError) as error:
        print(json.dumps({"status": None, "error": f"{type(error).__name__}: {error}", **output_extra}))
        return 1
    result.update(output_extra)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
