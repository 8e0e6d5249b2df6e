//! TDVF metadata (TDVF design guide, section 11) and MRTD.
//!
//! The firmware's OVMF GUIDed table ends 32 bytes before the end of the file with the footer GUID
//! `96b582de-1fb2-45f7-baea-a366c55a082d`, preceded by the table's u16 length. Walking the table
//! backwards finds entry `e47a6535-984a-4798-865e-4685a7bf8ec2` whose last u32 is the offset (from
//! the end of the file) of the `TDVF` descriptor {signature, length, version = 1, count}, followed
//! by `count` 32-byte sections.
//!
//! MRTD is one running SHA-384 over, per 4 KiB page of each section: unless PAGE.AUG, a 128-byte
//! "MEM.PAGE.ADD" record with the GPA at offset 16; if MR.EXTEND, per 256-byte chunk a 128-byte
//! "MR.EXTEND" record with the GPA then the 256 data bytes. QEMU >= 9 / upstream KVM interleave
//! ADD and EXTEND per page (single pass); the QEMU 8.x TDX tree does all ADDs of a section first.

use crate::bytes::{Reader, slice};
use crate::{Error, Mr, Result, guid_bytes};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};

const FOOTER_GUID: &str = "96b582de-1fb2-45f7-baea-a366c55a082d";
const TDX_METADATA_GUID: &str = "e47a6535-984a-4798-865e-4685a7bf8ec2";
const PAGE: u64 = 0x1000;
const CHUNK: usize = 0x100;

/// Section attribute bit 0: the pages are measured with MR.EXTEND.
pub const ATTR_MR_EXTEND: u32 = 1;
/// Section attribute bit 1: the pages are added later with PAGE.AUG (not measured).
pub const ATTR_PAGE_AUG: u32 = 2;

/// TDVF section type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionType {
    /// Boot firmware volume (code).
    Bfv,
    /// Configuration firmware volume (UEFI variables).
    Cfv,
    /// The TD HOB page(s) QEMU fills in.
    TdHob,
    /// Temporary memory.
    TempMem,
    /// Permanent memory.
    PermMem,
    /// Payload.
    Payload,
    /// Payload parameters.
    PayloadParam,
    /// A type this crate does not know.
    Unknown(u32),
}

impl SectionType {
    fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Bfv,
            1 => Self::Cfv,
            2 => Self::TdHob,
            3 => Self::TempMem,
            4 => Self::PermMem,
            5 => Self::Payload,
            6 => Self::PayloadParam,
            o => Self::Unknown(o),
        }
    }
}

/// One TDVF metadata section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Offset of the raw data in the firmware file.
    pub data_offset: u32,
    /// Raw data size in the file.
    pub raw_data_size: u32,
    /// Guest physical address.
    pub memory_address: u64,
    /// Size in guest memory.
    pub memory_data_size: u64,
    /// Section type.
    pub section_type: SectionType,
    /// Attributes (bit 0 MR.EXTEND, bit 1 PAGE.AUG).
    pub attributes: u32,
}

/// MRTD page order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PageOrder {
    /// ADD then EXTEND per page (QEMU >= 9, upstream KVM).
    SinglePass,
    /// All ADDs of a section, then all EXTENDs (QEMU 8.x TDX tree).
    TwoPass,
}

/// Parsed TDVF metadata of a firmware image.
#[derive(Debug, Clone)]
pub struct Tdvf<'a> {
    fw: &'a [u8],
    /// The sections in metadata order.
    pub sections: Vec<Section>,
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        what: "TDVF metadata",
        reason: reason.into(),
    }
}

impl<'a> Tdvf<'a> {
    /// Parse the TDVF metadata of `fw` (an `OVMF.fd` built with TDX support).
    pub fn parse(fw: &'a [u8]) -> Result<Tdvf<'a>> {
        let footer = guid_bytes(FOOTER_GUID).ok_or_else(|| malformed("internal GUID"))?;
        let meta_guid = guid_bytes(TDX_METADATA_GUID).ok_or_else(|| malformed("internal GUID"))?;
        let no_tdvf = || {
            malformed(
                "no OVMF GUIDed table footer 32 bytes before the end of the file: this firmware has \
                 no TDVF metadata; use an OVMF built for Intel TDX (e.g. Debian trixie's ovmf OVMF.fd)",
            )
        };
        let end = fw.len().checked_sub(32).ok_or_else(no_tdvf)?;
        let guid_at = end.checked_sub(16).ok_or_else(no_tdvf)?;
        if fw.get(guid_at..end) != Some(&footer[..]) {
            return Err(no_tdvf());
        }
        let len_at = guid_at.checked_sub(2).ok_or_else(no_tdvf)?;
        let table_len = usize::from(crate::bytes::le_u16(fw, len_at, "TDVF metadata")?);
        // The length covers the whole table including the footer entry (length + GUID).
        let table_start = end
            .checked_sub(table_len)
            .ok_or_else(|| malformed("GUIDed table length exceeds the file"))?;
        let table = &fw[table_start..len_at];
        // Walk entries backwards: each ends with u16 length (whole entry) + GUID.
        let mut off = table.len();
        let mut data: Option<&[u8]> = None;
        while off >= 18 {
            let g = &table[off - 16..off];
            let entry_len = usize::from(crate::bytes::le_u16(table, off - 18, "TDVF metadata")?);
            if entry_len < 18 || entry_len > off {
                return Err(malformed(format!(
                    "GUIDed table entry at {off} has bad length {entry_len}"
                )));
            }
            if g == meta_guid {
                data = Some(&table[off - entry_len..off - 18]);
                break;
            }
            off -= entry_len;
        }
        let data = data.ok_or_else(|| {
            malformed(
                "the GUIDed table has no TDX metadata entry (e47a6535-...): not a TDX firmware",
            )
        })?;
        let rel = crate::bytes::le_u32(data, data.len().saturating_sub(4), "TDVF metadata")?;
        let desc_off = fw
            .len()
            .checked_sub(rel as usize)
            .ok_or_else(|| malformed("descriptor offset beyond the start of the file"))?;
        let mut r = Reader::new(fw, "TDVF metadata");
        r.take(desc_off, "descriptor offset")?;
        let sig = r.array::<4>("signature")?;
        if &sig != b"TDVF" {
            return Err(malformed(format!(
                "descriptor signature is {:?}, expected \"TDVF\"",
                String::from_utf8_lossy(&sig)
            )));
        }
        let _len = r.u32("length")?;
        let version = r.u32("version")?;
        if version != 1 {
            return Err(Error::Unsupported {
                what: "TDVF metadata",
                reason: format!("descriptor version {version}; only version 1 is known"),
            });
        }
        let count = r.u32("section count")?;
        if count as usize > r.remaining() / 32 {
            return Err(malformed(format!(
                "{count} sections do not fit in the file"
            )));
        }
        let mut sections = Vec::with_capacity(count as usize);
        for i in 0..count {
            let s = Section {
                data_offset: r.u32("DataOffset")?,
                raw_data_size: r.u32("RawDataSize")?,
                memory_address: r.u64("MemoryAddress")?,
                memory_data_size: r.u64("MemoryDataSize")?,
                section_type: SectionType::from_u32(r.u32("Type")?),
                attributes: r.u32("Attributes")?,
            };
            if !s.memory_address.is_multiple_of(PAGE) || !s.memory_data_size.is_multiple_of(PAGE) {
                return Err(malformed(format!("section {i} is not 4 KiB aligned")));
            }
            if s.memory_data_size < u64::from(s.raw_data_size) {
                return Err(malformed(format!(
                    "section {i}: memory size smaller than raw size"
                )));
            }
            if s.attributes & ATTR_MR_EXTEND != 0 {
                if u64::from(s.raw_data_size) < s.memory_data_size {
                    return Err(malformed(format!(
                        "section {i}: MR.EXTEND section with less raw data than memory"
                    )));
                }
                slice(
                    fw,
                    s.data_offset as usize,
                    s.raw_data_size as usize,
                    "TDVF metadata",
                    "section data",
                )?;
            }
            sections.push(s);
        }
        Ok(Tdvf { fw, sections })
    }

    /// The raw bytes of the first section of `ty` (e.g. the CFV), if present.
    pub fn section_data(&self, ty: SectionType) -> Option<&'a [u8]> {
        let s = self.sections.iter().find(|s| s.section_type == ty)?;
        self.fw
            .get(s.data_offset as usize..)?
            .get(..s.raw_data_size as usize)
    }

    /// Compute MRTD in the given page order.
    pub fn mrtd(&self, order: PageOrder) -> Result<Mr> {
        let mut h = Sha384::new();
        for s in &self.sections {
            let pages = s.memory_data_size / PAGE;
            let add = |h: &mut Sha384, page: u64| {
                if s.attributes & ATTR_PAGE_AUG == 0 {
                    let mut buf = [0u8; 128];
                    buf[..12].copy_from_slice(b"MEM.PAGE.ADD");
                    buf[16..24].copy_from_slice(&(s.memory_address + page * PAGE).to_le_bytes());
                    h.update(buf);
                }
            };
            let ext = |h: &mut Sha384, page: u64| -> Result<()> {
                if s.attributes & ATTR_MR_EXTEND != 0 {
                    let base = s.data_offset as usize + (page * PAGE) as usize;
                    let data = slice(self.fw, base, PAGE as usize, "TDVF metadata", "page")?;
                    for (i, chunk) in data.chunks_exact(CHUNK).enumerate() {
                        let mut buf = [0u8; 128];
                        buf[..9].copy_from_slice(b"MR.EXTEND");
                        let gpa = s.memory_address + page * PAGE + (i * CHUNK) as u64;
                        buf[16..24].copy_from_slice(&gpa.to_le_bytes());
                        h.update(buf);
                        h.update(chunk);
                    }
                }
                Ok(())
            };
            match order {
                PageOrder::SinglePass => {
                    for p in 0..pages {
                        add(&mut h, p);
                        ext(&mut h, p)?;
                    }
                }
                PageOrder::TwoPass => {
                    for p in 0..pages {
                        add(&mut h, p);
                    }
                    for p in 0..pages {
                        ext(&mut h, p)?;
                    }
                }
            }
        }
        Ok(Mr(h.finalize().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fixture, sha384};

    #[test]
    fn debian_ovmf_sections_and_cfv() {
        let Some(fw) = fixture("firmware/debian-ovmf-2025.02-8+deb13u1-OVMF.fd") else {
            return;
        };
        let t = Tdvf::parse(&fw).expect("parse");
        let got: Vec<(SectionType, u64, u64, u32)> = t
            .sections
            .iter()
            .map(|s| {
                (
                    s.section_type,
                    s.memory_address,
                    s.memory_data_size,
                    s.attributes,
                )
            })
            .collect();
        use SectionType::*;
        assert_eq!(
            got,
            vec![
                (Bfv, 0xffc84000, 0x37c000, 1),
                (Cfv, 0xffc00000, 0x84000, 0),
                (TempMem, 0x811000, 0xf000, 0),
                (TempMem, 0x80b000, 0x2000, 0),
                (TdHob, 0x809000, 0x2000, 0),
                (TempMem, 0x800000, 0x6000, 0),
            ]
        );
        let cfv = t.section_data(Cfv).expect("cfv");
        assert_eq!(
            sha384(cfv).to_hex(),
            "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6412af21c097d473155875ffd561d6790"
        );
        let a = t.mrtd(PageOrder::SinglePass).expect("mrtd");
        let b = t.mrtd(PageOrder::TwoPass).expect("mrtd");
        assert_ne!(a, b, "the two page orders must differ");
    }

    #[test]
    fn rejects_firmware_without_metadata() {
        let e = Tdvf::parse(&[0u8; 4096]).expect_err("no metadata");
        assert!(e.to_string().contains("no TDVF metadata"), "{e}");
        assert!(Tdvf::parse(&[]).is_err());
    }

    #[test]
    fn synthetic_firmware_mrtd_orders() {
        // Build a tiny firmware: one 2-page MR.EXTEND section at GPA 0xfff00000.
        let mut fw = vec![0xabu8; 0x2000];
        let desc_off = fw.len();
        fw.extend_from_slice(b"TDVF");
        fw.extend_from_slice(&(16u32 + 32).to_le_bytes());
        fw.extend_from_slice(&1u32.to_le_bytes());
        fw.extend_from_slice(&1u32.to_le_bytes());
        fw.extend_from_slice(&0u32.to_le_bytes());
        fw.extend_from_slice(&0x2000u32.to_le_bytes());
        fw.extend_from_slice(&0xfff00000u64.to_le_bytes());
        fw.extend_from_slice(&0x2000u64.to_le_bytes());
        fw.extend_from_slice(&0u32.to_le_bytes());
        fw.extend_from_slice(&1u32.to_le_bytes());
        // GUIDed table: [offset u32][len u16][meta guid] [len u16][footer guid], then 32 bytes.
        let total = fw.len() + 4 + 18 + 18 + 32;
        let rel = (total - desc_off) as u32;
        fw.extend_from_slice(&rel.to_le_bytes());
        fw.extend_from_slice(&22u16.to_le_bytes());
        fw.extend_from_slice(&guid_bytes(TDX_METADATA_GUID).expect("g"));
        fw.extend_from_slice(&(22u16 + 18).to_le_bytes());
        fw.extend_from_slice(&guid_bytes(FOOTER_GUID).expect("g"));
        fw.extend_from_slice(&[0u8; 32]);
        assert_eq!(fw.len(), total);
        let t = Tdvf::parse(&fw).expect("parse");
        assert_eq!(t.sections.len(), 1);
        // Manual single-pass computation.
        let mut h = Sha384::new();
        for page in 0..2u64 {
            let mut add = [0u8; 128];
            add[..12].copy_from_slice(b"MEM.PAGE.ADD");
            add[16..24].copy_from_slice(&(0xfff00000 + page * 0x1000).to_le_bytes());
            h.update(add);
            for i in 0..16u64 {
                let mut ext = [0u8; 128];
                ext[..9].copy_from_slice(b"MR.EXTEND");
                ext[16..24].copy_from_slice(&(0xfff00000 + page * 0x1000 + i * 256).to_le_bytes());
                h.update(ext);
                h.update([0xabu8; 256]);
            }
        }
        assert_eq!(
            t.mrtd(PageOrder::SinglePass).expect("mrtd"),
            Mr(h.finalize().into())
        );
        // Unsupported version.
        let mut bad = fw.clone();
        bad[desc_off + 8] = 2;
        assert!(matches!(Tdvf::parse(&bad), Err(Error::Unsupported { .. })));
    }
}
