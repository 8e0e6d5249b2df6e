//! Mutual RA-TLS with pinned client certificates: which TLS clients a worker admits.
//!
//! The worker side is a plain pin check, not RA-TLS: clients (a gateway, `host-launcher chat`)
//! run on ordinary machines without a TEE, so their certificate proves only that they hold its
//! key. The host lists the allowed certificates by the SHA-256 of their DER encoding in the
//! measured host config (`worker_api::ClientAuth`); the agent extends them into RTMR3 as the
//! `client_auth` event (`measurements::rtmr3`) and builds its [`PinnedClientCerts`] verifier from
//! that event, so what a verifier reads in the log is exactly what the listener enforces.
//!
//! - [`ClientIdentity`]: a client's certificate and key (PEM files, any key type rustls' ring
//!   provider signs with: Ed25519, ECDSA P-256/P-384, RSA), presented when the server asks.
//! - [`PinnedClientCerts`]: the server's `ClientCertVerifier`: a certificate must be one of the
//!   pins, and the handshake signature must be made with its key. Validity dates are not
//!   checked: the pin is the trust (remove it to revoke).
//! - [`cert_sha256_from_pem`]: the pin of a PEM certificate (`host-launcher run
//!   --allow-client-cert FILE`).

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::verify_tls13_signature;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::tls::provider;

/// Why a client identity or pin cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The PEM holds no usable certificate or key.
    #[error("{what}: {why}")]
    Pem {
        /// Which input.
        what: String,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// Generating a certificate failed.
    #[error("cannot generate a client certificate: {0}")]
    Generate(String),
}

/// SHA-256 of a certificate's DER encoding: the pin.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn certs_from_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientAuthError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientAuthError::Pem {
            what: what.to_owned(),
            why: format!("not a PEM certificate file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(ClientAuthError::Pem {
            what: what.to_owned(),
            why: "no -----BEGIN CERTIFICATE----- block in it".into(),
        });
    }
    Ok(certs)
}

/// The pin of the first certificate in a PEM file's bytes (the end-entity certificate).
pub fn cert_sha256_from_pem(what: &str, pem: &[u8]) -> Result<[u8; 32], ClientAuthError> {
    Ok(cert_sha256(certs_from_pem(what, pem)?[0].as_ref()))
}

/// A TLS client's certificate chain and private key, presented to servers that ask for one.
#[derive(Clone)]
pub struct ClientIdentity {
    key: Arc<CertifiedKey>,
    sha256: [u8; 32],
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClientIdentity")
            .field("cert_sha256", &hex::encode(self.sha256))
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// From PEM bytes: a certificate (chain, end-entity first) and its private key (PKCS#8,
    /// PKCS#1 or SEC1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, ClientAuthError> {
        let certs = certs_from_pem("the client certificate", cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| ClientAuthError::Pem {
            what: "the client key".into(),
            why: format!("no PEM private key in it ({e})"),
        })?;
        let signing =
            provider()
                .key_provider
                .load_private_key(key)
                .map_err(|e| ClientAuthError::Pem {
                    what: "the client key".into(),
                    why: format!("unsupported key ({e}); use Ed25519, ECDSA P-256/P-384 or RSA"),
                })?;
        let sha256 = cert_sha256(certs[0].as_ref());
        let key = Arc::new(CertifiedKey::new(certs, signing));
        key.keys_match().map_err(|e| ClientAuthError::Pem {
            what: "the client key".into(),
            why: format!("it is not the key of the client certificate ({e})"),
        })?;
        Ok(Self { key, sha256 })
    }

    /// From two PEM files (`--client-cert FILE --client-key FILE`).
    pub fn from_pem_files(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, ClientAuthError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| ClientAuthError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// A fresh self-signed Ed25519 certificate for `common_name`: (certificate PEM, key PEM).
    pub fn generate_pem(common_name: &str) -> Result<(String, String), ClientAuthError> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| ClientAuthError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| ClientAuthError::Generate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params
            .self_signed(&kp)
            .map_err(|e| ClientAuthError::Generate(e.to_string()))?;
        Ok((cert.pem(), kp.serialize_pem()))
    }

    /// The pin of the certificate presented.
    pub fn cert_sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// As a rustls client-certificate resolver ([`crate::tls::client_config`]).
    pub fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        Arc::new(self.clone())
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key
            .key
            .choose_scheme(schemes)
            .is_some()
            .then(|| self.key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A client certificate that is not pinned (the message names its SHA-256, never a secret).
#[derive(Debug, thiserror::Error)]
#[error(
    "client certificate SHA-256 {got} is not one of the {allowed} allowed by this worker's \
     measured client_auth"
)]
pub struct NotPinned {
    /// The presented certificate's SHA-256, hex.
    pub got: String,
    /// How many pins there are.
    pub allowed: usize,
}

/// Server side: admits exactly the clients whose certificate SHA-256 is pinned.
#[derive(Debug, Clone)]
pub struct PinnedClientCerts {
    pins: Vec<[u8; 32]>,
}

impl PinnedClientCerts {
    /// Admit these certificates (by the SHA-256 of their DER). An empty list admits no one.
    pub fn new(mut pins: Vec<[u8; 32]>) -> Self {
        pins.sort_unstable();
        pins.dedup();
        Self { pins }
    }

    /// The pins, sorted.
    pub fn pins(&self) -> &[[u8; 32]] {
        &self.pins
    }

    /// As a rustls verifier ([`crate::tls::server_config`]).
    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(self.clone())
    }
}

impl ClientCertVerifier for PinnedClientCerts {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = cert_sha256(end_entity.as_ref());
        if self.pins.binary_search(&got).is_ok() {
            return Ok(ClientCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(NotPinned {
                got: hex::encode(got),
                allowed: self.pins.len(),
            })),
        )))
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("RA-TLS is TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulated::SimulatedTee;
    use crate::tls::{
        RaTlsCertResolver, RaTlsServerVerifier, client_config, handshake_in_memory, server_config,
    };
    use crate::{Policy, RaTlsIdentity, TdRegisters, Verifier};

    fn now() -> u64 {
        crate::verify::unix_secs(std::time::SystemTime::now())
    }

    #[test]
    fn pem_identity_loads_and_its_pin_matches() {
        let (cert, key) = ClientIdentity::generate_pem("gateway").expect("generate");
        let id = ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes()).expect("load");
        assert_eq!(
            id.cert_sha256(),
            cert_sha256_from_pem("c", cert.as_bytes()).expect("pin")
        );
        assert!(!format!("{id:?}").contains("PRIVATE"));
        let (_, other_key) = ClientIdentity::generate_pem("other").expect("generate");
        let err = ClientIdentity::from_pem(cert.as_bytes(), other_key.as_bytes())
            .expect_err("mismatched key");
        assert!(err.to_string().contains("not the key"), "{err}");
        let err = ClientIdentity::from_pem(b"junk", key.as_bytes()).expect_err("junk");
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
        let err = ClientIdentity::from_pem(cert.as_bytes(), b"junk").expect_err("junk key");
        assert!(err.to_string().contains("client key"), "{err}");
        assert!(cert_sha256_from_pem("c", key.as_bytes()).is_err());
    }

    #[test]
    fn pinned_server_admits_only_pinned_clients() {
        let tee = SimulatedTee::generate(TdRegisters::default()).expect("tee");
        let resolver = Arc::new(
            RaTlsCertResolver::new(RaTlsIdentity::generate(&tee, now()).expect("id"))
                .expect("resolver"),
        );
        let verifier =
            Verifier::simulated(Policy::default().with_simulated(true), tee.public_key());
        let (cert, key) = ClientIdentity::generate_pem("gateway").expect("generate");
        let good = ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes()).expect("load");
        let (c2, k2) = ClientIdentity::generate_pem("stranger").expect("generate");
        let stranger = ClientIdentity::from_pem(c2.as_bytes(), k2.as_bytes()).expect("load");
        let pins = PinnedClientCerts::new(vec![good.cert_sha256()]);
        let server =
            Arc::new(server_config(resolver.clone(), Some(pins.verifier())).expect("server"));
        let client = |id: Option<&ClientIdentity>| {
            let sv = Arc::new(RaTlsServerVerifier::new(verifier.clone()));
            Arc::new(client_config(sv, id.map(|i| i.resolver())).expect("client"))
        };
        handshake_in_memory(client(Some(&good)), server.clone()).expect("pinned client");
        let err = handshake_in_memory(client(None), server.clone()).expect_err("no cert");
        assert!(
            matches!(err, rustls::Error::NoCertificatesPresented),
            "{err:?}"
        );
        let err =
            handshake_in_memory(client(Some(&stranger)), server.clone()).expect_err("stranger");
        let text = err.to_string();
        assert!(
            text.contains(&hex::encode(stranger.cert_sha256())) && text.contains("NotPinned"),
            "{text}"
        );
        // A server that does not ask still talks to a client with an identity.
        let open = Arc::new(server_config(resolver, None).expect("open"));
        handshake_in_memory(client(Some(&good)), open).expect("unasked");
    }
}
