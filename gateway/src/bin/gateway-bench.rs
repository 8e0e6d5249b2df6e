//! `gateway-bench`: what the gateway adds, side by side in one run (started by
//! `cargo xtask bench gateway`, which launches a release `guest-agent` and `gateway`).
//!
//! For the same greedy requests, alternating the order each round, it measures:
//! - *direct, kept-alive RA-TLS*: one verified RA-TLS connection to the worker (the gateway's
//!   own upstream code), reused;
//! - *direct, new RA-TLS session per request*: `attestation::RaTlsHttpClient`, as `host-launcher
//!   chat` does (handshake and quote check each time);
//! - *via the gateway*: plain HTTP kept alive to the gateway, which forwards over RA-TLS.
//!
//! Per path: latency of a 1-token completion (median), time to first token and decode tokens/s
//! of a streamed completion (medians); then the forwarding cost alone, without inference: the
//! round trip of a request the worker refuses at once (`max_tokens: -1` → its 400, relayed by the
//! gateway), many samples alternating direct kept-alive / via the gateway, median and p90 of each
//! and the median of the paired differences, plus how many RA-TLS sessions the gateway opened
//! (its `/metrics`); then N concurrent streams through the gateway (all must complete). Prints a
//! table (or JSON with --json).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use attestation::{Policy, RaTlsHttpClient, Verifier};
use axum::body::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Cli {
    /// The worker's RA-TLS URL.
    #[arg(long)]
    worker: String,
    /// Its simulator key (hex).
    #[arg(long)]
    simulated_key: String,
    /// The gateway's address (HOST:PORT, plain HTTP).
    #[arg(long)]
    gateway: String,
    /// Model id.
    #[arg(long)]
    model: String,
    /// Rounds per path.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Tokens of the streamed completion.
    #[arg(long, default_value_t = 32)]
    gen_tokens: u32,
    /// Concurrent streams through the gateway.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Tokens per concurrent stream.
    #[arg(long, default_value_t = 8)]
    stream_tokens: u32,
    /// Samples of the no-inference round trip per path.
    #[arg(long, default_value_t = 300)]
    forward_samples: usize,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// Seconds of one round trip of a request the worker answers 400 at once (no inference).
async fn refused(s: &mut Sender, model: &str) -> Result<f64> {
    let b = Bytes::from(
        json!({"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1})
            .to_string(),
    );
    let t = Instant::now();
    let r = s.send(b).await?;
    let st = r.status();
    let body = r.into_body().collect().await?.to_bytes();
    if st != hyper::StatusCode::BAD_REQUEST {
        bail!(
            "expected the worker's 400, got HTTP {st}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// The gateway's `gateway_sessions_total{result="accepted"}` summed over workers, and
/// `gateway_requests_total` summed, from its /metrics.
async fn gateway_counts(addr: &str) -> Result<(f64, f64)> {
    let Sender::Plain(mut s) = plain(addr).await? else {
        bail!("not a plain sender")
    };
    let req = hyper::Request::get("/metrics")
        .header("host", "bench")
        .body(Full::new(Bytes::new()))?;
    s.ready().await?;
    let r = s.send_request(req).await?;
    let text = String::from_utf8_lossy(&r.into_body().collect().await?.to_bytes()).into_owned();
    let sum = |prefix: &str, needle: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok((
        sum("gateway_sessions_total", "result=\"accepted\""),
        sum("gateway_requests_total", ""),
    ))
}

fn body(model: &str, max_tokens: u32, stream: bool) -> Bytes {
    Bytes::from(
        json!({"model": model, "messages": [{"role": "user", "content": "Write a short story about the sea."}],
               "max_tokens": max_tokens, "temperature": 0, "stream": stream})
        .to_string(),
    )
}

/// A kept-alive HTTP/1.1 sender (over the gateway's verified RA-TLS, or plain TCP).
enum Sender {
    Ratls(Box<gateway::upstream::Conn>),
    Plain(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(&mut self, b: Bytes) -> Result<hyper::Response<hyper::body::Incoming>> {
        let req = hyper::Request::post("/v1/chat/completions")
            .header("host", "bench")
            .header("content-type", "application/json")
            .body(Full::new(b))?;
        Ok(match self {
            Sender::Ratls(c) => c.send(req).await?,
            Sender::Plain(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        })
    }
}

async fn plain(addr: &str) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(Sender::Plain(s))
}

/// (seconds to the whole answer) of a 1-token completion.
async fn one_token(s: &mut Sender, model: &str) -> Result<f64> {
    let t = Instant::now();
    let r = s.send(body(model, 1, false)).await?;
    let st = r.status();
    let b = r.into_body().collect().await?.to_bytes();
    if !st.is_success() {
        bail!("HTTP {st}: {}", String::from_utf8_lossy(&b));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Folds SSE bytes: (time of first content, time of last content, content chunks, done).
#[derive(Default)]
struct Fold {
    buf: Vec<u8>,
    first: Option<Instant>,
    last: Option<Instant>,
    chunks: u64,
    done: bool,
}

impl Fold {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = self.buf.drain(..i + 2).collect();
            let text = String::from_utf8_lossy(&ev);
            let d = text.trim().strip_prefix("data: ").unwrap_or("");
            if d == "[DONE]" {
                self.done = true;
            } else if let Ok(v) = serde_json::from_str::<Value>(d)
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            {
                let now = Instant::now();
                self.first.get_or_insert(now);
                self.last = Some(now);
                self.chunks += 1;
            }
        }
    }
}

/// (time to first token, decode tokens/s) of a streamed completion.
async fn streamed(s: &mut Sender, model: &str, n: u32) -> Result<(f64, f64)> {
    let t = Instant::now();
    let r = s.send(body(model, n, true)).await?;
    if !r.status().is_success() {
        bail!("HTTP {}", r.status());
    }
    let mut b = r.into_body();
    let mut f = Fold::default();
    while let Some(fr) = b.frame().await {
        if let Ok(d) = fr?.into_data() {
            f.push(&d);
        }
    }
    finish(&f, t)
}

fn finish(f: &Fold, t: Instant) -> Result<(f64, f64)> {
    if !f.done {
        bail!("stream ended without [DONE]");
    }
    let (Some(first), Some(last)) = (f.first, f.last) else {
        bail!("no tokens")
    };
    let decode = (last - first).as_secs_f64();
    let tps = if f.chunks > 1 && decode > 0.0 {
        (f.chunks - 1) as f64 / decode
    } else {
        f64::NAN
    };
    Ok(((first - t).as_secs_f64(), tps))
}

fn median(v: &mut Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Series {
    latency: Vec<f64>,
    ttft: Vec<f64>,
    tps: Vec<f64>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let key = gateway::trust::parse_key(&cli.simulated_key)?;
    let verifier = Verifier::simulated(Policy::default().with_simulated(true), key);
    let (host, port) = gateway::upstream::host_port(&cli.worker).map_err(anyhow::Error::msg)?;
    let mut direct = Sender::Ratls(Box::new(
        gateway::upstream::connect(&host, port, &verifier, None, Duration::from_secs(30)).await?,
    ));
    let mut via = plain(&cli.gateway).await?;
    let blocking = RaTlsHttpClient::new(verifier.clone());
    let url = format!("{}/v1/chat/completions", cli.worker);
    let mut s = [Series::default(), Series::default(), Series::default()];
    // Warm-up (model caches, connection pools).
    one_token(&mut direct, &cli.model).await?;
    one_token(&mut via, &cli.model).await?;
    for round in 0..cli.rounds {
        let mut order = [0usize, 1, 2];
        order.rotate_left(round % 3);
        for p in order {
            match p {
                0 => {
                    s[0].latency.push(one_token(&mut direct, &cli.model).await?);
                    let (a, b) = streamed(&mut direct, &cli.model, cli.gen_tokens).await?;
                    s[0].ttft.push(a);
                    s[0].tps.push(b);
                }
                1 => {
                    let c = blocking.clone();
                    let (u, m, n) = (url.clone(), cli.model.clone(), cli.gen_tokens);
                    let (lat, ttft, tps) =
                        tokio::task::spawn_blocking(move || -> Result<(f64, f64, f64)> {
                            let t = Instant::now();
                            let r =
                                c.post_json(&u, &body(&m, 1, false), Duration::from_secs(300))?;
                            if r.status != 200 {
                                bail!("HTTP {}", r.status);
                            }
                            let lat = t.elapsed().as_secs_f64();
                            let t = Instant::now();
                            let mut f = Fold::default();
                            c.post_json_streaming(
                                &u,
                                &body(&m, n, true),
                                Duration::from_secs(300),
                                &mut |d: &[u8]| {
                                    f.push(d);
                                    Ok(())
                                },
                            )?;
                            let (a, b) = finish(&f, t)?;
                            Ok((lat, a, b))
                        })
                        .await??;
                    s[1].latency.push(lat);
                    s[1].ttft.push(ttft);
                    s[1].tps.push(tps);
                }
                _ => {
                    s[2].latency.push(one_token(&mut via, &cli.model).await?);
                    let (a, b) = streamed(&mut via, &cli.model, cli.gen_tokens).await?;
                    s[2].ttft.push(a);
                    s[2].tps.push(b);
                }
            }
        }
        eprintln!("gateway-bench: round {}/{} done", round + 1, cli.rounds);
    }
    // Paired differences (gateway − direct kept-alive, the same round): the model's own time
    // drifts under load far more than the gateway adds, so medians of each path alone are noisy.
    let paired = |a: &[f64], b: &[f64]| -> f64 {
        let mut d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        median(&mut d)
    };
    let paired_one_token_ms = paired(&s[2].latency, &s[0].latency) * 1e3;
    let paired_ttft_ms = paired(&s[2].ttft, &s[0].ttft) * 1e3;
    let names = [
        "direct RA-TLS, kept alive",
        "direct RA-TLS, new session per request",
        "via the gateway (HTTP kept alive)",
    ];
    let rows: Vec<Value> = s
        .iter_mut()
        .zip(names)
        .map(|(x, n)| {
            json!({"path": n, "one_token_ms": median(&mut x.latency) * 1e3,
                   "ttft_ms": median(&mut x.ttft) * 1e3, "decode_tps": median(&mut x.tps)})
        })
        .collect();

    // The forwarding cost alone: no inference, many paired samples.
    let (sessions0, requests0) = gateway_counts(&cli.gateway).await?;
    let (mut fd, mut fv, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..cli.forward_samples {
        let (d, v) = if i % 2 == 0 {
            let d = refused(&mut direct, &cli.model).await?;
            (d, refused(&mut via, &cli.model).await?)
        } else {
            let v = refused(&mut via, &cli.model).await?;
            (refused(&mut direct, &cli.model).await?, v)
        };
        fd.push(d);
        fv.push(v);
        diff.push(v - d);
    }
    let (sessions1, requests1) = gateway_counts(&cli.gateway).await?;
    let forwarding = json!({
        "samples": cli.forward_samples,
        "direct_median_ms": quantile(&mut fd, 0.5) * 1e3,
        "direct_p90_ms": quantile(&mut fd, 0.9) * 1e3,
        "via_median_ms": quantile(&mut fv, 0.5) * 1e3,
        "via_p90_ms": quantile(&mut fv, 0.9) * 1e3,
        "added_median_ms": quantile(&mut diff, 0.5) * 1e3,
        "paired_one_token_ms": paired_one_token_ms,
        "paired_ttft_ms": paired_ttft_ms,
        "gateway_requests": requests1 - requests0,
        "gateway_sessions_opened": sessions1 - sessions0,
        "gateway_sessions_total": sessions1,
    });

    // Concurrent streams through the gateway.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.streams {
        let (g, m, n) = (cli.gateway.clone(), cli.model.clone(), cli.stream_tokens);
        tasks.push(tokio::spawn(async move {
            let mut s = plain(&g).await?;
            streamed(&mut s, &m, n).await
        }));
    }
    let mut ok = 0usize;
    let mut errors = Vec::new();
    for tk in tasks {
        match tk.await? {
            Ok(_) => ok += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    let concurrent = json!({"streams": cli.streams, "completed": ok, "errors": errors.len(),
        "first_error": errors.first(), "seconds": t.elapsed().as_secs_f64()});

    if cli.json {
        println!(
            "{}",
            json!({"rounds": cli.rounds, "gen_tokens": cli.gen_tokens, "paths": rows,
                   "forwarding": forwarding, "concurrent": concurrent})
        );
    } else {
        println!(
            "{} rounds, alternating order; 1-token completion latency, time to first token and decode rate of a {}-token stream (medians)",
            cli.rounds, cli.gen_tokens
        );
        println!(
            "{:<42} {:>14} {:>10} {:>12}",
            "path", "1 token (ms)", "TTFT (ms)", "decode tok/s"
        );
        for r in &rows {
            println!(
                "{:<42} {:>14.2} {:>10.2} {:>12.1}",
                r["path"].as_str().unwrap_or(""),
                r["one_token_ms"].as_f64().unwrap_or(f64::NAN),
                r["ttft_ms"].as_f64().unwrap_or(f64::NAN),
                r["decode_tps"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let g = |i: usize, k: &str| rows[i][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "gateway vs direct kept-alive: {:+.2} ms per 1-token request, {:+.2} ms TTFT, decode {:+.1} %",
            g(2, "one_token_ms") - g(0, "one_token_ms"),
            g(2, "ttft_ms") - g(0, "ttft_ms"),
            (g(2, "decode_tps") / g(0, "decode_tps") - 1.0) * 100.0
        );
        let f = |k: &str| forwarding[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "paired per round (gateway − direct kept-alive, median): {:+.2} ms per 1-token request, {:+.2} ms TTFT",
            f("paired_one_token_ms"),
            f("paired_ttft_ms"),
        );
        println!(
            "forwarding alone ({} samples each, the worker's immediate 400, no inference): direct kept-alive {:.3} ms (p90 {:.3}), via the gateway {:.3} ms (p90 {:.3}); added {:+.3} ms (median of paired differences)",
            cli.forward_samples,
            f("direct_median_ms"),
            f("direct_p90_ms"),
            f("via_median_ms"),
            f("via_p90_ms"),
            f("added_median_ms"),
        );
        println!(
            "RA-TLS sessions the gateway opened for those {} requests: {} (kept alive: 0 expected; {} in the whole run)",
            f("gateway_requests"),
            f("gateway_sessions_opened"),
            f("gateway_sessions_total"),
        );
        println!(
            "{} concurrent streams of {} tokens through the gateway: {} completed, {} errors, {:.1} s{}",
            cli.streams,
            cli.stream_tokens,
            ok,
            errors.len(),
            t.elapsed().as_secs_f64(),
            errors
                .first()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
    }
    if !errors.is_empty() {
        bail!(
            "{} of {} concurrent streams failed",
            errors.len(),
            cli.streams
        );
    }
    Ok(())
}
