#!/usr/bin/env python3
"""Drive an MCP server over stdio with raw JSON-RPC lines and print the exchange.

Usage:
    stdio_transcript.py [--timeout SECONDS] [--format jsonl|text] --input FILE|- -- CMD ARGS...

Each input line is one JSON-RPC message (or batch) sent verbatim to the server's stdin. After a
line that carries an `id` (or a batch with ids), the driver waits until the server has answered
every such id (or `--timeout` passes) before sending the next line, so a transcript shows the real
order of requests, responses and server notifications. Lines starting with `#` and blank lines are
skipped. Stdlib only; used to capture the raw exchanges in PEERS.md and for tests that need bytes
the SDK would never send.

Output (`--format jsonl`, the default): one JSON object per line, `{"dir": ">", "msg": ...}` for
what was sent and `{"dir": "<", "msg": ...}` for what came back (`"raw"` instead of `"msg"` when a
line was not JSON), then `{"dir": "=", "exit": CODE, "stderr": "..."}`. `--format text` prints
`> {json}` / `< {json}` lines for humans.
"""

import argparse
import json
import queue
import subprocess
import sys
import threading
import time


def _ids_of(message):
    items = message if isinstance(message, list) else [message]
    return {
        json.dumps(item.get("id"))
        for item in items
        if isinstance(item, dict) and "id" in item and "method" in item
    }


def _answered_ids(message):
    items = message if isinstance(message, list) else [message]
    return {
        json.dumps(item.get("id"))
        for item in items
        if isinstance(item, dict) and "id" in item and ("result" in item or "error" in item)
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSON lines to send, or - for stdin")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    parser.add_argument("--linger", type=float, default=0.3, help="seconds to keep reading after the last answer")
    parser.add_argument("--format", choices=["jsonl", "text"], default="jsonl")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a server command is required after --")

    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    lines = [line.rstrip("\n") for line in source if line.strip() and not line.lstrip().startswith("#")]

    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    incoming = queue.Queue()
    stderr_chunks = []

    def read_stdout():
        for line in child.stdout:
            incoming.put(line.rstrip("\n"))
        incoming.put(None)

    def read_stderr():
        stderr_chunks.append(child.stderr.read())

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()

    def emit(direction, line):
        try:
            record = {"dir": direction, "msg": json.loads(line)}
        except ValueError:
            record = {"dir": direction, "raw": line}
        if args.format == "text":
            body = json.dumps(record["msg"]) if "msg" in record else "RAW " + record["raw"]
            print(f"{direction} {body}", flush=True)
        else:
            print(json.dumps(record), flush=True)
        return record

    pending = set()
    closed = False

    def pump(deadline):
        nonlocal closed
        while not closed and (pending or time.monotonic() < deadline):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                line = incoming.get(timeout=remaining)
            except queue.Empty:
                return
            if line is None:
                closed = True
                return
            record = emit("<", line)
            if "msg" in record:
                pending.difference_update(_answered_ids(record["msg"]))

    for line in lines:
        emit(">", line)
        try:
            pending.update(_ids_of(json.loads(line)))
        except ValueError:
            pass
        try:
            child.stdin.write(line + "\n")
            child.stdin.flush()
        except BrokenPipeError:
            break
        if pending:
            pump(time.monotonic() + args.timeout)
    pump(time.monotonic() + args.linger)
    try:
        child.stdin.close()
    except BrokenPipeError:
        pass
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.terminate()
        code = child.wait()
    pump(time.monotonic() + 0.2)
    stderr = "".join(stderr_chunks)
    if args.format == "text":
        print(f"= exit {code}; stderr: {stderr.strip()!r}")
    else:
        print(json.dumps({"dir": "=", "exit": code, "stderr": stderr}))


if __name__ == "__main__":
    main()
