//! GPU passthrough on the host: the preflight `run --tee tdx --gpu BDF` does before QEMU starts,
//! and `host-launcher gpu bind|unbind|status`.
//!
//! Everything is read from (and `bind`/`unbind` write to) a [`HostRoot`]: `/` on a real host,
//! a fake tree of plain files and symlinks in tests. Paths used under it:
//! `sys/bus/pci/devices/BDF/{vendor,device,class,driver,driver_override,iommu_group,resource,vfio-dev/}`,
//! `sys/bus/pci/drivers/vfio-pci/`, `sys/bus/pci/drivers_probe`,
//! `sys/kernel/iommu_groups/N/devices/`, `dev/iommu`, `dev/vfio/`, `proc/meminfo`.
//!
//! The preflight collects every problem, each with its fix, instead of stopping at the first:
//! the device exists, is NVIDIA's (vendor 0x10de), is bound to vfio-pci; every device in its
//! IOMMU group is bound to a VFIO driver, a stub, a PCIe port driver or nothing; the IOMMU is on;
//! iommufd (`/dev/iommu` and the device's VFIO cdev) or else the legacy `/dev/vfio/GROUP` is
//! there; the GPUs' 64-bit BARs fit the shape's 64-bit PCI hole; the host has the TD's memory.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};

use crate::settings::PciBdf;

/// NVIDIA's PCI vendor id.
pub const NVIDIA_VENDOR: u16 = 0x10de;
/// QEMU's default q35 64-bit PCI hole (`q35-pcihost.pci-hole64-size`), used when a shape sets none.
pub const QEMU_DEFAULT_HOLE64_GIB: u64 = 32;
/// Host memory kept free beside the TD's memory (QEMU itself, page tables, the host).
pub const HOST_MEMORY_HEADROOM_MIB: u64 = 1024;
/// The driver the launcher binds GPUs to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// `IORESOURCE_MEM` (include/linux/ioport.h): a memory BAR.
const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_MEM_64`: a 64-bit memory BAR (placed in the 64-bit hole).
const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// Where host state is read from: `/` on a real host, a fake tree in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot(pub PathBuf);

impl Default for HostRoot {
    fn default() -> Self {
        HostRoot(PathBuf::from("/"))
    }
}

impl HostRoot {
    fn p(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    fn dev_dir(&self, bdf: &PciBdf) -> PathBuf {
        self.p("sys/bus/pci/devices").join(bdf.as_str())
    }
}

/// One problem found by the preflight, and what fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// What the preflight found, problems and all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preflight {
    pub problems: Vec<Problem>,
    /// Lines worth printing even when all is well (what was checked, warnings).
    pub notes: Vec<String>,
    /// Whether QEMU can use iommufd (`/dev/iommu` and a VFIO cdev for every GPU); otherwise the
    /// legacy VFIO container (`/dev/vfio/GROUP`) is used.
    pub iommufd: bool,
}

impl Preflight {
    /// `Err` naming every problem and its fix.
    pub fn into_result(self) -> Result<Preflight> {
        if self.problems.is_empty() {
            return Ok(self);
        }
        let mut msg = format!(
            "GPU preflight found {} problem(s); QEMU was not started:",
            self.problems.len()
        );
        for (i, p) in self.problems.iter().enumerate() {
            msg.push_str(&format!("\n  {}. {}\n     fix: {}", i + 1, p.what, p.fix));
        }
        bail!(msg)
    }
    fn problem(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.problems.push(Problem {
            what: what.into(),
            fix: fix.into(),
        });
    }
}

/// What the launch asks of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub gpus: &'a [PciBdf],
    /// The TD's memory.
    pub memory_mib: u64,
    /// The shape's 64-bit PCI hole (`None`: QEMU's default).
    pub pci_hole64_gib: Option<u64>,
    /// The shape's name, for messages.
    pub shape: Option<&'a str>,
}

/// A PCI device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    pub bdf: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub driver: Option<String>,
    pub iommu_group: Option<String>,
    /// Sizes of the 64-bit memory BARs, in bytes.
    pub bars64: Vec<u64>,
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn hex_num(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Sizes of the 64-bit memory BARs in a sysfs `resource` file (lines `start end flags`).
pub fn bars64(resource: &str) -> Vec<u64> {
    resource
        .lines()
        .take(6) // BAR0..BAR5; then the ROM and bridge windows
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(hex_num);
            let (start, end, flags) = (it.next()??, it.next()??, it.next()??);
            let mem64 = flags & IORESOURCE_MEM != 0 && flags & IORESOURCE_MEM_64 != 0;
            (mem64 && end > start).then(|| end - start + 1)
        })
        .collect()
}

impl PciDevice {
    /// Reads `bdf` under `root`; `None` if sysfs has no such device.
    pub fn read(root: &HostRoot, bdf: &str) -> Option<PciDevice> {
        let dir = root.p("sys/bus/pci/devices").join(bdf);
        if !dir.exists() {
            return None;
        }
        let num = |f: &str| read_trim(&dir.join(f)).as_deref().and_then(hex_num);
        Some(PciDevice {
            bdf: bdf.to_owned(),
            vendor: num("vendor")
                .and_then(|v| u16::try_from(v).ok())
                .unwrap_or(0),
            device: num("device")
                .and_then(|v| u16::try_from(v).ok())
                .unwrap_or(0),
            class: num("class")
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            driver: link_name(&dir.join("driver")),
            iommu_group: link_name(&dir.join("iommu_group")),
            bars64: read_trim(&dir.join("resource"))
                .map(|r| bars64(&r))
                .unwrap_or_default(),
        })
    }

    /// Whether a device with this driver may share an IOMMU group with a passed-through GPU
    /// (Linux's VFIO group viability: VFIO drivers, `pci-stub`, PCIe port/bridge drivers, none).
    pub fn group_safe(&self) -> bool {
        match self.driver.as_deref() {
            None => true,
            Some(d) => d.contains("vfio") || d == "pci-stub" || d == "pcieport",
        }
    }

    /// Address space the GPU's 64-bit BARs take, each naturally aligned and the root port's
    /// window rounded to a power of two (firmware sizes bridge windows so; conservative).
    pub fn hole_need(&self) -> u64 {
        let mut sizes: Vec<u64> = self.bars64.iter().map(|s| s.next_power_of_two()).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let sum = sizes.iter().fold(0u64, |acc, s| acc.saturating_add(*s));
        if sum == 0 {
            0
        } else {
            sum.checked_next_power_of_two().unwrap_or(u64::MAX)
        }
    }
}

/// Devices in IOMMU group `group` (sorted).
pub fn group_members(root: &HostRoot, group: &str) -> Vec<String> {
    let dir = root
        .p("sys/kernel/iommu_groups")
        .join(group)
        .join("devices");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether the IOMMU is on (any IOMMU group exists).
pub fn iommu_on(root: &HostRoot) -> bool {
    std::fs::read_dir(root.p("sys/kernel/iommu_groups"))
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false)
}

/// `MemAvailable` from /proc/meminfo, in MiB.
pub fn mem_available_mib(root: &HostRoot) -> Option<u64> {
    let s = std::fs::read_to_string(root.p("proc/meminfo")).ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024)
    })
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.0} GiB")
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// The preflight of a `--tee tdx` launch: memory always, and every GPU of `req`.
pub fn preflight(root: &HostRoot, req: &Request<'_>) -> Preflight {
    let mut pf = Preflight {
        iommufd: true,
        ..Default::default()
    };
    let shape = req.shape.map_or_else(
        || "this unlisted launch".to_owned(),
        |s| format!("shape {s}"),
    );

    // Host memory: TD memory is private and pinned; it cannot be swapped or overcommitted.
    match mem_available_mib(root) {
        Some(avail) if avail < req.memory_mib + HOST_MEMORY_HEADROOM_MIB => pf.problem(
            format!(
                "the host has {avail} MiB available (MemAvailable in /proc/meminfo) but {shape} \
                 needs {} MiB for the TD plus about {HOST_MEMORY_HEADROOM_MIB} MiB for QEMU",
                req.memory_mib
            ),
            "stop other VMs or services to free memory, or choose a smaller --shape",
        ),
        Some(avail) => pf.notes.push(format!(
            "host memory: {avail} MiB available, the TD takes {} MiB",
            req.memory_mib
        )),
        None => pf
            .notes
            .push("host memory: MemAvailable not found in /proc/meminfo; not checked".to_owned()),
    }
    if req.gpus.is_empty() {
        return pf;
    }

    let iommu = iommu_on(root);
    if !iommu {
        pf.problem(
            "the IOMMU is off (/sys/kernel/iommu_groups is empty), so no device can be passed through",
            "enable VT-d (Intel) in the firmware setup and boot the host kernel with \
             `intel_iommu=on iommu=pt` (e.g. in GRUB_CMDLINE_LINUX, then update-grub and reboot)",
        );
    }
    let have_iommufd = root.p("dev/iommu").exists();
    let have_legacy = root.p("dev/vfio/vfio").exists();
    if !have_iommufd && !have_legacy {
        pf.problem(
            "neither /dev/iommu (iommufd) nor /dev/vfio/vfio (legacy VFIO) exists",
            "load the drivers: `modprobe iommufd vfio-pci` (a kernel >= 6.6 with CONFIG_IOMMUFD \
             and CONFIG_VFIO_DEVICE_CDEV is best)",
        );
    }
    if !root.p("sys/bus/pci/drivers").join(VFIO_DRIVER).exists() {
        pf.problem(
            "the vfio-pci driver is not loaded",
            "`modprobe vfio-pci` (then `host-launcher gpu bind BDF`)",
        );
    }

    let mut need = 0u64;
    for bdf in req.gpus {
        let b = bdf.as_str();
        let Some(dev) = PciDevice::read(root, b) else {
            pf.problem(
                format!("no PCI device {b} on this host (/sys/bus/pci/devices/{b} is missing)"),
                "list the GPUs with `lspci -D -d 10de:` (or `host-launcher gpu status`) and pass \
                 one of their addresses to --gpu",
            );
            continue;
        };
        if dev.vendor != NVIDIA_VENDOR {
            pf.problem(
                format!(
                    "{b} is not an NVIDIA device (vendor {:#06x}, device {:#06x}): the image drives \
                     NVIDIA GPUs only",
                    dev.vendor, dev.device
                ),
                "pass the GPU's address (`lspci -D -d 10de:` lists NVIDIA devices)",
            );
        }
        if dev.driver.as_deref() != Some(VFIO_DRIVER) {
            let now = dev
                .driver
                .as_deref()
                .map_or("no driver".to_owned(), |d| format!("driver {d}"));
            pf.problem(
                format!("{b} is bound to {now}, not vfio-pci: QEMU cannot pass it through"),
                format!(
                    "`sudo host-launcher gpu bind {b}` (binds it and the rest of its IOMMU group to \
                     vfio-pci; stop whatever uses the GPU first)"
                ),
            );
        }
        match &dev.iommu_group {
            None if iommu => pf.problem(
                format!("{b} is in no IOMMU group"),
                "check that the IOMMU covers this slot (dmesg | grep -i -e DMAR -e IOMMU)",
            ),
            None => {}
            Some(g) => {
                for m in group_members(root, g) {
                    if m == b {
                        continue;
                    }
                    let Some(md) = PciDevice::read(root, &m) else {
                        continue;
                    };
                    if !md.group_safe() {
                        pf.problem(
                            format!(
                                "{m} shares IOMMU group {g} with {b} and is bound to {}: VFIO \
                                 needs every device of the group bound to vfio-pci or unbound",
                                md.driver.as_deref().unwrap_or("?")
                            ),
                            format!(
                                "`sudo host-launcher gpu bind {b}` (binds the whole group), or \
                                 move the GPU to a slot with its own IOMMU group"
                            ),
                        );
                    }
                }
                let cdev = dev_dir_has_entries(&root.dev_dir(bdf).join("vfio-dev"));
                if !(have_iommufd && cdev) {
                    pf.iommufd = false;
                    if have_legacy
                        && !root.p("dev/vfio").join(g).exists()
                        && dev.driver.as_deref() == Some(VFIO_DRIVER)
                    {
                        pf.problem(
                            format!("/dev/vfio/{g} (the VFIO group of {b}) is missing"),
                            format!("rebind the GPU: `sudo host-launcher gpu unbind {b} && sudo host-launcher gpu bind {b}`"),
                        );
                    }
                }
            }
        }
        need = need.saturating_add(dev.hole_need());
    }
    if !pf.iommufd && (have_iommufd || have_legacy) {
        pf.notes.push(
            "VFIO: iommufd unavailable for these GPUs (no /dev/iommu or no VFIO device cdev); \
             using the legacy VFIO container /dev/vfio"
                .to_owned(),
        );
    }

    let hole_gib = req.pci_hole64_gib.unwrap_or(QEMU_DEFAULT_HOLE64_GIB);
    let hole = hole_gib.saturating_mul(1 << 30);
    if need > hole {
        let want_gib = need.div_ceil(1 << 30).next_power_of_two();
        pf.problem(
            format!(
                "the GPUs' 64-bit BARs need {} of guest address space but {shape} has a {hole_gib} \
                 GiB 64-bit PCI hole{}: the firmware could not map them",
                gib(need),
                if req.pci_hole64_gib.is_none() {
                    " (QEMU's default)"
                } else {
                    ""
                }
            ),
            format!(
                "choose a declared --shape whose pci_hole64_gib is at least {want_gib} (image/worker.yaml \
                 `tdx: shapes:`; a new shape changes RTMR0, so it must be published)"
            ),
        );
    } else if need > 0 {
        pf.notes.push(format!(
            "PCI hole: the GPUs' 64-bit BARs take {} of the {hole_gib} GiB 64-bit hole",
            gib(need)
        ));
    }
    pf
}

fn dev_dir_has_entries(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false)
}

/// `host-launcher gpu ...`.
#[derive(Debug, Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    pub cmd: GpuCmd,
}

/// GPU passthrough setup on this host.
#[derive(Debug, Subcommand)]
pub enum GpuCmd {
    /// Bind a GPU and every other device of its IOMMU group to vfio-pci (root only).
    ///
    /// For each device of the group not already on a VFIO, stub or PCIe-port driver: write
    /// `vfio-pci` to driver_override, unbind it from its driver, and probe it again (so
    /// vfio-pci takes it). Stop whatever uses the GPU first (nvidia-persistenced, X, CUDA jobs).
    Bind(BdfArg),
    /// Give a GPU (and its IOMMU group) back to the host's drivers (root only): clear
    /// driver_override, unbind from vfio-pci, probe again.
    Unbind(BdfArg),
    /// List NVIDIA devices with their driver, IOMMU group and BAR sizes, and the host's IOMMU
    /// and VFIO state.
    Status,
}

#[derive(Debug, Args)]
pub struct BdfArg {
    /// PCI address, e.g. 0000:41:00.0 or 41:00.0.
    #[arg(value_name = "BDF")]
    pub bdf: PciBdf,
}

pub fn cmd_gpu(args: &GpuArgs) -> Result<()> {
    let root = HostRoot::default();
    match &args.cmd {
        GpuCmd::Bind(a) => {
            for line in bind(&root, &a.bdf, is_root())? {
                println!("{line}");
            }
            Ok(())
        }
        GpuCmd::Unbind(a) => {
            for line in unbind(&root, &a.bdf, is_root())? {
                println!("{line}");
            }
            Ok(())
        }
        GpuCmd::Status => {
            print!("{}", status(&root));
            Ok(())
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn write_sys(p: &Path, value: &str) -> Result<()> {
    std::fs::write(p, value).map_err(|e| {
        let hint = match e.kind() {
            ErrorKind::PermissionDenied => ": run as root (sudo)",
            ErrorKind::NotFound => {
                ": the device or driver went away; check `host-launcher gpu status`"
            }
            _ => "",
        };
        anyhow::anyhow!("cannot write {value:?} to {}: {e}{hint}", p.display())
    })
}

/// The devices `bdf`'s IOMMU group holds (just `bdf` without a group).
fn group_of(root: &HostRoot, bdf: &PciBdf) -> Result<(Option<String>, Vec<PciDevice>)> {
    let b = bdf.as_str();
    let dev = PciDevice::read(root, b).with_context(|| {
        format!("no PCI device {b} on this host: list the GPUs with `lspci -D -d 10de:` or `host-launcher gpu status`")
    })?;
    let Some(g) = dev.iommu_group.clone() else {
        return Ok((None, vec![dev]));
    };
    let mut v = Vec::new();
    for m in group_members(root, &g) {
        if let Some(d) = PciDevice::read(root, &m) {
            v.push(d);
        }
    }
    if !v.iter().any(|d| d.bdf == b) {
        v.push(dev);
    }
    Ok((Some(g), v))
}

/// Whether a device is a PCI bridge (class 0x0604): it stays on its driver.
fn is_bridge(d: &PciDevice) -> bool {
    d.class >> 8 == 0x0604
}

/// Binds `bdf` and the endpoints of its IOMMU group to vfio-pci; returns what it did.
pub fn bind(root: &HostRoot, bdf: &PciBdf, as_root: bool) -> Result<Vec<String>> {
    let (group, devs) = group_of(root, bdf)?;
    if group.is_none() {
        bail!(
            "{} is in no IOMMU group: the IOMMU is off. Enable VT-d in the firmware and boot with \
             `intel_iommu=on iommu=pt`, then run this again",
            bdf.as_str()
        );
    }
    if !root.p("sys/bus/pci/drivers").join(VFIO_DRIVER).exists() {
        bail!("the vfio-pci driver is not loaded: run `sudo modprobe vfio-pci` first");
    }
    if !as_root {
        bail!(
            "binding {} to vfio-pci writes to /sys and needs root: run `sudo host-launcher gpu bind {}`",
            bdf.as_str(),
            bdf.as_str()
        );
    }
    let mut out = Vec::new();
    for d in devs.iter().filter(|d| !is_bridge(d)) {
        if d.driver.as_deref() == Some(VFIO_DRIVER) {
            out.push(format!("{}: already bound to vfio-pci", d.bdf));
            continue;
        }
        if d.driver.as_deref() == Some("pci-stub") {
            out.push(format!(
                "{}: on pci-stub (allowed in the group); left as is",
                d.bdf
            ));
            continue;
        }
        let dir = root.p("sys/bus/pci/devices").join(&d.bdf);
        write_sys(&dir.join("driver_override"), VFIO_DRIVER)?;
        if let Some(drv) = &d.driver {
            write_sys(&dir.join("driver/unbind"), &d.bdf)
                .with_context(|| format!("cannot unbind {} from {drv}: is the GPU in use (nvidia-smi, nvidia-persistenced)?", d.bdf))?;
        }
        write_sys(&root.p("sys/bus/pci/drivers_probe"), &d.bdf)?;
        out.push(format!(
            "{}: {} -> vfio-pci",
            d.bdf,
            d.driver.as_deref().unwrap_or("no driver")
        ));
    }
    out.push(format!(
        "IOMMU group {} ready for `host-launcher run --tee tdx --gpu {}`",
        group.unwrap_or_default(),
        bdf.as_str()
    ));
    Ok(out)
}

/// Gives `bdf`'s IOMMU group back to the host drivers; returns what it did.
pub fn unbind(root: &HostRoot, bdf: &PciBdf, as_root: bool) -> Result<Vec<String>> {
    let (_, devs) = group_of(root, bdf)?;
    if !as_root {
        bail!(
            "unbinding {} writes to /sys and needs root: run `sudo host-launcher gpu unbind {}`",
            bdf.as_str(),
            bdf.as_str()
        );
    }
    let mut out = Vec::new();
    for d in devs.iter().filter(|d| !is_bridge(d)) {
        if d.driver.as_deref() != Some(VFIO_DRIVER) {
            out.push(format!(
                "{}: not on vfio-pci ({}); left as is",
                d.bdf,
                d.driver.as_deref().unwrap_or("no driver")
            ));
            continue;
        }
        let dir = root.p("sys/bus/pci/devices").join(&d.bdf);
        // An empty write clears the override.
        write_sys(&dir.join("driver_override"), "\n")?;
        write_sys(&dir.join("driver/unbind"), &d.bdf)?;
        write_sys(&root.p("sys/bus/pci/drivers_probe"), &d.bdf)?;
        out.push(format!("{}: vfio-pci -> host driver (probed)", d.bdf));
    }
    Ok(out)
}

/// The `gpu status` report.
pub fn status(root: &HostRoot) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "IOMMU: {}\niommufd (/dev/iommu): {}\nlegacy VFIO (/dev/vfio/vfio): {}\nvfio-pci driver: {}\n",
        if iommu_on(root) { "on" } else { "off (boot with intel_iommu=on)" },
        yes(root.p("dev/iommu").exists()),
        yes(root.p("dev/vfio/vfio").exists()),
        if root.p("sys/bus/pci/drivers").join(VFIO_DRIVER).exists() { "loaded" } else { "not loaded (modprobe vfio-pci)" },
    ));
    if let Some(m) = mem_available_mib(root) {
        s.push_str(&format!("host memory available: {m} MiB\n"));
    }
    let mut bdfs: Vec<String> = std::fs::read_dir(root.p("sys/bus/pci/devices"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    bdfs.sort();
    let mut n = 0;
    for b in bdfs {
        let Some(d) = PciDevice::read(root, &b) else {
            continue;
        };
        if d.vendor != NVIDIA_VENDOR {
            continue;
        }
        n += 1;
        let bars: Vec<String> = d.bars64.iter().map(|b| gib(*b)).collect();
        s.push_str(&format!(
            "{} [10de:{:04x}] class {:06x} driver {} IOMMU group {} 64-bit BARs [{}] (hole need {})\n",
            d.bdf,
            d.device,
            d.class,
            d.driver.as_deref().unwrap_or("none"),
            d.iommu_group.as_deref().unwrap_or("none"),
            bars.join(", "),
            gib(d.hole_need()),
        ));
    }
    if n == 0 {
        s.push_str("no NVIDIA devices found\n");
    }
    s
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake host root: IOMMU on, iommufd, vfio-pci loaded, 512 GiB available.
    pub(crate) struct Fake {
        pub dir: tempfile::TempDir,
    }

    /// An H100's resource file: BAR0 16 MiB 32-bit, BAR1 128 GiB 64-bit pref, BAR3 32 MiB 64-bit pref.
    pub(crate) const H100_RESOURCE: &str = "\
0x00000000a0000000 0x00000000a0ffffff 0x0000000000040200
0x0000380000000000 0x0000381fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000382000000000 0x0000382001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    impl Fake {
        pub(crate) fn new() -> Fake {
            let f = Fake {
                dir: tempfile::tempdir().unwrap(),
            };
            for d in [
                "sys/bus/pci/devices",
                "sys/bus/pci/drivers/vfio-pci",
                "sys/bus/pci/drivers/nvidia",
                "sys/kernel/iommu_groups",
                "dev/vfio",
                "proc",
            ] {
                std::fs::create_dir_all(f.p(d)).unwrap();
            }
            std::fs::write(f.p("dev/iommu"), "").unwrap();
            std::fs::write(f.p("dev/vfio/vfio"), "").unwrap();
            std::fs::write(f.p("sys/bus/pci/drivers_probe"), "").unwrap();
            f.meminfo(512 << 10);
            f
        }
        pub(crate) fn root(&self) -> HostRoot {
            HostRoot(self.dir.path().to_owned())
        }
        pub(crate) fn p(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }
        pub(crate) fn meminfo(&self, avail_mib: u64) {
            std::fs::write(
                self.p("proc/meminfo"),
                format!(
                    "MemTotal:       {} kB\nMemFree:        1000 kB\nMemAvailable:   {} kB\n",
                    avail_mib * 2048,
                    avail_mib * 1024
                ),
            )
            .unwrap();
        }
        /// Adds a device in `group` bound to `driver`.
        pub(crate) fn device(
            &self,
            bdf: &str,
            vendor: u16,
            class: u32,
            driver: Option<&str>,
            group: Option<&str>,
            resource: &str,
        ) {
            let d = self.p("sys/bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor:#06x}\n")).unwrap();
            std::fs::write(d.join("device"), "0x2330\n").unwrap();
            std::fs::write(d.join("class"), format!("{class:#08x}\n")).unwrap();
            std::fs::write(d.join("resource"), resource).unwrap();
            std::fs::write(d.join("driver_override"), "(null)\n").unwrap();
            if let Some(drv) = driver {
                let dd = self.p("sys/bus/pci/drivers").join(drv);
                std::fs::create_dir_all(&dd).unwrap();
                // A real `driver` link points at the driver's directory; its `unbind` file is
                // what `bind` writes to, so the fake keeps a per-device copy.
                let own = self.p("drivers-of").join(bdf).join(drv);
                std::fs::create_dir_all(&own).unwrap();
                std::fs::write(own.join("unbind"), "").unwrap();
                symlink(&own, d.join("driver")).unwrap();
                if drv == VFIO_DRIVER {
                    std::fs::create_dir_all(d.join("vfio-dev/vfio0")).unwrap();
                }
            }
            if let Some(g) = group {
                let gd = self.p("sys/kernel/iommu_groups").join(g).join("devices");
                std::fs::create_dir_all(&gd).unwrap();
                symlink(&d, gd.join(bdf)).unwrap();
                symlink(
                    self.p("sys/kernel/iommu_groups").join(g),
                    d.join("iommu_group"),
                )
                .unwrap();
                std::fs::write(self.p("dev/vfio").join(g), "").unwrap();
            }
        }
        pub(crate) fn gpu(&self, bdf: &str, driver: Option<&str>, group: &str) {
            self.device(
                bdf,
                NVIDIA_VENDOR,
                0x030200,
                driver,
                Some(group),
                H100_RESOURCE,
            );
        }
    }

    fn bdf(s: &str) -> PciBdf {
        s.parse().unwrap()
    }

    fn req<'a>(gpus: &'a [PciBdf], hole: Option<u64>) -> Request<'a> {
        Request {
            gpus,
            memory_mib: 131072,
            pci_hole64_gib: hole,
            shape: Some("h100x1"),
        }
    }

    fn err(pf: Preflight) -> String {
        pf.into_result().unwrap_err().to_string()
    }

    #[test]
    fn a_gpu_bound_to_vfio_in_its_own_group_passes() {
        let f = Fake::new();
        f.gpu("0000:41:00.0", Some("vfio-pci"), "42");
        // Short form of the address: normalised to the domain form sysfs uses.
        let g = [bdf("41:00.0")];
        let pf = preflight(&f.root(), &req(&g, Some(1024)))
            .into_result()
            .unwrap();
        assert!(pf.iommufd);
        let notes = pf.notes.join("\n");
        assert!(notes.contains("take 256 GiB of the 1024 GiB"), "{notes}");
        assert!(notes.contains("524288 MiB available"), "{notes}");
    }

    #[test]
    fn a_missing_device_is_named_with_how_to_find_the_gpu() {
        let f = Fake::new();
        let g = [bdf("0000:41:00.0")];
        let e = err(preflight(&f.root(), &req(&g, Some(1024))));
        assert!(e.contains("no PCI device 0000:41:00.0 on this host"), "{e}");
        assert!(e.contains("lspci -D -d 10de:"), "{e}");
    }

    #[test]
    fn a_gpu_on_the_nvidia_driver_gets_the_bind_command() {
        let f = Fake::new();
        f.gpu("0000:41:00.0", Some("nvidia"), "42");
        let g = [bdf("0000:41:00.0")];
        let pf = preflight(&f.root(), &req(&g, Some(1024)));
        assert!(!pf.iommufd, "no VFIO cdev while on nvidia");
        let e = err(pf);
        assert!(e.contains("is bound to driver nvidia, not vfio-pci"), "{e}");
        assert!(
            e.contains("sudo host-launcher gpu bind 0000:41:00.0"),
            "{e}"
        );
        assert!(e.contains("QEMU was not started"), "{e}");
    }

    #[test]
    fn a_non_nvidia_device_and_an_unbound_group_member_are_refused() {
        let f = Fake::new();
        f.device(
            "0000:41:00.0",
            0x8086,
            0x020000,
            Some("vfio-pci"),
            Some("7"),
            "",
        );
        f.device(
            "0000:41:00.1",
            0x8086,
            0x020000,
            Some("ixgbe"),
            Some("7"),
            "",
        );
        // A bridge on pcieport in the same group is fine.
        f.device(
            "0000:40:01.0",
            0x8086,
            0x060400,
            Some("pcieport"),
            Some("7"),
            "",
        );
        let g = [bdf("0000:41:00.0")];
        let e = err(preflight(&f.root(), &req(&g, Some(1024))));
        assert!(e.contains("is not an NVIDIA device (vendor 0x8086"), "{e}");
        assert!(
            e.contains("0000:41:00.1 shares IOMMU group 7 with 0000:41:00.0 and is bound to ixgbe"),
            "{e}"
        );
        assert!(!e.contains("0000:40:01.0"), "{e}");
        assert!(e.contains("2 problem(s)"), "{e}");
    }

    #[test]
    fn iommu_off_and_no_vfio_devices_name_the_kernel_fixes() {
        let f = Fake::new();
        f.device(
            "0000:41:00.0",
            NVIDIA_VENDOR,
            0x030200,
            Some("vfio-pci"),
            None,
            H100_RESOURCE,
        );
        std::fs::remove_file(f.p("dev/iommu")).unwrap();
        std::fs::remove_file(f.p("dev/vfio/vfio")).unwrap();
        let g = [bdf("0000:41:00.0")];
        let e = err(preflight(&f.root(), &req(&g, Some(1024))));
        assert!(e.contains("the IOMMU is off"), "{e}");
        assert!(e.contains("intel_iommu=on"), "{e}");
        assert!(
            e.contains("neither /dev/iommu (iommufd) nor /dev/vfio/vfio"),
            "{e}"
        );
        assert!(e.contains("modprobe iommufd vfio-pci"), "{e}");
    }

    #[test]
    fn without_iommufd_the_legacy_container_is_used() {
        let f = Fake::new();
        f.gpu("0000:41:00.0", Some("vfio-pci"), "42");
        std::fs::remove_file(f.p("dev/iommu")).unwrap();
        let g = [bdf("0000:41:00.0")];
        let pf = preflight(&f.root(), &req(&g, Some(1024)))
            .into_result()
            .unwrap();
        assert!(!pf.iommufd);
        assert!(pf.notes.join("\n").contains("legacy VFIO container"));
    }

    #[test]
    fn bars_larger_than_the_shapes_hole_are_refused_with_the_size_needed() {
        let f = Fake::new();
        f.gpu("0000:41:00.0", Some("vfio-pci"), "42");
        let g = [bdf("0000:41:00.0")];
        let e = err(preflight(&f.root(), &req(&g, Some(64))));
        assert!(
            e.contains("need 256 GiB of guest address space but shape h100x1 has a 64 GiB"),
            "{e}"
        );
        assert!(e.contains("pci_hole64_gib is at least 256"), "{e}");
        // No hole in the shape: QEMU's 32 GiB default.
        let e = err(preflight(&f.root(), &req(&g, None)));
        assert!(e.contains("32 GiB 64-bit PCI hole (QEMU's default)"), "{e}");
        // Eight H100s fit h100x8's 8192 GiB hole.
        let g8: Vec<PciBdf> = (0..8)
            .map(|i| {
                let b = format!("0000:{:02x}:00.0", 0x81 + i);
                f.gpu(&b, Some("vfio-pci"), &format!("{}", 50 + i));
                bdf(&b)
            })
            .collect();
        let mut r = req(&g8, Some(8192));
        r.memory_mib = 1 << 18;
        assert!(preflight(&f.root(), &r).into_result().is_ok());
    }

    #[test]
    fn too_little_host_memory_is_refused() {
        let f = Fake::new();
        f.meminfo(100_000);
        let e = err(preflight(&f.root(), &req(&[], Some(1024))));
        assert!(e.contains("the host has 100000 MiB available"), "{e}");
        assert!(e.contains("needs 131072 MiB"), "{e}");
    }

    #[test]
    fn bar_sizes_come_from_the_64_bit_memory_bars() {
        assert_eq!(bars64(H100_RESOURCE), vec![128 << 30, 32 << 20]);
        let dev = PciDevice {
            bdf: String::new(),
            vendor: NVIDIA_VENDOR,
            device: 0,
            class: 0,
            driver: None,
            iommu_group: None,
            bars64: bars64(H100_RESOURCE),
        };
        assert_eq!(dev.hole_need(), 256 << 30);
        assert!(bars64("garbage\n0x1 0x0 zz\n").is_empty());
    }

    #[test]
    fn bind_moves_the_whole_group_to_vfio_and_needs_root() {
        let f = Fake::new();
        f.gpu("0000:41:00.0", Some("nvidia"), "42");
        f.device(
            "0000:41:00.1",
            NVIDIA_VENDOR,
            0x040300,
            Some("snd_hda_intel"),
            Some("42"),
            "",
        );
        f.device(
            "0000:40:01.0",
            0x8086,
            0x060400,
            Some("pcieport"),
            Some("42"),
            "",
        );
        let b = bdf("41:00.0");
        let e = bind(&f.root(), &b, false).unwrap_err().to_string();
        assert!(
            e.contains("needs root") && e.contains("sudo host-launcher gpu bind 0000:41:00.0"),
            "{e}"
        );
        let out = bind(&f.root(), &b, true).unwrap().join("\n");
        assert!(out.contains("0000:41:00.0: nvidia -> vfio-pci"), "{out}");
        assert!(
            out.contains("0000:41:00.1: snd_hda_intel -> vfio-pci"),
            "{out}"
        );
        assert!(!out.contains("0000:40:01.0"), "bridges stay: {out}");
        let dev = f.p("sys/bus/pci/devices/0000:41:00.0");
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "vfio-pci"
        );
        assert_eq!(
            std::fs::read_to_string(dev.join("driver/unbind")).unwrap(),
            "0000:41:00.0"
        );
        assert_eq!(
            std::fs::read_to_string(f.p("sys/bus/pci/devices/0000:40:01.0/driver_override"))
                .unwrap(),
            "(null)\n"
        );
        // Not loaded: says how to load it; no device: says how to find one.
        std::fs::remove_dir(f.p("sys/bus/pci/drivers/vfio-pci")).unwrap();
        let e = bind(&f.root(), &b, true).unwrap_err().to_string();
        assert!(e.contains("modprobe vfio-pci"), "{e}");
        let e = bind(&f.root(), &bdf("0000:99:00.0"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PCI device 0000:99:00.0"), "{e}");
    }

    #[test]
    fn unbind_clears_the_override_and_status_lists_nvidia_devices() {
        let f = Fake::new();
        f.gpu("0000:41:00.0", Some("vfio-pci"), "42");
        f.device(
            "0000:00:1f.0",
            0x8086,
            0x060100,
            Some("lpc_ich"),
            Some("1"),
            "",
        );
        let out = unbind(&f.root(), &bdf("0000:41:00.0"), true)
            .unwrap()
            .join("\n");
        assert!(
            out.contains("0000:41:00.0: vfio-pci -> host driver"),
            "{out}"
        );
        let dev = f.p("sys/bus/pci/devices/0000:41:00.0");
        assert_eq!(
            std::fs::read_to_string(dev.join("driver_override")).unwrap(),
            "\n"
        );
        assert_eq!(
            std::fs::read_to_string(f.p("sys/bus/pci/drivers_probe")).unwrap(),
            "0000:41:00.0"
        );
        let s = status(&f.root());
        assert!(s.contains("IOMMU: on"), "{s}");
        assert!(
            s.contains("0000:41:00.0 [10de:2330] class 030200 driver vfio-pci IOMMU group 42 64-bit BARs [128 GiB, 32 MiB]"),
            "{s}"
        );
        assert!(!s.contains("0000:00:1f.0"), "{s}");
    }
}
