//! Request parsing and validation: the field tables ([`CHAT_FIELDS`], [`COMPLETION_FIELDS`]),
//! per-field type and range checks with 400s naming the field, and the prompt.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::tools::{parse_tools, tool_grammar};
use super::{ApiError, Inner};
use crate::chat::{CallMsg, ToolFormat, Turn};
use crate::grammar::Grammar;
use crate::sampling::{MAX_TOP_LOGPROBS, SamplingParams};
use crate::scheduler::{CacheScope, SHARED_SCOPE};
use crate::tokenizer::ChatMessage;

/// Largest `n` (choices per request); they run one after another, so each costs a generation.
pub const MAX_N: usize = 8;
/// Largest number of stop sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// How the server treats one request field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldSupport {
    /// Used as OpenAI documents it (limits in `inference/README.md`).
    Honoured,
    /// Accepted only with the value that asks for nothing (`tools: []`, `tool_choice: "none"`,
    /// `response_format: {"type": "text"}`, …); any other value gets a 400 with this reason.
    OnlyDefault(&'static str),
    /// Accepted (its type is checked) and ignored: it cannot change the output.
    NoOp,
    /// Any non-null value gets a 400 with this reason.
    Rejected(&'static str),
}

use FieldSupport::{Honoured, NoOp, OnlyDefault, Rejected};

const WHY_FUNCTIONS: &str = "function calling with the deprecated `functions` is not supported; send the functions as `tools` (each {\"type\": \"function\", \"function\": {...}}) instead";
const WHY_FUNCTION_CALL: &str = "the deprecated `function_call` is not supported; only \"none\" is accepted: use `tool_choice` with `tools` instead";
const WHY_MODALITIES: &str =
    "only text output is supported; send modalities [\"text\"] or leave it out";
const WHY_AUDIO: &str = "audio output is not supported; leave audio out";
const WHY_REASONING: &str = "the served model is not a reasoning model; leave reasoning_effort out";
const WHY_VERBOSITY: &str =
    "verbosity is only for reasoning models and is not supported; leave it out";
const WHY_WEB_SEARCH: &str =
    "web search is not available (the worker has no network access); leave web_search_options out";
const WHY_SUFFIX: &str = "insertion (suffix) is not supported; send no suffix (or an empty one)";
const WHY_BEST_OF: &str = "best_of > n (ranking several candidates) is not supported; leave best_of out or set it equal to n";

/// Every field `/v1/chat/completions` accepts, and how.
pub const CHAT_FIELDS: &[(&str, FieldSupport)] = &[
    ("messages", Honoured),
    ("model", Honoured),
    ("frequency_penalty", Honoured),
    ("presence_penalty", Honoured),
    ("repetition_penalty", Honoured),
    ("logit_bias", Honoured),
    ("logprobs", Honoured),
    ("top_logprobs", Honoured),
    ("max_tokens", Honoured),
    ("max_completion_tokens", Honoured),
    ("n", Honoured),
    ("seed", Honoured),
    ("stop", Honoured),
    ("stream", Honoured),
    ("stream_options", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("top_k", Honoured),
    ("min_p", Honoured),
    ("response_format", Honoured),
    ("tools", Honoured),
    ("tool_choice", Honoured),
    ("parallel_tool_calls", Honoured),
    ("functions", OnlyDefault(WHY_FUNCTIONS)),
    ("function_call", OnlyDefault(WHY_FUNCTION_CALL)),
    ("modalities", OnlyDefault(WHY_MODALITIES)),
    ("cache_salt", Honoured),
    ("user", NoOp),
    ("safety_identifier", NoOp),
    ("prompt_cache_key", NoOp),
    ("metadata", NoOp),
    ("store", NoOp),
    ("service_tier", NoOp),
    ("prediction", NoOp),
    ("audio", Rejected(WHY_AUDIO)),
    ("reasoning_effort", Rejected(WHY_REASONING)),
    ("verbosity", Rejected(WHY_VERBOSITY)),
    ("web_search_options", Rejected(WHY_WEB_SEARCH)),
];

/// Every field `/v1/completions` accepts, and how.
pub const COMPLETION_FIELDS: &[(&str, FieldSupport)] = &[
    ("prompt", Honoured),
    ("model", Honoured),
    ("echo", Honoured),
    ("frequency_penalty", Honoured),
    ("presence_penalty", Honoured),
    ("repetition_penalty", Honoured),
    ("logit_bias", Honoured),
    ("logprobs", Honoured),
    ("max_tokens", Honoured),
    ("max_completion_tokens", Honoured),
    ("n", Honoured),
    ("seed", Honoured),
    ("stop", Honoured),
    ("stream", Honoured),
    ("stream_options", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("top_k", Honoured),
    ("min_p", Honoured),
    ("best_of", OnlyDefault(WHY_BEST_OF)),
    ("suffix", OnlyDefault(WHY_SUFFIX)),
    ("cache_salt", Honoured),
    ("user", NoOp),
];

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Api {
    Chat,
    Completion,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completion => "/v1/completions",
        }
    }
    fn fields(self) -> &'static [(&'static str, FieldSupport)] {
        match self {
            Api::Chat => CHAT_FIELDS,
            Api::Completion => COMPLETION_FIELDS,
        }
    }
}

/// The request body's fields, taken out one by one as they are parsed.
struct Fields(Map<String, Value>);

impl Fields {
    /// The field's value; `null` counts as absent (as OpenAI treats it).
    fn raw(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn get<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &str,
        expected: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(|e| {
                ApiError::field(
                    name,
                    "invalid_type",
                    format!("`{name}` must be {expected} ({e})"),
                )
            }),
        }
    }

    /// Every field must have been handled by now: a table entry the parser forgot would be a
    /// silent drop, so it is an error (a bug of this server, hence 500).
    fn finish(self) -> Result<(), ApiError> {
        match self.0.iter().find(|(_, v)| !v.is_null()) {
            None => Ok(()),
            Some((k, _)) => Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!(
                    "the server accepts `{k}` but does not handle it (a server bug); leave it out and report this"
                ),
                kind: "server_error",
                code: None,
                param: Some(k.clone()),
                retry_after: None,
            }),
        }
    }

    /// A number in `lo..=hi` (or `(lo, hi]` when `open_low`), as f32.
    fn number(
        &mut self,
        name: &str,
        lo: f64,
        hi: f64,
        open_low: bool,
        default: f32,
    ) -> Result<f32, ApiError> {
        let Some(v) = self.get::<f64>(name, "a number")? else {
            return Ok(default);
        };
        let ok = if open_low { v > lo } else { v >= lo } && v <= hi;
        if !ok {
            let range = if open_low {
                format!("greater than {lo} and at most {hi}")
            } else {
                format!("between {lo} and {hi}")
            };
            return Err(ApiError::field(
                name,
                "invalid_value",
                format!("`{name}` must be {range}; got {v}"),
            ));
        }
        Ok(v as f32)
    }
}

/// Checks the body's field names against the endpoint's table: unknown and always-rejected
/// fields give a 400 naming the field.
fn check_field_names(api: Api, body: &Map<String, Value>) -> Result<(), ApiError> {
    let table = api.fields();
    // Sorted: the message and `param` must not depend on the JSON map's key order (serde_json
    // keeps insertion order when a dependency enables `preserve_order`, else sorts).
    let mut unknown: Vec<&str> = body
        .keys()
        .map(String::as_str)
        .filter(|k| !table.iter().any(|(n, _)| n == k))
        .collect();
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        let listed = unknown
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let known = table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        return Err(ApiError::field(
            first,
            "unknown_parameter",
            format!(
                "unrecognized request field {listed} for {}: it would be ignored, so it is refused; remove it (fields this endpoint knows: {known})",
                api.path()
            ),
        ));
    }
    for (name, support) in table {
        if let Rejected(why) = support
            && body.get(*name).is_some_and(|v| !v.is_null())
        {
            return Err(ApiError::field(
                name,
                "unsupported_parameter",
                format!("`{name}`: {why}"),
            ));
        }
    }
    Ok(())
}

/// Type checks of the no-op fields (a wrong type is still a client bug worth reporting).
fn check_noop_fields(api: Api, f: &mut Fields) -> Result<(), ApiError> {
    for (name, support) in api.fields() {
        if *support != NoOp {
            continue;
        }
        match *name {
            "store" => {
                f.get::<bool>(name, "a boolean")?;
            }
            "metadata" => {
                f.get::<BTreeMap<String, String>>(name, "an object of string values")?;
            }
            "prediction" => {
                f.get::<Map<String, Value>>(name, "an object")?;
            }
            _ => {
                f.get::<String>(name, "a string")?;
            }
        }
    }
    Ok(())
}

/// What both endpoints share, parsed and range-checked.
struct Common {
    params: SamplingParams,
    max_tokens: Option<u64>,
    n: usize,
    stream: bool,
    include_usage: bool,
    scope: CacheScope,
}

/// The prefix-sharing scope of a request's `cache_salt` (vLLM's field): the first 8 bytes of
/// its SHA-256, never [`SHARED_SCOPE`]. Requests with the same salt share cached prompt
/// blocks with each other and with no one else; requests without one share among themselves.
pub(super) fn salt_scope(salt: &str) -> CacheScope {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(salt.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    match u64::from_le_bytes(b) {
        SHARED_SCOPE => SHARED_SCOPE + 1,
        v => v,
    }
}

fn parse_common(st: &Inner, f: &mut Fields) -> Result<Common, ApiError> {
    if let Some(m) = f.get::<String>("model", "a string")?
        && m != st.opts.model_name
    {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{m}` does not exist; GET /v1/models lists `{}`",
                st.opts.model_name
            ),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model".into()),
            retry_after: None,
        });
    }
    let scope = match f.get::<String>("cache_salt", "a string")? {
        None => SHARED_SCOPE,
        Some(s) if s.is_empty() => {
            return Err(ApiError::field(
                "cache_salt",
                "invalid_value",
                "`cache_salt` must not be empty; omit it to share cached prompt prefixes with other requests without one",
            ));
        }
        Some(s) => salt_scope(&s),
    };
    let n = f.get::<u64>("n", "a positive integer")?.unwrap_or(1);
    if !(1..=MAX_N as u64).contains(&n) {
        return Err(ApiError::field(
            "n",
            "invalid_value",
            format!(
                "`n` must be between 1 and {MAX_N} (choices are generated one after another); got {n}"
            ),
        ));
    }
    let n = n as usize;
    let temperature = f.number("temperature", 0.0, 2.0, false, 1.0)?;
    let top_p = f.number("top_p", 0.0, 1.0, true, 1.0)?;
    let min_p = f.number("min_p", 0.0, 1.0, false, 0.0)?;
    let frequency_penalty = f.number("frequency_penalty", -2.0, 2.0, false, 0.0)?;
    let presence_penalty = f.number("presence_penalty", -2.0, 2.0, false, 0.0)?;
    let repetition_penalty = f.number("repetition_penalty", 0.0, 2.0, true, 1.0)?;
    let top_k = match f.get::<i64>("top_k", "an integer")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                "invalid_value",
                format!("`top_k` must be a positive integer, or 0 or -1 to disable it; got {k}"),
            ));
        }
    };
    let seed = match f.get::<serde_json::Number>("seed", "an integer")? {
        None => st.next_id.load(Ordering::Relaxed),
        Some(s) => match (s.as_u64(), s.as_i64()) {
            (Some(u), _) => u,
            // Negative seeds (OpenAI's seed is a signed 64-bit integer) map bit for bit.
            (None, Some(i)) => i as u64,
            _ => {
                return Err(ApiError::field(
                    "seed",
                    "invalid_type",
                    format!("`seed` must be an integer; got {s}"),
                ));
            }
        },
    };
    let vocab = st.tokenizer.vocab_size();
    let mut logit_bias = Vec::new();
    if let Some(map) = f.get::<BTreeMap<String, f64>>(
        "logit_bias",
        "an object mapping token ids (as strings) to numbers",
    )? {
        for (k, v) in map {
            let id = k
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab);
            let Some(id) = id else {
                return Err(ApiError::field(
                    "logit_bias",
                    "invalid_value",
                    format!(
                        "`logit_bias` key {k:?} is not a token id of this model's vocabulary (0..{vocab}); keys are token ids as strings, e.g. {{\"42\": -100}}"
                    ),
                ));
            };
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::field(
                    "logit_bias",
                    "invalid_value",
                    format!("`logit_bias` values must be between -100 and 100; token {id} has {v}"),
                ));
            }
            logit_bias.push((id, v as f32));
        }
    }
    let stop = match f.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => {
            let mut v = Vec::with_capacity(a.len());
            for s in a {
                match s {
                    Value::String(s) => v.push(s),
                    other => {
                        return Err(ApiError::field(
                            "stop",
                            "invalid_type",
                            format!(
                                "`stop` must be a string or an array of strings; found {other}"
                            ),
                        ));
                    }
                }
            }
            v
        }
        Some(other) => {
            return Err(ApiError::field(
                "stop",
                "invalid_type",
                format!("`stop` must be a string or an array of strings; got {other}"),
            ));
        }
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::field(
            "stop",
            "invalid_value",
            format!(
                "at most {MAX_STOP} stop sequences are allowed; got {}",
                stop.len()
            ),
        ));
    }
    let max_tokens = f.get::<u64>("max_tokens", "a positive integer")?;
    let max_completion_tokens = f.get::<u64>("max_completion_tokens", "a positive integer")?;
    let max_tokens = match (max_tokens, max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::field(
                "max_completion_tokens",
                "invalid_value",
                format!(
                    "`max_tokens` ({a}) and `max_completion_tokens` ({b}) differ; send one of them"
                ),
            ));
        }
        (Some(0), _) => {
            return Err(ApiError::field(
                "max_tokens",
                "invalid_value",
                "`max_tokens` must be at least 1",
            ));
        }
        (_, Some(0)) => {
            return Err(ApiError::field(
                "max_completion_tokens",
                "invalid_value",
                "`max_completion_tokens` must be at least 1",
            ));
        }
        (a, b) => a.or(b),
    };
    let stream = f.get::<bool>("stream", "a boolean")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(opts) = f.get::<Map<String, Value>>("stream_options", "an object")? {
        if !stream {
            return Err(ApiError::field(
                "stream_options",
                "invalid_value",
                "`stream_options` is only allowed with `stream: true`",
            ));
        }
        for (k, v) in &opts {
            match (k.as_str(), v) {
                ("include_usage", Value::Bool(b)) => include_usage = *b,
                // Obfuscation pads chunks against length side channels; these chunks are sent
                // over RA-TLS to the client only, so it is accepted and not done.
                ("include_obfuscation", Value::Bool(_)) | (_, Value::Null) => {}
                _ => {
                    return Err(ApiError::field(
                        "stream_options",
                        "invalid_value",
                        format!(
                            "`stream_options.{k}` is not supported (supported: include_usage: bool, include_obfuscation: bool)"
                        ),
                    ));
                }
            }
        }
    }
    Ok(Common {
        scope,
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            frequency_penalty,
            presence_penalty,
            repetition_penalty,
            logit_bias,
            seed,
            max_tokens: 0,
            stop,
            logprobs: None,
        },
        max_tokens,
        n,
        stream,
        include_usage,
    })
}

/// Parses a request's `messages`; also says whether any message carries tool calls or
/// results (those need the model's tool format to render).
fn parse_messages(v: Option<Value>) -> Result<(Vec<Turn>, bool), ApiError> {
    let bad = |m: String| ApiError::field("messages", "invalid_value", m);
    let Some(v) = v else {
        return Err(bad(
            "`messages` is required: a list of {role, content} objects".into(),
        ));
    };
    let Value::Array(list) = v else {
        return Err(ApiError::field(
            "messages",
            "invalid_type",
            "`messages` must be an array of {role, content} objects",
        ));
    };
    if list.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut uses_tools = false;
    for (i, m) in list.into_iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(bad(format!(
                "messages[{i}] must be an object with role and content"
            )));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_owned(),
            Some("developer") => "system".to_owned(),
            Some("function") => {
                return Err(bad(format!(
                    "messages[{i}] has the deprecated role \"function\"; send tool results as role \"tool\" with tool_call_id"
                )));
            }
            Some(r) => {
                return Err(bad(format!(
                    "messages[{i}] has unknown role {r:?}; use system, user, assistant, developer or tool"
                )));
            }
            None => return Err(bad(format!("messages[{i}].role must be a string"))),
        };
        for (k, v) in &m {
            match k.as_str() {
                "role" | "content" | "name" => {}
                "tool_calls" if role == "assistant" => {}
                "tool_call_id" if role == "tool" => {}
                "tool_calls" | "function_call" if v.is_null() || v == &json!([]) => {}
                "refusal" | "audio" if v.is_null() => {}
                "tool_calls" | "tool_call_id" => {
                    return Err(bad(format!(
                        "messages[{i}].{k} is only allowed on {} messages",
                        if k == "tool_calls" {
                            "assistant"
                        } else {
                            "tool"
                        }
                    )));
                }
                other => {
                    return Err(bad(format!(
                        "messages[{i}].{other} is not supported (message fields: role, content, name, tool_calls on assistant messages, tool_call_id on tool messages)"
                    )));
                }
            }
        }
        if m.get("name")
            .is_some_and(|n| !n.is_string() && !n.is_null())
        {
            return Err(bad(format!("messages[{i}].name must be a string")));
        }
        let content = content_text(m.get("content").unwrap_or(&Value::Null))
            .map_err(|e| bad(format!("messages[{i}].content: {e}")))?;
        let mut tool_calls = Vec::new();
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            for (j, c) in calls.iter().enumerate() {
                let at = format!("messages[{i}].tool_calls[{j}]");
                let f = c.get("function");
                let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
                let args = f.and_then(|f| f.get("arguments")).and_then(Value::as_str);
                let (Some(name), Some(args)) = (name, args) else {
                    return Err(bad(format!(
                        "{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\": JSON string}}}}"
                    )));
                };
                if c.get("type").is_some_and(|t| t != "function") {
                    return Err(bad(format!("{at}.type must be \"function\"")));
                }
                let arguments: Value = serde_json::from_str(args)
                    .map_err(|e| bad(format!("{at}.function.arguments is not valid JSON ({e})")))?;
                tool_calls.push(CallMsg {
                    name: name.to_owned(),
                    arguments,
                });
            }
        }
        if role == "tool" {
            if !m.get("tool_call_id").is_some_and(Value::is_string) {
                return Err(bad(format!(
                    "messages[{i}] (role tool) needs tool_call_id: the id of the call it answers"
                )));
            }
            uses_tools = true;
        }
        uses_tools |= !tool_calls.is_empty();
        out.push(Turn {
            role,
            content,
            tool_calls,
        });
    }
    Ok((out, uses_tools))
}

/// What `response_format` asks for.
enum ResponseFormat {
    Text,
    JsonObject,
    Schema { schema: Value, strict: bool },
}

fn parse_response_format(v: Option<Value>) -> Result<ResponseFormat, ApiError> {
    let bad = |m: String| ApiError::field("response_format", "invalid_value", m);
    let Some(v) = v else {
        return Ok(ResponseFormat::Text);
    };
    let Value::Object(rf) = v else {
        return Err(bad(
            "`response_format` must be an object such as {\"type\": \"json_object\"}".into(),
        ));
    };
    let ty = rf.get("type").and_then(Value::as_str).unwrap_or_default();
    let allowed: &[&str] = match ty {
        "text" | "json_object" => &["type"],
        "json_schema" => &["type", "json_schema"],
        other => {
            return Err(bad(format!(
                "`response_format.type` {other:?} is not supported: use \"text\", \"json_object\" or \"json_schema\""
            )));
        }
    };
    if let Some(k) = rf.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "`response_format.{k}` is not supported with type {ty:?}"
        )));
    }
    match ty {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        _ => {
            let Some(Value::Object(js)) = rf.get("json_schema") else {
                return Err(bad(
                    "`response_format.json_schema` must be an object {name, schema, strict}".into(),
                ));
            };
            if let Some(k) = js
                .keys()
                .find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str()))
            {
                return Err(bad(format!(
                    "`response_format.json_schema.{k}` is not supported (fields: name, description, schema, strict)"
                )));
            }
            let name = js.get("name").and_then(Value::as_str).unwrap_or_default();
            if !(1..=64).contains(&name.len())
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(bad(format!(
                    "`response_format.json_schema.name` {name:?} must be 1 to 64 letters, digits, underscores or dashes"
                )));
            }
            let strict = match js.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad(
                        "`response_format.json_schema.strict` must be a boolean".into(),
                    ));
                }
            };
            match js.get("schema") {
                None | Some(Value::Null) => Ok(ResponseFormat::JsonObject),
                Some(schema) => Ok(ResponseFormat::Schema {
                    schema: schema.clone(),
                    strict,
                }),
            }
        }
    }
}

fn content_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    (ty, _) => {
                        return Err(format!(
                            "only text content parts are supported (got type {})",
                            ty.unwrap_or("none")
                        ));
                    }
                }
            }
            Ok(s)
        }
        _ => Err("must be a string or a list of text parts".into()),
    }
}

/// A request, parsed and checked, ready to run.
pub(super) struct Parsed {
    pub(super) prompt: Vec<u32>,
    pub(super) params: SamplingParams,
    pub(super) n: usize,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Its prefix-sharing scope (`cache_salt`).
    pub(super) scope: CacheScope,
    /// Completions with `echo`: the prompt text the answer starts with.
    pub(super) echo: Option<String>,
    /// Constrained decoding (structured output or tool calls).
    pub(super) grammar: Option<Arc<Grammar>>,
    /// Tool calls: how to find them in the answer.
    pub(super) tools: Option<ToolOut>,
}

/// What the response builder needs to turn an answer into `tool_calls`.
#[derive(Debug, Clone)]
pub(super) struct ToolOut {
    pub(super) format: ToolFormat,
    pub(super) names: Vec<String>,
}

pub(super) fn parse_body(
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body =
        body.map_err(|e| ApiError::bad(format!("cannot read the request body: {e}"), None))?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::bad(
            format!(
                "the request body must be a JSON object, got {}; see the OpenAI API reference",
                match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ),
            None,
        )),
        Err(e) => Err(ApiError::bad(
            format!("the request body is not valid JSON: {e}"),
            None,
        )),
    }
}

pub(super) fn parse_chat(st: &Inner, body: Map<String, Value>) -> Result<Parsed, ApiError> {
    check_field_names(Api::Chat, &body)?;
    let mut f = Fields(body);
    check_noop_fields(Api::Chat, &mut f)?;
    let (messages, uses_tools) = parse_messages(f.raw("messages"))?;
    let common = parse_common(st, &mut f)?;
    let logprobs = f.get::<bool>("logprobs", "a boolean")?.unwrap_or(false);
    let top = f.get::<u64>("top_logprobs", "an integer")?;
    if let Some(k) = top {
        if k > MAX_TOP_LOGPROBS as u64 {
            return Err(ApiError::field(
                "top_logprobs",
                "invalid_value",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}; got {k}"),
            ));
        }
        if !logprobs {
            return Err(ApiError::field(
                "top_logprobs",
                "invalid_value",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
    }
    let logprobs = logprobs.then_some(top.unwrap_or(0) as usize);
    let response_format = parse_response_format(f.raw("response_format"))?;
    let tools = parse_tools(
        f.raw("tools"),
        f.raw("tool_choice"),
        f.raw("parallel_tool_calls"),
    )?;
    for (name, why, none) in [
        ("functions", WHY_FUNCTIONS, json!([])),
        ("function_call", WHY_FUNCTION_CALL, json!("none")),
    ] {
        if let Some(v) = f.raw(name)
            && v != none
        {
            return Err(ApiError::field(
                name,
                "unsupported_value",
                format!("`{name}`: {why}"),
            ));
        }
    }
    if let Some(m) = f.raw("modalities")
        && m != json!(["text"])
    {
        return Err(ApiError::field(
            "modalities",
            "unsupported_value",
            format!("`modalities`: {WHY_MODALITIES}"),
        ));
    }
    f.finish()?;
    let format = st.tokenizer.tool_format.clone();
    let no_format = |param: &str| {
        ApiError::field(
            param,
            "unsupported_value",
            format!(
                "`{param}`: the served model's chat template has no tool-call format this server renders (supported: Qwen2.5/Qwen3 `<tool_call>` and Llama 3.1+ JSON); send no tools and no tool messages"
            ),
        )
    };
    if tools.active() && !matches!(response_format, ResponseFormat::Text) {
        return Err(ApiError::field(
            "response_format",
            "unsupported_value",
            "`response_format` together with callable `tools` is not supported: set tool_choice \"none\" or leave response_format out",
        ));
    }
    let prompt = if tools.active() || uses_tools {
        let Some(fmt) = &format else {
            return Err(no_format(if tools.active() { "tools" } else { "messages" }));
        };
        let listed: Vec<Value> = if tools.active() {
            tools.specs.iter().map(|s| s.raw.clone()).collect()
        } else {
            Vec::new()
        };
        let segs = crate::chat::render(fmt, &listed, &messages)
            .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        st.tokenizer.encode_segments(&segs)
    } else {
        let plain: Vec<ChatMessage> = messages
            .into_iter()
            .map(|t| ChatMessage {
                role: t.role,
                content: t.content,
            })
            .collect();
        st.tokenizer
            .encode_chat(&plain)
            .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?
    };
    let (grammar, tool_out) = match (&format, tools.active()) {
        (Some(fmt), true) => {
            let g = cached_grammar(st, format!("tools:{}", tools.cache_key()), || {
                tool_grammar(&tools, fmt, st.vocab.clone())
            })?;
            let names = tools.specs.iter().map(|s| s.name.clone()).collect();
            (
                Some(g),
                Some(ToolOut {
                    format: fmt.clone(),
                    names,
                }),
            )
        }
        _ => {
            let g = match response_format {
                ResponseFormat::Text => None,
                ResponseFormat::JsonObject => {
                    Some(cached_grammar(st, "json_object".into(), || {
                        Ok(Grammar::json_object(st.vocab.clone()))
                    })?)
                }
                ResponseFormat::Schema { schema, strict } => {
                    let key = format!("schema:{strict}:{schema}");
                    Some(cached_grammar(st, key, || {
                        Grammar::json_schema(
                            &schema,
                            strict,
                            st.vocab.clone(),
                            "response_format.json_schema.schema",
                        )
                        .map_err(|e| {
                            ApiError::field("response_format", "unsupported_value", e.to_string())
                        })
                    })?)
                }
            };
            (g, None)
        }
    };
    let mut parsed = finish_parse(st, common, prompt, logprobs, None, "messages")?;
    parsed.grammar = grammar;
    parsed.tools = tool_out;
    Ok(parsed)
}

/// Most compiled grammars kept for reuse by later requests with the same schema or tools.
const MAX_CACHED_GRAMMARS: usize = 16;

/// A compiled grammar from the server's small cache (most recently used first), or built.
fn cached_grammar(
    st: &Inner,
    key: String,
    build: impl FnOnce() -> Result<Grammar, ApiError>,
) -> Result<Arc<Grammar>, ApiError> {
    {
        let mut c = st.grammars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = c.iter().position(|(k, _)| *k == key) {
            let hit = c.remove(i);
            let g = hit.1.clone();
            c.insert(0, hit);
            return Ok(g);
        }
    }
    let g = Arc::new(build()?);
    let mut c = st.grammars.lock().unwrap_or_else(|p| p.into_inner());
    c.insert(0, (key, g.clone()));
    c.truncate(MAX_CACHED_GRAMMARS);
    Ok(g)
}

pub(super) fn parse_completion(st: &Inner, body: Map<String, Value>) -> Result<Parsed, ApiError> {
    check_field_names(Api::Completion, &body)?;
    let mut f = Fields(body);
    check_noop_fields(Api::Completion, &mut f)?;
    let vocab = st.tokenizer.vocab_size();
    let bad_prompt = |m: &str| ApiError::field("prompt", "invalid_value", m);
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    let (prompt, prompt_text) = match f.raw("prompt") {
        None => {
            return Err(bad_prompt(
                "`prompt` is required: a string or a list of token ids",
            ));
        }
        Some(Value::String(s)) => (st.tokenizer.encode(&s, false, true), s),
        Some(Value::Array(a)) => {
            let one = match a.as_slice() {
                [Value::String(s)] => Ok(s.clone()),
                [Value::Array(inner)] => Err(inner.clone()),
                [Value::Number(_), ..] => Err(a.clone()),
                [] => return Err(bad_prompt("`prompt` must not be empty")),
                _ => {
                    return Err(bad_prompt(
                        "only one prompt per request is supported: send a string, [string], a list of token ids or [[token ids]]; send several prompts as several requests",
                    ));
                }
            };
            match one {
                Ok(s) => (st.tokenizer.encode(&s, false, true), s),
                Err(list) => {
                    let Some(ids) = ids(&list) else {
                        return Err(bad_prompt(
                            "a token-id prompt must be a list of non-negative integers",
                        ));
                    };
                    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                        return Err(bad_prompt(&format!(
                            "prompt token id {bad} is outside this model's vocabulary (0..{vocab})"
                        )));
                    }
                    let text = st.tokenizer.decode(&ids);
                    (ids, text)
                }
            }
        }
        Some(_) => {
            return Err(ApiError::field(
                "prompt",
                "invalid_type",
                "`prompt` must be a string, [string], a list of token ids or [[token ids]]",
            ));
        }
    };
    if prompt.is_empty() {
        return Err(bad_prompt("`prompt` must not be empty"));
    }
    let common = parse_common(st, &mut f)?;
    let logprobs = match f.get::<u64>("logprobs", "an integer (0 to 20)")? {
        Some(k) if k > MAX_TOP_LOGPROBS as u64 => {
            return Err(ApiError::field(
                "logprobs",
                "invalid_value",
                format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}; got {k}"),
            ));
        }
        k => k.map(|k| k as usize),
    };
    let echo = f.get::<bool>("echo", "a boolean")?.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::field(
            "echo",
            "unsupported_value",
            "`echo` together with `logprobs` needs the prompt tokens' logprobs, which this server does not compute; drop one of them",
        ));
    }
    if let Some(b) = f.get::<u64>("best_of", "a positive integer")?
        && b != common.n as u64
    {
        return Err(ApiError::field(
            "best_of",
            "unsupported_value",
            format!("`best_of` is {b} and `n` is {}: {WHY_BEST_OF}", common.n),
        ));
    }
    if let Some(s) = f.get::<String>("suffix", "a string")?
        && !s.is_empty()
    {
        return Err(ApiError::field(
            "suffix",
            "unsupported_value",
            format!("`suffix`: {WHY_SUFFIX}"),
        ));
    }
    f.finish()?;
    finish_parse(
        st,
        common,
        prompt,
        logprobs,
        echo.then_some(prompt_text),
        "prompt",
    )
}

fn finish_parse(
    st: &Inner,
    common: Common,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
    echo: Option<String>,
    prompt_field: &str,
) -> Result<Parsed, ApiError> {
    if prompt.len() >= st.max_context {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {} tokens, but the prompt has {} tokens; shorten the prompt",
                st.max_context,
                prompt.len()
            ),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some(prompt_field.into()),
            retry_after: None,
        });
    }
    let room = st.max_context - prompt.len();
    let max_tokens = match common.max_tokens {
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(room),
        None => st.opts.default_max_tokens.min(room),
    };
    Ok(Parsed {
        prompt,
        params: SamplingParams {
            max_tokens,
            logprobs,
            ..common.params
        },
        n: common.n,
        stream: common.stream,
        include_usage: common.include_usage,
        scope: common.scope,
        echo,
        grammar: None,
        tools: None,
    })
}
