//! Table-by-table comparison of two `etc/acpi/tables` blobs (e.g. a capture of ours against a
//! real TD's), naming the fields that differ in the tables whose layout decides a TD's RTMR0 most
//! often (FADT, MADT) and the likely cause, as recorded in `docs/tdx-acpi-differences.md`.

use serde::Serialize;

use crate::Result;
use crate::acpi::list_tables;

/// How one table compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableDiff {
    pub signature: String,
    /// `identical`, `differs`, `only_in_a`, `only_in_b`.
    pub status: String,
    pub length_a: Option<u32>,
    pub length_b: Option<u32>,
    /// Field-level differences and their likely cause (FADT, MADT, HPET; others by size).
    pub notes: Vec<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcpiDiff {
    pub tables: Vec<TableDiff>,
}

impl AcpiDiff {
    /// Whether every table is byte-identical and present in both.
    pub fn identical(&self) -> bool {
        self.tables.iter().all(|t| t.status == "identical")
    }
}

fn u16_at(t: &[u8], o: usize) -> Option<u16> {
    t.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}
fn u32_at(t: &[u8], o: usize) -> Option<u32> {
    t.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// FADT fields that a TD changes (SMM off) or that otherwise tell launches apart.
fn fadt_notes(a: &[u8], b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let fields: [(&str, usize, usize); 6] = [
        ("SMI_CMD", 48, 4),
        ("ACPI_ENABLE", 52, 1),
        ("ACPI_DISABLE", 53, 1),
        ("PM1a_EVT_BLK", 56, 4),
        ("Flags", 112, 4),
        ("IAPC_BOOT_ARCH", 109, 2),
    ];
    for (name, off, len) in fields {
        let (x, y) = (a.get(off..off + len), b.get(off..off + len));
        if x != y {
            let hex = |v: Option<&[u8]>| {
                v.map(|s| {
                    s.iter()
                        .rev()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                })
                .unwrap_or_else(|| "absent".into())
            };
            let cause = match name {
                "SMI_CMD" | "ACPI_ENABLE" | "ACPI_DISABLE" => {
                    " (SMM: a TD has none; QEMU zeroes these with smm=off)"
                }
                _ => "",
            };
            out.push(format!("FADT {name}: 0x{} vs 0x{}{cause}", hex(x), hex(y)));
        }
    }
    out
}

/// MADT: the PCAT_COMPAT flag and the interrupt source overrides (IRQ, trigger mode).
fn madt_summary(t: &[u8]) -> (Option<u32>, Vec<(u8, &'static str)>) {
    let flags = u32_at(t, 40);
    let mut overrides = Vec::new();
    let mut off = 44usize;
    while off + 2 <= t.len() {
        let (kind, len) = (t[off], t[off + 1] as usize);
        if len < 2 || off + len > t.len() {
            break;
        }
        if kind == 2 && len >= 10 {
            let irq = t[off + 3];
            let trigger = match u16_at(t, off + 8).map(|f| (f >> 2) & 3) {
                Some(1) => "edge",
                Some(3) => "level",
                _ => "conforming",
            };
            overrides.push((irq, trigger));
        }
        off += len;
    }
    (flags, overrides)
}

fn madt_notes(a: &[u8], b: &[u8]) -> Vec<String> {
    let (fa, oa) = madt_summary(a);
    let (fb, ob) = madt_summary(b);
    let mut out = Vec::new();
    if fa.map(|f| f & 1) != fb.map(|f| f & 1) {
        out.push(format!(
            "MADT PCAT_COMPAT: {} vs {} (QEMU >= 9.1 clears it without a PIC, as for a TD with pic=off)",
            fa.map_or("absent".into(), |f| (f & 1).to_string()),
            fb.map_or("absent".into(), |f| (f & 1).to_string())
        ));
    }
    if oa != ob {
        let show = |o: &[(u8, &str)]| {
            o.iter()
                .map(|(irq, t)| format!("{irq}:{t}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let edge_only = |o: &[(u8, &str)]| o.len() >= 16 && o.iter().all(|(_, t)| *t == "edge");
        let cause = if edge_only(&oa) != edge_only(&ob) {
            " (every ISA IRQ overridden as edge-triggered: an older TDX QEMU's \"report edge trigger\" \
             patches, dropped upstream in 2025)"
        } else {
            ""
        };
        out.push(format!(
            "MADT interrupt source overrides: [{}] vs [{}]{cause}",
            show(&oa),
            show(&ob)
        ));
    }
    out
}

/// Compares two tables blobs table by table (by signature, in `a`'s order, then `b`'s extras).
pub fn diff(a: &[u8], b: &[u8]) -> Result<AcpiDiff> {
    let (ta, tb) = (list_tables(a)?, list_tables(b)?);
    let bytes = |blob: &'_ [u8], e: &crate::acpi::TableEntry| -> Vec<u8> {
        blob[e.offset as usize..(e.offset + e.length) as usize].to_vec()
    };
    let mut out = Vec::new();
    for ea in &ta {
        let Some(eb) = tb.iter().find(|e| e.signature == ea.signature) else {
            let mut notes = Vec::new();
            if ea.signature == "HPET" {
                notes.push("HPET: a TD launch has hpet=off".into());
            }
            out.push(TableDiff {
                signature: ea.signature.clone(),
                status: "only_in_a".into(),
                length_a: Some(ea.length),
                length_b: None,
                notes,
            });
            continue;
        };
        let (xa, xb) = (bytes(a, ea), bytes(b, eb));
        let mut notes = match ea.signature.as_str() {
            "FACP" => fadt_notes(&xa, &xb),
            "APIC" => madt_notes(&xa, &xb),
            "RSDT" | "XSDT" if xa != xb => {
                vec!["table pointers: follow the other tables' offsets".into()]
            }
            _ => Vec::new(),
        };
        if xa != xb && notes.is_empty() {
            let first = xa
                .iter()
                .zip(&xb)
                .position(|(x, y)| x != y)
                .unwrap_or(xa.len().min(xb.len()));
            notes.push(format!("first difference at byte {first} of the table"));
        }
        out.push(TableDiff {
            signature: ea.signature.clone(),
            status: if xa == xb { "identical" } else { "differs" }.into(),
            length_a: Some(ea.length),
            length_b: Some(eb.length),
            notes,
        });
    }
    for eb in tb
        .iter()
        .filter(|e| !ta.iter().any(|x| x.signature == e.signature))
    {
        out.push(TableDiff {
            signature: eb.signature.clone(),
            status: "only_in_b".into(),
            length_a: None,
            length_b: Some(eb.length),
            notes: if eb.signature == "HPET" {
                vec!["HPET: a TD launch has hpet=off".into()]
            } else {
                Vec::new()
            },
        });
    }
    Ok(AcpiDiff { tables: out })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A table with a 36-byte header and `body`.
    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = sig.to_vec();
        t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        t.extend_from_slice(&[0u8; 28]);
        t.extend_from_slice(body);
        t
    }

    fn fadt(smi: u32) -> Vec<u8> {
        let mut body = vec![0u8; 244 - 36];
        body[48 - 36..52 - 36].copy_from_slice(&smi.to_le_bytes());
        body[52 - 36] = if smi != 0 { 0xf1 } else { 0 };
        table(b"FACP", &body)
    }

    fn madt(pcat: u32, overrides: &[(u8, u16)]) -> Vec<u8> {
        let mut body = vec![0u8; 8];
        body[4..8].copy_from_slice(&pcat.to_le_bytes());
        for (irq, flags) in overrides {
            let mut e = vec![2u8, 10, 0, *irq];
            e.extend_from_slice(&u32::from(*irq).to_le_bytes());
            e.extend_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&e);
        }
        table(b"APIC", &body)
    }

    fn blob(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut b: Vec<u8> = parts.concat();
        b.resize(b.len() + 64, 0);
        b
    }

    #[test]
    fn names_smm_pic_edge_trigger_and_hpet_differences() {
        let level = [(5u8, 0x000du16), (9, 0x000d)];
        let edge: Vec<(u8, u16)> = (0..16).map(|i| (i, 0x0005u16)).collect();
        let td = blob(&[fadt(0), madt(0, &level)]);
        let tcg = blob(&[fadt(0xb2), madt(1, &level), table(b"HPET", &[0u8; 20])]);
        let old_td = blob(&[fadt(0), madt(1, &edge)]);
        let d = diff(&td, &tcg).unwrap();
        assert!(!d.identical());
        let facp = &d.tables[0];
        assert_eq!(facp.status, "differs");
        assert!(
            facp.notes
                .iter()
                .any(|n| n.starts_with("FADT SMI_CMD: 0x00000000 vs 0x000000b2 (SMM")),
            "{facp:?}"
        );
        let apic = &d.tables[1];
        assert!(
            apic.notes.iter().any(|n| n.contains("PCAT_COMPAT: 0 vs 1")),
            "{apic:?}"
        );
        let hpet = &d.tables[2];
        assert_eq!(
            (hpet.status.as_str(), hpet.length_b),
            ("only_in_b", Some(56))
        );
        assert!(hpet.notes[0].contains("hpet=off"));
        let d = diff(&td, &old_td).unwrap();
        assert_eq!(d.tables[0].status, "identical");
        let apic = &d.tables[1];
        assert!(
            apic.notes
                .iter()
                .any(|n| n.contains("[5:level 9:level] vs [0:edge 1:edge")
                    && n.contains("report edge trigger")),
            "{apic:?}"
        );
        assert!(diff(&td, &td).unwrap().identical());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(diff(b"not acpi at all, definitely", &[0u8; 64]).is_err());
        let mut short = fadt(0);
        short.truncate(40);
        assert!(diff(&short, &short).is_err());
    }
}
