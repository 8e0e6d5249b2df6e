//! Reading a launch's ACPI blobs from QEMU itself, right after the firmware installed them: no
//! kernel, no agent, a few seconds per shape, at any memory size and vCPU count.
//!
//! QEMU builds `etc/acpi/tables`, `etc/acpi/rsdp` and `etc/table-loader` once, when the firmware
//! first selects one of them over fw_cfg (after it has programmed PMBASE, PCIEXBAR and the BARs,
//! which the tables describe), and serves those bytes unchanged afterwards. So:
//!
//! 1. QEMU starts paused (`-S`) with a qtest server (`-qtest unix:…`, the test protocol: port
//!    and memory access from outside) and the `fw_cfg_select` trace event logged to a file;
//! 2. the fw_cfg file directory is read over the I/O ports (`outw 0x510`, `inb 0x511`: reading
//!    the directory builds nothing) to learn the three blobs' selectors;
//! 3. `cont` over QMP; the firmware runs until the trace shows it selected all three blobs (it
//!    installs the tables right then, before any boot option);
//! 4. `stop` over QMP, then each blob is read with one fw_cfg DMA transfer into guest RAM
//!    (`write` the descriptor, `outl 0x514/0x518` its address, `read` the bytes back);
//! 5. QEMU is killed (the guest never boots).
//!
//! The result equals what the guest's `/sys/firmware/qemu_fw_cfg` shows after boot (the
//! `capture-acpi --via guest` path): `tests/tests/tdx_tables.rs` checks both give the same
//! bytes. Needs a QEMU with the `log` trace backend (Debian's has it).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::capture::Blobs;
use crate::qemu::LaunchPlan;

/// fw_cfg I/O ports (x86): selector (16-bit write), data (8-bit read), DMA address (2 × 32-bit,
/// big-endian).
const FW_CFG_SELECTOR: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
const FW_CFG_DMA_HIGH: u16 = 0x514;
const FW_CFG_DMA_LOW: u16 = 0x518;
/// The fw_cfg file directory.
const FW_CFG_FILE_DIR: u16 = 0x19;
/// DMA control bits: error, read, select.
const DMA_ERROR: u32 = 0x01;
const DMA_READ: u32 = 0x02;
const DMA_SELECT: u32 = 0x08;
/// Guest-physical scratch address for DMA (16 MiB; the guest never runs again).
const DMA_SCRATCH: u64 = 0x100_0000;
/// Largest blob accepted (QEMU pads the tables to 128 KiB; big shapes stay far below 2 MiB).
const MAX_BLOB: u32 = 16 << 20;

/// One entry of the fw_cfg file directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgFile {
    pub name: String,
    pub size: u32,
    pub select: u16,
}

/// Parses the fw_cfg file directory (`count: u32 BE`, then 64-byte entries: size u32 BE,
/// select u16 BE, reserved u16, name\[56\] NUL-padded).
pub fn parse_file_dir(bytes: &[u8]) -> Result<Vec<FwCfgFile>, String> {
    let count = bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or("the fw_cfg file directory is shorter than its count")?;
    if count > 4096 {
        return Err(format!("the fw_cfg file directory claims {count} files"));
    }
    let mut files = Vec::new();
    for i in 0..count as usize {
        let e = bytes
            .get(4 + i * 64..4 + (i + 1) * 64)
            .ok_or_else(|| format!("the fw_cfg file directory ends inside entry {i}"))?;
        let size = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        let select = u16::from_be_bytes([e[4], e[5]]);
        let name = &e[8..];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let name = std::str::from_utf8(&name[..end])
            .map_err(|_| format!("fw_cfg file {i} has a non-UTF-8 name"))?;
        files.push(FwCfgFile {
            name: name.to_owned(),
            size,
            select,
        });
    }
    Ok(files)
}

/// A qtest connection (line protocol: a command, then `OK …`, `FAIL …` or `ERR …`).
struct Qtest {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qtest {
    fn connect(path: &Path) -> Result<Self> {
        let w = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to QEMU's qtest socket {}", path.display()))?;
        w.set_read_timeout(Some(Duration::from_secs(60)))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Qtest { w, r })
    }

    /// Sends one command; returns what follows `OK` (trimmed).
    fn cmd(&mut self, c: &str) -> Result<String> {
        self.w
            .write_all(format!("{c}\n").as_bytes())
            .with_context(|| format!("qtest: sending `{c}`"))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("qtest: QEMU closed the connection after `{c}`");
            }
            let line = line.trim_end();
            if let Some(rest) = line.strip_prefix("OK") {
                return Ok(rest.trim().to_owned());
            }
            if line.starts_with("FAIL") || line.starts_with("ERR") {
                bail!("qtest: `{c}` answered {line}");
            }
            // Anything else is an asynchronous event (e.g. IRQ); skip it.
        }
    }

    fn outw(&mut self, port: u16, v: u16) -> Result<()> {
        self.cmd(&format!("outw {port:#x} {v:#x}")).map(|_| ())
    }

    fn outl(&mut self, port: u16, v: u32) -> Result<()> {
        self.cmd(&format!("outl {port:#x} {v:#x}")).map(|_| ())
    }

    fn inb(&mut self, port: u16) -> Result<u8> {
        let v = self.cmd(&format!("inb {port:#x}"))?;
        u8::from_str_radix(v.trim_start_matches("0x"), 16)
            .map_err(|_| anyhow!("qtest: `inb` answered {v:?}"))
    }

    fn write_mem(&mut self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.cmd(&format!(
            "write {addr:#x} {} 0x{}",
            bytes.len(),
            hex::encode(bytes)
        ))
        .map(|_| ())
    }

    fn read_mem(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let v = self.cmd(&format!("read {addr:#x} {len}"))?;
        let bytes = hex::decode(v.trim_start_matches("0x"))
            .map_err(|_| anyhow!("qtest: `read` answered non-hex data"))?;
        if bytes.len() != len {
            bail!("qtest: `read` of {len} bytes returned {}", bytes.len());
        }
        Ok(bytes)
    }

    /// Reads `len` bytes of fw_cfg item `key` byte by byte (no guest memory touched).
    fn fw_cfg_pio(&mut self, key: u16, len: usize) -> Result<Vec<u8>> {
        self.outw(FW_CFG_SELECTOR, key)?;
        (0..len).map(|_| self.inb(FW_CFG_DATA)).collect()
    }

    /// Reads fw_cfg item `key` (`len` bytes) with one DMA transfer through guest RAM.
    fn fw_cfg_dma(&mut self, key: u16, len: u32) -> Result<Vec<u8>> {
        let data = DMA_SCRATCH + 64;
        let mut desc = Vec::with_capacity(16);
        desc.extend_from_slice(&((u32::from(key) << 16) | DMA_SELECT | DMA_READ).to_be_bytes());
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&data.to_be_bytes());
        self.write_mem(DMA_SCRATCH, &desc)?;
        // The DMA registers are big-endian: an `outl` of the byte-swapped halves writes them.
        self.outl(FW_CFG_DMA_HIGH, ((DMA_SCRATCH >> 32) as u32).swap_bytes())?;
        self.outl(FW_CFG_DMA_LOW, (DMA_SCRATCH as u32).swap_bytes())?;
        let control = self.read_mem(DMA_SCRATCH, 4)?;
        let control = u32::from_be_bytes([control[0], control[1], control[2], control[3]]);
        if control & DMA_ERROR != 0 || control != 0 {
            bail!("fw_cfg DMA of item {key:#x} failed (control {control:#x})");
        }
        self.read_mem(data, len as usize)
    }
}

/// Sends QMP commands (after the capabilities handshake), waiting for each `return`.
fn qmp(socket: &Path, commands: &[&str]) -> Result<()> {
    let w = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to QMP socket {}", socket.display()))?;
    w.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(w.try_clone()?);
    let mut w = w;
    let mut line = String::new();
    r.read_line(&mut line)?;
    for c in std::iter::once("qmp_capabilities").chain(commands.iter().copied()) {
        w.write_all(format!("{{\"execute\":\"{c}\"}}\n").as_bytes())?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("QMP: QEMU closed the connection after `{c}`");
            }
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                bail!("QMP `{c}` failed: {}", line.trim());
            }
        }
    }
    Ok(())
}

/// Kills QEMU when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a capture's QEMU keeps its files.
#[derive(Debug, Clone)]
pub struct Files {
    pub qtest: PathBuf,
    pub trace: PathBuf,
    pub qemu_log: PathBuf,
}

impl Files {
    pub fn in_dir(dir: &Path) -> Self {
        Files {
            qtest: dir.join("qtest.sock"),
            trace: dir.join("fw_cfg-trace.log"),
            qemu_log: dir.join("qemu.log"),
        }
    }
}

/// What a firmware capture measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub blobs: Blobs,
    /// Seconds from QEMU's start until the firmware had selected the three blobs.
    pub firmware_secs: f64,
    /// Seconds for the whole capture.
    pub total_secs: f64,
}

fn tail(path: &Path) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Boots `plan` (a `--tee none` plan: the capture's machine line and devices) only as far as
/// the firmware's ACPI installation and reads the three blobs. `files` live in the run dir.
pub fn capture(plan: &LaunchPlan, files: &Files, timeout: Duration) -> Result<Outcome> {
    capture_argv(
        crate::qemu::argv(plan),
        &plan.qmp_socket,
        &plan.console_log,
        files,
        timeout,
    )
}

/// [`capture`] for any QEMU argv (program first) that already has a QMP server on `qmp_socket`.
pub fn capture_argv(
    mut argv: Vec<String>,
    qmp_socket: &Path,
    console: &Path,
    files: &Files,
    timeout: Duration,
) -> Result<Outcome> {
    let start = Instant::now();
    for f in [&files.qtest, &files.trace] {
        if std::fs::symlink_metadata(f).is_ok() {
            std::fs::remove_file(f).with_context(|| format!("cannot remove {}", f.display()))?;
        }
    }
    if std::fs::symlink_metadata(qmp_socket).is_ok() {
        std::fs::remove_file(qmp_socket)
            .with_context(|| format!("cannot remove {}", qmp_socket.display()))?;
    }
    argv.extend([
        "-S".to_owned(),
        "-qtest".to_owned(),
        format!("unix:{},server=on,wait=off", files.qtest.display()),
        "-qtest-log".to_owned(),
        "/dev/null".to_owned(),
        "-trace".to_owned(),
        format!("fw_cfg_select,file={}", files.trace.display()),
    ]);
    let log = std::fs::File::create(&files.qemu_log)
        .with_context(|| format!("cannot create {}", files.qemu_log.display()))?;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", argv[0]))?;
    let mut qemu = Guard(child);
    let died = |q: &mut Guard, what: &str| -> anyhow::Error {
        let st = q.0.try_wait().ok().flatten();
        anyhow!(
            "QEMU {} {what} (see {}):\n{}",
            st.map_or("stopped".to_owned(), |s| format!("exited ({s})")),
            files.qemu_log.display(),
            tail(&files.qemu_log)
        )
    };
    // 1. The qtest socket.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut qt = loop {
        if files.qtest.exists()
            && let Ok(q) = Qtest::connect(&files.qtest)
        {
            break q;
        }
        if qemu.0.try_wait()?.is_some() {
            return Err(died(&mut qemu, "before its qtest socket appeared"));
        }
        if Instant::now() > deadline {
            return Err(died(&mut qemu, "did not open its qtest socket within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // 2. The directory, while paused.
    let head = qt.fw_cfg_pio(FW_CFG_FILE_DIR, 4)?;
    let count = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let dir = qt.fw_cfg_pio(FW_CFG_FILE_DIR, 4 + 64 * count.min(4096))?;
    let dir = parse_file_dir(&dir).map_err(|e| anyhow!(e))?;
    let find =
        |name: &str| -> Result<FwCfgFile> {
            let f = dir.iter().find(|f| f.name == name).cloned().ok_or_else(|| {
            anyhow!(
                "QEMU offers no fw_cfg file {name}: it built no ACPI tables (is -no-acpi or a \
                 non-q35 machine in use?)"
            )
        })?;
            if f.size == 0 || f.size > MAX_BLOB {
                bail!("fw_cfg file {name} has {} bytes", f.size);
            }
            Ok(f)
        };
    let tables = find(worker_api::FW_CFG_ACPI_TABLES)?;
    let rsdp = find(worker_api::FW_CFG_ACPI_RSDP)?;
    let loader = find(worker_api::FW_CFG_TABLE_LOADER)?;
    // 3. Run the firmware until it selected all three.
    qmp(qmp_socket, &["cont"])?;
    let wanted: Vec<String> = [&tables, &rsdp, &loader]
        .iter()
        .map(|f| format!(" key {:#06x} ", f.select))
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let trace = std::fs::read_to_string(&files.trace).unwrap_or_default();
        if wanted.iter().all(|w| trace.contains(w.as_str())) {
            break;
        }
        if qemu.0.try_wait()?.is_some() {
            return Err(died(&mut qemu, "before the firmware read the ACPI tables"));
        }
        if Instant::now() > deadline {
            let hint = if trace.is_empty() {
                " The fw_cfg trace stayed empty: this QEMU may lack the `log` trace backend \
                 (Debian's has it); use `--via guest` instead."
            } else {
                ""
            };
            return Err(anyhow!(
                "the firmware did not read the ACPI tables within {} s.{hint} Console: {}",
                timeout.as_secs(),
                console.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let firmware_secs = start.elapsed().as_secs_f64();
    // 4. Pause and read.
    qmp(qmp_socket, &["stop"])?;
    let blobs = Blobs {
        tables: qt.fw_cfg_dma(tables.select, tables.size)?,
        rsdp: qt.fw_cfg_dma(rsdp.select, rsdp.size)?,
        loader: qt.fw_cfg_dma(loader.select, loader.size)?,
    };
    drop(qt);
    drop(qemu);
    Ok(Outcome {
        blobs,
        firmware_secs,
        total_secs: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u32, select: u16) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&select.to_be_bytes());
        e.extend_from_slice(&[0, 0]);
        let mut n = name.as_bytes().to_vec();
        n.resize(56, 0);
        e.extend_from_slice(&n);
        e
    }

    #[test]
    fn parses_the_file_directory_and_rejects_truncation() {
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend(entry("etc/acpi/rsdp", 20, 0x22));
        d.extend(entry("etc/acpi/tables", 131072, 0x23));
        let files = parse_file_dir(&d).unwrap();
        assert_eq!(
            files[1],
            FwCfgFile {
                name: "etc/acpi/tables".into(),
                size: 131072,
                select: 0x23
            }
        );
        assert!(parse_file_dir(&d[..100]).unwrap_err().contains("entry 1"));
        assert!(parse_file_dir(&[0, 0]).is_err());
        assert!(
            parse_file_dir(&u32::MAX.to_be_bytes())
                .unwrap_err()
                .contains("claims")
        );
    }

    #[test]
    fn qtest_protocol_lines() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("q.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut got = Vec::new();
            for answer in ["IRQ raise 4\nOK\n", "OK 0x2a\n", "FAIL nope\n"] {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line.trim().to_owned());
                w.write_all(answer.as_bytes()).unwrap();
            }
            got
        });
        let mut q = Qtest::connect(&sock).unwrap();
        q.outw(0x510, 0x19).unwrap();
        assert_eq!(q.inb(0x511).unwrap(), 0x2a);
        let e = q.read_mem(0x1000, 4).unwrap_err().to_string();
        assert!(e.contains("FAIL nope"), "{e}");
        assert_eq!(
            server.join().unwrap(),
            ["outw 0x510 0x19", "inb 0x511", "read 0x1000 4"]
        );
    }
}
