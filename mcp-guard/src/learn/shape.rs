//! Bounded summaries of tool and prompt arguments, for learn-mode audit records.
//!
//! A summary says what kind of value each top-level argument had, without keeping anything
//! large or secret: `policy suggest` needs to see that `path` was a short string such as
//! `"/srv/reports"` or that `rows` was an array of 40 items, not the 40 rows. Scalars and
//! short strings are kept as they are (they are what argument constraints are written
//! about); anything else, and a string in a field the policy's `audit.redact` names, becomes
//! its type and size.

use serde_json::{Map, Value, json};

use crate::audit::arguments::is_redacted;

/// Strings up to this many characters are kept in a summary as they are.
pub const MAX_KEPT_STRING_CHARS: usize = 64;
/// An object argument's summary lists at most this many of its keys.
pub const MAX_OBJECT_KEYS: usize = 32;

/// The summary of each top-level argument of `arguments` (absent or not an object: no
/// arguments, an empty map).
///
/// Per argument: `null`, booleans and numbers as they are; a string of at most
/// [`MAX_KEPT_STRING_CHARS`] characters as it is, unless its name is in `redact` (as
/// [`crate::audit::redact`] judges names); otherwise
/// `{"type":"string","length":N}` with N in characters; an array `{"type":"array","length":N}`;
/// an object `{"type":"object","keys":[...]}` with its first [`MAX_OBJECT_KEYS`] key names
/// in sorted order.
pub fn summarize_arguments(arguments: Option<&Value>, redact: &[String]) -> Map<String, Value> {
    let Some(Value::Object(fields)) = arguments else {
        return Map::new();
    };
    fields
        .iter()
        .map(|(name, value)| (name.clone(), summarize(value, is_redacted(name, redact))))
        .collect()
}

fn summarize(value: &Value, redacted: bool) -> Value {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => value.clone(),
        Value::String(text) => {
            let length = text.chars().count();
            if length <= MAX_KEPT_STRING_CHARS && !redacted {
                value.clone()
            } else {
                json!({"type": "string", "length": length})
            }
        }
        Value::Array(items) => json!({"type": "array", "length": items.len()}),
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            keys.truncate(MAX_OBJECT_KEYS);
            json!({"type": "object", "keys": keys})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(arguments: Value, redact: &[&str]) -> Value {
        let redact: Vec<String> = redact.iter().map(|r| r.to_string()).collect();
        Value::Object(summarize_arguments(Some(&arguments), &redact))
    }

    #[test]
    fn scalars_and_short_strings_are_kept() {
        assert_eq!(
            summary(
                json!({"a": null, "b": true, "c": 3.5, "d": -2, "path": "/srv/x"}),
                &[]
            ),
            json!({"a": null, "b": true, "c": 3.5, "d": -2, "path": "/srv/x"})
        );
    }

    #[test]
    fn long_strings_are_measured_in_characters() {
        let exactly = "é".repeat(MAX_KEPT_STRING_CHARS);
        let longer = "é".repeat(MAX_KEPT_STRING_CHARS + 1);
        assert_eq!(
            summary(json!({"kept": exactly, "long": longer}), &[]),
            json!({"kept": exactly, "long": {"type": "string", "length": 65}})
        );
    }

    #[test]
    fn redacted_fields_keep_only_their_length_whatever_the_case() {
        assert_eq!(
            summary(
                json!({"Password": "hunter2", "token": 7, "user": "alice"}),
                &["password", "TOKEN"]
            ),
            // A number is not secret text; only strings are hidden.
            json!({"Password": {"type": "string", "length": 7}, "token": 7, "user": "alice"})
        );
    }

    #[test]
    fn arrays_and_objects_become_their_shape() {
        let many: Map<String, Value> = (0..40).map(|i| (format!("k{i:02}"), json!(i))).collect();
        let got = summary(
            json!({"rows": [1, 2, 3], "filter": {"z": 1, "a": {"deep": "secret"}}, "many": many}),
            &[],
        );
        assert_eq!(got["rows"], json!({"type": "array", "length": 3}));
        assert_eq!(got["filter"], json!({"type": "object", "keys": ["a", "z"]}));
        let keys = got["many"]["keys"].as_array().unwrap();
        assert_eq!(keys.len(), MAX_OBJECT_KEYS);
        assert_eq!(keys[0], "k00");
        assert_eq!(keys[31], "k31");
        assert!(!got.to_string().contains("secret"));
    }

    #[test]
    fn no_arguments_give_an_empty_summary() {
        assert!(summarize_arguments(None, &[]).is_empty());
        assert!(summarize_arguments(Some(&json!([1, 2])), &[]).is_empty());
        assert!(summarize_arguments(Some(&json!({})), &[]).is_empty());
    }
}
