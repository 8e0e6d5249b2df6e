//! Verifying one worker completely (blocking; the gateway runs it on a blocking thread): the
//! RA-TLS handshake (quote, policy, image hash on every allow-list, the root contract included),
//! `GET /attestation` and the RTMR3 replay (plus the expected host config, when given), the model
//! hash from the RTMR3 `model` event against the root contract's model list, and `GET /v1/models`
//! for routing.

use std::sync::Arc;
use std::time::Duration;

use attestation::{HttpError, RaTlsHttpClient, Verifier};
use serde_json::Value;

use crate::chain::ChainList;
use crate::pool::{CheckOutcome, Reason, Verified};

/// How workers are verified.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The verifier (its on-chain allow-list may block: [`crate::chain::BlockingView`]).
    pub verifier: Verifier,
    /// The root contract's model list, when configured.
    pub models: Option<Arc<ChainList>>,
    /// Per request.
    pub timeout: Duration,
    /// Mutual RA-TLS: the client certificate presented to workers that ask for one
    /// (`--client-cert`), on verifications and forwarded sessions alike.
    pub client_identity: Option<attestation::client_auth::ClientIdentity>,
}

fn verdict_reasons(v: &attestation::Verdict) -> Vec<Reason> {
    v.reasons
        .iter()
        .map(|r| Reason::new(&r.code.as_str(), r.message.clone()))
        .collect()
}

impl Verification {
    /// The reason for a failed connection: a worker that refused the gateway's client
    /// certificate (mutual RA-TLS, TLS alerts certificate_required / certificate_unknown /
    /// bad_certificate) gets its own code and what to do; anything else is `unreachable`.
    fn transport_reason(&self, e: &HttpError) -> Reason {
        let text = e.to_string();
        if text.contains("CertificateRequired") {
            return Reason::new(
                "client_cert_required",
                format!(
                    "{text}: the worker requires a client certificate (mutual RA-TLS; its RTMR3 \
                     client_auth event lists the ones it admits); start the gateway with \
                     --client-cert FILE --client-key FILE"
                ),
            );
        }
        if let Some(id) = &self.client_identity
            && (text.contains("CertificateUnknown") || text.contains("BadCertificate"))
        {
            return Reason::new(
                "client_cert_refused",
                format!(
                    "{text}: the worker refused the gateway's client certificate (SHA-256 {}); \
                     the worker's host must pin it (host-launcher run --allow-client-cert)",
                    hex::encode(id.cert_sha256())
                ),
            );
        }
        Reason::new(
            "unreachable",
            format!("{text}; the gateway retries in the background"),
        )
    }

    /// Verify the worker at `url` (`https://HOST:PORT`).
    pub fn check(&self, url: &str) -> CheckOutcome {
        let mut client = RaTlsHttpClient::new(self.verifier.clone()).with_max_body(1 << 20);
        if let Some(id) = &self.client_identity {
            client = client.with_client_identity(id.clone());
        }
        let attested = match client.attest(url, self.timeout) {
            Ok(a) => a,
            Err(HttpError::Rejected(v)) => return CheckOutcome::Down(verdict_reasons(&v), Some(v)),
            Err(e) => return CheckOutcome::Down(vec![self.transport_reason(&e)], None),
        };
        let v = attested.verdict;
        if !v.accepted {
            return CheckOutcome::Down(verdict_reasons(&v), Some(Box::new(v)));
        }
        let down =
            |r: Reason, v: attestation::Verdict| CheckOutcome::Down(vec![r], Some(Box::new(v)));
        // The RTMR3 log was replayed against the quote: its `model` event is the attested hash.
        let model_event = attested
            .attestation
            .as_ref()
            .and_then(|a| a.rtmr3_events.iter().find(|e| e.event_type == "model"))
            .map(|e| e.payload.clone());
        let model_hash = match model_event.as_deref() {
            Some(h) if h.len() == 32 => {
                let mut b = [0u8; 32];
                b.copy_from_slice(h);
                b
            }
            Some([]) | None => {
                return down(
                    Reason::new(
                        "no_model",
                        "the worker's RTMR3 log measures no model: it serves no inference \
                         (start it with a model)",
                    ),
                    v,
                );
            }
            Some(h) => {
                return down(
                    Reason::new(
                        "rtmr3_log_invalid",
                        format!("the RTMR3 model event has {} bytes, not 32", h.len()),
                    ),
                    v,
                );
            }
        };
        if let Some(list) = &self.models {
            match list.check(&model_hash) {
                Ok(true) => {}
                Ok(false) => {
                    return down(
                        Reason::new(
                            "model_hash_not_allowed",
                            format!(
                                "the worker's model (SHA-256 {}) is not approved by the root \
                                 contract {} (the team publishes it with `host-launcher publish \
                                 model-hash`)",
                                hex::encode(model_hash),
                                list.root()
                            ),
                        ),
                        v,
                    );
                }
                Err(e) => return down(Reason::new("model_list_unavailable", e), v),
            }
        }
        let models_url = format!("{url}/v1/models");
        let models = match client.get(&models_url, self.timeout) {
            Ok(r) if r.status == 200 => serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|j| {
                    j["data"].as_array().map(|a| {
                        a.iter()
                            .filter_map(|m| m["id"].as_str().map(str::to_owned))
                            .collect::<Vec<_>>()
                    })
                })
                .unwrap_or_default(),
            Ok(r) => {
                let body = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
                let msg = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|j| j["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or(body);
                return down(
                    Reason::new(
                        "not_serving",
                        format!("GET {models_url} answered HTTP {}: {msg}", r.status),
                    ),
                    v,
                );
            }
            Err(e) => return down(Reason::new("unreachable", e.to_string()), v),
        };
        if models.is_empty() {
            return down(
                Reason::new("not_serving", format!("GET {models_url} lists no model")),
                v,
            );
        }
        let key = v.tls_public_key.clone().unwrap_or_default();
        let image_hash = match v.image_hash_checked.as_deref() {
            Some("cocoon-v1") => v.image_hash_cocoon_v1.clone(),
            _ => v.image_hash_cw_v1.clone(),
        };
        CheckOutcome::Up(Box::new(Verified {
            key,
            image_hash,
            model_hash: hex::encode(model_hash),
            models,
            verdict: v,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_client_certificates_get_their_own_reasons() {
        let mut v = Verification {
            verifier: Verifier::simulated(attestation::Policy::default(), [0; 32]),
            models: None,
            timeout: Duration::from_secs(1),
            client_identity: None,
        };
        let io = |why: &str| HttpError::Io {
            url: "https://w:1/attestation".into(),
            why: why.into(),
        };
        let r = v.transport_reason(&io("received fatal alert: CertificateRequired"));
        assert_eq!(r.code, "client_cert_required");
        assert!(r.message.contains("--client-cert"), "{}", r.message);
        // Without an identity a certificate_unknown alert is not about the gateway's certificate.
        let unknown = io("received fatal alert: CertificateUnknown");
        assert_eq!(v.transport_reason(&unknown).code, "unreachable");
        let (cert, key) =
            attestation::client_auth::ClientIdentity::generate_pem("t").expect("generate");
        let id =
            attestation::client_auth::ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes())
                .expect("load");
        let pin = hex::encode(id.cert_sha256());
        v.client_identity = Some(id);
        let r = v.transport_reason(&unknown);
        assert_eq!(r.code, "client_cert_refused");
        assert!(r.message.contains(&pin), "{}", r.message);
        assert_eq!(
            v.transport_reason(&io("connection refused")).code,
            "unreachable"
        );
    }
}
