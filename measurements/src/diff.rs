//! Compare expected registers with what a TD reported (a quote, an event log, or both) and
//! explain each difference in words.
//!
//! With an event log, a differing register is explained by its first differing event
//! ("RTMR1 differs: expected kernel digest X, the log has Y (event #12, EV_EFI_BOOT_SERVICES_APPLICATION ...)").
//! With only a quote, the message says which register differs and that a log is needed to say why.

use crate::Mr;
use crate::compute::Computed;
use crate::eventlog::Replay;
use crate::quote::Quote;
use crate::rtmr0::ExpectedEvent;
use serde::Serialize;

/// Outcome for one register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Equal.
    Match,
    /// Different.
    Mismatch,
    /// Not compared (no expected value).
    NotComputed,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// "MRTD", "RTMR0".. or "LOG".
    pub register: String,
    /// Outcome.
    pub status: Status,
    /// Explanation.
    pub message: String,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when every compared register matches.
    pub all_match: bool,
    /// Per-register findings.
    pub findings: Vec<Finding>,
}

fn explain_events(reg: &str, exp: &[ExpectedEvent], replay: &Replay, idx: u32) -> String {
    let got: Vec<&crate::eventlog::LogEvent> = replay
        .events
        .iter()
        .filter(|e| e.extended && e.mr_index == idx)
        .collect();
    for (i, e) in exp.iter().enumerate() {
        match got.get(i) {
            None => {
                return format!(
                    "{reg} differs: the log ends after {} events; expected next: {} digest {}",
                    got.len(),
                    e.label,
                    e.digest
                );
            }
            Some(g) if g.digest != Some(e.digest) => {
                let have = g
                    .digest
                    .map(|d| d.to_hex())
                    .unwrap_or_else(|| "none".into());
                return format!(
                    "{reg} differs: expected {} digest {}, the log has {} (event #{}, {}: {})",
                    e.label, e.digest, have, g.index, g.event_type_name, g.description
                );
            }
            Some(_) => {}
        }
    }
    if got.len() > exp.len() {
        let g = got[exp.len()];
        return format!(
            "{reg} differs: the log has {} extra event(s) after the expected {}; first: #{} {}: {}",
            got.len() - exp.len(),
            exp.len(),
            g.index,
            g.event_type_name,
            g.description
        );
    }
    format!("{reg} differs although every event matches (internal inconsistency)")
}

/// Compare expected registers with a quote and/or a replayed log.
pub fn compare(exp: &Computed, quote: Option<&Quote>, log: Option<&Replay>) -> Report {
    let mut f = Vec::new();
    if let Some(q) = quote {
        f.push(if q.report.mr_td == exp.mrtd {
            Finding {
                register: "MRTD".into(),
                status: Status::Match,
                message: format!("MRTD matches ({})", exp.mrtd),
            }
        } else {
            Finding {
                register: "MRTD".into(),
                status: Status::Mismatch,
                message: format!(
                    "MRTD differs: expected {} ({:?} page order), the quote has {}: a different firmware \
                     build, or the host adds pages in the other order (try --two-pass)",
                    exp.mrtd, exp.page_order, q.report.mr_td
                ),
            }
        });
    }
    for i in 0..3usize {
        let reg = format!("RTMR{i}");
        let Some(want) = exp.rtmr(i) else {
            f.push(Finding {
                register: reg.clone(),
                status: Status::NotComputed,
                message: format!(
                    "{reg} not compared: {}",
                    exp.missing
                        .get(&format!("rtmr{i}"))
                        .cloned()
                        .unwrap_or_else(|| "not computed".into())
                ),
            });
            continue;
        };
        let quote_val: Option<Mr> = quote.map(|q| match i {
            0 => q.report.rtmr0,
            1 => q.report.rtmr1,
            _ => q.report.rtmr2,
        });
        let log_val = log.map(|l| l.rtmr[i]);
        let actual = quote_val.or(log_val);
        let Some(actual) = actual else { continue };
        if actual == want {
            f.push(Finding {
                register: reg.clone(),
                status: Status::Match,
                message: format!("{reg} matches ({want})"),
            });
            continue;
        }
        let message = match (log, exp.events.get(&format!("rtmr{i}"))) {
            (Some(l), Some(ev)) => explain_events(&reg, ev, l, i as u32 + 1),
            _ => format!(
                "{reg} differs: expected {want}, the {} has {actual}; pass the event log \
                 (--ccel-table/--ccel-data) to see which event differs",
                if quote_val.is_some() { "quote" } else { "log" }
            ),
        };
        f.push(Finding {
            register: reg,
            status: Status::Mismatch,
            message,
        });
    }
    if let (Some(q), Some(l)) = (quote, log) {
        let qr = [
            q.report.rtmr0,
            q.report.rtmr1,
            q.report.rtmr2,
            q.report.rtmr3,
        ];
        for (i, qv) in qr.iter().enumerate().take(3) {
            if *qv != l.rtmr[i] {
                f.push(Finding {
                    register: "LOG".into(),
                    status: Status::Mismatch,
                    message: format!(
                        "the event log replays RTMR{i} to {}, but the quote has {qv}: the log is \
                         incomplete or not from this TD; do not trust its event list",
                        l.rtmr[i]
                    ),
                });
            }
        }
    }
    let all_match = f.iter().all(|x| x.status != Status::Mismatch);
    Report {
        all_match,
        findings: f,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventlog::LogEvent;
    use crate::rtmr0::{FirmwareLayout, separator_digest};
    use crate::sha384;
    use crate::tdvf::PageOrder;
    use std::collections::BTreeMap;

    fn ev(idx: usize, mr: u32, d: Mr) -> LogEvent {
        LogEvent {
            index: idx,
            mr_index: mr,
            register: crate::eventlog::register_name(mr),
            event_type: 0x8000_0003,
            event_type_name: "EV_EFI_BOOT_SERVICES_APPLICATION".into(),
            digest: Some(d),
            data: String::new(),
            description: "PE image".into(),
            extended: true,
            digest_matches_data: None,
        }
    }

    #[test]
    fn explains_the_first_differing_event() {
        let k = sha384(b"kernel");
        let other = sha384(b"other kernel");
        let exp_ev = vec![
            ExpectedEvent::new("kernel", k),
            ExpectedEvent::new("separator", separator_digest()),
        ];
        let exp = Computed {
            mrtd: Mr::ZERO,
            rtmr0: None,
            rtmr1: Some(crate::replay_digests(exp_ev.iter().map(|e| &e.digest))),
            rtmr2: None,
            page_order: PageOrder::SinglePass,
            firmware_layout: FirmwareLayout::Edk2Stable202502,
            missing: BTreeMap::from([("rtmr0".to_string(), "no ACPI".to_string())]),
            events: BTreeMap::from([("rtmr1".to_string(), exp_ev)]),
        };
        let log_events = vec![ev(1, 2, other), ev(2, 2, separator_digest())];
        let rtmr1 = crate::replay_digests(log_events.iter().filter_map(|e| e.digest.as_ref()));
        let replay = Replay {
            events: log_events,
            rtmr: [Mr::ZERO, rtmr1, Mr::ZERO, Mr::ZERO],
        };
        let r = compare(&exp, None, Some(&replay));
        assert!(!r.all_match);
        let m = r
            .findings
            .iter()
            .find(|f| f.register == "RTMR1")
            .expect("rtmr1");
        assert_eq!(m.status, Status::Mismatch);
        assert!(
            m.message.starts_with(&format!(
                "RTMR1 differs: expected kernel digest {k}, the log has {other}"
            )),
            "{}",
            m.message
        );
        let r0 = r
            .findings
            .iter()
            .find(|f| f.register == "RTMR0")
            .expect("r0");
        assert_eq!(r0.status, Status::NotComputed);
    }
}
