//! Argument constraints from observed argument shapes: the JSON Schema a learned rule puts in
//! its `arguments`, narrow where the observed values were narrow and silent elsewhere.
//!
//! The one property that matters: every call that was observed satisfies the schema built from
//! it, so a learned policy never refuses the workflow it learned from. Hence only what the
//! shapes show exactly is constrained (short strings, booleans, null and numbers, which shapes
//! keep as the values themselves); a summary (`{"type": ...}`: a long or redacted string, an
//! array, an object) says too little, and a tool with a single call whose shapes are missing
//! gets no constraint at all.

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value, json};

/// Up to this many distinct values become an `enum`.
const ENUM_LIMIT: usize = 5;

/// What the calls of one tool (or prompt) by one caller showed of their arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArgumentStats {
    /// Calls whose argument shapes were recorded.
    calls: u64,
    /// Some call was recorded without shapes (outside learn mode): its arguments are unknown,
    /// so no constraint is safe.
    unshaped: bool,
    by_name: BTreeMap<String, ValueStats>,
}

/// The values one argument took.
#[derive(Debug, Clone, Default, PartialEq)]
struct ValueStats {
    /// Calls in which the argument was present.
    present: u64,
    /// A summary was seen (long or redacted string, array, object): the values are unknown.
    broad: bool,
    /// Distinct values other than numbers, up to one more than [`ENUM_LIMIT`].
    distinct: Vec<Value>,
    /// More distinct non-number values than [`ENUM_LIMIT`].
    many: bool,
    /// The longest prefix common to every string value.
    common_prefix: Option<String>,
    has_string: bool,
    has_other_scalar: bool,
    min: Option<Number>,
    max: Option<Number>,
}

impl ArgumentStats {
    /// Adds one call: its `argument_shapes`, or `None` when the record has none.
    pub fn add(&mut self, shapes: Option<&Map<String, Value>>) {
        let Some(shapes) = shapes else {
            self.unshaped = true;
            return;
        };
        self.calls += 1;
        for (name, shape) in shapes {
            self.by_name.entry(name.clone()).or_default().add(shape);
        }
    }

    /// The `arguments` schema for a rule allowing these calls, or `None` when nothing can be
    /// narrowed. Constrained arguments present in every call are `required`, so that leaving
    /// one out cannot step around its constraint; arguments never seen stay free.
    pub fn schema(&self) -> Option<Value> {
        if self.unshaped || self.calls == 0 {
            return None;
        }
        let mut properties = Map::new();
        let mut required = Vec::new();
        for (name, stats) in &self.by_name {
            if let Some(constraint) = stats.constraint() {
                properties.insert(name.clone(), constraint);
                if stats.present == self.calls {
                    required.push(Value::String(name.clone()));
                }
            }
        }
        if properties.is_empty() {
            return None;
        }
        let mut schema = json!({"type": "object", "properties": properties});
        if !required.is_empty() {
            schema["required"] = Value::Array(required);
        }
        Some(schema)
    }

    /// Calls seen with shapes.
    pub fn shaped_calls(&self) -> u64 {
        self.calls
    }
}

impl ValueStats {
    fn add(&mut self, shape: &Value) {
        self.present += 1;
        match shape {
            // Shapes keep scalars as themselves; an object is a summary of something else.
            Value::Object(_) | Value::Array(_) => self.broad = true,
            Value::Number(number) => self.add_number(number),
            Value::String(text) => {
                self.has_string = true;
                self.common_prefix = Some(match self.common_prefix.take() {
                    None => text.clone(),
                    Some(prefix) => common_prefix(&prefix, text).to_owned(),
                });
                self.add_distinct(shape);
            }
            Value::Bool(_) | Value::Null => {
                self.has_other_scalar = true;
                self.add_distinct(shape);
            }
        }
    }

    fn add_number(&mut self, number: &Number) {
        let value = number.as_f64().unwrap_or(f64::NAN);
        if self
            .min
            .as_ref()
            .is_none_or(|min| value < min.as_f64().unwrap_or(f64::NAN))
        {
            self.min = Some(number.clone());
        }
        if self
            .max
            .as_ref()
            .is_none_or(|max| value > max.as_f64().unwrap_or(f64::NAN))
        {
            self.max = Some(number.clone());
        }
    }

    fn add_distinct(&mut self, value: &Value) {
        if self.many || self.distinct.contains(value) {
            return;
        }
        if self.distinct.len() == ENUM_LIMIT {
            self.many = true;
            self.distinct.clear();
        } else {
            self.distinct.push(value.clone());
        }
    }

    /// The schema for this one argument, if its values were narrow.
    fn constraint(&self) -> Option<Value> {
        if self.broad {
            return None;
        }
        if let (Some(min), Some(max)) = (&self.min, &self.max) {
            // `minimum`/`maximum` ignore null, so a null now and then is no obstacle; strings
            // or booleans beside numbers are a mixture with no narrow description.
            if self.has_string || self.distinct.iter().any(Value::is_boolean) {
                return None;
            }
            return Some(json!({"minimum": min, "maximum": max}));
        }
        if !self.many {
            let mut values = self.distinct.clone();
            values.sort_by_key(Value::to_string);
            return Some(json!({"enum": values}));
        }
        if self.has_other_scalar {
            return None;
        }
        let prefix = directory_prefix(self.common_prefix.as_deref()?)?;
        Some(json!({"pattern": format!("^{}", escape_regex(prefix))}))
    }
}

/// The longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((at, _), _)| at);
    // `end` may fall inside a character of `a` only when `b` was shorter; back off to one.
    let mut end = end.min(a.len());
    while !a.is_char_boundary(end) {
        end -= 1;
    }
    &a[..end]
}

/// `prefix` cut back to its last `/`, when what is left names a directory or a URL base
/// (`/srv/data/`, `https://api.example.com/v1/`) rather than just a root or a scheme's slashes.
fn directory_prefix(prefix: &str) -> Option<&str> {
    let cut = &prefix[..=prefix.rfind('/')?];
    let after_scheme = cut.split_once("://").map_or(cut, |(_, rest)| rest);
    (!after_scheme.trim_matches('/').is_empty()).then_some(cut)
}

/// `text` as a regular expression matching itself: every metacharacter of ECMA 262 regular
/// expressions (what JSON Schema's `pattern` is) escaped.
fn escape_regex(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\^$.|?*+()[]{}/".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(calls: &[Value]) -> ArgumentStats {
        let mut stats = ArgumentStats::default();
        for call in calls {
            stats.add(call.as_object());
        }
        stats
    }

    /// Every observed argument set must satisfy the learned schema, judged by the validator
    /// the daemon compiles rules' `arguments` with (formats asserted).
    fn assert_all_pass(schema: &Value, calls: &[Value]) {
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .expect("the learned schema compiles");
        for call in calls {
            assert!(
                validator.is_valid(call),
                "{call} fails its own learned schema {schema}"
            );
        }
    }

    #[test]
    fn few_values_become_an_enum_and_numbers_a_range() {
        let calls = [
            json!({"mode": "fast", "n": 3, "flag": true}),
            json!({"mode": "slow", "n": 10.5, "flag": false}),
            json!({"mode": "fast", "n": -1}),
        ];
        let schema = stats_of(&calls).schema().unwrap();
        assert_eq!(
            schema,
            json!({"type": "object", "properties": {
                "flag": {"enum": [false, true]},
                "mode": {"enum": ["fast", "slow"]},
                "n": {"minimum": -1, "maximum": 10.5},
            }, "required": ["mode", "n"]})
        );
        assert_all_pass(&schema, &calls);
        let validator = jsonschema::validator_for(&schema).unwrap();
        assert!(!validator.is_valid(&json!({"mode": "other", "n": 1})));
        assert!(!validator.is_valid(&json!({"mode": "fast", "n": 11})));
        assert!(
            !validator.is_valid(&json!({"n": 1})),
            "a constrained argument always given may not be left out"
        );
    }

    #[test]
    fn many_paths_under_one_directory_become_a_pattern() {
        let calls: Vec<Value> = (0..8)
            .map(|i| json!({"path": format!("/srv/data (v1)/file-{i}.txt")}))
            .collect();
        let schema = stats_of(&calls).schema().unwrap();
        assert_eq!(
            schema["properties"]["path"],
            json!({"pattern": "^\\/srv\\/data \\(v1\\)\\/"})
        );
        assert_all_pass(&schema, &calls);
        let validator = jsonschema::validator_for(&schema).unwrap();
        assert!(!validator.is_valid(&json!({"path": "/etc/shadow"})));
        assert!(!validator.is_valid(&json!({"path": "/srv/data (v1)x/file"})));
    }

    #[test]
    fn broad_or_unknown_values_are_not_constrained() {
        let summaries = [
            json!({"text": {"type": "string", "length": 900}, "items": {"type": "array", "length": 2}}),
            json!({"text": "short", "items": {"type": "array", "length": 0}}),
        ];
        assert_eq!(stats_of(&summaries).schema(), None);
        // Many distinct strings with nothing in common but the root.
        let spread: Vec<Value> = (0..7).map(|i| json!({"p": format!("/{i}/x")})).collect();
        assert_eq!(stats_of(&spread).schema(), None);
        // A call whose shapes were not recorded: its arguments could have been anything.
        let mut stats = stats_of(&[json!({"mode": "fast"})]);
        stats.add(None);
        assert_eq!(stats.schema(), None);
        // Numbers mixed with strings.
        assert_eq!(
            stats_of(&[json!({"x": 1}), json!({"x": "1"})]).schema(),
            None
        );
    }

    #[test]
    fn optional_arguments_stay_optional_and_unseen_ones_free() {
        let calls = [json!({"a": 1}), json!({"a": 2, "b": null}), json!({})];
        let schema = stats_of(&calls).schema().unwrap();
        assert_eq!(schema.get("required"), None);
        assert_all_pass(&schema, &calls);
        let validator = jsonschema::validator_for(&schema).unwrap();
        assert!(validator.is_valid(&json!({"never-seen": [1, 2, 3]})));
    }

    #[test]
    fn every_observed_call_passes_its_learned_schema() {
        // A spread of shapes as learn mode records them, many tools' worth.
        let values = [
            json!(null),
            json!(true),
            json!(0),
            json!(-7.25),
            json!(1e300),
            json!("a"),
            json!("a.b*c"),
            json!("/srv/data/x"),
            json!("/srv/data/y[1]"),
            json!("https://api.example.com/v1/q?x=1"),
            json!("https://api.example.com/v1/r"),
            json!("é/ü/ß"),
            json!("é/ü/ö"),
            json!({"type": "string", "length": 100}),
            json!({"type": "object", "keys": ["k"]}),
        ];
        for seed in 0..400usize {
            let calls: Vec<Value> = (0..1 + seed % 9)
                .map(|call| {
                    let mut arguments = Map::new();
                    for (slot, name) in ["a", "b", "c"].iter().enumerate() {
                        let pick = (seed * 31 + call * 17 + slot * 7) % (values.len() + 2);
                        if let Some(value) = values.get(pick) {
                            arguments.insert((*name).to_owned(), value.clone());
                        }
                    }
                    Value::Object(arguments)
                })
                .collect();
            if let Some(schema) = stats_of(&calls).schema() {
                // Shapes and arguments agree on every value a schema constrains.
                assert_all_pass(&schema, &calls);
            }
        }
    }

    #[test]
    fn prefixes_are_cut_at_a_directory() {
        assert_eq!(common_prefix("/srv/é1", "/srv/é2"), "/srv/é");
        assert_eq!(common_prefix("ab", "abc"), "ab");
        assert_eq!(directory_prefix("/srv/data/fi"), Some("/srv/data/"));
        assert_eq!(directory_prefix("/fi"), None);
        assert_eq!(directory_prefix("https://"), None);
        assert_eq!(directory_prefix("no-slash"), None);
        assert_eq!(escape_regex("a.b(c)"), "a\\.b\\(c\\)");
    }
}
