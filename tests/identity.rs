//! Caller identity on the Streamable HTTP front, end to end: a real `mcp-guard run` daemon
//! (kernel egress on) in front of `mcp-fast-server`, driven by raw HTTP requests.
//!
//! - `identity.jwt`: requests without a valid bearer token are answered 401 with a
//!   `WWW-Authenticate` challenge (and the RFC 9728 metadata URL); a valid token's principal
//!   and roles decide what the caller sees and may do; a session serves only its principal.
//! - `identity.trust_header` (development): the principal comes from `MCP-Guard-Principal`,
//!   and the daemon warns at start-up.
//!
//! Tokens are minted here with the test keys of `mcp-guard/src/identity/testdata` (RS256 and
//! ES256 through a JWKS file, HS256 through an inline secret). Root only.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const FAST_SERVER: &str = env!("CARGO_BIN_EXE_mcp-fast-server");

const HANDSHAKE: &str = "2025-11-25";
const STATELESS: &str = "2026-07-28";
const SERVER: &str = "fast";

const ISSUER: &str = "https://idp.test";
const DEV_ISSUER: &str = "https://dev-idp.test";
const AUDIENCE: &str = "mcp-guard";
const DEV_SECRET: &str = "identity-test secret of at least 32 bytes";
const METADATA_URL: &str = "https://mcp.test/.well-known/oauth-protected-resource";

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
/// Declared in `principals` with role developer; its tokens carry no roles.
const CAROL: &str = "carol";

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims of a token from [`ISSUER`] for `sub` with `roles`, valid for ten minutes.
fn claims(sub: &str, roles: Value) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "roles": roles,
        "iat": now(), "exp": now() + 600,
    })
}

/// A token signed by the test key of `alg` (HS256 with [`DEV_SECRET`]).
fn token(alg: Algorithm, claims: &Value) -> String {
    sign_test_token(alg, claims, DEV_SECRET).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// Sends one request on its own connection (`Connection: close`) and reads the whole answer.
fn request(
    addr: SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> JsonAnswer {
    request_to(addr, SERVER, method, headers, body)
}

/// Like [`request`], to the endpoint of `server`.
fn request_to(
    addr: SocketAddr,
    server: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> JsonAnswer {
    let body = body.map(Value::to_string).unwrap_or_default();
    let path = format!("/servers/{server}/mcp");
    http_exchange(addr, method, &path, headers, &body)
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
        .into()
}

/// POSTs a JSON-RPC message with `extra` headers (the Authorization header among them).
fn post(addr: SocketAddr, extra: &[(&str, &str)], message: &Value) -> JsonAnswer {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    headers.extend_from_slice(extra);
    request(addr, "POST", &headers, Some(message))
}

fn rpc(id: i64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn initialize_message() -> Value {
    rpc(
        0,
        "initialize",
        json!({
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "identity-test", "version": "0"},
        }),
    )
}

/// An MCP session opened with `auth` (extra headers): initialize, then initialized.
struct Session<'a> {
    addr: SocketAddr,
    auth: Vec<(&'a str, String)>,
    id: String,
}

impl<'a> Session<'a> {
    fn open(addr: SocketAddr, auth: Vec<(&'a str, String)>) -> Session<'a> {
        let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = post(addr, &headers, &initialize_message());
        assert_eq!(answer.status, 200, "initialize: {answer:?}");
        let id = answer
            .header("mcp-session-id")
            .unwrap_or_else(|| panic!("initialize answered without a session: {answer:?}"))
            .to_owned();
        let session = Session { addr, auth, id };
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let answer = session.post_as(&session.auth_headers(), &initialized);
        assert_eq!(answer.status, 202, "notifications/initialized: {answer:?}");
        session
    }

    fn auth_headers(&self) -> Vec<(&str, &str)> {
        self.auth.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    /// POSTs in this session with `auth` instead of the session's own credentials.
    fn post_as(&self, auth: &[(&str, &str)], message: &Value) -> JsonAnswer {
        let mut headers = vec![
            ("Mcp-Session-Id", self.id.as_str()),
            ("MCP-Protocol-Version", HANDSHAKE),
        ];
        headers.extend_from_slice(auth);
        post(self.addr, &headers, message)
    }

    /// The JSON-RPC answer of `message` in this session (HTTP 200 expected).
    fn call(&self, message: &Value) -> Value {
        let answer = self.post_as(&self.auth_headers(), message);
        assert_eq!(answer.status, 200, "{message}: {answer:?}");
        answer.body
    }

    fn tool_names(&self) -> BTreeSet<String> {
        tool_names(&self.call(&rpc(1, "tools/list", json!({})))["result"])
    }

    fn echo(&self, text: &str) -> Value {
        self.call(&rpc(
            2,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": text}}),
        ))
    }
}

fn authorization(token: &str) -> Vec<(&'static str, String)> {
    vec![("Authorization", bearer(token))]
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| n.to_string()).collect()
}

fn assert_policy_denied(answer: &Value, rule: &str) {
    let error = &answer["error"];
    assert_eq!(error["code"], -32010, "not a policy refusal: {answer}");
    assert_eq!(
        error["data"]["rule"], rule,
        "refused by another rule: {answer}"
    );
}

/// A 401 with the Bearer challenge of mcp-guard and a JSON-RPC error body.
fn assert_unauthorised(answer: &JsonAnswer, description: &str) {
    assert_eq!(answer.status, 401, "{answer:?}");
    let challenge = answer
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("401 without WWW-Authenticate: {answer:?}"));
    // A request without a bearer token gets no error code (RFC 6750 section 3.1).
    let code = if description.starts_with("no bearer token") {
        ""
    } else {
        "error=\"invalid_token\", "
    };
    assert!(
        challenge.starts_with(&format!(
            "Bearer realm=\"mcp-guard\", {code}error_description="
        )),
        "{challenge}"
    );
    assert!(
        challenge.contains(&format!("error_description=\"{description}")),
        "{challenge}"
    );
    assert!(
        challenge.ends_with(&format!("resource_metadata=\"{METADATA_URL}\"")),
        "{challenge}"
    );
    assert_eq!(answer.body["jsonrpc"], "2.0", "{answer:?}");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(description)),
        "{answer:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A daemon with its HTTP front
// ---------------------------------------------------------------------------------------------

/// Fields drop in order: the daemon stops before the environment tears its cgroups down.
struct Front {
    daemon: Daemon,
    env: TestEnv,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// Developers and interns may list and call echo and add, but interns may not echo anything;
/// viewers have no rule at all.
fn fast_server() -> Value {
    json!({ SERVER: stdio_server(vec![FAST_SERVER.to_string()], vec![
        allow("list-tools", json!({"roles": ["developer", "intern"], "methods": ["tools/list"]})),
        allow("tools", json!({"roles": ["developer", "intern"], "tools": ["echo", "add"]})),
        deny("interns-may-not-echo", json!({
            "roles": ["intern"], "tools": ["echo"],
            "arguments": {"type": "object", "required": ["text"]},
        })),
    ])})
}

impl Front {
    fn start(tag: &str, identity: Value) -> Front {
        Front::start_with(tag, identity, json!({}))
    }

    /// [`Front::start`] with the `daemon` settings in `daemon` besides the usual ones.
    fn start_with(tag: &str, identity: Value, daemon: Value) -> Front {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        Front::start_at(tag, addr, identity, daemon, fast_server())
    }

    /// A front listening on `addr` in front of `servers`.
    fn start_at(
        tag: &str,
        addr: SocketAddr,
        identity: Value,
        daemon: Value,
        servers: Value,
    ) -> Front {
        let env = TestEnv::new(tag, PROBE);
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        let mut document = env.proxy_policy(addr, servers);
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
        document["principals"][CAROL] = json!({"roles": ["developer"]});
        document["principals"]["viewer-user"] = json!({"roles": ["viewer"]});
        document["identity"] = identity;
        for (key, value) in daemon.as_object().into_iter().flatten() {
            document["daemon"][key] = value.clone();
        }
        if document["identity"].get("jwt").is_some() {
            // Callers are who their tokens say; daemon.principal would only draw a warning.
            document["daemon"]
                .as_object_mut()
                .unwrap()
                .remove("principal");
        }
        env.write_policy_document(&document);
        let daemon = env.start_daemon();
        Front {
            daemon,
            env,
            addr,
            metrics,
        }
    }

    fn audit_lines(&self) -> Vec<Value> {
        audit_records(&self.env.audit_path())
    }
}

fn jwt_identity() -> Value {
    json!({
        "jwt": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "keys": {"jwks_file": identity_testdata("jwks.json")},
                    "algorithms": ["RS256", "ES256"],
                },
                {
                    "issuer": DEV_ISSUER,
                    "audiences": [AUDIENCE],
                    "keys": {"hs256_secret": DEV_SECRET},
                    "algorithms": ["HS256"],
                },
            ],
            "roles_claim": "roles",
            "principal_claim": "sub",
            "clock_skew_seconds": 30,
            "resource_metadata_url": METADATA_URL,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// identity.jwt
// ---------------------------------------------------------------------------------------------

/// An identity provider's keys rotate by replacing the JWKS file: the daemon notices the
/// change on its own (no SIGHUP), reloads, and from then on a token signed with the key taken
/// out is refused while the key left in still verifies.
#[test]
fn a_replaced_jwks_file_is_picked_up_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    let jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(identity_testdata("jwks.json")).unwrap())
            .unwrap();
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let mut identity = jwt_identity();
    identity["jwt"]["issuers"][0]["keys"]["jwks_file"] = json!(jwks_path);
    let front = Front::start("identity-jwks-rotation", identity);
    let (ec, rsa) = (
        token(Algorithm::ES256, &claims(ALICE, json!(["developer"]))),
        token(Algorithm::RS256, &claims(ALICE, json!(["developer"]))),
    );
    Session::open(front.addr, authorization(&ec));

    let mut rotated = jwks.clone();
    rotated["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|key| key["kid"] != "ec-1");
    replace_file(&jwks_path, rotated.to_string().as_bytes());
    front
        .daemon
        .wait_for_message("key file changed", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = post(
            front.addr,
            &[("Authorization", &bearer(&ec))],
            &initialize_message(),
        );
        if answer.status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removed key still verifies: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Session::open(front.addr, authorization(&rsa));
}

/// Without a valid bearer token nothing passes the front: POST, GET and DELETE are answered
/// 401 with the Bearer challenge naming the problem and the protected-resource metadata URL,
/// and a JSON-RPC error body. No session is opened for them.
#[test]
fn requests_without_a_valid_token_are_answered_401() {
    let front = Front::start("identity-401", jwt_identity());
    let addr = front.addr;

    let missing = post(addr, &[], &initialize_message());
    assert_unauthorised(&missing, "no bearer token");
    // Not even which servers exist is told to an unauthenticated caller.
    let unknown_server = request_to(
        addr,
        "no-such-server",
        "POST",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        Some(&initialize_message()),
    );
    assert_unauthorised(&unknown_server, "no bearer token");

    let expired = token(
        Algorithm::RS256,
        &json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": ALICE, "roles": ["developer"],
            "iat": now() - 7200, "exp": now() - 3600,
        }),
    );
    let answer = post(
        addr,
        &[("Authorization", &bearer(&expired))],
        &initialize_message(),
    );
    assert_unauthorised(&answer, "the token has expired");

    let early = token(
        Algorithm::RS256,
        &json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": ALICE,
            "nbf": now() + 3600, "exp": now() + 7200,
        }),
    );
    let answer = post(
        addr,
        &[("Authorization", &bearer(&early))],
        &initialize_message(),
    );
    assert_unauthorised(&answer, "the token is not valid yet");

    let mut elsewhere = claims(ALICE, json!(["developer"]));
    elsewhere["aud"] = json!("another-service");
    let answer = post(
        addr,
        &[(
            "Authorization",
            &bearer(&token(Algorithm::ES256, &elsewhere)),
        )],
        &initialize_message(),
    );
    assert_unauthorised(&answer, "the token is not meant for this audience");

    let mut stranger = claims(ALICE, json!(["developer"]));
    stranger["iss"] = json!("https://evil.test");
    let answer = post(
        addr,
        &[(
            "Authorization",
            &bearer(&token(Algorithm::RS256, &stranger)),
        )],
        &initialize_message(),
    );
    assert_unauthorised(&answer, "the token's issuer is not trusted");

    // Signed with the dev issuer's secret but claiming the JWKS issuer: HS256 is not accepted
    // from it.
    let confused = token(Algorithm::HS256, &claims(ALICE, json!(["developer"])));
    let answer = post(
        addr,
        &[("Authorization", &bearer(&confused))],
        &initialize_message(),
    );
    assert_unauthorised(&answer, "tokens signed with HS256 are not accepted");

    let good = token(Algorithm::RS256, &claims(ALICE, json!(["developer"])));
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload = token(Algorithm::RS256, &claims(ALICE, json!(["admin"])));
    parts[1] = forged_payload.split('.').nth(1).unwrap();
    let answer = post(
        addr,
        &[("Authorization", &bearer(&parts.join(".")))],
        &initialize_message(),
    );
    assert_unauthorised(&answer, "the token's signature does not verify");

    for garbage in ["Bearer not-a-jwt", "Basic YWxpY2U6cGFzcw=="] {
        let answer = post(addr, &[("Authorization", garbage)], &initialize_message());
        assert_eq!(answer.status, 401, "{garbage}: {answer:?}");
    }

    let get = request(addr, "GET", &[("Accept", "text/event-stream")], None);
    assert_unauthorised(&get, "no bearer token");
    let delete = request(addr, "DELETE", &[("Mcp-Session-Id", "whatever")], None);
    assert_unauthorised(&delete, "no bearer token");

    // None of it reached the policy or opened a session.
    assert!(
        !front
            .audit_lines()
            .iter()
            .any(|record| record["kind"] == "session" || record["kind"] == "call"),
        "unauthenticated requests left audit records"
    );

    // Each refusal is counted under a fixed reason, never under what the caller sent.
    let scrape = scrape(front.metrics);
    let failures = by_reason(&scrape, "mcp_guard_auth_failures_total");
    let expected = [
        ("missing", 4.0),
        ("expired", 1.0),
        ("not_yet_valid", 1.0),
        ("wrong_audience", 1.0),
        ("unknown_issuer", 1.0),
        ("bad_signature", 2.0),
        ("malformed", 2.0),
    ];
    for (reason, count) in expected {
        assert_eq!(
            failures(reason),
            count,
            "auth failures with reason {reason}"
        );
    }
    let reasons: BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "mcp_guard_auth_failures_total")
        .filter_map(|s| s.labels.get("reason"))
        .collect();
    assert_eq!(
        reasons,
        expected.iter().map(|(reason, _)| *reason).collect(),
        "unexpected reason labels"
    );
    // Every one of them was timed, refused or not.
    assert_eq!(
        metric(
            &scrape,
            "mcp_guard_authentication_duration_seconds_count",
            &[]
        ),
        expected.iter().map(|(_, count)| count).sum::<f64>(),
        "authentications timed"
    );
}

/// A token's roles drive decisions: a developer (RS256) sees and calls the tools its role
/// allows; an intern (ES256) sees the same tools but its echo is refused by policy (-32010);
/// a viewer may not even list. The token's principal is what the audit records name; roles of
/// `principals` are added to a token's (carol's token carries none); a second issuer with an
/// HS256 secret is accepted alongside.
#[test]
fn token_roles_drive_policy_decisions() {
    let front = Front::start("identity-roles", jwt_identity());
    let addr = front.addr;

    let alice = Session::open(
        addr,
        authorization(&token(
            Algorithm::RS256,
            &claims(ALICE, json!(["developer"])),
        )),
    );
    assert_eq!(alice.tool_names(), names(&["add", "echo"]));
    let echoed = alice.echo("hello from alice");
    assert!(echoed.get("error").is_none(), "{echoed}");
    assert_eq!(
        echoed["result"]["content"][0]["text"], "hello from alice",
        "{echoed}"
    );

    let bob = Session::open(
        addr,
        authorization(&token(Algorithm::ES256, &claims(BOB, json!("intern")))),
    );
    assert_eq!(bob.tool_names(), names(&["add", "echo"]));
    assert_policy_denied(&bob.echo("hello from bob"), "interns-may-not-echo");
    let added = bob.call(&rpc(
        3,
        "tools/call",
        json!({"name": "add", "arguments": {"a": 2, "b": 3}}),
    ));
    assert!(added.get("error").is_none(), "{added}");

    let viewer = Session::open(
        addr,
        authorization(&token(Algorithm::RS256, &claims("vera", json!(["viewer"])))),
    );
    assert_policy_denied(
        &viewer.call(&rpc(4, "tools/list", json!({}))),
        "default-deny",
    );

    // No roles in the token; `principals.carol` makes carol a developer.
    let mut carol_claims = claims(CAROL, Value::Null);
    carol_claims["iss"] = json!(DEV_ISSUER);
    carol_claims.as_object_mut().unwrap().remove("roles");
    let carol = Session::open(addr, authorization(&token(Algorithm::HS256, &carol_claims)));
    assert_eq!(carol.tool_names(), names(&["add", "echo"]));

    let audit = front.audit_lines();
    let principals: BTreeSet<String> = audit
        .iter()
        .filter(|r| r["kind"] == "call")
        .filter_map(|r| r["principal"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        principals,
        names(&[ALICE, BOB, CAROL, "vera"]),
        "audit principals"
    );
    let bob_denied = audit.iter().any(|r| {
        r["kind"] == "call"
            && r["principal"] == BOB
            && r["decision"] == "deny"
            && r["rule"] == "interns-may-not-echo"
    });
    assert!(bob_denied, "no deny record for bob's echo: {audit:#?}");

    // Accepted tokens are timed as well: every request here was authenticated, none refused.
    let scrape = scrape(front.metrics);
    let timed = metric(
        &scrape,
        "mcp_guard_authentication_duration_seconds_count",
        &[],
    );
    // Each call came in its own request (a decision and an outcome record share a call id).
    let calls: BTreeSet<&str> = audit
        .iter()
        .filter(|r| r["kind"] == "call")
        .filter_map(|r| r["call_id"].as_str())
        .collect();
    assert!(
        timed >= calls.len() as f64,
        "{timed} authentications for {} calls",
        calls.len()
    );
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric == "mcp_guard_auth_failures_total"),
        "a token was refused"
    );
}

/// A session serves only the principal that opened it: another principal's valid token gets
/// 404 for it (POST, GET, DELETE), the owner's works. Stateless sessions named by
/// `MCP-Guard-Session` are bound the same way (403 for another principal).
#[test]
fn sessions_stay_bound_to_their_principal() {
    let front = Front::start("identity-binding", jwt_identity());
    let addr = front.addr;
    let alice_token = token(Algorithm::RS256, &claims(ALICE, json!(["developer"])));
    let bob_token = token(Algorithm::RS256, &claims(BOB, json!(["developer"])));
    let alice = Session::open(addr, authorization(&alice_token));
    let bob_auth = bearer(&bob_token);
    let as_bob = [("Authorization", bob_auth.as_str())];

    let hijack = alice.post_as(&as_bob, &rpc(5, "tools/list", json!({})));
    assert_eq!(hijack.status, 404, "{hijack:?}");
    let stream = request(
        addr,
        "GET",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &alice.id),
            ("Authorization", &bob_auth),
        ],
        None,
    );
    assert_eq!(stream.status, 404, "{stream:?}");
    let end = request(
        addr,
        "DELETE",
        &[("Mcp-Session-Id", &alice.id), ("Authorization", &bob_auth)],
        None,
    );
    assert_eq!(end.status, 404, "{end:?}");
    // Still alice's, and alice may end it.
    assert_eq!(alice.tool_names(), names(&["add", "echo"]));

    // Each request is judged with the roles its own token carries: alice's session, opened
    // as a developer, is an intern's while she presents an intern's token (her echo is
    // refused by `interns-may-not-echo`), and a developer's again with a developer's token.
    let intern_auth = bearer(&token(Algorithm::RS256, &claims(ALICE, json!(["intern"]))));
    let as_intern = [("Authorization", intern_auth.as_str())];
    let echo = rpc(
        7,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "as an intern"}}),
    );
    let refused = alice.post_as(&as_intern, &echo);
    assert_eq!(refused.status, 200, "{refused:?}");
    assert_policy_denied(&refused.body, "interns-may-not-echo");
    let echoed = alice.echo("as a developer again");
    assert!(echoed.get("error").is_none(), "{echoed}");
    let decided_roles: Vec<Value> = front
        .audit_lines()
        .iter()
        .filter(|r| r["tool"] == "echo" && r.get("decision").is_some())
        .map(|r| r["roles"].clone())
        .collect();
    assert_eq!(
        decided_roles,
        [json!(["intern"]), json!(["developer"])],
        "the decision records name the roles each request was judged with"
    );
    let alice_auth = bearer(&alice_token);
    let end = request(
        addr,
        "DELETE",
        &[
            ("Mcp-Session-Id", &alice.id),
            ("Authorization", &alice_auth),
        ],
        None,
    );
    assert_eq!(end.status, 204, "{end:?}");

    let stateless = |auth: &str| {
        let message = json!({"jsonrpc": "2.0", "id": 6, "method": "tools/list", "params": {"_meta": {
            "io.modelcontextprotocol/protocolVersion": STATELESS,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "identity-test", "version": "0"},
        }}});
        post(
            addr,
            &[
                ("Authorization", auth),
                ("MCP-Protocol-Version", STATELESS),
                ("Mcp-Method", "tools/list"),
                ("MCP-Guard-Session", "shared-name"),
            ],
            &message,
        )
    };
    let first = stateless(&alice_auth);
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.body["result"]["tools"].is_array(), "{first:?}");
    let second = stateless(&bob_auth);
    assert_eq!(second.status, 403, "{second:?}");
}

// ---------------------------------------------------------------------------------------------
// identity.trust_header
// ---------------------------------------------------------------------------------------------

/// Development mode: the daemon warns at start-up; `MCP-Guard-Principal` names the principal
/// (roles from `principals`), a request without it is `daemon.principal`'s, and a malformed
/// name is refused.
/// Open sessions are bounded: a principal may keep `daemon.max_sessions_per_principal` open
/// (the next is answered 429 with -32013) and the daemon `daemon.max_sessions` over all
/// principals (503); ending a session frees its slot. Refusals are counted by reason.
#[test]
fn open_sessions_are_bounded_per_principal_and_in_all() {
    let limits = json!({"max_sessions": 3, "max_sessions_per_principal": 2});
    let front = Front::start_with(
        "identity-session-limits",
        json!({"trust_header": true}),
        limits,
    );
    let addr = front.addr;
    let named = |principal: &str| vec![("MCP-Guard-Principal", principal.to_owned())];
    let first = Session::open(addr, named(CAROL));
    Session::open(addr, named(CAROL));
    let refused = post(
        addr,
        &[("MCP-Guard-Principal", CAROL)],
        &initialize_message(),
    );
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], -32013, "{refused:?}");
    let says = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(says.contains("max_sessions_per_principal"), "{says}");

    // A third principal's session fills the daemon's three; the daemon principal's is refused.
    Session::open(addr, named("viewer-user"));
    let refused = post(addr, &[], &initialize_message());
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], -32013, "{refused:?}");

    let end = request(
        addr,
        "DELETE",
        &[
            ("Mcp-Session-Id", &first.id),
            ("MCP-Guard-Principal", CAROL),
        ],
        None,
    );
    assert!(end.status < 300, "{end:?}");
    let agent = Session::open(addr, Vec::new());
    assert_eq!(agent.tool_names(), names(&["add", "echo"]));

    let scrape = scrape(front.metrics);
    let refusals = by_reason(&scrape, "mcp_guard_sessions_refused_total");
    assert_eq!(refusals("principal_limit"), 1.0);
    assert_eq!(refusals("daemon_limit"), 1.0);
    // And on record: who was refused, on which server, by which limit.
    let refused: Vec<(Value, Value)> = front
        .audit_lines()
        .into_iter()
        .filter(|r| r["kind"] == "session" && r["detail"]["event"] == "refused")
        .map(|r| (r["principal"].clone(), r["detail"]["reason"].clone()))
        .collect();
    assert_eq!(
        refused,
        [
            (json!(CAROL), json!("principal_limit")),
            (json!("agent"), json!("daemon_limit"))
        ]
    );
}

#[test]
fn trust_header_takes_the_principal_from_the_header_and_warns() {
    let front = Front::start("identity-header", json!({"trust_header": true}));
    let warning = front
        .daemon
        .wait_for_since(0, TIMEOUT, "the trust_header warning", |line| {
            line["level"] == "WARN"
                && message(line).is_some_and(|m| {
                    m.starts_with("identity.trust_header:") && m.contains("for development only")
                })
        });
    assert!(message(&warning).unwrap().contains("MCP-Guard-Principal"));
    let addr = front.addr;

    let carol = Session::open(addr, vec![("MCP-Guard-Principal", CAROL.to_owned())]);
    assert_eq!(carol.tool_names(), names(&["add", "echo"]));
    let viewer = Session::open(
        addr,
        vec![("MCP-Guard-Principal", "viewer-user".to_owned())],
    );
    assert_policy_denied(
        &viewer.call(&rpc(7, "tools/list", json!({}))),
        "default-deny",
    );
    // Without the header: daemon.principal (`agent`, a developer in the proxy policy).
    let agent = Session::open(addr, Vec::new());
    assert_eq!(agent.tool_names(), names(&["add", "echo"]));
    // The session is carol's: naming someone else in it does not reach it.
    let other = carol.post_as(
        &[("MCP-Guard-Principal", "viewer-user")],
        &rpc(8, "tools/list", json!({})),
    );
    assert_eq!(other.status, 404, "{other:?}");

    let malformed = post(
        addr,
        &[("MCP-Guard-Principal", "not a name")],
        &initialize_message(),
    );
    assert_eq!(malformed.status, 400, "{malformed:?}");

    let principals: BTreeSet<String> = front
        .audit_lines()
        .iter()
        .filter(|r| r["kind"] == "call")
        .filter_map(|r| r["principal"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(principals, names(&[CAROL, "viewer-user", AGENT]));
}

/// With `identity.trust_header` off (the default), `MCP-Guard-Principal` names nobody: a
/// session opened with `viewer-user` in it (a principal with no rules) is `daemon.principal`'s
/// (`agent`, a developer), lists and calls what developers may; a name that is not a valid
/// principal is not refused, only ignored. Every record is `agent`'s, and the server is told
/// `agent` in `_meta`, also when the agent's own `_meta` named someone else.
#[test]
fn without_trust_header_the_principal_header_is_ignored() {
    let wire_dir = tempfile::tempdir().expect("tempdir");
    let wire = wire_dir.path().join("wire.jsonl");
    let mut servers = fast_server();
    servers[SERVER]["command"] = json!(server_recording_to(&wire, FAST_SERVER));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let front = Front::start_at("identity-no-header", addr, json!({}), json!({}), servers);

    let claimed = Session::open(
        addr,
        vec![("MCP-Guard-Principal", "viewer-user".to_owned())],
    );
    assert_eq!(claimed.tool_names(), names(&["add", "echo"]));
    let spoofed = claimed.call(&rpc(
        3,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "whose?"},
               "_meta": {"io.mcp-guard/principal": "viewer-user"}}),
    ));
    assert_eq!(
        spoofed["result"]["content"][0]["text"], "whose?",
        "{spoofed}"
    );
    let malformed = Session::open(addr, vec![("MCP-Guard-Principal", "not a name".to_owned())]);
    assert_eq!(
        malformed.echo("malformed")["result"]["content"][0]["text"],
        "malformed"
    );

    let records = front.audit_lines();
    let principals: BTreeSet<String> = records
        .iter()
        .filter(|r| r["kind"] == "call" || r["kind"] == "session")
        .map(|r| r["principal"].as_str().unwrap_or("(none)").to_owned())
        .collect();
    assert_eq!(principals, names(&[AGENT]), "{records:#?}");
    let echoes = records
        .iter()
        .filter(|r| r["tool"] == "echo" && r["decision"] == "allow")
        .count();
    assert_eq!(echoes, 2, "{records:#?}");

    let forwarded: Vec<Value> = std::fs::read_to_string(&wire)
        .unwrap_or_else(|err| panic!("read {}: {err}", wire.display()))
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["method"] == "tools/call")
        .collect();
    assert_eq!(forwarded.len(), 2, "{forwarded:#?}");
    for message in &forwarded {
        assert_eq!(
            message["params"]["_meta"]["io.mcp-guard/principal"], AGENT,
            "{message}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// identity.jwt.protected_resource: an OAuth client finds its own way in
// ---------------------------------------------------------------------------------------------

/// The authorisation server of `oauth_server.py`, stopped when dropped.
struct AuthorizationServer {
    child: std::process::Child,
    issuer: String,
    /// Its stdout after the first line: one `{"issued": {claims}}` per token.
    issued: std::sync::mpsc::Receiver<String>,
}

impl AuthorizationServer {
    /// Grants every request to `subject` with `roles`, signing with the RS256 test key
    /// (`rsa-1` of the test JWKS).
    fn start(peers: &Peers, subject: &str, roles: &[&str]) -> AuthorizationServer {
        let port = free_loopback_port().to_string();
        let key = identity_testdata("rsa_private.pem").display().to_string();
        let mut args = vec![
            "--port",
            &port,
            "--key",
            &key,
            "--kid",
            "rsa-1",
            "--subject",
            subject,
        ];
        for role in roles {
            args.extend(["--role", role]);
        }
        let command = peers.oauth_server(&args);
        let mut child = std::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start oauth_server.py");
        let (lines, stderr) = collect_output(&mut child);
        let first = lines.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "oauth_server.py did not announce itself: {}",
                stderr.lock().unwrap()
            )
        });
        let issuer = serde_json::from_str::<Value>(&first).unwrap()["issuer"]
            .as_str()
            .expect("an issuer line")
            .to_owned();
        AuthorizationServer {
            child,
            issuer,
            issued: lines,
        }
    }

    /// The claims of the tokens issued so far.
    fn issued_claims(&self) -> Vec<Value> {
        self.issued
            .try_iter()
            .map(|line| serde_json::from_str::<Value>(&line).unwrap()["issued"].clone())
            .collect()
    }
}

impl Drop for AuthorizationServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `protected_resource`, mcp-guard is an OAuth protected resource as the MCP
/// authorization specification describes one (RFC 9728 metadata, RFC 8707 audiences):
/// - each server's metadata is served without authentication (CORS-readable), and a 401 names
///   it;
/// - the official Python SDK client, given nothing but the server's URL, follows the 401 to the
///   metadata, to the authorisation server (built on the SDK's own authorisation-server
///   routes), registers, gets a token for that server, and calls tools through mcp-guard under
///   the principal and roles of the token; so does the TypeScript SDK's OAuth client;
/// - a token meant for one server behind the front is refused at another.
#[test]
fn an_oauth_client_finds_the_authorisation_server_and_gets_in_with_a_token_for_its_server() {
    let peers = Peers::require();
    let authorization = AuthorizationServer::start(&peers, ALICE, &["developer"]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let public_url = format!("http://{addr}");
    let resource = |server: &str| format!("{public_url}/servers/{server}/mcp");
    let metadata_path =
        |server: &str| format!("/.well-known/oauth-protected-resource/servers/{server}/mcp");
    let mut servers = fast_server();
    servers["other"] = stdio_server(
        vec![FAST_SERVER.to_string()],
        vec![allow("all", json!({"roles": ["developer"]}))],
    );
    let identity = json!({
        "jwt": {
            "issuers": [{
                "issuer": authorization.issuer,
                "audiences": [resource(SERVER), resource("other")],
                "keys": {"pem_file": identity_testdata("rsa_public.pem")},
                "algorithms": ["RS256"],
            }],
            "protected_resource": {"public_url": public_url, "scopes_supported": ["mcp"]},
        }
    });
    let front = Front::start_at("identity-oauth", addr, identity, json!({}), servers);

    // The metadata, as any client (or web page) reads it before it has a token.
    let answer: JsonAnswer = http_exchange(addr, "GET", &metadata_path(SERVER), &[], "")
        .unwrap()
        .into();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body,
        json!({
            "resource": resource(SERVER),
            "authorization_servers": [authorization.issuer],
            "bearer_methods_supported": ["header"],
            "scopes_supported": ["mcp"],
        })
    );
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    let preflight: JsonAnswer = http_exchange(
        addr,
        "OPTIONS",
        &metadata_path(SERVER),
        &[
            ("Origin", "http://inspector.test"),
            ("Access-Control-Request-Method", "GET"),
        ],
        "",
    )
    .unwrap()
    .into();
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert!(
        preflight
            .header("access-control-allow-headers")
            .is_some_and(|h| h.contains("mcp-protocol-version")),
        "{preflight:?}"
    );
    // A name the policy lacks gets a document like any other (an unauthenticated caller learns
    // no server names); a name no policy could hold gets none.
    let unknown: JsonAnswer = http_exchange(addr, "GET", &metadata_path("no-such-server"), &[], "")
        .unwrap()
        .into();
    assert_eq!(
        unknown.body["resource"],
        resource("no-such-server"),
        "{unknown:?}"
    );
    let malformed: JsonAnswer = http_exchange(addr, "GET", &metadata_path("a%20b"), &[], "")
        .unwrap()
        .into();
    assert_eq!(malformed.status, 404, "{malformed:?}");

    // A 401 names the metadata of the server asked for.
    let refused = post(addr, &[], &initialize_message());
    assert_eq!(refused.status, 401, "{refused:?}");
    let challenge = refused.header("www-authenticate").unwrap();
    assert!(
        challenge.ends_with(&format!(
            "resource_metadata=\"{public_url}{}\"",
            metadata_path(SERVER)
        )),
        "{challenge}"
    );

    // The SDK's OAuth client, from the URL alone.
    let script = json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "echo", "arguments": {"text": "through OAuth"}},
    ]);
    let run = mcp_client(
        &peers,
        Transport::OAuth(&resource(SERVER)),
        HANDSHAKE,
        &script,
    );
    let oauth = &run.initialize["oauth"];
    assert_eq!(
        oauth["protected_resource_metadata"]["resource"],
        resource(SERVER),
        "{}",
        run.run.report()
    );
    assert_eq!(oauth["authorization_server"], authorization.issuer.as_str());
    assert_eq!(tool_names(run.ok(0)), names(&["echo", "add"]));
    assert_eq!(run.ok(1)["content"][0]["text"], "through OAuth");
    // The token was meant for that server alone, and mcp-guard acted as its subject.
    let issued = authorization.issued_claims();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0]["aud"], resource(SERVER));
    assert_eq!(issued[0]["sub"], ALICE);
    let echo_decision = front
        .audit_lines()
        .into_iter()
        .find(|record| record["tool"] == "echo" && record.get("decision").is_some())
        .expect("a decision record for echo");
    assert_eq!(echo_decision["principal"], ALICE, "{echo_decision}");
    assert_eq!(echo_decision["decision"], "allow", "{echo_decision}");

    // The TypeScript SDK's OAuth client does the same for the other server, and its token is
    // meant for that one.
    let script =
        json!([{"op": "call_tool", "name": "echo", "arguments": {"text": "from TypeScript"}}]);
    let run = ts_client(&peers, Transport::OAuth(&resource("other")), &script);
    assert_eq!(
        run.initialize["oauth"]["resource"],
        resource("other"),
        "{}",
        run.run.report()
    );
    assert_eq!(run.ok(0)["content"][0]["text"], "from TypeScript");
    let issued = authorization.issued_claims();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0]["aud"], resource("other"));

    // A token for one server does not open the other, and the other's own token does.
    let token_for = |server: &str| {
        token(
            Algorithm::RS256,
            &json!({
                "iss": authorization.issuer, "aud": resource(server), "sub": ALICE,
                "roles": ["developer"], "iat": now(), "exp": now() + 600,
            }),
        )
    };
    let to_other = |token: &str| {
        request_to(
            addr,
            "other",
            "POST",
            &[
                ("Content-Type", "application/json"),
                ("Accept", "application/json, text/event-stream"),
                ("Authorization", &bearer(token)),
            ],
            Some(&initialize_message()),
        )
    };
    let refused = to_other(&token_for(SERVER));
    assert_eq!(refused.status, 401, "{refused:?}");
    let challenge = refused.header("www-authenticate").unwrap();
    assert!(
        challenge.contains(
            "error_description=\"the token is meant for another server behind this front\""
        ) && challenge.ends_with(&format!(
            "resource_metadata=\"{public_url}{}\"",
            metadata_path("other")
        )),
        "{challenge}"
    );
    let admitted = to_other(&token_for("other"));
    assert_eq!(admitted.status, 200, "{admitted:?}");
    let answer = post(
        addr,
        &[("Authorization", &bearer(&token_for(SERVER)))],
        &initialize_message(),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
}

/// Reads one metric by its `reason` label.
fn by_reason<'a>(scrape: &'a prometheus_parse::Scrape, name: &'a str) -> impl Fn(&str) -> f64 + 'a {
    move |reason| metric(scrape, name, &[("reason", reason)])
}

/// A token for [`ISSUER`] with the `kid` of its RS256 key, signed by another key: what a
/// sender who knows the issuer's format but not its key sends.
fn forged_token(n: i64) -> String {
    let key = std::fs::read(identity_testdata("other_rsa_private.pem")).unwrap();
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let mut claims = claims(ALICE, json!(["developer"]));
    claims["jti"] = json!(n);
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&key).unwrap(),
    )
    .unwrap()
}

/// An `initialize` with `token` (and `extra` headers) sent from the local address `from`.
fn initialize_as(addr: SocketAddr, from: &str, token: &str, extra: &[(&str, &str)]) -> JsonAnswer {
    let authorization = bearer(token);
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("Authorization", authorization.as_str()),
    ];
    headers.extend_from_slice(extra);
    let path = format!("/servers/{SERVER}/mcp");
    let body = initialize_message().to_string();
    http_exchange_from(from.parse().unwrap(), addr, "POST", &path, &headers, &body)
        .unwrap()
        .into()
}

/// The `client_addr`s of the call records.
fn client_addrs(front: &Front) -> BTreeSet<String> {
    front
        .audit_lines()
        .iter()
        .filter(|record| record["kind"] == "call")
        .filter_map(|record| record["client_addr"].as_str().map(str::to_owned))
        .collect()
}

/// An address whose tokens were refused `refused_tokens_per_minute` times after a signature
/// check gets 429 with `Retry-After` for new tokens, valid or not, without a check, while a
/// token it had used before still works and another address is served as usual. Throttled
/// requests are counted under `throttled`, and the daemon says once which address it holds
/// back.
#[test]
fn an_address_sending_forged_tokens_is_held_back_and_others_are_not() {
    let mut identity = jwt_identity();
    identity["jwt"]["refused_tokens_per_minute"] = json!(3);
    let front = Front::start("identity-refusals", identity);
    let initialize_from = |from: &str, token: &str| initialize_as(front.addr, from, token, &[]);
    let alice = token(Algorithm::RS256, &claims(ALICE, json!(["developer"])));
    let bob = token(Algorithm::RS256, &claims(BOB, json!(["developer"])));
    assert_eq!(initialize_from("127.0.0.1", &alice).status, 200);

    for n in 0..3 {
        assert_unauthorised(
            &initialize_from("127.0.0.1", &forged_token(n)),
            "the token's signature does not verify",
        );
    }
    for token in [forged_token(3), bob.clone()] {
        assert_held_back(
            &initialize_from("127.0.0.1", &token),
            "too many refused tokens from this address",
        );
    }
    // What the address had used before still works; another address is checked as usual.
    assert_eq!(initialize_from("127.0.0.1", &alice).status, 200);
    assert_eq!(initialize_from("127.0.0.2", &bob).status, 200);
    assert_unauthorised(
        &initialize_from("127.0.0.2", &forged_token(4)),
        "the token's signature does not verify",
    );

    let scrape = scrape(front.metrics);
    let failures = by_reason(&scrape, "mcp_guard_auth_failures_total");
    assert_eq!(failures("bad_signature"), 4.0);
    assert_eq!(failures("throttled"), 2.0);
    let warnings = |lines: &[Value]| {
        lines
            .iter()
            .filter(|line| {
                message(line).is_some_and(|m| m.contains("refused too often"))
                    && field(line, "peer") == "127.0.0.1"
            })
            .count()
    };
    assert_warned_once(&front.daemon.log, warnings);

    // Every call record says where its request came from.
    let calls: Vec<Value> = front
        .audit_lines()
        .into_iter()
        .filter(|record| record["kind"] == "call")
        .collect();
    assert!(
        calls.iter().all(|record| record["client_addr"].is_string()),
        "{calls:#?}"
    );
    assert_eq!(client_addrs(&front), names(&["127.0.0.1", "127.0.0.2"]));
}

/// Forged tokens from many addresses, none over its own budget, use up the budget of all
/// addresses together: then a new token gets 429 with `Retry-After` from any address, valid or
/// not and unchecked, while a token accepted before still passes. Counted under
/// `throttled_all`; the daemon says once that it holds every new token back.
#[test]
fn forged_tokens_from_many_addresses_use_up_the_budget_of_all() {
    let mut identity = jwt_identity();
    identity["jwt"]["refused_tokens_per_minute"] = json!(2);
    identity["jwt"]["refused_tokens_per_minute_all_addresses"] = json!(4);
    let front = Front::start("identity-refusals-all", identity);
    let initialize_from = |from: &str, token: &str| initialize_as(front.addr, from, token, &[]);
    let alice = token(Algorithm::RS256, &claims(ALICE, json!(["developer"])));
    assert_eq!(initialize_from("127.0.0.9", &alice).status, 200);

    for n in 0..4 {
        let sender = format!("127.0.0.{}", 10 + n);
        assert_unauthorised(
            &initialize_from(&sender, &forged_token(n)),
            "the token's signature does not verify",
        );
    }
    let bob = token(Algorithm::RS256, &claims(BOB, json!(["developer"])));
    for (from, token) in [("127.0.0.20", forged_token(4)), ("127.0.0.21", bob)] {
        assert_held_back(
            &initialize_from(from, &token),
            "too many refused tokens from all clients",
        );
    }
    assert_eq!(initialize_from("127.0.0.22", &alice).status, 200);

    let scrape = scrape(front.metrics);
    let failures = by_reason(&scrape, "mcp_guard_auth_failures_total");
    assert_eq!(failures("bad_signature"), 4.0);
    assert_eq!(failures("throttled_all"), 2.0);
    assert_eq!(failures("throttled"), 0.0);
    let warnings = |lines: &[Value]| {
        lines
            .iter()
            .filter(|line| {
                message(line)
                    .is_some_and(|m| m.contains("from all addresses were refused too often"))
            })
            .count()
    };
    assert_warned_once(&front.daemon.log, warnings);
}

/// The daemon's log has exactly one of the warnings `warnings` counts (once its log reader has
/// caught up with the first).
fn assert_warned_once(log: &Log, warnings: impl Fn(&[Value]) -> usize) {
    log.wait_until(TIMEOUT, |lines| warnings(lines) >= 1);
    assert_eq!(warnings(&log.lines()), 1, "{}", log.summary(0, 20));
}

/// A token held back by a budget of refused tokens: 429, `Retry-After` within the minute, and
/// an error that says which budget.
fn assert_held_back(held_back: &JsonAnswer, budget_message: &str) {
    assert_eq!(held_back.status, 429, "{held_back:?}");
    let retry_after: u64 = held_back
        .header("retry-after")
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {held_back:?}"));
    assert!((1..=60).contains(&retry_after), "{held_back:?}");
    assert!(
        held_back.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(budget_message)),
        "{held_back:?}"
    );
}

/// Behind a proxy the policy trusts, the client is the address its `X-Forwarded-For` names:
/// that is what the call records say and what the budget of refused tokens counts, so one
/// client forging tokens through the proxy does not hold back another. A connection from an
/// address that is not a trusted proxy is its own client, whatever header it sends.
#[test]
fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let mut identity = jwt_identity();
    identity["jwt"]["refused_tokens_per_minute"] = json!(2);
    let front = Front::start_with(
        "identity-forwarded",
        identity,
        json!({"trusted_proxies": ["127.0.0.1"]}),
    );
    let via_proxy = |client: &str, token: &str| {
        let forwarded = format!("203.0.113.200, {client}");
        initialize_as(
            front.addr,
            "127.0.0.1",
            token,
            &[("X-Forwarded-For", forwarded.as_str())],
        )
    };
    for n in 0..2 {
        assert_unauthorised(
            &via_proxy("198.51.100.9", &forged_token(n)),
            "the token's signature does not verify",
        );
    }
    assert_eq!(via_proxy("198.51.100.9", &forged_token(2)).status, 429);
    let bob = token(Algorithm::RS256, &claims(BOB, json!(["developer"])));
    assert_eq!(via_proxy("198.51.100.10", &bob).status, 200);
    // Not a trusted proxy: its header is not believed.
    let alice = token(Algorithm::RS256, &claims(ALICE, json!(["developer"])));
    let direct = initialize_as(
        front.addr,
        "127.0.0.2",
        &alice,
        &[("X-Forwarded-For", "198.51.100.9")],
    );
    assert_eq!(direct.status, 200, "{direct:?}");
    // RFC 7239 Forwarded is read as well (and first).
    let carol = token(Algorithm::RS256, &claims(CAROL, json!([])));
    let forwarded = initialize_as(
        front.addr,
        "127.0.0.1",
        &carol,
        &[("Forwarded", "for=\"[2001:db8::11]:4711\";proto=https")],
    );
    assert_eq!(forwarded.status, 200, "{forwarded:?}");
    assert_eq!(
        client_addrs(&front),
        names(&["198.51.100.10", "127.0.0.2", "2001:db8::11"])
    );
}
