//! Checks client events against OpenAI's published Realtime GA schemas
//! (`specs/openai-realtime-ga.schemas.json`, committed unchanged; see `specs/README.md`).
//!
//! A small JSON Schema subset, what those schemas use: `$ref`, `anyOf`/`oneOf` (one branch
//! must fit), `type` (with `null`), `enum`, `properties`, `required`, `items`, `maxLength`,
//! `minimum`/`maximum`. Stricter than JSON Schema in one way, on purpose: a property the
//! schema does not declare is an error, so a misspelt field name (which the real server
//! would reject or ignore) fails here.

use std::sync::OnceLock;

use serde_json::Value;

const SPEC: &str = include_str!("../specs/openai-realtime-ga.schemas.json");

fn spec() -> &'static Value {
    static SPEC_VALUE: OnceLock<Value> = OnceLock::new();
    SPEC_VALUE.get_or_init(|| serde_json::from_str(SPEC).expect("the committed spec is JSON"))
}

fn schemas() -> &'static serde_json::Map<String, Value> {
    spec()["components"]["schemas"]
        .as_object()
        .expect("components.schemas")
}

/// The schema of the client event whose `type` is `event_type`, if the spec has one.
pub fn client_event_schema(event_type: &str) -> Option<&'static Value> {
    schemas().iter().find_map(|(name, schema)| {
        let is_client = name.starts_with("RealtimeClientEvent") && name != "RealtimeClientEvent";
        let names_it = schema
            .pointer("/properties/type/enum")
            .and_then(Value::as_array)
            .is_some_and(|e| e.iter().any(|t| t == event_type));
        (is_client && names_it).then_some(schema)
    })
}

/// Whether `event` is a client event the GA interface accepts; the first problem (with
/// its JSON path) when it is not.
pub fn check_client_event(event: &Value) -> Result<(), String> {
    let ty = event["type"]
        .as_str()
        .ok_or_else(|| "no string `type`".to_owned())?;
    let schema =
        client_event_schema(ty).ok_or_else(|| format!("`{ty}` is not a GA client event"))?;
    check(schema, event, "$")
}

fn resolve(schema: &Value) -> &Value {
    let mut s = schema;
    // A $ref with siblings (a description) means the referenced schema.
    while let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        match schemas().get(name) {
            Some(next) => s = next,
            None => break,
        }
    }
    s
}

fn type_fits(ty: &str, v: &Value) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn check(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    let schema = resolve(schema);
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let mut why = Vec::new();
            for option in options {
                match check(option, v, path) {
                    Ok(()) => return check_own(schema, v, path),
                    Err(e) => why.push(e),
                }
            }
            return Err(format!("{path}: fits none of {key}: {}", why.join(" | ")));
        }
    }
    check_own(schema, v, path)
}

/// The keywords of `schema` itself (not its alternatives).
fn check_own(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return Ok(());
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !type_fits(ty, v)
    {
        return Err(format!("{path}: {v} is not of type {ty}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(v)
    {
        return Err(format!("{path}: {v} is not one of {options:?}"));
    }
    if let (Some(max), Some(s)) = (schema.get("maxLength").and_then(Value::as_u64), v.as_str())
        && s.chars().count() as u64 > max
    {
        return Err(format!("{path}: longer than {max}"));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            return Err(format!("{path}: {n} < minimum {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            return Err(format!("{path}: {n} > maximum {max}"));
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !obj.contains_key(name) {
                return Err(format!("{path}: `{name}` is required"));
            }
        }
        for (name, value) in obj {
            let Some(prop) = props.get(name) else {
                return Err(format!(
                    "{path}: `{name}` is not a property the schema knows"
                ));
            };
            check(prop, value, &format!("{path}.{name}"))?;
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check(items, item, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_schemas_own_examples_fit_and_mistakes_do_not() {
        check_client_event(&json!({"event_id": "event_789", "type": "input_audio_buffer.commit"}))
            .expect("commit");
        check_client_event(&json!({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "DTMF: 5"}]}}))
        .expect("a user text item");
        let misspelt = json!({"type": "conversation.item.truncate", "item_id": "i",
            "content_index": 0, "audio_end": 10});
        let why = check_client_event(&misspelt).expect_err("misspelt field");
        assert!(why.contains("audio_end"), "{why}");
        let bad_role = json!({"type": "conversation.item.create", "item": {
            "type": "message", "role": "caller", "content": []}});
        assert!(check_client_event(&bad_role).is_err());
        assert!(check_client_event(&json!({"type": "input_audio_buffer.flush"})).is_err());
        let long_id = json!({"type": "response.create", "event_id": "x".repeat(513)});
        assert!(check_client_event(&long_id).is_err());
    }
}
