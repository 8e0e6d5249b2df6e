//! RTMR1 (the kernel as OVMF loads it) and RTMR2 (command line and initrd) for a direct kernel boot.
//!
//! QEMU (`hw/i386/x86.c`, `x86_load_linux`) patches the bzImage setup header before handing it to
//! the firmware: type_of_loader = 0xb0, loadflags |= CAN_USE_HEAP, heap_end_ptr, cmd_line_ptr,
//! and, with an initrd, ramdisk_image/ramdisk_size. The initrd address is
//! `(initrd_max - initrd_size) & !4095` where `initrd_max` is the kernel's limit clamped below
//! `below_4g_mem_size - acpi_data_size` (q35: below-4G RAM is min(RAM, 0xB0000000), or 0x80000000
//! when RAM >= 0xB0000000; acpi_data_size is 0x28000 on pc/q35). OVMF then measures the
//! Authenticode SHA-384 of the patched image. The four fixed RTMR1 events follow.
//!
//! RTMR2: SHA-384 of UTF-16LE(cmdline [+ " initrd=initrd" when an initrd is passed]) + UTF-16 NUL,
//! then SHA-384 of the initrd bytes (both measured by the Linux EFI stub / OVMF loader).

use crate::bytes::{Reader, le_u16, le_u32, slice};
use crate::rtmr0::{ExpectedEvent, separator_digest};
use crate::{Error, Mr, Result, sha384, utf16le};
use sha2::{Digest, Sha384};

/// q35/pc `acpi_data_size` (0x20000 + 0x8000).
pub const QEMU_ACPI_DATA_SIZE: u32 = 0x28000;

/// "Calling EFI Application from Boot Option".
pub const CALLING_EFI_APP: &[u8] = b"Calling EFI Application from Boot Option";
/// "Exit Boot Services Invocation".
pub const EBS_INVOCATION: &[u8] = b"Exit Boot Services Invocation";
/// "Exit Boot Services Returned with Success".
pub const EBS_SUCCESS: &[u8] = b"Exit Boot Services Returned with Success";

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        what: "kernel image",
        reason: reason.into(),
    }
}

/// Whether the patched kernel hash does not depend on the exact RAM size (the initrd lands at the
/// same address): exactly 2 GiB or at least 0xB0000000.
pub fn kernel_hash_is_ram_independent(ram: u64) -> bool {
    ram == 0x8000_0000 || ram >= 0xB000_0000
}

/// Apply QEMU's setup-header patches to a bzImage.
pub fn patch_bzimage(
    kernel: &[u8],
    initrd_size: u64,
    ram: u64,
    acpi_data_size: u32,
) -> Result<Vec<u8>> {
    if kernel.len() < 0x1000 {
        return Err(malformed("shorter than 4 KiB: not a bzImage"));
    }
    let mut k = kernel.to_vec();
    let hdr = le_u32(&k, 0x202, "kernel image")?;
    let protocol = if hdr == u32::from_le_bytes(*b"HdrS") {
        le_u16(&k, 0x206, "kernel image")?
    } else {
        0
    };
    let (real_addr, cmdline_addr) = if protocol < 0x200 || k[0x211] & 1 == 0 {
        (0x90000u32, 0x9a000u32)
    } else {
        (0x10000u32, 0x20000u32)
    };
    if protocol >= 0x200 {
        k[0x210] = 0xb0;
    }
    if protocol >= 0x201 {
        k[0x211] |= 0x80;
        let heap_end = cmdline_addr - real_addr - 0x200;
        k[0x224..0x226].copy_from_slice(&(heap_end as u16).to_le_bytes());
    }
    if protocol >= 0x202 {
        k[0x228..0x22c].copy_from_slice(&cmdline_addr.to_le_bytes());
    } else {
        k[0x20..0x22].copy_from_slice(&0xa33fu16.to_le_bytes());
        k[0x22..0x24].copy_from_slice(&((cmdline_addr - real_addr) as u16).to_le_bytes());
    }
    if initrd_size > 0 {
        if protocol < 0x200 {
            return Err(malformed("boot protocol < 2.00 cannot take an initrd"));
        }
        let mut initrd_max: u64 =
            if protocol >= 0x20c && le_u16(&k, 0x236, "kernel image")? & 0x40 != 0 {
                u64::from(u32::MAX)
            } else if protocol >= 0x203 {
                match le_u32(&k, 0x22c, "kernel image")? {
                    0 => 0x37ff_ffff,
                    m => u64::from(m),
                }
            } else {
                0x37ff_ffff
            };
        let lowmem = if ram >= 0xB000_0000 {
            0x8000_0000
        } else {
            0xB000_0000
        };
        let below_4g = ram.min(lowmem);
        let avail = below_4g
            .checked_sub(u64::from(acpi_data_size))
            .ok_or_else(|| Error::Input("RAM is smaller than QEMU's ACPI data area".into()))?;
        if initrd_max >= avail {
            initrd_max = avail.saturating_sub(1);
        }
        if initrd_size >= initrd_max {
            return Err(Error::Input(format!(
                "initrd of {initrd_size} bytes does not fit below {initrd_max:#x}: give the TD more RAM"
            )));
        }
        let addr = (initrd_max - initrd_size) & !4095;
        k[0x218..0x21c].copy_from_slice(&(addr as u32).to_le_bytes());
        k[0x21c..0x220].copy_from_slice(&(initrd_size as u32).to_le_bytes());
    }
    Ok(k)
}

/// Authenticode SHA-384 of a PE/COFF image (as edk2 measures EFI applications): the headers without
/// CheckSum and the certificate-table directory entry, the sections sorted by PointerToRawData, the
/// trailing data minus the certificate table, then zero padding to a multiple of 8 bytes.
pub fn authenticode_sha384(pe: &[u8]) -> Result<Mr> {
    let v = authenticode_digest::<Sha384>(pe)?;
    let mut a = [0u8; 48];
    a.copy_from_slice(&v);
    Ok(Mr(a))
}

/// Authenticode digest of a PE/COFF image with any hash (SHA-256 is what signatures carry).
pub fn authenticode_digest<D: Digest>(pe: &[u8]) -> Result<Vec<u8>> {
    const W: &str = "PE image";
    let lfanew = le_u32(pe, 0x3c, W)? as usize;
    if slice(pe, lfanew, 4, W, "PE signature")? != b"PE\0\0" {
        return Err(malformed(
            "no PE signature: the kernel is not an EFI-stub bzImage",
        ));
    }
    let coff = lfanew + 4;
    let nsec = usize::from(le_u16(pe, coff + 2, W)?);
    let opt_size = usize::from(le_u16(pe, coff + 16, W)?);
    let opt = coff + 20;
    let magic = le_u16(pe, opt, W)?;
    let (dd_off, ndd_off) = match magic {
        0x20b => (opt + 112, opt + 108),
        0x10b => (opt + 96, opt + 92),
        m => return Err(malformed(format!("unknown optional header magic {m:#x}"))),
    };
    let checksum = opt + 64;
    let ndd = le_u32(pe, ndd_off, W)?;
    let size_of_headers = le_u32(pe, opt + 60, W)? as usize;
    let mut h = D::new();
    h.update(slice(pe, 0, checksum, W, "headers")?);
    let (cert_addr, cert_size, hdr_end) = if ndd > 4 {
        let cert_dir = dd_off + 4 * 8;
        let a = le_u32(pe, cert_dir, W)? as usize;
        let s = le_u32(pe, cert_dir + 4, W)? as usize;
        h.update(slice(
            pe,
            checksum + 4,
            cert_dir - (checksum + 4),
            W,
            "headers",
        )?);
        let rest_len = size_of_headers
            .checked_sub(cert_dir + 8)
            .ok_or_else(|| malformed("SizeOfHeaders too small"))?;
        h.update(slice(pe, cert_dir + 8, rest_len, W, "headers")?);
        (a, s, size_of_headers)
    } else {
        let rest_len = size_of_headers
            .checked_sub(checksum + 4)
            .ok_or_else(|| malformed("SizeOfHeaders too small"))?;
        h.update(slice(pe, checksum + 4, rest_len, W, "headers")?);
        (0, 0, size_of_headers)
    };
    let mut sum = hdr_end;
    let sec_table = opt + opt_size;
    let mut r = Reader::new(pe, W);
    r.take(sec_table, "section table")?;
    let mut sections = Vec::with_capacity(nsec);
    for _ in 0..nsec {
        let s = r.take(40, "section header")?;
        let raw_size = u32::from_le_bytes([s[16], s[17], s[18], s[19]]) as usize;
        let raw_ptr = u32::from_le_bytes([s[20], s[21], s[22], s[23]]) as usize;
        if raw_size > 0 {
            sections.push((raw_ptr, raw_size));
        }
    }
    sections.sort_by_key(|s| s.0);
    for (ptr, size) in sections {
        h.update(slice(pe, ptr, size, W, "section data")?);
        sum += size;
    }
    if pe.len() > sum {
        let trailing = pe.len() - sum;
        if cert_addr != 0 && cert_size > 0 {
            if trailing > cert_size {
                h.update(slice(pe, sum, trailing - cert_size, W, "trailing data")?);
            }
        } else {
            h.update(&pe[sum..]);
        }
    }
    let rem = pe.len() % 8;
    if rem != 0 {
        h.update(&[0u8; 8][..8 - rem]);
    }
    Ok(h.finalize().to_vec())
}

/// Inputs of RTMR1.
#[derive(Debug, Clone, Copy)]
pub struct KernelInputs<'a> {
    /// The bzImage as it is on disk.
    pub kernel: &'a [u8],
    /// Initrd size in bytes (0: none).
    pub initrd_size: u64,
    /// RAM size in bytes.
    pub ram: u64,
    /// QEMU's acpi_data_size (default [`QEMU_ACPI_DATA_SIZE`]).
    pub acpi_data_size: u32,
}

/// The RTMR1 events for a direct kernel boot.
pub fn rtmr1_events(inp: &KernelInputs<'_>) -> Result<Vec<ExpectedEvent>> {
    let patched = patch_bzimage(inp.kernel, inp.initrd_size, inp.ram, inp.acpi_data_size)?;
    let k = authenticode_sha384(&patched)?;
    Ok(vec![
        ExpectedEvent::new("kernel", k),
        ExpectedEvent::new("calling_efi_application", sha384(CALLING_EFI_APP)),
        ExpectedEvent::new("separator", separator_digest()),
        ExpectedEvent::new("exit_boot_services_invocation", sha384(EBS_INVOCATION)),
        ExpectedEvent::new("exit_boot_services_success", sha384(EBS_SUCCESS)),
    ])
}

/// Digest of the command-line event: UTF-16LE of the cmdline (plus " initrd=initrd" when an
/// initrd is passed, as OVMF appends it) and a UTF-16 NUL.
pub fn cmdline_digest(cmdline: &str, with_initrd: bool) -> Mr {
    let mut s = cmdline.to_string();
    if with_initrd {
        s.push_str(" initrd=initrd");
    }
    let mut b = utf16le(&s);
    b.extend_from_slice(&[0, 0]);
    sha384(&b)
}

/// The RTMR2 events: cmdline, then the initrd (if any).
pub fn rtmr2_events(cmdline: &str, initrd: Option<&[u8]>) -> Vec<ExpectedEvent> {
    let mut ev = vec![ExpectedEvent::new(
        "cmdline",
        cmdline_digest(cmdline, initrd.is_some()),
    )];
    if let Some(i) = initrd {
        ev.push(ExpectedEvent::new("initrd", sha384(i)));
    }
    ev
}

#[cfg(test)]
pub(crate) mod tests_support {
    //! Test helpers shared with other modules.
    /// A tiny unsigned PE32+ bzImage-like file.
    pub(crate) fn tiny_pe() -> Vec<u8> {
        super::tests::tiny_pe(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay_digests;

    #[test]
    fn fixed_event_digests() {
        assert_eq!(
            sha384(CALLING_EFI_APP).to_hex(),
            "77a0dab2312b4e1e57a84d865a21e5b2ee8d677a21012ada819d0a98988078d3d740f6346bfe0abaa938ca20439a8d71"
        );
        assert_eq!(
            sha384(EBS_INVOCATION).to_hex(),
            "214b0bef1379756011344877743fdc2a5382bac6e70362d624ccf3f654407c1b4badf7d8f9295dd3dabdef65b27677e0"
        );
        assert_eq!(
            sha384(EBS_SUCCESS).to_hex(),
            "0a2e01c85deae718a530ad8c6d20a84009babe6c8989269e950d8cf440c6e997695e64d455c4174a652cd080f6230b74"
        );
    }

    #[test]
    fn cmdline_vectors() {
        // oasisprotocol/cli vectors (no initrd suffix).
        assert_eq!(
            cmdline_digest("foo bar", false).to_hex(),
            "ae062a0d46d7899081d8068d40d5035c134c77f789c7f894c4b5d92297731bbe53b41b7868edb686ba85757a9e12c5bf"
        );
        assert_eq!(
            cmdline_digest("", false).to_hex(),
            "1dd6f7b457ad880d840d41c961283bab688e94e4b59359ea45686581e90feccea3c624b1226113f824f315eb60ae0a7c"
        );
        assert_eq!(cmdline_digest("console=ttyS0 oasis.stage2.roothash=0c3e6c3235d0f04e68b3bac64e6da3766063d13d689cc3dda006e68bd6d61ce1 oasis.stage2.hash_offset=20230144", false).to_hex(), "cafcc332a983b2e8e8b50aec8398e82a61c36cc4b6fa3a40e18c294611306c06f70facf7ca8a348acd16c787c3751574");
        assert_eq!(
            cmdline_digest("a", true),
            cmdline_digest("a initrd=initrd", false)
        );
    }

    #[test]
    fn dstack_lite_rtmr1_rtmr2_vectors() {
        // dstack verifier fixture tdx-lite-getquote.json: event digests from its log and the
        // RTMR1/RTMR2 of its quote (dstack-0.6.0, 2 vCPU, 2 GiB, QEMU 8.2.2).
        let kernel = Mr::from_hex("ac7e632dcf5cd2a1fe5c1f41f4d9b8219570e64ed3c61038fdbf25404e6f542ffd57f276bc5076307efaf882e6d64177").expect("hex");
        let rtmr1 = [
            kernel,
            sha384(CALLING_EFI_APP),
            separator_digest(),
            sha384(EBS_INVOCATION),
            sha384(EBS_SUCCESS),
        ];
        assert_eq!(
            replay_digests(rtmr1.iter()).to_hex(),
            "2023546e7f3b9d1228e274f70c44d481162540f8452544520a796a52f06879709b81a824a26792a7822327504b0d2aee"
        );
        let rtmr2 = [
            Mr::from_hex("786280842b7364287a3a70d96f7e309252857beb45fb1f91314a2ea863db0adc04c8431ecbf29a966405604631a5aab8").expect("hex"),
            Mr::from_hex("4fe4f7710134a61d7def357add6ac50bdbfeee5032a4c100375e207216ffe42a3bd5822b24e679f91501fff795b81521").expect("hex"),
        ];
        assert_eq!(
            replay_digests(rtmr2.iter()).to_hex(),
            "4c1b739ed451a637b0f82642e48a5ea83925d23633c72e7385c8e9aca4175e133ed1625b7d92eb39edf509c27ff392dc"
        );
    }

    #[test]
    fn authenticode_matches_the_signed_digest_of_a_real_kernel() {
        // A signed bzImage (e.g. Debian's vmlinuz) carries the Authenticode SHA-256 of itself in
        // its PKCS#7 SpcIndirectDataContent; our digest over the same file must equal it.
        let Some(path) = std::env::var_os("MEASUREMENTS_TEST_KERNEL") else {
            eprintln!(
                "SKIPPED: set MEASUREMENTS_TEST_KERNEL to a signed bzImage to run this check"
            );
            return;
        };
        let k = std::fs::read(&path).expect("read kernel");
        // DER: OID sha256, NULL, OCTET STRING(32).
        let pat: &[u8] = &[
            0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04,
            0x20,
        ];
        let lfanew = le_u32(&k, 0x3c, "t").expect("lfanew") as usize;
        let opt = lfanew + 24;
        let cert_dir = opt + 112 + 32;
        let cert_off = le_u32(&k, cert_dir, "t").expect("cert") as usize;
        assert!(cert_off > 0, "the kernel is not signed");
        let sig = &k[cert_off..];
        let at = sig
            .windows(pat.len())
            .position(|w| w == pat)
            .expect("sha256 digest in the signature");
        let signed = &sig[at + pat.len()..at + pat.len() + 32];
        let ours = authenticode_digest::<sha2::Sha256>(&k).expect("digest");
        assert_eq!(hex::encode(ours), hex::encode(signed));
    }

    /// A minimal PE32+ image with a bzImage-like setup header, for the patch and hash paths.
    pub(crate) fn tiny_pe(with_cert: bool) -> Vec<u8> {
        let mut f = vec![0u8; 0x1400];
        f[0] = b'M';
        f[1] = b'Z';
        f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        f[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        f[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
        f[coff + 16..coff + 18].copy_from_slice(&(112u16 + 16 * 8).to_le_bytes());
        let opt = coff + 20;
        f[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        f[opt + 60..opt + 64].copy_from_slice(&0x400u32.to_le_bytes());
        f[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let sec = opt + 112 + 16 * 8;
        f[sec..sec + 5].copy_from_slice(b".text");
        f[sec + 16..sec + 20].copy_from_slice(&0x1000u32.to_le_bytes());
        f[sec + 20..sec + 24].copy_from_slice(&0x400u32.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1;
        f[0x236..0x238].copy_from_slice(&0x40u16.to_le_bytes());
        for (i, b) in f[0x400..0x1400].iter_mut().enumerate() {
            *b = i as u8;
        }
        if with_cert {
            let cert_dir = opt + 112 + 4 * 8;
            f[cert_dir..cert_dir + 4].copy_from_slice(&0x1400u32.to_le_bytes());
            f[cert_dir + 4..cert_dir + 8].copy_from_slice(&16u32.to_le_bytes());
            f.extend_from_slice(&[0xcc; 16]);
        }
        f
    }

    #[test]
    fn authenticode_ignores_checksum_and_certificate() {
        let a = tiny_pe(false);
        let mut b = a.clone();
        let opt = 0x84 + 20;
        b[opt + 64] ^= 0xff; // CheckSum
        assert_eq!(
            authenticode_sha384(&a).expect("a"),
            authenticode_sha384(&b).expect("b")
        );
        let signed = tiny_pe(true);
        let mut other_sig = signed.clone();
        let n = other_sig.len();
        other_sig[n - 1] ^= 1;
        assert_eq!(
            authenticode_sha384(&signed).expect("s"),
            authenticode_sha384(&other_sig).expect("o")
        );
        let mut code = a.clone();
        code[0x500] ^= 1;
        assert_ne!(
            authenticode_sha384(&a).expect("a"),
            authenticode_sha384(&code).expect("c")
        );
    }

    #[test]
    fn patch_places_initrd_like_qemu() {
        let k = tiny_pe(false);
        let at = |ram: u64| {
            let p = patch_bzimage(&k, 0x100000, ram, QEMU_ACPI_DATA_SIZE).expect("patch");
            u32::from_le_bytes([p[0x218], p[0x219], p[0x21a], p[0x21b]])
        };
        assert_eq!(at(0x8000_0000), at(0xB000_0000));
        assert_eq!(at(0xB000_0000), at(0x2_0000_0000));
        assert_ne!(at(0x4000_0000), at(0x8000_0000));
        // (2 GiB - 0x28000 - 1 - 1 MiB) & !4095
        assert_eq!(
            at(0x8000_0000),
            ((0x8000_0000u64 - 0x28000 - 1 - 0x100000) & !4095) as u32
        );
        let p = patch_bzimage(&k, 0, 1 << 30, QEMU_ACPI_DATA_SIZE).expect("patch");
        assert_eq!(p[0x210], 0xb0);
        assert_eq!(p[0x211], 0x81);
        assert_eq!(&p[0x228..0x22c], &0x20000u32.to_le_bytes());
        assert!(kernel_hash_is_ram_independent(0x8000_0000));
        assert!(!kernel_hash_is_ram_independent(0x4000_0000));
        assert!(patch_bzimage(&k, 1 << 40, 1 << 30, QEMU_ACPI_DATA_SIZE).is_err());
        assert!(authenticode_sha384(&[0u8; 16]).is_err());
    }
}
