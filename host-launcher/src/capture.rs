//! `host-launcher capture-acpi`: the documented ACPI capture procedure as one command.
//!
//! RTMR0 covers three QEMU fw_cfg blobs (`etc/table-loader`, `etc/acpi/rsdp`, `etc/acpi/tables`)
//! that QEMU generates at launch. This boots the image under TCG (`--tee none`) with the same
//! preparation and supervisor as `run --exit-when-healthy` ([`crate::prepare`],
//! [`crate::supervise::run_then`]), fetches the blobs from the agent's
//! [`worker_api::FIRMWARE_ACPI_PATH`] through the forwarded port, checks their shape
//! ([`validate`]), writes them under the names `measurements` reads (`tables`, `rsdp`,
//! `table-loader`) plus `capture.json` (QEMU version, memory, vCPUs, SHA-384 of each blob), and
//! stops the guest cleanly.
//!
//! **`--for tdx` (default): the TD's tables.** The boot uses the machine line and device list of
//! one of the image's TDX launch shapes (versioned machine type, `smm=off,pic=off,hpet=off`,
//! `-cpu max,phys-bits=46`, a `virtio-rng-pci` in the vsock device's slot; see
//! [`crate::qemu::argv`]). Per `measurements/docs/tdx-acpi-differences.md`, upstream QEMU
//! (>= 10.1) changes nothing else in the tables for a TD, and such a TCG boot of QEMU 10.0.2
//! reproduced a real QEMU 10.2.1 TD's three ACPI digests. Shapes with GPUs are refused (their
//! tables are unverified without the GPUs). `--for tcg` captures a plain `--tee none` launch.
//!
//! **Always TCG, even where `run --tee none` would pick KVM.** The blobs feed RTMR0 and so the
//! published image hash; they must be the same on every host that captures them. QEMU builds some
//! ACPI content from what the accelerator offers (e.g. the FADT's SMI command port follows
//! whether SMM is enabled, which under KVM depends on the host kernel's KVM), so a KVM capture
//! could differ from a TCG one, and from one KVM host to another. That KVM and TCG give identical
//! tables has not been verified (the development machines have no KVM that boots the image: a
//! paravirtual `kvm_pvm` whose QEMU vCPU setup fails), so the capture stays on TCG, whose tables
//! depend only on the QEMU version and the launch options. It is one short boot; speed does not
//! matter here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha384};
use worker_api::{FirmwareAcpi, FwCfgBlob};

use crate::settings::{AccelMode, FileSettings, MemSize, Tee};

/// File names inside the capture folder, as `measurements::compute::AcpiSource::from_dir` reads.
pub const TABLES_FILE: &str = "tables";
/// See [`TABLES_FILE`].
pub const RSDP_FILE: &str = "rsdp";
/// See [`TABLES_FILE`].
pub const LOADER_FILE: &str = "table-loader";
/// The capture's provenance record.
pub const CAPTURE_RECORD_FILE: &str = "capture.json";

/// Size of one QEMU BIOSLinkerLoader command.
const LOADER_ENTRY_SIZE: usize = 128;

/// The caveat printed with every capture and stored in `capture.json`.
pub fn caveat(qemu_version: &str) -> String {
    format!(
        "captured under TCG (no TEE) with this host's QEMU {qemu_version}; a TDX launch on a \
         host with another QEMU version, machine options or device set (GPU, vsock) may produce \
         different tables, and so a different RTMR0: recapture on the TDX host, or check with \
         `measurements diff --image DIR --ccel-data ...` on a real TD"
    )
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Image directory (from `cargo xtask image build`). A bundle .tar.zst is unpacked as `run`
    /// does, but then --out is required (the unpacked copy is a cache, not yours).
    /// Default: out/worker if it exists.
    #[arg(long, value_name = "DIR|BUNDLE")]
    image: Option<PathBuf>,
    /// Guest memory of the launch to capture: 2048 (MiB), 2G, 2GiB. It changes the DSDT.
    /// Default: the manifest's launch.memory_mib.
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// vCPUs of the launch to capture (MADT, DSDT). Default: the manifest's launch.cpus.
    #[arg(long)]
    cpus: Option<u32>,
    /// Whose tables: `tdx` (default) boots under TCG with the machine line and device list of
    /// the image's TDX launch shape (versioned machine type, smm/pic/hpet off, 46-bit guest
    /// physical addresses, a stand-in device in the vsock slot), which per
    /// measurements/docs/tdx-acpi-differences.md is what QEMU builds for the TD itself; `tcg`
    /// captures the plain `--tee none` launch's tables (q35, TCG defaults).
    #[arg(long = "for", value_enum, default_value = "tdx", value_name = "TEE")]
    for_tee: CaptureFor,
    /// TDX launch shape to capture (with --for tdx). Default: the shape matching --memory and
    /// --cpus (or the manifest's launch defaults). GPU shapes get a stand-in device behind
    /// each root port (see --via).
    #[arg(long, value_name = "NAME", conflicts_with = "all_shapes")]
    shape: Option<String>,
    /// Capture every TDX shape the image declares (with --for tdx): each into
    /// `<out>/shapes/<name>/`, and the launch defaults' shape also into `<out>/` itself (what
    /// `--tee none` launches and the single-shape tools read). This is what `cargo xtask image
    /// capture-acpi` runs.
    #[arg(long, conflicts_with_all = ["memory", "cpus"])]
    all_shapes: bool,
    /// How the blobs are read. `firmware` (default): QEMU starts paused with a qtest socket,
    /// the firmware runs until it has read the ACPI blobs over fw_cfg (seconds, no kernel,
    /// any memory size and vCPU count, GPU stand-ins), and the blobs are read from QEMU.
    /// `guest`: the whole image boots and the agent returns the blobs the guest sees (same
    /// bytes; shapes without GPUs and with memory this host can boot only).
    #[arg(long, value_enum, default_value = "firmware", value_name = "HOW")]
    via: Via,
    /// Folder to write `tables`, `rsdp`, `table-loader`, `capture.json` into (created; existing
    /// files replaced). Default: <image dir>/acpi, where `measurements image` looks.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// QEMU binary. Default: qemu-system-x86_64 from PATH.
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Directory for this boot's files (console log, QMP socket). Default: a new one under <tmp>.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Seconds to wait for the firmware to read the tables (--via firmware) or for the agent's
    /// /health (--via guest). Default: 120.
    #[arg(long = "health-timeout", value_name = "SECS")]
    health_timeout_secs: Option<u64>,
    /// Machine-readable stdout: the capture record (what capture.json holds, plus the paths).
    #[arg(long)]
    json: bool,
}

/// How a capture reads the blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// From QEMU, right after the firmware installed the tables ([`crate::fwcapture`]).
    Firmware,
    /// From the booted agent (`GET /firmware/acpi`).
    Guest,
}

/// Which launch's tables a capture is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureFor {
    /// A TD launched with one of the image's TDX shapes.
    Tdx,
    /// A plain `--tee none` launch (q35, TCG).
    Tcg,
}

/// What `capture.json` records: enough to know which launch the tables belong to.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureRecord {
    pub schema_version: u32,
    pub image: worker_api::ImageRelease,
    /// `major.minor.micro` of the QEMU that generated the tables.
    pub qemu_version: String,
    /// The QEMU binary used.
    pub qemu: String,
    /// Always "tcg" for this command (see the module docs for why not KVM).
    pub accelerator: String,
    /// Whose tables these are: "tdx" (the TD of `shape`) or "tcg" (a plain --tee none launch).
    pub tables_for: CaptureFor,
    /// The TDX launch shape (with `tables_for: tdx`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
    /// The `-machine` value of the capture boot.
    pub machine: String,
    pub memory_mib: u64,
    pub cpus: u32,
    /// GPUs of the shape (each a stand-in behind its root port in the capture).
    pub gpus: u32,
    /// `q35-pcihost.pci-hole64-size` in GiB, when the shape sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_hole64_gib: Option<u64>,
    /// How the blobs were read: "firmware" (from QEMU after the firmware read them) or
    /// "guest" (from the booted agent).
    pub via: Via,
    /// The `-device` values of the capture boot, in order (slots and stand-ins).
    pub devices: Vec<String>,
    pub files: Vec<CapturedFile>,
    pub caveat: String,
}

/// One written blob.
#[derive(Debug, Clone, Serialize)]
pub struct CapturedFile {
    /// File name inside the capture folder.
    pub file: String,
    /// The fw_cfg name it came from.
    pub fw_cfg: String,
    pub size: u64,
    /// SHA-384 (lowercase hex): the digest the matching RTMR0 "ACPI DATA" event carries.
    pub sha384: String,
}

/// The three decoded blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blobs {
    pub tables: Vec<u8>,
    pub rsdp: Vec<u8>,
    pub loader: Vec<u8>,
}

fn decode(blob: &FwCfgBlob) -> Result<Vec<u8>> {
    let bytes = STANDARD.decode(blob.base64.as_bytes()).with_context(|| {
        format!(
            "the agent sent {} as invalid base64: is the image's agent current? rebuild the \
             image with `cargo xtask image build`",
            blob.name
        )
    })?;
    if bytes.len() as u64 != blob.size {
        bail!(
            "the agent said {} has {} bytes but sent {}: the transfer is incomplete, run the \
             capture again",
            blob.name,
            blob.size,
            bytes.len()
        );
    }
    Ok(bytes)
}

/// Decodes the agent's answer.
pub fn decode_answer(a: &FirmwareAcpi) -> Result<Blobs> {
    Ok(Blobs {
        tables: decode(&a.tables)?,
        rsdp: decode(&a.rsdp)?,
        loader: decode(&a.table_loader)?,
    })
}

/// Checks the blobs' shape: RSDP of 20 (ACPI 1.0) or 36 (2.0) bytes starting with "RSD PTR ",
/// non-empty tables, a loader made of whole 128-byte commands.
pub fn validate(b: &Blobs) -> Result<(), String> {
    if !(b.rsdp.len() == 20 || b.rsdp.len() == 36) || !b.rsdp.starts_with(b"RSD PTR ") {
        return Err(format!(
            "etc/acpi/rsdp is not an RSDP ({} bytes, starts with {:?}); expected 20 or 36 bytes \
             starting with \"RSD PTR \"",
            b.rsdp.len(),
            String::from_utf8_lossy(&b.rsdp[..b.rsdp.len().min(8)])
        ));
    }
    if b.tables.is_empty() {
        return Err(
            "etc/acpi/tables is empty: QEMU generated no ACPI tables (is -no-acpi set?)".to_owned(),
        );
    }
    if b.loader.is_empty() || !b.loader.len().is_multiple_of(LOADER_ENTRY_SIZE) {
        return Err(format!(
            "etc/table-loader has {} bytes, not a non-zero multiple of {LOADER_ENTRY_SIZE} (one \
             QEMU loader command each)",
            b.loader.len()
        ));
    }
    Ok(())
}

/// Writes one file atomically (temporary name, then rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Writes the blobs and the record into `out`; returns the record.
pub fn write_capture(
    out: &Path,
    blobs: &Blobs,
    mut record: CaptureRecord,
) -> Result<CaptureRecord> {
    std::fs::create_dir_all(out).with_context(|| {
        format!(
            "cannot create {}: choose another folder with --out",
            out.display()
        )
    })?;
    record.files = write_blobs(out, blobs)?;
    let mut json = serde_json::to_vec_pretty(&record)?;
    json.push(b'\n');
    write_atomic(&out.join(CAPTURE_RECORD_FILE), &json)?;
    Ok(record)
}

/// Writes the three blobs into `out` (an existing folder) under the names `measurements` reads;
/// returns what was written.
fn write_blobs(out: &Path, blobs: &Blobs) -> Result<Vec<CapturedFile>> {
    let mut files = Vec::new();
    for (file, fw_cfg, bytes) in [
        (TABLES_FILE, worker_api::FW_CFG_ACPI_TABLES, &blobs.tables),
        (RSDP_FILE, worker_api::FW_CFG_ACPI_RSDP, &blobs.rsdp),
        (LOADER_FILE, worker_api::FW_CFG_TABLE_LOADER, &blobs.loader),
    ] {
        write_atomic(&out.join(file), bytes)?;
        files.push(CapturedFile {
            file: file.to_owned(),
            fw_cfg: fw_cfg.to_owned(),
            size: bytes.len() as u64,
            sha384: hex::encode(Sha384::digest(bytes)),
        });
    }
    Ok(files)
}

/// Fetches and decodes `GET /firmware/acpi` from the (verified) agent on `port` over RA-TLS.
pub(crate) fn fetch(client: &attestation::RaTlsHttpClient, port: u16) -> Result<Blobs> {
    let url = format!(
        "{}{}",
        crate::attest::base_url(port),
        worker_api::FIRMWARE_ACPI_PATH
    );
    let resp = client
        .get(&url, Duration::from_secs(60))
        .with_context(|| format!("GET {url} failed"))?;
    let status = resp.status;
    if status != 200 {
        let why = resp
            .json::<worker_api::ErrorBody>(&url)
            .map(|e| e.error)
            .unwrap_or_else(|_| "no JSON error body".to_owned());
        if status == 404 && why.starts_with("no endpoint") {
            bail!(
                "the image's agent has no {} endpoint ({why}): rebuild the image with `cargo \
                 xtask image build` from this tree",
                worker_api::FIRMWARE_ACPI_PATH
            );
        }
        bail!("GET {url} answered {status}: {why}");
    }
    let answer: FirmwareAcpi = resp
        .json(&url)
        .with_context(|| format!("GET {url} did not return the FirmwareAcpi JSON"))?;
    decode_answer(&answer)
}

pub fn cmd_capture(args: &CaptureArgs) -> Result<()> {
    let image_arg = match &args.image {
        Some(i) => i.clone(),
        None if Path::new("out/worker").is_dir() => PathBuf::from("out/worker"),
        None => {
            bail!("no image given: pass --image DIR (build one with `cargo xtask image build`)")
        }
    };
    let is_dir = image_arg.is_dir();
    let out = match (&args.out, is_dir) {
        (Some(o), _) => o.clone(),
        (None, true) => image_arg.join("acpi"),
        (None, false) => bail!(
            "{} is not a directory: for a bundle pass --out DIR (the unpacked copy lives in a \
             cache), or capture on the image directory",
            image_arg.display()
        ),
    };
    let out = crate::absolute(&out)?;
    let s = FileSettings {
        image: Some(image_arg),
        tee: Some(Tee::None),
        // See the module docs: the captured tables must not depend on this host's KVM.
        accel: Some(AccelMode::Tcg),
        memory: args.memory,
        cpus: args.cpus,
        qemu: args.qemu.clone(),
        run_dir: args.run_dir.clone(),
        health_timeout_secs: args.health_timeout_secs,
        ..FileSettings::default()
    };
    eprintln!(
        "host-launcher: capture-acpi always boots under TCG: the captured tables must not depend \
         on this host's KVM"
    );
    let mut launch = crate::prepare(&s)?;
    let launch_defaults = launch.image.manifest.launch.clone();
    let tdx = launch_defaults.tdx.as_ref();
    // What to capture: (shape name, memory, vCPUs, TDX machine) per target folder.
    let mut targets: Vec<Target> = Vec::new();
    match args.for_tee {
        CaptureFor::Tcg => {
            if args.all_shapes || args.shape.is_some() {
                bail!("--shape/--all-shapes apply to --for tdx (a --for tcg launch has no shape)");
            }
            targets.push(Target {
                shape: None,
                memory_mib: launch.plan.memory_mib,
                cpus: launch.plan.cpus,
                machine: None,
                out: vec![out.clone()],
            });
        }
        CaptureFor::Tdx => {
            let default = crate::shape::choose(
                tdx,
                &crate::shape::Request::default(),
                (launch_defaults.memory_mib, launch_defaults.cpus),
            )
            .ok()
            .and_then(|c| c.shape)
            .map(|s| s.name);
            let names: Vec<String> = if args.all_shapes {
                let t = tdx.ok_or_else(|| {
                    anyhow!(
                        "--all-shapes: this image declares no TDX launch shapes (manifest.json launch.tdx): rebuild it from a checkout whose image/worker.yaml has `tdx:`"
                    )
                })?;
                t.shapes.iter().map(|s| s.name.clone()).collect()
            } else {
                let chosen = crate::shape::choose(
                    tdx,
                    &crate::shape::Request {
                        shape: args.shape.as_deref(),
                        memory_mib: args.memory.map(|m| m.mib),
                        cpus: args.cpus,
                        gpus: args
                            .shape
                            .as_deref()
                            .and_then(|n| tdx.and_then(|t| t.shape(n)))
                            .map_or(0, |s| s.gpus as usize),
                        allow_unlisted: false,
                    },
                    (launch_defaults.memory_mib, launch_defaults.cpus),
                )
                .map_err(|e| anyhow!("capture-acpi --for tdx: {e}"))?;
                chosen.shape.map(|s| s.name).into_iter().collect()
            };
            for name in names {
                let t = tdx.ok_or_else(|| anyhow!("the image declares no TDX launch shapes"))?;
                let sh = t
                    .shape(&name)
                    .ok_or_else(|| anyhow!("shape {name} is not declared"))?;
                if args.via == Via::Guest && sh.gpus > 0 {
                    bail!(
                        "shape {} has {} GPU(s): --via guest boots the whole image and has no GPUs to pass through; capture it with --via firmware (the default), which stands a device in for each GPU",
                        sh.name,
                        sh.gpus
                    );
                }
                let mut outs = Vec::new();
                if args.all_shapes {
                    outs.push(out.join(SHAPES_DIR).join(&sh.name));
                    if default.as_deref() == Some(sh.name.as_str()) {
                        outs.push(out.clone());
                    }
                } else {
                    outs.push(out.clone());
                }
                targets.push(Target {
                    shape: Some(sh.name.clone()),
                    memory_mib: sh.memory_mib,
                    cpus: sh.cpus,
                    machine: Some(crate::qemu::TdxMachine {
                        machine: t.machine.clone(),
                        pci_hole64_gib: sh.pci_hole64_gib,
                        gpus: sh.gpus,
                    }),
                    out: outs,
                });
            }
        }
    }
    let v = launch.check_qemu(false)?;
    let qemu_version = format!("{}.{}.{}", v.0, v.1, v.2);
    let opts = match args.via {
        Via::Guest => Some(launch.run_options(&s, true, false, false, None)?),
        Via::Firmware => None,
    };
    let started = std::time::Instant::now();
    let mut records = Vec::new();
    for t in &targets {
        launch.plan.memory_mib = t.memory_mib;
        launch.plan.cpus = t.cpus;
        launch.plan.tdx_machine = t.machine.clone();
        let plan = &launch.plan;
        let machine = match &plan.tdx_machine {
            Some(m) => format!("{},smm=off,pic=off,hpet=off", m.machine),
            None => "q35".to_string(),
        };
        let argv = crate::qemu::argv(plan);
        let devices: Vec<String> = argv
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].clone())
            .collect();
        eprintln!(
            "host-launcher: capturing the ACPI tables of {} (-machine {machine}, {} MiB, {} vCPU(s), {} GPU stand-in(s), via {})",
            match &t.shape {
                Some(n) => format!("TDX launch shape {n}"),
                None => "a plain --tee none launch".to_string(),
            },
            plan.memory_mib,
            plan.cpus,
            t.machine.as_ref().map_or(0, |m| m.gpus),
            match args.via {
                Via::Firmware => "firmware",
                Via::Guest => "guest",
            }
        );
        let record = CaptureRecord {
            schema_version: 1,
            image: launch.image.manifest.image.clone(),
            caveat: caveat(&qemu_version),
            qemu_version: qemu_version.clone(),
            qemu: plan.qemu.display().to_string(),
            accelerator: plan.accel.to_string(),
            tables_for: args.for_tee,
            shape: t.shape.clone(),
            machine,
            memory_mib: plan.memory_mib,
            cpus: plan.cpus,
            gpus: t.machine.as_ref().map_or(0, |m| m.gpus),
            pci_hole64_gib: t.machine.as_ref().and_then(|m| m.pci_hole64_gib),
            via: args.via,
            devices,
            files: Vec::new(),
        };
        let blobs = match (&opts, args.via) {
            (Some(opts), Via::Guest) => {
                let mut got = None;
                crate::supervise::run_then(plan, opts, &mut |_health| {
                    got = Some(fetch(&opts.client, plan.host_port)?);
                    Ok(())
                })?;
                got.ok_or_else(|| anyhow!("the guest stopped before the capture ran"))?
            }
            _ => {
                let o = crate::fwcapture::capture(
                    plan,
                    &crate::fwcapture::Files::in_dir(&launch.run_dir),
                    Duration::from_secs(args.health_timeout_secs.unwrap_or(120)),
                )?;
                eprintln!(
                    "host-launcher: firmware read the tables after {:.1} s; captured in {:.1} s",
                    o.firmware_secs, o.total_secs
                );
                o.blobs
            }
        };
        validate(&blobs).map_err(|e| {
            anyhow!("{e}; the blobs were not written (see the console log for the guest's view)")
        })?;
        for dir in &t.out {
            let r = write_capture(dir, &blobs, record.clone())?;
            records.push((dir.clone(), r));
        }
    }
    drop(launch);
    if args.json {
        let list: Vec<serde_json::Value> = records
            .iter()
            .map(|(dir, r)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("out".into(), dir.display().to_string().into());
                }
                v
            })
            .collect();
        match (args.all_shapes, list.as_slice()) {
            (false, [one]) => println!("{one}"),
            _ => println!("{}", serde_json::Value::Array(list)),
        }
    } else {
        for (dir, record) in &records {
            println!(
                "captured ACPI for {} {}{} (QEMU {}, TCG, {} MiB, {} vCPU(s), {} GPU(s)) into {}:",
                record.image.name,
                record.image.version,
                record
                    .shape
                    .as_ref()
                    .map(|s| format!(", shape {s}"))
                    .unwrap_or_default(),
                record.qemu_version,
                record.memory_mib,
                record.cpus,
                record.gpus,
                dir.display()
            );
            for f in &record.files {
                println!(
                    "  {:<13} {:>7} bytes  sha384 {}  (fw_cfg {})",
                    f.file, f.size, f.sha384, f.fw_cfg
                );
            }
        }
        println!(
            "{} capture(s) in {:.1} s. next: `measurements image` on the image directory now computes RTMR0 and the image hashes (per shape with --all-shapes); `cargo xtask image capture-acpi` also rewrites measurements.json",
            records.len(),
            started.elapsed().as_secs_f64()
        );
    }
    if let Some((_, r)) = records.first() {
        eprintln!("host-launcher: caveat: {}", r.caveat);
    }
    Ok(())
}

/// `host-launcher acpi-of` arguments.
#[derive(Debug, Args)]
pub struct AcpiOfArgs {
    /// Folder for `tables`, `rsdp`, `table-loader` (created; existing files replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Seconds to wait for the firmware to read the tables.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    timeout: u64,
    /// Machine-readable stdout: the SHA-384 and size of each blob.
    #[arg(long)]
    json: bool,
    /// The QEMU command line (program first), after `--`.
    #[arg(last = true, required = true, value_name = "QEMU ARGS")]
    qemu: Vec<String>,
}

/// `host-launcher acpi-of`: the ACPI blobs of an arbitrary QEMU command line.
pub fn cmd_acpi_of(args: &AcpiOfArgs) -> Result<()> {
    for own in ["-S", "-qtest", "-qmp", "-qtest-log"] {
        if args.qemu.iter().skip(1).any(|a| a == own) {
            bail!("the QEMU command already has {own}: acpi-of adds it itself; remove it");
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = crate::absolute(&args.out)?;
    // Sockets and the trace in a private folder (short path: unix sockets), removed after.
    let work = std::env::temp_dir().join(format!("acpi-of-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = acpi_of_in(args, &out, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn acpi_of_in(args: &AcpiOfArgs, out: &Path, work: &Path) -> Result<()> {
    let qmp = work.join("qmp.sock");
    let mut argv = args.qemu.clone();
    argv.extend([
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    let files = crate::fwcapture::Files::in_dir(work);
    let o = crate::fwcapture::capture_argv(
        argv,
        &qmp,
        Path::new("(the command's own serial)"),
        &files,
        Duration::from_secs(args.timeout),
    )?;
    validate(&o.blobs).map_err(|e| anyhow!("{e}; nothing was written"))?;
    let files_out = write_blobs(out, &o.blobs)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "out": out.display().to_string(), "files": files_out,
                "firmware_secs": o.firmware_secs })
        );
    } else {
        println!(
            "ACPI blobs of that command (firmware read them after {:.1} s) in {}:",
            o.firmware_secs,
            out.display()
        );
        for f in &files_out {
            println!(
                "  {:<13} {:>7} bytes  sha384 {}  (fw_cfg {})",
                f.file, f.size, f.sha384, f.fw_cfg
            );
        }
    }
    Ok(())
}

/// Sub-folder of a capture folder with one folder per TDX shape (`--all-shapes`).
pub const SHAPES_DIR: &str = "shapes";

/// One capture to make.
struct Target {
    shape: Option<String>,
    memory_mib: u64,
    cpus: u32,
    machine: Option<crate::qemu::TdxMachine>,
    /// Folders to write it into.
    out: Vec<PathBuf>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn good() -> Blobs {
        let mut rsdp = b"RSD PTR ".to_vec();
        rsdp.resize(20, 0);
        Blobs {
            tables: vec![1; 300],
            rsdp,
            loader: vec![0; 4 * 128],
        }
    }

    #[test]
    fn validation_accepts_qemu_shapes_and_names_the_bad_blob() {
        assert_eq!(validate(&good()), Ok(()));
        let mut b = good();
        b.rsdp.resize(36, 0);
        assert_eq!(validate(&b), Ok(()));
        let mut b = good();
        b.rsdp[0] = b'X';
        assert!(validate(&b).unwrap_err().contains("etc/acpi/rsdp"));
        let mut b = good();
        b.rsdp.truncate(19);
        assert!(validate(&b).unwrap_err().contains("20 or 36"));
        let mut b = good();
        b.tables.clear();
        assert!(
            validate(&b)
                .unwrap_err()
                .contains("etc/acpi/tables is empty")
        );
        let mut b = good();
        b.loader.push(0);
        assert!(validate(&b).unwrap_err().contains("multiple of 128"));
        let mut b = good();
        b.loader.clear();
        assert!(validate(&b).unwrap_err().contains("etc/table-loader"));
    }

    #[test]
    fn answers_are_decoded_and_sizes_checked() {
        let blob = |name: &str, bytes: &[u8]| FwCfgBlob {
            name: name.into(),
            size: bytes.len() as u64,
            base64: STANDARD.encode(bytes),
        };
        let g = good();
        let mut a = FirmwareAcpi {
            tables: blob("etc/acpi/tables", &g.tables),
            rsdp: blob("etc/acpi/rsdp", &g.rsdp),
            table_loader: blob("etc/table-loader", &g.loader),
        };
        assert_eq!(decode_answer(&a).unwrap(), g);
        a.rsdp.size = 21;
        let e = decode_answer(&a).unwrap_err().to_string();
        assert!(
            e.contains("etc/acpi/rsdp") && e.contains("incomplete"),
            "{e}"
        );
        a.rsdp.size = 20;
        a.tables.base64 = "!!".into();
        let e = decode_answer(&a).unwrap_err().to_string();
        assert!(e.contains("invalid base64"), "{e}");
    }

    #[test]
    fn capture_folder_has_the_names_measurements_reads() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("acpi");
        let record = CaptureRecord {
            schema_version: 1,
            image: worker_api::ImageRelease {
                name: "worker".into(),
                version: "0.1.0".into(),
            },
            qemu_version: "10.0.2".into(),
            qemu: "qemu-system-x86_64".into(),
            accelerator: "tcg".into(),
            tables_for: CaptureFor::Tdx,
            shape: Some("cpu-1c-2g".into()),
            machine: "pc-q35-10.0,smm=off,pic=off,hpet=off".into(),
            memory_mib: 2048,
            cpus: 1,
            gpus: 0,
            pci_hole64_gib: None,
            via: Via::Firmware,
            devices: vec!["virtio-net-pci,netdev=n0,addr=0x1".into()],
            files: Vec::new(),
            caveat: caveat("10.0.2"),
        };
        let r = write_capture(&out, &good(), record).unwrap();
        assert_eq!(r.files.len(), 3);
        assert_eq!(std::fs::read(out.join("tables")).unwrap(), good().tables);
        assert_eq!(std::fs::read(out.join("rsdp")).unwrap(), good().rsdp);
        assert_eq!(
            std::fs::read(out.join("table-loader")).unwrap(),
            good().loader
        );
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("capture.json")).unwrap()).unwrap();
        assert_eq!(rec["qemu_version"], "10.0.2");
        assert_eq!(rec["memory_mib"], 2048);
        assert_eq!(rec["cpus"], 1);
        assert_eq!(
            rec["files"][0]["sha384"],
            hex::encode(Sha384::digest(good().tables))
        );
        // measurements reads the folder as full blobs (not tables only).
        match measurements::compute::AcpiSource::from_dir(&out).unwrap() {
            measurements::compute::AcpiSource::Blobs(b) => assert_eq!(b.rsdp, good().rsdp),
            other => panic!("expected blobs, got {other:?}"),
        }
        assert!(!out.join("tables.tmp").exists());
    }

    #[test]
    fn a_bundle_needs_an_out_folder() {
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path().join("worker-0.1.0.tar.zst");
        std::fs::write(&bundle, b"x").unwrap();
        let args = CaptureArgs {
            image: Some(bundle),
            memory: None,
            cpus: None,
            for_tee: CaptureFor::Tdx,
            shape: None,
            all_shapes: false,
            via: Via::Firmware,
            out: None,
            qemu: None,
            run_dir: None,
            health_timeout_secs: None,
            json: false,
        };
        let e = cmd_capture(&args).unwrap_err().to_string();
        assert!(e.contains("pass --out DIR"), "{e}");
    }
}
