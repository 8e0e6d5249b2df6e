//! Server-sent events from a worker, checked event by event as they pass through the gateway.
//!
//! [`SseParser::push`] splits the bytes into complete events (blank-line separated), keeps each
//! event's exact bytes (the gateway forwards them untouched) and classifies it: `[DONE]`, an
//! error event (`{"error": ...}`), an event carrying output (a first token), or anything else (the
//! role chunk, the usage chunk, comments). A `data:` payload that is neither `[DONE]` nor JSON, an
//! event larger than [`MAX_EVENT`] or bytes after `[DONE]` are [`SseError`]s: the gateway then
//! ends the client's stream with an error event instead of passing garbage on.
//! [`SseParser::finish`] at the end of the body says whether the stream was complete.

use serde_json::Value;

/// Largest single event accepted from a worker.
pub const MAX_EVENT: usize = 1 << 20;

/// What one event is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// `data: [DONE]`: the stream is complete.
    Done,
    /// `data: {"error": {...}}`: the worker reports a failure (its message).
    Error(String),
    /// A chunk with output: text, a tool call or a finish reason.
    Output,
    /// Anything else (role chunk, usage chunk, comment).
    Other,
}

/// A malformed stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A `data:` payload that is not JSON.
    #[error("the worker sent an event that is not JSON: {0}")]
    NotJson(String),
    /// An event too large.
    #[error("the worker sent an event larger than {MAX_EVENT} bytes")]
    TooLarge,
    /// Data after `[DONE]`.
    #[error("the worker sent data after [DONE]")]
    AfterDone,
    /// The body ended before `[DONE]`.
    #[error("the worker's stream ended before [DONE]")]
    Truncated,
    /// Bytes that are not UTF-8.
    #[error("the worker sent an event that is not UTF-8")]
    NotUtf8,
}

/// Splits and checks a worker's event stream.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    done: bool,
}

fn is_output(v: &Value) -> bool {
    v["choices"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            let nonempty = |x: &Value| x.as_str().is_some_and(|s| !s.is_empty());
            nonempty(&c["delta"]["content"])
                || nonempty(&c["text"])
                || c["delta"]["tool_calls"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                || !c["finish_reason"].is_null()
        })
    })
}

/// Classify one complete event (without its trailing blank line).
pub fn classify(event: &[u8]) -> Result<EventKind, SseError> {
    let text = std::str::from_utf8(event).map_err(|_| SseError::NotUtf8)?;
    let mut data = String::new();
    let mut has_data = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(d) = line.strip_prefix("data:") {
            if has_data {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
            has_data = true;
        }
    }
    if !has_data {
        return Ok(EventKind::Other);
    }
    if data.trim() == "[DONE]" {
        return Ok(EventKind::Done);
    }
    let v: Value = serde_json::from_str(&data).map_err(|_| {
        let mut shown: String = data.chars().take(200).collect();
        if shown.len() < data.len() {
            shown.push('…');
        }
        SseError::NotJson(shown)
    })?;
    if let Some(e) = v.get("error") {
        let msg = e["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| e.to_string());
        return Ok(EventKind::Error(msg));
    }
    Ok(if is_output(&v) {
        EventKind::Output
    } else {
        EventKind::Other
    })
}

/// Finds the end of the first event in `b`: (end of the event, start of the next).
fn boundary(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            if b[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `[DONE]` was seen.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes the next bytes; returns the complete events in them (exact bytes including the
    /// separator, and their kind).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<(Vec<u8>, EventKind)>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, next)) = boundary(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..next).collect();
            let event = &raw[..end];
            if event.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            if self.done {
                return Err(SseError::AfterDone);
            }
            let kind = classify(event)?;
            if kind == EventKind::Done {
                self.done = true;
            }
            out.push((raw, kind));
        }
        if self.buf.len() > MAX_EVENT {
            return Err(SseError::TooLarge);
        }
        Ok(out)
    }

    /// The body ended: complete only after `[DONE]` with nothing left over.
    pub fn finish(&self) -> Result<(), SseError> {
        if !self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(if self.done {
                SseError::AfterDone
            } else {
                SseError::Truncated
            });
        }
        if self.done {
            Ok(())
        } else {
            Err(SseError::Truncated)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ROLE: &str = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
    const TOKEN: &str =
        r#"data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
    const TEXT: &str = r#"data: {"choices":[{"index":0,"text":" a","finish_reason":null}]}"#;

    #[test]
    fn events_are_split_across_reads_and_classified() {
        let stream = format!("{ROLE}\n\n{TOKEN}\n\n: keep-alive\n\n{TEXT}\n\ndata: [DONE]\n\n");
        let mut p = SseParser::new();
        let mut kinds = Vec::new();
        let mut bytes = Vec::new();
        // One byte at a time: boundaries inside any read.
        for b in stream.as_bytes() {
            for (raw, k) in p.push(std::slice::from_ref(b)).unwrap() {
                bytes.extend_from_slice(&raw);
                kinds.push(k);
            }
        }
        assert_eq!(
            kinds,
            [
                EventKind::Other,
                EventKind::Output,
                EventKind::Other,
                EventKind::Output,
                EventKind::Done
            ]
        );
        assert_eq!(bytes, stream.as_bytes(), "forwarded byte for byte");
        p.finish().unwrap();
    }

    #[test]
    fn errors_garbage_and_truncation_are_reported() {
        assert_eq!(
            classify(br#"data: {"error":{"message":"boom"}}"#).unwrap(),
            EventKind::Error("boom".into())
        );
        assert!(matches!(
            classify(b"data: {not json"),
            Err(SseError::NotJson(_))
        ));
        assert_eq!(classify(b"data: \xff"), Err(SseError::NotUtf8));
        let mut p = SseParser::new();
        p.push(format!("{TOKEN}\n\n").as_bytes()).unwrap();
        assert_eq!(p.finish(), Err(SseError::Truncated));
        p.push(b"data: [DONE]\n\n").unwrap();
        p.finish().unwrap();
        assert_eq!(p.push(TOKEN.as_bytes()).unwrap(), vec![]);
        assert_eq!(p.finish(), Err(SseError::AfterDone));
        let mut p = SseParser::new();
        assert_eq!(
            p.push(&vec![b'x'; MAX_EVENT + 1]).unwrap_err(),
            SseError::TooLarge
        );
        // CRLF separators work too.
        let mut p = SseParser::new();
        let got = p.push(b"data: [DONE]\r\n\r\n").unwrap();
        assert_eq!(got[0].1, EventKind::Done);
        // A finish reason without text counts as output (a stop before any text).
        assert_eq!(
            classify(br#"data: {"choices":[{"delta":{},"finish_reason":"stop"}]}"#).unwrap(),
            EventKind::Output
        );
    }
}
