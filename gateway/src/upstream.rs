//! Connections from the gateway to workers: TCP, then TLS 1.3 whose handshake runs the full
//! RA-TLS verification of the worker's certificate ([`attestation::tls::RaTlsServerVerifier`]:
//! quote, policy, image hash), then HTTP/1.1 (hyper) kept alive for further requests.
//!
//! Every new TLS session is verified from scratch: a fresh verifier per connection and no
//! session resumption (a resumed session would skip the certificate check). A connection is
//! pinned to the certificate it verified — TLS guarantees the peer keeps that key for the
//! connection's lifetime — and carries the verified key ([`Conn::key`]) so the pool can match it
//! with the keys whose RTMR3 log and model hash were checked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use attestation::Verdict;
use attestation::Verifier;
use attestation::tls::{RATLS_SERVER_NAME, RaTlsServerVerifier, client_config};
use axum::body::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Why no verified connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No TCP connection.
    #[error("cannot connect to {addr}: {why}")]
    Connect {
        /// host:port.
        addr: String,
        /// Cause.
        why: String,
    },
    /// The certificate was checked and rejected; the verdict has every reason.
    #[error("its RA-TLS certificate was rejected: {}", .0.summary())]
    Rejected(Box<Verdict>),
    /// TLS failed otherwise.
    #[error("TLS with {addr} failed: {why}")]
    Tls {
        /// host:port.
        addr: String,
        /// Cause.
        why: String,
    },
    /// HTTP/1.1 set-up failed.
    #[error("HTTP with {addr} failed: {why}")]
    Http {
        /// host:port.
        addr: String,
        /// Cause.
        why: String,
    },
    /// Connect + handshake took too long.
    #[error("no verified connection to {addr} within {secs} s")]
    Timeout {
        /// host:port.
        addr: String,
        /// The limit.
        secs: u64,
    },
}

/// One verified HTTP/1.1 connection to a worker.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// The worker's verified RA-TLS public key (hex), pinned for this connection.
    pub key: String,
    /// The verdict of this connection's handshake.
    pub verdict: Verdict,
    /// When it was opened.
    pub opened: Instant,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("key", &self.key)
            .field("opened", &self.opened)
            .finish_non_exhaustive()
    }
}

/// Splits `https://HOST:PORT[/...]` into host and port.
pub fn host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        format!("worker URL {url:?} must start with https:// (workers speak only RA-TLS)")
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, p) = r
            .split_once(']')
            .ok_or_else(|| format!("worker URL {url:?}: unterminated [IPv6] address"))?;
        (h, p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || authority.contains('@') {
        return Err(format!("worker URL {url:?}: expected https://HOST:PORT"));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse()
            .map_err(|_| format!("worker URL {url:?}: the port is not a number 1-65535"))?,
    };
    Ok((host.to_owned(), port))
}

/// Opens and verifies a connection to `host:port` with `verifier`, presenting `identity` when the
/// worker asks for a client certificate (mutual RA-TLS) (the handshake's certificate
/// check runs on this task: the verifier must not block — the gateway's use a cache-only
/// on-chain view, see [`crate::chain::FreshView`]).
pub async fn connect(
    host: &str,
    port: u16,
    verifier: &Verifier,
    identity: Option<&attestation::client_auth::ClientIdentity>,
    timeout: Duration,
) -> Result<Conn, UpstreamError> {
    let addr = format!("{host}:{port}");
    let a = addr.clone();
    let work = async move {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: a.clone(),
                why: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let sv = Arc::new(RaTlsServerVerifier::new(verifier.clone()));
        let tls_err = |why: String| UpstreamError::Tls {
            addr: a.clone(),
            why,
        };
        let mut cfg = client_config(sv.clone(), identity.map(|i| i.resolver()))
            .map_err(|e| tls_err(e.to_string()))?;
        // Every session runs the full certificate check: no resumption.
        cfg.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(RATLS_SERVER_NAME).map_err(|e| tls_err(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tls = match connector.connect(name, tcp).await {
            Ok(t) => t,
            Err(e) => {
                if let Some(v) = sv.last_verdict()
                    && !v.accepted
                {
                    return Err(UpstreamError::Rejected(Box::new(v)));
                }
                return Err(tls_err(e.to_string()));
            }
        };
        let verdict = sv
            .last_verdict()
            .ok_or_else(|| tls_err("the handshake finished without a certificate check".into()))?;
        if !verdict.accepted {
            return Err(UpstreamError::Rejected(Box::new(verdict)));
        }
        let key = verdict.tls_public_key.clone().unwrap_or_default();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| UpstreamError::Http {
                addr: a.clone(),
                why: e.to_string(),
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            key,
            verdict,
            opened: Instant::now(),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| UpstreamError::Timeout {
            addr,
            secs: timeout.as_secs(),
        })?
}

impl Conn {
    /// Whether another request may be sent on it.
    pub fn reusable(&self) -> bool {
        !self.sender.is_closed() && self.sender.is_ready()
    }

    /// Sends one request and waits for the response head.
    pub async fn send(
        &mut self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn worker_urls_split_into_host_and_port() {
        assert_eq!(
            host_port("https://127.0.0.1:8443").unwrap(),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(host_port("https://[::1]:9/x").unwrap(), ("::1".into(), 9));
        assert_eq!(host_port("https://w").unwrap(), ("w".into(), 443));
        for bad in ["http://h:1", "https://:1", "https://h:x", "https://u@h:1"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }
}
