//! `cargo xtask bench identity`: what checking a bearer JWT costs a request on the HTTP front,
//! for HS256, RS256 (2048-bit) and ES256 (P-256), the first time a token is seen (signature,
//! claims, and keeping it) and on the requests after (the same token, from the verifier's
//! accepted tokens: a SHA-256 of the token, a lookup and the `exp`/`nbf` check).
//!
//! Each round builds a fresh verifier per algorithm (so nothing is kept from earlier rounds),
//! verifies each of its tokens once ("first use"), then each again ("later use"). Algorithms
//! are interleaved in rounds so that drift and noise hit all alike. Tokens are signed before
//! timing with the test keys of `mcp-guard/src/identity/testdata`, and each names its own
//! `jti`, like the tokens an identity provider issues to different agents.
//!
//! Flags: `--tokens N` per algorithm and round (500), `--rounds N` (4), `--json`.

use std::time::Instant;

use jsonwebtoken::Algorithm;
use mcp_guard::identity::jwt::Verifier;
use mcp_guard::policy::{JwtAlgorithm, JwtIssuer, JwtKeys, JwtSettings};
use mcp_guard_tests::bench::{parse_number, percentile};
use mcp_guard_tests::{identity_testdata, sign_test_token};
use serde_json::{Value, json};

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "mcp-guard";
const SECRET: &str = "a shared secret of at least thirty-two bytes";

struct Options {
    tokens: usize,
    rounds: usize,
    json: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        tokens: 500,
        rounds: 4,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--tokens" => options.tokens = parse_number(&value()?)?,
            "--rounds" => options.rounds = parse_number(&value()?)?,
            "--json" => options.json = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if options.rounds == 0 || options.tokens == 0 {
        return Err("--tokens and --rounds must be at least 1".into());
    }
    Ok(options)
}

fn main() {
    if let Err(error) = run() {
        eprintln!("identity-bench: {error}");
        std::process::exit(1);
    }
}

/// One algorithm: how its tokens are signed and verified, and the samples taken.
struct Configuration {
    label: &'static str,
    algorithm: Algorithm,
    settings: JwtSettings,
    first_use_ns: Vec<u64>,
    later_use_ns: Vec<u64>,
}

fn run() -> Result<(), String> {
    let options = parse_options()?;
    let mut configurations = vec![
        Configuration::new("HS256", Algorithm::HS256)?,
        Configuration::new("RS256", Algorithm::RS256)?,
        Configuration::new("ES256", Algorithm::ES256)?,
    ];
    for round in 0..options.rounds {
        for configuration in &mut configurations {
            configuration.time_round(round, options.tokens)?;
        }
    }
    report(&mut configurations, &options);
    Ok(())
}

impl Configuration {
    fn new(label: &'static str, algorithm: Algorithm) -> Result<Configuration, String> {
        let public_key = |name: &str| JwtKeys {
            pem_file: Some(identity_testdata(name)),
            ..JwtKeys::default()
        };
        let (keys, accepted) = match algorithm {
            Algorithm::HS256 => (
                JwtKeys {
                    hs256_secret: Some(SECRET.into()),
                    ..JwtKeys::default()
                },
                JwtAlgorithm::HS256,
            ),
            Algorithm::RS256 => (public_key("rsa_public.pem"), JwtAlgorithm::RS256),
            Algorithm::ES256 => (public_key("ec_public.pem"), JwtAlgorithm::ES256),
            other => return Err(format!("no bench key for {other:?}")),
        };
        let settings = JwtSettings {
            issuers: vec![JwtIssuer {
                issuer: ISSUER.into(),
                audiences: vec![AUDIENCE.into()],
                keys,
                algorithms: vec![accepted],
            }],
            roles_claim: "roles".into(),
            principal_claim: "sub".into(),
            clock_skew_seconds: 60,
            resource_metadata_url: None,
            protected_resource: None,
            refused_tokens_per_minute: 0,
            refused_tokens_per_minute_all_addresses: 0,
        };
        Ok(Configuration {
            label,
            algorithm,
            settings,
            first_use_ns: Vec::new(),
            later_use_ns: Vec::new(),
        })
    }

    fn tokens(&self, round: usize, count: usize) -> Result<Vec<String>, String> {
        let now = jsonwebtoken::get_current_timestamp();
        (0..count)
            .map(|n| {
                let claims: Value = json!({
                    "iss": ISSUER, "aud": AUDIENCE, "sub": format!("agent-{n}@example.com"),
                    "exp": now + 3600, "iat": now, "nbf": now, "roles": ["developer"],
                    "jti": format!("{round}-{n}"),
                });
                sign_test_token(self.algorithm, &claims, SECRET)
            })
            .collect()
    }

    fn time_round(&mut self, round: usize, count: usize) -> Result<(), String> {
        let tokens = self.tokens(round, count)?;
        let verifier = Verifier::from_settings(&self.settings)?;
        for samples in [&mut self.first_use_ns, &mut self.later_use_ns] {
            for token in &tokens {
                let started = Instant::now();
                let verified = verifier.verify(token);
                samples.push(started.elapsed().as_nanos() as u64);
                verified.map_err(|e| format!("{}: a bench token was refused: {e}", self.label))?;
            }
        }
        Ok(())
    }
}

struct Summary {
    p50: u64,
    p99: u64,
    mean: f64,
}

fn summarise(samples: &mut [u64]) -> Summary {
    samples.sort_unstable();
    Summary {
        p50: percentile(samples, 50),
        p99: percentile(samples, 99),
        mean: samples.iter().sum::<u64>() as f64 / samples.len() as f64,
    }
}

fn report(configurations: &mut [Configuration], options: &Options) {
    let rows: Vec<(&str, Summary, Summary)> = configurations
        .iter_mut()
        .map(|c| {
            (
                c.label,
                summarise(&mut c.first_use_ns),
                summarise(&mut c.later_use_ns),
            )
        })
        .collect();
    if options.json {
        let rows: Vec<Value> = rows
            .iter()
            .map(|(label, first, later)| {
                json!({
                    "algorithm": label,
                    "first_use": {"p50_ns": first.p50, "p99_ns": first.p99, "mean_ns": first.mean},
                    "later_use": {"p50_ns": later.p50, "p99_ns": later.p99, "mean_ns": later.mean},
                    "p50_ratio": first.p50 as f64 / later.p50.max(1) as f64,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"tokens_per_round": options.tokens, "rounds": options.rounds, "algorithms": rows})
        );
        return;
    }
    println!(
        "bearer JWT verification per request: {} tokens per algorithm, each used twice, in {} \
         interleaved rounds",
        options.tokens, options.rounds
    );
    println!(
        "{:<6} {:>14} {:>14} {:>15} {:>14} {:>14} {:>15} {:>11}",
        "alg",
        "first p50 ns",
        "first p99 ns",
        "first mean ns",
        "later p50 ns",
        "later p99 ns",
        "later mean ns",
        "p50 ratio"
    );
    for (label, first, later) in &rows {
        println!(
            "{:<6} {:>14} {:>14} {:>15.0} {:>14} {:>14} {:>15.0} {:>10.1}x",
            label,
            first.p50,
            first.p99,
            first.mean,
            later.p50,
            later.p99,
            later.mean,
            first.p50 as f64 / later.p50.max(1) as f64
        );
    }
    println!(
        "first use: signature and claims checked, token kept; later use: the same token again"
    );
}
