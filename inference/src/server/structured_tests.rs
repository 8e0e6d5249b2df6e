//! Structured output and tool calls through the router, on tiny synthetic models (ChatML, and
//! the Qwen2.5 and Llama 3.1 families with their chat templates). Constrained decoding makes
//! even these random models produce valid JSON and valid calls.

#![allow(clippy::unwrap_used)]
use super::tests::{
    CHAT, SEED, call, expect_400, ok_json, reference_logits, request, sse_chunks, stream, user,
};
use super::*;
use crate::cpu::CpuOptions;
use crate::engine::load_cpu_from_bytes;
use crate::gguf::GgmlType;
use crate::grammar::tests::validate;
use crate::model::LlamaConfig;
use crate::synthetic::{ChatFamily, synthetic_gguf_family};
use crate::tokenizer::ChatMessage;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn family_app(family: ChatFamily, ctx: usize) -> Router {
    let mut cfg = LlamaConfig::tiny();
    cfg.context_len = 4096;
    let bytes = synthetic_gguf_family(&cfg, GgmlType::Q8_0, SEED, family).unwrap();
    let engine = load_cpu_from_bytes(
        &bytes,
        &CpuOptions {
            threads: 1,
            max_context: ctx,
            batch: 64,
        },
    )
    .unwrap();
    router(
        engine,
        ServerOptions {
            model_name: "tiny".into(),
            queue_depth: 8,
            default_max_tokens: 64,
            ..ServerOptions::default()
        },
    )
    .unwrap()
}

fn schemas() -> Vec<Value> {
    vec![
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
                    "required": ["city", "zip"],
                    "additionalProperties": false
                }
            },
            "required": ["name", "age", "address"],
            "additionalProperties": false
        }),
        json!({
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
                "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
                "ok": {"type": "boolean"},
                "kind": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}
            },
            "required": ["tags", "scores", "ok", "kind"],
            "additionalProperties": false
        }),
    ]
}

fn schema_request(schema: &Value, seed: u64, n: usize, max_tokens: usize) -> Value {
    json!({
        "messages": user("Describe a person as JSON."),
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": true}},
        "temperature": 1.0, "seed": seed, "n": n, "max_tokens": max_tokens
    })
}

#[tokio::test]
async fn json_schema_outputs_parse_and_validate() {
    let app = family_app(ChatFamily::ChatMl, 512);
    for schema in schemas() {
        for seed in 0..4 {
            let v = ok_json(&app, CHAT, &schema_request(&schema, seed, 8, 120)).await;
            for c in v["choices"].as_array().unwrap() {
                let text = c["message"]["content"].as_str().unwrap();
                let parsed: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"));
                validate(&schema, &parsed, &schema).unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(c["finish_reason"], "stop", "{text}");
            }
        }
    }
    // json_object: any object.
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": user("JSON please"), "response_format": {"type": "json_object"},
                "temperature": 1.0, "seed": 5, "n": 8, "max_tokens": 64}),
    )
    .await;
    for c in v["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(parsed.is_object());
    }
    // Streaming gives the same text as the non-streamed answer.
    let req = schema_request(&schemas()[0], 9, 1, 120);
    let whole = ok_json(&app, CHAT, &req).await["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let streamed: String = stream(&app, CHAT, &sreq)
        .await
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, whole);
}

/// With `max_tokens` just above the shortest valid output the JSON is still closed in time;
/// below it, the answer is cut off and says `length`.
#[tokio::test]
async fn a_tight_budget_still_closes_the_json() {
    let app = family_app(ChatFamily::ChatMl, 512);
    let schema = &schemas()[0];
    // {"name":"","age":0,"address":{"city":"","zip":""}} is 50 bytes.
    for max_tokens in [50, 54, 60] {
        let v = ok_json(&app, CHAT, &schema_request(schema, 1, 8, max_tokens)).await;
        for c in v["choices"].as_array().unwrap() {
            let text = c["message"]["content"].as_str().unwrap();
            let parsed: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            validate(schema, &parsed, schema).unwrap();
            assert_eq!(c["finish_reason"], "stop");
        }
    }
    let v = ok_json(&app, CHAT, &schema_request(schema, 1, 1, 10)).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("{\"")
    );
}

/// Logprobs under a grammar are still the backend's raw log-softmax.
#[tokio::test]
async fn constrained_logprobs_are_the_backends() {
    let app = super::tests::app(4);
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false});
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "max_tokens": 12, "temperature": 0.8, "seed": 2,
                "logprobs": true, "top_logprobs": 3,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
    )
    .await;
    let bytes = super::tests::model_bytes();
    let g = crate::gguf::Gguf::parse(&bytes).unwrap();
    let tok = crate::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let mut prefix = tok
        .encode_chat(&[ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }])
        .unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for e in content {
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        let id = (0..tok.vocab_size() as u32)
            .find(|&i| {
                let mut b = Vec::new();
                tok.token_bytes(i, true, &mut b);
                b == bytes
            })
            .unwrap();
        let logits = reference_logits(&prefix);
        let lse = crate::sampling::log_sum_exp(&logits);
        let want = (f64::from(logits[id as usize]) - lse) as f32;
        let got = e["logprob"].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        prefix.push(id);
    }
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).unwrap()["a"].is_i64());
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false},
            "strict": true}},
        {"type": "function", "function": {
            "name": "add", "description": "Adds two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

/// Checks a choice's tool calls against the tools; returns them.
fn check_calls(choice: &Value) -> Vec<Value> {
    let calls = choice["message"]["tool_calls"].as_array().unwrap().clone();
    assert!(!calls.is_empty());
    for c in &calls {
        assert_eq!(c["type"], "function");
        assert!(c["id"].as_str().unwrap().starts_with("call_"));
        let name = c["function"]["name"].as_str().unwrap();
        let t = tools();
        let spec = t
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["function"]["name"] == name)
            .unwrap_or_else(|| panic!("unknown function {name}"));
        let schema = &spec["function"]["parameters"];
        let args: Value =
            serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
        validate(schema, &args, schema).unwrap();
    }
    assert_eq!(choice["finish_reason"], "tool_calls");
    calls
}

async fn tool_round_trip(family: ChatFamily, max_calls: usize) {
    let app = family_app(family, 2048);
    let ask = user("What is the weather in Paris, and what is 2 + 3?");
    // required: every choice is a valid call.
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": ask, "tools": tools(), "tool_choice": "required",
                "temperature": 1.0, "seed": 4, "n": 4, "max_tokens": 200}),
    )
    .await;
    let mut first_call = None;
    for c in v["choices"].as_array().unwrap() {
        let calls = check_calls(c);
        assert!(calls.len() <= max_calls, "{calls:?}");
        assert!(c["message"]["content"].is_null());
        first_call.get_or_insert(calls[0].clone());
    }
    // Named: exactly that function, once.
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": ask, "tools": tools(), "parallel_tool_calls": false,
                "tool_choice": {"type": "function", "function": {"name": "add"}},
                "temperature": 1.0, "seed": 5, "n": 3, "max_tokens": 200}),
    )
    .await;
    for c in v["choices"].as_array().unwrap() {
        let calls = check_calls(c);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "add");
    }
    // Streamed: the same calls as delta.tool_calls.
    let req = json!({"messages": ask, "tools": tools(), "tool_choice": "required",
                     "temperature": 1.0, "seed": 6, "max_tokens": 200});
    let whole = ok_json(&app, CHAT, &req).await;
    let no_id = |mut c: Value| {
        c.as_object_mut().unwrap().remove("id");
        c
    };
    let want: Vec<Value> = check_calls(&whole["choices"][0])
        .into_iter()
        .map(no_id)
        .collect();
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let chunks = stream(&app, CHAT, &sreq).await;
    let mut got: Vec<Value> = Vec::new();
    let mut finish = None;
    for ch in &chunks {
        let d = &ch["choices"][0]["delta"];
        assert!(d["content"].as_str().is_none_or(str::is_empty), "{ch}");
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let mut tc = tc.clone();
            assert_eq!(tc["index"].as_u64().unwrap() as usize, got.len());
            tc.as_object_mut().unwrap().remove("index");
            assert!(tc["id"].as_str().unwrap().starts_with("call_"));
            got.push(no_id(tc));
        }
        if let Some(f) = ch["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(got, want);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    // The result goes back; the model answers in text (tool_choice none).
    let call = first_call.unwrap();
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp_c\": 21}"}
    ]);
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": messages, "tools": tools(), "tool_choice": "none", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    let c = &v["choices"][0];
    assert!(c["message"]["tool_calls"].is_null(), "{c}");
    assert!(c["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    // auto: each answer is text or valid calls.
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": ask, "tools": tools(), "temperature": 1.0, "seed": 8, "n": 8, "max_tokens": 120}),
    )
    .await;
    for c in v["choices"].as_array().unwrap() {
        if c["message"]["tool_calls"].is_array() {
            check_calls(c);
        } else {
            assert!(c["message"]["content"].is_string());
            assert_ne!(c["finish_reason"], "tool_calls");
        }
    }
}

#[tokio::test]
async fn qwen_tool_calls_round_trip() {
    tool_round_trip(ChatFamily::Qwen25, MAX_PARALLEL_CALLS as usize).await;
}

#[tokio::test]
async fn llama3_tool_calls_round_trip() {
    tool_round_trip(ChatFamily::Llama31, 1).await;
}

/// Bad structured-output and tool requests get a 400 naming the field, while a constrained
/// stream runs on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_structured_requests_are_400_and_streams_keep_running() {
    let app = family_app(ChatFamily::Qwen25, 2048);
    let rf = |schema: Value| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
    let mut big = serde_json::Map::new();
    for i in 0..1500 {
        big.insert(format!("field_{i}"), json!({"type": "string"}));
    }
    let dup = json!([
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "function": {"name": "f"}}
    ]);
    let bad_schema_tool = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}}}]);
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"response_format": rf(json!({"type": "string", "pattern": "a+"}))}),
            "response_format",
            "pattern",
        ),
        (
            json!({"response_format": rf(json!({"type": "strange"}))}),
            "response_format",
            "unknown type",
        ),
        (
            json!({"response_format": rf(json!({"type": "object", "properties": big}))}),
            "response_format",
            "bytes",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            "response_format",
            "name",
        ),
        (json!({"tools": dup}), "tools", "used twice"),
        (
            json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
            "nope",
        ),
        (
            json!({"tool_choice": "required"}),
            "tool_choice",
            "needs `tools`",
        ),
        (
            json!({"tools": bad_schema_tool, "tool_choice": "required"}),
            "tools",
            "format",
        ),
        (
            json!({"tools": tools(), "response_format": {"type": "json_object"}}),
            "response_format",
            "tools",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "20",
        ),
        (
            json!({"logit_bias": {"999999": 5}}),
            "logit_bias",
            "vocabulary",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages",
            "tool_call_id",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            "messages",
            "arguments",
        ),
    ];
    let req = json!({"messages": user("go"), "max_tokens": 60, "temperature": 1.0, "seed": 3,
                     "stream": true, "response_format": rf(schemas()[1].clone())});
    let alone = call(&app, "POST", CHAT, &req.to_string()).await.1;
    let resp = app
        .clone()
        .oneshot(request(CHAT, &req.to_string()))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let first = body.frame().await.unwrap().unwrap();
    got.extend_from_slice(first.data_ref().unwrap());
    for (extra, param, words) in cases {
        let mut b = json!({"messages": user("x"), "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let v = expect_400(&app, CHAT, &b, param).await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{b} -> {msg}");
    }
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            got.extend_from_slice(&d);
        }
    }
    let strip = |s: &str| -> Vec<Value> {
        sse_chunks(s)
            .into_iter()
            .map(|mut c| {
                c.as_object_mut().unwrap().remove("id");
                c.as_object_mut().unwrap().remove("created");
                c
            })
            .collect()
    };
    assert_eq!(strip(&String::from_utf8(got).unwrap()), strip(&alone));
}
