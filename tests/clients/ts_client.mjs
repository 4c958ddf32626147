// A real MCP client for the integration tests: the official TypeScript SDK
// (`@modelcontextprotocol/sdk`, the client most agents are built on) driving one server over
// Streamable HTTP or stdio through a script of operations. The companion of mcp_client.py,
// with the same script and output format for the operations it knows:
//
//   node tests/clients/ts_client.mjs --peers <peers dir> --transport http --url URL \
//       [--header 'Name: value']... [--oauth] [--timeout SECONDS] --script FILE|-
//   node tests/clients/ts_client.mjs --peers <peers dir> --transport stdio --script FILE|- \
//       --command CMD ARGS...          (last: everything after it is the server command)
//
// Operations: {"op": "list_tools"}, {"op": "call_tool", "name": ..., "arguments": {...}},
// {"op": "list_resources"}, {"op": "read_resource", "uri": ...}, {"op": "list_prompts"},
// {"op": "get_prompt", "name": ..., "arguments": {...}}, {"op": "ping"}.
//
// Output, one JSON object per line on stdout: first
//   {"op": "initialize", "ok": true, "protocol_version": ..., "server_info": {...},
//    "capabilities": {...}}
// then per operation {"op": ..., "ok": true, "result": {...}} or
// {"op": ..., "ok": false, "error": {"code": ..., "message": ..., "data": ...}}.
// A failed operation does not end the script. Exit 0 once connected, 1 if connecting failed.
//
// --oauth: the SDK's OAuth client (`authProvider`), as an agent that gets a 401 runs it: it
// discovers the authorization server from the server's protected-resource metadata, registers,
// and completes the authorization-code flow with PKCE; a headless stand-in for the browser reads
// the code from the authorization redirect, and the client connects again with the token. The
// initialize line then has "oauth": {"resource": the RFC 8707 resource it asked for, "scope"}.
//
// The SDK is loaded from the peers directory that `cargo xtask setup` fills (tests/clients
// itself has no node_modules), through the package's own exports.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";

function parseArguments(argv) {
  const options = { header: [], timeout: 30 };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--command") {
      options.command = argv.slice(i + 1);
      break;
    }
    if (flag === "--oauth") {
      options.oauth = true;
      continue;
    }
    const value = argv[++i];
    if (value === undefined) usage(`${flag} needs a value`);
    switch (flag) {
      case "--peers": options.peers = value; break;
      case "--transport": options.transport = value; break;
      case "--url": options.url = value; break;
      case "--script": options.script = value; break;
      case "--timeout": options.timeout = Number(value); break;
      case "--header": options.header.push(value); break;
      default: usage(`unknown option ${flag}`);
    }
  }
  if (!options.peers || !options.script) usage("--peers and --script are required");
  if (options.transport === "http" && !options.url) usage("--transport http needs --url");
  if (options.transport === "stdio" && !options.command?.length) usage("--transport stdio needs --command");
  if (!["http", "stdio"].includes(options.transport)) usage("--transport is http or stdio");
  return options;
}

function usage(problem) {
  process.stderr.write(`ts_client.mjs: ${problem}\n`);
  process.exit(2);
}

function emit(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

function errorRecord(op, error) {
  if (typeof error?.code === "number") {
    // McpError puts "MCP error <code>: " before the message the server sent.
    const prefix = `MCP error ${error.code}: `;
    const message = error.message.startsWith(prefix) ? error.message.slice(prefix.length) : error.message;
    return { op, ok: false, error: { code: error.code, message, data: error.data ?? null } };
  }
  return { op, ok: false, error: { code: null, message: String(error?.message ?? error), type: error?.name } };
}

function headersOf(lines) {
  const headers = {};
  for (const line of lines) {
    const at = line.indexOf(":");
    if (at <= 0) usage(`expected 'Name: value', got ${JSON.stringify(line)}`);
    headers[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return headers;
}

/// The SDK's `OAuthClientProvider`, kept in memory, with a headless browser: opening the
/// authorization URL yields the code its redirect carries.
class HeadlessOAuthProvider {
  redirectUrl = "http://127.0.0.1:9/callback";
  clientMetadata = {
    client_name: "mcp-guard-tests-ts",
    redirect_uris: ["http://127.0.0.1:9/callback"],
    grant_types: ["authorization_code", "refresh_token"],
    response_types: ["code"],
  };
  client = undefined;
  saved = undefined;
  verifier = undefined;
  code = undefined;
  resource = undefined;

  clientInformation() { return this.client; }
  saveClientInformation(information) { this.client = information; }
  tokens() { return this.saved; }
  saveTokens(tokens) { this.saved = tokens; }
  saveCodeVerifier(verifier) { this.verifier = verifier; }
  codeVerifier() { return this.verifier; }

  async redirectToAuthorization(url) {
    this.resource = url.searchParams.get("resource");
    const answer = await fetch(url, { redirect: "manual" });
    const location = answer.headers.get("location");
    if (!location) throw new Error(`authorization endpoint answered ${answer.status}: ${await answer.text()}`);
    this.code = new URL(location).searchParams.get("code");
  }
}

async function runOp(client, op, timeout) {
  const options = { timeout: timeout * 1000 };
  switch (op.op) {
    case "list_tools": return client.listTools(op.cursor ? { cursor: op.cursor } : undefined, options);
    case "call_tool": return client.callTool({ name: op.name, arguments: op.arguments ?? {} }, undefined, options);
    case "list_resources": return client.listResources(op.cursor ? { cursor: op.cursor } : undefined, options);
    case "read_resource": return client.readResource({ uri: op.uri }, options);
    case "list_prompts": return client.listPrompts(op.cursor ? { cursor: op.cursor } : undefined, options);
    case "get_prompt": return client.getPrompt({ name: op.name, arguments: op.arguments ?? {} }, options);
    case "ping": return client.ping(options);
    default: throw new Error(`unknown op ${op.op}`);
  }
}

async function main() {
  const options = parseArguments(process.argv.slice(2));
  const require = createRequire(join(resolve(options.peers), "package.json"));
  const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
  const text = readFileSync(options.script === "-" ? 0 : options.script, "utf8");
  const parsed = JSON.parse(text);
  const script = Array.isArray(parsed) ? parsed : parsed.ops;

  let transport;
  let connectAgain = null;
  const oauth = options.oauth ? new HeadlessOAuthProvider() : undefined;
  if (options.transport === "http") {
    const { StreamableHTTPClientTransport } = require("@modelcontextprotocol/sdk/client/streamableHttp.js");
    const httpTransport = () =>
      new StreamableHTTPClientTransport(new URL(options.url), {
        requestInit: { headers: headersOf(options.header) },
        authProvider: oauth,
      });
    transport = httpTransport();
    connectAgain = httpTransport;
  } else {
    const { StdioClientTransport } = require("@modelcontextprotocol/sdk/client/stdio.js");
    transport = new StdioClientTransport({
      command: options.command[0],
      args: options.command.slice(1),
      env: process.env,
      stderr: "inherit",
    });
  }
  // The SDK tells the transport the negotiated revision (the HTTP one sends it as a header);
  // recorded here for the stdio one too.
  let negotiated = null;
  const watched = (transport) => {
    const setProtocolVersion = transport.setProtocolVersion?.bind(transport);
    transport.setProtocolVersion = (version) => {
      negotiated = version;
      setProtocolVersion?.(version);
    };
    return transport;
  };
  transport = watched(transport);
  const client = new Client({ name: "mcp-guard-tests-ts", version: "0" }, { capabilities: {} });
  try {
    try {
      await client.connect(transport, { timeout: options.timeout * 1000 });
    } catch (error) {
      const { UnauthorizedError } = require("@modelcontextprotocol/sdk/client/auth.js");
      if (!(oauth && error instanceof UnauthorizedError && oauth.code)) throw error;
      // The agent's way back from the browser: the code to the transport, then a new connection.
      await transport.finishAuth(oauth.code);
      transport = watched(connectAgain());
      await client.connect(transport, { timeout: options.timeout * 1000 });
    }
  } catch (error) {
    emit(errorRecord("initialize", error));
    return 1;
  }
  emit({
    op: "initialize",
    ok: true,
    protocol_version: negotiated,
    server_info: client.getServerVersion() ?? null,
    capabilities: client.getServerCapabilities() ?? null,
    ...(oauth ? { oauth: { resource: oauth.resource, scope: oauth.saved?.scope ?? null } } : {}),
  });
  for (const op of script) {
    try {
      emit({ op: op.op, ok: true, result: await runOp(client, op, options.timeout) });
    } catch (error) {
      emit(errorRecord(op.op, error));
    }
  }
  await client.close();
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`ts_client.mjs: ${error?.stack ?? error}\n`);
    process.exit(1);
  },
);
