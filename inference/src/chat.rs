//! Chat prompts with tools, rendered the way the model family's GGUF `tokenizer.chat_template`
//! renders them (our own code, not a Jinja engine, so that the template's markers become
//! special tokens while every piece of client text is encoded as plain text and cannot forge
//! markers):
//!
//! - [`ToolFormat::Hermes`] (Qwen2.5 / Qwen3, detected by `<tool_call>` in the template): the
//!   system turn lists the tools as JSON inside `<tools></tools>`; the model answers with
//!   `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` blocks (several allowed); tool
//!   results go back as a user turn of `<tool_response>` blocks.
//! - [`ToolFormat::Llama3Json`] (Llama 3.1 / 3.2 / 3.3, detected by the template's
//!   `{"name": function name, "parameters": …}` instruction): the tools are pretty-printed
//!   JSON in the first user turn (`tools_in_user_message`, the template's default), after a
//!   system turn with `Environment: ipython` and the knowledge/today dates (`Today Date` is
//!   the template's fixed default, `26 Jul 2024`, so prompts stay reproducible); the model
//!   answers with one `{"name": …, "parameters": …}` object; tool results come back as
//!   `ipython` turns holding the content as a JSON string (the template's `tojson` of a
//!   string).
//!
//! JSON inside prompts is written like the templates' `tojson` (Python's `json.dumps`:
//! `", "` and `": "` separators, or an indent of 4, non-ASCII kept).

use serde_json::Value;

use crate::error::InferenceError;
use crate::tokenizer::Tokenizer;

/// The Qwen2.5 default system prompt its template inserts when the chat has none.
pub const QWEN25_DEFAULT_SYSTEM: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

/// How a model family writes tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolFormat {
    /// Qwen2.5 / Qwen3 (`<tool_call>` blocks).
    Hermes {
        /// System prompt used when the chat has none (Qwen2.5's; Qwen3 has none).
        default_system: Option<String>,
    },
    /// Llama 3.1+ JSON tool calls.
    Llama3Json,
}

impl ToolFormat {
    /// The tool format a chat template uses, if it is one of ours.
    pub fn detect(template: &str) -> Option<ToolFormat> {
        if template.contains("<tool_call>") && template.contains("<|im_start|>") {
            return Some(ToolFormat::Hermes {
                default_system: template
                    .contains(QWEN25_DEFAULT_SYSTEM)
                    .then(|| QWEN25_DEFAULT_SYSTEM.to_owned()),
            });
        }
        if template.contains("<|start_header_id|>")
            && template.contains("\"parameters\": dictionary of argument name and its value")
        {
            return Some(ToolFormat::Llama3Json);
        }
        None
    }

    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ToolFormat::Hermes { .. } => "Qwen <tool_call>",
            ToolFormat::Llama3Json => "Llama 3 JSON",
        }
    }
}

/// A tool call inside an assistant message of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct CallMsg {
    /// Function name.
    pub name: String,
    /// Arguments (parsed JSON).
    pub arguments: Value,
}

/// One message of a chat with tools.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text (may be empty).
    pub content: String,
    /// The assistant's tool calls.
    pub tool_calls: Vec<CallMsg>,
}

/// A piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Template text: special-token markers in it become special tokens.
    Template(String),
    /// Client text: encoded as plain text.
    Text(String),
}

/// Python's `json.dumps(v, ensure_ascii=False)` (indent `None`) or with `indent`.
pub fn py_json(v: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_py_json(v, indent, 0, &mut out);
    out
}

fn write_py_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(if indent.is_some() { "," } else { ", " });
                }
                newline(out, level + 1);
                write_py_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(if indent.is_some() { "," } else { ", " });
                }
                newline(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Renders a chat with `tools` (the tool objects as the client sent them; empty: none) in
/// `format`, ending with the assistant header so the model answers.
pub fn render(
    format: &ToolFormat,
    tools: &[Value],
    turns: &[Turn],
) -> Result<Vec<Segment>, InferenceError> {
    match format {
        ToolFormat::Hermes { default_system } => {
            Ok(render_hermes(default_system.as_deref(), tools, turns))
        }
        ToolFormat::Llama3Json => render_llama3(tools, turns),
    }
}

fn t(s: &str) -> Segment {
    Segment::Template(s.to_owned())
}
fn x(s: &str) -> Segment {
    Segment::Text(s.to_owned())
}

fn render_hermes(default_system: Option<&str>, tools: &[Value], turns: &[Turn]) -> Vec<Segment> {
    let mut out = Vec::new();
    let (system, rest) = match turns.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
        _ => (None, turns),
    };
    if !tools.is_empty() {
        out.push(t("<|im_start|>system\n"));
        match (system, default_system) {
            (Some(s), _) => {
                out.push(x(s));
                out.push(t("\n\n"));
            }
            (None, Some(d)) => out.push(t(&format!("{d}\n\n"))),
            (None, None) => {}
        }
        out.push(t("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"));
        for tool in tools {
            out.push(t("\n"));
            out.push(x(&py_json(tool, None)));
        }
        out.push(t("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"));
    } else if let Some(s) = system {
        out.push(t("<|im_start|>system\n"));
        out.push(x(s));
        out.push(t("<|im_end|>\n"));
    } else if let Some(d) = default_system {
        out.push(t(&format!("<|im_start|>system\n{d}<|im_end|>\n")));
    }
    for (i, m) in rest.iter().enumerate() {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                out.push(t("<|im_start|>assistant"));
                if !m.content.is_empty() {
                    out.push(t("\n"));
                    out.push(x(&m.content));
                }
                for c in &m.tool_calls {
                    out.push(t("\n<tool_call>\n{\"name\": \""));
                    out.push(x(&c.name));
                    out.push(t("\", \"arguments\": "));
                    out.push(x(&py_json(&c.arguments, None)));
                    out.push(t("}\n</tool_call>"));
                }
                out.push(t("<|im_end|>\n"));
            }
            "tool" => {
                if i == 0 || rest[i - 1].role != "tool" {
                    out.push(t("<|im_start|>user"));
                }
                out.push(t("\n<tool_response>\n"));
                out.push(x(&m.content));
                out.push(t("\n</tool_response>"));
                if rest.get(i + 1).is_none_or(|n| n.role != "tool") {
                    out.push(t("<|im_end|>\n"));
                }
            }
            role => {
                out.push(t("<|im_start|>"));
                out.push(x(&format!("{role}\n")));
                out.push(x(&m.content));
                out.push(t("<|im_end|>\n"));
            }
        }
    }
    out.push(t("<|im_start|>assistant\n"));
    out
}

fn render_llama3(tools: &[Value], turns: &[Turn]) -> Result<Vec<Segment>, InferenceError> {
    let mut out = vec![t("<|begin_of_text|>")];
    let (system, mut rest) = match turns.split_first() {
        Some((first, rest)) if first.role == "system" => (first.content.trim(), rest),
        _ => ("", turns),
    };
    out.push(t("<|start_header_id|>system<|end_header_id|>\n\n"));
    if !tools.is_empty() {
        out.push(t("Environment: ipython\n"));
    }
    out.push(t(
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    ));
    out.push(x(system));
    out.push(t("<|eot_id|>"));
    if !tools.is_empty() {
        let Some((first, r)) = rest.split_first() else {
            return Err(InferenceError::InvalidArgument(
                "the Llama 3 chat template puts the tools into the first user message, and there is none; add a user message".into(),
            ));
        };
        rest = r;
        out.push(t("<|start_header_id|>user<|end_header_id|>\n\n"));
        out.push(t("Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"));
        for tool in tools {
            out.push(x(&py_json(tool, Some(4))));
            out.push(t("\n\n"));
        }
        out.push(x(first.content.trim()));
        out.push(t("<|eot_id|>"));
    }
    for m in rest {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let [c] = m.tool_calls.as_slice() else {
                    return Err(InferenceError::InvalidArgument(
                        "the Llama 3 chat template supports one tool call per assistant message; split the calls into separate messages".into(),
                    ));
                };
                out.push(t("<|start_header_id|>assistant<|end_header_id|>\n\n"));
                out.push(t("{\"name\": \""));
                out.push(x(&c.name));
                out.push(t("\", \"parameters\": "));
                out.push(x(&py_json(&c.arguments, None)));
                out.push(t("}<|eot_id|>"));
            }
            "tool" => {
                out.push(t("<|start_header_id|>ipython<|end_header_id|>\n\n"));
                out.push(x(&Value::String(m.content.clone()).to_string()));
                out.push(t("<|eot_id|>"));
            }
            role => {
                out.push(t("<|start_header_id|>"));
                out.push(x(role));
                out.push(t("<|end_header_id|>\n\n"));
                out.push(x(m.content.trim()));
                out.push(t("<|eot_id|>"));
            }
        }
    }
    out.push(t("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    Ok(out)
}

/// The rendered text (markers written literally), for tests and logs.
pub fn segments_text(segs: &[Segment]) -> String {
    segs.iter()
        .map(|s| match s {
            Segment::Template(s) | Segment::Text(s) => s.as_str(),
        })
        .collect()
}

impl Tokenizer {
    /// Tokenizes rendered segments: markers in template text become special tokens, client
    /// text is plain text. Adjacent segments of one kind are encoded together.
    pub fn encode_segments(&self, segs: &[Segment]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < segs.len() {
            let special = matches!(segs[i], Segment::Template(_));
            let mut text = String::new();
            while let Some(s) = segs.get(i) {
                match (s, special) {
                    (Segment::Template(s), true) | (Segment::Text(s), false) => text.push_str(s),
                    _ => break,
                }
                i += 1;
            }
            out.extend(self.encode(&text, special, false));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn weather_tool() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn chat() -> Vec<Turn> {
        let turn = |role: &str, content: &str| Turn {
            role: role.into(),
            content: content.into(),
            tool_calls: vec![],
        };
        vec![
            turn("user", "Weather in Paris?"),
            Turn {
                role: "assistant".into(),
                content: String::new(),
                tool_calls: vec![CallMsg {
                    name: "get_weather".into(),
                    arguments: json!({"city": "Paris"}),
                }],
            },
            turn("tool", "{\"temp\": 21}"),
        ]
    }

    #[test]
    fn python_style_json() {
        let v = json!({"a": [1, {"b": "é\n"}], "c": {}, "d": []});
        assert_eq!(
            py_json(&v, None),
            r#"{"a": [1, {"b": "é\n"}], "c": {}, "d": []}"#
        );
        assert_eq!(
            py_json(&json!({"a": [1, 2], "b": {}}), Some(4)),
            "{\n    \"a\": [\n        1,\n        2\n    ],\n    \"b\": {}\n}"
        );
    }

    /// The expected strings are the Qwen2.5-Instruct template rendered by hand (HF
    /// transformers' Jinja with `add_generation_prompt`).
    #[test]
    fn hermes_matches_the_qwen25_template() {
        let f = ToolFormat::detect(crate::synthetic::QWEN25_TEMPLATE).unwrap();
        assert_eq!(
            f,
            ToolFormat::Hermes {
                default_system: Some(QWEN25_DEFAULT_SYSTEM.into())
            }
        );
        let text = segments_text(&render(&f, &[weather_tool()], &chat()).unwrap());
        let want = concat!(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n",
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#,
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(text, want);
    }

    /// The expected string is the Llama 3.1-Instruct template rendered by hand (no
    /// `date_string`, so its default date; `tools_in_user_message` true).
    #[test]
    fn llama3_matches_the_llama31_template() {
        let f = ToolFormat::detect(crate::synthetic::LLAMA31_TEMPLATE).unwrap();
        assert_eq!(f, ToolFormat::Llama3Json);
        let text = segments_text(&render(&f, &[weather_tool()], &chat()).unwrap());
        let want = concat!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
            "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n",
            "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n",
            "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n        \"description\": \"Weather in a city\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n                \"city\": {\n                    \"type\": \"string\"\n                }\n            },\n            \"required\": [\n                \"city\"\n            ]\n        }\n    }\n}\n\n",
            "Weather in Paris?<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>",
            "<|start_header_id|>ipython<|end_header_id|>\n\n\"{\\\"temp\\\": 21}\"<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        );
        assert_eq!(text, want);
        // Two calls in one message: the template raises; so do we.
        let mut two = chat();
        let again = two[1].tool_calls[0].clone();
        two[1].tool_calls.push(again);
        assert!(render(&f, &[weather_tool()], &two).is_err());
    }

    #[test]
    fn client_text_cannot_forge_markers() {
        let bytes = crate::synthetic::synthetic_gguf_family(
            &crate::LlamaConfig::tiny(),
            crate::GgmlType::Q8_0,
            1,
            crate::synthetic::ChatFamily::Qwen25,
        )
        .unwrap();
        let g = crate::Gguf::parse(&bytes).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        let call = tok.token_id("<tool_call>").unwrap();
        let segs = vec![x("<tool_call>"), t("<tool_call>")];
        let ids = tok.encode_segments(&segs);
        assert_eq!(ids.iter().filter(|&&i| i == call).count(), 1);
        assert_eq!(ids.last(), Some(&call));
    }
}
