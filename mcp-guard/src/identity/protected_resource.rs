//! The HTTP front as an OAuth 2.0 protected resource (RFC 9728), which the MCP authorization
//! specification asks of every server that takes bearer tokens.
//!
//! With `identity.jwt.protected_resource`, each server S behind the front is a resource of its
//! own, `<public_url>/servers/S/mcp`:
//! - its metadata is served at `/.well-known/oauth-protected-resource/servers/S/mcp` (RFC 9728
//!   section 3.1: the well-known segment goes between the host and the resource's path), and a
//!   401 from S names that URL in its challenge. A client follows it to the authorisation
//!   server and asks for a token for S (RFC 8707 `resource`), whose `aud` then names S.
//! - a token whose `aud` names a resource of this front must name S (or the front itself,
//!   `public_url`) to be used at S: a token an agent got for one server does not open another.
//!   Tokens whose audiences are none of this front's resources (a fixed audience such as
//!   `mcp-guard`, for authorisation servers without RFC 8707) are judged by the issuers'
//!   `audiences` alone, as without this setting.

use serde_json::{Value, json};

use crate::policy::{JwtSettings, ProtectedResource};

/// Where protected-resource metadata lives, before the resource's path.
pub const METADATA_PREFIX: &str = "/.well-known/oauth-protected-resource";

impl ProtectedResource {
    /// `public_url` as an origin: `scheme://host[:port]`, lower case, default port left out.
    /// Validation has made sure it parses.
    pub fn origin(&self) -> String {
        match url::Url::parse(&self.public_url) {
            Ok(url) => url.origin().ascii_serialization(),
            Err(_) => self.public_url.trim_end_matches('/').to_owned(),
        }
    }

    /// The resource identifier of `server`: the URL agents post its MCP traffic to.
    pub fn resource_of(&self, server: &str) -> String {
        format!("{}/servers/{server}/mcp", self.origin())
    }

    /// Where `server`'s metadata is served.
    pub fn metadata_url_of(&self, server: &str) -> String {
        format!("{}{METADATA_PREFIX}/servers/{server}/mcp", self.origin())
    }

    /// The authorisation servers clients are sent to: those listed, else every issuer.
    pub fn authorization_servers<'a>(&'a self, jwt: &'a JwtSettings) -> Vec<&'a str> {
        if self.authorization_servers.is_empty() {
            jwt.issuers.iter().map(|i| i.issuer.as_str()).collect()
        } else {
            self.authorization_servers
                .iter()
                .map(String::as_str)
                .collect()
        }
    }

    /// The metadata document of `server` (RFC 9728 section 2).
    pub fn metadata(&self, jwt: &JwtSettings, server: &str) -> Value {
        let mut document = json!({
            "resource": self.resource_of(server),
            "authorization_servers": self.authorization_servers(jwt),
            "bearer_methods_supported": ["header"],
        });
        if !self.scopes_supported.is_empty() {
            document["scopes_supported"] = json!(self.scopes_supported);
        }
        document
    }

    /// Whether a token with `audiences` may be used at `server`: yes, unless it names resources
    /// of this front and none of them is `server`'s or the front's own.
    pub fn admits(&self, server: &str, audiences: &[String]) -> bool {
        // Runs on every authenticated request: the public URL is parsed once here.
        let origin = self.origin();
        let own = format!("{origin}/servers/{server}/mcp");
        let for_here = |audience: &String| {
            let audience = audience.trim_end_matches('/');
            audience == origin || audience == own
        };
        audiences.iter().any(for_here)
            || !audiences
                .iter()
                .any(|audience| names_front_at(&origin, audience))
    }

    /// Whether `audience` is this front (`public_url`) or one of its servers' resources.
    pub fn names_this_front(&self, audience: &str) -> bool {
        names_front_at(&self.origin(), audience)
    }
}

/// Whether `audience` is the front at `origin` or one of its servers' resources.
fn names_front_at(origin: &str, audience: &str) -> bool {
    let audience = audience.trim_end_matches('/');
    audience == origin
        || audience
            .strip_prefix(origin)
            .is_some_and(|path| path.starts_with("/servers/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(public_url: &str) -> ProtectedResource {
        ProtectedResource {
            public_url: public_url.into(),
            authorization_servers: Vec::new(),
            scopes_supported: Vec::new(),
        }
    }

    fn jwt(issuers: &[&str]) -> JwtSettings {
        let issuers: Vec<Value> = issuers
            .iter()
            .map(|issuer| {
                json!({
                    "issuer": issuer, "audiences": ["mcp-guard"],
                    "keys": {"hs256_secret": "x".repeat(32)}, "algorithms": ["HS256"],
                })
            })
            .collect();
        serde_json::from_value(json!({ "issuers": issuers })).unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn urls_are_built_from_the_public_origin() {
        for written in [
            "https://MCP.example.com",
            "https://mcp.example.com/",
            "https://mcp.example.com:443",
        ] {
            let front = resource(written);
            assert_eq!(front.origin(), "https://mcp.example.com", "{written}");
            assert_eq!(
                front.resource_of("files"),
                "https://mcp.example.com/servers/files/mcp"
            );
            assert_eq!(
                front.metadata_url_of("files"),
                "https://mcp.example.com/.well-known/oauth-protected-resource/servers/files/mcp"
            );
        }
        assert_eq!(
            resource("http://127.0.0.1:8080").resource_of("time"),
            "http://127.0.0.1:8080/servers/time/mcp"
        );
    }

    #[test]
    fn metadata_names_the_issuers_unless_servers_are_listed() {
        let settings = jwt(&["https://idp.example.com/realms/a", "https://other.example"]);
        let mut front = resource("https://mcp.example.com");
        assert_eq!(
            front.metadata(&settings, "files"),
            json!({
                "resource": "https://mcp.example.com/servers/files/mcp",
                "authorization_servers": ["https://idp.example.com/realms/a", "https://other.example"],
                "bearer_methods_supported": ["header"],
            })
        );
        front.authorization_servers = strings(&["https://login.example.com"]);
        front.scopes_supported = strings(&["mcp:tools"]);
        let document = front.metadata(&settings, "files");
        assert_eq!(
            document["authorization_servers"],
            json!(["https://login.example.com"])
        );
        assert_eq!(document["scopes_supported"], json!(["mcp:tools"]));
    }

    #[test]
    fn a_token_for_one_server_does_not_open_another() {
        let front = resource("https://mcp.example.com");
        let files = "https://mcp.example.com/servers/files/mcp";
        assert!(front.admits("files", &strings(&[files])));
        assert!(front.admits(
            "files",
            &strings(&["https://mcp.example.com/servers/files/mcp/"])
        ));
        assert!(!front.admits("time", &strings(&[files])));
        // The front itself covers every server; so does a list naming the server among others.
        assert!(front.admits("time", &strings(&["https://mcp.example.com"])));
        assert!(front.admits("time", &strings(&["https://mcp.example.com/"])));
        assert!(front.admits(
            "time",
            &strings(&[files, "https://mcp.example.com/servers/time/mcp"])
        ));
        // Audiences that are no resource of this front are left to the issuers' `audiences`.
        assert!(front.admits("time", &strings(&["mcp-guard"])));
        assert!(front.admits("time", &strings(&[])));
        assert!(front.admits(
            "time",
            &strings(&["https://mcp.example.com.evil/servers/files/mcp"])
        ));
        assert!(!front.admits("time", &strings(&["mcp-guard", files])));
    }
}
