//! `GET /firmware/acpi`: QEMU's ACPI fw_cfg blobs, read-only, for ACPI capture.
//!
//! RTMR0 covers three fw_cfg files exactly as QEMU serves them (`etc/table-loader`,
//! `etc/acpi/rsdp`, `etc/acpi/tables`; see `measurements/README.md`). The guest can read them
//! from `/sys/firmware/qemu_fw_cfg/by_name/<name>/raw` (`qemu_fw_cfg.ko`). They are public: the
//! host built them. `host-launcher capture-acpi` fetches them here so that an auditor need not log
//! into the guest. Paths are resolved through [`Paths`], so tests use a fake root.

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use worker_api::{
    FW_CFG_ACPI_RSDP, FW_CFG_ACPI_TABLES, FW_CFG_TABLE_LOADER, FirmwareAcpi, FwCfgBlob,
};

use crate::paths::Paths;

/// Why the blobs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The fw_cfg sysfs interface (or one of the files) does not exist.
    #[error(
        "QEMU fw_cfg file {name} is not available ({path} does not exist): this guest was not \
         started by QEMU with ACPI, or the qemu_fw_cfg module is not loaded"
    )]
    NotAvailable { name: &'static str, path: PathBuf },
    /// The file exists but could not be read.
    #[error("cannot read QEMU fw_cfg file {name} ({path}): {source}")]
    Read {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads one fw_cfg file (`<by_name>/<name>/raw`).
fn read_blob(paths: &Paths, name: &'static str) -> Result<FwCfgBlob, FirmwareError> {
    let path = paths.fw_cfg_by_name().join(name).join("raw");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(FwCfgBlob {
            name: name.to_owned(),
            size: bytes.len() as u64,
            base64: STANDARD.encode(&bytes),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(FirmwareError::NotAvailable { name, path })
        }
        Err(source) => Err(FirmwareError::Read { name, path, source }),
    }
}

/// Reads the three ACPI fw_cfg blobs below `paths`.
pub fn read_acpi(paths: &Paths) -> Result<FirmwareAcpi, FirmwareError> {
    Ok(FirmwareAcpi {
        tables: read_blob(paths, FW_CFG_ACPI_TABLES)?,
        rsdp: read_blob(paths, FW_CFG_ACPI_RSDP)?,
        table_loader: read_blob(paths, FW_CFG_TABLE_LOADER)?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a fake fw_cfg tree with the three blobs below `root`.
    pub(crate) fn fake_fw_cfg(root: &std::path::Path) {
        let by_name = root.join("sys/firmware/qemu_fw_cfg/by_name");
        for (name, bytes) in [
            (FW_CFG_ACPI_TABLES, &b"FACS-DSDT-tables"[..]),
            (FW_CFG_ACPI_RSDP, &b"RSD PTR \0\0\0\0\0\0\0\0\0\0\0\0"[..]),
            (FW_CFG_TABLE_LOADER, &[0u8; 128][..]),
        ] {
            let dir = by_name.join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("raw"), bytes).expect("write");
        }
    }

    #[test]
    fn reads_the_three_blobs_below_the_root() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_fw_cfg(root.path());
        let acpi = read_acpi(&Paths::new(root.path())).expect("read");
        assert_eq!(acpi.tables.name, "etc/acpi/tables");
        assert_eq!(acpi.tables.size, 16);
        assert_eq!(
            STANDARD.decode(&acpi.tables.base64).expect("base64"),
            b"FACS-DSDT-tables"
        );
        assert_eq!(acpi.rsdp.size, 20);
        assert_eq!(acpi.table_loader.name, "etc/table-loader");
        assert_eq!(acpi.table_loader.size, 128);
    }

    #[test]
    fn missing_fw_cfg_says_what_is_missing() {
        let root = tempfile::tempdir().expect("tempdir");
        let e = read_acpi(&Paths::new(root.path())).expect_err("no fw_cfg");
        assert!(matches!(e, FirmwareError::NotAvailable { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("etc/acpi/tables"), "{text}");
        assert!(text.contains("qemu_fw_cfg"), "{text}");
    }
}
