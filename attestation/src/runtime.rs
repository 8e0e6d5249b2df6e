//! RTMR3 checking: the agent's runtime event log (served on `GET /attestation`, see
//! `worker_api::AttestationInfo`) is replayed and compared with the quote's RTMR3, and — when the
//! verifier knows the host config it expects — the events are compared with the ones that config
//! implies (`measurements::rtmr3::rtmr3_events`). Each mismatch is its own [`ReasonCode`]:
//!
//! - [`ReasonCode::Rtmr3LogUnavailable`]: no log (not fetched, not parseable, or no registers),
//! - [`ReasonCode::Rtmr3LogInvalid`]: an event's digest does not match its type and payload,
//! - [`ReasonCode::Rtmr3Mismatch`]: the replayed value is not the quote's RTMR3,
//! - [`ReasonCode::HostConfigMismatch`]: the `host_config` event covers other bytes,
//! - [`ReasonCode::Rtmr3EventsUnexpected`]: the other events differ from what the config implies.

use measurements::Mr;
use measurements::rtmr3::{Event, RuntimeInputs, replay, rtmr3_events};
use serde::{Deserialize, Serialize};

use crate::verdict::{ReasonCode, Verdict};

/// What the RTMR3 check found (part of the [`Verdict`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Rtmr3Check {
    /// Number of events in the agent's log.
    pub events: usize,
    /// Event types, in log order.
    pub event_types: Vec<String>,
    /// RTMR3 replayed from the log (hex), when the log was consistent.
    pub replayed: Option<String>,
    /// The quote's RTMR3 (hex).
    pub quote_rtmr3: Option<String>,
    /// Whether the events were compared with an expected host config.
    pub host_config_checked: bool,
    /// Mutual RA-TLS: the SHA-256 pins (hex) of the client certificates the worker admits, from
    /// its `client_auth` event; absent when the log has none (the worker admits any client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_sha256: Option<Vec<String>>,
    /// The log has the `dev_gpu_without_cc` event: the worker may serve on GPUs that are not in
    /// confidential-computing mode (see [`check_dev_gpu`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dev_gpu_without_cc: bool,
}

/// A worker whose measured host config lets it serve on GPUs without confidential computing
/// (the `dev_gpu_without_cc` RTMR3 event) cannot keep prompts from the host: rejected with
/// [`ReasonCode::DevGpuWithoutCc`] unless the verifier's policy accepts it (development only).
/// Call after [`check_rtmr3`] (which replays the log against the quote).
pub fn check_dev_gpu(v: &mut Verdict, events: &[Event], allow: bool) {
    if !measurements::rtmr3::dev_gpu_without_cc_from_events(events) {
        return;
    }
    if let Some(c) = v.rtmr3.as_mut() {
        c.dev_gpu_without_cc = true;
    }
    if !allow {
        v.reject(
            ReasonCode::DevGpuWithoutCc,
            "the worker's measured host config allows serving on GPUs that are not in              confidential-computing mode (dev_allow_gpu_without_cc): the host could read prompts              in GPU memory; accept it only for development (--allow-dev-gpu-without-cc)",
        );
    }
}

/// Derive the runtime inputs the agent measures from the host-config bytes it received (the
/// agent and verifiers both call this). Bytes that are not a JSON object with valid fields still
/// get their `host_config` event (over the exact bytes); the other events are then empty.
pub fn runtime_inputs(host_config: &[u8]) -> RuntimeInputs {
    RuntimeInputs::from_host_config(host_config).unwrap_or_else(|_| RuntimeInputs {
        host_config: host_config.to_vec(),
        ..RuntimeInputs::default()
    })
}

/// The RTMR3 events an agent extends for `host_config` (`None`: no config was supplied, which is
/// measured as an empty config).
pub fn expected_events(host_config: Option<&[u8]>) -> Vec<Event> {
    rtmr3_events(&runtime_inputs(host_config.unwrap_or_default()))
}

/// Check `events` (the agent's log) against the verdict's RTMR3 and, when given, the expected
/// host-config bytes. Records reasons in `v` and the findings in `v.rtmr3`.
pub fn check_rtmr3(v: &mut Verdict, events: &[Event], expected_host_config: Option<&[u8]>) {
    let mut c = Rtmr3Check {
        events: events.len(),
        event_types: events.iter().map(|e| e.event_type.clone()).collect(),
        ..Rtmr3Check::default()
    };
    let quote_rtmr3 = v
        .registers
        .as_ref()
        .and_then(|r| Mr::from_hex(&r.rtmr3).ok());
    c.quote_rtmr3 = quote_rtmr3.map(|m| m.to_hex());
    match measurements::rtmr3::client_auth_from_events(events) {
        Ok(pins) => {
            c.client_cert_sha256 = pins.map(|p| p.iter().map(hex::encode).collect());
        }
        Err(e) => v.reject(
            ReasonCode::Rtmr3LogInvalid,
            format!("the agent's RTMR3 event log is malformed: {e}"),
        ),
    }
    match replay(events) {
        Err(e) => v.reject(
            ReasonCode::Rtmr3LogInvalid,
            format!("the agent's RTMR3 event log is inconsistent: {e}"),
        ),
        Ok(mr) => {
            c.replayed = Some(mr.to_hex());
            match quote_rtmr3 {
                None => v.reject(
                    ReasonCode::Rtmr3LogUnavailable,
                    "the quote's RTMR3 is unknown (the quote was not parsed), so the event log cannot be checked",
                ),
                Some(q) if q != mr => v.reject(
                    ReasonCode::Rtmr3Mismatch,
                    format!(
                        "replaying the agent's {} RTMR3 events gives {mr}, but the quote's RTMR3 is {q}: the log is not what was measured (or the agent could not extend RTMR3; see its /health)",
                        events.len()
                    ),
                ),
                Some(_) => {}
            }
        }
    }
    if let Some(cfg) = expected_host_config {
        c.host_config_checked = true;
        let want = expected_events(Some(cfg));
        let got_cfg = events.iter().find(|e| e.event_type == "host_config");
        match got_cfg {
            Some(e) if e.payload == want[0].payload => {}
            Some(e) => v.reject(
                ReasonCode::HostConfigMismatch,
                format!(
                    "the agent measured a host config with SHA-384 {}, but the expected config ({} bytes) has SHA-384 {}: the host handed the guest another config",
                    hex::encode(&e.payload),
                    cfg.len(),
                    hex::encode(&want[0].payload)
                ),
            ),
            None => v.reject(
                ReasonCode::HostConfigMismatch,
                "the agent's RTMR3 log has no host_config event",
            ),
        }
        let rest = |evs: &[Event]| -> Vec<(String, Vec<u8>)> {
            evs.iter()
                .filter(|e| e.event_type != "host_config")
                .map(|e| (e.event_type.clone(), e.payload.clone()))
                .collect()
        };
        let order_ok = events.first().map(|e| e.event_type.as_str()) == Some("host_config");
        if rest(events) != rest(&want) || !order_ok {
            let types: Vec<&str> = want.iter().map(|e| e.event_type.as_str()).collect();
            v.reject(
                ReasonCode::Rtmr3EventsUnexpected,
                format!(
                    "the agent's RTMR3 events ({}) differ from the ones the expected host config implies ({}) in type, order or payload",
                    c.event_types.join(", "),
                    types.join(", ")
                ),
            );
        }
    }
    v.rtmr3 = Some(c);
    v.accepted = v.reasons.is_empty();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_gpu_worker_is_rejected_unless_the_policy_accepts_it() {
        let events = expected_events(Some(br#"{"dev_allow_gpu_without_cc":true}"#));
        let mut v = Verdict {
            rtmr3: Some(Rtmr3Check::default()),
            ..Verdict::default()
        };
        check_dev_gpu(&mut v, &events, false);
        assert!(v.has(ReasonCode::DevGpuWithoutCc), "{:?}", v.reasons);
        assert!(v.rtmr3.as_ref().is_some_and(|c| c.dev_gpu_without_cc));
        let mut ok = Verdict::default();
        check_dev_gpu(&mut ok, &events, true);
        assert!(!ok.has(ReasonCode::DevGpuWithoutCc));
        let mut plain = Verdict::default();
        check_dev_gpu(&mut plain, &expected_events(Some(b"{}")), false);
        assert!(plain.reasons.is_empty());
    }
    use crate::quote::TdRegisters;

    fn verdict_with_rtmr3(r: Mr) -> Verdict {
        let mut regs = TdRegisters::default();
        regs.rtmr[3] = r.0;
        Verdict {
            registers: Some(regs.to_hex()),
            ..Verdict::default()
        }
        .finish()
    }

    const CFG: &[u8] =
        br#"{"model":null,"model_sha256":null,"payout_wallet":"EQabc","root_contract":null}"#;

    #[test]
    fn matching_log_and_config_are_accepted() {
        let ev = expected_events(Some(CFG));
        let mut v = verdict_with_rtmr3(replay(&ev).expect("replay"));
        check_rtmr3(&mut v, &ev, Some(CFG));
        assert!(v.accepted, "{:?}", v.reasons);
        let c = v.rtmr3.expect("check");
        assert_eq!(c.events, 5);
        assert!(c.host_config_checked);
        assert_eq!(c.replayed, c.quote_rtmr3);
        assert_eq!(c.client_cert_sha256, None);
    }

    #[test]
    fn the_client_auth_requirement_is_shown_and_checked() {
        let pin = "ab".repeat(32);
        let cfg = format!(r#"{{"model":null,"client_auth":{{"cert_sha256":["{pin}"]}}}}"#);
        let ev = expected_events(Some(cfg.as_bytes()));
        let mut v = verdict_with_rtmr3(replay(&ev).expect("replay"));
        check_rtmr3(&mut v, &ev, None);
        assert!(v.accepted, "{:?}", v.reasons);
        let c = v.rtmr3.expect("check");
        assert_eq!(c.client_cert_sha256, Some(vec![pin.clone()]));
        let json = serde_json::to_string(&c).expect("json");
        assert!(
            json.contains(&format!(r#""client_cert_sha256":["{pin}"]"#)),
            "{json}"
        );
        // A log that hides the requirement does not match the quote's RTMR3.
        let hidden: Vec<Event> = ev
            .iter()
            .filter(|e| e.event_type != "client_auth")
            .cloned()
            .collect();
        let mut v = verdict_with_rtmr3(replay(&ev).expect("replay"));
        check_rtmr3(&mut v, &hidden, None);
        assert!(!v.accepted);
        assert!(
            v.reasons
                .iter()
                .any(|r| r.code == ReasonCode::Rtmr3Mismatch)
        );
        // With the expected config, a worker without the requirement is another config.
        let open = expected_events(Some(CFG));
        let mut v = verdict_with_rtmr3(replay(&open).expect("replay"));
        check_rtmr3(&mut v, &open, Some(cfg.as_bytes()));
        assert!(
            v.reasons
                .iter()
                .any(|r| r.code == ReasonCode::Rtmr3EventsUnexpected)
        );
    }

    #[test]
    fn each_mismatch_has_its_own_reason() {
        let ev = expected_events(Some(CFG));
        let good = replay(&ev).expect("replay");

        // Quote RTMR3 differs (e.g. the extension failed on real TDX: RTMR3 stayed zero).
        let mut v = verdict_with_rtmr3(Mr::ZERO);
        check_rtmr3(&mut v, &ev, None);
        assert!(v.has(ReasonCode::Rtmr3Mismatch), "{:?}", v.reasons);
        assert_eq!(v.reasons.len(), 1);

        // A forged event (payload changed, digest kept).
        let mut forged = ev.clone();
        forged[2].payload = b"EQevil".to_vec();
        let mut v = verdict_with_rtmr3(good);
        check_rtmr3(&mut v, &forged, None);
        assert!(v.has(ReasonCode::Rtmr3LogInvalid), "{:?}", v.reasons);

        // A consistent log for another config: replay matches its own quote, config does not.
        let other = br#"{"payout_wallet":"EQother"}"#;
        let ev2 = expected_events(Some(other));
        let mut v = verdict_with_rtmr3(replay(&ev2).expect("replay"));
        check_rtmr3(&mut v, &ev2, Some(CFG));
        assert!(v.has(ReasonCode::HostConfigMismatch), "{:?}", v.reasons);
        assert!(v.has(ReasonCode::Rtmr3EventsUnexpected), "{:?}", v.reasons);
        assert!(!v.has(ReasonCode::Rtmr3Mismatch));

        // Same config event, but an extra event appended after agent_ready.
        let mut extra = ev.clone();
        extra.push(Event::new("late", b"x".to_vec()));
        let mut v = verdict_with_rtmr3(replay(&extra).expect("replay"));
        check_rtmr3(&mut v, &extra, Some(CFG));
        assert!(v.has(ReasonCode::Rtmr3EventsUnexpected), "{:?}", v.reasons);
        assert!(!v.has(ReasonCode::HostConfigMismatch));

        // No registers at all.
        let mut v = Verdict::default().finish();
        check_rtmr3(&mut v, &ev, None);
        assert!(v.has(ReasonCode::Rtmr3LogUnavailable));
    }

    #[test]
    fn absent_and_malformed_configs_are_measured_over_their_bytes() {
        let none = expected_events(None);
        assert_eq!(none[0].payload, measurements::sha384(b"").0.to_vec());
        let bad = expected_events(Some(b"not json"));
        assert_eq!(bad[0].payload, measurements::sha384(b"not json").0.to_vec());
        assert!(bad[1].payload.is_empty() && bad[2].payload.is_empty());
        assert_eq!(bad.len(), 5);
    }
}
