//! Tests of the OpenAI router, in process (tower `oneshot`) on a tiny synthetic model.

#![allow(clippy::unwrap_used)]
use super::request::FieldSupport::{Honoured, NoOp, OnlyDefault, Rejected};
use super::*;
use crate::backend::Backend;
use crate::cpu::{CpuBackend, CpuOptions};
use crate::engine::load_cpu_from_bytes;
use crate::gguf::{GgmlType, Gguf};
use crate::model::{LlamaConfig, LlamaWeights};
use crate::sampling::log_sum_exp;
use crate::synthetic::synthetic_gguf;
use crate::tokenizer::ChatMessage;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

pub(super) const SEED: u64 = 3;
pub(super) const CHAT: &str = "/v1/chat/completions";
pub(super) const COMPL: &str = "/v1/completions";

pub(super) fn model_bytes() -> Vec<u8> {
    synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, SEED).unwrap()
}

pub(super) fn app(queue: usize) -> Router {
    let engine = load_cpu_from_bytes(
        &model_bytes(),
        &CpuOptions {
            threads: 1,
            max_context: 64,
            batch: 16,
        },
    )
    .unwrap();
    router(
        engine,
        ServerOptions {
            model_name: "tiny".into(),
            queue_depth: queue,
            default_max_tokens: 8,
            max_batch: 2,
            ..ServerOptions::default()
        },
    )
    .unwrap()
}

pub(super) fn request(path: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

pub(super) async fn call(
    app: &Router,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub(super) async fn ok_json(app: &Router, path: &str, body: &Value) -> Value {
    let (s, b) = call(app, "POST", path, &body.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{body} -> {b}");
    serde_json::from_str(&b).unwrap()
}

/// The JSON chunks of an SSE body (without the final `[DONE]`, which it asserts).
pub(super) fn sse_chunks(body: &str) -> Vec<Value> {
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{body}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

pub(super) async fn stream(app: &Router, path: &str, body: &Value) -> Vec<Value> {
    let (s, b) = call(app, "POST", path, &body.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{body} -> {b}");
    sse_chunks(&b)
}

pub(super) fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Asserts a 400 whose `param` is `param`, with a useful message.
pub(super) async fn expect_400(app: &Router, path: &str, body: &Value, param: &str) -> Value {
    let (s, b) = call(app, "POST", path, &body.to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["param"], param, "{body} -> {b}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{b}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(param),
        "the message names the field: {b}"
    );
    v
}

#[tokio::test]
async fn models_and_chat() {
    let app = app(4);
    let (s, b) = call(&app, "GET", "/v1/models", "").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    let req = json!({"model":"tiny","messages":user("hi"),"max_tokens":5,"temperature":0});
    let v = ok_json(&app, CHAT, &req).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&completion));
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + completion
    );
    // Same request again (greedy) gives the same text.
    let v2 = ok_json(&app, CHAT, &req).await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        v2["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn streaming_matches_non_streaming() {
    let app = app(4);
    let req = json!({"prompt":"the cat","max_tokens":6,"temperature":0,"seed":1});
    let v = ok_json(&app, COMPL, &req).await;
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let chunks = stream(&app, COMPL, &sreq).await;
    let mut streamed = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "text_completion");
        assert!(c.get("usage").is_none(), "no usage without include_usage");
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(streamed, text);
    assert!(finish.is_some());
    // Chat streaming: first chunk carries the role.
    let chunks = stream(
        &app,
        CHAT,
        &json!({"messages":user("x"),"max_tokens":3,"stream":true}),
    )
    .await;
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
}

#[tokio::test]
async fn include_usage_adds_a_final_usage_chunk() {
    let app = app(4);
    for (path, req) in [
        (
            CHAT,
            json!({"messages":user("x"),"max_tokens":4,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}),
        ),
        (
            COMPL,
            json!({"prompt":"x","max_tokens":4,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}),
        ),
    ] {
        let chunks = stream(&app, path, &req).await;
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]), "{last}");
        let u = &last["usage"];
        let prompt = u["prompt_tokens"].as_u64().unwrap();
        let completion = u["completion_tokens"].as_u64().unwrap();
        assert!(prompt > 0 && (1..=4).contains(&completion), "{u}");
        assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
        for c in rest {
            assert_eq!(c["usage"], Value::Null, "{c}");
            assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        }
        // The non-streamed usage agrees.
        let mut plain = req.clone();
        plain.as_object_mut().unwrap().remove("stream");
        plain.as_object_mut().unwrap().remove("stream_options");
        let v = ok_json(&app, path, &plain).await;
        assert_eq!(&v["usage"], u);
    }
}

#[tokio::test]
async fn bad_requests_are_json_errors_and_server_survives() {
    let app = app(4);
    let cases = [
        (CHAT, "{not json", StatusCode::BAD_REQUEST, None),
        (CHAT, "[1, 2]", StatusCode::BAD_REQUEST, None),
        (CHAT, r#"{"messages":"x"}"#, StatusCode::BAD_REQUEST, None),
        (CHAT, r#"{"messages":[]}"#, StatusCode::BAD_REQUEST, None),
        (
            CHAT,
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
            StatusCode::NOT_FOUND,
            Some("model_not_found"),
        ),
        (COMPL, r#"{"prompt":""}"#, StatusCode::BAD_REQUEST, None),
        (
            COMPL,
            r#"{"prompt":["a","b"]}"#,
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            COMPL,
            r#"{"prompt":[1, 99999]}"#,
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (path, body, status, code) in cases {
        let (s, b) = call(&app, "POST", path, body).await;
        assert_eq!(s, status, "{body} -> {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
        assert!(v["error"]["type"].is_string());
        if let Some(c) = code {
            assert_eq!(v["error"]["code"], c);
        }
    }
    // Too long a prompt: 64-token context.
    let long = "a ".repeat(200);
    let (s, b) = call(&app, "POST", COMPL, &json!({ "prompt": long }).to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Still serving.
    let (s, _) = call(&app, "POST", COMPL, r#"{"prompt":"ok","max_tokens":2}"#).await;
    assert_eq!(s, StatusCode::OK);
}

/// Every field that is rejected (always, or with a value other than "nothing"), and unknown
/// fields: each gives a 400 whose `param` is the field.
#[tokio::test]
async fn every_rejected_field_gives_400_naming_it() {
    let app = app(4);
    let rejected: &[(&str, &str, Value)] = &[
        (CHAT, "audio", json!({"voice": "alloy", "format": "wav"})),
        (CHAT, "reasoning_effort", json!("low")),
        (CHAT, "verbosity", json!("low")),
        (CHAT, "web_search_options", json!({})),
        (CHAT, "response_format", json!({"type": "yaml"})),
        // The tiny model's template (ChatML, like SmolLM2's) has no tool format.
        (
            CHAT,
            "tools",
            json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ),
        (CHAT, "tool_choice", json!("required")),
        (
            CHAT,
            "tool_choice",
            json!({"type": "function", "function": {"name": "f"}}),
        ),
        (CHAT, "functions", json!([{"name": "f", "parameters": {}}])),
        (CHAT, "function_call", json!("auto")),
        (CHAT, "modalities", json!(["text", "audio"])),
        (COMPL, "suffix", json!("and then")),
        (COMPL, "best_of", json!(3)),
        (COMPL, "echo", json!(true)), // with logprobs, added below
        // Unknown fields, and the other endpoint's fields.
        (CHAT, "frobnicate", json!(1)),
        (CHAT, "prompt", json!("x")),
        (CHAT, "echo", json!(true)),
        (CHAT, "best_of", json!(1)),
        (COMPL, "messages", json!([])),
        (COMPL, "tools", json!([])),
        (COMPL, "response_format", json!({"type": "text"})),
        (COMPL, "top_logprobs", json!(2)),
        (COMPL, "metadata", json!({})),
    ];
    for (path, field, value) in rejected {
        let mut body = if *path == CHAT {
            json!({"messages": user("hi"), "max_tokens": 2})
        } else {
            json!({"prompt": "hi", "max_tokens": 2})
        };
        body[*field] = value.clone();
        if *field == "echo" && *path == COMPL {
            body["logprobs"] = json!(1);
        }
        let v = expect_400(&app, path, &body, field).await;
        let msg = v["error"]["message"].as_str().unwrap();
        if *path == CHAT && ["functions", "function_call"].contains(field) {
            assert!(msg.contains("tools"), "points to tools: {msg}");
        }
        if *path == CHAT && *field == "tools" {
            assert!(msg.contains("tool-call format"), "{msg}");
        }
    }
    // Every Rejected / OnlyDefault entry of the tables is in the list above.
    for (path, table) in [(CHAT, CHAT_FIELDS), (COMPL, COMPLETION_FIELDS)] {
        for (name, support) in table {
            if matches!(support, Rejected(_) | OnlyDefault(_)) {
                assert!(
                    rejected.iter().any(|(p, f, _)| p == &path && f == name),
                    "{path} {name} has no rejection test"
                );
            }
        }
    }
    // Several unknown fields: named together, the first is `param`.
    let v = expect_400(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "zeta": 1, "alpha": 2}),
        "alpha",
    )
    .await;
    assert!(v["error"]["message"].as_str().unwrap().contains("zeta"));
    assert_eq!(v["error"]["code"], "unknown_parameter");
    // Message-level tool fields and roles.
    for m in [
        json!({"role": "tool", "content": "x", "tool_call_id": "1"}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}),
        json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
        json!({"role": "user", "content": "x", "cache": true}),
        json!({"role": "robot", "content": "x"}),
    ] {
        expect_400(&app, CHAT, &json!({ "messages": [m] }), "messages").await;
    }
}

#[tokio::test]
async fn defaults_and_no_op_fields_are_accepted() {
    let app = app(4);
    let chat = json!({
        "messages": [
            {"role": "developer", "content": "b", "name": "ops"},
            {"role": "user", "content": [{"type": "text", "text": "h"}]},
            {"role": "assistant", "content": "y", "tool_calls": [], "refusal": null},
            {"role": "user", "content": "a"}
        ],
        "model": "tiny", "max_tokens": 2, "max_completion_tokens": 2,
        "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
        "functions": [], "function_call": "none", "modalities": ["text"],
        "parallel_tool_calls": false, "user": "u1", "safety_identifier": "s",
        "prompt_cache_key": "k", "metadata": {"a": "b"}, "store": false,
        "service_tier": "auto", "prediction": {"type": "content", "content": "x"},
        "audio": null, "reasoning_effort": null, "web_search_options": null,
        "stop": null, "seed": -5, "top_k": -1, "n": 1, "logprobs": false
    });
    ok_json(&app, CHAT, &chat).await;
    let compl = json!({
        "prompt": ["hi"], "model": "tiny", "max_tokens": 2, "user": "u", "suffix": "",
        "best_of": 2, "n": 2, "echo": false, "stop": ["x", "y"]
    });
    ok_json(&app, COMPL, &compl).await;
}

#[tokio::test]
async fn out_of_range_and_wrong_type_values_are_400() {
    let app = app(4);
    let cases: &[(&str, &str, Value)] = &[
        (CHAT, "temperature", json!(2.5)),
        (CHAT, "temperature", json!(-0.1)),
        (CHAT, "temperature", json!("hot")),
        (CHAT, "top_p", json!(0)),
        (CHAT, "top_p", json!(1.5)),
        (CHAT, "frequency_penalty", json!(2.5)),
        (CHAT, "frequency_penalty", json!(-3)),
        (CHAT, "presence_penalty", json!(2.01)),
        (CHAT, "presence_penalty", json!(-2.01)),
        (CHAT, "repetition_penalty", json!(0)),
        (CHAT, "repetition_penalty", json!(2.5)),
        (CHAT, "min_p", json!(1.5)),
        (CHAT, "min_p", json!(-0.5)),
        (CHAT, "top_k", json!(-2)),
        (CHAT, "top_k", json!(2.5)),
        (CHAT, "top_logprobs", json!(21)),
        (CHAT, "top_logprobs", json!(-1)),
        (CHAT, "logprobs", json!("yes")),
        (CHAT, "n", json!(0)),
        (CHAT, "n", json!(MAX_N + 1)),
        (CHAT, "n", json!(1.5)),
        (CHAT, "max_tokens", json!(0)),
        (CHAT, "max_tokens", json!(-1)),
        (CHAT, "max_completion_tokens", json!(0)),
        (CHAT, "seed", json!(1.5)),
        (CHAT, "seed", json!("7")),
        (CHAT, "stream", json!("yes")),
        (CHAT, "stream_options", json!({"include_usage": true})), // without stream
        (CHAT, "stop", json!(["a", "b", "c", "d", "e"])),
        (CHAT, "stop", json!(5)),
        (CHAT, "stop", json!(["a", 1])),
        (CHAT, "logit_bias", json!({"384": 1})), // the tiny vocabulary is 0..384
        (CHAT, "logit_bias", json!({"-1": 1})),
        (CHAT, "logit_bias", json!({"abc": 1})),
        (CHAT, "logit_bias", json!({"5": 101})),
        (CHAT, "logit_bias", json!({"5": -100.5})),
        (CHAT, "logit_bias", json!({"5": "x"})),
        (CHAT, "logit_bias", json!([1, 2])),
        (CHAT, "user", json!(5)),
        (CHAT, "store", json!("yes")),
        (CHAT, "metadata", json!({"a": 1})),
        (CHAT, "model", json!(5)),
        (COMPL, "logprobs", json!(21)),
        (COMPL, "logprobs", json!(true)),
        (COMPL, "echo", json!("yes")),
        (COMPL, "prompt", json!(5)),
        (COMPL, "prompt", json!([[1, 2], [3]])),
        (COMPL, "prompt", json!([1, -2])),
        (COMPL, "temperature", json!(3)),
        (COMPL, "logit_bias", json!({"99999": 1})),
    ];
    for (path, field, value) in cases {
        let mut body = if *path == CHAT {
            json!({"messages": user("hi"), "max_tokens": 2})
        } else {
            json!({"prompt": "hi", "max_tokens": 2})
        };
        body[*field] = value.clone();
        expect_400(&app, path, &body, field).await;
    }
    // Conflicts name the second field.
    expect_400(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "max_tokens": 3, "max_completion_tokens": 4}),
        "max_completion_tokens",
    )
    .await;
    expect_400(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "top_logprobs": 3}),
        "top_logprobs",
    )
    .await;
    expect_400(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "stream": true, "stream_options": {"include_usage": true, "extra": 1}}),
        "stream_options",
    )
    .await;
    // Equal values of the two max fields are fine.
    ok_json(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "max_tokens": 2, "max_completion_tokens": 2}),
    )
    .await;
}

/// The logits the backend itself produces after `prefix`, from a fresh CPU backend.
pub(super) fn reference_logits(prefix: &[u32]) -> Vec<f32> {
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let w = LlamaWeights::from_gguf(&g).unwrap();
    let mut b = CpuBackend::new(
        &w,
        &CpuOptions {
            threads: 1,
            max_context: 64,
            batch: 16,
        },
    )
    .unwrap();
    b.forward(prefix, 0).unwrap()
}

fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    let mut b = Vec::new();
    tok.token_bytes(id, true, &mut b);
    b
}

fn bytes_of(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_logprobs_match_the_backends_log_softmax() {
    let app = app(4);
    let tok = Tokenizer::from_gguf(&Gguf::parse(&model_bytes()).unwrap()).unwrap();
    let prompt = tok
        .encode_chat(&[ChatMessage {
            role: "user".into(),
            content: "hi there".into(),
        }])
        .unwrap();
    let req = json!({"messages": user("hi there"), "max_tokens": 6, "temperature": 0,
                     "logprobs": true, "top_logprobs": 5});
    let v = ok_json(&app, CHAT, &req).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty(), "{v}");
    let mut prefix = prompt.clone();
    let mut text = Vec::new();
    for entry in content {
        let logits = reference_logits(&prefix);
        let lse = log_sum_exp(&logits);
        let log_softmax: Vec<f64> = logits.iter().map(|&l| f64::from(l) - lse).collect();
        // Greedy picks the argmax; its logprob is the log-softmax of the raw logits.
        let chosen = crate::sampling::argmax(&logits);
        assert_eq!(
            bytes_of(&entry["bytes"]),
            token_bytes(&tok, chosen),
            "{entry}"
        );
        let lp = entry["logprob"].as_f64().unwrap();
        assert!(
            (lp - log_softmax[chosen as usize]).abs() < 1e-3,
            "{lp} vs {}",
            log_softmax[chosen as usize]
        );
        // top_logprobs: the 5 best of the log-softmax, descending, containing the chosen
        // token (greedy: the first).
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        for (k, t) in top.iter().enumerate() {
            let id = order[k];
            assert_eq!(
                bytes_of(&t["bytes"]),
                token_bytes(&tok, id as u32),
                "rank {k}"
            );
            assert_eq!(
                t["token"],
                String::from_utf8_lossy(&token_bytes(&tok, id as u32)).as_ref()
            );
            let l = t["logprob"].as_f64().unwrap();
            assert!((l - log_softmax[id]).abs() < 1e-3);
            if k > 0 {
                assert!(l <= top[k - 1]["logprob"].as_f64().unwrap());
            }
            mass += l.exp();
        }
        assert!(mass <= 1.0 + 1e-4, "top-5 probabilities sum to {mass}");
        assert_eq!(top[0]["bytes"], entry["bytes"]);
        prefix.push(chosen);
        // The text leaves control tokens out; logprobs name them.
        tok.token_bytes(chosen, false, &mut text);
    }
    assert_eq!(
        String::from_utf8_lossy(&text),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn completion_logprobs_and_echo() {
    let app = app(4);
    let v = ok_json(
        &app,
        COMPL,
        &json!({"prompt": "the cat", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
    )
    .await;
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let n = tokens.len();
    assert!(n > 0, "{v}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), n);
    let text = c["text"].as_str().unwrap();
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert!(
        offsets
            .iter()
            .all(|&o| (o as usize) < text.chars().count().max(1))
    );
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        // The 3 best plus the chosen token, keyed by text (byte tokens that are not
        // whole characters may share the text "\u{fffd}").
        assert!((1..=4).contains(&top.len()), "{top:?}");
        let chosen = tokens[i].as_str().unwrap();
        let chosen_lp = lp["token_logprobs"][i].as_f64().unwrap();
        assert_eq!(top[chosen].as_f64().unwrap(), chosen_lp);
        // Greedy: nothing beats the chosen token.
        assert!(top.values().all(|l| l.as_f64().unwrap() <= chosen_lp));
    }
    // The same prompt as token ids gives the same answer; echo prepends the prompt.
    let tok = Tokenizer::from_gguf(&Gguf::parse(&model_bytes()).unwrap()).unwrap();
    let ids = tok.encode("the cat", false, true);
    let v2 = ok_json(
        &app,
        COMPL,
        &json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "echo": true}),
    )
    .await;
    assert_eq!(
        v2["choices"][0]["text"].as_str().unwrap(),
        format!("the cat{text}")
    );
    // Streamed echo: the first chunk is the prompt.
    let chunks = stream(
        &app,
        COMPL,
        &json!({"prompt": "the cat", "max_tokens": 6, "temperature": 0, "echo": true, "stream": true}),
    )
    .await;
    assert_eq!(chunks[0]["choices"][0]["text"], "the cat");
    let all: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(all, format!("the cat{text}"));
}

#[tokio::test]
async fn streamed_logprobs_match_non_streamed() {
    let app = app(4);
    for (path, mut req) in [
        (
            CHAT,
            json!({"messages": user("hi"), "max_tokens": 8, "temperature": 0.7, "seed": 4, "logprobs": true, "top_logprobs": 2}),
        ),
        (
            COMPL,
            json!({"prompt": "the", "max_tokens": 8, "temperature": 0.7, "seed": 4, "logprobs": 2}),
        ),
    ] {
        let v = ok_json(&app, path, &req).await;
        req["stream"] = json!(true);
        let chunks = stream(&app, path, &req).await;
        let (streamed, plain) = if path == CHAT {
            let mut s = Vec::new();
            for c in &chunks {
                let lp = &c["choices"][0]["logprobs"];
                if c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                {
                    assert!(
                        lp["content"].is_array(),
                        "content chunk without logprobs: {c}"
                    );
                }
                if let Some(a) = lp["content"].as_array() {
                    s.extend(a.iter().cloned());
                }
            }
            (
                s,
                v["choices"][0]["logprobs"]["content"]
                    .as_array()
                    .unwrap()
                    .clone(),
            )
        } else {
            let mut s = Vec::new();
            for c in &chunks {
                let lp = &c["choices"][0]["logprobs"];
                if let Some(a) = lp["tokens"].as_array() {
                    for (i, t) in a.iter().enumerate() {
                        s.push(json!([
                            t,
                            lp["token_logprobs"][i],
                            lp["top_logprobs"][i],
                            lp["text_offset"][i]
                        ]));
                    }
                }
            }
            let lp = &v["choices"][0]["logprobs"];
            let plain = (0..lp["tokens"].as_array().unwrap().len())
                .map(|i| {
                    json!([
                        lp["tokens"][i],
                        lp["token_logprobs"][i],
                        lp["top_logprobs"][i],
                        lp["text_offset"][i]
                    ])
                })
                .collect();
            (s, plain)
        };
        assert!(!plain.is_empty());
        assert_eq!(streamed, plain, "{path}");
    }
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_and_n_gives_n_choices() {
    let app = app(4);
    let req = json!({"prompt": "the", "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3});
    let v = ok_json(&app, COMPL, &req).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: Vec<&str> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            assert!(c["finish_reason"].is_string());
            c["text"].as_str().unwrap()
        })
        .collect();
    assert!(
        texts.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "three samples at temperature 1 differ: {texts:?}"
    );
    // Reproducible, also after other requests moved the engine's cache.
    ok_json(&app, COMPL, &json!({"prompt": "other", "max_tokens": 3})).await;
    assert_eq!(ok_json(&app, COMPL, &req).await["choices"], v["choices"]);
    // Choice 0 is what n = 1 with the same seed gives.
    let mut one = req.clone();
    one["n"] = json!(1);
    let v1 = ok_json(&app, COMPL, &one).await;
    assert_eq!(v1["choices"][0]["text"], texts[0]);
    // Another seed, other samples.
    let mut other = req.clone();
    other["seed"] = json!(12);
    assert_ne!(ok_json(&app, COMPL, &other).await["choices"], v["choices"]);
    // Chat: n = 3 as well, each choice a message.
    let v = ok_json(
        &app,
        CHAT,
        &json!({"messages": user("hi"), "max_tokens": 4, "n": 3, "seed": 2}),
    )
    .await;
    let idx: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["message"]["role"], "assistant");
            c["index"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(idx, vec![0, 1, 2]);
}

#[tokio::test]
async fn streaming_n_choices_matches_non_streamed() {
    let app = app(4);
    let req =
        json!({"messages": user("hi"), "max_tokens": 5, "temperature": 1.0, "seed": 9, "n": 2});
    let v = ok_json(&app, CHAT, &req).await;
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&app, CHAT, &sreq).await;
    let mut texts = [String::new(), String::new()];
    let mut roles = [0, 0];
    let mut finishes = [0, 0];
    for c in &chunks[..chunks.len() - 1] {
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if ch["delta"]["role"] == "assistant" {
            roles[i] += 1;
        }
        texts[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        if ch["finish_reason"].is_string() {
            finishes[i] += 1;
        }
    }
    assert_eq!((roles, finishes), ([1, 1], [1, 1]));
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(v["choices"][i]["message"]["content"], t.as_str());
    }
    assert_eq!(chunks.last().unwrap()["usage"], v["usage"]);
}

#[tokio::test]
async fn greedy_with_penalties_and_logit_bias() {
    let app = app(4);
    let base = json!({"prompt": "the cat", "max_tokens": 16, "temperature": 0});
    let plain = ok_json(&app, COMPL, &base).await["choices"][0]["text"].clone();
    for extra in [
        json!({"frequency_penalty": 2.0}),
        json!({"presence_penalty": 2.0}),
        json!({"repetition_penalty": 2.0}),
    ] {
        let mut req = base.clone();
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let a = ok_json(&app, COMPL, &req).await["choices"][0]["text"].clone();
        let b = ok_json(&app, COMPL, &req).await["choices"][0]["text"].clone();
        assert_eq!(a, b, "greedy with {extra} is deterministic");
        assert_ne!(a, plain, "{extra} changes the greedy output");
    }
    // A +100 bias forces a token; a -100 bias bans the greedy choice.
    let tok = Tokenizer::from_gguf(&Gguf::parse(&model_bytes()).unwrap()).unwrap();
    let z = tok.token_id("z").unwrap();
    let mut req = base.clone();
    req["max_tokens"] = json!(5);
    req["logit_bias"] = json!({ z.to_string(): 100 });
    assert_eq!(
        ok_json(&app, COMPL, &req).await["choices"][0]["text"],
        "zzzzz"
    );
    let first = tok.encode(plain.as_str().unwrap(), false, false)[0];
    req["logit_bias"] = json!({ first.to_string(): -100 });
    let banned = ok_json(&app, COMPL, &req).await["choices"][0]["text"].clone();
    assert_ne!(
        tok.encode(banned.as_str().unwrap(), false, false).first(),
        Some(&first),
        "{banned} starts with the banned token"
    );
    // top_k 1 is greedy whatever the temperature; min_p 1 too.
    for extra in [json!({"top_k": 1}), json!({"min_p": 1.0})] {
        let mut req = base.clone();
        req["temperature"] = json!(1.5);
        req["seed"] = json!(77);
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        assert_eq!(
            ok_json(&app, COMPL, &req).await["choices"][0]["text"],
            plain,
            "{extra}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_does_not_disturb_a_concurrent_stream() {
    let app = app(4);
    let req = json!({"messages": user("tell me"), "max_tokens": 40, "temperature": 0,
                     "logprobs": true, "stream": true});
    let alone = call(&app, "POST", CHAT, &req.to_string()).await.1;
    // Start the stream, take its first event, then send bad requests while it runs.
    let resp = app
        .clone()
        .oneshot(request(CHAT, &req.to_string()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let first = body.frame().await.unwrap().unwrap();
    got.extend_from_slice(first.data_ref().unwrap());
    let bad = [
        (
            CHAT,
            json!({"messages": user("x"), "tools": [{"type": "function"}]}),
        ),
        (CHAT, json!({"messages": user("x"), "temperature": 9})),
        (COMPL, json!({"prompt": "x", "frobnicate": true})),
    ];
    let mut handles = Vec::new();
    for (path, b) in bad {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            call(&app, "POST", path, &b.to_string()).await.0
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), StatusCode::BAD_REQUEST);
    }
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            got.extend_from_slice(&d);
        }
    }
    let got = String::from_utf8(got).unwrap();
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
    assert_eq!(strip(&got), strip(&alone));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gets_429() {
    let app = app(1);
    let body = r#"{"prompt":"go","max_tokens":60,"temperature":0}"#;
    let mut handles = Vec::new();
    for _ in 0..6 {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            call(&app, "POST", COMPL, body).await
        }));
    }
    let mut statuses = Vec::new();
    for h in handles {
        let (s, b) = h.await.unwrap();
        if s == StatusCode::TOO_MANY_REQUESTS {
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_eq!(v["error"]["code"], "queue_full");
        }
        statuses.push(s);
    }
    assert!(statuses.contains(&StatusCode::OK));
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
}

/// inference/README.md's field table lists every field of both endpoints with the same
/// treatment as the code.
#[test]
fn readme_field_table_matches_the_code() {
    let readme = include_str!("../../README.md");
    let row = |name: &str| {
        readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("README has no row for `{name}`"))
            .to_owned()
    };
    for (api, table) in [("chat", CHAT_FIELDS), ("completions", COMPLETION_FIELDS)] {
        for (name, support) in table {
            let r = row(name);
            let cells: Vec<&str> = r.split('|').map(str::trim).collect();
            // | field | chat | completions | notes |
            let cell = if api == "chat" { cells[2] } else { cells[3] };
            let want = match support {
                Honoured => "honoured",
                OnlyDefault(_) => "default only",
                NoOp => "no-op",
                Rejected(_) => "rejected",
            };
            assert_eq!(cell, want, "README row for `{name}` ({api}): {r}");
        }
    }
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5
            || !["honoured", "default only", "no-op", "rejected", "unknown"].contains(&cells[2])
        {
            continue;
        }
        let name = cells[1].trim_matches('`');
        for (api, table, cell) in [
            ("chat", CHAT_FIELDS, cells[2]),
            ("completions", COMPLETION_FIELDS, cells[3]),
        ] {
            assert_eq!(
                cell == "unknown",
                !table.iter().any(|(n, _)| *n == name),
                "README row for `{name}` ({api}) says {cell}"
            );
        }
    }
}
