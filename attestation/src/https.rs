//! A small blocking HTTPS client for RA-TLS peers (host-launcher, `verify`, tests, demo): rustls
//! (TLS 1.3, [`crate::tls::RaTlsServerVerifier`]) over a std `TcpStream`, HTTP/1.1 with
//! `Connection: close`, one request per connection.
//!
//! Every request runs the full RA-TLS verification of the server's certificate during the
//! handshake; the [`Verdict`] comes back with the response ([`HttpResponse::verdict`]). A rejected
//! certificate is [`HttpError::Rejected`] (carrying the verdict with every reason); a peer that
//! cannot be reached at all is distinguishable ([`HttpError::is_unreachable`]).
//!
//! [`RaTlsHttpClient::attest`] adds the agent's runtime evidence: it fetches `GET /attestation`,
//! replays the RTMR3 event log against the quote and checks the host config the verifier expects
//! ([`crate::runtime::check_rtmr3`]).
//!
//! Limits: response head 64 KiB, body [`DEFAULT_MAX_BODY`] (configurable), chunked or
//! `Content-Length` bodies (or until close), an overall deadline per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use crate::tls::{RATLS_SERVER_NAME, RaTlsServerVerifier, client_config};
use crate::verdict::Verdict;
use crate::verify::Verifier;

/// Path of the agent's attestation document (must equal `worker_api::ATTESTATION_PATH`).
pub const ATTESTATION_PATH: &str = "/attestation";
/// Largest body accepted by default (64 MiB).
pub const DEFAULT_MAX_BODY: usize = 64 << 20;
/// Largest response head (status line and headers).
pub const MAX_HEAD: usize = 64 << 10;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `https://HOST:PORT/path`.
    #[error("bad URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// No TCP connection could be made (nothing listens, host unknown, connect timeout).
    #[error("cannot connect to {addr}: {why}; is the worker running and the port right?")]
    Connect {
        /// host:port.
        addr: String,
        /// Cause.
        why: String,
    },
    /// The server's RA-TLS evidence was rejected; the verdict carries every reason.
    #[error("the server's RA-TLS evidence was rejected: {}", .0.summary())]
    Rejected(Box<Verdict>),
    /// The TLS handshake or record layer failed for another reason (not TLS 1.3, peer closed).
    #[error("TLS with {addr} failed: {why}")]
    Tls {
        /// host:port.
        addr: String,
        /// Cause.
        why: String,
    },
    /// The request did not complete before its deadline.
    #[error("request to {url} timed out after {secs:.1} s")]
    Timeout {
        /// URL.
        url: String,
        /// The timeout.
        secs: f64,
    },
    /// Reading or writing failed after the handshake.
    #[error("I/O error talking to {url}: {why}")]
    Io {
        /// URL.
        url: String,
        /// Cause.
        why: String,
    },
    /// The answer is not valid HTTP/1.1.
    #[error("malformed HTTP answer from {url}: {why}")]
    Protocol {
        /// URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The answer is larger than allowed.
    #[error("answer from {url} is larger than {limit} bytes")]
    TooLarge {
        /// URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The body is not the JSON expected.
    #[error("answer from {url} (HTTP {status}) is not the expected JSON: {why}")]
    Json {
        /// URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Parser message.
        why: String,
    },
}

impl HttpError {
    /// True when the peer was not reachable (no connection, connection reset during the handshake
    /// before any certificate was seen, timeout): worth retrying while a guest boots. False for a
    /// rejected verdict and for malformed answers.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HttpError::Connect { .. } | HttpError::Timeout { .. } | HttpError::Tls { .. }
        )
    }

    /// The verdict of a rejection.
    pub fn verdict(&self) -> Option<&Verdict> {
        match self {
            HttpError::Rejected(v) => Some(v),
            _ => None,
        }
    }
}

/// An HTTP answer from an RA-TLS peer that passed verification.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// The body (chunked encoding removed).
    pub body: Vec<u8>,
    /// The verdict on the server's RA-TLS certificate (accepted).
    pub verdict: Verdict,
}

impl HttpResponse {
    /// Parse the body as JSON (`url` only for messages).
    pub fn json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Json {
            url: url.to_owned(),
            status: self.status,
            why: e.to_string(),
        })
    }
}

/// The agent's `GET /attestation` answer, as far as verifiers read it (unknown fields ignored;
/// the full shape is `worker_api::AttestationInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAttestation {
    /// "tdx", "simulated" or "none".
    pub tee: String,
    /// The RTMR3 events the agent extended, in order.
    pub rtmr3_events: Vec<measurements::rtmr3::Event>,
    /// Why RTMR3 could not be extended on real TDX, if so.
    #[serde(default)]
    pub rtmr3_error: Option<String>,
}

/// The outcome of [`RaTlsHttpClient::attest`].
#[derive(Debug, Clone)]
pub struct Attested {
    /// The final verdict: certificate and quote, plus the RTMR3 checks.
    pub verdict: Verdict,
    /// What the agent reported (absent when `/attestation` could not be read).
    pub attestation: Option<AgentAttestation>,
}

/// A blocking HTTPS client that only talks to peers whose RA-TLS evidence its [`Verifier`] accepts.
#[derive(Debug, Clone)]
pub struct RaTlsHttpClient {
    verifier: Verifier,
    max_body: usize,
    identity: Option<crate::client_auth::ClientIdentity>,
}

struct Target {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, HttpError> {
    let bad = |why: &str| HttpError::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("only https:// URLs are supported (RA-TLS)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("the path contains spaces or control characters"));
    }
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, p) = r
            .split_once(']')
            .ok_or_else(|| bad("unterminated [IPv6] address"))?;
        (h, p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || authority.contains('@') {
        return Err(bad("expected https://HOST:PORT/path"));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| bad("the port is not a number 1-65535"))?,
    };
    Ok(Target {
        host: host.to_owned(),
        port,
        path: path.to_owned(),
    })
}

/// A `Read + Write` stream with a per-request deadline applied to every operation.
struct Deadline {
    end: Instant,
}

impl Deadline {
    fn left(&self) -> Option<Duration> {
        self.end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }
}

impl RaTlsHttpClient {
    /// A client verifying every server with `verifier`.
    pub fn new(verifier: Verifier) -> Self {
        Self {
            verifier,
            max_body: DEFAULT_MAX_BODY,
            identity: None,
        }
    }

    /// Present this client certificate to servers that ask for one (mutual RA-TLS: a worker
    /// whose measured `client_auth` pins it).
    pub fn with_client_identity(mut self, identity: crate::client_auth::ClientIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Accept bodies up to `bytes`.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The verifier used.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// `GET url`.
    pub fn get(&self, url: &str, timeout: Duration) -> Result<HttpResponse, HttpError> {
        self.request("GET", url, None, timeout, None)
    }

    /// `POST url` with a JSON body (`Content-Type: application/json`; may be empty).
    pub fn post_json(
        &self,
        url: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        self.request("POST", url, Some(body), timeout, None)
    }

    /// `POST url` with a JSON body, streaming a 2xx answer's body into `sink` as it arrives
    /// (e.g. server-sent events); the returned response's `body` is then empty. A non-2xx answer
    /// is collected into `body` as with [`Self::post_json`]. The whole exchange must finish
    /// within `timeout`.
    pub fn post_json_streaming(
        &self,
        url: &str,
        body: &[u8],
        timeout: Duration,
        sink: &mut BodySink<'_>,
    ) -> Result<HttpResponse, HttpError> {
        self.request("POST", url, Some(body), timeout, Some(sink))
    }

    /// Verify an agent completely: RA-TLS handshake (certificate, quote, policy, allow-list), then
    /// `GET {base_url}/attestation` and the RTMR3 checks (replay against the quote; the host
    /// config the verifier expects, if any). Transport errors and a rejected certificate are
    /// errors; everything found after a successful handshake is in the returned verdict.
    pub fn attest(&self, base_url: &str, timeout: Duration) -> Result<Attested, HttpError> {
        let url = format!("{}{ATTESTATION_PATH}", base_url.trim_end_matches('/'));
        let resp = self.get(&url, timeout)?;
        let mut verdict = resp.verdict.clone();
        let parsed = if resp.status == 200 {
            resp.json::<AgentAttestation>(&url)
                .map_err(|e| e.to_string())
        } else {
            Err(format!(
                "GET {url} answered HTTP {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(300)])
            ))
        };
        match parsed {
            Ok(a) => {
                crate::runtime::check_rtmr3(
                    &mut verdict,
                    &a.rtmr3_events,
                    self.verifier.expected_host_config(),
                );
                crate::runtime::check_dev_gpu(
                    &mut verdict,
                    &a.rtmr3_events,
                    self.verifier.policy.allow_dev_gpu_without_cc,
                );
                Ok(Attested {
                    verdict,
                    attestation: Some(a),
                })
            }
            Err(why) => {
                verdict.reject(
                    crate::verdict::ReasonCode::Rtmr3LogUnavailable,
                    format!(
                        "cannot read the agent's RTMR3 event log ({why}); is the agent current?"
                    ),
                );
                Ok(Attested {
                    verdict,
                    attestation: None,
                })
            }
        }
    }

    fn request(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        timeout: Duration,
        sink: Option<&mut BodySink<'_>>,
    ) -> Result<HttpResponse, HttpError> {
        let t = parse_url(url)?;
        let dl = Deadline {
            end: Instant::now() + timeout,
        };
        let timed_out = || HttpError::Timeout {
            url: url.to_owned(),
            secs: timeout.as_secs_f64(),
        };
        let addr = format!("{}:{}", t.host, t.port);
        let connect_err = |why: String| HttpError::Connect {
            addr: addr.clone(),
            why,
        };
        let addrs: Vec<_> = (t.host.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| connect_err(e.to_string()))?
            .collect();
        let mut last = String::from("no address");
        let mut sock = None;
        for a in addrs {
            let left = dl.left().ok_or_else(timed_out)?;
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        let sock = sock.ok_or_else(|| connect_err(last))?;
        let _ = sock.set_nodelay(true);

        let sv = Arc::new(RaTlsServerVerifier::new(self.verifier.clone()));
        let cfg = client_config(sv.clone(), self.identity.as_ref().map(|i| i.resolver())).map_err(
            |e| HttpError::Tls {
                addr: addr.clone(),
                why: e.to_string(),
            },
        )?;
        let name = ServerName::try_from(RATLS_SERVER_NAME).map_err(|e| HttpError::Tls {
            addr: addr.clone(),
            why: e.to_string(),
        })?;
        let conn =
            rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| HttpError::Tls {
                addr: addr.clone(),
                why: e.to_string(),
            })?;
        let mut tls = rustls::StreamOwned::new(conn, sock);

        // Map an I/O error: a rejection recorded by the verifier wins; then timeouts.
        let io_err = |e: std::io::Error, during_handshake: bool| -> HttpError {
            if let Some(v) = sv.last_verdict()
                && !v.accepted
            {
                return HttpError::Rejected(Box::new(v));
            }
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                return timed_out();
            }
            if during_handshake {
                HttpError::Tls {
                    addr: addr.clone(),
                    why: e.to_string(),
                }
            } else {
                HttpError::Io {
                    url: url.to_owned(),
                    why: e.to_string(),
                }
            }
        };
        let set_timeouts = |tls: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
            let left = dl.left().ok_or_else(timed_out)?;
            tls.sock
                .set_read_timeout(Some(left))
                .and_then(|_| tls.sock.set_write_timeout(Some(left)))
                .map_err(|e| io_err(e, false))
        };

        // Handshake first, so that the verdict is known before anything is sent.
        while tls.conn.is_handshaking() {
            set_timeouts(&tls)?;
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| io_err(e, true))?;
        }
        let verdict = sv.last_verdict().ok_or_else(|| HttpError::Tls {
            addr: addr.clone(),
            why: "the handshake finished without a certificate check".to_owned(),
        })?;
        if !verdict.accepted {
            return Err(HttpError::Rejected(Box::new(verdict)));
        }

        let host_header = if t.host.contains(':') {
            format!("[{}]:{}", t.host, t.port)
        } else {
            addr.clone()
        };
        let mut head = format!(
            "{method} {} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: confidential-worker-ratls/{}\r\n",
            t.path,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        set_timeouts(&tls)?;
        let mut req = head.into_bytes();
        req.extend_from_slice(body.unwrap_or_default());
        tls.write_all(&req).map_err(|e| io_err(e, false))?;
        tls.flush().map_err(|e| io_err(e, false))?;

        let mut reader = BufReader::new(DeadlineReader {
            inner: &mut tls,
            dl: &dl,
        });
        let (status, body) =
            read_response(&mut reader, url, self.max_body, sink).map_err(|e| match e {
                ReadError::Http(h) => h,
                ReadError::Io(e) => io_err(e, false),
            })?;
        Ok(HttpResponse {
            status,
            body,
            verdict,
        })
    }
}

struct DeadlineReader<'a> {
    inner: &'a mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    dl: &'a Deadline,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .dl
            .left()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
        self.inner.sock.set_read_timeout(Some(left))?;
        self.inner.read(buf)
    }
}

enum ReadError {
    Http(HttpError),
    Io(std::io::Error),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Read one line (up to CRLF) into `out`, counting against `budget`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize, url: &str) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(ReadError::Http(HttpError::TooLarge {
            url: url.to_owned(),
            limit: MAX_HEAD,
        }));
    }
    *budget -= n;
    if !line.ends_with(b"\n") {
        return Err(ReadError::Http(HttpError::Protocol {
            url: url.to_owned(),
            why: "the connection closed in the middle of the response head".to_owned(),
        }));
    }
    let s = String::from_utf8(line).map_err(|_| {
        ReadError::Http(HttpError::Protocol {
            url: url.to_owned(),
            why: "the response head is not UTF-8".to_owned(),
        })
    })?;
    Ok(s.trim_end_matches(['\r', '\n']).to_owned())
}

/// Receives the pieces of a 2xx response body as they arrive (streaming); an `Err` aborts the
/// request with that message.
pub type BodySink<'a> = dyn FnMut(&[u8]) -> Result<(), String> + 'a;

/// Reads one response. With a `sink`, a 2xx body is handed to it piece by piece (chunk by chunk,
/// or read by read) and not collected; other answers are collected as usual (error bodies).
fn read_response<R: BufRead>(
    r: &mut R,
    url: &str,
    max_body: usize,
    mut sink: Option<&mut BodySink<'_>>,
) -> Result<(u16, Vec<u8>), ReadError> {
    let proto = |why: String| {
        ReadError::Http(HttpError::Protocol {
            url: url.to_owned(),
            why,
        })
    };
    let too_large = || {
        ReadError::Http(HttpError::TooLarge {
            url: url.to_owned(),
            limit: max_body,
        })
    };
    let mut budget = MAX_HEAD;
    let status_line = read_line(r, &mut budget, url)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(proto(format!(
            "status line {status_line:?} is not HTTP/1.x"
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| proto(format!("status line {status_line:?} has no status code")))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let line = read_line(r, &mut budget, url)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| proto(format!("header line {line:?} has no colon")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| proto(format!("Content-Length {value:?} is not a number")))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(proto("conflicting Content-Length headers".to_owned()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else {
                return Err(proto(format!("unsupported Transfer-Encoding {value:?}")));
            }
        }
    }
    if (100..200).contains(&status) {
        return Err(proto(format!(
            "informational status {status} is not supported"
        )));
    }
    if !(200..300).contains(&status) {
        sink = None;
    }
    let aborted = |why: String| {
        ReadError::Http(HttpError::Protocol {
            url: url.to_owned(),
            why: format!("the response body was refused: {why}"),
        })
    };
    let mut body = Vec::new();
    if let Some(sink) = sink {
        let mut buf = vec![0u8; 16 << 10];
        if chunked {
            loop {
                let mut b = MAX_HEAD;
                let size_line = read_line(r, &mut b, url)?;
                let size_hex = size_line.split(';').next().unwrap_or_default().trim();
                let mut size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| proto(format!("chunk size {size_hex:?} is not hex")))?;
                if size == 0 {
                    loop {
                        let mut b = MAX_HEAD;
                        if read_line(r, &mut b, url)?.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                while size > 0 {
                    let n = size.min(buf.len());
                    r.read_exact(&mut buf[..n])?;
                    sink(&buf[..n]).map_err(aborted)?;
                    size -= n;
                }
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
                if &crlf != b"\r\n" {
                    return Err(proto("chunk not followed by CRLF".to_owned()));
                }
            }
        } else {
            let mut left = content_length;
            loop {
                let want = left.map_or(buf.len(), |l| l.min(buf.len()));
                if want == 0 {
                    break;
                }
                let n = r.read(&mut buf[..want])?;
                if n == 0 {
                    if left.is_some() {
                        return Err(proto("the body ended before its Content-Length".to_owned()));
                    }
                    break;
                }
                sink(&buf[..n]).map_err(aborted)?;
                left = left.map(|l| l - n);
            }
        }
        return Ok((status, body));
    }
    if chunked {
        loop {
            let mut b = MAX_HEAD;
            let size_line = read_line(r, &mut b, url)?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| proto(format!("chunk size {size_hex:?} is not hex")))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut b = MAX_HEAD;
                    if read_line(r, &mut b, url)?.is_empty() {
                        break;
                    }
                }
                break;
            }
            if body.len().saturating_add(size) > max_body {
                return Err(too_large());
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(proto("chunk not followed by CRLF".to_owned()));
            }
        }
    } else if let Some(n) = content_length {
        if n > max_body {
            return Err(too_large());
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        r.by_ref()
            .take(max_body as u64 + 1)
            .read_to_end(&mut body)?;
        if body.len() > max_body {
            return Err(too_large());
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::quote::TdRegisters;
    use crate::ratls::RaTlsIdentity;
    use crate::simulated::SimulatedTee;
    use crate::tls::{RaTlsCertResolver, server_config};
    use crate::verdict::ReasonCode;
    use crate::verify::unix_secs;

    fn now() -> u64 {
        unix_secs(std::time::SystemTime::now())
    }

    /// An in-process RA-TLS server answering each connection with `answer(request_bytes)`.
    fn serve(
        tee: &SimulatedTee,
        conns: usize,
        answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
    ) -> (u16, std::thread::JoinHandle<Vec<Vec<u8>>>) {
        let id = RaTlsIdentity::generate(tee, now()).expect("id");
        let resolver = Arc::new(RaTlsCertResolver::new(id).expect("resolver"));
        let cfg = Arc::new(server_config(resolver, None).expect("server"));
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..conns {
                let Ok((sock, _)) = l.accept() else { break };
                let conn = rustls::ServerConnection::new(cfg.clone()).expect("conn");
                let mut s = rustls::StreamOwned::new(conn, sock);
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Read until the end of the head (and a body of the declared length).
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&req[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if req.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s.write_all(&answer(&req));
                s.conn.send_close_notify();
                let _ = s.flush();
                seen.push(req);
            }
            seen
        });
        (port, h)
    }

    fn tee() -> SimulatedTee {
        SimulatedTee::from_seed(&[7; 32], TdRegisters::default()).expect("tee")
    }

    fn client(t: &SimulatedTee, allow: bool) -> RaTlsHttpClient {
        RaTlsHttpClient::new(Verifier::simulated(
            Policy::default().with_simulated(allow),
            t.public_key(),
        ))
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn get_and_post_with_content_length_and_chunked_bodies() {
        let t = tee();
        let (port, h) = serve(&t, 2, |req| {
            if req.starts_with(b"GET") {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}".to_vec()
            } else {
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n".to_vec()
            }
        });
        let c = client(&t, true);
        let r = c
            .get(&format!("https://127.0.0.1:{port}/health"), T)
            .expect("get");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"ok\":true}"[..]));
        assert!(r.verdict.accepted && r.verdict.simulated);
        let v: serde_json::Value = r.json("u").expect("json");
        assert_eq!(v["ok"], true);
        let r = c
            .post_json(&format!("https://127.0.0.1:{port}/v1/x"), b"{\"q\":1}", T)
            .expect("post");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{\"a\":1}"[..]));
        let seen = h.join().expect("join");
        let get = String::from_utf8_lossy(&seen[0]);
        assert!(get.starts_with("GET /health HTTP/1.1\r\n"), "{get}");
        assert!(get.contains("Connection: close\r\n"), "{get}");
        let post = String::from_utf8_lossy(&seen[1]);
        assert!(post.contains("Content-Length: 7\r\n"), "{post}");
        assert!(post.ends_with("\r\n\r\n{\"q\":1}"), "{post}");
    }

    #[test]
    fn streaming_posts_hand_over_the_body_piece_by_piece() {
        let t = tee();
        for answer in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n3\r\nab\n\r\n0\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ndata: ab\n"[..],
            &b"HTTP/1.1 200 OK\r\n\r\ndata: ab\n"[..],
        ] {
            let (port, h) = serve(&t, 1, move |_| answer.to_vec());
            let mut got = Vec::new();
            let r = client(&t, true)
                .post_json_streaming(
                    &format!("https://127.0.0.1:{port}/v1/x"),
                    b"{}",
                    T,
                    &mut |piece: &[u8]| {
                        got.extend_from_slice(piece);
                        Ok(())
                    },
                )
                .expect("post");
            h.join().expect("join");
            assert_eq!(r.status, 200);
            assert!(r.body.is_empty());
            assert_eq!(got, b"data: ab\n");
        }
        // An error answer is collected, not streamed; a sink error aborts with its reason.
        let (port, h) = serve(&t, 2, |req| {
            if req.windows(5).any(|w| w == b"/busy") {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy".to_vec()
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
            }
        });
        let c = client(&t, true);
        let mut streamed = 0usize;
        let r = c
            .post_json_streaming(
                &format!("https://127.0.0.1:{port}/busy"),
                b"{}",
                T,
                &mut |p: &[u8]| {
                    streamed += p.len();
                    Ok(())
                },
            )
            .expect("post");
        assert_eq!(
            (r.status, r.body.as_slice(), streamed),
            (503, &b"busy"[..], 0)
        );
        let e = c
            .post_json_streaming(
                &format!("https://127.0.0.1:{port}/ok"),
                b"{}",
                T,
                &mut |_: &[u8]| Err("stop".to_owned()),
            )
            .expect_err("aborted");
        assert!(e.to_string().contains("refused: stop"), "{e}");
        h.join().expect("join");
    }

    #[test]
    fn simulated_evidence_is_rejected_unless_allowed_and_key_trusted() {
        let t = tee();
        let (port, h) = serve(&t, 2, |_| {
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()
        });
        let url = format!("https://127.0.0.1:{port}/health");
        let e = client(&t, false).get(&url, T).expect_err("refused");
        let v = e.verdict().expect("verdict");
        assert!(v.has(ReasonCode::SimulatedNotAllowed), "{:?}", v.reasons);
        assert!(!e.is_unreachable());
        let other = SimulatedTee::from_seed(&[9; 32], TdRegisters::default()).expect("tee");
        let e = RaTlsHttpClient::new(Verifier::simulated(
            Policy::default().with_simulated(true),
            other.public_key(),
        ))
        .get(&url, T)
        .expect_err("wrong key");
        assert!(
            e.verdict()
                .expect("verdict")
                .has(ReasonCode::SimulatedSignatureInvalid),
            "{e}"
        );
        drop(h);
    }

    #[test]
    fn unreachable_and_bad_urls_are_distinct_errors() {
        let t = tee();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let e = client(&t, true)
            .get(&format!("https://127.0.0.1:{port}/"), T)
            .expect_err("nothing listens");
        assert!(e.is_unreachable(), "{e}");
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
        for bad in [
            "http://127.0.0.1:1/",
            "https://:1/",
            "https://h:99999/",
            "https://h:1/a b",
        ] {
            assert!(
                matches!(client(&t, true).get(bad, T), Err(HttpError::Url { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn oversized_and_malformed_answers_are_errors_not_panics() {
        let t = tee();
        let (port, h) = serve(&t, 3, {
            let n = std::sync::atomic::AtomicUsize::new(0);
            move |_| match n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 {
                1 => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec(),
                2 => b"garbage\r\n\r\n".to_vec(),
                _ => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            }
        });
        let c = client(&t, true).with_max_body(10);
        let url = format!("https://127.0.0.1:{port}/");
        assert!(matches!(c.get(&url, T), Err(HttpError::TooLarge { .. })));
        assert!(matches!(c.get(&url, T), Err(HttpError::Protocol { .. })));
        assert!(matches!(c.get(&url, T), Err(HttpError::Protocol { .. })));
        h.join().expect("join");
    }

    #[test]
    fn attest_replays_rtmr3_and_checks_the_host_config() {
        let cfg = br#"{"payout_wallet":"EQabc"}"#.to_vec();
        let events = crate::runtime::expected_events(Some(&cfg));
        let rtmr3 = measurements::rtmr3::replay(&events).expect("replay");
        let mut regs = TdRegisters::default();
        regs.rtmr[3] = rtmr3.0;
        let t = SimulatedTee::from_seed(&[7; 32], regs).expect("tee");
        let doc = serde_json::to_vec(&AgentAttestation {
            tee: "simulated".into(),
            rtmr3_events: events,
            rtmr3_error: None,
        })
        .expect("json");
        let (port, h) = serve(&t, 2, move |_| {
            let mut r =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", doc.len()).into_bytes();
            r.extend_from_slice(&doc);
            r
        });
        let base = format!("https://127.0.0.1:{port}");
        let c = RaTlsHttpClient::new(
            Verifier::simulated(Policy::default().with_simulated(true), t.public_key())
                .with_expected_host_config(cfg),
        );
        let a = c.attest(&base, T).expect("attest");
        assert!(a.verdict.accepted, "{:?}", a.verdict.reasons);
        assert!(a.verdict.rtmr3.as_ref().expect("rtmr3").host_config_checked);
        let c = RaTlsHttpClient::new(
            Verifier::simulated(Policy::default().with_simulated(true), t.public_key())
                .with_expected_host_config(b"{}".to_vec()),
        );
        let a = c.attest(&base, T).expect("attest");
        assert!(
            a.verdict.has(ReasonCode::HostConfigMismatch),
            "{:?}",
            a.verdict.reasons
        );
        h.join().expect("join");
    }
}
