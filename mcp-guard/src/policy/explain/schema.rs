//! A rule's `arguments` JSON Schema in words.
//!
//! The common keywords become clauses such as "`mode` is either absent or is one of `a` and
//! `b`"; anything else is quoted as compact JSON Schema, so that nothing is left out or
//! invented. The wording follows the JSON Schema semantics a reviewer tends to miss:
//! `properties` constrains a field only when it is given (hence "either absent or"), and a
//! string or number keyword constrains a value only when it has that type.

use serde_json::{Map, Value};

use super::doc::Sentence;

/// Keywords that only annotate a schema and never reject a value.
const ANNOTATIONS: [&str; 11] = [
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "contentMediaType",
    "contentEncoding",
    "contentSchema",
];

/// Keywords whose meaning depends on other parts of the schema, so that a schema holding any
/// of them is quoted whole rather than in pieces that would mean something else alone.
const CONTEXT_KEYWORDS: [&str; 10] = [
    "$ref",
    "$dynamicRef",
    "$recursiveRef",
    "$defs",
    "definitions",
    "$anchor",
    "$dynamicAnchor",
    "$id",
    "unevaluatedProperties",
    "unevaluatedItems",
];

/// The `$schema` values this module reads with draft 2020-12 semantics (older drafts differ,
/// for instance in `exclusiveMinimum`).
const DRAFT_2020_12: [&str; 2] = [
    "https://json-schema.org/draft/2020-12/schema",
    "https://json-schema.org/draft/2020-12/schema#",
];

/// The clauses an `arguments` schema imposes, each one sentence; all must hold.
pub fn describe_arguments(schema: &Value) -> Vec<Sentence> {
    if must_be_quoted_whole(schema) {
        return vec![whole_schema_clause(schema)];
    }
    let root = Location::root();
    let described = describe_value(schema, &root);
    let mut clauses = described.nested;
    if !described.predicates.is_empty() {
        clauses.push(root.clause(&described.predicates));
    }
    clauses
}

fn whole_schema_clause(schema: &Value) -> Sentence {
    Sentence::new()
        .text("the arguments satisfy the JSON Schema ")
        .code(schema.to_string())
}

fn must_be_quoted_whole(schema: &Value) -> bool {
    let foreign_draft = schema
        .get("$schema")
        .and_then(Value::as_str)
        .is_some_and(|draft| !DRAFT_2020_12.contains(&draft));
    foreign_draft || holds_context_keyword(schema)
}

fn holds_context_keyword(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, inner)| {
            CONTEXT_KEYWORDS.contains(&key.as_str()) || holds_context_keyword(inner)
        }),
        Value::Array(items) => items.iter().any(holds_context_keyword),
        _ => false,
    }
}

/// How a predicate starts, in the affirmative and negated (for `not`), singular and plural.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Is,
    Has,
    Matches,
    Contains,
    Satisfies,
}

impl Verb {
    fn render(self, negated: bool, plural: bool) -> &'static str {
        match (self, negated, plural) {
            (Self::Is, false, false) => "is",
            (Self::Is, false, true) => "are",
            (Self::Is, true, false) => "is not",
            (Self::Is, true, true) => "are not",
            (Self::Has, false, false) => "has",
            (Self::Has, false, true) => "have",
            (Self::Matches, false, false) => "matches",
            (Self::Matches, false, true) => "match",
            (Self::Contains, false, false) => "contains",
            (Self::Contains, false, true) => "contain",
            (Self::Satisfies, false, false) => "satisfies",
            (Self::Satisfies, false, true) => "satisfy",
            (Self::Has, true, false) => "does not have",
            (Self::Matches, true, false) => "does not match",
            (Self::Contains, true, false) => "does not contain",
            (Self::Satisfies, true, false) => "does not satisfy",
            (Self::Has, true, true) => "do not have",
            (Self::Matches, true, true) => "do not match",
            (Self::Contains, true, true) => "do not contain",
            (Self::Satisfies, true, true) => "do not satisfy",
        }
    }
}

/// One thing said about a value: "is at most 10", "has at least 1 character (if it is a
/// string)".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Predicate {
    verb: Verb,
    object: Sentence,
    negated: bool,
    /// The type the keyword constrains, when the schema does not pin the value to it.
    only_if: Option<Family>,
}

impl Predicate {
    fn new(verb: Verb, object: Sentence) -> Self {
        Self {
            verb,
            object,
            negated: false,
            only_if: None,
        }
    }

    fn render(&self, plural: bool) -> Sentence {
        let mut sentence = Sentence::new()
            .text(self.verb.render(self.negated, plural))
            .text(" ")
            .then(self.object.clone());
        if let Some(family) = self.only_if {
            sentence = sentence.text(format!(" (if it is {})", family.article_name()));
        }
        sentence
    }
}

/// What a schema says about one value: predicates about the value itself, and whole clauses
/// about its fields and items.
#[derive(Debug, Default)]
struct Described {
    predicates: Vec<Predicate>,
    nested: Vec<Sentence>,
}

/// Where in the arguments a schema applies, and how to name it in a sentence.
struct Location {
    subject: Sentence,
    plural: bool,
    /// The dotted path of this value, for naming its fields (`a.b`) and items (`a[]`).
    path: Option<String>,
    /// When a field required here must really be present ("whenever `a` is given"); `None`
    /// at the top level, where required means required.
    presence: Option<Sentence>,
}

impl Location {
    fn root() -> Self {
        Self {
            subject: Sentence::new().text("the arguments"),
            plural: true,
            path: None,
            presence: None,
        }
    }

    fn child_path(&self, name: &str) -> String {
        match &self.path {
            Some(path) => format!("{path}.{name}"),
            None => name.to_owned(),
        }
    }

    fn field(&self, name: &str) -> Self {
        let path = self.child_path(name);
        Self {
            subject: Sentence::new().code(&path),
            plural: false,
            presence: Some(
                Sentence::new()
                    .text("whenever ")
                    .code(&path)
                    .text(" is given"),
            ),
            path: Some(path),
        }
    }

    fn items(&self) -> Self {
        let parent = self.path.clone().unwrap_or_default();
        Self {
            subject: Sentence::new().text("each item of ").code(&parent),
            plural: false,
            presence: Some(Sentence::new().text("in every item of ").code(&parent)),
            path: Some(format!("{parent}[]")),
        }
    }

    /// "`subject` P1, P2 and P3".
    fn clause(&self, predicates: &[Predicate]) -> Sentence {
        self.subject
            .clone()
            .text(" ")
            .then(self.predicates(predicates))
    }

    fn predicates(&self, predicates: &[Predicate]) -> Sentence {
        Sentence::list(predicates.iter().map(|p| p.render(self.plural)), "and")
    }
}

/// The JSON type a keyword family constrains, as `type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    String,
    Number,
    Array,
    Object,
}

impl Family {
    fn article_name(self) -> &'static str {
        match self {
            Self::String => "a string",
            Self::Number => "a number",
            Self::Array => "an array",
            Self::Object => "an object",
        }
    }

    /// True when a schema whose `type` is `pinned` only admits values of this family.
    fn is_pinned_by(self, pinned: Option<&str>) -> bool {
        matches!(
            (self, pinned),
            (Self::String, Some("string"))
                | (Self::Number, Some("number" | "integer"))
                | (Self::Array, Some("array"))
                | (Self::Object, Some("object"))
        )
    }
}

/// Builds a [`Described`] from one schema object, keyword by keyword; keywords it does not
/// put into words are kept and quoted at the end.
struct Describer<'s> {
    schema: &'s Map<String, Value>,
    pinned: Option<&'s str>,
    at: &'s Location,
    out: Described,
    unexplained: Map<String, Value>,
}

fn describe_value(schema: &Value, at: &Location) -> Described {
    match schema {
        Value::Object(map) => Describer::new(map, at).run(),
        Value::Bool(true) => Described::default(),
        // Only reachable below the top level: a field or item that can never be valid.
        _ => Described {
            predicates: vec![Predicate::new(
                Verb::Satisfies,
                Sentence::new()
                    .text("the JSON Schema ")
                    .code(schema.to_string()),
            )],
            nested: Vec::new(),
        },
    }
}

impl<'s> Describer<'s> {
    fn new(schema: &'s Map<String, Value>, at: &'s Location) -> Self {
        Self {
            schema,
            pinned: schema.get("type").and_then(Value::as_str),
            at,
            out: Described::default(),
            unexplained: Map::new(),
        }
    }

    fn run(mut self) -> Described {
        // `type` first, so that "is a string" comes before what is said about the string.
        let mut keywords: Vec<(&String, &Value)> = self.schema.iter().collect();
        keywords.sort_by_key(|(keyword, _)| keyword_order(keyword));
        for (keyword, value) in keywords {
            if !self.explain_keyword(keyword, value) && !ANNOTATIONS.contains(&keyword.as_str()) {
                self.unexplained.insert(keyword.clone(), value.clone());
            }
        }
        self.describe_fields();
        if !self.unexplained.is_empty() {
            let residue = Value::Object(std::mem::take(&mut self.unexplained)).to_string();
            self.say(
                Verb::Satisfies,
                Sentence::new().text("the JSON Schema ").code(residue),
            );
        }
        self.out
    }

    fn say(&mut self, verb: Verb, object: Sentence) {
        self.out.predicates.push(Predicate::new(verb, object));
    }

    /// Like [`Self::say`], for a keyword of `family`, which says nothing about other types.
    fn say_of(&mut self, family: Family, verb: Verb, object: Sentence) {
        let only_if = (!family.is_pinned_by(self.pinned)).then_some(family);
        self.out.predicates.push(Predicate {
            only_if,
            ..Predicate::new(verb, object)
        });
    }

    /// Puts one keyword into words; false when it is left for quoting. Object keywords
    /// (`properties`, `required`, `additionalProperties`) are handled together afterwards.
    fn explain_keyword(&mut self, keyword: &str, value: &Value) -> bool {
        match keyword {
            "type" => self.explain_type(value),
            "enum" => self.explain_enum(value),
            "const" => {
                self.say(
                    Verb::Is,
                    Sentence::new().text("exactly ").then(json_value(value)),
                );
                true
            }
            "minLength" | "maxLength" => self.explain_count(keyword, Family::String, "character"),
            "minItems" | "maxItems" => self.explain_count(keyword, Family::Array, "item"),
            "minProperties" | "maxProperties" => {
                self.explain_count(keyword, Family::Object, "field")
            }
            "pattern" => self.explain_pattern(value),
            "format" => self.explain_format(value),
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" | "multipleOf" => {
                self.explain_number(keyword, value)
            }
            "uniqueItems" => self.explain_unique_items(value),
            "items" => self.explain_items(value),
            "not" => self.explain_not(value),
            "allOf" => self.explain_all_of(value),
            "properties" | "required" | "additionalProperties" => self.fields_are_explainable(),
            _ => false,
        }
    }

    fn explain_type(&mut self, value: &Value) -> bool {
        // The arguments are always an object (absent arguments count as `{}`).
        if self.at.path.is_none() && value == "object" {
            return true;
        }
        let names: Option<Vec<&str>> = match value {
            Value::String(name) => Some(vec![name.as_str()]),
            Value::Array(names) => names.iter().map(Value::as_str).collect(),
            _ => None,
        };
        let Some(names) = names.filter(|names| !names.is_empty()) else {
            return false;
        };
        let phrases = names
            .into_iter()
            .map(|name| Sentence::new().text(type_phrase(name)));
        self.say(Verb::Is, Sentence::list(phrases, "or"));
        true
    }

    fn explain_enum(&mut self, value: &Value) -> bool {
        let Some(values) = value.as_array().filter(|values| !values.is_empty()) else {
            return false;
        };
        let object = if let [only] = values.as_slice() {
            Sentence::new().text("exactly ").then(json_value(only))
        } else {
            Sentence::new()
                .text("one of ")
                .then(Sentence::list(values.iter().map(json_value), "and"))
        };
        self.say(Verb::Is, object);
        true
    }

    /// `minX`/`maxX` pairs become one predicate, said when the `min` keyword is met.
    fn explain_count(&mut self, keyword: &str, family: Family, unit: &str) -> bool {
        let (min_key, max_key) = match family {
            Family::String => ("minLength", "maxLength"),
            Family::Array => ("minItems", "maxItems"),
            Family::Object | Family::Number => ("minProperties", "maxProperties"),
        };
        let min = self.schema.get(min_key).and_then(Value::as_u64);
        let max = self.schema.get(max_key).and_then(Value::as_u64);
        let count = match keyword == min_key {
            true => min,
            false => max,
        };
        if count.is_none() {
            return false;
        }
        if keyword == max_key && min.is_some() {
            return true; // said with the minimum
        }
        let phrase = match (min, max) {
            (Some(min), Some(max)) if min == max => format!("exactly {}", counted(min, unit)),
            (Some(min), Some(max)) => format!("between {min} and {max} {unit}s"),
            (Some(min), None) => format!("at least {}", counted(min, unit)),
            (None, Some(max)) => format!("at most {}", counted(max, unit)),
            (None, None) => unreachable!("one of them is the keyword being explained"),
        };
        self.say_of(family, Verb::Has, Sentence::new().text(phrase));
        true
    }

    fn explain_pattern(&mut self, value: &Value) -> bool {
        let Some(pattern) = value.as_str() else {
            return false;
        };
        // JSON Schema patterns are not anchored: unless the author anchored both ends, the
        // pattern only has to occur somewhere in the string.
        let anchored =
            pattern.starts_with('^') && pattern.ends_with('$') && !pattern.ends_with("\\$");
        let (verb, lead) = match anchored {
            true => (Verb::Matches, "the regular expression "),
            false => (Verb::Contains, "a match for the regular expression "),
        };
        self.say_of(
            Family::String,
            verb,
            Sentence::new().text(lead).code(pattern),
        );
        true
    }

    fn explain_format(&mut self, value: &Value) -> bool {
        let Some(format) = value.as_str() else {
            return false;
        };
        let object = Sentence::new()
            .text("a valid ")
            .code(format)
            .text(" (JSON Schema format)");
        self.say_of(Family::String, Verb::Is, object);
        true
    }

    fn explain_number(&mut self, keyword: &str, value: &Value) -> bool {
        if !value.is_number() {
            return false;
        }
        let lead = match keyword {
            "minimum" => "at least ",
            "maximum" => "at most ",
            "exclusiveMinimum" => "greater than ",
            "exclusiveMaximum" => "less than ",
            _ => "a multiple of ",
        };
        let object = Sentence::new().text(lead).text(value.to_string());
        self.say_of(Family::Number, Verb::Is, object);
        true
    }

    fn explain_unique_items(&mut self, value: &Value) -> bool {
        match value {
            Value::Bool(false) => true,
            Value::Bool(true) => {
                self.say_of(
                    Family::Array,
                    Verb::Has,
                    Sentence::new().text("no duplicate items"),
                );
                true
            }
            _ => false,
        }
    }

    fn explain_items(&mut self, value: &Value) -> bool {
        // With `prefixItems`, `items` covers only the items after the prefix.
        if self.schema.contains_key("prefixItems") || !value.is_object() || self.at.path.is_none() {
            return false;
        }
        let items = self.at.items();
        let described = describe_value(value, &items);
        let mut clauses = Vec::new();
        if !described.predicates.is_empty() {
            clauses.push(items.clause(&described.predicates));
        }
        clauses.extend(described.nested);
        self.nest(Family::Array, clauses);
        true
    }

    /// Negates the inner schema when it says exactly one thing about this same value.
    fn explain_not(&mut self, value: &Value) -> bool {
        let inner = describe_value(value, self.at);
        match (inner.predicates.as_slice(), inner.nested.is_empty()) {
            ([only], true) if !only.negated => {
                // The inner schema cannot see this one's `type`.
                let only_if = only
                    .only_if
                    .filter(|family| !family.is_pinned_by(self.pinned));
                self.out.predicates.push(Predicate {
                    negated: true,
                    only_if,
                    ..only.clone()
                });
                true
            }
            _ => false,
        }
    }

    /// Every branch must hold, so the branches' clauses are simply all said.
    fn explain_all_of(&mut self, value: &Value) -> bool {
        let Some(branches) = value.as_array().filter(|b| b.iter().all(Value::is_object)) else {
            return false;
        };
        for branch in branches {
            let described = describe_value(branch, self.at);
            self.out.predicates.extend(described.predicates);
            self.out.nested.extend(described.nested);
        }
        true
    }

    /// `additionalProperties` next to `patternProperties` depends on the patterns, so then
    /// the object keywords are quoted instead.
    fn fields_are_explainable(&self) -> bool {
        let additional_ok = matches!(
            self.schema.get("additionalProperties"),
            None | Some(Value::Bool(_))
        );
        let required_ok = self
            .schema
            .get("required")
            .is_none_or(|required| required_names(required).is_some());
        let properties_ok = self.schema.get("properties").is_none_or(Value::is_object);
        additional_ok
            && required_ok
            && properties_ok
            && !self.schema.contains_key("patternProperties")
    }

    /// `properties`, `required` and `additionalProperties`, as clauses about each field.
    fn describe_fields(&mut self) {
        if !self.fields_are_explainable() {
            return;
        }
        let empty = Map::new();
        let properties = self
            .schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required = self
            .schema
            .get("required")
            .and_then(required_names)
            .unwrap_or_default();
        let mut clauses = Vec::new();
        for (name, schema) in properties {
            let is_required = required.contains(&name.as_str());
            clauses.extend(self.field_clauses(name, schema, is_required));
        }
        for name in required
            .iter()
            .filter(|name| !properties.contains_key(**name))
        {
            clauses.push(self.required_clause(&self.at.field(name)));
        }
        if self.schema.get("additionalProperties") == Some(&Value::Bool(false)) {
            clauses.push(self.no_other_fields(properties));
        }
        self.nest(Family::Object, clauses);
    }

    fn field_clauses(&self, name: &str, schema: &Value, is_required: bool) -> Vec<Sentence> {
        let field = self.at.field(name);
        if schema == &Value::Bool(false) {
            return vec![field.subject.clone().text(" is not given")];
        }
        let described = describe_value(schema, &field);
        let mut clauses = Vec::new();
        if is_required {
            let mut clause = self.required_clause(&field);
            if !described.predicates.is_empty() {
                clause = clause
                    .text(", and it ")
                    .then(field.predicates(&described.predicates));
            }
            clauses.push(clause);
        } else if !described.predicates.is_empty() {
            clauses.push(
                field
                    .subject
                    .clone()
                    .text(" is either absent or ")
                    .then(field.predicates(&described.predicates)),
            );
        }
        clauses.extend(described.nested);
        clauses
    }

    fn required_clause(&self, field: &Location) -> Sentence {
        let clause = field.subject.clone().text(" is given");
        match &self.at.presence {
            Some(presence) => clause.text(" ").then(presence.clone()),
            None => clause,
        }
    }

    fn no_other_fields(&self, properties: &Map<String, Value>) -> Sentence {
        let names: Vec<String> = properties
            .keys()
            .map(|name| self.at.child_path(name))
            .collect();
        let lead = match &self.at.path {
            None => Sentence::new().text("no argument "),
            Some(path) => Sentence::new().code(path).text(" has no field "),
        };
        let sentence = if names.is_empty() {
            lead.text("at all")
        } else {
            lead.text("other than ")
                .then(Sentence::codes(&names, "and"))
        };
        match self.at.path {
            None => sentence.text(" is given"),
            Some(_) => sentence,
        }
    }

    /// Adds clauses about parts of this value, qualified when the schema does not pin the
    /// value to the type those parts belong to.
    fn nest(&mut self, family: Family, clauses: Vec<Sentence>) {
        let qualify = self.at.path.is_some() && !family.is_pinned_by(self.pinned);
        for clause in clauses {
            let clause = match qualify {
                true => clause
                    .text(" (when ")
                    .then(self.at.subject.clone())
                    .text(format!(" is {})", family.article_name())),
                false => clause,
            };
            self.out.nested.push(clause);
        }
    }
}

/// Where a keyword's words go among the others: the type first, then the value's lower bound
/// before its upper bound; the rest in name order (the sort is stable).
fn keyword_order(keyword: &str) -> u8 {
    match keyword {
        "type" => 0,
        "minimum" | "exclusiveMinimum" => 1,
        "maximum" | "exclusiveMaximum" => 2,
        _ => 3,
    }
}

fn required_names(value: &Value) -> Option<Vec<&str>> {
    value.as_array()?.iter().map(Value::as_str).collect()
}

fn counted(count: u64, unit: &str) -> String {
    match count {
        1 => format!("1 {unit}"),
        _ => format!("{count} {unit}s"),
    }
}

fn type_phrase(name: &str) -> String {
    match name {
        "string" => "a string".to_owned(),
        "integer" => "an integer".to_owned(),
        "number" => "a number".to_owned(),
        "boolean" => "true or false".to_owned(),
        "array" => "an array".to_owned(),
        "object" => "an object".to_owned(),
        "null" => "null".to_owned(),
        other => format!("of type {other}"),
    }
}

/// A value from a schema, quoted: strings as they are, anything else as compact JSON.
fn json_value(value: &Value) -> Sentence {
    match value {
        Value::String(text) => Sentence::new().code(text),
        other => Sentence::new().code(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn words(schema: Value) -> Vec<String> {
        describe_arguments(&schema)
            .iter()
            .map(Sentence::plain)
            .collect()
    }

    #[test]
    fn optional_fields_may_be_absent() {
        assert_eq!(
            words(json!({
                "type": "object",
                "properties": { "message": { "type": "string", "maxLength": 200 } }
            })),
            ["message is either absent or is a string and has at most 200 characters"]
        );
    }

    #[test]
    fn required_fields_must_be_given() {
        assert_eq!(
            words(json!({
                "properties": { "ids": { "type": "array", "minItems": 11 } },
                "required": ["ids", "reason"]
            })),
            [
                "ids is given, and it is an array and has at least 11 items",
                "reason is given",
            ]
        );
    }

    #[test]
    fn enums_consts_and_ranges() {
        assert_eq!(
            words(json!({ "properties": {
                "mode": { "enum": ["fast", "safe"] },
                "kind": { "const": "ticket" },
                "limit": { "type": "integer", "minimum": 1, "maximum": 50 },
                "ratio": { "exclusiveMinimum": 0 }
            }})),
            [
                "kind is either absent or is exactly ticket",
                "limit is either absent or is an integer, is at least 1 and is at most 50",
                "mode is either absent or is one of fast and safe",
                "ratio is either absent or is greater than 0 (if it is a number)",
            ]
        );
    }

    #[test]
    fn patterns_say_whether_they_are_anchored() {
        assert_eq!(
            words(json!({ "properties": {
                "path": { "type": "string", "pattern": "^/srv/docs/.*$" },
                "query": { "type": "string", "pattern": "ticket" }
            }})),
            [
                "path is either absent or is a string and matches the regular expression ^/srv/docs/.*$",
                "query is either absent or is a string and contains a match for the regular expression ticket",
            ]
        );
    }

    #[test]
    fn lengths_pair_up_and_unpinned_types_are_qualified() {
        assert_eq!(
            words(json!({ "properties": {
                "name": { "minLength": 1, "maxLength": 64 },
                "code": { "type": "string", "minLength": 3, "maxLength": 3 }
            }})),
            [
                "code is either absent or is a string and has exactly 3 characters",
                "name is either absent or has between 1 and 64 characters (if it is a string)",
            ]
        );
    }

    #[test]
    fn not_negates_a_single_condition() {
        assert_eq!(
            words(json!({ "properties": {
                "path": { "type": "string", "not": { "pattern": "^/etc/" } }
            }})),
            [
                "path is either absent or is a string and does not contain a match for the regular expression ^/etc/"
            ]
        );
    }

    #[test]
    fn nested_fields_and_items_name_their_path() {
        assert_eq!(
            words(json!({ "properties": {
                "filter": {
                    "type": "object",
                    "properties": { "owner": { "type": "string" } },
                    "required": ["owner"],
                    "additionalProperties": false
                },
                "tags": { "type": "array", "maxItems": 5, "items": { "type": "string", "maxLength": 20 } }
            }})),
            [
                "filter is either absent or is an object",
                "filter.owner is given whenever filter is given, and it is a string",
                "filter has no field other than filter.owner",
                "tags is either absent or is an array and has at most 5 items",
                "each item of tags is a string and has at most 20 characters",
            ]
        );
    }

    #[test]
    fn closed_arguments_list_what_may_be_given() {
        assert_eq!(
            words(json!({
                "properties": { "a": true, "b": true },
                "additionalProperties": false
            })),
            ["no argument other than a and b is given"]
        );
    }

    #[test]
    fn unknown_keywords_are_quoted_not_dropped() {
        assert_eq!(
            words(json!({ "properties": {
                "n": { "type": "integer", "anyOf": [{ "minimum": 5 }, { "maximum": 1 }] }
            }})),
            [
                r#"n is either absent or is an integer and satisfies the JSON Schema {"anyOf":[{"minimum":5},{"maximum":1}]}"#
            ]
        );
        assert_eq!(
            words(json!({ "if": { "required": ["a"] }, "then": { "required": ["b"] } })),
            [
                r#"the arguments satisfy the JSON Schema {"if":{"required":["a"]},"then":{"required":["b"]}}"#
            ]
        );
    }

    #[test]
    fn references_and_other_drafts_are_quoted_whole() {
        let schema = json!({
            "$defs": { "id": { "type": "string" } },
            "properties": { "id": { "$ref": "#/$defs/id" } }
        });
        assert_eq!(
            words(schema.clone()),
            [format!("the arguments satisfy the JSON Schema {schema}")]
        );
        let draft4 =
            json!({ "$schema": "http://json-schema.org/draft-04/schema#", "properties": {} });
        assert_eq!(
            words(draft4.clone()),
            [format!("the arguments satisfy the JSON Schema {draft4}")]
        );
    }

    #[test]
    fn annotations_say_nothing() {
        assert!(words(json!({ "type": "object", "title": "t", "description": "d" })).is_empty());
    }
}
