//! RTMR3: the runtime events our guest agent extends (format version 1, defined here).
//!
//! Each event has a type (ASCII) and a payload (bytes). Its digest is
//!
//! ```text
//! SHA-384( "confidential-worker/rtmr3/v1" || 0x00
//!          || u16le(len(type)) || type
//!          || u32le(len(payload)) || payload )
//! ```
//!
//! The domain string and the length prefixes make every digest unambiguous: no two different
//! (type, payload) pairs, and no event of another system, hash to the same input.
//!
//! The agent extends exactly these events, in this order, once per boot, after it has read the
//! host configuration from fw_cfg and before it serves anything:
//!
//! | # | type            | payload                                                                  |
//! |---|-----------------|--------------------------------------------------------------------------|
//! | 1 | `host_config`   | SHA-384 of the exact host-config bytes received (48 bytes)               |
//! | 2 | `model`         | the 32-byte model digest (below), or empty when no model is served       |
//! | 3 | `payout_wallet` | the payout wallet address as UTF-8 (as written in the config), or empty  |
//! | 4 | `root_contract` | the root-contract address as UTF-8, or empty                             |
//! | 5 | `client_auth`   | only when the config has `client_auth`: the allowed client-certificate   |
//! |   |                 | SHA-256 pins, 32 bytes each, sorted, no duplicates (at least one)        |
//! | 6 | `dev_gpu_without_cc` | only when the config sets `dev_allow_gpu_without_cc: true`: empty   |
//! | 7 | `agent_ready`   | empty                                                                    |
//!
//! `model`, `payout_wallet` and `root_contract` repeat fields of the host config so a verifier
//! can check each against policy without parsing the config. They are taken from the config's
//! JSON fields by [`RuntimeInputs::from_host_config`], which the agent and the verifier both
//! call. The model digest is:
//!
//! - with a dm-verity model disk (`model_verity`): the model hash
//!   `SHA-256("name@revision:root_hash_hex")` of [`crate::model_disk::model_hash`], from the
//!   config's `model` (name), `model_verity.revision` and `model_verity.root_hash` — so the
//!   event covers the root hash the guest maps the disk with, and equals what the root
//!   contract's model list holds (`host-launcher publish model-hash model.json`);
//! - with a raw model disk or file: `model_sha256`, the SHA-256 of the GGUF file.
//!
//! A config with both `model_verity` and `model_sha256` is malformed.
//!
//! `client_auth` (mutual RA-TLS) is present exactly when the agent's TLS listener requires a
//! client certificate: its payload lists every certificate (by the SHA-256 of its DER) that the
//! listener admits, and the agent builds its client-certificate check from this event's payload.
//! A log without it (`root_contract` then `agent_ready`) is a worker that admits any TLS client.
//! Configs without `client_auth` keep the five events of before.
//! `dev_gpu_without_cc` says the guest may serve on GPUs that are not in confidential-computing
//! mode (a development flag of the host config): the agent takes that permission from this
//! event, and verifiers reject a log that has it unless told to accept it; configs without the
//! flag do not have the event.
//! `agent_ready` closes the sequence: a quote whose RTMR3 includes it was taken after the agent
//! finished its measured setup; anything extended after it is a deviation.

use crate::{Error, Mr, Result, extend, sha384};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};

/// Domain-separation prefix of every RTMR3 event digest.
pub const DOMAIN: &[u8] = b"confidential-worker/rtmr3/v1\0";

/// One runtime event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Event type (e.g. `host_config`).
    pub event_type: String,
    /// Payload bytes, as lowercase hex in JSON.
    #[serde(with = "hex_bytes")]
    pub payload: Vec<u8>,
    /// The digest extended into RTMR3.
    pub digest: Mr,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

impl Event {
    /// Build an event and compute its digest.
    pub fn new(event_type: &str, payload: Vec<u8>) -> Self {
        let digest = event_digest(event_type, &payload);
        Event {
            event_type: event_type.to_string(),
            payload,
            digest,
        }
    }
}

/// The digest of one event (see the module docs for the encoding).
pub fn event_digest(event_type: &str, payload: &[u8]) -> Mr {
    let mut h = Sha384::new();
    h.update(DOMAIN);
    h.update((event_type.len() as u16).to_le_bytes());
    h.update(event_type.as_bytes());
    h.update((payload.len() as u32).to_le_bytes());
    h.update(payload);
    Mr(h.finalize().into())
}

/// What the agent measures at runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInputs {
    /// The exact host-config bytes the guest received.
    #[serde(with = "hex_bytes")]
    pub host_config: Vec<u8>,
    /// The model digest, if a model is served: the model hash of a dm-verity model disk, or
    /// the SHA-256 of the model file (see the module docs).
    pub model_sha256: Option<[u8; 32]>,
    /// Payout wallet address.
    pub payout_wallet: Option<String>,
    /// Root contract address.
    pub root_contract: Option<String>,
    /// Mutual RA-TLS: the allowed client-certificate SHA-256 pins (sorted, no duplicates,
    /// non-empty), when the listener requires client certificates.
    #[serde(default)]
    pub client_cert_sha256: Option<Vec<[u8; 32]>>,
    /// Development: the guest may serve on GPUs that are not in confidential-computing mode
    /// (the config's `dev_allow_gpu_without_cc: true`).
    #[serde(default)]
    pub dev_gpu_without_cc: bool,
}

impl RuntimeInputs {
    /// Derive the inputs from the host-config bytes (a JSON object with optional string fields
    /// `model_sha256` (64 hex digits), `payout_wallet`, `root_contract`, and the optional
    /// `model_verity` object with `model`; see the module docs for the model digest).
    pub fn from_host_config(bytes: &[u8]) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
            what: "host config",
            reason: format!("not JSON: {e}"),
        })?;
        let field = |k: &str| -> Option<String> {
            v.get(k).and_then(|x| x.as_str()).map(|s| s.to_string())
        };
        let verity = v.get("model_verity").filter(|x| !x.is_null());
        let model_sha256 = match (field("model_sha256"), verity) {
            (Some(_), Some(_)) => {
                return Err(Error::Malformed {
                    what: "host config",
                    reason: "both model_sha256 and model_verity are set; a model comes either \
                             from a raw disk (model_sha256) or a dm-verity disk (model_verity)"
                        .into(),
                });
            }
            (None, Some(mv)) => {
                let bad = |reason: String| Error::Malformed {
                    what: "host config",
                    reason,
                };
                let name = field("model")
                    .ok_or_else(|| bad("model_verity is set but model (the name) is not".into()))?;
                let revision = mv
                    .get("revision")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| bad("model_verity.revision is missing".into()))?;
                let root_hex = mv
                    .get("root_hash")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| bad("model_verity.root_hash is missing".into()))?;
                crate::model_disk::check_label("model", &name)?;
                crate::model_disk::check_label("model_verity.revision", revision)?;
                let root: [u8; 32] = hex::decode(root_hex)
                    .ok()
                    .filter(|_| root_hex.bytes().all(|b| !b.is_ascii_uppercase()))
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        bad("model_verity.root_hash must be 64 lowercase hex digits".into())
                    })?;
                Some(crate::model_disk::model_hash(&name, revision, &root))
            }
            (None, None) => None,
            (Some(h), None) => {
                let b = hex::decode(&h).map_err(|e| Error::Malformed {
                    what: "host config",
                    reason: format!("model_sha256 is not hex: {e}"),
                })?;
                Some(b.try_into().map_err(|_| Error::Malformed {
                    what: "host config",
                    reason: "model_sha256 must be 32 bytes (64 hex digits)".into(),
                })?)
            }
        };
        let client_cert_sha256 = match v.get("client_auth").filter(|x| !x.is_null()) {
            None => None,
            Some(ca) => Some(client_auth_pins(ca)?),
        };
        let dev_gpu_without_cc = match v.get("dev_allow_gpu_without_cc") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::Malformed {
                    what: "host config",
                    reason: format!("dev_allow_gpu_without_cc must be true or false, not {other}"),
                });
            }
        };
        Ok(RuntimeInputs {
            host_config: bytes.to_vec(),
            model_sha256,
            payout_wallet: field("payout_wallet"),
            root_contract: field("root_contract"),
            client_cert_sha256,
            dev_gpu_without_cc,
        })
    }
}

/// The pins of a config's `client_auth` object: `cert_sha256`, a non-empty array of 64
/// lowercase hex digits each; returned sorted without duplicates.
fn client_auth_pins(ca: &serde_json::Value) -> Result<Vec<[u8; 32]>> {
    let bad = |reason: String| Error::Malformed {
        what: "host config",
        reason: format!("client_auth: {reason}"),
    };
    let list = ca
        .get("cert_sha256")
        .and_then(|x| x.as_array())
        .ok_or_else(|| {
            bad("cert_sha256 (an array of certificate SHA-256 pins) is missing".into())
        })?;
    let mut pins = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let pin = p
            .as_str()
            .filter(|s| s.bytes().all(|b| !b.is_ascii_uppercase()))
            .and_then(|s| hex::decode(s).ok())
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| bad(format!("cert_sha256[{i}] must be 64 lowercase hex digits")))?;
        pins.push(pin);
    }
    pins.sort_unstable();
    pins.dedup();
    if pins.is_empty() {
        return Err(bad(
            "cert_sha256 is empty: no client could connect (leave client_auth out to admit any \
             client)"
                .into(),
        ));
    }
    Ok(pins)
}

/// The allowed client-certificate pins a log's `client_auth` event lists (`None`: the log has
/// no such event, the worker admits any TLS client). A payload that is not whole 32-byte pins is
/// an error. Replay the log against the quote before trusting what this returns.
pub fn client_auth_from_events(events: &[Event]) -> Result<Option<Vec<[u8; 32]>>> {
    let Some(e) = events.iter().find(|e| e.event_type == "client_auth") else {
        return Ok(None);
    };
    if e.payload.is_empty() || e.payload.len() % 32 != 0 {
        return Err(Error::Malformed {
            what: "RTMR3 event log",
            reason: format!(
                "the client_auth event has {} bytes, not a non-empty multiple of 32",
                e.payload.len()
            ),
        });
    }
    Ok(Some(
        e.payload
            .chunks_exact(32)
            .map(|c| {
                let mut b = [0u8; 32];
                b.copy_from_slice(c);
                b
            })
            .collect(),
    ))
}

/// Whether a log has the `dev_gpu_without_cc` event (the guest may serve on GPUs without
/// confidential computing). Replay the log against the quote before trusting what this returns.
pub fn dev_gpu_without_cc_from_events(events: &[Event]) -> bool {
    events.iter().any(|e| e.event_type == DEV_GPU_WITHOUT_CC)
}

/// Type of the event extended when the host config allows GPUs without confidential computing.
pub const DEV_GPU_WITHOUT_CC: &str = "dev_gpu_without_cc";

/// The RTMR3 events for the given inputs, in extend order.
pub fn rtmr3_events(inp: &RuntimeInputs) -> Vec<Event> {
    let client_auth = inp
        .client_cert_sha256
        .as_ref()
        .map(|pins| Event::new("client_auth", pins.concat()));
    let dev_gpu = inp
        .dev_gpu_without_cc
        .then(|| Event::new(DEV_GPU_WITHOUT_CC, Vec::new()));
    [
        Event::new("host_config", sha384(&inp.host_config).0.to_vec()),
        Event::new(
            "model",
            inp.model_sha256.map(|m| m.to_vec()).unwrap_or_default(),
        ),
        Event::new(
            "payout_wallet",
            inp.payout_wallet.clone().unwrap_or_default().into_bytes(),
        ),
        Event::new(
            "root_contract",
            inp.root_contract.clone().unwrap_or_default().into_bytes(),
        ),
    ]
    .into_iter()
    .chain(client_auth)
    .chain(dev_gpu)
    .chain([Event::new("agent_ready", Vec::new())])
    .collect()
}

/// Replay events from the zero register. Fails if an event's stored digest does not match its
/// type and payload (a forged log).
pub fn replay(events: &[Event]) -> Result<Mr> {
    let mut mr = Mr::ZERO;
    for (i, e) in events.iter().enumerate() {
        let d = event_digest(&e.event_type, &e.payload);
        if d != e.digest {
            return Err(Error::Malformed {
                what: "RTMR3 event log",
                reason: format!(
                    "event {i} ({}) digest {} does not match its payload (expected {d})",
                    e.event_type, e.digest
                ),
            });
        }
        mr = extend(&mr, &d);
    }
    Ok(mr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_encoding_is_as_documented() {
        let mut raw = DOMAIN.to_vec();
        raw.extend_from_slice(&5u16.to_le_bytes());
        raw.extend_from_slice(b"model");
        raw.extend_from_slice(&3u32.to_le_bytes());
        raw.extend_from_slice(b"abc");
        assert_eq!(event_digest("model", b"abc"), sha384(&raw));
        // Length prefixes: moving a byte between type and payload changes the digest.
        assert_ne!(event_digest("ab", b"c"), event_digest("a", b"bc"));
    }

    #[test]
    fn events_from_host_config_and_replay() {
        let cfg = br#"{"model":"m","model_sha256":"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff","payout_wallet":"EQabc","root_contract":null}"#;
        let inp = RuntimeInputs::from_host_config(cfg).expect("inputs");
        assert_eq!(inp.payout_wallet.as_deref(), Some("EQabc"));
        assert_eq!(inp.root_contract, None);
        let ev = rtmr3_events(&inp);
        let types: Vec<&str> = ev.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "host_config",
                "model",
                "payout_wallet",
                "root_contract",
                "agent_ready"
            ]
        );
        assert_eq!(ev[0].payload, sha384(cfg).0.to_vec());
        assert_eq!(ev[1].payload.len(), 32);
        let mr = replay(&ev).expect("replay");
        assert_eq!(mr, crate::replay_digests(ev.iter().map(|e| &e.digest)));
        let mut forged = ev.clone();
        forged[2].payload = b"EQevil".to_vec();
        assert!(replay(&forged).is_err());
        assert!(RuntimeInputs::from_host_config(b"not json").is_err());
        assert!(RuntimeInputs::from_host_config(br#"{"model_sha256":"zz"}"#).is_err());
        // A dm-verity model disk: the model event is the model hash, which covers the root.
        let root = "ab".repeat(32);
        let verity = |name: &str, rev: &str, root: &str| {
            format!(
                r#"{{"model":"{name}","model_sha256":null,"model_verity":{{"revision":"{rev}","root_hash":"{root}"}}}}"#
            )
        };
        let inp = RuntimeInputs::from_host_config(verity("m", "r1", &root).as_bytes())
            .expect("verity inputs");
        assert_eq!(
            inp.model_sha256,
            Some(crate::model_disk::model_hash("m", "r1", &[0xab; 32]))
        );
        let other = RuntimeInputs::from_host_config(verity("m", "r1", &"cd".repeat(32)).as_bytes())
            .expect("other root");
        assert_ne!(
            rtmr3_events(&other)[1],
            rtmr3_events(&inp)[1],
            "root changes the event"
        );
        for bad in [
            verity("m", "r1", &"AB".repeat(32)),
            verity("m", "r1", "abc"),
            verity("m", "a@b", &root),
            verity("a:b", "r1", &root),
            r#"{"model_verity":{"revision":"r1","root_hash":"00"}}"#.to_string(),
            format!(
                r#"{{"model":"m","model_sha256":"{}","model_verity":{{"revision":"r","root_hash":"{root}"}}}}"#,
                "00".repeat(32)
            ),
        ] {
            assert!(
                RuntimeInputs::from_host_config(bad.as_bytes()).is_err(),
                "accepted {bad}"
            );
        }
        assert_eq!(client_auth_from_events(&ev).expect("no event"), None);
        // JSON form round-trips.
        let j = serde_json::to_string(&ev).expect("json");
        let back: Vec<Event> = serde_json::from_str(&j).expect("parse");
        assert_eq!(back, ev);
    }

    #[test]
    fn the_dev_gpu_flag_adds_an_event_and_a_bad_value_is_malformed() {
        let cfg = br#"{"model":null,"dev_allow_gpu_without_cc":true}"#;
        let inp = RuntimeInputs::from_host_config(cfg).expect("inputs");
        assert!(inp.dev_gpu_without_cc);
        let ev = rtmr3_events(&inp);
        let types: Vec<&str> = ev.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "host_config",
                "model",
                "payout_wallet",
                "root_contract",
                "dev_gpu_without_cc",
                "agent_ready"
            ]
        );
        assert!(dev_gpu_without_cc_from_events(&ev));
        for off in [
            &br#"{"model":null}"#[..],
            br#"{"model":null,"dev_allow_gpu_without_cc":false}"#,
            br#"{"model":null,"dev_allow_gpu_without_cc":null}"#,
        ] {
            let ev = rtmr3_events(&RuntimeInputs::from_host_config(off).expect("inputs"));
            assert_eq!(ev.len(), 5);
            assert!(!dev_gpu_without_cc_from_events(&ev));
        }
        let e = RuntimeInputs::from_host_config(br#"{"dev_allow_gpu_without_cc":"yes"}"#)
            .expect_err("a string is not a flag");
        assert!(e.to_string().contains("true or false"), "{e}");
    }

    #[test]
    fn client_auth_adds_an_event_with_the_sorted_pins() {
        let (a, b) = ("bb".repeat(32), "aa".repeat(32));
        let cfg =
            format!(r#"{{"model":null,"client_auth":{{"cert_sha256":["{a}","{b}","{a}"]}}}}"#);
        let inp = RuntimeInputs::from_host_config(cfg.as_bytes()).expect("inputs");
        assert_eq!(inp.client_cert_sha256, Some(vec![[0xaa; 32], [0xbb; 32]]));
        let ev = rtmr3_events(&inp);
        let types: Vec<&str> = ev.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "host_config",
                "model",
                "payout_wallet",
                "root_contract",
                "client_auth",
                "agent_ready"
            ]
        );
        assert_eq!(ev[4].payload, [[0xaa; 32], [0xbb; 32]].concat());
        assert_eq!(
            client_auth_from_events(&ev).expect("pins"),
            Some(vec![[0xaa; 32], [0xbb; 32]])
        );
        // The requirement changes RTMR3: a host cannot hide it.
        let open = RuntimeInputs::from_host_config(br#"{"model":null}"#).expect("open");
        assert_eq!(rtmr3_events(&open).len(), 5);
        assert_ne!(
            replay(&ev).expect("replay"),
            replay(&rtmr3_events(&RuntimeInputs {
                client_cert_sha256: None,
                ..inp.clone()
            }))
            .expect("replay")
        );
        // `null` is the same as absent.
        let null = RuntimeInputs::from_host_config(br#"{"client_auth":null}"#).expect("null");
        assert_eq!(null.client_cert_sha256, None);
        for bad in [
            r#"{"client_auth":{}}"#.to_string(),
            r#"{"client_auth":{"cert_sha256":[]}}"#.to_string(),
            r#"{"client_auth":{"cert_sha256":"aa"}}"#.to_string(),
            r#"{"client_auth":{"cert_sha256":["abc"]}}"#.to_string(),
            format!(
                r#"{{"client_auth":{{"cert_sha256":["{}"]}}}}"#,
                "AA".repeat(32)
            ),
            r#"{"client_auth":{"cert_sha256":[7]}}"#.to_string(),
        ] {
            let err = RuntimeInputs::from_host_config(bad.as_bytes()).expect_err(&bad);
            assert!(err.to_string().contains("client_auth"), "{err}");
        }
        let mut forged = ev.clone();
        forged[4] = Event::new("client_auth", vec![1; 33]);
        assert!(client_auth_from_events(&forged).is_err());
    }
}
