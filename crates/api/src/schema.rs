//! A checker for the subset of JSON Schema (as OpenAPI 3.0 writes it) that docs/openapi.json
//! uses; the tests validate live responses with it. A keyword it does not know is an error,
//! so the document cannot silently use more than is checked.

use serde_json::Value;

/// Keywords that only describe.
const ANNOTATIONS: &[&str] = &[
    "description",
    "example",
    "format",
    "title",
    "default",
    "readOnly",
    "writeOnly",
    "deprecated",
];

/// The `pattern` of a VM name. It is checked by the rule VM creation applies
/// ([`warmvm_vmm::config::validate_name`]), which it must express exactly (a test compares
/// them).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$";
/// The `pattern` of every path in a request: absolute (the daemon refuses relative ones).
pub const ABSOLUTE_PATTERN: &str = "^/";

/// Check `value` against `schema`; `doc` is the document that `$ref`s point into.
pub fn validate(doc: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    check(doc, schema, value, "$")
}

/// Resolve a local `$ref` such as `#/components/schemas/VmReport`.
pub fn resolve<'a>(doc: &'a Value, reference: &str) -> Result<&'a Value, String> {
    let pointer = reference
        .strip_prefix('#')
        .ok_or_else(|| format!("only local $refs are supported: {reference}"))?;
    doc.pointer(pointer)
        .ok_or_else(|| format!("$ref {reference} points nowhere"))
}

fn type_matches(ty: &str, v: &Value) -> Result<bool, String> {
    Ok(match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        other => return Err(format!("unsupported type {other:?}")),
    })
}

fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let obj = schema
        .as_object()
        .ok_or_else(|| format!("{at}: schema is not an object"))?;
    if let Some(r) = obj.get("$ref") {
        let r = r
            .as_str()
            .ok_or_else(|| format!("{at}: $ref is not a string"))?;
        return check(doc, resolve(doc, r)?, v, at);
    }
    if v.is_null() && obj.get("nullable").and_then(Value::as_bool) == Some(true) {
        return Ok(());
    }
    for (key, arg) in obj {
        match key.as_str() {
            "nullable" | "required" | "additionalProperties" => {}
            "type" => {
                let ty = arg
                    .as_str()
                    .ok_or_else(|| format!("{at}: type is not a string"))?;
                if !type_matches(ty, v)? {
                    return Err(format!("{at}: expected {ty}, found {v}"));
                }
            }
            "enum" => {
                let options = arg
                    .as_array()
                    .ok_or_else(|| format!("{at}: enum is not an array"))?;
                if !options.contains(v) {
                    return Err(format!("{at}: {v} is not one of {arg}"));
                }
            }
            "minimum" | "maximum" => {
                let bound = arg
                    .as_f64()
                    .ok_or_else(|| format!("{at}: {key} is not a number"))?;
                if let Some(n) = v.as_f64() {
                    if (key == "minimum" && n < bound) || (key == "maximum" && n > bound) {
                        return Err(format!("{at}: {n} is outside {key} {bound}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                let bound = arg
                    .as_u64()
                    .ok_or_else(|| format!("{at}: {key} is not a count"))?;
                if let Some(s) = v.as_str() {
                    let n = s.chars().count() as u64;
                    if (key == "minLength" && n < bound) || (key == "maxLength" && n > bound) {
                        return Err(format!("{at}: length {n} is outside {key} {bound}"));
                    }
                }
            }
            "maxItems" => {
                let bound = arg
                    .as_u64()
                    .ok_or_else(|| format!("{at}: {key} is not a count"))?;
                if let Some(items) = v.as_array() {
                    if items.len() as u64 > bound {
                        return Err(format!("{at}: {} items, more than {bound}", items.len()));
                    }
                }
            }
            "pattern" => match (arg.as_str(), v.as_str()) {
                (Some(NAME_PATTERN), Some(name)) => {
                    warmvm_vmm::config::validate_name(name).map_err(|e| format!("{at}: {e}"))?
                }
                (Some(ABSOLUTE_PATTERN), Some(path)) if !path.starts_with('/') => {
                    return Err(format!("{at}: {path:?} is not an absolute path"))
                }
                (Some(NAME_PATTERN | ABSOLUTE_PATTERN), _) => {}
                _ => return Err(format!("{at}: unsupported pattern {arg}")),
            },
            "properties" => {
                let props = arg
                    .as_object()
                    .ok_or_else(|| format!("{at}: properties is not an object"))?;
                let Some(fields) = v.as_object() else {
                    continue;
                };
                if let Some(required) = obj.get("required") {
                    for r in required
                        .as_array()
                        .ok_or_else(|| format!("{at}: required is not an array"))?
                    {
                        let r = r.as_str().unwrap_or_default();
                        if !fields.contains_key(r) {
                            return Err(format!("{at}: required property {r:?} is missing"));
                        }
                    }
                }
                for (name, field) in fields {
                    let path = format!("{at}.{name}");
                    match (props.get(name), obj.get("additionalProperties")) {
                        (Some(s), _) => check(doc, s, field, &path)?,
                        (None, Some(Value::Bool(false))) => {
                            return Err(format!("{path}: property not in the schema"))
                        }
                        (None, Some(s @ Value::Object(_))) => check(doc, s, field, &path)?,
                        (None, _) => {}
                    }
                }
            }
            "items" => {
                if let Some(items) = v.as_array() {
                    for (i, item) in items.iter().enumerate() {
                        check(doc, arg, item, &format!("{at}[{i}]"))?;
                    }
                }
            }
            "allOf" => {
                for s in arg
                    .as_array()
                    .ok_or_else(|| format!("{at}: allOf is not an array"))?
                {
                    check(doc, s, v, at)?;
                }
            }
            "oneOf" => {
                let options = arg
                    .as_array()
                    .ok_or_else(|| format!("{at}: oneOf is not an array"))?;
                let matching = options
                    .iter()
                    .filter(|s| check(doc, s, v, at).is_ok())
                    .count();
                if matching != 1 {
                    return Err(format!(
                        "{at}: {v} matches {matching} of the oneOf schemas, not 1"
                    ));
                }
            }
            k if ANNOTATIONS.contains(&k) => {}
            other => return Err(format!("{at}: unsupported schema keyword {other:?}")),
        }
    }
    // `required` without `properties`.
    if !obj.contains_key("properties") {
        if let (Some(required), Some(fields)) = (obj.get("required"), v.as_object()) {
            for r in required.as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or_default();
                if !fields.contains_key(r) {
                    return Err(format!("{at}: required property {r:?} is missing"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checks_the_subset() {
        let doc = json!({"components": {"schemas": {
            "P": {"type": "object", "additionalProperties": false, "required": ["a"],
                  "properties": {"a": {"type": "integer", "minimum": 0},
                                 "b": {"type": "string", "nullable": true, "enum": ["x", "y"]},
                                 "c": {"type": "array", "items": {"$ref": "#/components/schemas/Q"}}}},
            "Q": {"type": "boolean"}
        }}});
        let p = json!({"$ref": "#/components/schemas/P"});
        assert!(validate(&doc, &p, &json!({"a": 1, "b": null, "c": [true]})).is_ok());
        assert!(validate(&doc, &p, &json!({"a": 1, "b": "x"})).is_ok());
        assert!(validate(&doc, &p, &json!({"b": "x"}))
            .unwrap_err()
            .contains("missing"));
        assert!(validate(&doc, &p, &json!({"a": -1}))
            .unwrap_err()
            .contains("minimum"));
        assert!(validate(&doc, &p, &json!({"a": 1, "b": "z"}))
            .unwrap_err()
            .contains("one of"));
        assert!(validate(&doc, &p, &json!({"a": 1, "c": [1]}))
            .unwrap_err()
            .contains("$.c[0]"));
        assert!(validate(&doc, &p, &json!({"a": 1, "d": 1}))
            .unwrap_err()
            .contains("not in"));
        assert!(validate(&doc, &p, &json!({"a": 1.5})).is_err());
        let name = json!({ "type": "string", "pattern": NAME_PATTERN });
        assert!(validate(&doc, &name, &json!("web-1")).is_ok());
        assert!(validate(&doc, &name, &json!("-web")).is_err());
        let path = json!({ "type": "string", "pattern": ABSOLUTE_PATTERN });
        assert!(validate(&doc, &path, &json!("/var/lib/x")).is_ok());
        assert!(validate(&doc, &path, &json!("x/y"))
            .unwrap_err()
            .contains("not an absolute path"));
        assert!(validate(&doc, &json!({"pattern": "x"}), &json!("x"))
            .unwrap_err()
            .contains("unsupported"));
    }
}
