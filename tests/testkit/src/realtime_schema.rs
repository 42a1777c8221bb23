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

/// How the real server answers an event its schema refuses: the `error` object's `code`,
/// `param` (the JSON path, without the leading `$.`) and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `unknown_parameter`, `missing_required_parameter` or `invalid_value`.
    pub code: &'static str,
    /// The offending field, e.g. `session.audio.input.transcription.model`.
    pub param: String,
    /// Names the path, like the real server's messages (`Unknown parameter: '…'.`).
    pub message: String,
}

/// [`check_client_event`], answered the way the real API words its `error` events.
pub fn refusal(event: &Value) -> Result<(), Refusal> {
    let why = match check_client_event(event) {
        Ok(()) => return Ok(()),
        Err(why) => why,
    };
    let Some((path, detail)) = why.split_once(": ").filter(|(p, _)| p.starts_with('$')) else {
        // No path: the event's `type` itself is missing or unknown.
        return Err(Refusal {
            code: "invalid_value",
            param: "type".to_owned(),
            message: format!("Invalid value at 'type': {why}."),
        });
    };
    let base = path.trim_start_matches('$').trim_start_matches('.');
    let join = |name: &str| {
        if base.is_empty() {
            name.to_owned()
        } else {
            format!("{base}.{name}")
        }
    };
    let field = |marker: &str| {
        detail
            .strip_suffix(marker)
            .and_then(|d| d.strip_prefix('`'))
            .and_then(|d| d.strip_suffix('`'))
            .map(join)
    };
    Err(
        if let Some(param) = field(" is not a property the schema knows") {
            Refusal {
                code: "unknown_parameter",
                message: format!("Unknown parameter: '{param}'."),
                param,
            }
        } else if let Some(param) = field(" is required") {
            Refusal {
                code: "missing_required_parameter",
                message: format!("Missing required parameter: '{param}'."),
                param,
            }
        } else {
            Refusal {
                code: "invalid_value",
                message: format!("Invalid value at '{base}': {detail}."),
                param: base.to_owned(),
            }
        },
    )
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
            // The branch that got furthest names the real mistake (a misspelt field deep
            // in a session fits no branch, but only one branch was the session's shape).
            let depth = |e: &String| e.split_once(": ").map_or(0, |(p, _)| p.len());
            if let Some(deepest) = why.iter().max_by_key(|e| depth(e))
                && depth(deepest) > path.len()
                && why
                    .iter()
                    .filter(|e| depth(e) == depth(deepest))
                    .all(|e| e == deepest)
            {
                return Err(deepest.clone());
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

    #[test]
    fn refusals_name_the_path_with_the_real_codes() {
        let unknown = json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"transcription": {"model": "whisper-1", "lang": "en"}}}}});
        let r = refusal(&unknown).expect_err("unknown field");
        assert_eq!(r.code, "unknown_parameter");
        assert_eq!(r.param, "session.audio.input.transcription.lang");
        assert_eq!(
            r.message,
            "Unknown parameter: 'session.audio.input.transcription.lang'."
        );
        let missing = json!({"type": "conversation.item.truncate", "item_id": "i",
            "content_index": 0});
        let r = refusal(&missing).expect_err("missing field");
        assert_eq!(r.code, "missing_required_parameter");
        assert_eq!(r.param, "audio_end_ms");
        let bad_role = json!({"type": "conversation.item.create", "item": {
            "type": "message", "role": "caller", "content": []}});
        let r = refusal(&bad_role).expect_err("bad role");
        assert_eq!(r.code, "invalid_value");
        assert!(r.param.starts_with("item"), "{r:?}");
        assert!(r.message.contains(&r.param), "{r:?}");
        let r = refusal(&json!({"type": "input_audio_buffer.flush"})).expect_err("no such event");
        assert_eq!((r.code, r.param.as_str()), ("invalid_value", "type"));
        assert_eq!(refusal(&json!({"type": "response.create"})), Ok(()));
    }
}
