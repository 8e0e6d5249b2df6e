//! Just enough ELF64 (little-endian) reading for the image: a section's bytes by name (a kernel
//! module's `.modinfo`), the `DT_NEEDED` libraries and the program interpreter of a binary.

/// Errors from malformed ELF input.
#[derive(Debug, PartialEq, Eq)]
pub struct ElfError(pub String);

impl std::fmt::Display for ElfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed ELF: {}", self.0)
    }
}

impl std::error::Error for ElfError {}

fn err<T>(m: &str) -> Result<T, ElfError> {
    Err(ElfError(m.to_string()))
}

fn u16_at(d: &[u8], o: usize) -> Result<u16, ElfError> {
    d.get(o..o + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| ElfError("truncated".into()))
}
fn u32_at(d: &[u8], o: usize) -> Result<u32, ElfError> {
    d.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| ElfError("truncated".into()))
}
fn u64_at(d: &[u8], o: usize) -> Result<u64, ElfError> {
    d.get(o..o + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| ElfError("truncated".into()))
}
fn usize_of(v: u64) -> Result<usize, ElfError> {
    usize::try_from(v).map_err(|_| ElfError("offset too large".into()))
}

#[derive(Debug, Clone)]
struct Section {
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
}

/// A parsed ELF64 LE file (borrowing the bytes).
pub struct Elf<'a> {
    data: &'a [u8],
    sections: Vec<Section>,
    shstrndx: usize,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.get(..4) != Some(b"\x7fELF") {
            return err("no ELF magic");
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            return err("not a 64-bit little-endian ELF file");
        }
        let shoff = usize_of(u64_at(data, 0x28)?)?;
        let shentsize = usize::from(u16_at(data, 0x3A)?);
        let shnum = usize::from(u16_at(data, 0x3C)?);
        let shstrndx = usize::from(u16_at(data, 0x3E)?);
        if shnum > 0 && shentsize < 64 {
            return err("section header entries too small");
        }
        let mut sections = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let o = shoff + i * shentsize;
            sections.push(Section {
                name: u32_at(data, o)?,
                kind: u32_at(data, o + 4)?,
                offset: usize_of(u64_at(data, o + 0x18)?)?,
                size: usize_of(u64_at(data, o + 0x20)?)?,
                link: u32_at(data, o + 0x28)?,
            });
        }
        Ok(Elf {
            data,
            sections,
            shstrndx,
        })
    }

    fn bytes(&self, s: &Section) -> Result<&'a [u8], ElfError> {
        if s.kind == 8 {
            return Ok(&[]); // SHT_NOBITS
        }
        self.data
            .get(s.offset..s.offset.saturating_add(s.size))
            .ok_or_else(|| ElfError("section out of range".into()))
    }

    fn str_at(table: &[u8], off: usize) -> Result<&str, ElfError> {
        let tail = table
            .get(off..)
            .ok_or_else(|| ElfError("string offset out of range".into()))?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).map_err(|_| ElfError("string is not UTF-8".into()))
    }

    /// Bytes of the section called `name`, if present.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let shstr = self
            .sections
            .get(self.shstrndx)
            .ok_or_else(|| ElfError("bad section-name table index".into()))?;
        let names = self.bytes(shstr)?;
        for s in &self.sections {
            if Self::str_at(names, s.name as usize)? == name {
                return Ok(Some(self.bytes(s)?));
            }
        }
        Ok(None)
    }

    /// Every section as (name, bytes) in header order (`SHT_NOBITS` sections are empty).
    pub fn sections(&self) -> Result<Vec<(String, &'a [u8])>, ElfError> {
        let shstr = self
            .sections
            .get(self.shstrndx)
            .ok_or_else(|| ElfError("bad section-name table index".into()))?;
        let names = self.bytes(shstr)?;
        self.sections
            .iter()
            .map(|s| {
                Ok((
                    Self::str_at(names, s.name as usize)?.to_string(),
                    self.bytes(s)?,
                ))
            })
            .collect()
    }

    /// `DT_NEEDED` entries of the dynamic section, in order.
    pub fn needed(&self) -> Result<Vec<String>, ElfError> {
        let Some(dynamic) = self.sections.iter().find(|s| s.kind == 6) else {
            return Ok(Vec::new());
        };
        let strtab = self
            .sections
            .get(dynamic.link as usize)
            .ok_or_else(|| ElfError("bad .dynamic link".into()))?;
        let strings = self.bytes(strtab)?;
        let d = self.bytes(dynamic)?;
        let mut out = Vec::new();
        for e in d.chunks_exact(16) {
            let tag = u64_at(e, 0)?;
            let val = u64_at(e, 8)?;
            match tag {
                0 => break,
                1 => out.push(Self::str_at(strings, usize_of(val)?)?.to_string()),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The program interpreter (`PT_INTERP`, from the `.interp` section).
    pub fn interpreter(&self) -> Result<Option<String>, ElfError> {
        Ok(self.section(".interp")?.map(|b| {
            String::from_utf8_lossy(b)
                .trim_end_matches('\0')
                .to_string()
        }))
    }
}

/// `key=value` pairs of a kernel module's `.modinfo` section.
pub fn modinfo(module_elf: &[u8]) -> Result<Vec<(String, String)>, ElfError> {
    let elf = Elf::parse(module_elf)?;
    let sec = elf
        .section(".modinfo")?
        .ok_or_else(|| ElfError("no .modinfo section".into()))?;
    Ok(sec
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build a minimal ELF64 with the given named sections (type PROGBITS) plus a
    /// `.dynamic`/`.dynstr` pair when `needed` is non-empty.
    pub fn build_elf(sections: &[(&str, &[u8])], needed: &[&str]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut secs: Vec<(u32, u32, Vec<u8>, u32)> = vec![(0, 0, vec![], 0)]; // null section
        let add_name = |n: &str, names: &mut Vec<u8>| {
            let o = names.len() as u32;
            names.extend_from_slice(n.as_bytes());
            names.push(0);
            o
        };
        for (n, d) in sections {
            let o = add_name(n, &mut names);
            secs.push((o, 1, d.to_vec(), 0));
        }
        if !needed.is_empty() {
            let mut dynstr = vec![0u8];
            let mut dynamic = Vec::new();
            for n in needed {
                dynamic.extend_from_slice(&1u64.to_le_bytes());
                dynamic.extend_from_slice(&(dynstr.len() as u64).to_le_bytes());
                dynstr.extend_from_slice(n.as_bytes());
                dynstr.push(0);
            }
            dynamic.extend_from_slice(&[0u8; 16]);
            let o = add_name(".dynstr", &mut names);
            secs.push((o, 3, dynstr, 0));
            let link = (secs.len() - 1) as u32;
            let o = add_name(".dynamic", &mut names);
            secs.push((o, 6, dynamic, link));
        }
        let o = add_name(".shstrtab", &mut names);
        secs.push((o, 3, names.clone(), 0));
        let shstrndx = secs.len() - 1;
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        let mut offsets = Vec::new();
        for s in &secs {
            offsets.push(out.len());
            out.extend_from_slice(&s.2);
        }
        let shoff = out.len();
        for (i, s) in secs.iter().enumerate() {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&s.0.to_le_bytes());
            h[4..8].copy_from_slice(&s.1.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offsets[i] as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(s.2.len() as u64).to_le_bytes());
            h[0x28..0x2C].copy_from_slice(&s.3.to_le_bytes());
            out.extend_from_slice(&h);
        }
        out[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        out[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        out[0x3C..0x3E].copy_from_slice(&(secs.len() as u16).to_le_bytes());
        out[0x3E..0x40].copy_from_slice(&(shstrndx as u16).to_le_bytes());
        out
    }

    #[test]
    fn reads_modinfo_needed_and_interp() {
        let elf = build_elf(
            &[
                (
                    ".modinfo",
                    b"license=GPL\0depends=tsm,configfs\0name=tdx_guest\0",
                ),
                (".interp", b"/lib64/ld.so\0"),
            ],
            &["libc.so.6", "libgcc_s.so.1"],
        );
        let info = modinfo(&elf).expect("modinfo");
        assert!(info.contains(&("depends".to_string(), "tsm,configfs".to_string())));
        let e = Elf::parse(&elf).expect("parse");
        assert_eq!(e.needed().expect("needed"), ["libc.so.6", "libgcc_s.so.1"]);
        assert_eq!(
            e.interpreter().expect("interp").as_deref(),
            Some("/lib64/ld.so")
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Elf::parse(b"nope").is_err());
        let mut elf = build_elf(&[(".modinfo", b"a=b\0")], &[]);
        elf.truncate(100);
        assert!(
            Elf::parse(&elf)
                .and_then(|e| e.section(".modinfo"))
                .is_err()
        );
    }

    #[test]
    fn reads_the_host_shell() {
        // A real binary: /bin/sh is dynamically linked against libc on Debian.
        let Ok(data) = std::fs::read("/bin/sh") else {
            return;
        };
        let e = Elf::parse(&data).expect("parse /bin/sh");
        assert!(
            e.needed()
                .expect("needed")
                .iter()
                .any(|n| n.starts_with("libc.so"))
        );
    }
}
