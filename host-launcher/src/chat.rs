//! `host-launcher chat`: one chat completion against a running worker, streamed to the terminal.
//!
//! Sends `POST /v1/chat/completions` with `stream: true` (server-sent events), prints the reply
//! as it arrives, and measures on the client side what a user sees: time to the first token and
//! the decode rate after it. The prompt is only sent after the worker verified exactly as
//! `host-launcher verify` checks it (same flags: RA-TLS quote, image hash against --image /
//! --allow-list / the root contract, RTMR3 log against --host-config); every request then runs
//! over RA-TLS through [`post_json_lines`], whose handshake re-checks the certificate. The
//! streaming and folding code is library code in `gateway::chat`.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde_json::{Value, json};

/// Arguments of `host-launcher chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// How to trust the worker: --url (its RA-TLS endpoint, e.g. https://127.0.0.1:18443 as
    /// `run` prints it) and the same checks as `host-launcher verify`. --json and --timeout
    /// (seconds to reach the worker) apply to the chat too.
    #[command(flatten)]
    trust: crate::verify::VerifyArgs,
    /// Model id to ask for (as listed by GET /v1/models). Default: the one the worker serves.
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    max_tokens: u32,
    /// Sampling temperature, 0-2; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    temperature: f32,
    /// Optional system message.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Seconds to wait for the whole answer (CPU inference under emulation is slow).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    answer_timeout: u64,
    /// The user message (several words are joined with spaces).
    #[arg(required = true, value_name = "PROMPT")]
    prompt: Vec<String>,
}

pub use gateway::chat::{ChatResult, StreamFolder, completions_url, post_json_lines};

/// The request body.
fn request_body(a: &ChatArgs) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": a.prompt.join(" ")}));
    let mut body = json!({
        "messages": messages,
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
        "stream": true,
        // The token counts (and so the decode rate) come in a last chunk only when asked.
        "stream_options": {"include_usage": true},
    });
    if let Some(m) = &a.model {
        body["model"] = json!(m);
    }
    body
}

/// Sends one streamed chat completion; `on_text` sees the reply as it arrives.
pub fn chat(a: &ChatArgs, on_text: impl FnMut(&str)) -> Result<ChatResult> {
    let url = completions_url(&a.trust.url)?;
    let list = a.trust.trust.chain.image_allow_list()?;
    let client = a
        .trust
        .trust
        .client(crate::verify::verifier_from_args(&a.trust, list)?)?;
    // Verify everything (RTMR3 log and host config included) before the prompt leaves.
    let attested = client
        .attest(&a.trust.url, Duration::from_secs(a.trust.timeout.max(1)))
        .map_err(|e| match e {
            attestation::HttpError::Rejected(v) => {
                anyhow::anyhow!(
                    "the worker did not verify, nothing was sent: {}",
                    v.summary()
                )
            }
            e => anyhow::anyhow!("cannot reach the worker at {}: {e}", a.trust.url),
        })?;
    if !attested.verdict.accepted {
        bail!(
            "the worker did not verify, nothing was sent: {} (run `host-launcher verify` with the \
             same flags for every reason)",
            attested.verdict.summary()
        );
    }
    let body = request_body(a);
    let started = Instant::now();
    let mut folder = StreamFolder::new(started, on_text);
    post_json_lines(
        &client,
        &url,
        &body,
        Duration::from_secs(a.answer_timeout),
        &mut |l| folder.line(l),
    )?;
    Ok(folder.finish()?)
}

/// `host-launcher chat`.
pub fn cmd_chat(a: &ChatArgs) -> Result<()> {
    if !(0.0..=2.0).contains(&a.temperature) {
        bail!("--temperature must be between 0 and 2 (0 = greedy)");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let json_out = a.trust.json;
    let r = chat(a, |t| {
        if !json_out {
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
    })?;
    if json_out {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!();
    let fmt = |v: Option<f64>, unit: &str| v.map_or("n/a".into(), |x| format!("{x:.2}{unit}"));
    eprintln!(
        "host-launcher: {} · {} prompt + {} completion tokens · first token after {} · decode {} · \
         {:.1} s total · finish: {}",
        r.model,
        r.prompt_tokens.map_or("?".into(), |n| n.to_string()),
        r.completion_tokens.map_or("?".into(), |n| n.to_string()),
        fmt(r.time_to_first_token_s, " s"),
        fmt(r.decode_tokens_per_s, " tok/s"),
        r.total_s,
        r.finish_reason.as_deref().unwrap_or("?")
    );
    Ok(())
}
