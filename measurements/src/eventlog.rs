//! The CCEL ACPI table and the TCG2 crypto-agile event log it points to.
//!
//! CCEL (56 bytes): the 36-byte ACPI header ("CCEL"), CC type u8 (2 = TDX), CC subtype u8,
//! reserved u16, log area minimum length (LAML) u64, log area start address (LASA) u64.
//!
//! The log: first a TCG_PCClientPCREvent {MR index u32, event type u32 (EV_NO_ACTION), SHA-1
//! digest [20], event size u32, TCG_EfiSpecIDEvent ("Spec ID Event03", algorithms and digest
//! sizes)}, then TCG_PCR_EVENT2 entries {MR index u32, event type u32, digest count u32,
//! (alg id u16, digest)*, event size u32, event data}. The log ends at an entry whose index and
//! type are all-ones (the unused area) or at the end of the data. CCEL MR index 1..4 = RTMR0..3
//! (0 = MRTD, never extended at runtime). EV_NO_ACTION events are not extended.

use crate::bytes::Reader;
use crate::{Error, Mr, Result, extend, guid_string};
use serde::Serialize;

/// TCG algorithm id of SHA-384.
pub const TPM_ALG_SHA384: u16 = 0x000c;
/// EV_NO_ACTION.
pub const EV_NO_ACTION: u32 = 3;

/// Parsed CCEL table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ccel {
    /// OEM id.
    pub oem_id: String,
    /// CC type (2 = TDX).
    pub cc_type: u8,
    /// CC subtype.
    pub cc_subtype: u8,
    /// Log area minimum length.
    pub laml: u64,
    /// Log area start address.
    pub lasa: u64,
}

/// Parse the CCEL ACPI table (`/sys/firmware/acpi/tables/CCEL`).
pub fn parse_ccel(table: &[u8]) -> Result<Ccel> {
    let mut r = Reader::new(table, "CCEL table");
    let sig = r.array::<4>("signature")?;
    if &sig != b"CCEL" {
        return Err(Error::Malformed {
            what: "CCEL table",
            reason: format!(
                "signature {:?}, expected \"CCEL\": pass /sys/firmware/acpi/tables/CCEL",
                String::from_utf8_lossy(&sig)
            ),
        });
    }
    let _len = r.u32("length")?;
    let _rev = r.u8("revision")?;
    let _csum = r.u8("checksum")?;
    let oem_id = String::from_utf8_lossy(r.take(6, "OEM id")?)
        .trim()
        .to_string();
    r.take(8 + 4 + 4 + 4, "OEM table id/revision, creator")?;
    Ok(Ccel {
        oem_id,
        cc_type: r.u8("CC type")?,
        cc_subtype: r.u8("CC subtype")?,
        laml: {
            r.u16("reserved")?;
            r.u64("LAML")?
        },
        lasa: r.u64("LASA")?,
    })
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEvent {
    /// Position in the log (0 = the spec-id header event).
    pub index: usize,
    /// CCEL MR index (1..4 = RTMR0..3).
    pub mr_index: u32,
    /// Register name ("RTMR0".., "MRTD", or "MR<n>").
    pub register: String,
    /// Event type.
    pub event_type: u32,
    /// Event type name ("unknown (0x...)" when not known).
    pub event_type_name: String,
    /// The SHA-384 digest (absent for the SHA-1-only header or when the log lacks SHA-384).
    pub digest: Option<Mr>,
    /// Event data (hex).
    pub data: String,
    /// Human-readable description of the data.
    pub description: String,
    /// Whether replay extends this event into a register.
    pub extended: bool,
    /// For event types whose digest is defined as the hash of (part of) their data (separator,
    /// EFI action, UEFI variables): whether it is. `None` for other types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_matches_data: Option<bool>,
}

/// Check the digest of self-describing events: SHA-384 of the data (separator, EV_EFI_ACTION,
/// EV_EFI_VARIABLE_DRIVER_CONFIG) or of the variable's value (EV_EFI_VARIABLE_BOOT/BOOT2).
fn digest_matches_data(t: u32, data: &[u8], digest: Option<Mr>) -> Option<bool> {
    let d = digest?;
    match t {
        4 | 0x8000_0007 | 0x8000_0001 => Some(crate::sha384(data) == d),
        0x8000_0002 | 0x8000_000c => {
            let mut r = Reader::new(data, "variable event");
            r.take(16, "guid").ok()?;
            let name_len = r.u64("name length").ok()?;
            let data_len = r.u64("data length").ok()?;
            r.take(usize::try_from(name_len.checked_mul(2)?).ok()?, "name")
                .ok()?;
            let value = r.take(usize::try_from(data_len).ok()?, "value").ok()?;
            Some(crate::sha384(value) == d)
        }
        _ => None,
    }
}

/// The replay of a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replay {
    /// Every entry.
    pub events: Vec<LogEvent>,
    /// RTMR0..3 after replay.
    pub rtmr: [Mr; 4],
}

/// Register name of a CCEL MR index.
pub fn register_name(mr_index: u32) -> String {
    match mr_index {
        0 => "MRTD".into(),
        1..=4 => format!("RTMR{}", mr_index - 1),
        n => format!("MR{n}"),
    }
}

/// Name of a TCG event type.
pub fn event_type_name(t: u32) -> String {
    let n = match t {
        0 => "EV_PREBOOT_CERT",
        1 => "EV_POST_CODE",
        2 => "EV_UNUSED",
        3 => "EV_NO_ACTION",
        4 => "EV_SEPARATOR",
        5 => "EV_ACTION",
        6 => "EV_EVENT_TAG",
        7 => "EV_S_CRTM_CONTENTS",
        8 => "EV_S_CRTM_VERSION",
        9 => "EV_CPU_MICROCODE",
        0xa => "EV_PLATFORM_CONFIG_FLAGS",
        0xb => "EV_TABLE_OF_DEVICES",
        0xc => "EV_COMPACT_HASH",
        0xd => "EV_IPL",
        0xe => "EV_IPL_PARTITION_DATA",
        0xf => "EV_NONHOST_CODE",
        0x10 => "EV_NONHOST_CONFIG",
        0x11 => "EV_NONHOST_INFO",
        0x12 => "EV_OMIT_BOOT_DEVICE_EVENTS",
        0x8000_0001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x8000_0002 => "EV_EFI_VARIABLE_BOOT",
        0x8000_0003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x8000_0005 => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        0x8000_0006 => "EV_EFI_GPT_EVENT",
        0x8000_0007 => "EV_EFI_ACTION",
        0x8000_0008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x8000_0009 => "EV_EFI_HANDOFF_TABLES",
        0x8000_000a => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000_000b => "EV_EFI_HANDOFF_TABLES2",
        0x8000_000c => "EV_EFI_VARIABLE_BOOT2",
        0x8000_0010 => "EV_EFI_HCRTM_EVENT",
        0x8000_00e0 => "EV_EFI_VARIABLE_AUTHORITY",
        0x8000_00e1 => "EV_EFI_SPDM_FIRMWARE_BLOB",
        0x8000_00e2 => "EV_EFI_SPDM_FIRMWARE_CONFIG",
        _ => return format!("unknown ({t:#x})"),
    };
    n.to_string()
}

fn printable(b: &[u8]) -> String {
    let t: &[u8] = match b.iter().rposition(|&c| c != 0) {
        Some(p) => &b[..=p],
        None => &[],
    };
    t.iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '.'
            }
        })
        .collect()
}

fn utf16_string(b: &[u8]) -> String {
    let u: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&c| c != 0)
        .collect();
    String::from_utf16_lossy(&u)
}

fn describe(t: u32, d: &[u8]) -> String {
    let r = || Reader::new(d, "event data");
    match t {
        4 => format!("separator {}", hex::encode(d)),
        5 | 0x8000_0007 | 0xd | 8 | 1 | 0xa => printable(d),
        6 => {
            let mut rd = r();
            match (rd.u32("id"), rd.u32("size")) {
                (Ok(id), Ok(sz)) => {
                    let data = rd.take(sz as usize, "tagged data").unwrap_or(rd.rest());
                    let text = if data.len() >= 2 && data[1] == 0 {
                        utf16_string(data)
                    } else {
                        printable(data)
                    };
                    format!("tagged event {id:#x}: {text}")
                }
                _ => printable(d),
            }
        }
        0x8000_0001 | 0x8000_0002 | 0x8000_000c | 0x8000_00e0 => {
            let mut rd = r();
            let parsed = (|| -> Result<String> {
                let g = rd.array::<16>("guid")?;
                let name_len = rd.u64("name length")?;
                let data_len = rd.u64("data length")?;
                let nbytes = usize::try_from(name_len.saturating_mul(2)).unwrap_or(usize::MAX);
                let name = utf16_string(rd.take(nbytes, "name")?);
                Ok(format!(
                    "variable {name} ({}), {data_len} bytes of data",
                    guid_string(&g)
                ))
            })();
            parsed.unwrap_or_else(|_| printable(d))
        }
        0x8000_0008 | 0x8000_000a => {
            let mut rd = r();
            let parsed = (|| -> Result<String> {
                if t == 0x8000_000a {
                    let n = usize::from(rd.u8("description size")?);
                    let desc = printable(rd.take(n, "description")?);
                    let base = rd.u64("base")?;
                    let len = rd.u64("length")?;
                    Ok(format!(
                        "firmware blob \"{desc}\" at {base:#x}, {len:#x} bytes"
                    ))
                } else {
                    let base = rd.u64("base")?;
                    let len = rd.u64("length")?;
                    Ok(format!("firmware blob at {base:#x}, {len:#x} bytes"))
                }
            })();
            parsed.unwrap_or_else(|_| printable(d))
        }
        0x8000_000b => {
            let mut rd = r();
            let parsed = (|| -> Result<String> {
                let n = usize::from(rd.u8("description size")?);
                let desc = printable(rd.take(n, "description")?);
                let count = rd.u64("table count")?;
                Ok(format!("handoff tables \"{desc}\" ({count} entries)"))
            })();
            parsed.unwrap_or_else(|_| printable(d))
        }
        0x8000_0003..=0x8000_0005 => {
            let mut rd = r();
            let parsed = (|| -> Result<String> {
                let loc = rd.u64("image location")?;
                let len = rd.u64("image length")?;
                Ok(format!("PE image at {loc:#x}, {len:#x} bytes"))
            })();
            parsed.unwrap_or_else(|_| printable(d))
        }
        0x8000_0006 => format!("GPT, {} bytes", d.len()),
        3 => {
            if d.starts_with(b"Spec ID Event03") {
                "TCG spec-id header (crypto-agile log)".into()
            } else {
                format!("no-action: {}", printable(d.get(..16).unwrap_or(d)))
            }
        }
        _ => format!("{} bytes", d.len()),
    }
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        what: "CCEL event log",
        reason: reason.into(),
    }
}

/// Parse and replay a TCG2 crypto-agile log (the CCEL data, `/sys/firmware/acpi/tables/data/CCEL`).
pub fn replay(log: &[u8]) -> Result<Replay> {
    let mut r = Reader::new(log, "CCEL event log");
    // Header event (TCG_PCClientPCREvent, SHA-1 format).
    let h_index = r.u32("header MR index")?;
    let h_type = r.u32("header event type")?;
    r.take(20, "header SHA-1 digest")?;
    let h_size = r.u32("header event size")? as usize;
    let h_data = r.take(h_size, "header event data")?;
    if h_type != EV_NO_ACTION || !h_data.starts_with(b"Spec ID Event03") {
        return Err(malformed(
            "the first event is not the TCG spec-id event (\"Spec ID Event03\"): not a crypto-agile log",
        ));
    }
    let mut sr = Reader::new(h_data, "spec-id event");
    sr.take(16 + 4 + 4, "spec-id signature, class, version")?;
    let n_alg = sr.u32("number of algorithms")?;
    if n_alg as usize > sr.remaining() / 4 {
        return Err(malformed("spec-id event lists more algorithms than fit"));
    }
    let mut sizes = Vec::with_capacity(n_alg as usize);
    for _ in 0..n_alg {
        let alg = sr.u16("algorithm id")?;
        let size = sr.u16("digest size")?;
        sizes.push((alg, usize::from(size)));
    }
    if !sizes.iter().any(|&(a, s)| a == TPM_ALG_SHA384 && s == 48) {
        return Err(malformed("the log carries no SHA-384 digests"));
    }
    let mut events = vec![LogEvent {
        index: 0,
        mr_index: h_index,
        register: register_name(h_index),
        event_type: h_type,
        event_type_name: event_type_name(h_type),
        digest: None,
        data: hex::encode(h_data),
        description: describe(h_type, h_data),
        extended: false,
        digest_matches_data: None,
    }];
    let mut rtmr = [Mr::ZERO; 4];
    while r.remaining() >= 8 {
        let save = r.clone();
        let mr_index = r.u32("MR index")?;
        let ty = r.u32("event type")?;
        if mr_index == u32::MAX && ty == u32::MAX {
            break;
        }
        if mr_index == 0 && ty == 0 && save.rest().iter().take(64).all(|&b| b == 0) {
            break;
        }
        let count = r.u32("digest count")?;
        if count as usize > sizes.len() {
            return Err(malformed(format!(
                "event {} at offset {} has {count} digests, the header declares {}",
                events.len(),
                save.pos(),
                sizes.len()
            )));
        }
        let mut digest = None;
        for _ in 0..count {
            let alg = r.u16("algorithm id")?;
            let size = sizes
                .iter()
                .find(|s| s.0 == alg)
                .map(|s| s.1)
                .ok_or_else(|| {
                    malformed(format!(
                        "event {} uses algorithm {alg:#x} not declared in the header",
                        events.len()
                    ))
                })?;
            let d = r.take(size, "digest")?;
            if alg == TPM_ALG_SHA384 {
                let mut a = [0u8; 48];
                a.copy_from_slice(d);
                digest = Some(Mr(a));
            }
        }
        let size = r.u32("event size")? as usize;
        let data = r.take(size, "event data")?;
        let extended = ty != EV_NO_ACTION && (1..=4).contains(&mr_index) && digest.is_some();
        if let (true, Some(d)) = (extended, digest) {
            let i = (mr_index - 1) as usize;
            rtmr[i] = extend(&rtmr[i], &d);
        }
        events.push(LogEvent {
            index: events.len(),
            mr_index,
            register: register_name(mr_index),
            event_type: ty,
            event_type_name: event_type_name(ty),
            digest,
            data: hex::encode(data),
            description: describe(ty, data),
            extended,
            digest_matches_data: digest_matches_data(ty, data, digest),
        });
    }
    Ok(Replay { events, rtmr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;
    use crate::quote::Quote;

    #[test]
    fn ccel_fixture_replays_to_its_quote() {
        let (Some(t), Some(d), Some(q)) = (
            fixture("ccel/go-tdx-guest-cos-ccel_table.dat"),
            fixture("ccel/go-tdx-guest-cos-ccel_data.dat"),
            fixture("ccel/go-tdx-guest-cos-113-tdx-quote.dat"),
        ) else {
            return;
        };
        let c = parse_ccel(&t).expect("ccel");
        assert_eq!(c.cc_type, 2);
        assert_eq!(c.laml, 0x40000);
        let rep = replay(&d).expect("replay");
        let q = Quote::parse(&q).expect("quote");
        assert_eq!(rep.rtmr[0], q.report.rtmr0);
        assert_eq!(rep.rtmr[1], q.report.rtmr1);
        assert_eq!(rep.rtmr[2], q.report.rtmr2);
        assert!(rep.events.len() > 10);
        assert!(
            rep.events
                .iter()
                .any(|e| e.event_type_name == "EV_EFI_BOOT_SERVICES_APPLICATION")
        );
        assert!(rep.events.iter().all(|e| !e.event_type_name.is_empty()));
        // Real UEFI variable, separator and action events hash exactly their data, which pins
        // the UEFI_VARIABLE_DATA encoding our RTMR0 events use.
        let checked: Vec<&LogEvent> = rep
            .events
            .iter()
            .filter(|e| e.digest_matches_data.is_some())
            .collect();
        assert!(checked.len() >= 10, "{}", checked.len());
        for e in checked {
            assert_eq!(
                e.digest_matches_data,
                Some(true),
                "event #{} {}",
                e.index,
                e.description
            );
        }
        // Recompute the variable digests from their parsed fields with our own encoder.
        for e in rep.events.iter().filter(|e| e.event_type == 0x8000_0001) {
            let data = hex::decode(&e.data).expect("hex");
            let guid: [u8; 16] = data[..16].try_into().expect("guid");
            let n = u64::from_le_bytes(data[16..24].try_into().expect("n")) as usize;
            let name_raw = &data[32..32 + 2 * n];
            let name: Vec<u16> = name_raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let name = String::from_utf16(&name).expect("utf16");
            let value = &data[32 + 2 * n..];
            let ours = crate::rtmr0::efi_variable_digest(&crate::guid_string(&guid), &name, value);
            assert_eq!(Some(ours), e.digest, "{name}");
        }
    }

    #[test]
    fn unknown_event_types_are_listed_not_rejected() {
        assert_eq!(event_type_name(0x1234), "unknown (0x1234)");
        let Some(d) = fixture("ccel/go-tdx-guest-cos-ccel_data.dat") else {
            return;
        };
        let rep = replay(&d).expect("replay");
        // Rewrite the type of the second event (right after the header) to an unknown value.
        let hdr_size = u32::from_le_bytes([d[28], d[29], d[30], d[31]]) as usize;
        let off = 32 + hdr_size + 4;
        let mut m = d.clone();
        m[off..off + 4].copy_from_slice(&0x7777u32.to_le_bytes());
        let rep2 = replay(&m).expect("replay");
        assert_eq!(rep2.events[1].event_type_name, "unknown (0x7777)");
        assert_eq!(rep2.rtmr, rep.rtmr);
    }

    #[test]
    fn bad_logs_are_errors() {
        assert!(replay(&[]).is_err());
        assert!(replay(&[0xff; 100]).is_err());
        assert!(parse_ccel(b"APIC").is_err());
        let Some(d) = fixture("ccel/go-tdx-guest-cos-ccel_data.dat") else {
            return;
        };
        for cut in [10, 40, 100, 200, 1000] {
            // Truncated logs either error or replay fewer events; never panic.
            let _ = replay(&d[..cut]);
        }
    }
}
