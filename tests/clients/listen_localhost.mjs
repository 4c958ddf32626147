// Preload for Node MCP servers that listen on every interface (server-everything's
// `streamableHttp` and `sse` transports call `app.listen(PORT)` with no host):
//
//   PORT=0 node --import /path/to/listen_localhost.mjs \
//     <peers>/node_modules/@modelcontextprotocol/server-everything/dist/index.js streamableHttp
//
// It pins every TCP listen to 127.0.0.1 (tests bind loopback only) and, once bound, writes one
// line `MCP_PEER_LISTENING <port>` to stderr, so PORT=0 gives a free port without a race.
import net from "node:net";

const listen = net.Server.prototype.listen;

net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "object" && args[0] !== null && !Array.isArray(args[0])) {
    if (args[0].path === undefined) {
      args[0] = { ...args[0], host: "127.0.0.1" };
    }
  } else if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    const port = Number(args[0]);
    const rest = args.slice(1);
    // listen(port[, host][, backlog][, callback]): drop a caller's host, keep the rest.
    if (typeof rest[0] === "string") {
      rest.shift();
    }
    args = [port, "127.0.0.1", ...rest];
  }
  this.once("listening", () => {
    const address = this.address();
    if (address && typeof address === "object") {
      process.stderr.write(`MCP_PEER_LISTENING ${address.port}\n`);
    }
  });
  return listen.apply(this, args);
};
