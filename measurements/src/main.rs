//! `measurements`: compute the TDX registers an image will report, parse what a TD reported
//! (quotes, CCEL event logs), and explain the differences. Every command has `--json`
//! (lowercase hex, stable keys) for scripts; the text form is for people.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use measurements::compute::{AcpiSource, LaunchInputs, compute};
use measurements::eventlog::{parse_ccel, replay};
use measurements::image::{DEFAULT_XFAM, Options, measure_image_dir};
use measurements::image_hash::TD_ATTR_SEPT_VE_DISABLE;
use measurements::quote::Quote;
use measurements::rtmr0::FirmwareLayout;
use measurements::rtmr3::{RuntimeInputs, rtmr3_events};
use measurements::tdvf::PageOrder;
use measurements::{Mr, parse_size, read_file, replay_digests};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Firmware, kernel and initrd bytes as read from disk.
type Parts = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

/// Exit status of `diff` when a register differs.
const EXIT_MISMATCH: u8 = 3;

#[derive(Parser)]
#[command(
    name = "measurements",
    version,
    about = "Compute and check Intel TDX measurements (MRTD, RTMR0-3, image hashes) offline",
    long_about = "Compute the registers a TD will report from its boot parts and launch \
configuration, parse TDX quotes and CCEL event logs, and explain every difference.\n\n\
Registers: MRTD (firmware), RTMR0 (firmware config: TD HOB, CFV, ACPI, boot variables), \
RTMR1 (kernel), RTMR2 (cmdline, initrd), RTMR3 (our agent's runtime events).\n\
All hex output is lowercase. See measurements/README.md for the formats and for how to \
capture the ACPI tables of your host's QEMU."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compute the registers for explicit boot parts and a launch configuration.
    ///
    /// Example: measurements compute --firmware OVMF.fd --memory 2G --cpus 1
    /// --acpi-tables tables.bin --kernel vmlinuz --initrd initrd --cmdline "console=ttyS0"
    Compute(ComputeArgs),
    /// Measure an xtask-built image directory for the launch in its manifest.json.
    ///
    /// Prints all registers and both image hashes (cocoon-v1 and cw-v1). RTMR0 and the
    /// hashes need the ACPI tables: --acpi-tables/--acpi-dir, or an acpi/ folder in the image.
    Image(ImageArgs),
    /// Parse a TDX quote (v4/v5) and print every field plus both image hashes.
    Quote {
        /// The raw quote file.
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Parse the CCEL table and event log, replay it and list every event.
    ///
    /// In a guest: --ccel-table /sys/firmware/acpi/tables/CCEL
    /// --ccel-data /sys/firmware/acpi/tables/data/CCEL
    EventLog {
        /// The CCEL ACPI table.
        #[arg(long)]
        ccel_table: Option<PathBuf>,
        /// The event log data.
        #[arg(long)]
        ccel_data: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Compare expected registers (from an image dir or boot parts) with a quote and/or an event
    /// log, and explain each mismatch. Exit status 3 when something differs.
    Diff(DiffArgs),
    /// Compare two `etc/acpi/tables` blobs table by table (e.g. a capture against a real TD's),
    /// naming the FADT/MADT fields that differ and their likely cause (SMM, PIC, an older TDX
    /// QEMU's edge-trigger patches, HPET). Exit status 3 when something differs.
    ///
    /// Example: measurements acpi-diff out/worker/acpi/tables qemu-tdx-1cpu-1g.acpi-tables.bin
    AcpiDiff {
        /// First tables blob (`acpi/tables` of a capture).
        a: PathBuf,
        /// Second tables blob.
        b: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the RTMR3 events our agent extends for a host config, and the resulting RTMR3.
    Rtmr3 {
        /// The exact host-config bytes the guest receives.
        #[arg(long)]
        host_config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Measure this machine's SHA-384 throughput and, with --image, the full computation time.
    Bench {
        /// An image directory to time `image` on.
        #[arg(long)]
        image: Option<PathBuf>,
        /// ACPI tables for the image (optional).
        #[arg(long)]
        acpi_tables: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// MRTD page order: QEMU >= 9 adds and extends page by page (default); the QEMU 8.x TDX
    /// tree adds all pages of a section first (--two-pass).
    #[arg(long)]
    two_pass: bool,
    /// Firmware RTMR0 event layout: edk2-stable202502 (Debian trixie OVMF; default) or
    /// edk2-stable202505 (unverified).
    #[arg(long, default_value = "edk2-stable202502")]
    firmware_layout: String,
    /// etc/acpi/tables blob of the launch; RSDP and table-loader are synthesized as QEMU builds them.
    #[arg(long, conflicts_with = "acpi_dir")]
    acpi_tables: Option<PathBuf>,
    /// Folder with the captured blobs `tables`, `rsdp`, `table-loader` (the last two optional).
    #[arg(long)]
    acpi_dir: Option<PathBuf>,
}

impl Common {
    fn page_order(&self) -> PageOrder {
        if self.two_pass {
            PageOrder::TwoPass
        } else {
            PageOrder::SinglePass
        }
    }
    fn layout(&self) -> Result<FirmwareLayout> {
        Ok(FirmwareLayout::parse(&self.firmware_layout)?)
    }
    fn acpi(&self) -> Result<Option<AcpiSource>> {
        if let Some(t) = &self.acpi_tables {
            return Ok(Some(AcpiSource::Tables(read_file(t)?)));
        }
        if let Some(d) = &self.acpi_dir {
            return Ok(Some(AcpiSource::from_dir(d)?));
        }
        Ok(None)
    }
}

#[derive(Args, Clone)]
struct ComputeArgs {
    /// OVMF.fd with TDVF metadata.
    #[arg(long)]
    firmware: PathBuf,
    /// RAM size, e.g. 2G or 2048M.
    #[arg(long)]
    memory: String,
    /// vCPU count.
    #[arg(long)]
    cpus: u32,
    /// bzImage (RTMR1).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initrd (RTMR2; its size also changes the kernel's patched header).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (RTMR2), exactly as passed to -append.
    #[arg(long)]
    cmdline: Option<String>,
    #[command(flatten)]
    common: Common,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct ImageArgs {
    /// The image directory (out/<image>/ with manifest.json).
    dir: PathBuf,
    #[command(flatten)]
    common: Common,
    /// Host-config bytes to replay RTMR3 from (default: RTMR3 = zero).
    #[arg(long)]
    host_config: Option<PathBuf>,
    /// Override the manifest's RAM, e.g. 4G.
    #[arg(long)]
    memory: Option<String>,
    /// Override the manifest's vCPU count.
    #[arg(long)]
    cpus: Option<u32>,
    /// Measure one declared TDX launch shape (manifest launch.tdx.shapes): its memory, vCPUs
    /// and the tables captured in <dir>/acpi/shapes/NAME/. Without it (and without
    /// --memory/--cpus/--acpi-*) every declared shape is listed under `shapes`.
    #[arg(long, value_name = "NAME")]
    shape: Option<String>,
    /// TD_ATTRIBUTES of the launch (hex u64; QEMU default SEPT_VE_DISABLE = 0x10000000).
    #[arg(long)]
    td_attributes: Option<String>,
    /// XFAM of the launch (hex u64; depends on the host CPU; default 0x602e7).
    #[arg(long)]
    xfam: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct DiffArgs {
    /// Expected values from this image directory...
    #[arg(long, conflicts_with = "firmware")]
    image: Option<PathBuf>,
    /// ...or from these boot parts (as for `compute`).
    #[arg(long, requires_all = ["memory", "cpus"])]
    firmware: Option<PathBuf>,
    /// RAM size (with --firmware).
    #[arg(long)]
    memory: Option<String>,
    /// vCPUs (with --firmware).
    #[arg(long)]
    cpus: Option<u32>,
    /// Kernel (with --firmware).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initrd (with --firmware).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Command line (with --firmware).
    #[arg(long)]
    cmdline: Option<String>,
    #[command(flatten)]
    common: Common,
    /// The quote to compare with.
    #[arg(long)]
    quote: Option<PathBuf>,
    /// CCEL table (optional with --ccel-data).
    #[arg(long)]
    ccel_table: Option<PathBuf>,
    /// CCEL event log to compare with (explains which event differs).
    #[arg(long)]
    ccel_data: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn parse_hex_u64(s: &str) -> Result<u64> {
    let t = s.trim().trim_start_matches("0x");
    u64::from_str_radix(t, 16).with_context(|| format!("{s:?} is not a hex u64 (e.g. 0x10000000)"))
}

/// Print a JSON value as `key.sub: value` lines.
fn print_flat(prefix: &str, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_flat(&p, x);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                print_flat(&format!("{prefix}[{i}]"), x);
            }
        }
        Value::String(s) => println!("{prefix}: {s}"),
        other => println!("{prefix}: {other}"),
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn launch_from_compute<'a>(a: &'a ComputeArgs, bufs: &'a Parts) -> Result<LaunchInputs<'a>> {
    Ok(LaunchInputs {
        firmware: &bufs.0,
        ram: parse_size(&a.memory)?,
        cpus: a.cpus,
        acpi: a.common.acpi()?,
        kernel: bufs.1.as_deref(),
        initrd: bufs.2.as_deref(),
        cmdline: a.cmdline.as_deref(),
        page_order: a.common.page_order(),
        layout: a.common.layout()?,
    })
}

fn read_parts(fw: &Path, k: Option<&Path>, i: Option<&Path>) -> Result<Parts> {
    Ok((
        read_file(fw)?,
        k.map(read_file).transpose()?,
        i.map(read_file).transpose()?,
    ))
}

fn cmd_compute(a: &ComputeArgs) -> Result<()> {
    let bufs = read_parts(&a.firmware, a.kernel.as_deref(), a.initrd.as_deref())?;
    let c = compute(&launch_from_compute(a, &bufs)?)?;
    if a.json {
        return print_json(&c);
    }
    println!("mrtd:  {}  ({:?})", c.mrtd, c.page_order);
    for (i, name) in ["rtmr0", "rtmr1", "rtmr2"].iter().enumerate() {
        match c.rtmr(i) {
            Some(v) => println!("{name}: {v}"),
            None => println!(
                "{name}: not computed: {}",
                c.missing.get(*name).map(String::as_str).unwrap_or("")
            ),
        }
    }
    for (reg, evs) in &c.events {
        println!("\n{reg} events:");
        for e in evs {
            println!("  {:<32} {}", e.label, e.digest);
        }
    }
    Ok(())
}

fn image_options(a: &ImageArgs) -> Result<Options> {
    Ok(Options {
        shape: a.shape.clone(),
        acpi_dir: None,
        acpi: a.common.acpi()?,
        page_order: a.common.page_order(),
        layout: a.common.layout()?,
        runtime: match &a.host_config {
            Some(p) => Some(RuntimeInputs::from_host_config(&read_file(p)?)?),
            None => None,
        },
        td_attributes: a
            .td_attributes
            .as_deref()
            .map(parse_hex_u64)
            .transpose()?
            .unwrap_or(TD_ATTR_SEPT_VE_DISABLE),
        xfam: a
            .xfam
            .as_deref()
            .map(parse_hex_u64)
            .transpose()?
            .unwrap_or(DEFAULT_XFAM),
        memory: a.memory.as_deref().map(parse_size).transpose()?,
        cpus: a.cpus,
    })
}

fn cmd_image(a: &ImageArgs) -> Result<()> {
    let m = measure_image_dir(&a.dir, &image_options(a)?)
        .with_context(|| format!("measuring image {}", a.dir.display()))?;
    if a.json {
        return print_json(&m);
    }
    println!(
        "image {} {} ({} MiB, {} vCPU, {})",
        m.image.name,
        m.image.version,
        m.launch.memory_mib,
        m.launch.cpus,
        m.firmware_layout.name()
    );
    println!("mrtd:   {}", m.mrtd);
    for (k, v) in &m.mrtd_by_page_order {
        println!("  {k:<12} {v}");
    }
    match m.rtmr0 {
        Some(v) => println!("rtmr0:  {v}"),
        None => println!(
            "rtmr0:  not computed: {}",
            m.missing.get("rtmr0").map(String::as_str).unwrap_or("")
        ),
    }
    println!("rtmr1:  {}", m.rtmr1);
    println!("rtmr2:  {}", m.rtmr2);
    println!("rtmr3:  {}  ({})", m.rtmr3, m.rtmr3_basis);
    println!("td_attributes: {}  xfam: {}", m.td_attributes, m.xfam);
    match (&m.image_hash_cocoon_v1, &m.image_hash_cw_v1) {
        (Some(c), Some(w)) => {
            println!("image_hash_cocoon_v1: {c}");
            println!("image_hash_cw_v1:     {w}");
        }
        _ => println!(
            "image hashes: not computed: {}",
            m.missing
                .get("image_hashes")
                .map(String::as_str)
                .unwrap_or("")
        ),
    }
    if !m.kernel_hash_ram_independent {
        println!(
            "note: with {} MiB the kernel digest depends on the exact RAM size (stable at 2048 MiB or >= 2816 MiB)",
            m.launch.memory_mib
        );
    }
    if let Some(s) = &m.shape {
        println!("TDX launch shape: {s}");
    }
    if !m.shapes.is_empty() {
        println!("TDX launch shapes (image hashes a TD of each shape reports):");
        for (name, s) in &m.shapes {
            match (&s.image_hash_cw_v1, &s.image_hash_cocoon_v1) {
                (Some(w), Some(c)) => println!(
                    "  {name:<12} {:>7} MiB {:>3} vCPU {} GPU  cw-v1 {w}  cocoon-v1 {c}",
                    s.memory_mib, s.cpus, s.gpus
                ),
                _ => println!(
                    "  {name:<12} {:>7} MiB {:>3} vCPU {} GPU  not computed: {}",
                    s.memory_mib,
                    s.cpus,
                    s.gpus,
                    s.missing.as_deref().unwrap_or("")
                ),
            }
        }
    }
    Ok(())
}

fn cmd_quote(file: &Path, json_out: bool) -> Result<()> {
    let q =
        Quote::parse(&read_file(file)?).with_context(|| format!("parsing {}", file.display()))?;
    let mut v = serde_json::to_value(&q)?;
    if let Value::Object(m) = &mut v {
        m.insert(
            "image_hash_cocoon_v1".into(),
            json!(hex::encode(q.image_hash_cocoon_v1())),
        );
        m.insert(
            "image_hash_cw_v1".into(),
            json!(hex::encode(q.image_hash_cw_v1())),
        );
    }
    if json_out {
        return print_json(&v);
    }
    print_flat("", &v);
    if q.report.td_attributes_decoded.debug {
        println!("WARNING: this is a DEBUG TD: its memory is visible to the host; never trust it");
    }
    Ok(())
}

fn cmd_event_log(table: Option<&Path>, data: &Path, json_out: bool) -> Result<()> {
    let ccel = table
        .map(|t| -> Result<_> { Ok(parse_ccel(&read_file(t)?)?) })
        .transpose()?;
    let r = replay(&read_file(data)?).with_context(|| format!("parsing {}", data.display()))?;
    if json_out {
        return print_json(
            &json!({ "ccel": ccel, "events": r.events, "rtmr0": r.rtmr[0],
            "rtmr1": r.rtmr[1], "rtmr2": r.rtmr[2], "rtmr3": r.rtmr[3] }),
        );
    }
    if let Some(c) = ccel {
        println!(
            "CCEL: oem {} cc_type {} subtype {} log {:#x} bytes at {:#x}",
            c.oem_id, c.cc_type, c.cc_subtype, c.laml, c.lasa
        );
    }
    for e in &r.events {
        let d = e.digest.map(|d| d.to_hex()).unwrap_or_else(|| "-".into());
        let check = match e.digest_matches_data {
            Some(true) => " [digest = hash of data]",
            Some(false) => " [DIGEST DOES NOT MATCH DATA]",
            None => "",
        };
        println!(
            "#{:<3} {:<6} {:<34} {}{}\n      {}{check}",
            e.index,
            e.register,
            e.event_type_name,
            d,
            if e.extended { "" } else { " (not extended)" },
            e.description
        );
    }
    for (i, v) in r.rtmr.iter().enumerate() {
        println!("rtmr{i}: {v}");
    }
    Ok(())
}

fn cmd_diff(a: &DiffArgs) -> Result<ExitCode> {
    let expected = if let Some(dir) = &a.image {
        let opts = Options {
            acpi: a.common.acpi()?,
            page_order: a.common.page_order(),
            layout: a.common.layout()?,
            ..Options::default()
        };
        measure_image_dir(dir, &opts)?.to_computed()
    } else if let Some(fw) = &a.firmware {
        let bufs = read_parts(fw, a.kernel.as_deref(), a.initrd.as_deref())?;
        let memory = a
            .memory
            .as_deref()
            .context("--memory is required with --firmware")?;
        compute(&LaunchInputs {
            firmware: &bufs.0,
            ram: parse_size(memory)?,
            cpus: a.cpus.context("--cpus is required with --firmware")?,
            acpi: a.common.acpi()?,
            kernel: bufs.1.as_deref(),
            initrd: bufs.2.as_deref(),
            cmdline: a.cmdline.as_deref(),
            page_order: a.common.page_order(),
            layout: a.common.layout()?,
        })?
    } else {
        bail!("say what to expect: --image DIR, or --firmware F --memory SIZE --cpus N [...]");
    };
    if a.quote.is_none() && a.ccel_data.is_none() {
        bail!("say what to compare with: --quote FILE and/or --ccel-data FILE");
    }
    let quote = a
        .quote
        .as_deref()
        .map(|p| -> Result<Quote> { Ok(Quote::parse(&read_file(p)?)?) })
        .transpose()?;
    if let Some(t) = &a.ccel_table {
        parse_ccel(&read_file(t)?)?;
    }
    let log = a
        .ccel_data
        .as_deref()
        .map(|p| -> Result<_> { Ok(replay(&read_file(p)?)?) })
        .transpose()?;
    let rep = measurements::diff::compare(&expected, quote.as_ref(), log.as_ref());
    if a.json {
        print_json(&rep)?;
    } else {
        for f in &rep.findings {
            println!("{}", f.message);
        }
        println!(
            "{}",
            if rep.all_match {
                "all compared registers match"
            } else {
                "MISMATCH"
            }
        );
    }
    Ok(if rep.all_match {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_MISMATCH)
    })
}

fn cmd_rtmr3(p: &Path, json_out: bool) -> Result<()> {
    let inp = RuntimeInputs::from_host_config(&read_file(p)?)?;
    let ev = rtmr3_events(&inp);
    let r = replay_digests(ev.iter().map(|e| &e.digest));
    if json_out {
        return print_json(&json!({ "events": ev, "rtmr3": r }));
    }
    for e in &ev {
        println!(
            "{:<14} {}  payload {}",
            e.event_type,
            e.digest,
            hex::encode(&e.payload)
        );
    }
    println!("rtmr3: {r}");
    Ok(())
}

fn cmd_bench(image: Option<&Path>, acpi: Option<&Path>, json_out: bool) -> Result<()> {
    let buf = vec![0x5au8; 64 << 20];
    let t = Instant::now();
    let mut acc = Mr::ZERO;
    let rounds = 4;
    for _ in 0..rounds {
        acc = measurements::extend(&acc, &measurements::sha384(&buf));
    }
    let secs = t.elapsed().as_secs_f64();
    let mbps = (rounds * buf.len()) as f64 / secs / 1e6;
    let mut out = json!({ "sha384_mb_per_s": (mbps * 10.0).round() / 10.0, "check": acc });
    if let Some(dir) = image {
        let opts = Options {
            acpi: acpi
                .map(|p| -> Result<_> { Ok(AcpiSource::Tables(read_file(p)?)) })
                .transpose()?,
            ..Options::default()
        };
        let t = Instant::now();
        let m = measure_image_dir(dir, &opts)?;
        let secs = t.elapsed().as_secs_f64();
        let bytes: u64 = ["OVMF.fd", "vmlinuz", "initrd"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        out["image_seconds"] = json!((secs * 1000.0).round() / 1000.0);
        out["image_input_mb"] = json!((bytes as f64 / 1e6 * 10.0).round() / 10.0);
        out["image_mb_per_s"] = json!(((bytes as f64 / secs / 1e6) * 10.0).round() / 10.0);
        out["image_mrtd"] = json!(m.mrtd);
    }
    if json_out {
        return print_json(&out);
    }
    print_flat("", &out);
    Ok(())
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Compute(a) => cmd_compute(a)?,
        Cmd::Image(a) => cmd_image(a)?,
        Cmd::Quote { file, json } => cmd_quote(file, *json)?,
        Cmd::EventLog {
            ccel_table,
            ccel_data,
            json,
        } => cmd_event_log(ccel_table.as_deref(), ccel_data, *json)?,
        Cmd::Diff(a) => return cmd_diff(a),
        Cmd::AcpiDiff { a, b, json } => return cmd_acpi_diff(a, b, *json),
        Cmd::Rtmr3 { host_config, json } => cmd_rtmr3(host_config, *json)?,
        Cmd::Bench {
            image,
            acpi_tables,
            json,
        } => cmd_bench(image.as_deref(), acpi_tables.as_deref(), *json)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_acpi_diff(a: &Path, b: &Path, json: bool) -> Result<ExitCode> {
    let read = |p: &Path| {
        std::fs::read(p)
            .with_context(|| format!("reading {}: pass an etc/acpi/tables blob", p.display()))
    };
    let d = measurements::acpi_diff::diff(&read(a)?, &read(b)?)
        .with_context(|| format!("comparing {} with {}", a.display(), b.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        for t in &d.tables {
            let len = |l: Option<u32>| l.map_or("-".to_string(), |l| l.to_string());
            println!(
                "{:<5} {:<10} {:>6} vs {:>6} bytes",
                t.signature,
                t.status,
                len(t.length_a),
                len(t.length_b)
            );
            for n in &t.notes {
                println!("      {n}");
            }
        }
        println!(
            "{}",
            if d.identical() {
                "identical tables"
            } else {
                "the tables differ (see measurements/docs/tdx-acpi-differences.md for the causes)"
            }
        );
    }
    Ok(if d.identical() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_MISMATCH)
    })
}

/// Output piped into `head` and closed early must end the program quietly, as with any Unix
/// tool, instead of panicking in `println!`: restore the default SIGPIPE action.
fn default_sigpipe() {
    // SAFETY: called once at start-up before any thread exists; SIG_DFL for SIGPIPE is a valid
    // disposition and no Rust code relies on SIGPIPE being ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    match run() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
