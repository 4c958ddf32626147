//! The tools the server listed to a session, with each tool's own `inputSchema` compiled:
//! what a tools/call's arguments are validated against. Whether the caller may call a tool at
//! all is the policy's question, asked per call.

use std::collections::HashMap;

use serde_json::Value;

pub struct ToolCatalog {
    validators: HashMap<String, Option<jsonschema::Validator>>,
}

impl ToolCatalog {
    /// From the visible tools of a tools/list result. A tool whose schema does not compile is
    /// kept with no validator only if it has no schema at all; a broken schema makes the tool
    /// unusable (we cannot check its arguments, so we do not pass them).
    pub fn from_tools(tools: &[Value]) -> ToolCatalog {
        let mut validators = HashMap::new();
        for tool in tools {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                continue;
            };
            match tool.get("inputSchema") {
                None => {
                    validators.insert(name.to_owned(), None);
                }
                Some(schema) => match jsonschema::validator_for(schema) {
                    Ok(validator) => {
                        validators.insert(name.to_owned(), Some(validator));
                    }
                    Err(e) => tracing::warn!(tool = name, error = %e,
                        "tool inputSchema does not compile; calls to it will be refused"),
                },
            }
        }
        ToolCatalog { validators }
    }

    pub fn contains(&self, tool: &str) -> bool {
        self.validators.contains_key(tool)
    }

    pub fn extend(&mut self, other: ToolCatalog) {
        self.validators.extend(other.validators);
    }

    /// `None`: unknown tool; `Some(Err(problem))`: arguments do not match.
    pub fn check(&self, tool: &str, arguments: &Value) -> Option<Result<(), String>> {
        let validator = self.validators.get(tool)?;
        let Some(validator) = validator else {
            return Some(Ok(()));
        };
        Some(match validator.iter_errors(arguments).next() {
            None => Ok(()),
            Some(error) => {
                let path = error.instance_path().to_string();
                let at = if path.is_empty() {
                    "(root)".to_owned()
                } else {
                    path
                };
                Err(format!("{at}: {error}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A server's schema whose `$ref`s go round in a circle (jsonschema 0.33 never returned
    /// from validating against the first: its process was killed) constrains nothing and is
    /// checked at once; a recursive schema that does constrain is checked level by level.
    #[test]
    fn schemas_whose_refs_go_round_in_a_circle_are_checked_at_once() {
        let circle = json!({"$ref": "#/$defs/a",
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}});
        let nested = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
            "properties": {"x": {"$ref": "#/$defs/node"}}}}});
        let catalog = ToolCatalog::from_tools(&[
            json!({"name": "circle", "inputSchema": circle}),
            json!({"name": "itself", "inputSchema": {"$ref": "#"}}),
            json!({"name": "empty", "inputSchema": {"$ref": ""}}),
            json!({"name": "nested", "inputSchema": nested}),
        ]);
        for tool in ["circle", "itself", "empty"] {
            assert_eq!(
                catalog.check(tool, &json!({"x": 1})),
                Some(Ok(())),
                "{tool}"
            );
        }
        assert_eq!(
            catalog.check("nested", &json!({"x": {"x": {}}})),
            Some(Ok(()))
        );
        let refused = catalog.check("nested", &json!({"x": {"x": 1}})).unwrap();
        assert!(refused.unwrap_err().starts_with("/x/x: "));
    }

    #[test]
    fn checks_arguments_against_each_tools_schema() {
        let catalog = ToolCatalog::from_tools(&[
            json!({"name": "add", "inputSchema": {"type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"]}}),
            json!({"name": "free"}),
        ]);
        assert_eq!(catalog.check("add", &json!({"a": 1, "b": 2})), Some(Ok(())));
        let problem = catalog
            .check("add", &json!({"a": "x", "b": 2}))
            .unwrap()
            .unwrap_err();
        assert!(problem.contains("/a"), "{problem}");
        assert_eq!(catalog.check("free", &json!({"any": 1})), Some(Ok(())));
        assert_eq!(catalog.check("missing", &json!({})), None);
    }
}
