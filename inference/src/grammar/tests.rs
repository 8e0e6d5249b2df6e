//! Grammar compiler and matcher tests against hand-built vocabularies.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::sampling::Rng;
use serde_json::json;

/// Token 0 = stop (no bytes), 1..=256 = every single byte, then multi-byte tokens, some of
/// which span JSON structure.
const MULTI: &[&[u8]] = &[
    b"\"}",
    b",\"",
    b"\",",
    b"\": \"",
    b"{\"",
    b"\":",
    b" \"",
    b"\"]",
    b"}}",
    b"\n  ",
    b"name",
    b"na",
    b"age",
    b"true",
    b"null",
    b"12",
    b"\xC3\xA9",
    b"\xE6\x9D\xB1",
    b"\xE6\x9D",
    b"abc",
    b"\\n",
    b"\\u00",
    b"[\"",
    b"\"red\"",
    b"1.5e",
];

fn vocab() -> Arc<VocabIndex> {
    let mut bytes: Vec<Vec<u8>> = vec![Vec::new()];
    for b in 0..=255u8 {
        bytes.push(vec![b]);
    }
    for m in MULTI {
        bytes.push(m.to_vec());
    }
    Arc::new(VocabIndex::new(bytes, vec![0]))
}

fn id(v: &VocabIndex, bytes: &[u8]) -> u32 {
    if let [b] = bytes {
        return u32::from(*b) + 1;
    }
    (0..v.len() as u32).find(|&i| v.bytes(i) == bytes).unwrap()
}

fn allowed_set(m: &mut Matcher, remaining: usize) -> Vec<Vec<u8>> {
    let v = m.g.vocab.clone();
    m.allowed_tokens(remaining)
        .iter()
        .map(|t| {
            if t == 0 {
                b"<stop>".to_vec()
            } else {
                v.bytes(t).to_vec()
            }
        })
        .collect()
}

fn person() -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": false
    })
}

#[test]
fn masks_follow_json_structure_across_token_boundaries() {
    let v = vocab();
    let g = Arc::new(Grammar::json_schema(&person(), true, v.clone(), "schema").unwrap());
    let mut m = Matcher::new(g.clone());
    let big = 1000;
    // Only `{` or `{"` can start.
    let mut start = allowed_set(&mut m, big);
    start.sort();
    assert_eq!(start, vec![b"{".to_vec(), b"{\"".to_vec()]);
    m.advance(id(&v, b"{\"")).unwrap();
    // Key: only the required first property (`name`) may come; `na` and `n` start it.
    let keys = allowed_set(&mut m, big);
    assert!(keys.contains(&b"name".to_vec()) && keys.contains(&b"na".to_vec()));
    assert!(!keys.contains(&b"age".to_vec()) && !keys.contains(&b"a".to_vec()));
    m.advance(id(&v, b"name")).unwrap();
    let after_key = allowed_set(&mut m, big);
    assert!(after_key.contains(&b"\":".to_vec()));
    assert!(after_key.contains(&b"\": \"".to_vec()));
    assert!(!after_key.contains(&b"\"}".to_vec()));
    m.advance(id(&v, b"\": \"")).unwrap();
    // Inside the string: text, multi-byte characters, escapes; `"}` would skip `age`.
    let s = allowed_set(&mut m, big);
    for ok in [
        &b"abc"[..],
        b"\xC3\xA9",
        b"\xE6\x9D\xB1",
        b"\xE6\x9D",
        b"\\n",
        b"\\u00",
        b"\",",
        b"\"",
    ] {
        assert!(
            s.contains(&ok.to_vec()),
            "{:?}",
            String::from_utf8_lossy(ok)
        );
    }
    for bad in [&b"\"}"[..], b"\n  ", b"\"]", b"\x01", b"\xA9", b"\xFF"] {
        assert!(
            !s.contains(&bad.to_vec()),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // A lead byte alone: only continuation bytes may follow.
    m.advance(id(&v, b"\xE6\x9D")).unwrap();
    let cont = allowed_set(&mut m, big);
    assert!(
        cont.iter().all(|t| (0x80..=0xBF).contains(&t[0])),
        "{cont:?}"
    );
    assert!(cont.contains(&b"\xB1".to_vec()));
    m.advance(id(&v, b"\xB1")).unwrap();
    m.advance(id(&v, b"\",")).unwrap();
    let next = allowed_set(&mut m, big);
    assert!(next.contains(&b"\"".to_vec()) && next.contains(&b" \"".to_vec()));
    assert!(!next.contains(&b",\"".to_vec()));
    m.advance(id(&v, b"\"")).unwrap();
    m.advance(id(&v, b"age")).unwrap();
    m.advance(id(&v, b"\":")).unwrap();
    let num = allowed_set(&mut m, big);
    assert!(
        num.contains(&b"12".to_vec())
            && num.contains(&b"-".to_vec())
            && num.contains(&b" ".to_vec())
    );
    assert!(
        !num.contains(&b"1.5e".to_vec()),
        "integers have no fraction"
    );
    assert!(!num.contains(&b"\"".to_vec()));
    m.advance(id(&v, b"0")).unwrap();
    let after0 = allowed_set(&mut m, big);
    assert!(
        !after0.iter().any(|t| t[0].is_ascii_digit()),
        "no leading zeros"
    );
    assert!(after0.contains(&b"}".to_vec()) && !after0.contains(&b"<stop>".to_vec()));
    m.advance(id(&v, b"}")).unwrap();
    assert!(m.is_terminal());
    assert_eq!(allowed_set(&mut m, big), vec![b"<stop>".to_vec()]);
    assert!(g.matches(br#"{"name": "abc", "age": 0}"#));
    assert!(!g.matches(br#"{"name": "abc"}"#));
    assert!(
        !g.matches(br#"{"age": 1, "name": "abc"}"#),
        "declaration order"
    );
}

#[test]
fn enums_consts_and_any_of_by_first_byte() {
    let v = vocab();
    let schema = json!({
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", 12, null]},
            "v": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
            "flag": {"type": "boolean"},
            "k": {"const": "x"},
            "opt": {"type": ["integer", "null"]}
        },
        "required": ["color", "v", "flag", "k"],
        "additionalProperties": false
    });
    let g = Grammar::json_schema(&schema, true, v, "s").unwrap();
    for ok in [
        r#"{"color":"red","v":"x","flag":true,"k":"x"}"#,
        r#"{"color": 12, "v": -1.5e+3, "flag": false, "k": "x", "opt": null}"#,
        r#"{"color":null,"v":null,"flag":true,"k":"x","opt":7}"#,
    ] {
        assert!(g.matches(ok.as_bytes()), "{ok}");
    }
    for bad in [
        r#"{"color":"blue","v":"x","flag":true,"k":"x"}"#,
        r#"{"color":"red","v":true,"flag":true,"k":"x"}"#,
        r#"{"color":"red","v":1,"flag":true,"k":"y"}"#,
        r#"{"color":"red","v":1,"flag":true,"k":"x","opt":1.5}"#,
        r#"{"color":123,"v":1,"flag":true,"k":"x"}"#,
    ] {
        assert!(!g.matches(bad.as_bytes()), "{bad}");
    }
}

/// A small validator for the supported subset (the e2e tests use Python's jsonschema).
pub(crate) fn validate(schema: &Value, v: &Value, root: &Value) -> Result<(), String> {
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Object(s) => s,
        _ => return Err("bad schema".into()),
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return validate(&root["$defs"][name], v, root);
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return if e.contains(v) {
            Ok(())
        } else {
            Err(format!("{v} not in enum"))
        };
    }
    if let Some(c) = s.get("const") {
        return if c == v {
            Ok(())
        } else {
            Err(format!("{v} != const"))
        };
    }
    if let Some(alts) = s.get("anyOf").and_then(Value::as_array) {
        return if alts.iter().any(|a| validate(a, v, root).is_ok()) {
            Ok(())
        } else {
            Err(format!("{v} matches no anyOf branch"))
        };
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(v, t)) {
        return Err(format!("{v} is not of type {types:?}"));
    }
    if let (Some(props), Value::Object(o)) = (s.get("properties").and_then(Value::as_object), v) {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(r.as_str().unwrap()) {
                return Err(format!("missing {r}"));
            }
        }
        for (k, x) in o {
            match props.get(k) {
                Some(ps) => validate(ps, x, root)?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("extra key {k}"));
                }
                None => {}
            }
        }
    }
    if let Value::Array(a) = v {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64)
            && (a.len() as u64) < min
        {
            return Err("too few items".into());
        }
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
            && (a.len() as u64) > max
        {
            return Err("too many items".into());
        }
        if let Some(items) = s.get("items") {
            for x in a {
                validate(items, x, root)?;
            }
        }
    }
    Ok(())
}

fn type_ok(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        _ => v.is_null(),
    }
}

fn schemas() -> Vec<Value> {
    vec![
        person(),
        json!({
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "red"]}, "minItems": 1, "maxItems": 3},
                "owner": {"$ref": "#/$defs/owner"},
                "score": {"type": "number"},
                "note": {"type": ["string", "null"]}
            },
            "required": ["id", "tags", "owner"],
            "additionalProperties": false,
            "$defs": {"owner": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
                "additionalProperties": false
            }}
        }),
        json!({"type": "array", "items": {"type": "number"}, "minItems": 2}),
        json!({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}),
    ]
}

/// Random walks over tokens (uniform among the allowed ones, with a random budget): every
/// finished output parses and validates; with a budget of at least the shortest output's
/// length it always finishes.
#[test]
fn random_walks_always_produce_valid_json() {
    let v = vocab();
    let mut rng = Rng::new(7);
    let mut all: Vec<(Value, Grammar)> = schemas()
        .into_iter()
        .map(|s| {
            let g = Grammar::json_schema(&s, false, v.clone(), "s").unwrap();
            (s, g)
        })
        .collect();
    all.push((json!({"type": "object"}), Grammar::json_object(v.clone())));
    for (schema, g) in all {
        let g = Arc::new(g);
        let min = g.min_output_bytes() as usize;
        for walk in 0..150 {
            let budget = min + (rng.next_u64() % 40) as usize;
            let mut m = Matcher::new(g.clone());
            let mut text = Vec::new();
            let mut ended = false;
            for used in 0..budget {
                let allowed: Vec<u32> = m.allowed_tokens(budget - used).iter().collect();
                assert!(
                    !allowed.is_empty(),
                    "walk {walk}: empty mask after {text:?}"
                );
                let t = allowed[(rng.next_u64() % allowed.len() as u64) as usize];
                if t == 0 {
                    ended = true;
                    break;
                }
                m.advance(t).unwrap();
                text.extend_from_slice(v.bytes(t));
                if m.is_terminal() {
                    ended = true;
                    break;
                }
            }
            let s = String::from_utf8(text.clone()).unwrap();
            assert!(
                ended || m.is_accepting(),
                "walk {walk}: budget {budget} not enough to finish {s:?}"
            );
            let parsed: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            if schema != json!({"type": "object"}) {
                validate(&schema, &parsed, &schema).unwrap_or_else(|e| panic!("{s}: {e}"));
            } else {
                assert!(parsed.is_object());
            }
        }
        let (hits, misses) = g.cache_stats();
        assert!(hits > misses, "states repeat: {hits} hits, {misses} misses");
    }
}

/// The shortest-completion length is exact: 0 only when complete, and some byte always
/// brings it one closer.
#[test]
fn distance_is_exact_along_random_paths() {
    let v = vocab();
    let mut rng = Rng::new(11);
    for s in schemas() {
        let g = Grammar::json_schema(&s, false, v.clone(), "s").unwrap();
        for _ in 0..60 {
            let mut st = g.nodes.start(g.root);
            for _ in 0..80 {
                let d = g.nodes.dist(&st);
                assert_eq!(d == 0, g.nodes.is_accepting(&st), "{st:?}");
                let nexts: Vec<(u8, State, u32)> = (0..=255u8)
                    .filter_map(|b| {
                        let mut n = st.clone();
                        g.nodes.step(&mut n, b).then(|| {
                            let dn = g.nodes.dist(&n);
                            (b, n, dn)
                        })
                    })
                    .collect();
                if d > 0 {
                    assert!(
                        nexts.iter().any(|(_, _, dn)| *dn + 1 == d),
                        "no byte reduces the distance {d} in {st:?}"
                    );
                }
                assert!(
                    nexts.iter().all(|(_, _, dn)| *dn + 1 >= d),
                    "distance is a lower bound"
                );
                if nexts.is_empty() {
                    break;
                }
                st = nexts[(rng.next_u64() % nexts.len() as u64) as usize]
                    .1
                    .clone();
            }
        }
    }
}

#[test]
fn tight_budget_closes_the_output() {
    let v = vocab();
    let g = Arc::new(Grammar::json_schema(&person(), true, v.clone(), "s").unwrap());
    let mut m = Matcher::new(g.clone());
    for t in [b"{\"".as_slice(), b"name", b"\": \"", b"abc"] {
        m.advance(id(&v, t)).unwrap();
    }
    // `","age":0}` is 10 bytes: with exactly 10 tokens left only progress is allowed.
    assert_eq!(m.dist(), 10);
    let tight = allowed_set(&mut m, 10);
    assert!(tight.contains(&b"\"".to_vec()) && tight.contains(&b"\",".to_vec()));
    assert!(
        !tight.contains(&b"abc".to_vec()) && !tight.contains(&b"a".to_vec()),
        "{tight:?}"
    );
    let mut text = br#"{"name": "abc"#.to_vec();
    let mut left = 10;
    while !m.is_terminal() {
        let t = m.allowed_tokens(left).iter().next().unwrap();
        m.advance(t).unwrap();
        text.extend_from_slice(v.bytes(t));
        left -= 1;
    }
    let parsed: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(parsed["name"], "abc");
    assert!(parsed["age"].is_i64());
}

#[test]
fn unsupported_schemas_are_errors_naming_the_feature() {
    let v = vocab();
    let cases = [
        (json!({"type": "string", "pattern": "^a"}), "`pattern`"),
        (json!({"type": "string", "format": "date-time"}), "`format`"),
        (json!({"type": "integer", "minimum": 0}), "`minimum`"),
        (
            json!({"type": "object", "properties": {"a": {"type": "string", "minLength": 2}}, "additionalProperties": false}),
            "/properties/a",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "string"}}}),
            "additionalProperties",
        ),
        (
            json!({"anyOf": [{"type": "object", "additionalProperties": false}, {"type": "object", "properties": {}, "additionalProperties": false}]}),
            "same character",
        ),
        (
            json!({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
            "recursive",
        ),
        (json!({"$ref": "https://example.org/x"}), "does not resolve"),
        (json!({"type": "array", "uniqueItems": true}), "uniqueItems"),
        (
            json!({"type": "array", "minItems": 3, "maxItems": 2}),
            "maxItems",
        ),
        (
            json!({"type": "object", "required": ["x"], "properties": {}, "additionalProperties": false}),
            "`x`",
        ),
        (json!({"type": "strng"}), "unknown type"),
        (json!(false), "allows no value"),
        (
            json!({"type": "string", "items": {}}),
            "`items` applies to arrays",
        ),
    ];
    for (schema, want) in cases {
        let e = Grammar::json_schema(
            &schema,
            true,
            v.clone(),
            "response_format.json_schema.schema",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(want), "{schema}: {msg}");
        assert!(
            msg.starts_with("response_format.json_schema.schema"),
            "{msg}"
        );
    }
    // Too large: many properties.
    let mut props = serde_json::Map::new();
    for i in 0..2000 {
        props.insert(format!("property_number_{i}"), json!({"type": "string"}));
    }
    let big = json!({"type": "object", "properties": props});
    let e = Grammar::json_schema(&big, false, v.clone(), "s").unwrap_err();
    assert!(e.message.contains("bytes of JSON"), "{e}");
    // Not strict: open objects are fine (only declared properties are generated).
    assert!(
        Grammar::json_schema(
            &json!({"type": "object", "properties": {"a": {"type": "string"}}}),
            false,
            v,
            "s"
        )
        .is_ok()
    );
}

#[test]
fn free_text_until_a_trigger_then_a_call() {
    let v = vocab();
    let mut b = GrammarBuilder::new();
    let args = b
        .schema(
            &json!({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}),
            false,
            "p",
        )
        .unwrap();
    let close = b.literal(b"}");
    let body = b.switch(&[(br#"{"name": "f", "arguments": "#.to_vec(), args)]);
    let call = b.seq(vec![body, close]);
    let root = b.free_until(b"<tc>", true, call);
    let g = Arc::new(b.build(root, v.clone()));
    assert!(g.matches(b"hello there"));
    assert!(g.matches(b""));
    assert!(g.matches(br#"text <tc>{"name": "f", "arguments": {"x": 1}}"#));
    assert!(!g.matches(br#"<tc>{"name": "g", "arguments": {"x": 1}}"#));
    assert!(!g.matches(br#"<t<tc>{"name": "f", "arguments": {}}"#));
    // In free text every token is allowed, and the stop token too.
    let mut m = Matcher::new(g);
    assert_eq!(m.allowed_tokens(100).count(), v.len());
}
