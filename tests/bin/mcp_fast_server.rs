//! `mcp-fast-server`: a minimal, deterministic MCP server. It is the "fast upstream" of the
//! proxy benchmark (it answers in microseconds, so what is measured through mcp-guard is
//! mcp-guard's own cost) and a peer whose every answer the tests can predict.
//!
//! Usage: `mcp-fast-server [--http PORT] [--sse-held-open] [--notes FILE] [--call-delay-ms MS]
//! [--resources N] [--mutate-answers SEED]`
//!
//! - stdio, always: newline-delimited JSON-RPC on stdin/stdout, one message (or batch) a line.
//! - `--http PORT`: also Streamable HTTP at `http://127.0.0.1:PORT/mcp` (POST answered with
//!   JSON, never SSE; GET is 405). `PORT` 0 picks a free port. Either way the bound port is
//!   announced on stderr as `MCP_PEER_LISTENING <port>`, and the server keeps serving HTTP after
//!   stdin closes, until it is killed.
//! - `--sse-held-open`: over HTTP, a POST that gets an answer gets it as an SSE event, and the
//!   stream is then kept open (the spec says a server SHOULD close it; this one does not) until
//!   the client closes it, which the server reports on stderr as `MCP_PEER_STREAM_CLOSED`.
//! - `--notes FILE`: every successful `write_note` call appends its text and a newline to FILE,
//!   so a test can prove whether a call reached the server.
//! - `--call-delay-ms MS`: every `tools/call` is answered MS milliseconds after it arrives, so
//!   a test can have a call in flight while it does something to mcp-guard.
//! - `--resources N`: N more resources, `note://items/0` to `note://items/<N-1>` (text
//!   `item <i>`), and `resources/list` answers in pages of [`PAGE_SIZE`], each but the last
//!   with a `nextCursor`.
//! - `--mutate-answers SEED`: a broken or hostile server. On stdio, every answer but
//!   `initialize`'s is, one time in two, replaced by a mutation of itself (see the tests'
//!   `Mutator`, seeded with SEED): other types and sizes anywhere, other ids and methods (so
//!   some answers become requests or notifications), batches, cut and flipped bytes.
//!
//! Protocol revisions: `initialize` accepts 2025-06-18 and 2025-11-25 (echoed back; anything
//! else is answered with 2025-11-25); a request whose `params._meta` carries
//! `io.modelcontextprotocol/protocolVersion` is a 2026-07-28 request (no session, `server/discover`,
//! `resultType`/`ttlMs`/`cacheScope` in results, `ping` removed; over HTTP the
//! `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers must match the body).
//!
//! Surface: tools `echo` {text}, `add` {a, b}, `write_note` {text} (destructive) and `unlock`
//! {}; resource `note://hello`; prompt `greet` {name}. `unlock` adds the tools `unlocked_tool`
//! and `forbidden_tool` and, on stdio, sends `notifications/tools/list_changed` before its
//! answer. Notifications are accepted silently; unknown methods get -32601.
//!
//! Tools for tests of concurrency and of egress attribution (both listed):
//! - `rendezvous` {key, parties, connect?}: waits until `parties` calls with the same `key`
//!   are in the server (each key is for one meeting). With `connect` (`IP:PORT`), each then
//!   opens a TCP connection there and sends `<key> <n>` (its arrival order, from 1) and a
//!   newline, and waits until every party has connected. Answers `met <key> as <n> of <p>`.
//!   On stdio it runs on a thread of its own, so the answers to later lines overtake it.
//!   After 60 s without the other parties it answers an `isError` result.
//! - `connect_later` {connect, text}: answers at once; the next notification the server gets
//!   (any) makes it open a TCP connection to `connect` and send `text` and a newline, so the
//!   connection is made while no call of the client is in the server.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use mcp_guard_tests::Mutator;
use serde_json::{Map, Value, json};

const HANDSHAKE_VERSIONS: [&str; 2] = ["2025-06-18", "2025-11-25"];
const LATEST_HANDSHAKE_VERSION: &str = "2025-11-25";
const MODERN_VERSION: &str = "2026-07-28";
const PROTOCOL_VERSION_KEY: &str = "io.modelcontextprotocol/protocolVersion";
const CLIENT_CAPABILITIES_KEY: &str = "io.modelcontextprotocol/clientCapabilities";
const SERVER_INFO_KEY: &str = "io.modelcontextprotocol/serverInfo";
const NOTE_URI: &str = "note://hello";
const NOTE_TEXT: &str = "Hello from mcp-fast-server.";

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const HEADER_MISMATCH: i64 = -32020;
const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// Largest HTTP body accepted; MCP messages in the tests are far smaller.
const MAX_BODY: usize = 4 << 20;
const MAX_HEADER_LINES: usize = 100;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut http_port = None;
    let mut notes = None;
    let mut call_delay = std::time::Duration::ZERO;
    let mut items = 0;
    let mut mutator = None;
    let mut hold_sse = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--sse-held-open" {
            hold_sse = true;
            continue;
        }
        match (arg.as_str(), rest.next()) {
            ("--http", Some(port)) => {
                http_port = Some(port.parse::<u16>().unwrap_or_else(|_| usage()))
            }
            ("--notes", Some(file)) => notes = Some(PathBuf::from(file)),
            ("--call-delay-ms", Some(ms)) => {
                call_delay =
                    std::time::Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()))
            }
            ("--resources", Some(count)) => items = count.parse().unwrap_or_else(|_| usage()),
            ("--mutate-answers", Some(seed)) => {
                let seed = seed.parse().unwrap_or_else(|_| usage());
                mutator = Some(Mutex::new(Mutator::from_seed(seed)));
            }
            _ => usage(),
        }
    }
    let server = Arc::new(Server::new(notes, call_delay, items));
    let http = http_port.map(|port| {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|error| {
            eprintln!("mcp-fast-server: cannot listen on 127.0.0.1:{port}: {error}");
            std::process::exit(1);
        });
        let port = listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(port);
        eprintln!("MCP_PEER_LISTENING {port}");
        let server = Arc::clone(&server);
        thread::spawn(move || serve_http(&server, listener, hold_sse))
    });
    serve_stdio(&server, mutator.as_ref());
    if let Some(http) = http {
        let _ = http.join();
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: mcp-fast-server [--http PORT] [--sse-held-open] [--notes FILE] [--call-delay-ms MS] \
         [--resources N] [--mutate-answers SEED]"
    );
    std::process::exit(2);
}

struct Server {
    notes: Option<PathBuf>,
    call_delay: std::time::Duration,
    /// `--resources N`: how many `note://items/<i>` resources there are.
    items: usize,
    sessions: Mutex<HashSet<String>>,
    /// `unlock` was called: two more tools are listed.
    unlocked: AtomicBool,
    /// The tool list changed since the last `notifications/tools/list_changed` went out.
    list_changed: AtomicBool,
    /// `rendezvous` meetings by key.
    meetings: Mutex<HashMap<String, Meeting>>,
    /// Signalled whenever a meeting changes.
    met: Condvar,
    /// Connections `connect_later` armed: (address, text), made at the next notification.
    armed: Mutex<Vec<(String, String)>>,
}

impl Server {
    fn new(notes: Option<PathBuf>, call_delay: std::time::Duration, items: usize) -> Self {
        Server {
            notes,
            call_delay,
            items,
            sessions: Mutex::new(HashSet::new()),
            unlocked: AtomicBool::new(false),
            list_changed: AtomicBool::new(false),
            meetings: Mutex::new(HashMap::new()),
            met: Condvar::new(),
            armed: Mutex::new(Vec::new()),
        }
    }
}

/// How far a `rendezvous` meeting got: parties arrived, and parties that have connected.
#[derive(Default)]
struct Meeting {
    arrived: usize,
    connected: usize,
}

/// `resources/list` pages with `--resources`.
const PAGE_SIZE: usize = 5;

/// How long a `rendezvous` party waits for the others.
const MEETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A JSON-RPC error, as it goes on the wire.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    fn to_json(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(data) = &self.data {
            error["data"] = data.clone();
        }
        error
    }
}

fn response(id: &Value, outcome: Result<Value, RpcError>) -> Value {
    match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error.to_json()}),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Era {
    /// 2025-06-18 / 2025-11-25: initialize handshake, sessions over HTTP.
    Handshake,
    /// 2026-07-28: every request carries its protocol version in `params._meta`.
    Modern,
}

/// The era a request belongs to, from its `_meta` envelope.
fn era_of(method: &str, params: Option<&Value>) -> Result<Era, RpcError> {
    let meta = params.and_then(|params| params.get("_meta"));
    let Some(version) = meta.and_then(|meta| meta.get(PROTOCOL_VERSION_KEY)) else {
        if method == "server/discover" {
            return Err(RpcError::new(
                INVALID_PARAMS,
                format!(
                    "params._meta must carry {PROTOCOL_VERSION_KEY} and {CLIENT_CAPABILITIES_KEY}"
                ),
            ));
        }
        return Ok(Era::Handshake);
    };
    match version.as_str() {
        Some(MODERN_VERSION)
            if meta.is_some_and(|meta| meta.get(CLIENT_CAPABILITIES_KEY).is_some()) =>
        {
            Ok(Era::Modern)
        }
        Some(MODERN_VERSION) => Err(RpcError::new(
            INVALID_PARAMS,
            format!("params._meta is missing {CLIENT_CAPABILITIES_KEY}"),
        )),
        Some(requested) => Err(RpcError::new(
            UNSUPPORTED_PROTOCOL_VERSION,
            "Unsupported protocol version",
        )
        .with_data(json!({"supported": [MODERN_VERSION], "requested": requested}))),
        None => Err(RpcError::new(
            INVALID_PARAMS,
            "the protocol version must be a string",
        )),
    }
}

/// Whether a request is of the 2026-07-28 era (or tries to be, e.g. a discover without `_meta`).
fn carries_envelope(method: &str, params: Option<&Value>) -> bool {
    method == "server/discover"
        || params
            .and_then(|params| params.get("_meta"))
            .is_some_and(|meta| meta.get(PROTOCOL_VERSION_KEY).is_some())
}

/// A request taken apart; anything that is not a well-formed request is an `Err` to answer.
struct Request<'a> {
    id: Option<&'a Value>,
    method: &'a str,
    params: Option<&'a Value>,
}

fn parse_request(message: &Value) -> Result<Option<Request<'_>>, (Value, RpcError)> {
    let invalid = |why: &str| {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        Err((
            id,
            RpcError::new(INVALID_REQUEST, format!("Invalid request: {why}")),
        ))
    };
    let Some(object) = message.as_object() else {
        return invalid("not an object");
    };
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("jsonrpc must be \"2.0\"");
    }
    let Some(method) = object.get("method") else {
        // A response from the client (we never ask it anything): nothing to answer.
        return if object.contains_key("result") || object.contains_key("error") {
            Ok(None)
        } else {
            invalid("no method")
        };
    };
    let Some(method) = method.as_str() else {
        return invalid("method must be a string");
    };
    let id = object.get("id");
    if id.is_some_and(|id| !(id.is_string() || id.is_i64() || id.is_u64())) {
        return invalid("id must be a string or an integer");
    }
    let params = object.get("params");
    if params.is_some_and(|params| !params.is_object()) {
        return invalid("params must be an object");
    }
    Ok(Some(Request { id, method, params }))
}

impl Server {
    /// Answers one message; `None` for notifications and responses.
    fn handle_message(&self, message: &Value) -> Option<Value> {
        let request = match parse_request(message) {
            Ok(Some(request)) => request,
            Ok(None) => return None,
            Err((id, error)) => return Some(response(&id, Err(error))),
        };
        let Some(id) = request.id else {
            self.connect_armed();
            return None;
        };
        Some(response(id, self.handle_request(&request)))
    }

    fn handle_request(&self, request: &Request) -> Result<Value, RpcError> {
        let era = era_of(request.method, request.params)?;
        let mut result = self.dispatch(request.method, request.params, era)?;
        if era == Era::Modern {
            // 2026-07-28 results name their type; list, read and discover results are cacheable.
            result["resultType"] = json!("complete");
            if request.method.ends_with("/list")
                || matches!(request.method, "resources/read" | "server/discover")
            {
                result["ttlMs"] = json!(0);
                result["cacheScope"] = json!("private");
            }
            result["_meta"] = json!({SERVER_INFO_KEY: server_info()});
        }
        Ok(result)
    }

    fn dispatch(&self, method: &str, params: Option<&Value>, era: Era) -> Result<Value, RpcError> {
        let param = |name: &str| params.and_then(|params| params.get(name));
        match method {
            "initialize" => {
                let requested = param("protocolVersion").and_then(Value::as_str);
                let version = requested
                    .filter(|version| HANDSHAKE_VERSIONS.contains(version))
                    .unwrap_or(LATEST_HANDSHAKE_VERSION);
                Ok(json!({
                    "protocolVersion": version,
                    "capabilities": capabilities(),
                    "serverInfo": server_info(),
                }))
            }
            "server/discover" => Ok(json!({
                "supportedVersions": [MODERN_VERSION],
                "capabilities": capabilities(),
            })),
            "ping" if era == Era::Handshake => Ok(json!({})),
            "tools/list" => Ok(json!({"tools": self.tools()})),
            "tools/call" => {
                let name = param("name").and_then(Value::as_str).unwrap_or_default();
                let empty = Value::Object(Map::new());
                let arguments = param("arguments").unwrap_or(&empty);
                self.call_tool(name, arguments)
            }
            "resources/list" => self.resources_page(param("cursor")),
            "resources/read" => match param("uri").and_then(Value::as_str) {
                Some(NOTE_URI) => Ok(json!({"contents": [
                    {"uri": NOTE_URI, "mimeType": "text/plain", "text": NOTE_TEXT}
                ]})),
                Some(uri) if self.item_of(uri).is_some() => Ok(json!({"contents": [
                    {"uri": uri, "mimeType": "text/plain",
                     "text": format!("item {}", self.item_of(uri).unwrap_or_default())}
                ]})),
                uri => Err(RpcError::new(
                    INVALID_PARAMS,
                    format!("Unknown resource: {}", uri.unwrap_or("")),
                )
                .with_data(json!({"uri": uri}))),
            },
            "prompts/list" => Ok(json!({"prompts": [{
                "name": "greet",
                "description": "Greets someone by name",
                "arguments": [{"name": "name", "description": "Who to greet", "required": true}],
            }]})),
            "prompts/get" => {
                if param("name").and_then(Value::as_str) != Some("greet") {
                    return Err(RpcError::new(INVALID_PARAMS, "Unknown prompt"));
                }
                let who = param("arguments")
                    .and_then(|arguments| arguments.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        RpcError::new(INVALID_PARAMS, "Missing required argument: name")
                    })?;
                Ok(json!({"messages": [{
                    "role": "user",
                    "content": {"type": "text", "text": format!("Hello, {who}!")},
                }]}))
            }
            _ => Err(RpcError::new(METHOD_NOT_FOUND, "Method not found").with_data(json!(method))),
        }
    }

    /// Unknown tools are protocol errors; bad arguments are tool errors (`isError`), which the
    /// caller (a model) can read and correct, as the 2025-11-25 revision asks.
    fn call_tool(&self, name: &str, arguments: &Value) -> Result<Value, RpcError> {
        thread::sleep(self.call_delay);
        let text_argument = || arguments.get("text").and_then(Value::as_str);
        let outcome = match name {
            "echo" => text_argument()
                .map(str::to_owned)
                .ok_or("echo needs a string `text`"),
            "add" => match (arguments.get("a"), arguments.get("b")) {
                (Some(Value::Number(a)), Some(Value::Number(b))) => Ok(sum(a, b)),
                _ => Err("add needs numbers `a` and `b`"),
            },
            "rendezvous" => self.rendezvous(arguments),
            "connect_later" => match (
                arguments.get("connect").and_then(Value::as_str),
                text_argument(),
            ) {
                (Some(address), Some(text)) => {
                    let armed = (address.to_owned(), text.to_owned());
                    self.armed.lock().expect("armed lock").push(armed);
                    Ok(format!("will connect to {address}"))
                }
                _ => Err("connect_later needs strings `connect` and `text`"),
            },
            "unlock" => {
                if !self.unlocked.swap(true, Ordering::SeqCst) {
                    self.list_changed.store(true, Ordering::SeqCst);
                }
                Ok("unlocked".to_owned())
            }
            "unlocked_tool" | "forbidden_tool" if self.unlocked.load(Ordering::SeqCst) => {
                Ok(format!("{name} ran"))
            }
            "write_note" => match text_argument() {
                Some(text) => self
                    .write_note(text)
                    .map(|()| "noted".to_owned())
                    .map_err(|_| "could not write the note"),
                None => Err("write_note needs a string `text`"),
            },
            _ => {
                return Err(RpcError::new(
                    INVALID_PARAMS,
                    format!("Unknown tool: {name}"),
                ));
            }
        };
        Ok(match outcome {
            Ok(text) => json!({"content": [{"type": "text", "text": text}]}),
            Err(why) => json!({"content": [{"type": "text", "text": why}], "isError": true}),
        })
    }

    /// `rendezvous`: see the module documentation.
    fn rendezvous(&self, arguments: &Value) -> Result<String, &'static str> {
        let key = arguments.get("key").and_then(Value::as_str);
        let parties = arguments.get("parties").and_then(Value::as_u64);
        let (Some(key), Some(parties)) = (key, parties) else {
            return Err("rendezvous needs a string `key` and an integer `parties`");
        };
        let parties = parties as usize;
        let connect = arguments.get("connect").and_then(Value::as_str);
        let mut meetings = self.meetings.lock().expect("meetings lock");
        let meeting = meetings.entry(key.to_owned()).or_default();
        meeting.arrived += 1;
        let me = meeting.arrived;
        self.met.notify_all();
        meetings = self.wait_for(meetings, key, |m| m.arrived >= parties)?;
        if let Some(address) = connect {
            drop(meetings);
            connect_and_send(address, &format!("{key} {me}"));
            meetings = self.meetings.lock().expect("meetings lock");
        }
        if let Some(meeting) = meetings.get_mut(key) {
            meeting.connected += 1;
        }
        self.met.notify_all();
        drop(self.wait_for(meetings, key, |m| m.connected >= parties)?);
        Ok(format!("met {key} as {me} of {parties}"))
    }

    /// Waits (at most [`MEETING_TIMEOUT`]) until the meeting `key` is as `done` says.
    fn wait_for<'a>(
        &self,
        meetings: std::sync::MutexGuard<'a, HashMap<String, Meeting>>,
        key: &str,
        done: impl Fn(&Meeting) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, HashMap<String, Meeting>>, &'static str> {
        let (meetings, waited) = self
            .met
            .wait_timeout_while(meetings, MEETING_TIMEOUT, |meetings| {
                !meetings.get(key).is_some_and(&done)
            })
            .expect("meetings lock");
        if waited.timed_out() {
            return Err("rendezvous: the other parties did not come");
        }
        Ok(meetings)
    }

    /// Makes the connections `connect_later` armed.
    fn connect_armed(&self) {
        let armed = std::mem::take(&mut *self.armed.lock().expect("armed lock"));
        for (address, text) in armed {
            connect_and_send(&address, &text);
        }
    }

    /// The index of `note://items/<i>` when `--resources` offers it.
    fn item_of(&self, uri: &str) -> Option<usize> {
        let index: usize = uri.strip_prefix("note://items/")?.parse().ok()?;
        (index < self.items).then_some(index)
    }

    /// A page of `resources/list`: all of it without `--resources`; else [`PAGE_SIZE`]
    /// resources from the one the cursor names (a decimal index), and the next cursor.
    fn resources_page(&self, cursor: Option<&Value>) -> Result<Value, RpcError> {
        let hello = json!({"uri": NOTE_URI, "name": "hello", "mimeType": "text/plain"});
        let all: Vec<Value> = std::iter::once(hello)
            .chain((0..self.items).map(|i| {
                json!({"uri": format!("note://items/{i}"), "name": format!("item {i}"),
                       "mimeType": "text/plain"})
            }))
            .collect();
        if self.items == 0 {
            return Ok(json!({"resources": all}));
        }
        let start = match cursor {
            None => 0,
            Some(cursor) => cursor
                .as_str()
                .and_then(|c| c.parse::<usize>().ok())
                .filter(|&start| start < all.len())
                .ok_or_else(|| RpcError::new(INVALID_PARAMS, "Invalid cursor"))?,
        };
        let end = (start + PAGE_SIZE).min(all.len());
        let mut page = json!({"resources": all[start..end]});
        if end < all.len() {
            page["nextCursor"] = json!(end.to_string());
        }
        Ok(page)
    }

    fn write_note(&self, text: &str) -> io::Result<()> {
        let Some(path) = &self.notes else {
            return Ok(());
        };
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(file, "{text}")
    }

    /// Answers one stdio line or HTTP body: a message or a batch. `None` when nothing is owed.
    fn handle_text(&self, text: &str) -> Option<Value> {
        match serde_json::from_str::<Value>(text) {
            Err(error) => Some(response(
                &Value::Null,
                Err(RpcError::new(PARSE_ERROR, format!("Parse error: {error}"))),
            )),
            Ok(Value::Array(batch)) if batch.is_empty() => Some(response(
                &Value::Null,
                Err(RpcError::new(
                    INVALID_REQUEST,
                    "Invalid request: empty batch",
                )),
            )),
            Ok(Value::Array(batch)) => {
                let answers: Vec<Value> = batch
                    .iter()
                    .filter_map(|message| self.handle_message(message))
                    .collect();
                (!answers.is_empty()).then_some(Value::Array(answers))
            }
            Ok(message) => self.handle_message(&message),
        }
    }
}

/// Integers stay integers (`2 + 3` is `5`, not `5.0`); anything else is added as floats.
fn sum(a: &serde_json::Number, b: &serde_json::Number) -> String {
    match (a.as_i64(), b.as_i64()) {
        (Some(a), Some(b)) if a.checked_add(b).is_some() => (a + b).to_string(),
        _ => (a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN)).to_string(),
    }
}

/// Opens a TCP connection to `address` and sends `text` and a newline; failures (such as the
/// kernel refusing the connect) are only reported on stderr.
fn connect_and_send(address: &str, text: &str) {
    let sent = address
        .parse::<std::net::SocketAddr>()
        .map_err(io::Error::other)
        .and_then(|address| TcpStream::connect_timeout(&address, std::time::Duration::from_secs(5)))
        .and_then(|mut stream| stream.write_all(format!("{text}\n").as_bytes()));
    if let Err(error) = sent {
        eprintln!("mcp-fast-server: connecting to {address}: {error}");
    }
}

fn server_info() -> Value {
    json!({"name": "mcp-fast-server", "version": env!("CARGO_PKG_VERSION")})
}

fn capabilities() -> Value {
    json!({"tools": {"listChanged": true}, "resources": {}, "prompts": {}})
}

impl Server {
    /// The base tools, and the unlocked two once `unlock` was called.
    fn tools(&self) -> Value {
        let mut tools = base_tools();
        let list = tools.as_array_mut().expect("an array");
        list.push(json!({
            "name": "unlock",
            "description": "Adds two tools to the list (and announces the change)",
            "inputSchema": {"type": "object"},
        }));
        if self.unlocked.load(Ordering::SeqCst) {
            for name in ["unlocked_tool", "forbidden_tool"] {
                list.push(json!({
                    "name": name,
                    "description": "Listed once `unlock` was called",
                    "inputSchema": {"type": "object"},
                }));
            }
        }
        tools
    }
}

fn base_tools() -> Value {
    let read_only = json!({"readOnlyHint": true, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false});
    json!([
        {
            "name": "echo",
            "description": "Returns its text",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            "annotations": read_only,
        },
        {
            "name": "add",
            "description": "Adds two numbers",
            "inputSchema": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
            "annotations": read_only,
        },
        {
            "name": "write_note",
            "description": "Appends a note (the server's only side effect)",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            "annotations": {"readOnlyHint": false, "destructiveHint": true, "idempotentHint": false, "openWorldHint": false},
        },
        {
            "name": "rendezvous",
            "description": "Waits for `parties` calls with the same key; with `connect`, each then connects there",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "parties": {"type": "integer", "minimum": 1},
                    "connect": {"type": "string"},
                },
                "required": ["key", "parties"],
            },
        },
        {
            "name": "connect_later",
            "description": "At the next notification, connects to `connect` and sends `text`",
            "inputSchema": {
                "type": "object",
                "properties": {"connect": {"type": "string"}, "text": {"type": "string"}},
                "required": ["connect", "text"],
            },
        },
    ])
}

// ---------------------------------------------------------------------------------------------
// stdio
// ---------------------------------------------------------------------------------------------

fn serve_stdio(server: &Arc<Server>, mutator: Option<&Mutex<Mutator>>) {
    let mut stdin = io::stdin().lock();
    let stdout = Arc::new(Mutex::new(BufWriter::new(io::stdout())));
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // A line that is not UTF-8 is a parse error to answer, not a reason to stop serving.
        let answer = match std::str::from_utf8(&line) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) if waits_for_others(text) => {
                // Answered on its own thread: the lines after it are answered meanwhile.
                let (server, stdout, text) =
                    (Arc::clone(server), Arc::clone(&stdout), text.to_owned());
                thread::spawn(move || {
                    if let Some(answer) = server.handle_text(&text) {
                        let _ = write_line(&stdout, &answer);
                    }
                });
                continue;
            }
            Ok(text) => server.handle_text(text),
            Err(_) => Some(response(
                &Value::Null,
                Err(RpcError::new(
                    PARSE_ERROR,
                    "Parse error: the line is not UTF-8",
                )),
            )),
        };
        if server.list_changed.swap(false, Ordering::SeqCst) {
            let changed = json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
            if write_line(&stdout, &changed).is_err() {
                return;
            }
        }
        let Some(answer) = answer else { continue };
        let written = match mutator {
            Some(mutator) if !answer["result"]["protocolVersion"].is_string() => {
                write_maybe_mutated(&stdout, &answer, mutator)
            }
            _ => write_line(&stdout, &answer),
        };
        if written.is_err() {
            return;
        }
    }
}

/// Writes `answer`, or one time in two a mutation of it, and a newline.
fn write_maybe_mutated(
    stdout: &Mutex<BufWriter<io::Stdout>>,
    answer: &Value,
    mutator: &Mutex<Mutator>,
) -> io::Result<()> {
    let mut mutator = mutator.lock().expect("mutator lock");
    if !mutator.chance(50) {
        return write_line(stdout, answer);
    }
    let bytes = mutator.mutate(std::slice::from_ref(answer));
    let mut stdout = stdout.lock().expect("stdout lock");
    stdout.write_all(&bytes)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

/// Whether a line is a `rendezvous` call, which waits for other calls.
fn waits_for_others(text: &str) -> bool {
    text.contains("\"rendezvous\"")
        && serde_json::from_str::<Value>(text).is_ok_and(|message| {
            message["method"] == "tools/call" && message["params"]["name"] == "rendezvous"
        })
}

/// Writes one message and a newline to stdout, and flushes.
fn write_line(stdout: &Mutex<BufWriter<io::Stdout>>, message: &Value) -> io::Result<()> {
    let mut stdout = stdout.lock().expect("stdout lock");
    serde_json::to_writer(&mut *stdout, message)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP (JSON responses only), one thread per connection, keep-alive
// ---------------------------------------------------------------------------------------------

/// With `hold_sse`, answers go out as SSE events on streams kept open (`--sse-held-open`).
fn serve_http(server: &Arc<Server>, listener: TcpListener, hold_sse: bool) {
    for stream in listener.incoming().flatten() {
        let server = Arc::clone(server);
        thread::spawn(move || {
            let _ = serve_connection(&server, stream, hold_sse);
        });
    }
}

struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    /// The first value of a header (names compared case-insensitively).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .count()
    }
}

struct HttpResponse {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Option<Value>,
}

impl HttpResponse {
    fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: None,
        }
    }

    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Some(body),
        }
    }

    fn error(status: u16, code: i64, message: &str) -> Self {
        Self::json(
            status,
            response(&Value::Null, Err(RpcError::new(code, message))),
        )
    }
}

fn serve_connection(server: &Server, stream: TcpStream, hold_sse: bool) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    loop {
        let request = match read_request(&mut reader)? {
            Some(Ok(request)) => request,
            Some(Err(status)) => {
                write_response(&mut writer, &HttpResponse::empty(status), true)?;
                return Ok(());
            }
            None => return Ok(()),
        };
        let close = request
            .header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"));
        let answer = server.handle_http(&request);
        if hold_sse && request.method == "POST" && answer.status == 200 && answer.body.is_some() {
            return answer_on_a_held_stream(&mut writer, reader, &answer);
        }
        write_response(&mut writer, &answer, close)?;
        if close {
            return Ok(());
        }
    }
}

/// `Ok(None)` at a clean end of the connection; `Some(Err(status))` for a request to refuse.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Result<HttpRequest, u16>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(Some(Err(400)));
    };
    let (method, path) = (
        method.to_owned(),
        target.split('?').next().unwrap_or("").to_owned(),
    );
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADER_LINES {
            return Ok(Some(Err(431)));
        }
        let Some((name, value)) = trimmed.split_once(':') else {
            return Ok(Some(Err(400)));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut request = HttpRequest {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Ok(Some(Err(411)));
    }
    let length = match request.header("content-length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(length)) if length <= MAX_BODY => length,
        Some(Ok(_)) => return Ok(Some(Err(413))),
        Some(Err(_)) => return Ok(Some(Err(400))),
    };
    request.body.resize(length, 0);
    reader.read_exact(&mut request.body)?;
    Ok(Some(Ok(request)))
}

/// Sends `answer` as the one event of an SSE stream that stays open until the client closes
/// the connection (the end of the body is the end of the connection: no length, no chunks).
fn answer_on_a_held_stream(
    writer: &mut impl Write,
    mut reader: impl io::Read,
    answer: &HttpResponse,
) -> io::Result<()> {
    writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")?;
    for (name, value) in &answer.headers {
        write!(writer, "{name}: {value}\r\n")?;
    }
    let event = answer
        .body
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default();
    write!(writer, "Connection: close\r\n\r\ndata: {event}\n\n")?;
    writer.flush()?;
    // Whatever comes is ignored; the stream is held until the client hangs up.
    let mut ignored = [0u8; 512];
    while matches!(reader.read(&mut ignored), Ok(read) if read > 0) {}
    eprintln!("MCP_PEER_STREAM_CLOSED");
    Ok(())
}

fn write_response(writer: &mut impl Write, answer: &HttpResponse, close: bool) -> io::Result<()> {
    let body = answer
        .body
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default();
    write!(
        writer,
        "HTTP/1.1 {} {}\r\n",
        answer.status,
        reason(answer.status)
    )?;
    if answer.body.is_some() {
        writer.write_all(b"Content-Type: application/json\r\n")?;
    }
    for (name, value) in &answer.headers {
        write!(writer, "{name}: {value}\r\n")?;
    }
    if close {
        writer.write_all(b"Connection: close\r\n")?;
    }
    write!(writer, "Content-Length: {}\r\n\r\n{body}", body.len())?;
    writer.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        _ => "",
    }
}

impl Server {
    fn handle_http(&self, request: &HttpRequest) -> HttpResponse {
        if request.path != "/mcp" {
            return HttpResponse::empty(404);
        }
        match request.method.as_str() {
            "POST" => self.handle_post(request),
            "DELETE" => match request.header("mcp-session-id") {
                None => HttpResponse::error(
                    400,
                    INVALID_REQUEST,
                    "Bad Request: Mcp-Session-Id header is required",
                ),
                Some(session) if self.sessions.lock().unwrap().remove(session) => {
                    HttpResponse::empty(200)
                }
                Some(_) => HttpResponse::error(404, INVALID_REQUEST, "Session not found"),
            },
            // JSON responses only: there is no server-to-client stream to open.
            _ => HttpResponse {
                headers: vec![("Allow", "POST, DELETE".to_owned())],
                ..HttpResponse::empty(405)
            },
        }
    }

    fn handle_post(&self, request: &HttpRequest) -> HttpResponse {
        let content_type = request.header("content-type").unwrap_or("");
        if !content_type
            .to_ascii_lowercase()
            .starts_with("application/json")
        {
            return HttpResponse::error(
                415,
                INVALID_REQUEST,
                "Content-Type must be application/json",
            );
        }
        let accept = request.header("accept").unwrap_or("application/json");
        if !(accept.contains("application/json") || accept.contains("*/*")) {
            return HttpResponse::error(
                406,
                INVALID_REQUEST,
                "Not Acceptable: the client must accept application/json",
            );
        }
        let Ok(text) = std::str::from_utf8(&request.body) else {
            return HttpResponse::error(400, PARSE_ERROR, "Parse error: the body is not UTF-8");
        };
        let message: Value = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(error) => {
                return HttpResponse::error(400, PARSE_ERROR, &format!("Parse error: {error}"));
            }
        };
        let method = message.get("method").and_then(Value::as_str);
        if method.is_some_and(|method| carries_envelope(method, message.get("params"))) {
            return self.handle_modern_post(request, &message);
        }
        if method == Some("initialize") {
            let mut answer =
                HttpResponse::json(200, self.handle_message(&message).unwrap_or(Value::Null));
            let session = new_session_id();
            self.sessions.lock().unwrap().insert(session.clone());
            answer.headers.push(("Mcp-Session-Id", session));
            return answer;
        }
        match request.header("mcp-session-id") {
            None => {
                return HttpResponse::error(
                    400,
                    INVALID_REQUEST,
                    "Bad Request: Mcp-Session-Id header is required",
                );
            }
            Some(session) if !self.sessions.lock().unwrap().contains(session) => {
                return HttpResponse::error(404, INVALID_REQUEST, "Session not found");
            }
            Some(_) => {}
        }
        if let Some(version) = request.header("mcp-protocol-version")
            && !HANDSHAKE_VERSIONS.contains(&version)
        {
            return HttpResponse::error(
                400,
                INVALID_REQUEST,
                &format!("Bad Request: unsupported MCP-Protocol-Version {version}"),
            );
        }
        match self.handle_text(text) {
            Some(answer) => HttpResponse::json(200, answer),
            None => HttpResponse::empty(202),
        }
    }

    /// A 2026-07-28 request: no session; its routing headers must agree with its body.
    fn handle_modern_post(&self, request: &HttpRequest, message: &Value) -> HttpResponse {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let refuse =
            |status: u16, error: RpcError| HttpResponse::json(status, response(&id, Err(error)));
        if let Some(name) = ["mcp-protocol-version", "mcp-method", "mcp-name"]
            .into_iter()
            .find(|name| request.header_count(name) > 1)
        {
            return refuse(
                400,
                RpcError::new(
                    HEADER_MISMATCH,
                    format!("{name} header appears more than once"),
                ),
            );
        }
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let params = message.get("params");
        // The envelope itself is checked first, as the SDKs do: a request without one is told
        // so, not that its headers disagree with it.
        if let Err(error) = era_of(method, params)
            && error.code == INVALID_PARAMS
        {
            return refuse(400, error);
        }
        let body_version = params
            .and_then(|params| params.get("_meta"))
            .and_then(|meta| meta.get(PROTOCOL_VERSION_KEY))
            .and_then(Value::as_str);
        if request.header("mcp-protocol-version").is_none()
            || request.header("mcp-protocol-version") != body_version
        {
            return refuse(
                400,
                RpcError::new(
                    HEADER_MISMATCH,
                    "MCP-Protocol-Version header does not match the body",
                ),
            );
        }
        if request.header("mcp-method") != Some(method) {
            return refuse(
                400,
                RpcError::new(HEADER_MISMATCH, "Mcp-Method header does not match the body"),
            );
        }
        let name_key = match method {
            "tools/call" | "prompts/get" => Some("name"),
            "resources/read" => Some("uri"),
            _ => None,
        };
        if let Some(key) = name_key {
            let body_name = params
                .and_then(|params| params.get(key))
                .and_then(Value::as_str);
            let header_name = request.header("mcp-name").and_then(decode_header_value);
            if body_name.is_some() && header_name.as_deref() != body_name {
                return refuse(
                    400,
                    RpcError::new(HEADER_MISMATCH, "Mcp-Name header does not match the body"),
                );
            }
        }
        match self.handle_message(message) {
            None => HttpResponse::empty(202),
            Some(answer) => {
                let status = match answer.pointer("/error/code").and_then(Value::as_i64) {
                    Some(METHOD_NOT_FOUND) => 404,
                    Some(
                        PARSE_ERROR
                        | INVALID_REQUEST
                        | INVALID_PARAMS
                        | HEADER_MISMATCH
                        | UNSUPPORTED_PROTOCOL_VERSION,
                    ) => 400,
                    _ => 200,
                };
                HttpResponse::json(status, answer)
            }
        }
    }
}

fn new_session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    format!(
        "{nanos:x}-{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Header values that would not survive HTTP verbatim travel as `=?base64?<b64>?=` (the SDKs'
/// rule); `None` for a malformed one, so it never matches a body value by accident.
fn decode_header_value(value: &str) -> Option<String> {
    let Some(payload) = value
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    else {
        return Some(value.to_owned());
    };
    String::from_utf8(decode_base64(payload)?).ok()
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0);
    for &c in bytes {
        buffer = (buffer << 6) | u32::from(digit(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        Server::new(None, std::time::Duration::ZERO, 0)
    }

    #[test]
    fn resources_come_in_pages_with_resources() {
        let paged = Server::new(None, std::time::Duration::ZERO, 7);
        let page = |cursor: Option<Value>| paged.resources_page(cursor.as_ref()).unwrap();
        let first = page(None);
        assert_eq!(first["resources"].as_array().unwrap().len(), PAGE_SIZE);
        assert_eq!(first["resources"][0]["uri"], NOTE_URI);
        assert_eq!(first["nextCursor"], "5");
        let last = page(Some(first["nextCursor"].clone()));
        assert_eq!(last["resources"][0]["uri"], "note://items/4");
        assert_eq!(last["resources"][2]["uri"], "note://items/6");
        assert!(last.get("nextCursor").is_none(), "{last}");
        let unpaged = server().resources_page(None).unwrap();
        assert_eq!(unpaged["resources"].as_array().unwrap().len(), 1);
        assert!(unpaged.get("nextCursor").is_none());
    }

    #[test]
    fn rendezvous_answers_every_party_once_all_arrived() {
        let server = Arc::new(server());
        let meet = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rendezvous","arguments":{"key":"k","parties":2}}}"#;
        assert!(waits_for_others(meet));
        let waiting = {
            let server = Arc::clone(&server);
            thread::spawn(move || server.handle_text(meet).expect("an answer"))
        };
        let second = server.handle_text(meet).expect("an answer");
        let first = waiting.join().unwrap();
        let mut met = [first, second].map(|a| a["result"]["content"][0]["text"].clone());
        met.sort_by_key(Value::to_string);
        assert_eq!(met, [json!("met k as 1 of 2"), json!("met k as 2 of 2")]);
    }

    fn answer(line: &str) -> Value {
        server().handle_text(line).expect("an answer")
    }

    #[test]
    fn initialize_echoes_a_supported_revision_and_counters_others() {
        let init = |version: &str| {
            answer(&format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{version}"}}}}"#
            ))["result"]["protocolVersion"]
                .clone()
        };
        assert_eq!(init("2025-06-18"), "2025-06-18");
        assert_eq!(init("2025-11-25"), "2025-11-25");
        assert_eq!(init("2024-11-05"), "2025-11-25");
    }

    #[test]
    fn add_keeps_integers_integral() {
        let result = answer(
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}}"#,
        );
        assert_eq!(result["result"]["content"][0]["text"], "5");
        let result = answer(
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":0.5,"b":2}}}"#,
        );
        assert_eq!(result["result"]["content"][0]["text"], "2.5");
    }

    #[test]
    fn modern_requests_get_modern_results_and_bad_versions_are_refused() {
        let meta = |version: &str| {
            format!(r#"{{"{PROTOCOL_VERSION_KEY}":"{version}","{CLIENT_CAPABILITIES_KEY}":{{}}}}"#)
        };
        let list = answer(&format!(
            r#"{{"jsonrpc":"2.0","id":4,"method":"tools/list","params":{{"_meta":{}}}}}"#,
            meta(MODERN_VERSION)
        ));
        assert_eq!(list["result"]["resultType"], "complete");
        assert_eq!(list["result"]["ttlMs"], 0);
        let refused = answer(&format!(
            r#"{{"jsonrpc":"2.0","id":5,"method":"tools/list","params":{{"_meta":{}}}}}"#,
            meta("2099-01-01")
        ));
        assert_eq!(refused["error"]["code"], UNSUPPORTED_PROTOCOL_VERSION);
    }

    #[test]
    fn notifications_get_nothing_and_unknown_methods_get_32601() {
        assert!(
            server()
                .handle_text(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
                .is_none()
        );
        assert_eq!(
            answer(r#"{"jsonrpc":"2.0","id":6,"method":"nope"}"#)["error"]["code"],
            METHOD_NOT_FOUND
        );
        assert_eq!(answer("{not json")["error"]["code"], PARSE_ERROR);
    }

    #[test]
    fn base64_header_values_decode() {
        assert_eq!(
            decode_header_value("=?base64?w6ljaG8=?=").as_deref(),
            Some("écho")
        );
        assert_eq!(decode_header_value("echo").as_deref(), Some("echo"));
        assert_eq!(decode_header_value("=?base64?@@@@?="), None);
    }
}
