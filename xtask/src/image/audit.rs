//! `cargo xtask image audit`: one command that checks a release.
//!
//! 1. **Open** the release: a bundle `<name>-<version>.tar.zst` as `image package` writes it
//!    (checked against `<bundle>.sha256` when that file sits beside it; unpacked into a temporary
//!    directory, refusing absolute or `..` paths, links, devices, duplicate entries and entries
//!    outside one top folder) or an image directory (links refused). Its files must be exactly
//!    the image layout ([`LAYOUT_FILES`], optionally all of [`ACPI_FILES`] under `acpi/`); each
//!    missing or extra file is named with its fix.
//! 2. **Rebuild** from this checkout (`image::build::build`, the agent target directory shared
//!    with `image build`, so a warm audit does not recompile the agent) into a temporary
//!    directory, and compare [`REBUILT_PARTS`] byte for byte; for `manifest.json` also field by
//!    field, saying whether the checkout (lock, worker.yaml, version) or the toolchain (rustc)
//!    differs from the release's.
//! 3. **Measure**: `acpi/` is launch data captured from QEMU, not something a build makes: it is
//!    taken from the bundle and checked for internal consistency ([`check_acpi`]: each blob
//!    against `capture.json`'s size and SHA-384, the capture's memory and vCPUs against the
//!    manifest's launch, the tables' structure and MADT vCPU count, the RSDP and loader shapes).
//!    ACPI table checksums are *not* checked: in these fw_cfg blobs QEMU leaves them zero and the
//!    firmware computes them while it runs the table-loader (`ADD_CHECKSUM`), after they are
//!    measured. The registers (MRTD, RTMR0-3) and both image hashes (`cw-v1`, `cocoon-v1`) are
//!    computed from the rebuilt parts and the bundle's `acpi/` and compared with the bundle's
//!    `measurements.json` ([`REGISTERS`]).
//! 4. **Chain** (with `--root/--rpc`): the root contract's `worker_hash_is_valid` for the cw-v1
//!    hash ([`ask_root`]); an endpoint that cannot answer is never "approved".
//!
//! [`compare_bundle`] is steps 1-3 on two directories with the measurement function passed in,
//! so the verdict logic is tested without a build; [`audit`] is the whole command.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha384};

use super::build::{BuildOptions, build};
use super::cache::{sha256_bytes, sha256_file};
use crate::progress::Progress;

// Exit status 1 is a usage error or a failed build: `main` maps every error to it.

/// Exit status: reproduced (and approved, when a root contract was given).
pub const EXIT_REPRODUCED: u8 = 0;
/// Exit status: not reproduced (a part or register differs, a file is missing or extra, the
/// bundle was refused or does not match its `.sha256`).
pub const EXIT_NOT_REPRODUCED: u8 = 3;
/// Exit status: reproduced, but the root contract does not list the image hash.
pub const EXIT_NOT_APPROVED: u8 = 4;
/// Exit status: reproduced, but the chain could not be asked.
pub const EXIT_CHAIN_UNREACHABLE: u8 = 5;

/// The files every image has, at its top level.
pub const LAYOUT_FILES: [&str; 6] = [
    "OVMF.fd",
    "cmdline",
    "initrd",
    "manifest.json",
    "measurements.json",
    "vmlinuz",
];
/// The launch's ACPI capture (`cargo xtask image capture-acpi`), all or none, under `acpi/`.
pub const ACPI_FILES: [&str; 4] = ["capture.json", "rsdp", "table-loader", "tables"];
/// What the rebuild must reproduce byte for byte, in report order.
pub const REBUILT_PARTS: [&str; 5] = ["OVMF.fd", "vmlinuz", "initrd", "cmdline", "manifest.json"];
/// The fields of `measurements.json` compared, in report order.
pub const REGISTERS: [&str; 7] = [
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "image_hash_cw_v1",
    "image_hash_cocoon_v1",
];
/// The most a bundle may unpack to (the boot parts are capped at 150 MB).
pub const MAX_UNPACKED_BYTES: u64 = 1 << 30;

/// The release was refused before anything was compared (its structure is unsafe or not a
/// bundle); the audit's verdict is "not reproduced".
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Refused(msg.into()))
}

/// The overall outcome; `exit_code` is its process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Reproduced,
    NotReproduced,
    NotApproved,
    ChainUnreachable,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Reproduced => EXIT_REPRODUCED,
            Verdict::NotReproduced => EXIT_NOT_REPRODUCED,
            Verdict::NotApproved => EXIT_NOT_APPROVED,
            Verdict::ChainUnreachable => EXIT_CHAIN_UNREACHABLE,
        }
    }

    fn words(self) -> &'static str {
        match self {
            Verdict::Reproduced => "REPRODUCED",
            Verdict::NotReproduced => "NOT REPRODUCED",
            Verdict::NotApproved => "REPRODUCED but NOT APPROVED on chain",
            Verdict::ChainUnreachable => "REPRODUCED, but the chain could not be asked",
        }
    }
}

/// What the auditor pointed at.
#[derive(Debug, Clone, Serialize)]
pub struct BundleInfo {
    pub path: PathBuf,
    /// `archive` or `directory`.
    pub kind: String,
    /// SHA-256 of the archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The `<bundle>.sha256` check (archives only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum_file: Option<ChecksumFile>,
}

/// The result of checking `<bundle>.sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum ChecksumFile {
    /// No such file: the archive's bytes were not checked against a published digest.
    Absent {
        path: PathBuf,
    },
    Matches {
        path: PathBuf,
    },
    Mismatch {
        path: PathBuf,
        expected: String,
    },
    Malformed {
        path: PathBuf,
    },
}

/// A missing or extra file and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub path: String,
    pub fix: String,
}

/// Size and SHA-256 of one side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileFact {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartStatus {
    Identical,
    Differs,
    MissingInBundle,
    MissingInRebuild,
}

/// One rebuilt part against the bundle's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartCheck {
    pub path: String,
    pub status: PartStatus,
    pub bundle: Option<FileFact>,
    pub rebuilt: Option<FileFact>,
}

/// One differing field of manifest.json (`build.rustc`, `files[initrd].sha256`, ...).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    pub field: String,
    pub bundle: Value,
    pub rebuilt: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// The bundle's `acpi/`: used as captured, checked for consistency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AcpiCheck {
    pub present: bool,
    /// QEMU version from capture.json.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// What was checked and held.
    pub checks: Vec<String>,
    /// Inconsistencies (each makes the audit fail).
    pub problems: Vec<String>,
    /// Facts worth knowing that are not failures.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterStatus {
    Match,
    Differs,
    /// Neither side has it (RTMR0 and the image hashes without `acpi/`).
    Absent,
}

/// One register or image hash: recorded in measurements.json vs computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisterCheck {
    pub name: String,
    pub status: RegisterStatus,
    pub recorded: Option<String>,
    pub computed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnchainStatus {
    Approved,
    NotApproved,
    /// No cw-v1 hash to ask about (no `acpi/`): such a release cannot be approved.
    NoImageHash,
    /// The endpoint could not be reached or gave no usable answer.
    Unreachable,
}

/// The root contract's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnchainCheck {
    pub root: String,
    pub rpc: String,
    pub hash: Option<String>,
    pub status: OnchainStatus,
    pub detail: String,
}

/// Where the rebuild came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RebuildInfo {
    /// `git rev-parse HEAD` of the checkout, when git knows it.
    pub commit: Option<String>,
    /// Tracked files changed since that commit.
    pub dirty: Option<bool>,
    /// Where the rebuilt image was kept (`--out`); absent: removed.
    pub kept_in: Option<PathBuf>,
    pub seconds: f64,
}

/// Everything `image audit` found; `--json` prints it (schema_version 1).
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub schema_version: u32,
    pub verdict: Verdict,
    pub exit_code: u8,
    /// Why the verdict is not "reproduced" (empty when it is).
    pub failures: Vec<String>,
    pub bundle: Option<BundleInfo>,
    /// Set when the bundle was refused before any comparison.
    pub refused: Option<String>,
    /// Name and version from the bundle's manifest.json.
    pub image: Option<Value>,
    pub rebuilt: Option<RebuildInfo>,
    pub missing: Vec<Finding>,
    pub extra: Vec<Finding>,
    pub parts: Vec<PartCheck>,
    pub manifest_differences: Vec<FieldDiff>,
    /// What the manifest differences mean for the auditor's checkout or toolchain.
    pub diagnosis: Vec<String>,
    pub acpi: AcpiCheck,
    pub registers: Vec<RegisterCheck>,
    /// Why the registers could not be computed.
    pub measure_error: Option<String>,
    /// Other differences of measurements.json (not failures: only the registers are measured).
    pub measurements_notes: Vec<String>,
    pub onchain: Option<OnchainCheck>,
}

impl AuditReport {
    fn empty() -> Self {
        AuditReport {
            schema_version: 1,
            verdict: Verdict::NotReproduced,
            exit_code: EXIT_NOT_REPRODUCED,
            failures: Vec::new(),
            bundle: None,
            refused: None,
            image: None,
            rebuilt: None,
            missing: Vec::new(),
            extra: Vec::new(),
            parts: Vec::new(),
            manifest_differences: Vec::new(),
            diagnosis: Vec::new(),
            acpi: AcpiCheck::default(),
            registers: Vec::new(),
            measure_error: None,
            measurements_notes: Vec::new(),
            onchain: None,
        }
    }

    /// A report for a bundle refused before comparison.
    pub fn refused(bundle: Option<BundleInfo>, why: String) -> Self {
        let mut r = AuditReport::empty();
        r.bundle = bundle;
        r.refused = Some(why);
        r.finalize();
        r
    }

    /// The reasons the release is not reproduced.
    pub fn reproduction_failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(r) = &self.refused {
            out.push(format!("bundle refused: {r}"));
        }
        if let Some(b) = &self.bundle {
            match &b.checksum_file {
                Some(ChecksumFile::Mismatch { path, expected }) => out.push(format!(
                    "the bundle's sha256 is not the {expected} that {} publishes",
                    path.display()
                )),
                Some(ChecksumFile::Malformed { path }) => {
                    out.push(format!("{} is not in sha256sum format", path.display()))
                }
                _ => {}
            }
        }
        for f in &self.missing {
            out.push(format!("missing file {}", f.path));
        }
        for f in &self.extra {
            out.push(format!("extra file {}", f.path));
        }
        for p in &self.parts {
            match p.status {
                PartStatus::Identical => {}
                PartStatus::Differs => out.push(format!("{} differs from the rebuild", p.path)),
                PartStatus::MissingInBundle => {} // named under `missing`
                PartStatus::MissingInRebuild => out.push(format!("the rebuild made no {}", p.path)),
            }
        }
        for p in &self.acpi.problems {
            out.push(format!("acpi/: {p}"));
        }
        if let Some(e) = &self.measure_error {
            out.push(format!("registers not computable: {e}"));
        }
        for r in &self.registers {
            if r.status == RegisterStatus::Differs {
                out.push(format!("{} differs from measurements.json", r.name));
            }
        }
        out
    }

    /// The verdict from the findings: any reproduction failure wins, then the chain's answer.
    pub fn verdict(&self) -> Verdict {
        if !self.reproduction_failures().is_empty() {
            return Verdict::NotReproduced;
        }
        match self.onchain.as_ref().map(|o| o.status) {
            None | Some(OnchainStatus::Approved) => Verdict::Reproduced,
            Some(OnchainStatus::NotApproved | OnchainStatus::NoImageHash) => Verdict::NotApproved,
            Some(OnchainStatus::Unreachable) => Verdict::ChainUnreachable,
        }
    }

    /// Fill `verdict`, `exit_code` and `failures` from the findings.
    pub fn finalize(&mut self) {
        self.verdict = self.verdict();
        self.exit_code = self.verdict.exit_code();
        self.failures = self.reproduction_failures();
        if let Some(o) = &self.onchain
            && o.status != OnchainStatus::Approved
        {
            self.failures.push(format!("on chain: {}", o.detail));
        }
    }

    /// The cw-v1 image hash computed from the rebuild and the bundle's acpi/.
    pub fn computed_cw_v1(&self) -> Option<&str> {
        self.registers
            .iter()
            .find(|r| r.name == "image_hash_cw_v1")
            .and_then(|r| r.computed.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------
// Opening a release.

/// An opened release: the directory to compare (inside `_unpacked` for an archive).
pub struct Opened {
    pub dir: PathBuf,
    pub info: BundleInfo,
    _unpacked: Option<tempfile::TempDir>,
}

/// Checks `<bundle>.sha256` (sha256sum format) against the archive's digest.
pub fn check_checksum_file(bundle: &Path, actual: &str) -> ChecksumFile {
    let mut name = bundle.as_os_str().to_owned();
    name.push(".sha256");
    let path = PathBuf::from(name);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return ChecksumFile::Absent { path };
    };
    match text
        .split_whitespace()
        .next()
        .map(str::to_ascii_lowercase)
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        None => ChecksumFile::Malformed { path },
        Some(h) if h == actual => ChecksumFile::Matches { path },
        Some(expected) => ChecksumFile::Mismatch { path, expected },
    }
}

/// Opens a bundle archive or an image directory. Errors carrying [`Refused`] mean the release
/// itself is unacceptable; others are usage or I/O errors.
pub fn open(target: &Path) -> anyhow::Result<Opened> {
    let meta = std::fs::symlink_metadata(target).with_context(|| {
        format!(
            "{} not found: pass a bundle <name>-<version>.tar.zst (from `cargo xtask image \
             package`) or an image directory",
            target.display()
        )
    })?;
    if meta.is_dir() {
        walk(target)?;
        return Ok(Opened {
            dir: target.to_path_buf(),
            info: BundleInfo {
                path: target.to_path_buf(),
                kind: "directory".into(),
                sha256: None,
                checksum_file: None,
            },
            _unpacked: None,
        });
    }
    if !meta.is_file() {
        anyhow::bail!(
            "{} is neither a bundle file nor an image directory (a link or a special file): pass \
             the bundle or the directory itself",
            target.display()
        );
    }
    let (sha256, _) = sha256_file(target)?;
    let checksum = check_checksum_file(target, &sha256);
    let tmp = tempfile::Builder::new()
        .prefix("worker-audit-bundle-")
        .tempdir()
        .context("creating a temporary directory to unpack the bundle into")?;
    let file = std::fs::File::open(target)
        .with_context(|| format!("opening bundle {}", target.display()))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .with_context(|| format!("reading bundle {}", target.display()))?;
    let top = unpack(decoder, tmp.path())?;
    Ok(Opened {
        dir: tmp.path().join(top),
        info: BundleInfo {
            path: target.to_path_buf(),
            kind: "archive".into(),
            sha256: Some(sha256),
            checksum_file: Some(checksum),
        },
        _unpacked: Some(tmp),
    })
}

/// Checks one archive path: `/`-separated normal components only. Returns them.
fn entry_components(path: &str) -> Result<Vec<&str>, String> {
    if path.starts_with('/') {
        return Err(format!("`{path}` is an absolute path"));
    }
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    for p in &parts {
        match *p {
            "" => return Err(format!("`{path}` has an empty path component")),
            "." | ".." => {
                return Err(format!(
                    "`{path}` contains `{p}` (it could escape the image folder)"
                ));
            }
            _ if p.contains('\0') || p.contains('\\') => {
                return Err(format!("`{path}` contains a NUL or backslash"));
            }
            _ => {}
        }
    }
    Ok(parts)
}

/// Unpacks a tar stream into the empty directory `dest`: regular files and directories under
/// one top folder only. Returns the top folder's name.
pub fn unpack(reader: impl Read, dest: &Path) -> anyhow::Result<String> {
    let not_tar = |e: std::io::Error| {
        refuse(format!(
            "it is not a zstd-compressed tar archive as `cargo xtask image package` writes ({e}); \
             download the bundle again"
        ))
    };
    let mut ar = tar::Archive::new(reader);
    let mut seen = BTreeSet::new();
    let mut files = BTreeSet::new();
    let mut top: Option<String> = None;
    let mut total = 0u64;
    for entry in ar.entries().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        let raw = entry.path_bytes().into_owned();
        let Ok(path) = String::from_utf8(raw.clone()) else {
            return Err(refuse(format!(
                "entry {:?} has a non-UTF-8 name",
                String::from_utf8_lossy(&raw)
            )));
        };
        let parts = entry_components(&path).map_err(|e| refuse(format!("entry {e}")))?;
        let kind = entry.header().entry_type();
        let is_dir = match kind {
            tar::EntryType::Directory => true,
            tar::EntryType::Regular => false,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                return Err(refuse(format!(
                    "entry `{path}` is a link; an image bundle holds plain files only"
                )));
            }
            other => {
                return Err(refuse(format!(
                    "entry `{path}` is a {other:?}, not a plain file or folder"
                )));
            }
        };
        let first = parts[0].to_string();
        match &top {
            None => top = Some(first),
            Some(t) if *t == first => {}
            Some(t) => {
                return Err(refuse(format!(
                    "entry `{path}` is outside the bundle's top folder `{t}/`"
                )));
            }
        }
        let norm = parts.join("/");
        if !seen.insert(norm.clone()) {
            return Err(refuse(format!(
                "entry `{norm}` appears twice (tools disagree on which copy counts)"
            )));
        }
        for i in 1..parts.len() {
            let ancestor = parts[..i].join("/");
            if files.contains(&ancestor) {
                return Err(refuse(format!(
                    "entry `{norm}` is inside `{ancestor}`, which is a file"
                )));
            }
        }
        let out = parts.iter().fold(dest.to_path_buf(), |p, c| p.join(c));
        if is_dir {
            if files.contains(&norm) {
                return Err(refuse(format!(
                    "entry `{norm}` is both a file and a folder"
                )));
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            continue;
        }
        if parts.len() == 1 {
            return Err(refuse(format!(
                "entry `{norm}` is a file at the archive's top level; a bundle holds one folder \
                 `<name>/`"
            )));
        }
        total = total.saturating_add(entry.header().size().map_err(not_tar)?);
        if total > MAX_UNPACKED_BYTES {
            return Err(refuse(format!(
                "it unpacks to more than {MAX_UNPACKED_BYTES} bytes; an image is far smaller"
            )));
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&out)
            .with_context(|| format!("creating {}", out.display()))?;
        std::io::copy(&mut (&mut entry).take(MAX_UNPACKED_BYTES), &mut f).map_err(not_tar)?;
        files.insert(norm);
    }
    let Some(top) = top else {
        return Err(refuse("the archive is empty"));
    };
    if !dest.join(&top).is_dir() {
        return Err(refuse(format!("the archive has no top folder `{top}/`")));
    }
    Ok(top)
}

/// A file or folder of an image directory, `/`-separated relative path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub path: String,
    pub is_dir: bool,
}

/// Lists an image directory (sorted); links and special files are refused.
pub fn walk(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    fn go(dir: &Path, prefix: &str, out: &mut Vec<Entry>) -> anyhow::Result<()> {
        let listing =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in listing {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                return Err(refuse(format!(
                    "{}: file name {:?} is not UTF-8",
                    dir.display(),
                    e.file_name()
                )));
            };
            let rel = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            let t = e.file_type()?;
            if t.is_symlink() {
                return Err(refuse(format!(
                    "`{rel}` is a symbolic link; an image directory holds plain files only \
                     (replace it with the file itself)"
                )));
            } else if t.is_dir() {
                out.push(Entry {
                    path: rel.clone(),
                    is_dir: true,
                });
                go(&e.path(), &rel, out)?;
            } else if t.is_file() {
                out.push(Entry {
                    path: rel,
                    is_dir: false,
                });
            } else {
                return Err(refuse(format!(
                    "`{rel}` is not a plain file (a socket, pipe or device)"
                )));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Pure comparisons.

/// Missing and extra files of an image directory listing, each with its fix.
pub fn layout_findings(entries: &[Entry]) -> (Vec<Finding>, Vec<Finding>) {
    let files: BTreeSet<&str> = entries
        .iter()
        .filter(|e| !e.is_dir)
        .map(|e| e.path.as_str())
        .collect();
    let has_acpi = entries.iter().any(|e| e.is_dir && e.path == "acpi");
    let mut missing = Vec::new();
    for f in LAYOUT_FILES {
        if !files.contains(f) {
            let fix = match f {
                "measurements.json" => "`cargo xtask image build` writes measurements.json (and \
                     `cargo xtask image capture-acpi` rewrites it): package the complete \
                     build output with `cargo xtask image package`"
                    .to_string(),
                _ => format!(
                    "every image has {f}: package the complete build output (`cargo xtask image \
                     build && cargo xtask image package`) or download the release again"
                ),
            };
            missing.push(Finding {
                path: f.to_string(),
                fix,
            });
        }
    }
    if has_acpi {
        for f in ACPI_FILES {
            let p = format!("acpi/{f}");
            if !files.contains(p.as_str()) {
                missing.push(Finding {
                    path: p,
                    fix: "acpi/ is incomplete: capture it again with `cargo xtask image \
                          capture-acpi` (it writes tables, rsdp, table-loader and capture.json) \
                          and package again"
                        .to_string(),
                });
            }
        }
    }
    // acpi/shapes/<name>/ holds one complete capture per TDX launch shape.
    let shape_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    };
    let in_shape = |p: &str| -> Option<(String, Option<String>)> {
        let rest = p.strip_prefix("acpi/shapes/")?;
        let (name, file) = match rest.split_once('/') {
            Some((n, f)) => (n, Some(f.to_string())),
            None => (rest, None),
        };
        shape_name(name).then(|| (name.to_string(), file))
    };
    for e in entries.iter().filter(|e| e.is_dir) {
        if let Some((name, None)) = in_shape(&e.path) {
            for f in ACPI_FILES {
                let p = format!("acpi/shapes/{name}/{f}");
                if !files.contains(p.as_str()) {
                    missing.push(Finding {
                        path: p,
                        fix: format!(
                            "acpi/shapes/{name}/ is incomplete: capture again with `cargo xtask \
                             image capture-acpi` (every shape) and package again"
                        ),
                    });
                }
            }
        }
    }
    let allowed = |e: &Entry| {
        if e.is_dir {
            e.path == "acpi"
                || e.path == "acpi/shapes"
                || matches!(in_shape(&e.path), Some((_, None)))
        } else {
            LAYOUT_FILES.contains(&e.path.as_str())
                || e.path
                    .strip_prefix("acpi/")
                    .is_some_and(|f| ACPI_FILES.contains(&f))
                || matches!(in_shape(&e.path), Some((_, Some(f))) if ACPI_FILES.contains(&f.as_str()))
        }
    };
    let extra = entries
        .iter()
        .filter(|e| !allowed(e))
        .map(|e| Finding {
            path: if e.is_dir {
                format!("{}/", e.path)
            } else {
                e.path.clone()
            },
            fix: format!(
                "not part of the image layout ({} and acpi/{{{}}}, acpi/shapes/NAME/{{{}}}): \
                 remove it and package again; nothing the build does not make belongs in a release",
                LAYOUT_FILES.join(" "),
                ACPI_FILES.join(","),
                ACPI_FILES.join(",")
            ),
        })
        .collect();
    (missing, extra)
}

fn fact(data: &[u8]) -> FileFact {
    FileFact {
        sha256: sha256_bytes(data),
        size: data.len() as u64,
    }
}

fn read_opt(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Byte-for-byte comparison of [`REBUILT_PARTS`].
pub fn compare_parts(rebuilt: &Path, bundle: &Path) -> anyhow::Result<Vec<PartCheck>> {
    let mut out = Vec::new();
    for p in REBUILT_PARTS {
        let b = read_opt(&bundle.join(p))?;
        let r = read_opt(&rebuilt.join(p))?;
        let status = match (&b, &r) {
            (None, _) => PartStatus::MissingInBundle,
            (_, None) => PartStatus::MissingInRebuild,
            (Some(b), Some(r)) if b == r => PartStatus::Identical,
            _ => PartStatus::Differs,
        };
        out.push(PartCheck {
            path: p.to_string(),
            status,
            bundle: b.as_deref().map(fact),
            rebuilt: r.as_deref().map(fact),
        });
    }
    Ok(out)
}

/// Key of an array element for the field path: `path` for files, `name` for inputs.
fn element_key(v: &Value) -> Option<String> {
    ["path", "name"]
        .iter()
        .find_map(|k| v.get(k).and_then(Value::as_str).map(str::to_string))
}

fn diff_values(path: &str, a: &Value, b: &Value, out: &mut Vec<(String, Value, Value)>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            let keyed = |v: &Vec<Value>| -> Option<BTreeMap<String, Value>> {
                let m: BTreeMap<String, Value> = v
                    .iter()
                    .map(|e| element_key(e).map(|k| (k, e.clone())))
                    .collect::<Option<_>>()?;
                (m.len() == v.len()).then_some(m)
            };
            if let (Some(mx), Some(my)) = (keyed(x), keyed(y)) {
                let keys: BTreeSet<&String> = mx.keys().chain(my.keys()).collect();
                for k in keys {
                    diff_values(
                        &format!("{path}[{k}]"),
                        mx.get(k).unwrap_or(&Value::Null),
                        my.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            } else if x.len() == y.len() {
                for (i, (ex, ey)) in x.iter().zip(y).enumerate() {
                    diff_values(&format!("{path}[{i}]"), ex, ey, out);
                }
            } else if a != b {
                out.push((path.to_string(), a.clone(), b.clone()));
            }
        }
        _ if a != b => out.push((path.to_string(), a.clone(), b.clone())),
        _ => {}
    }
}

/// What a differing manifest field says about the auditor's checkout or toolchain.
fn hint(field: &str, bundle: &Value, rebuilt: &Value) -> Option<String> {
    let show = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    if field == "build.rustc" {
        return Some(format!(
            "your toolchain differs: the release's agent was built with `{}`, yours is `{}`; \
             install that toolchain and audit again",
            show(bundle),
            show(rebuilt)
        ));
    }
    if field == "build.lock_sha256" || field.starts_with("inputs") || field == "kernel_release" {
        return Some(
            "your checkout differs: the release was built from another image/worker.lock; check \
             out the release's commit and audit again"
                .into(),
        );
    }
    if field.starts_with("image.") {
        return Some(format!(
            "you are auditing release {} with the checkout of {}: check out the release's commit",
            show(bundle),
            show(rebuilt)
        ));
    }
    if field.starts_with("launch.")
        || field == "build.source_date_epoch"
        || field == "build.agent_target"
        || field == "schema_version"
    {
        return Some(
            "your checkout differs: image/worker.yaml (or the build tool) is not the release's; \
             check out the release's commit"
                .into(),
        );
    }
    if field.starts_with("files[") {
        return Some("follows from the differing part (see the files above)".into());
    }
    None
}

/// Field-level differences of two manifest.json texts (bundle first).
pub fn manifest_differences(bundle: &[u8], rebuilt: &[u8]) -> Vec<FieldDiff> {
    let parse = |b: &[u8]| serde_json::from_slice::<Value>(b);
    match (parse(bundle), parse(rebuilt)) {
        (Ok(a), Ok(b)) => {
            let mut raw = Vec::new();
            diff_values("", &a, &b, &mut raw);
            raw.into_iter()
                .map(|(field, bundle, rebuilt)| FieldDiff {
                    hint: hint(&field, &bundle, &rebuilt),
                    field,
                    bundle,
                    rebuilt,
                })
                .collect()
        }
        (Err(e), _) => vec![FieldDiff {
            field: "(whole file)".into(),
            bundle: Value::String(format!("not JSON: {e}")),
            rebuilt: Value::Null,
            hint: Some("the bundle's manifest.json is damaged: download the release again".into()),
        }],
        (_, Err(e)) => vec![FieldDiff {
            field: "(whole file)".into(),
            bundle: Value::Null,
            rebuilt: Value::String(format!("not JSON: {e}")),
            hint: None,
        }],
    }
}

/// One summary line per kind of checkout/toolchain difference.
fn diagnosis(diffs: &[FieldDiff]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diffs {
        if let Some(h) = &d.hint
            && !h.starts_with("follows from")
            && !out.contains(h)
        {
            out.push(h.clone());
        }
    }
    out
}

/// Registers and image hashes: the bundle's measurements.json against the computed values
/// (`computed` is `measurements image --json` output for the rebuild and the bundle's acpi/).
pub fn register_checks(recorded: &Value, computed: &Value) -> Vec<RegisterCheck> {
    let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let check = |name: String, recorded: Option<String>, computed: Option<String>| {
        let status = match (&recorded, &computed) {
            (None, None) => RegisterStatus::Absent,
            (a, b) if a == b => RegisterStatus::Match,
            _ => RegisterStatus::Differs,
        };
        RegisterCheck {
            name,
            status,
            recorded,
            computed,
        }
    };
    let mut out: Vec<RegisterCheck> = REGISTERS
        .iter()
        .map(|name| check(name.to_string(), get(recorded, name), get(computed, name)))
        .collect();
    // Every TDX launch shape's RTMR0 and image hashes (what `publish image-hash` publishes).
    let shapes = |v: &Value| -> BTreeSet<String> {
        v.get("shapes")
            .and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    for shape in shapes(recorded).union(&shapes(computed)) {
        for field in SHAPE_REGISTERS {
            let at = |v: &Value| {
                v.get("shapes")
                    .and_then(|s| s.get(shape))
                    .and_then(|s| s.get(field))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            out.push(check(
                format!("shapes.{shape}.{field}"),
                at(recorded),
                at(computed),
            ));
        }
    }
    out
}

/// The per-shape fields of measurements.json `shapes` compared.
pub const SHAPE_REGISTERS: [&str; 3] = ["rtmr0", "image_hash_cw_v1", "image_hash_cocoon_v1"];

/// Top-level fields of measurements.json other than [`REGISTERS`] that differ.
fn measurement_notes(recorded: &Value, computed: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (recorded.as_object(), computed.as_object()) else {
        return Vec::new();
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let differing: Vec<&str> = keys
        .into_iter()
        .filter(|k| {
            !REGISTERS.contains(&k.as_str()) && k.as_str() != "shapes" && a.get(*k) != b.get(*k)
        })
        .map(String::as_str)
        .collect();
    if differing.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "measurements.json fields other than the registers differ from a fresh computation \
             (not a failure; recompute it with `cargo run -p measurements -- image DIR --json`): {}",
            differing.join(", ")
        )]
    }
}

/// Internal consistency of an image's `acpi/` (see the module documentation). `launch` is the
/// manifest's (memory MiB, vCPUs).
pub fn check_acpi(acpi: &Path, launch: Option<(u64, u64)>) -> anyhow::Result<AcpiCheck> {
    let mut c = AcpiCheck::default();
    if !acpi.is_dir() {
        c.notes.push(
            "the release has no acpi/: RTMR0 and both image hashes cannot be computed, so it \
             cannot be checked against the chain (capture with `cargo xtask image capture-acpi` \
             before packaging)"
                .into(),
        );
        return Ok(c);
    }
    c.present = true;
    let recapture = "capture again with `cargo xtask image capture-acpi` and package again";
    let tables = read_opt(&acpi.join("tables"))?;
    let rsdp = read_opt(&acpi.join("rsdp"))?;
    let loader = read_opt(&acpi.join("table-loader"))?;
    let blobs = [
        ("tables", &tables),
        ("rsdp", &rsdp),
        ("table-loader", &loader),
    ];
    match read_opt(&acpi.join("capture.json"))? {
        None => {}
        Some(text) => match serde_json::from_slice::<Value>(&text) {
            Err(e) => c
                .problems
                .push(format!("capture.json is not JSON ({e}): {recapture}")),
            Ok(rec) => {
                c.qemu_version = rec
                    .get("qemu_version")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let listed: BTreeMap<String, (Option<u64>, Option<String>)> = rec
                    .get("files")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| {
                                Some((
                                    f.get("file")?.as_str()?.to_string(),
                                    (
                                        f.get("size").and_then(Value::as_u64),
                                        f.get("sha384").and_then(Value::as_str).map(str::to_string),
                                    ),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut matched = Vec::new();
                for (name, data) in blobs {
                    let Some(data) = data else { continue };
                    match listed.get(name) {
                        None => c
                            .problems
                            .push(format!("capture.json does not record {name}: {recapture}")),
                        Some((size, sha)) => {
                            let actual = hex::encode(Sha384::digest(data));
                            if *size != Some(data.len() as u64)
                                || sha.as_deref().map(str::to_ascii_lowercase)
                                    != Some(actual.clone())
                            {
                                c.problems.push(format!(
                                    "{name} ({} bytes, sha384 {actual}) is not what capture.json \
                                     recorded ({} bytes, sha384 {}): it was changed after the \
                                     capture; {recapture}",
                                    data.len(),
                                    size.map_or("?".into(), |s| s.to_string()),
                                    sha.as_deref().unwrap_or("?")
                                ));
                            } else {
                                matched.push(name);
                            }
                        }
                    }
                }
                if !matched.is_empty() {
                    c.checks.push(format!(
                        "{} match the sizes and SHA-384 in capture.json",
                        matched.join(", ")
                    ));
                }
                let mem = rec.get("memory_mib").and_then(Value::as_u64);
                let cpus = rec.get("cpus").and_then(Value::as_u64);
                if let Some((m_mem, m_cpus)) = launch {
                    if mem == Some(m_mem) && cpus == Some(m_cpus) {
                        c.checks.push(format!(
                            "captured for the manifest's launch ({m_mem} MiB, {m_cpus} vCPUs)"
                        ));
                    } else {
                        c.problems.push(format!(
                            "captured for {} MiB and {} vCPUs but the manifest's launch is \
                             {m_mem} MiB and {m_cpus} vCPUs, which the registers are computed \
                             for: {recapture}",
                            mem.map_or("?".into(), |v| v.to_string()),
                            cpus.map_or("?".into(), |v| v.to_string())
                        ));
                    }
                }
            }
        },
    }
    if let Some(t) = &tables {
        match measurements::acpi::list_tables(t) {
            Ok(list) => {
                c.checks.push(format!(
                    "tables: {} ACPI tables ({})",
                    list.len(),
                    list.iter()
                        .map(|t| t.signature.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
                if let (Some(n), Some((_, cpus))) =
                    (measurements::compute::madt_cpu_count(t), launch)
                    && u64::from(n) != cpus
                {
                    c.problems.push(format!(
                        "the MADT describes {n} vCPUs but the manifest's launch has {cpus}: \
                         {recapture}"
                    ));
                }
            }
            Err(e) => c.problems.push(format!("tables: {e}; {recapture}")),
        }
    }
    if let Some(r) = &rsdp {
        if (r.len() == 20 || r.len() == 36) && r.starts_with(b"RSD PTR ") {
            c.checks.push(format!("rsdp: an RSDP of {} bytes", r.len()));
        } else {
            c.problems.push(format!(
                "rsdp ({} bytes) is not an RSDP (20 or 36 bytes starting with \"RSD PTR \"): \
                 {recapture}",
                r.len()
            ));
        }
    }
    if let Some(l) = &loader {
        if !l.is_empty() && l.len().is_multiple_of(128) {
            c.checks
                .push(format!("table-loader: {} loader commands", l.len() / 128));
        } else {
            c.problems.push(format!(
                "table-loader has {} bytes, not whole 128-byte loader commands: {recapture}",
                l.len()
            ));
        }
    }
    if let (Some(t), Some(r), Some(l)) = (&tables, &rsdp, &loader)
        && let Ok(s) = measurements::acpi::synthesize(t)
    {
        if &s.rsdp == r && &s.loader == l {
            c.checks
                .push("rsdp and table-loader are exactly what QEMU builds for these tables".into());
        } else {
            c.notes.push(
                "rsdp/table-loader differ from the form the measurements crate synthesizes for \
                 these tables (another QEMU version or machine); they are used as captured"
                    .into(),
            );
        }
    }
    Ok(c)
}

/// Computes the full `measurements image --json` value for the rebuilt image directory with
/// the given `acpi/` directory (or none).
pub type Measure<'a> = &'a dyn Fn(&Path, Option<&Path>) -> Result<Value, String>;

/// The real [`Measure`]: `measurements::image::measure_image_dir`.
pub fn measure(rebuilt: &Path, acpi: Option<&Path>) -> Result<Value, String> {
    // Without the bundle's acpi/, an empty folder stands in (the rebuild has none either).
    let none = rebuilt.join("acpi-absent");
    let m = measurements::image::measure_image_dir(
        rebuilt,
        &measurements::image::Options {
            acpi_dir: Some(acpi.map_or(none, Path::to_path_buf)),
            ..measurements::image::Options::default()
        },
    )
    .map_err(|e| e.to_string())?;
    serde_json::to_value(&m).map_err(|e| e.to_string())
}

/// Steps 1-3 on two directories: the layout of `bundle`, the parts and manifest of `rebuilt`
/// against it, `bundle/acpi/`, and the registers computed by `measure` against
/// `bundle/measurements.json`. Fails only on I/O errors; a refused directory (links) is an
/// error carrying [`Refused`]. The report is finalized (no chain answer yet).
pub fn compare_bundle(
    rebuilt: &Path,
    bundle: &Path,
    measure: Measure<'_>,
) -> anyhow::Result<AuditReport> {
    let mut r = AuditReport::empty();
    let entries = walk(bundle)?;
    (r.missing, r.extra) = layout_findings(&entries);
    r.parts = compare_parts(rebuilt, bundle)?;

    let bundle_manifest = read_opt(&bundle.join("manifest.json"))?;
    let manifest_value = bundle_manifest
        .as_deref()
        .and_then(|m| serde_json::from_slice::<Value>(m).ok());
    r.image = manifest_value
        .as_ref()
        .and_then(|m| m.get("image").cloned());
    if let (Some(b), Some(rb)) = (&bundle_manifest, read_opt(&rebuilt.join("manifest.json"))?)
        && *b != rb
    {
        r.manifest_differences = manifest_differences(b, &rb);
        r.diagnosis = diagnosis(&r.manifest_differences);
    }

    let launch = manifest_value.as_ref().and_then(|m| {
        let l = m.get("launch")?;
        Some((l.get("memory_mib")?.as_u64()?, l.get("cpus")?.as_u64()?))
    });
    let acpi_dir = bundle.join("acpi");
    r.acpi = check_acpi(&acpi_dir, launch)?;
    // Each shape's capture, against the shape's memory and vCPUs in the manifest.
    let shapes: Vec<(String, Option<(u64, u64)>)> = manifest_value
        .as_ref()
        .and_then(|m| m.pointer("/launch/tdx/shapes")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| {
            let name = s.get("name")?.as_str()?.to_string();
            let l = s
                .get("memory_mib")
                .and_then(Value::as_u64)
                .zip(s.get("cpus").and_then(Value::as_u64));
            Some((name, l))
        })
        .collect();
    for (name, l) in &shapes {
        let d = acpi_dir.join("shapes").join(name);
        if !d.is_dir() {
            if r.acpi.present {
                r.acpi.notes.push(format!(
                    "no capture for TDX launch shape {name} (acpi/shapes/{name}/): its image hash \
                     is not in measurements.json and cannot be published"
                ));
            }
            continue;
        }
        let c = check_acpi(&d, *l)?;
        let tag = |v: Vec<String>| v.into_iter().map(|x| format!("shapes/{name}: {x}"));
        r.acpi.checks.extend(tag(c.checks));
        r.acpi.problems.extend(tag(c.problems));
        r.acpi.notes.extend(tag(c.notes));
    }

    let acpi_arg = r.acpi.present.then_some(acpi_dir.as_path());
    let recorded = match read_opt(&bundle.join("measurements.json"))? {
        None => Some(Value::Null),
        Some(b) => match serde_json::from_slice::<Value>(&b) {
            Ok(v) => Some(v),
            Err(e) => {
                r.measure_error = Some(format!(
                    "the bundle's measurements.json is not JSON ({e}): download the release again"
                ));
                None
            }
        },
    };
    match measure(rebuilt, acpi_arg) {
        Ok(computed) => {
            if let Some(recorded) = &recorded {
                r.registers = register_checks(recorded, &computed);
                r.measurements_notes = measurement_notes(recorded, &computed);
            }
        }
        Err(e) => {
            r.measure_error = Some(format!(
                "{e} (computing from the rebuilt parts{})",
                if r.acpi.present {
                    " and the bundle's acpi/"
                } else {
                    ""
                }
            ))
        }
    }
    r.finalize();
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// The chain.

/// Asks the root contract whether `hash` (cw-v1, hex) is in its worker list. Every failure to
/// get an answer is [`OnchainStatus::Unreachable`], never approved.
pub fn ask_root<T: ton_root::Transport>(
    publisher: &ton_root::Publisher<T>,
    hash: Option<&str>,
) -> (OnchainStatus, String) {
    let Some(hash) = hash else {
        return (
            OnchainStatus::NoImageHash,
            "no cw-v1 image hash to ask about: the release carries no acpi/ (capture it with \
             `cargo xtask image capture-acpi` before packaging), so it cannot be approved"
                .into(),
        );
    };
    let h: ton_root::Hash256 = match hash.parse() {
        Ok(h) => h,
        Err(e) => return (OnchainStatus::NoImageHash, format!("image hash: {e}")),
    };
    match publisher.is_listed(ton_root::HashKind::Image, &h) {
        Ok(true) => (
            OnchainStatus::Approved,
            format!("image hash {hash} is approved by the root contract"),
        ),
        Ok(false) => (
            OnchainStatus::NotApproved,
            format!(
                "image hash {hash} is NOT listed by the root contract (the team publishes it \
                 with `host-launcher publish image-hash`)"
            ),
        ),
        Err(e) => (
            OnchainStatus::Unreachable,
            format!(
                "the chain could not be asked ({e}); check --rpc and the network and audit \
                 again (the answer is unknown, not approved)"
            ),
        ),
    }
}

/// `--root ADDR --rpc URL [--api-key KEY]`.
#[derive(Debug, Clone)]
pub struct ChainTarget {
    pub root: String,
    pub rpc: String,
    pub api_key: Option<String>,
}

impl ChainTarget {
    fn publisher(&self) -> anyhow::Result<ton_root::Publisher<ton_root::Toncenter>> {
        // An auditor only reads: accept an address of any network (a wrong one fails at the
        // get-method, which reports the chain's answer as unusable).
        let root = ton_root::wallet::parse_address(&self.root, ton_root::wallet::Network::Local)
            .context("--root")?;
        let mut cfg = ton_root::ToncenterConfig::new(&self.rpc);
        cfg.api_key = self.api_key.clone();
        cfg.timeout = std::time::Duration::from_secs(15);
        Ok(ton_root::Publisher::new(
            ton_root::Toncenter::new(cfg),
            root,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The command.

/// What `image audit` does.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The bundle archive or image directory.
    pub target: PathBuf,
    /// How to rebuild (repo, cache, mirror, agent target dir, quiet); `out` is ignored.
    pub build: BuildOptions,
    /// Keep the rebuilt image here (a new or empty directory); `None`: a temporary one.
    pub keep: Option<PathBuf>,
    pub chain: Option<ChainTarget>,
}

fn git(repo: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The whole audit. Errors are usage or build errors (exit 1); everything about the release
/// itself is in the report.
pub fn audit(opts: &AuditOptions) -> anyhow::Result<AuditReport> {
    let progress = Progress::new(opts.build.quiet);
    // Usage errors first, before minutes of building.
    let publisher = opts
        .chain
        .as_ref()
        .map(ChainTarget::publisher)
        .transpose()?;
    if let Some(k) = &opts.keep
        && k.exists()
        && std::fs::read_dir(k)
            .with_context(|| format!("reading {}", k.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!(
            "--out {} is not empty: give a new directory for the rebuilt image (an audit never \
             writes over an existing image)",
            k.display()
        );
    }

    progress.step("audit", format!("opening {}", opts.target.display()));
    let opened = match open(&opts.target) {
        Ok(o) => o,
        Err(e) => match e.downcast::<Refused>() {
            Ok(Refused(why)) => {
                let info = BundleInfo {
                    path: opts.target.clone(),
                    kind: if opts.target.is_dir() {
                        "directory"
                    } else {
                        "archive"
                    }
                    .into(),
                    sha256: None,
                    checksum_file: None,
                };
                return Ok(AuditReport::refused(Some(info), why));
            }
            Err(e) => return Err(e),
        },
    };
    if let Some(c) = &opened.info.checksum_file {
        progress.step(
            "audit",
            match c {
                ChecksumFile::Absent { path } => {
                    format!(
                        "no {} beside the bundle: its digest is not checked",
                        path.display()
                    )
                }
                ChecksumFile::Matches { path } => format!("bundle matches {}", path.display()),
                ChecksumFile::Mismatch { path, .. } => {
                    format!("bundle does NOT match {}", path.display())
                }
                ChecksumFile::Malformed { path } => {
                    format!("{} is not in sha256sum format", path.display())
                }
            },
        );
    }

    let work = tempfile::Builder::new()
        .prefix("worker-audit-rebuild-")
        .tempdir()
        .context("creating a temporary directory for the rebuild")?;
    let out = opts
        .keep
        .clone()
        .unwrap_or_else(|| work.path().join("image"));
    let repo = &opts.build.repo;
    let commit = git(repo, &["rev-parse", "HEAD"]);
    let dirty =
        git(repo, &["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    progress.step(
        "audit",
        format!(
            "rebuilding from {} at commit {}{} into {} (the agent reuses {})",
            repo.display(),
            commit.as_deref().unwrap_or("(unknown)"),
            if dirty == Some(true) {
                " with uncommitted changes"
            } else {
                ""
            },
            out.display(),
            opts.build.agent_target_dir.display()
        ),
    );
    let t = std::time::Instant::now();
    build(&BuildOptions {
        out: out.clone(),
        ..opts.build.clone()
    })
    .context("rebuilding the image from this checkout")?;
    let seconds = t.elapsed().as_secs_f64();

    progress.step(
        "audit",
        "comparing the parts and computing the registers (rebuilt parts + the bundle's acpi/)",
    );
    let mut report = compare_bundle(&out, &opened.dir, &measure)?;
    report.bundle = Some(opened.info.clone());
    report.rebuilt = Some(RebuildInfo {
        commit,
        dirty,
        kept_in: opts.keep.clone(),
        seconds,
    });
    if let (Some(p), Some(c)) = (&publisher, &opts.chain) {
        let hash = report.computed_cw_v1().map(str::to_string);
        progress.step(
            "audit",
            format!(
                "asking root {} via {} about the cw-v1 image hash",
                c.root, c.rpc
            ),
        );
        let (status, detail) = ask_root(p, hash.as_deref());
        report.onchain = Some(OnchainCheck {
            root: c.root.clone(),
            rpc: c.rpc.clone(),
            hash,
            status,
            detail,
        });
    }
    report.finalize();
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The human report.

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// The report as text for a terminal.
pub fn render(r: &AuditReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let name = r
        .image
        .as_ref()
        .map(|i| {
            format!(
                "{} {}",
                i.get("name").and_then(Value::as_str).unwrap_or("?"),
                i.get("version").and_then(Value::as_str).unwrap_or("?")
            )
        })
        .unwrap_or_else(|| "(unknown image)".into());
    let _ = writeln!(
        s,
        "audit of {name}: {}",
        r.bundle
            .as_ref()
            .map_or("?".into(), |b| format!("{} ({})", b.path.display(), b.kind))
    );
    if let Some(b) = &r.bundle {
        if let Some(sha) = &b.sha256 {
            let _ = writeln!(s, "  bundle sha256 {sha}");
        }
        match &b.checksum_file {
            Some(ChecksumFile::Matches { path }) => {
                let _ = writeln!(s, "  matches {}", path.display());
            }
            Some(ChecksumFile::Absent { path }) => {
                let _ = writeln!(
                    s,
                    "  no {} beside it: the bundle's digest was not checked against a published one",
                    path.display()
                );
            }
            Some(ChecksumFile::Mismatch { path, expected }) => {
                let _ = writeln!(
                    s,
                    "  DOES NOT MATCH {} (published {expected}): the download is corrupt or was \
                     tampered with; download the bundle and its .sha256 again",
                    path.display()
                );
            }
            Some(ChecksumFile::Malformed { path }) => {
                let _ = writeln!(
                    s,
                    "  {} is not in sha256sum format: download it again",
                    path.display()
                );
            }
            None => {}
        }
    }
    if let Some(why) = &r.refused {
        let _ = writeln!(s, "REFUSED: {why}");
    }
    if let Some(b) = &r.rebuilt {
        let _ = writeln!(
            s,
            "  rebuilt from commit {}{} in {:.0} s{}",
            b.commit.as_deref().unwrap_or("(unknown)"),
            match b.dirty {
                Some(true) => " (with uncommitted changes)",
                _ => "",
            },
            b.seconds,
            b.kept_in
                .as_ref()
                .map_or(String::new(), |k| format!(", kept in {}", k.display()))
        );
    }
    if !r.parts.is_empty() {
        let _ = writeln!(s, "files (rebuilt vs bundle, byte for byte)");
        for p in &r.parts {
            let line = match p.status {
                PartStatus::Identical => format!(
                    "identical  sha256 {}",
                    p.bundle.as_ref().map_or("", |f| short(&f.sha256))
                ),
                PartStatus::Differs => format!(
                    "DIFFERS    bundle sha256 {} ({} bytes), rebuilt {} ({} bytes)",
                    p.bundle.as_ref().map_or("", |f| short(&f.sha256)),
                    p.bundle.as_ref().map_or(0, |f| f.size),
                    p.rebuilt.as_ref().map_or("", |f| short(&f.sha256)),
                    p.rebuilt.as_ref().map_or(0, |f| f.size)
                ),
                PartStatus::MissingInBundle => "MISSING from the bundle".to_string(),
                PartStatus::MissingInRebuild => "not made by the rebuild".to_string(),
            };
            let _ = writeln!(s, "  {:<18} {line}", p.path);
        }
    }
    for d in &r.manifest_differences {
        let _ = writeln!(
            s,
            "  manifest.json {}: bundle {} / rebuilt {}",
            d.field, d.bundle, d.rebuilt
        );
    }
    for d in &r.diagnosis {
        let _ = writeln!(s, "  => {d}");
    }
    for f in &r.missing {
        let _ = writeln!(s, "  MISSING {}: {}", f.path, f.fix);
    }
    for f in &r.extra {
        let _ = writeln!(s, "  EXTRA {}: {}", f.path, f.fix);
    }
    if r.refused.is_none() {
        let acpi = if r.acpi.present {
            format!(
                "taken from the bundle (launch data captured from QEMU{}, not rebuilt)",
                r.acpi
                    .qemu_version
                    .as_ref()
                    .map_or(String::new(), |v| format!(" {v}"))
            )
        } else {
            "not in the release".to_string()
        };
        let _ = writeln!(s, "  {:<18} {acpi}", "acpi/");
        for c in &r.acpi.checks {
            let _ = writeln!(s, "    ok: {c}");
        }
        for p in &r.acpi.problems {
            let _ = writeln!(s, "    PROBLEM: {p}");
        }
        for n in &r.acpi.notes {
            let _ = writeln!(s, "    note: {n}");
        }
    }
    if !r.registers.is_empty() || r.measure_error.is_some() {
        let _ = writeln!(
            s,
            "registers (computed from the rebuilt parts{} vs the bundle's measurements.json)",
            if r.acpi.present {
                " + the bundle's acpi/"
            } else {
                ""
            }
        );
        for g in &r.registers {
            let line = match g.status {
                RegisterStatus::Match => {
                    format!("match    {}", g.computed.as_deref().unwrap_or(""))
                }
                RegisterStatus::Differs => format!(
                    "DIFFERS  recorded {}, computed {}",
                    g.recorded.as_deref().unwrap_or("(none)"),
                    g.computed.as_deref().unwrap_or("(none)")
                ),
                RegisterStatus::Absent => "absent (needs acpi/)".to_string(),
            };
            let _ = writeln!(s, "  {:<21} {line}", g.name);
        }
        if let Some(e) = &r.measure_error {
            let _ = writeln!(s, "  NOT COMPUTABLE: {e}");
        }
        for n in &r.measurements_notes {
            let _ = writeln!(s, "  note: {n}");
        }
    }
    if let Some(o) = &r.onchain {
        let word = match o.status {
            OnchainStatus::Approved => "APPROVED",
            OnchainStatus::NotApproved => "NOT APPROVED",
            OnchainStatus::NoImageHash => "NOT APPROVABLE",
            OnchainStatus::Unreachable => "UNREACHABLE",
        };
        let _ = writeln!(s, "on chain (root {} via {})", o.root, o.rpc);
        let _ = writeln!(s, "  {word}: {}", o.detail);
    }
    let _ = writeln!(s, "verdict: {} (exit {})", r.verdict.words(), r.exit_code);
    for f in &r.failures {
        let _ = writeln!(s, "  - {f}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, data: &[u8]) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }

    fn manifest(rustc: &str, initrd_sha: &str) -> Vec<u8> {
        serde_json::to_vec_pretty(&serde_json::json!({
            "schema_version": 1,
            "image": {"name": "worker", "version": "0.1.0"},
            "files": [
                {"path": "initrd", "role": "initrd", "sha256": initrd_sha, "size": 6},
                {"path": "vmlinuz", "role": "kernel", "sha256": "bb", "size": 6},
            ],
            "launch": {"memory_mib": 2048, "cpus": 1, "cmdline": "console=ttyS0"},
            "kernel_release": "7.3.4+deb13-amd64",
            "inputs": [{"name": "ovmf", "version": "1", "sha256": "cc"}],
            "build": {"rustc": rustc, "lock_sha256": "dd", "source_date_epoch": 1},
        }))
        .expect("json")
    }

    /// A fake measurement: registers derived from the parts' hashes (and acpi/ when given).
    fn fake_measure(rebuilt: &Path, acpi: Option<&Path>) -> Result<Value, String> {
        let h = |p: &str| {
            std::fs::read(rebuilt.join(p))
                .map(|d| sha256_bytes(&d))
                .map_err(|e| e.to_string())
        };
        let mut v = serde_json::json!({
            "mrtd": h("OVMF.fd")?, "rtmr1": h("vmlinuz")?, "rtmr2": h("initrd")?,
            "rtmr3": "00", "missing": {},
        });
        if let Some(a) = acpi {
            let t = std::fs::read(a.join("tables")).map_err(|e| e.to_string())?;
            v["rtmr0"] = Value::String(sha256_bytes(&t));
            v["image_hash_cw_v1"] = Value::String("ab".repeat(32));
            v["image_hash_cocoon_v1"] = Value::String("cd".repeat(32));
        }
        Ok(v)
    }

    /// An image directory with fake parts, a manifest and a measurements.json made by
    /// `fake_measure` (so an untouched copy reproduces).
    fn fake_image(dir: &Path, acpi: bool) {
        write(dir, "OVMF.fd", b"firmware");
        write(dir, "vmlinuz", b"kernel");
        write(dir, "initrd", b"initrd");
        write(dir, "cmdline", b"console=ttyS0");
        write(dir, "manifest.json", &manifest("rustc 1.95.0", "aa"));
        if acpi {
            // One empty RSDT: a structurally valid tables blob.
            let mut tables = b"RSDT".to_vec();
            tables.extend_from_slice(&36u32.to_le_bytes());
            tables.resize(36, 0);
            write(dir, "acpi/tables", &tables);
            write(dir, "acpi/rsdp", b"RSD PTR 0123456789ab");
            write(dir, "acpi/table-loader", &[0u8; 256]);
            let files: Vec<Value> = ["tables", "rsdp", "table-loader"]
                .iter()
                .map(|f| {
                    let d = std::fs::read(dir.join("acpi").join(f)).expect("read");
                    serde_json::json!({"file": f, "size": d.len(),
                        "sha384": hex::encode(Sha384::digest(&d))})
                })
                .collect();
            let rec = serde_json::json!({
                "qemu_version": "10.1.0", "memory_mib": 2048, "cpus": 1, "files": files,
            });
            write(
                dir,
                "acpi/capture.json",
                &serde_json::to_vec(&rec).expect("json"),
            );
        }
        let m = fake_measure(dir, acpi.then(|| dir.join("acpi")).as_deref()).expect("measure");
        write(
            dir,
            "measurements.json",
            &serde_json::to_vec_pretty(&m).expect("json"),
        );
    }

    /// The rebuild side: the parts and manifest only (what `build` makes, minus acpi/).
    fn rebuilt_from(bundle: &Path, dest: &Path) {
        for p in REBUILT_PARTS {
            write(dest, p, &std::fs::read(bundle.join(p)).expect("read"));
        }
    }

    fn pair(acpi: bool) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().expect("tmp");
        let bundle = t.path().join("bundle");
        let rebuilt = t.path().join("rebuilt");
        fake_image(&bundle, acpi);
        rebuilt_from(&bundle, &rebuilt);
        (t, bundle, rebuilt)
    }

    #[test]
    fn an_honest_bundle_is_reproduced() {
        for acpi in [true, false] {
            let (_t, bundle, rebuilt) = pair(acpi);
            let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
            assert_eq!(r.verdict, Verdict::Reproduced, "{}", render(&r));
            assert_eq!(r.exit_code, 0);
            assert!(r.failures.is_empty(), "{:?}", r.failures);
            assert!(
                r.parts.iter().all(|p| p.status == PartStatus::Identical),
                "{:?}",
                r.parts
            );
            assert_eq!(
                r.parts.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
                REBUILT_PARTS
            );
            let statuses: Vec<_> = r.registers.iter().map(|g| g.status).collect();
            let want_r0 = if acpi {
                RegisterStatus::Match
            } else {
                RegisterStatus::Absent
            };
            assert_eq!(
                statuses,
                [
                    RegisterStatus::Match,
                    want_r0,
                    RegisterStatus::Match,
                    RegisterStatus::Match,
                    RegisterStatus::Match,
                    want_r0,
                    want_r0
                ]
            );
            assert_eq!(r.acpi.present, acpi);
            if acpi {
                assert!(r.acpi.problems.is_empty(), "{:?}", r.acpi.problems);
                assert!(
                    r.acpi.checks.iter().any(|c| c.contains("capture.json")),
                    "{:?}",
                    r.acpi.checks
                );
                assert_eq!(r.computed_cw_v1(), Some("ab".repeat(32).as_str()));
            }
            let text = render(&r);
            assert!(text.contains("verdict: REPRODUCED (exit 0)"), "{text}");
        }
    }

    #[test]
    fn a_tampered_initrd_is_named() {
        let (_t, bundle, rebuilt) = pair(true);
        let mut d = std::fs::read(bundle.join("initrd")).expect("read");
        d[0] ^= 1;
        std::fs::write(bundle.join("initrd"), d).expect("write");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::NotReproduced);
        assert_eq!(r.exit_code, EXIT_NOT_REPRODUCED);
        let differing: Vec<&str> = r
            .parts
            .iter()
            .filter(|p| p.status == PartStatus::Differs)
            .map(|p| p.path.as_str())
            .collect();
        assert_eq!(differing, ["initrd"]);
        assert_eq!(r.failures, ["initrd differs from the rebuild"]);
        // The registers come from the rebuilt parts: they still match measurements.json.
        assert!(
            r.registers
                .iter()
                .all(|g| g.status == RegisterStatus::Match)
        );
        assert!(render(&r).contains("DIFFERS"), "{}", render(&r));
    }

    #[test]
    fn missing_and_extra_files_are_named_with_their_fix() {
        let (_t, bundle, rebuilt) = pair(true);
        std::fs::remove_file(bundle.join("vmlinuz")).expect("rm");
        std::fs::remove_file(bundle.join("acpi/rsdp")).expect("rm");
        write(&bundle, "notes.txt", b"hello");
        write(&bundle, "acpi/extra.bin", b"x");
        std::fs::create_dir(bundle.join("empty")).expect("mkdir");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::NotReproduced);
        let missing: Vec<&str> = r.missing.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(missing, ["vmlinuz", "acpi/rsdp"]);
        assert!(r.missing[0].fix.contains("cargo xtask image package"));
        assert!(r.missing[1].fix.contains("cargo xtask image capture-acpi"));
        let extra: Vec<&str> = r.extra.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(extra, ["acpi/extra.bin", "empty/", "notes.txt"]);
        assert!(r.extra.iter().all(|f| f.fix.contains("remove it")));
        assert!(r.failures.contains(&"missing file vmlinuz".to_string()));
        assert!(r.failures.contains(&"extra file notes.txt".to_string()));
        let vm = r.parts.iter().find(|p| p.path == "vmlinuz").expect("row");
        assert_eq!(vm.status, PartStatus::MissingInBundle);
        // A layout without measurements.json names that fix too.
        let (m, _) = layout_findings(&[Entry {
            path: "OVMF.fd".into(),
            is_dir: false,
        }]);
        let mj = m
            .iter()
            .find(|f| f.path == "measurements.json")
            .expect("named");
        assert!(mj.fix.contains("cargo xtask image build"), "{}", mj.fix);
    }

    #[test]
    fn a_register_mismatch_in_measurements_json_is_named() {
        let (_t, bundle, rebuilt) = pair(true);
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("measurements.json")).expect("r"))
                .expect("json");
        m["rtmr1"] = Value::String("00".repeat(48));
        m["image_hash_cw_v1"] = Value::String("ef".repeat(32));
        std::fs::write(bundle.join("measurements.json"), m.to_string()).expect("write");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::NotReproduced);
        let differing: Vec<&str> = r
            .registers
            .iter()
            .filter(|g| g.status == RegisterStatus::Differs)
            .map(|g| g.name.as_str())
            .collect();
        assert_eq!(differing, ["rtmr1", "image_hash_cw_v1"]);
        assert_eq!(
            r.failures,
            [
                "rtmr1 differs from measurements.json",
                "image_hash_cw_v1 differs from measurements.json"
            ]
        );
        // A measurements.json that claims RTMR0 for a bundle without acpi/ also fails.
        let (_t, bundle, rebuilt) = pair(false);
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("measurements.json")).expect("r"))
                .expect("json");
        m["rtmr0"] = Value::String("11".repeat(48));
        std::fs::write(bundle.join("measurements.json"), m.to_string()).expect("write");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.failures, ["rtmr0 differs from measurements.json"]);
        // Non-register fields are only a note.
        let (_t, bundle, rebuilt) = pair(false);
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("measurements.json")).expect("r"))
                .expect("json");
        m["missing"] = serde_json::json!({"rtmr0": "older wording"});
        std::fs::write(bundle.join("measurements.json"), m.to_string()).expect("write");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::Reproduced);
        assert!(r.measurements_notes[0].contains("missing"));
        // A measurement that cannot be made fails, with the reason.
        let fail = |_: &Path, _: Option<&Path>| -> Result<Value, String> {
            Err("the ACPI tables describe 2 vCPUs".into())
        };
        let r = compare_bundle(&rebuilt, &bundle, &fail).expect("compare");
        assert_eq!(r.verdict, Verdict::NotReproduced);
        assert!(r.failures[0].contains("2 vCPUs"), "{:?}", r.failures);
    }

    #[test]
    fn manifest_fields_say_whether_checkout_or_toolchain_differs() {
        let (_t, bundle, rebuilt) = pair(false);
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(rebuilt.join("manifest.json")).expect("r"))
                .expect("json");
        m["build"]["rustc"] = "rustc 1.96.0".into();
        m["build"]["lock_sha256"] = "ee".into();
        m["files"][0]["sha256"] = "a1".into();
        m["inputs"][0]["version"] = "2".into();
        std::fs::write(
            rebuilt.join("manifest.json"),
            serde_json::to_vec_pretty(&m).expect("json"),
        )
        .expect("write");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::NotReproduced);
        assert_eq!(r.failures, ["manifest.json differs from the rebuild"]);
        let fields: Vec<&str> = r
            .manifest_differences
            .iter()
            .map(|d| d.field.as_str())
            .collect();
        assert_eq!(
            fields,
            [
                "build.lock_sha256",
                "build.rustc",
                "files[initrd].sha256",
                "inputs[ovmf].version"
            ]
        );
        assert_eq!(r.diagnosis.len(), 2, "{:?}", r.diagnosis);
        assert!(
            r.diagnosis
                .iter()
                .any(|d| d.contains("your checkout differs"))
        );
        assert!(
            r.diagnosis
                .iter()
                .any(|d| d.contains("your toolchain differs") && d.contains("rustc 1.95.0"))
        );
    }

    #[test]
    fn inconsistent_acpi_fails_and_names_the_blob() {
        let (_t, bundle, rebuilt) = pair(true);
        write(&bundle, "acpi/rsdp", b"RSD PTR 0123456789zz");
        let r = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::NotReproduced);
        assert_eq!(r.acpi.problems.len(), 1, "{:?}", r.acpi.problems);
        assert!(
            r.acpi.problems[0].starts_with("rsdp ") && r.acpi.problems[0].contains("capture.json"),
            "{:?}",
            r.acpi.problems
        );
        // Captured for another launch than the manifest's.
        let (_t, bundle, _) = pair(true);
        let c = check_acpi(&bundle.join("acpi"), Some((4096, 1))).expect("check");
        assert!(c.problems.iter().any(|p| p.contains("4096 MiB")), "{c:?}");
    }

    #[test]
    fn exit_codes_map_from_the_verdict() {
        assert_eq!(Verdict::Reproduced.exit_code(), 0);
        assert_eq!(Verdict::NotReproduced.exit_code(), 3);
        assert_eq!(Verdict::NotApproved.exit_code(), 4);
        assert_eq!(Verdict::ChainUnreachable.exit_code(), 5);
        let (_t, bundle, rebuilt) = pair(true);
        let base = compare_bundle(&rebuilt, &bundle, &fake_measure).expect("compare");
        let with = |status| {
            let mut r = base.clone();
            r.onchain = Some(OnchainCheck {
                root: "EQ".into(),
                rpc: "http://127.0.0.1:9/api/v2".into(),
                hash: None,
                status,
                detail: "d".into(),
            });
            r.finalize();
            r.exit_code
        };
        assert_eq!(with(OnchainStatus::Approved), 0);
        assert_eq!(with(OnchainStatus::NotApproved), 4);
        assert_eq!(with(OnchainStatus::NoImageHash), 4);
        assert_eq!(with(OnchainStatus::Unreachable), 5);
        // Not reproduced wins over any chain answer.
        let mut bad = base.clone();
        bad.parts[1].status = PartStatus::Differs;
        bad.onchain = Some(OnchainCheck {
            root: "EQ".into(),
            rpc: "u".into(),
            hash: None,
            status: OnchainStatus::Approved,
            detail: "d".into(),
        });
        bad.finalize();
        assert_eq!(bad.exit_code, 3);
        let refused = AuditReport::refused(None, "entry `../x`".into());
        assert_eq!(refused.exit_code, 3);
        assert_eq!(refused.failures, ["bundle refused: entry `../x`"]);
        // The JSON form carries the verdict and code.
        let v = serde_json::to_value(&base).expect("json");
        assert_eq!(v["verdict"], "reproduced");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["schema_version"], 1);
    }

    /// A tar with raw entries (names written as given, so `..` and links can be built).
    fn raw_tar(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            let n = name.as_bytes();
            h.as_old_mut().name[..n.len()].copy_from_slice(n);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").expect("link");
                h.set_size(0);
            }
            h.set_cksum();
            b.append(
                &h,
                if *kind == tar::EntryType::Symlink {
                    &[][..]
                } else {
                    data
                },
            )
            .expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn refusal(tar: &[u8]) -> String {
        let d = tempfile::tempdir().expect("tmp");
        let e = unpack(tar, d.path()).expect_err("refused");
        e.downcast_ref::<Refused>()
            .unwrap_or_else(|| panic!("not a refusal: {e:#}"))
            .0
            .clone()
    }

    #[test]
    fn traversal_links_and_duplicates_are_refused() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let ok = raw_tar(&[
            ("worker/", Directory, b""),
            ("worker/initrd", Regular, b"i"),
            ("worker/acpi/", Directory, b""),
            ("worker/acpi/tables", Regular, b"t"),
        ]);
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(unpack(&ok[..], d.path()).expect("ok"), "worker");
        assert_eq!(
            std::fs::read(d.path().join("worker/acpi/tables")).expect("r"),
            b"t"
        );

        let e = refusal(&raw_tar(&[
            ("worker/", Directory, b""),
            ("worker/../../evil", Regular, b"x"),
        ]));
        assert!(e.contains("`..`"), "{e}");
        let e = refusal(&raw_tar(&[("/etc/evil", Regular, b"x")]));
        assert!(e.contains("absolute"), "{e}");
        let e = refusal(&raw_tar(&[
            ("worker/", Directory, b""),
            ("worker/initrd", Symlink, b""),
        ]));
        assert!(e.contains("is a link"), "{e}");
        let e = refusal(&raw_tar(&[
            ("worker/initrd", Regular, b"a"),
            ("worker/initrd", Regular, b"b"),
        ]));
        assert!(e.contains("appears twice"), "{e}");
        let e = refusal(&raw_tar(&[
            ("worker/initrd", Regular, b"a"),
            ("other/initrd", Regular, b"b"),
        ]));
        assert!(e.contains("outside the bundle's top folder"), "{e}");
        let e = refusal(&raw_tar(&[("initrd", Regular, b"a")]));
        assert!(e.contains("top level"), "{e}");
        let e = refusal(b"this is not a tar archive at all, just some bytes......");
        assert!(!e.is_empty());

        // An image directory with a link is refused too.
        let (_t, bundle, rebuilt) = pair(false);
        std::fs::remove_file(bundle.join("initrd")).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", bundle.join("initrd")).expect("ln");
        let e = compare_bundle(&rebuilt, &bundle, &fake_measure).expect_err("link");
        assert!(
            e.downcast_ref::<Refused>()
                .is_some_and(|r| r.0.contains("symbolic link")),
            "{e:#}"
        );
    }

    #[test]
    fn a_packaged_bundle_opens_and_its_checksum_is_checked() {
        let (t, bundle, rebuilt) = pair(true);
        let (path, sha) = super::super::package::package(
            &bundle,
            &t.path().join("out"),
            "worker-0.1.0",
            "worker",
            1,
        )
        .expect("package");
        let o = open(&path).expect("open");
        assert_eq!(
            o.info.checksum_file,
            Some(ChecksumFile::Matches {
                path: PathBuf::from(format!("{}.sha256", path.display()))
            })
        );
        assert_eq!(o.info.sha256.as_deref(), Some(sha.as_str()));
        let r = compare_bundle(&rebuilt, &o.dir, &fake_measure).expect("compare");
        assert_eq!(r.verdict, Verdict::Reproduced, "{}", render(&r));
        // A wrong published digest is reported (and fails the audit).
        std::fs::write(
            format!("{}.sha256", path.display()),
            format!("{}  worker-0.1.0.tar.zst\n", "0".repeat(64)),
        )
        .expect("write");
        let o = open(&path).expect("open");
        let mut r = compare_bundle(&rebuilt, &o.dir, &fake_measure).expect("compare");
        r.bundle = Some(o.info.clone());
        r.finalize();
        assert_eq!(r.verdict, Verdict::NotReproduced);
        assert!(r.failures[0].contains(".sha256"), "{:?}", r.failures);
        std::fs::remove_file(format!("{}.sha256", path.display())).expect("rm");
        assert!(matches!(
            open(&path).expect("open").info.checksum_file,
            Some(ChecksumFile::Absent { .. })
        ));
    }

    /// A chain that answers a fixed get-method result, or fails.
    struct FakeChain(Option<i128>);

    impl ton_root::Transport for &FakeChain {
        fn send_boc(&self, _: &[u8]) -> Result<(), ton_root::Error> {
            Err(ton_root::Error::Transport("read-only".into()))
        }
        fn run_get_method(
            &self,
            _: &str,
            _: &str,
            _: &[String],
        ) -> Result<ton_root::transport::GetMethodResult, ton_root::Error> {
            match self.0 {
                Some(n) => Ok(ton_root::transport::GetMethodResult {
                    exit_code: 0,
                    stack: vec![ton_root::transport::StackEntry::Num(n)],
                }),
                None => Err(ton_root::Error::Transport("connection refused".into())),
            }
        }
        fn wallet_information(
            &self,
            _: &str,
        ) -> Result<ton_root::transport::WalletInfo, ton_root::Error> {
            Err(ton_root::Error::Transport("unused".into()))
        }
        fn address_information(
            &self,
            _: &str,
        ) -> Result<ton_root::transport::AddressInfo, ton_root::Error> {
            Err(ton_root::Error::Transport("unused".into()))
        }
    }

    #[test]
    fn the_root_contract_answer_maps_to_a_status_and_unreachable_is_never_approved() {
        let root = ton_root::wallet::parse_address(
            "0:0000000000000000000000000000000000000000000000000000000000000001",
            ton_root::wallet::Network::Local,
        )
        .expect("address");
        let hash = "ab".repeat(32);
        let ask = |chain: &FakeChain, h: Option<&str>| {
            ask_root(&ton_root::Publisher::new(chain, root.clone()), h).0
        };
        assert_eq!(
            ask(&FakeChain(Some(-1)), Some(&hash)),
            OnchainStatus::Approved
        );
        assert_eq!(
            ask(&FakeChain(Some(0)), Some(&hash)),
            OnchainStatus::NotApproved
        );
        assert_eq!(
            ask(&FakeChain(Some(7)), Some(&hash)),
            OnchainStatus::Unreachable
        );
        assert_eq!(
            ask(&FakeChain(None), Some(&hash)),
            OnchainStatus::Unreachable
        );
        assert_eq!(ask(&FakeChain(Some(-1)), None), OnchainStatus::NoImageHash);
    }
}
