//! Tool calls: the request's `tools` / `tool_choice` / `parallel_tool_calls`, the grammar
//! that enforces a call (`required`, a named function) or only shapes one once the model
//! starts it (`auto`), the model output parsed into `message.tool_calls`, and the hold-back
//! that streams text as `delta.content` and calls as `delta.tool_calls`.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::ApiError;
use crate::chat::ToolFormat;
use crate::grammar::{Grammar, GrammarBuilder, NodeId, VocabIndex};

/// Most tools per request.
pub const MAX_TOOLS: usize = 128;
/// Most tool calls one answer may hold (`parallel_tool_calls`; Llama 3 formats allow one).
pub const MAX_PARALLEL_CALLS: u32 = 8;

/// One function tool.
#[derive(Debug, Clone)]
pub(super) struct ToolSpec {
    pub name: String,
    /// The tool object as rendered into the prompt (`{"type": "function", "function": …}`).
    pub raw: Value,
    pub parameters: Value,
    pub strict: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tool part of a request.
#[derive(Debug, Clone)]
pub(super) struct ToolRequest {
    pub specs: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl ToolRequest {
    /// Whether the model may call tools (there are tools and the choice is not `none`).
    pub fn active(&self) -> bool {
        !self.specs.is_empty() && self.choice != ToolChoice::None
    }

    /// A stable key for the grammar cache.
    pub fn cache_key(&self) -> String {
        let tools: Vec<&Value> = self.specs.iter().map(|s| &s.raw).collect();
        json!({"tools": tools, "choice": format!("{:?}", self.choice), "parallel": self.parallel})
            .to_string()
    }
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::field(param, "invalid_value", msg)
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses `tools`, `tool_choice` and `parallel_tool_calls` (all optional).
pub(super) fn parse_tools(
    tools: Option<Value>,
    choice: Option<Value>,
    parallel: Option<Value>,
) -> Result<ToolRequest, ApiError> {
    let list = match tools {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::field(
                "tools",
                "invalid_type",
                "`tools` must be an array of {\"type\": \"function\", \"function\": {...}} objects",
            ));
        }
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(
            "tools",
            format!(
                "`tools` has {} entries; at most {MAX_TOOLS} are supported",
                list.len()
            ),
        ));
    }
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(list.len());
    for (i, t) in list.into_iter().enumerate() {
        let Value::Object(t) = t else {
            return Err(bad("tools", format!("tools[{i}] must be an object")));
        };
        for k in t.keys() {
            if k != "type" && k != "function" {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].{k} is not supported (fields: type, function)"),
                ));
            }
        }
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(
                "tools",
                format!("tools[{i}].type must be \"function\" (the only tool type supported)"),
            ));
        }
        let Some(Value::Object(f)) = t.get("function") else {
            return Err(bad(
                "tools",
                format!("tools[{i}].function must be an object with name, description, parameters"),
            ));
        };
        for k in f.keys() {
            if !["name", "description", "parameters", "strict"].contains(&k.as_str()) {
                return Err(bad(
                    "tools",
                    format!(
                        "tools[{i}].function.{k} is not supported (fields: name, description, parameters, strict)"
                    ),
                ));
            }
        }
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(bad(
                "tools",
                format!(
                    "tools[{i}].function.name {name:?} must be 1 to 64 letters, digits, underscores or dashes"
                ),
            ));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(bad(
                "tools",
                format!(
                    "tools[{i}]: the function name {name:?} is used twice; names must be unique"
                ),
            ));
        }
        if f.get("description").is_some_and(|d| !d.is_string()) {
            return Err(bad(
                "tools",
                format!("tools[{i}].function.description must be a string"),
            ));
        }
        let strict = match f.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function.strict must be a boolean"),
                ));
            }
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => {
                json!({"type": "object", "properties": {}, "additionalProperties": false})
            }
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                ));
            }
        };
        let mut raw_fn = Map::new();
        for k in ["name", "description", "parameters", "strict"] {
            if let Some(v) = f.get(k).filter(|v| !v.is_null()) {
                raw_fn.insert(k.to_owned(), v.clone());
            }
        }
        specs.push(ToolSpec {
            name: name.to_owned(),
            raw: json!({"type": "function", "function": raw_fn}),
            parameters,
            strict,
        });
    }
    let choice = match choice {
        None => {
            if specs.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!(
                        "`tool_choice` {other:?} is not one of \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) => ToolChoice::Named(n.to_owned()),
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "a named `tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": \"NAME\"}}",
                    ));
                }
            }
        }
        Some(_) => {
            return Err(ApiError::field(
                "tool_choice",
                "invalid_type",
                "`tool_choice` must be a string or an object",
            ));
        }
    };
    match &choice {
        ToolChoice::Required if specs.is_empty() => {
            return Err(bad(
                "tool_choice",
                "`tool_choice` \"required\" needs `tools`",
            ));
        }
        ToolChoice::Named(n) if !specs.iter().any(|s| &s.name == n) => {
            let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(bad(
                "tool_choice",
                format!(
                    "`tool_choice` names the function {n:?}, which is not in `tools` (functions: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        _ => {}
    }
    let parallel = match parallel {
        None => true,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ApiError::field(
                "parallel_tool_calls",
                "invalid_type",
                "`parallel_tool_calls` must be a boolean",
            ));
        }
    };
    Ok(ToolRequest {
        specs,
        choice,
        parallel,
    })
}

/// The grammar of the answer for an active tool request in `format`.
pub(super) fn tool_grammar(
    req: &ToolRequest,
    format: &ToolFormat,
    vocab: Arc<VocabIndex>,
) -> Result<Grammar, ApiError> {
    let mut b = GrammarBuilder::new();
    let allowed: Vec<(usize, &ToolSpec)> = req
        .specs
        .iter()
        .enumerate()
        .filter(|(_, s)| match &req.choice {
            ToolChoice::Named(n) => &s.name == n,
            _ => true,
        })
        .collect();
    let mut args: Vec<(String, NodeId)> = Vec::new();
    for (i, s) in &allowed {
        let node = b
            .schema(
                &s.parameters,
                s.strict,
                &format!("tools[{i}].function.parameters"),
            )
            .map_err(|e| {
                ApiError::field(
                    "tools",
                    "unsupported_value",
                    format!("{e} (tool-call arguments are generated under this schema)"),
                )
            })?;
        args.push((s.name.clone(), node));
    }
    let forced = req.choice != ToolChoice::Auto;
    let root = match format {
        ToolFormat::Hermes { .. } => {
            let max = if req.parallel && !matches!(req.choice, ToolChoice::Named(_)) {
                MAX_PARALLEL_CALLS
            } else {
                1
            };
            let close = b.literal(b"}\n</tool_call>");
            let branches: Vec<(Vec<u8>, NodeId)> = args
                .iter()
                .map(|(name, a)| {
                    let rest = b.seq(vec![*a, close]);
                    (
                        format!("{{\"name\": \"{name}\", \"arguments\": ").into_bytes(),
                        rest,
                    )
                })
                .collect();
            let body = b.switch(&branches);
            let open = b.literal(b"<tool_call>\n");
            let call = b.seq(vec![open, body]);
            let nl = b.literal(b"\n");
            let more = b.seq(vec![nl, call]);
            if forced {
                b.repeat(call, more, 1, max)
            } else {
                let nl = b.literal(b"\n");
                let rest = b.repeat(more, more, 0, max - 1);
                let after = b.seq(vec![nl, body, rest]);
                b.free_until(b"<tool_call>", true, after)
            }
        }
        ToolFormat::Llama3Json => {
            let close = b.literal(b"}");
            let prefix = if forced { "{\"name\": \"" } else { "" };
            let branches: Vec<(Vec<u8>, NodeId)> = args
                .iter()
                .map(|(name, a)| {
                    let rest = b.seq(vec![*a, close]);
                    (
                        format!("{prefix}{name}\", \"parameters\": ").into_bytes(),
                        rest,
                    )
                })
                .collect();
            let body = b.switch(&branches);
            if forced {
                body
            } else {
                b.free_until(b"{\"name\": \"", false, body)
            }
        }
    };
    Ok(b.build(root, vocab))
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ToolCall {
    pub name: String,
    /// The arguments as a JSON string (as OpenAI returns them).
    pub arguments: String,
}

fn parse_call(v: &Value, names: &[String], key: &str) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?;
    if !names.iter().any(|n| n == name) {
        return None;
    }
    let args = v.get(key).or_else(|| v.get("arguments"))?;
    if !args.is_object() {
        return None;
    }
    Some(ToolCall {
        name: name.to_owned(),
        arguments: args.to_string(),
    })
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const LLAMA_TRIGGER: &str = "{\"name\": \"";

/// Splits an answer into text content and tool calls. An answer whose calls do not all parse
/// (cut off by `max_tokens`) is returned as text only.
pub(super) fn parse_output(
    format: &ToolFormat,
    names: &[String],
    text: &str,
) -> (Option<String>, Vec<ToolCall>) {
    let as_text = || (Some(text.to_owned()), Vec::new());
    match format {
        ToolFormat::Hermes { .. } => {
            let Some(start) = text.find(HERMES_OPEN) else {
                return as_text();
            };
            let mut calls = Vec::new();
            let mut rest = &text[start..];
            while let Some(r) = rest.strip_prefix(HERMES_OPEN) {
                // One JSON value, then the closing tag (a string inside may hold the tags).
                let mut values = serde_json::Deserializer::from_str(r).into_iter::<Value>();
                let Some(Ok(v)) = values.next() else {
                    return as_text();
                };
                let Some(after) = r[values.byte_offset()..]
                    .trim_start()
                    .strip_prefix(HERMES_CLOSE)
                else {
                    return as_text();
                };
                match parse_call(&v, names, "arguments") {
                    Some(c) => calls.push(c),
                    None => return as_text(),
                }
                rest = after.trim_start();
            }
            if !rest.trim().is_empty() {
                return as_text();
            }
            let content = text[..start].trim_end();
            ((!content.is_empty()).then(|| content.to_owned()), calls)
        }
        ToolFormat::Llama3Json => {
            if !text.starts_with(LLAMA_TRIGGER) {
                return as_text();
            }
            match serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| parse_call(&v, names, "parameters"))
            {
                Some(c) => (None, vec![c]),
                None => as_text(),
            }
        }
    }
}

/// Streaming: passes text through as content until a tool call may be starting, then holds
/// everything back until the end.
#[derive(Debug)]
pub(super) struct ToolStream {
    format: ToolFormat,
    buf: String,
    sent: usize,
    calls: bool,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> Self {
        ToolStream {
            format,
            buf: String::new(),
            sent: 0,
            calls: false,
        }
    }

    /// Adds generated text; returns the text that can be sent as content now.
    pub fn push(&mut self, text: &str) -> String {
        self.buf.push_str(text);
        if self.calls {
            return String::new();
        }
        let upto = match &self.format {
            ToolFormat::Hermes { .. } => {
                let pending = &self.buf[self.sent..];
                if let Some(i) = pending.find(HERMES_OPEN) {
                    self.calls = true;
                    self.sent + pending[..i].trim_end().len()
                } else {
                    // Hold back a possible start of the trigger and trailing whitespace.
                    let mut hold = (1..HERMES_OPEN.len().min(pending.len() + 1))
                        .rev()
                        .find(|&k| pending.ends_with(&HERMES_OPEN[..k]))
                        .unwrap_or(0);
                    let kept = &pending[..pending.len() - hold];
                    hold += kept.len() - kept.trim_end().len();
                    self.buf.len() - hold
                }
            }
            ToolFormat::Llama3Json => {
                if self.sent == 0 && LLAMA_TRIGGER.starts_with(self.buf.as_str()) {
                    0
                } else if self.sent == 0 && self.buf.starts_with(LLAMA_TRIGGER) {
                    self.calls = true;
                    0
                } else {
                    self.buf.len()
                }
            }
        };
        let upto = upto.max(self.sent);
        let out = self.buf[self.sent..upto].to_owned();
        self.sent = upto;
        out
    }

    /// At the end: the remaining content and the calls of the whole answer.
    pub fn finish(&mut self, names: &[String]) -> (String, Vec<ToolCall>) {
        let (_, calls) = parse_output(&self.format, names, &self.buf);
        if calls.is_empty() {
            let rest = self.buf[self.sent..].to_owned();
            self.sent = self.buf.len();
            (rest, calls)
        } else {
            (String::new(), calls)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    #[test]
    fn hermes_output_parsing() {
        let f = ToolFormat::Hermes {
            default_system: None,
        };
        let two = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let (content, calls) = parse_output(&f, &names(), two);
        assert_eq!(content, None);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        // A string argument may hold the closing tag.
        let tricky = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"s\": \"</tool_call> <tool_call>\"}}\n</tool_call>";
        let (_, calls) = parse_output(&f, &names(), tricky);
        assert_eq!(calls[0].arguments, r#"{"s":"</tool_call> <tool_call>"}"#);
        let (content, calls) = parse_output(&f, &names(), &format!("Let me check.\n{two}"));
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        // Cut off, unknown function, plain text: text only.
        for t in [
            "<tool_call>\n{\"name\": \"add\", \"argu",
            "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>",
            "just text",
        ] {
            let (content, calls) = parse_output(&f, &names(), t);
            assert_eq!(content.as_deref(), Some(t));
            assert!(calls.is_empty());
        }
    }

    #[test]
    fn llama_output_parsing() {
        let f = ToolFormat::Llama3Json;
        let (c, calls) = parse_output(
            &f,
            &names(),
            "{\"name\": \"add\", \"parameters\": {\"a\": 2}}",
        );
        assert_eq!(c, None);
        assert_eq!(calls[0].arguments, r#"{"a":2}"#);
        let (c, calls) = parse_output(&f, &names(), "{\"x\": 1}");
        assert_eq!(c.as_deref(), Some("{\"x\": 1}"));
        assert!(calls.is_empty());
    }

    #[test]
    fn streaming_holds_back_a_possible_call() {
        let f = ToolFormat::Hermes {
            default_system: None,
        };
        let mut s = ToolStream::new(f.clone());
        assert_eq!(s.push("Hello <tool"), "Hello");
        assert_eq!(s.push("box> x "), " <toolbox> x");
        assert_eq!(s.push("<tool_call>\n{\"name\": \"add\", "), "");
        assert_eq!(s.push("\"arguments\": {}}\n</tool_call>"), "");
        let (rest, calls) = s.finish(&names());
        assert_eq!(rest, "");
        assert_eq!(calls.len(), 1);
        // No call after all: the held text comes out at the end.
        let mut s = ToolStream::new(f);
        assert_eq!(s.push("a <tool_"), "a");
        let (rest, calls) = s.finish(&names());
        assert_eq!(rest, " <tool_");
        assert!(calls.is_empty());
        let mut s = ToolStream::new(ToolFormat::Llama3Json);
        assert_eq!(s.push("{\"na"), "");
        assert_eq!(s.push("me\": \"add\", \"parameters\": {}}"), "");
        assert_eq!(s.finish(&names()).1.len(), 1);
        let mut s = ToolStream::new(ToolFormat::Llama3Json);
        assert_eq!(s.push("{\"x"), "{\"x");
        assert_eq!(s.push("\": 1}"), "\": 1}");
    }
}
