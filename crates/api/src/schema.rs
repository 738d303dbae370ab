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
/// The `pattern` of a TAP name, checked by the rule the daemon applies
/// ([`warmvm_vmm::devices::virtio::tap::valid_name`]; the length is the schemas' maxLength).
pub const TAP_PATTERN: &str = "^[A-Za-z0-9._-]+$";
/// The `pattern` of a MAC address: unicast (the low bit of the first octet clear), checked by
/// [`warmvm_vmm::config::parse_mac`].
pub const MAC_PATTERN: &str = "^[0-9A-Fa-f][02468ACEace](:[0-9A-Fa-f]{2}){5}$";
/// The `pattern` of a migration's destination: an IPv4 address and a port, written as
/// [`std::net::SocketAddrV4`] writes them (no leading zeros), checked by
/// [`parse_socket_addr`].
pub const SOCKET_ADDR_PATTERN: &str = "^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)$";

/// An address as [`SOCKET_ADDR_PATTERN`] has it, or `None`.
pub fn parse_socket_addr(s: &str) -> Option<std::net::SocketAddrV4> {
    s.parse::<std::net::SocketAddrV4>()
        .ok()
        .filter(|a| a.to_string() == s)
}
/// The `pattern` of a kernel command line: no NUL.
pub const NO_NUL_PATTERN: &str = "^[^\\u0000]*$";

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
                (Some(TAP_PATTERN), Some(tap))
                    if !warmvm_vmm::devices::virtio::tap::valid_name(tap) =>
                {
                    return Err(format!("{at}: {tap:?} is not a TAP name"))
                }
                (Some(MAC_PATTERN), Some(mac)) if warmvm_vmm::config::parse_mac(mac).is_none() => {
                    return Err(format!("{at}: {mac:?} is not a unicast MAC address"))
                }
                (Some(SOCKET_ADDR_PATTERN), Some(s)) if parse_socket_addr(s).is_none() => {
                    return Err(format!("{at}: {s:?} is not an IPv4 address and port"))
                }
                (Some(NO_NUL_PATTERN), Some(s)) if s.contains('\0') => {
                    return Err(format!("{at}: {s:?} holds a NUL"))
                }
                (
                    Some(
                        NAME_PATTERN | ABSOLUTE_PATTERN | TAP_PATTERN | MAC_PATTERN
                        | NO_NUL_PATTERN | SOCKET_ADDR_PATTERN,
                    ),
                    _,
                ) => {}
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
            "anyOf" => {
                let options = arg
                    .as_array()
                    .ok_or_else(|| format!("{at}: anyOf is not an array"))?;
                let why: Vec<String> = options
                    .iter()
                    .filter_map(|s| check(doc, s, v, at).err())
                    .collect();
                if why.len() == options.len() {
                    return Err(format!(
                        "{at}: {v} matches none of the anyOf schemas ({})",
                        why.join("; ")
                    ));
                }
            }
            "not" => {
                if check(doc, arg, v, at).is_ok() {
                    return Err(format!("{at}: {v} matches the schema under not: {arg}"));
                }
            }
            "multipleOf" => {
                let step = arg
                    .as_u64()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{at}: multipleOf is not a positive integer"))?;
                if let Some(n) = v.as_u64() {
                    if n % step != 0 {
                        return Err(format!("{at}: {n} is not a multiple of {step}"));
                    }
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
        let tap = json!({ "type": "string", "pattern": TAP_PATTERN });
        assert!(validate(&doc, &tap, &json!("tap-0.a_b")).is_ok());
        assert!(validate(&doc, &tap, &json!("tap 0")).is_err());
        let mac = json!({ "type": "string", "pattern": MAC_PATTERN });
        assert!(validate(&doc, &mac, &json!("02:00:00:00:00:01")).is_ok());
        assert!(validate(&doc, &mac, &json!("01:00:00:00:00:01")).is_err());
        assert!(validate(&doc, &mac, &json!("02:00:00:00:00")).is_err());
        let cmdline = json!({ "type": "string", "pattern": NO_NUL_PATTERN });
        assert!(validate(&doc, &cmdline, &json!("quiet")).is_ok());
        assert!(validate(&doc, &cmdline, &json!("a\0b")).is_err());
        // The forms the VM config's rules between fields take.
        let initrd =
            json!({ "anyOf": [{ "not": { "required": ["initrd"] } }, { "required": ["kernel"] }] });
        assert!(validate(&doc, &initrd, &json!({})).is_ok());
        assert!(validate(&doc, &initrd, &json!({ "initrd": "/i", "kernel": "/k" })).is_ok());
        assert!(validate(&doc, &initrd, &json!({ "initrd": "/i" })).is_err());
        let even = json!({ "properties": { "m": { "multipleOf": 2 } } });
        assert!(validate(&doc, &even, &json!({ "m": 4 })).is_ok());
        assert!(validate(&doc, &even, &json!({ "m": 5 })).is_err());
        assert!(validate(&doc, &json!({"pattern": "x"}), &json!("x"))
            .unwrap_err()
            .contains("unsupported"));
    }
}
