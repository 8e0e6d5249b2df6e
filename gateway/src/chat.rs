//! One streamed chat completion as a client sees it (shared by `host-launcher chat` and the
//! gateway's benchmarks): [`post_json_lines`] POSTs JSON over RA-TLS and hands the body over line
//! by line as it arrives; [`StreamFolder`] folds server-sent events into a [`ChatResult`] with
//! client-side timings (time to first token, decode tokens/s).

use std::time::{Duration, Instant};

use serde_json::Value;

/// Why a chat completion failed (the message says what to do next).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChatError(pub String);

type Result<T, E = ChatError> = std::result::Result<T, E>;

macro_rules! bail {
    ($($t:tt)*) => { return Err(ChatError(format!($($t)*))) };
}

/// What one chat completion produced, with client-side timings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatResult {
    pub model: String,
    pub reply: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Seconds from sending the request to the first content token.
    pub time_to_first_token_s: Option<f64>,
    /// Tokens after the first, per second of the time after the first.
    pub decode_tokens_per_s: Option<f64>,
    pub total_s: f64,
}

/// The endpoint URL for a base URL (`https://h:p`, `https://h:p/`, or any path under it).
pub fn completions_url(base: &str) -> Result<String> {
    let (scheme, rest) = base
        .split_once("://")
        .filter(|(s, _)| *s == "https")
        .ok_or_else(|| {
            ChatError(format!(
                "--url {base:?} must start with https:// (the agent speaks only RA-TLS; e.g. \
                 https://127.0.0.1:18443 as `host-launcher run` prints it)"
            ))
        })?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        bail!("--url {base:?} has no host:port");
    }
    Ok(format!("{scheme}://{host}/v1/chat/completions"))
}

/// Folds the server-sent-event lines of a streamed chat completion into a [`ChatResult`],
/// calling `on_text` with each piece of content as it arrives.
pub struct StreamFolder<'a> {
    started: Instant,
    first: Option<Instant>,
    result: ChatResult,
    on_text: Box<dyn FnMut(&str) + 'a>,
    done: bool,
}

impl<'a> StreamFolder<'a> {
    pub fn new(started: Instant, on_text: impl FnMut(&str) + 'a) -> Self {
        StreamFolder {
            started,
            first: None,
            result: ChatResult {
                model: String::new(),
                reply: String::new(),
                finish_reason: None,
                prompt_tokens: None,
                completion_tokens: None,
                time_to_first_token_s: None,
                decode_tokens_per_s: None,
                total_s: 0.0,
            },
            on_text: Box::new(on_text),
            done: false,
        }
    }

    /// Takes one line of the response body.
    pub fn line(&mut self, line: &str) -> Result<()> {
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            return Ok(()); // blank separators, comments, other SSE fields
        };
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| ChatError(format!("the worker sent an unreadable event ({e}): {data}")))?;
        if let Some(e) = v.get("error") {
            bail!(
                "the worker failed while generating: {}",
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
            );
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            self.result.model = m.to_owned();
        }
        let choice = &v["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str()
            && !t.is_empty()
        {
            if self.first.is_none() {
                self.first = Some(Instant::now());
            }
            self.result.reply.push_str(t);
            (self.on_text)(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.result.finish_reason = Some(f.to_owned());
        }
        // With include_usage every chunk has `usage: null` but the last one (no choices).
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.result.prompt_tokens = u["prompt_tokens"].as_u64();
            self.result.completion_tokens = u["completion_tokens"].as_u64();
        }
        Ok(())
    }

    /// The result, with timings taken now.
    pub fn finish(mut self) -> Result<ChatResult> {
        if !self.done {
            bail!("the worker closed the stream before [DONE]: see its console log");
        }
        let end = Instant::now();
        self.result.total_s = (end - self.started).as_secs_f64();
        if let Some(first) = self.first {
            self.result.time_to_first_token_s = Some((first - self.started).as_secs_f64());
            let after = (end - first).as_secs_f64();
            if let Some(n) = self.result.completion_tokens
                && n > 1
                && after > 0.0
            {
                self.result.decode_tokens_per_s = Some((n - 1) as f64 / after);
            }
        }
        Ok(self.result)
    }
}

/// The agent HTTP seam: POSTs `body` as JSON to `url` over RA-TLS (`client` checks the worker's
/// certificate on the handshake) and hands the response body to `on_line` line by line as it
/// arrives (server-sent events or one JSON document). Returns the HTTP status; a non-2xx
/// answer's message is returned in the error.
pub fn post_json_lines(
    client: &attestation::RaTlsHttpClient,
    url: &str,
    body: &Value,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<u16> {
    let mut pending: Vec<u8> = Vec::new();
    let mut sink = |piece: &[u8]| -> std::result::Result<(), String> {
        pending.extend_from_slice(piece);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line);
            on_line(text.trim_end_matches(['\r', '\n'])).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let resp = client
        .post_json_streaming(url, body.to_string().as_bytes(), timeout, &mut sink)
        .map_err(|e| match e {
            attestation::HttpError::Rejected(v) => ChatError(format!(
                "the worker at {url} did not verify, nothing was sent: {}",
                v.summary()
            )),
            e => ChatError(format!(
                "cannot talk to the worker at {url}: {e} (is `host-launcher run` still running?)"
            )),
        })?;
    let status = resp.status;
    if !(200..300).contains(&status) {
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        bail!("the worker answered HTTP {status}: {msg}");
    }
    if !pending.is_empty() {
        let text = String::from_utf8_lossy(&pending).into_owned();
        on_line(text.trim_end_matches('\r'))?;
    }
    Ok(status)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised() {
        for base in [
            "https://127.0.0.1:18443",
            "https://127.0.0.1:18443/",
            "https://127.0.0.1:18443/health",
        ] {
            assert_eq!(
                completions_url(base).unwrap(),
                "https://127.0.0.1:18443/v1/chat/completions"
            );
        }
        assert!(completions_url("127.0.0.1:18443").is_err());
        assert!(completions_url("https:///x").is_err());
        let e = completions_url("http://127.0.0.1:18443")
            .unwrap_err()
            .to_string();
        assert!(e.contains("RA-TLS"), "{e}");
    }

    #[test]
    fn stream_is_folded_into_a_result() {
        let mut seen = String::new();
        let mut f = StreamFolder::new(Instant::now(), |t| seen.push_str(t));
        for l in [
            r#"data: {"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            "",
            r#"data: {"model":"m","choices":[{"index":0,"delta":{"content":"Par"},"finish_reason":null}]}"#,
            r#"data: {"model":"m","choices":[{"index":0,"delta":{"content":"is"},"finish_reason":null}]}"#,
            r#"data: {"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":null}"#,
            r#"data: {"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
            "data: [DONE]",
        ] {
            f.line(l).unwrap();
        }
        let r = f.finish().unwrap();
        assert_eq!(seen, "Paris");
        assert_eq!(r.reply, "Paris");
        assert_eq!(r.model, "m");
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(5), Some(2)));
        assert!(r.time_to_first_token_s.is_some());
    }

    #[test]
    fn stream_errors_and_truncation_are_reported() {
        let mut f = StreamFolder::new(Instant::now(), |_| {});
        let e = f
            .line(r#"data: {"error":{"message":"out of context"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("out of context"), "{e}");
        let f = StreamFolder::new(Instant::now(), |_| {});
        assert!(f.finish().unwrap_err().to_string().contains("[DONE]"));
    }
}
