//! QEMU's ACPI fw_cfg blobs as OVMF measures them into RTMR0 ("ACPI DATA" events), before the
//! table-loader patches them: `etc/table-loader`, `etc/acpi/rsdp`, `etc/acpi/tables`.
//!
//! Given only `etc/acpi/tables`, the other two are synthesized exactly as QEMU
//! (`hw/acpi/bios-linker-loader.c`, `hw/i386/acpi-build.c`) builds them for a q35 TDX guest:
//! - RSDP (20 bytes, ACPI 1.0 form): "RSD PTR ", checksum 0, OEM "BOCHS ", revision 0, RSDT
//!   address = the RSDT's offset inside the tables blob.
//! - loader: ALLOCATE `etc/acpi/rsdp` (align 16, FSEG zone) - QEMU prepends allocations of the
//!   FSEG zone - then ALLOCATE `etc/acpi/tables` (align 64, HIGH zone); then, walking the tables in
//!   blob order, the ADD_POINTER entries each table's builder emits followed by its ADD_CHECKSUM
//!   (FACS: none; FACP: FIRMWARE_CTRL at 36 -> FACS, DSDT at 40, X_DSDT at 140 (8 bytes); RSDT/XSDT:
//!   one pointer per entry); finally ADD_POINTER rsdp+16 -> tables and ADD_CHECKSUM of the RSDP.
//!   Each command is 128 bytes; the blob is zero-padded to 4096 bytes.
//!
//! Verified: for the 1 vCPU / 1 GiB fixture blob the synthesized RSDP and loader hash to the
//! values oasisprotocol/cli's test vectors record for that configuration.

use crate::bytes::Reader;
use crate::{Error, Result};
use serde::Serialize;

/// The three blobs OVMF measures, in the order it measures them (loader, rsdp, tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiBlobs {
    /// `etc/table-loader`.
    pub loader: Vec<u8>,
    /// `etc/acpi/rsdp`.
    pub rsdp: Vec<u8>,
    /// `etc/acpi/tables`.
    pub tables: Vec<u8>,
}

/// One table found in the tables blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableEntry {
    /// Four-letter signature.
    pub signature: String,
    /// Offset in the blob.
    pub offset: u32,
    /// Length from its header.
    pub length: u32,
}

const LOADER_LEN: usize = 4096;
const FILE_LEN: usize = 56;
const TABLES: &str = "etc/acpi/tables";
const RSDP: &str = "etc/acpi/rsdp";

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        what: "ACPI tables blob",
        reason: reason.into(),
    }
}

/// List the tables of an `etc/acpi/tables` blob (stops at the zero padding).
pub fn list_tables(blob: &[u8]) -> Result<Vec<TableEntry>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 8 <= blob.len() {
        let mut r = Reader::new(&blob[off..], "ACPI tables blob");
        let sig = r.array::<4>("signature")?;
        let len = r.u32("length")?;
        if sig == [0; 4] && len == 0 {
            break;
        }
        if !sig.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            return Err(malformed(format!(
                "no ACPI table signature at offset {off}"
            )));
        }
        let min = if &sig == b"FACS" { 8 } else { 36 };
        if (len as usize) < min || off + len as usize > blob.len() {
            return Err(malformed(format!(
                "table {} at offset {off} has bad length {len}",
                String::from_utf8_lossy(&sig)
            )));
        }
        out.push(TableEntry {
            signature: String::from_utf8_lossy(&sig).into_owned(),
            offset: off as u32,
            length: len,
        });
        off += len as usize;
    }
    if out.is_empty() {
        return Err(malformed(
            "no tables found: pass the etc/acpi/tables fw_cfg blob",
        ));
    }
    Ok(out)
}

fn file_name(buf: &mut Vec<u8>, name: &str) {
    let mut b = name.as_bytes().to_vec();
    b.resize(FILE_LEN, 0);
    buf.extend_from_slice(&b);
}

fn cmd_allocate(buf: &mut Vec<u8>, file: &str, align: u32, zone: u8) {
    let start = buf.len();
    buf.extend_from_slice(&1u32.to_le_bytes());
    file_name(buf, file);
    buf.extend_from_slice(&align.to_le_bytes());
    buf.push(zone);
    buf.resize(start + 128, 0);
}

fn cmd_add_pointer(buf: &mut Vec<u8>, dest: &str, src: &str, offset: u32, size: u8) {
    let start = buf.len();
    buf.extend_from_slice(&2u32.to_le_bytes());
    file_name(buf, dest);
    file_name(buf, src);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.push(size);
    buf.resize(start + 128, 0);
}

fn cmd_add_checksum(buf: &mut Vec<u8>, file: &str, result: u32, start_off: u32, len: u32) {
    let start = buf.len();
    buf.extend_from_slice(&3u32.to_le_bytes());
    file_name(buf, file);
    buf.extend_from_slice(&result.to_le_bytes());
    buf.extend_from_slice(&start_off.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.resize(start + 128, 0);
}

/// Synthesize `etc/acpi/rsdp` and `etc/table-loader` for a tables blob, as QEMU builds them.
pub fn synthesize(tables: &[u8]) -> Result<AcpiBlobs> {
    let list = list_tables(tables)?;
    let root = list
        .iter()
        .find(|t| t.signature == "RSDT" || t.signature == "XSDT")
        .ok_or_else(|| malformed("no RSDT or XSDT table"))?;
    let has_facs = list.iter().any(|t| t.signature == "FACS");
    let has_dsdt = list.iter().any(|t| t.signature == "DSDT");

    let mut ldr = Vec::with_capacity(LOADER_LEN);
    cmd_allocate(&mut ldr, RSDP, 16, 2);
    cmd_allocate(&mut ldr, TABLES, 64, 1);
    for t in &list {
        match t.signature.as_str() {
            "FACS" => continue,
            "FACP" => {
                if has_facs {
                    cmd_add_pointer(&mut ldr, TABLES, TABLES, t.offset + 36, 4);
                }
                if has_dsdt {
                    cmd_add_pointer(&mut ldr, TABLES, TABLES, t.offset + 40, 4);
                    if t.length >= 148 {
                        cmd_add_pointer(&mut ldr, TABLES, TABLES, t.offset + 140, 8);
                    }
                }
            }
            "RSDT" | "XSDT" => {
                let size: u32 = if t.signature == "RSDT" { 4 } else { 8 };
                let n = (t.length - 36) / size;
                for i in 0..n {
                    cmd_add_pointer(
                        &mut ldr,
                        TABLES,
                        TABLES,
                        t.offset + 36 + i * size,
                        size as u8,
                    );
                }
            }
            _ => {}
        }
        cmd_add_checksum(&mut ldr, TABLES, t.offset + 9, t.offset, t.length);
    }
    let (ptr_off, ptr_size, rsdp) = if root.signature == "RSDT" {
        let mut rsdp = Vec::with_capacity(20);
        rsdp.extend_from_slice(b"RSD PTR ");
        rsdp.push(0);
        rsdp.extend_from_slice(b"BOCHS ");
        rsdp.push(0);
        rsdp.extend_from_slice(&root.offset.to_le_bytes());
        (16u32, 4u8, rsdp)
    } else {
        // ACPI 2.0 RSDP (36 bytes) pointing at the XSDT.
        let mut rsdp = Vec::with_capacity(36);
        rsdp.extend_from_slice(b"RSD PTR ");
        rsdp.push(0);
        rsdp.extend_from_slice(b"BOCHS ");
        rsdp.push(2);
        rsdp.extend_from_slice(&0u32.to_le_bytes());
        rsdp.extend_from_slice(&36u32.to_le_bytes());
        rsdp.extend_from_slice(&u64::from(root.offset).to_le_bytes());
        rsdp.extend_from_slice(&[0u8; 4]);
        (24u32, 8u8, rsdp)
    };
    cmd_add_pointer(&mut ldr, RSDP, TABLES, ptr_off, ptr_size);
    cmd_add_checksum(&mut ldr, RSDP, 8, 0, 20);
    if rsdp.len() == 36 {
        cmd_add_checksum(&mut ldr, RSDP, 32, 0, 36);
    }
    if ldr.len() > LOADER_LEN {
        return Err(malformed(format!(
            "{} loader commands do not fit in QEMU's 4096-byte table-loader",
            ldr.len() / 128
        )));
    }
    ldr.resize(LOADER_LEN, 0);
    Ok(AcpiBlobs {
        loader: ldr,
        rsdp,
        tables: tables.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fixture, sha384};

    #[test]
    fn fixture_synthesis_matches_public_vectors() {
        let Some(t) = fixture("acpi/qemu-tdx-1cpu-1g.acpi-tables.bin") else {
            return;
        };
        let sigs: Vec<String> = list_tables(&t)
            .expect("list")
            .into_iter()
            .map(|e| e.signature)
            .collect();
        assert_eq!(
            sigs,
            ["FACS", "DSDT", "FACP", "APIC", "MCFG", "WAET", "RSDT"]
        );
        let b = synthesize(&t).expect("synthesize");
        // oasisprotocol/cli build/measurement test vectors for 1 vCPU, 1024 MiB.
        assert_eq!(
            sha384(&b.tables).to_hex(),
            "444cf35d277a7b6049faf4ff23165e256e716eaad4650aeef6afae8e2dca3359b40c1b2eb997c5568f956616310c9147"
        );
        assert_eq!(
            sha384(&b.rsdp).to_hex(),
            "6bc203b3843388cc4918459c3f5c6d1300a796fb594781b7ecfaa3ae7456975f095bfcc1156c9f2d25e8b8bc1b520f66"
        );
        assert_eq!(
            sha384(&b.loader).to_hex(),
            "68cd79315e70aecd4afe7c1b23a5ed7b3b8e51a477e1739f111b3156def86bbc56ebf239dcd4591bc7a9fff90023f481"
        );
    }

    #[test]
    fn bad_blobs_are_errors() {
        assert!(list_tables(&[]).is_err());
        assert!(list_tables(&[0u8; 64]).is_err());
        assert!(synthesize(b"DSDT\xff\xff\xff\xff").is_err());
    }
}
