//! What a record keeps of a call's arguments: by default a digest only; with the policy's
//! `audit.store_arguments`, the arguments themselves with the `audit.redact` fields replaced.
//!
//! The digest is `sha256:` and the hex SHA-256 of serde_json's compact serialisation of the
//! arguments, whose object keys come out sorted, so equal arguments give equal digests
//! whatever order their keys arrived in. It is taken of what the record could otherwise show:
//! the original arguments when they are not stored, the redacted ones when they are. A digest
//! of the original next to the stored other fields would let anyone confirm a guess of a
//! redacted value (a password, say) by hashing candidates.
//!
//! A digest is for matching ("were these the arguments?"), not for secrecy: arguments with
//! little entropy can be found from their digest by trying them.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::policy::AuditSettings;

use super::AuditRecord;

/// What replaces the value of a redacted field.
pub const REDACTED: &str = "[redacted]";

/// `sha256:<hex>` of `arguments` (see the module documentation).
pub fn arguments_digest(arguments: &Value) -> String {
    let bytes = serde_json::to_vec(arguments).expect("a JSON value always serialises");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// Whether a field called `key` is one of the redacted `names` (compared without regard to
/// ASCII case).
pub fn is_redacted(key: &str, names: &[String]) -> bool {
    names.iter().any(|name| name.eq_ignore_ascii_case(key))
}

/// `arguments` with the value of every object field named in `names` (see [`is_redacted`]),
/// at any depth, replaced by [`REDACTED`].
pub fn redact(arguments: &Value, names: &[String]) -> Value {
    match arguments {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| {
                    let value = if is_redacted(key, names) {
                        Value::String(REDACTED.into())
                    } else {
                        redact(value, names)
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|item| redact(item, names)).collect()),
        other => other.clone(),
    }
}

impl AuditRecord {
    /// Records `arguments` as `settings` say: `arguments_digest` always, `arguments`
    /// (redacted) only when `store_arguments` is on.
    pub fn set_arguments(&mut self, settings: &AuditSettings, arguments: &Value) {
        if settings.store_arguments {
            let stored = redact(arguments, &settings.redact);
            self.arguments_digest = Some(arguments_digest(&stored));
            self.arguments = Some(stored);
        } else {
            self.arguments_digest = Some(arguments_digest(arguments));
            self.arguments = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::audit::RecordKind;

    fn settings(store: bool, redact: &[&str]) -> AuditSettings {
        AuditSettings {
            store_arguments: store,
            redact: redact.iter().map(|name| name.to_string()).collect(),
            ..AuditSettings::default()
        }
    }

    #[test]
    fn by_default_only_a_digest_is_recorded() {
        let arguments = json!({ "path": "/etc/passwd", "password": "hunter2" });
        let mut record = AuditRecord::new(RecordKind::Call);
        record.set_arguments(&AuditSettings::default(), &arguments);
        assert_eq!(record.arguments, None);
        let digest = record.arguments_digest.clone().unwrap();
        assert_eq!(digest.len(), "sha256:".len() + 64);
        assert_eq!(digest, arguments_digest(&arguments));
        let line = serde_json::to_string(&record).unwrap();
        assert!(
            !line.contains("hunter2") && !line.contains("passwd"),
            "{line}"
        );
    }

    #[test]
    fn the_digest_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
        assert_eq!(arguments_digest(&a), arguments_digest(&b));
        assert_ne!(arguments_digest(&a), arguments_digest(&json!({ "a": 2 })));
    }

    #[test]
    fn redaction_reaches_every_depth_and_ignores_case() {
        let arguments = json!({
            "user": "alice",
            "Password": "top",
            "nested": { "deeper": [ { "password": { "even": "objects" } }, { "keep": 1 } ] },
            "token": ["a", "b"]
        });
        let redacted = redact(&arguments, &["password".into(), "TOKEN".into()]);
        assert_eq!(
            redacted,
            json!({
                "user": "alice",
                "Password": REDACTED,
                "nested": { "deeper": [ { "password": REDACTED }, { "keep": 1 } ] },
                "token": REDACTED
            })
        );
    }

    #[test]
    fn stored_arguments_are_redacted_and_digested_as_stored() {
        let arguments = json!({ "query": "select 1", "auth": { "password": "hunter2" } });
        let mut record = AuditRecord::new(RecordKind::Call);
        record.set_arguments(&settings(true, &["password"]), &arguments);
        let stored = record.arguments.clone().unwrap();
        assert_eq!(stored["auth"]["password"], REDACTED);
        assert_eq!(stored["query"], "select 1");
        assert_eq!(record.arguments_digest, Some(arguments_digest(&stored)));
        assert_ne!(record.arguments_digest, Some(arguments_digest(&arguments)));
    }

    #[test]
    fn redact_names_do_nothing_without_stored_arguments() {
        let arguments = json!({ "password": "x" });
        let mut record = AuditRecord::new(RecordKind::Call);
        record.set_arguments(&settings(false, &["password"]), &arguments);
        assert_eq!(record.arguments, None);
        assert_eq!(record.arguments_digest, Some(arguments_digest(&arguments)));
    }
}
