//! RTMR0: the firmware-configuration events OVMF (edk2 `TdTcg2Dxe`) extends for a direct kernel
//! boot under QEMU.
//!
//! edk2 up to stable202502 (13 events): TD HOB, CFV, SecureBoot, PK, KEK, db, dbx, separator,
//! ACPI loader, ACPI RSDP, ACPI tables, BootOrder, Boot0000 (UiApp).
//! edk2 stable202505 (17 events; facts from Dstack-TEE/dstack `dstack-mr`, not verified here):
//! TD HOB, CFV, fw_cfg BootMenu, fw_cfg bootorder, the five variables, separator, the three ACPI
//! blobs, EV_EFI_VARIABLE_AUTHORITY, BootOrder {0,1}, Boot0000 (BootManagerMenuApp), Boot0001
//! (EFI Firmware Setup).
//!
//! The TD HOB is the HOB list QEMU (`hw/i386/tdvf-hob.c`) writes into the TD_HOB section: a PHIT
//! HOB then one resource-descriptor HOB per RAM range, sorted by address, ranges covered by
//! TD_HOB/TempMem sections "accepted" (type 0), the rest unaccepted (type 7). With RAM >=
//! 0xB0000000 the low range stops at 0x80000000 and the rest starts at 4 GiB.

use crate::acpi::AcpiBlobs;
use crate::tdvf::{SectionType, Tdvf};
use crate::{Error, Mr, Result, guid_bytes, sha384, utf16le};
use serde::{Deserialize, Serialize};

/// EFI global variable GUID (SecureBoot, PK, KEK, BootOrder, Boot####).
pub const EFI_GLOBAL_VARIABLE: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// EFI image security database GUID (db, dbx).
pub const EFI_IMAGE_SECURITY_DATABASE: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// OVMF's DXE firmware volume GUID (device path of built-in boot options).
pub const OVMF_DXEFV_GUID: &str = "7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1";
/// MdeModulePkg UiApp file GUID.
pub const UIAPP_FILE_GUID: &str = "462caa21-7614-4503-836e-8ab6f4662331";
/// MdeModulePkg BootManagerMenuApp file GUID.
pub const BOOT_MANAGER_MENU_FILE_GUID: &str = "eec25bdc-67f2-4d95-b1d5-f81b2039d11d";

/// The digest of an empty CFV as Debian's and upstream OVMF ship it.
pub const EMPTY_CFV_DIGEST: &str = "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6412af21c097d473155875ffd561d6790";
/// EV_EFI_VARIABLE_AUTHORITY digest OVMF stable202505 extends with Secure Boot off (captured by
/// dstack from a real boot; not derivable here).
pub const VARIABLE_AUTHORITY_202505: &str = "fb66919801f1dfc9c4c273b6a739380790cb0fd3cb706a42f6ac050510ebc8618e7fba53a1564522f5c6f0dc9e1f41a6";

/// The firmware's RTMR0 event layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareLayout {
    /// edk2 up to stable202502 (Debian trixie ovmf 2025.02): 13 events.
    #[default]
    Edk2Stable202502,
    /// edk2 stable202505: 17 events (unverified here).
    Edk2Stable202505,
}

impl FirmwareLayout {
    /// Stable name, as accepted by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::Edk2Stable202502 => "edk2-stable202502",
            Self::Edk2Stable202505 => "edk2-stable202505",
        }
    }

    /// Parse a CLI name.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "edk2-stable202502" | "stable202502" => Ok(Self::Edk2Stable202502),
            "edk2-stable202505" | "stable202505" => Ok(Self::Edk2Stable202505),
            o => Err(Error::Input(format!(
                "unknown firmware layout {o:?}: use edk2-stable202502 (default) or edk2-stable202505"
            ))),
        }
    }
}

/// One expected event: what it is and its SHA-384 digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedEvent {
    /// Short label ("td_hob", "cfv", "kernel", ...).
    pub label: String,
    /// The digest extended.
    pub digest: Mr,
}

impl ExpectedEvent {
    /// New event.
    pub fn new(label: &str, digest: Mr) -> Self {
        ExpectedEvent {
            label: label.to_string(),
            digest,
        }
    }
}

/// Digest of an EV_EFI_VARIABLE_DRIVER_CONFIG event: UEFI_VARIABLE_DATA
/// {GUID, u64 name length in chars, u64 data length, UTF-16LE name, data}.
pub fn efi_variable_digest(guid: &str, name: &str, data: &[u8]) -> Mr {
    let mut b = Vec::new();
    b.extend_from_slice(&guid_bytes(guid).unwrap_or([0; 16]));
    b.extend_from_slice(&(name.encode_utf16().count() as u64).to_le_bytes());
    b.extend_from_slice(&(data.len() as u64).to_le_bytes());
    b.extend(utf16le(name));
    b.extend_from_slice(data);
    sha384(&b)
}

/// The separator event digest (SHA-384 of a u32 zero).
pub fn separator_digest() -> Mr {
    sha384(&[0u8; 4])
}

/// EFI_LOAD_OPTION bytes for an option that points at a file in OVMF's DXE FV.
pub fn fv_load_option(attributes: u32, description: &str, file_guid: &str) -> Vec<u8> {
    let mut path = Vec::new();
    // MEDIA_DEVICE_PATH / PIWG firmware volume (type 4, subtype 7).
    path.extend_from_slice(&[4, 7, 20, 0]);
    path.extend_from_slice(&guid_bytes(OVMF_DXEFV_GUID).unwrap_or([0; 16]));
    // MEDIA_DEVICE_PATH / PIWG firmware file (type 4, subtype 6).
    path.extend_from_slice(&[4, 6, 20, 0]);
    path.extend_from_slice(&guid_bytes(file_guid).unwrap_or([0; 16]));
    // End of entire device path.
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    let mut b = Vec::new();
    b.extend_from_slice(&attributes.to_le_bytes());
    b.extend_from_slice(&(path.len() as u16).to_le_bytes());
    b.extend(utf16le(description));
    b.extend_from_slice(&[0, 0]);
    b.extend(path);
    b
}

/// Build the TD HOB QEMU writes for a firmware's TDVF sections and a RAM size.
pub fn td_hob(sections: &[crate::tdvf::Section], ram: u64) -> Result<Vec<u8>> {
    if ram == 0 {
        return Err(Error::Input("RAM size must be > 0".into()));
    }
    // (accepted, start, end) ranges over [0, ram), split by accepted sections.
    let mut ranges: Vec<(bool, u64, u64)> = vec![(false, 0, ram)];
    let mut hob_base = 0x809000u64;
    for s in sections {
        if matches!(s.section_type, SectionType::TdHob | SectionType::TempMem) {
            let (a, b) = (s.memory_address, s.memory_address + s.memory_data_size);
            if a < b {
                let mut next = Vec::with_capacity(ranges.len() + 2);
                for &(acc, rs, re) in &ranges {
                    if acc || re <= a || rs >= b {
                        next.push((acc, rs, re));
                    } else {
                        if rs < a {
                            next.push((false, rs, a));
                        }
                        if re > b {
                            next.push((false, b, re));
                        }
                    }
                }
                next.push((true, a, b));
                next.sort_by_key(|r| r.1);
                ranges = next;
            }
        }
        if s.section_type == SectionType::TdHob {
            hob_base = s.memory_address;
        }
    }
    let mut hob = Vec::with_capacity(56 + 48 * (ranges.len() + 1));
    hob.extend_from_slice(&1u16.to_le_bytes());
    hob.extend_from_slice(&56u16.to_le_bytes());
    hob.extend_from_slice(&[0u8; 4]);
    hob.extend_from_slice(&9u32.to_le_bytes());
    hob.extend_from_slice(&[0u8; 4 + 8 * 5]);
    let mut res = |ty: u8, start: u64, len: u64| {
        hob.extend_from_slice(&3u16.to_le_bytes());
        hob.extend_from_slice(&48u16.to_le_bytes());
        hob.extend_from_slice(&[0u8; 4]);
        hob.extend_from_slice(&[0u8; 16]);
        hob.extend_from_slice(&u32::from(ty).to_le_bytes());
        hob.extend_from_slice(&7u32.to_le_bytes());
        hob.extend_from_slice(&start.to_le_bytes());
        hob.extend_from_slice(&len.to_le_bytes());
    };
    let last = ranges
        .pop()
        .ok_or_else(|| Error::Input("empty RAM".into()))?;
    for (acc, s, e) in ranges {
        res(if acc { 0 } else { 7 }, s, e - s);
    }
    let (acc, s, e) = last;
    let ty = if acc { 0 } else { 7 };
    if ram >= 0xB000_0000 {
        if s < 0x8000_0000 {
            res(ty, s, 0x8000_0000 - s);
        }
        if e > 0x8000_0000 {
            res(ty, 0x1_0000_0000, e - 0x8000_0000);
        }
    } else {
        res(ty, s, e - s);
    }
    let end = hob_base + hob.len() as u64 + 8;
    hob[48..56].copy_from_slice(&end.to_le_bytes());
    Ok(hob)
}

/// Inputs of RTMR0.
pub struct Rtmr0Inputs<'a> {
    /// Parsed firmware.
    pub tdvf: &'a Tdvf<'a>,
    /// RAM size in bytes.
    pub ram: u64,
    /// The three ACPI blobs.
    pub acpi: &'a AcpiBlobs,
    /// Event layout.
    pub layout: FirmwareLayout,
}

/// The RTMR0 events, in order.
pub fn events(inp: &Rtmr0Inputs<'_>) -> Result<Vec<ExpectedEvent>> {
    let hob = td_hob(&inp.tdvf.sections, inp.ram)?;
    let cfv = inp
        .tdvf
        .section_data(SectionType::Cfv)
        .ok_or_else(|| Error::Malformed {
            what: "TDVF metadata",
            reason: "the firmware has no CFV section".into(),
        })?;
    let mut ev = vec![
        ExpectedEvent::new("td_hob", sha384(&hob)),
        ExpectedEvent::new("cfv", sha384(cfv)),
    ];
    if inp.layout == FirmwareLayout::Edk2Stable202505 {
        ev.push(ExpectedEvent::new("fw_cfg_bootmenu", sha384(&[0, 0])));
        ev.push(ExpectedEvent::new(
            "fw_cfg_bootorder",
            sha384(b"/rom@genroms/linuxboot_dma.bin\0"),
        ));
    }
    ev.extend([
        ExpectedEvent::new(
            "secure_boot",
            efi_variable_digest(EFI_GLOBAL_VARIABLE, "SecureBoot", &[]),
        ),
        ExpectedEvent::new("pk", efi_variable_digest(EFI_GLOBAL_VARIABLE, "PK", &[])),
        ExpectedEvent::new("kek", efi_variable_digest(EFI_GLOBAL_VARIABLE, "KEK", &[])),
        ExpectedEvent::new(
            "db",
            efi_variable_digest(EFI_IMAGE_SECURITY_DATABASE, "db", &[]),
        ),
        ExpectedEvent::new(
            "dbx",
            efi_variable_digest(EFI_IMAGE_SECURITY_DATABASE, "dbx", &[]),
        ),
        ExpectedEvent::new("separator", separator_digest()),
        ExpectedEvent::new("acpi_table_loader", sha384(&inp.acpi.loader)),
        ExpectedEvent::new("acpi_rsdp", sha384(&inp.acpi.rsdp)),
        ExpectedEvent::new("acpi_tables", sha384(&inp.acpi.tables)),
    ]);
    match inp.layout {
        FirmwareLayout::Edk2Stable202502 => {
            ev.push(ExpectedEvent::new("boot_order", sha384(&[0, 0])));
            ev.push(ExpectedEvent::new(
                "boot0000",
                sha384(&fv_load_option(0x109, "UiApp", UIAPP_FILE_GUID)),
            ));
        }
        FirmwareLayout::Edk2Stable202505 => {
            ev.push(ExpectedEvent::new(
                "variable_authority",
                Mr::from_hex(VARIABLE_AUTHORITY_202505)?,
            ));
            ev.push(ExpectedEvent::new("boot_order", sha384(&[0, 0, 1, 0])));
            ev.push(ExpectedEvent::new(
                "boot0000",
                sha384(&fv_load_option(
                    0x109,
                    "BootManagerMenuApp",
                    BOOT_MANAGER_MENU_FILE_GUID,
                )),
            ));
            ev.push(ExpectedEvent::new(
                "boot0001",
                sha384(&fv_load_option(
                    0x101,
                    "EFI Firmware Setup",
                    UIAPP_FILE_GUID,
                )),
            ));
        }
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tdvf::Section;

    fn h(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn constant_event_digests_recomputed() {
        let g = EFI_GLOBAL_VARIABLE;
        let d = EFI_IMAGE_SECURITY_DATABASE;
        assert_eq!(
            efi_variable_digest(g, "SecureBoot", &[]).to_hex(),
            h(
                "9dc3a1f80bcec915391dcda5ffbb15e7419f77eab462bbf72b42166fb70d50325e37b36f93537a863769bcf9bedae6fb"
            )
        );
        assert_eq!(
            efi_variable_digest(g, "PK", &[]).to_hex(),
            h(
                "6f2e3cbc14f9def86980f5f66fd85e99d63e69a73014ed8a5633ce56eca5b64b692108c56110e22acadcef58c3250f1b"
            )
        );
        assert_eq!(
            efi_variable_digest(g, "KEK", &[]).to_hex(),
            h(
                "d607c0efb41c0d757d69bca0615c3a9ac0b1db06c557d992e906c6b7dee40e0e031640c7bfd7bcd35844ef9edeadc6f9"
            )
        );
        assert_eq!(
            efi_variable_digest(d, "db", &[]).to_hex(),
            h(
                "08a74f8963b337acb6c93682f934496373679dd26af1089cb4eaf0c30cf260a12e814856385ab8843e56a9acea19e127"
            )
        );
        assert_eq!(
            efi_variable_digest(d, "dbx", &[]).to_hex(),
            h(
                "18cc6e01f0c6ea99aa23f8a280423e94ad81d96d0aeb5180504fc0f7a40cb3619dd39bd6a95ec1680a86ed6ab0f9828d"
            )
        );
        assert_eq!(
            separator_digest().to_hex(),
            h(
                "394341b7182cd227c5c6b07ef8000cdfd86136c4292b8e576573ad7ed9ae41019f5818b4b971c9effc60e1ad9f1289f0"
            )
        );
        assert_eq!(
            sha384(&[0, 0]).to_hex(),
            h(
                "1dd6f7b457ad880d840d41c961283bab688e94e4b59359ea45686581e90feccea3c624b1226113f824f315eb60ae0a7c"
            )
        );
        let opt = fv_load_option(0x109, "UiApp", UIAPP_FILE_GUID);
        assert_eq!(opt.len(), 62);
        assert_eq!(
            sha384(&opt).to_hex(),
            h(
                "23ada07f5261f12f34a0bd8e46760962d6b4d576a416f1fea1c64bc656b1d28eacf7047ae6e967c58fd2a98bfa74c298"
            )
        );
    }

    fn oasis_layout() -> Vec<Section> {
        let s = |ty, addr, size| Section {
            data_offset: 0,
            raw_data_size: 0,
            memory_address: addr,
            memory_data_size: size,
            section_type: ty,
            attributes: 0,
        };
        vec![
            s(SectionType::TempMem, 0x800000, 0x6000),
            s(SectionType::TdHob, 0x809000, 0x2000),
            s(SectionType::TempMem, 0x80B000, 0x2000),
            s(SectionType::TempMem, 0x810000, 0x10000),
        ]
    }

    #[test]
    fn td_hob_public_vectors() {
        // oasisprotocol/cli tdx_qemu_test.go: IntelTdx firmware layout, RAM in MiB.
        let vectors = [
            (
                512u64,
                "00934f9ff0a0f65e41109afb9a7c5a0719f567f32514aeaef4c23c8535793f7064a2c69738a2000500ffae6ba349a153",
            ),
            (
                640,
                "62f2fe0fb274f5e0530e5cefd0e547321f19e5989a73711853ddd9e4b3feb1474d6ed46ba4f3a362d01096643665a537",
            ),
            (
                1024,
                "1055c9b9a1fc534e688560e2304e18c8597b7261818cf61fb163d40c130547309b750575947a4dcaedbdce4b8d0535f2",
            ),
            (
                2048,
                "0b8772e5b0b41b83e6044a68397e02f49fb47066b4fbe4917ea2c45c64f323fdacbb37948f821ebaf8bc9c938ba8a749",
            ),
            (
                2064,
                "149c7f16b4a8fd0f45c908eec2cb8bb55b557a0bb7265f5e90055649599511a5d7219b59f8b1c2eca42eb861de19b160",
            ),
            (
                2560,
                "e05c12e2a65d57b3ff1f70abd2ae689c7e9096558dc28122befbcecad4a9d6d4569652e5c0298ee381bee5febeecbaa6",
            ),
            (
                2624,
                "190cd2f908ac59d9ca2236d69e5e2d8c0b58648229d970331c53c329239f592efa6d437716b6e96f3467bb234c83f37a",
            ),
            (
                2688,
                "7386292d589c0cada5ed97b0738e3606eb7fa9920e588d75b68118ec7e4ec7538dd3f6cdf531368d03f0713064b45197",
            ),
            (
                2815,
                "51d4fd91da99cc87d6826bd6177fe8c74790b01b6a315d7ca2639d9d1df9e7835a2251b8e69ecef132b6b0302040f25e",
            ),
            (
                2816,
                "8eb1a02074362aa0761541cdb4dc3f1788dfeb4538803b241477848e26de294dbe917ab56c5628732679b3abc168c2de",
            ),
            (
                3072,
                "798f84285da30f6c295fbb73e3c093cf13164b6ad9d547a123b8d4d305f87a027caaba88e4cfd684ed7b424f37811a2e",
            ),
            (
                4096,
                "5b684faf8d02a733945f821d9cdd170802e72103977acf66949c9382500283adc90cbec57f8e7653f8bee1cab83689de",
            ),
            (
                5120,
                "757f23ac59db87c10d7d01cd92792f9dde979862da0b750ff22e2b61a1cd7e3456f55a41d3e3bcb52ee2007e59b8b0a1",
            ),
            (
                8192,
                "2e070cda358b5aa00f27cca25c47381bb564f4be3a84d059805a73cbbde764ed8341f7e09915b5e7b370f9c08a743fbd",
            ),
            (
                16384,
                "cd2312a0d87ef3c4a928df87088969a80b33d7bf3fc584bdde637b09ed808a8d821a56b78a13a6eb506db7578444abbe",
            ),
        ];
        let layout = oasis_layout();
        for (mib, want) in vectors {
            let hob = td_hob(&layout, mib << 20).expect("hob");
            assert_eq!(sha384(&hob).to_hex(), want, "RAM {mib} MiB");
        }
    }

    #[test]
    fn dstack_lite_rtmr0_replay() {
        // dstack verifier fixture tdx-lite-getquote.json (edk2 pre-202505 OVMF, 2 GiB): our
        // computed TD HOB and constant events plus the log's three ACPI digests replay to the
        // quote's RTMR0, which pins the 13-event order of the stable202502 layout.
        let hob = td_hob(&oasis_layout(), 2048 << 20).expect("hob");
        let hx = |s: &str| Mr::from_hex(s).expect("hex");
        let ev = [
            sha384(&hob),
            hx(EMPTY_CFV_DIGEST),
            efi_variable_digest(EFI_GLOBAL_VARIABLE, "SecureBoot", &[]),
            efi_variable_digest(EFI_GLOBAL_VARIABLE, "PK", &[]),
            efi_variable_digest(EFI_GLOBAL_VARIABLE, "KEK", &[]),
            efi_variable_digest(EFI_IMAGE_SECURITY_DATABASE, "db", &[]),
            efi_variable_digest(EFI_IMAGE_SECURITY_DATABASE, "dbx", &[]),
            separator_digest(),
            hx(
                "095d04cf26fe03aef6e3561fa24c1aa1cea93f4aeaf563b1f9f7616184c53454875925759434769cec2490acb563a337",
            ),
            hx(
                "8d9a4d4777a1bc77ecd9d8d37a4628129a80052a510320159a20a923bd07a0e90d8d1f2e1ebf088992b25f0d0fa672ef",
            ),
            hx(
                "3070721e169bc41884724cb0e6b3082e1baf249083d8b389181ba50b9afa951057876c380b8870e8c2facf2eff67a2b6",
            ),
            sha384(&[0, 0]),
            sha384(&fv_load_option(0x109, "UiApp", UIAPP_FILE_GUID)),
        ];
        assert_eq!(
            crate::replay_digests(ev.iter()).to_hex(),
            "f8438db36b96f85d8752ff7f24a89ec05c79ec9eda2ba732c897fb970ca429365b7471b1c054cb84f17b1c2b23ba6640"
        );
    }

    #[test]
    fn layout_names_round_trip() {
        for l in [
            FirmwareLayout::Edk2Stable202502,
            FirmwareLayout::Edk2Stable202505,
        ] {
            assert_eq!(FirmwareLayout::parse(l.name()).ok(), Some(l));
        }
        assert!(FirmwareLayout::parse("x").is_err());
    }
}
