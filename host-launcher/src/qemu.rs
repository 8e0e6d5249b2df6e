//! The QEMU command line, as a pure function of a [`LaunchPlan`], and QEMU version checks.
//!
//! Both modes boot the same four measured parts (`-bios OVMF.fd -kernel -initrd -append`), add
//! no default devices (`-nodefaults`), send the serial console to a log file, expose a QMP
//! control socket, forward one host port on 127.0.0.1 to the agent, and hand the host config
//! over fw_cfg. `--tee none` adds a second fw_cfg file with the simulated TEE's config (the
//! stand-in for TDX hardware; never with `--tee tdx`). `--tee tdx` adds the TDX guest object, a
//! private-memory backend, vsock for the quote generation service and optional GPU passthrough,
//! always under KVM; `--tee none` runs under the plan's accelerator ([`crate::accel`] chose it):
//! `-accel kvm -cpu host` or `-accel tcg -cpu max`, with the same plain `-machine q35`.

use std::path::PathBuf;

use crate::accel::Accel;
use crate::settings::{PciBdf, Tee};

/// Everything the command line depends on; no I/O happens while turning it into argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub qemu: PathBuf,
    pub tee: Tee,
    /// The accelerator for `--tee none` (`--tee tdx` is always KVM, whatever this says).
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    /// GPUs passed through (TDX only), each behind its own PCIe root port, in this order.
    pub gpus: Vec<PciBdf>,
    /// Pass the GPUs through the legacy VFIO container (`/dev/vfio/GROUP`) instead of iommufd
    /// (the host preflight sets it when `/dev/iommu` or the device's VFIO cdev is missing; the
    /// guest sees the same devices either way).
    pub vfio_legacy: bool,
    /// With `--tee tdx`: the TDX machine from the launch shape. With `--tee none`: `Some` only
    /// for `capture-acpi --for tdx`, which boots under TCG with the machine line and device
    /// list of that TDX launch so that QEMU builds the TD's ACPI tables (see
    /// `measurements/docs/tdx-acpi-differences.md`).
    pub tdx_machine: Option<TdxMachine>,
    pub firmware: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Host TCP port on 127.0.0.1 forwarded to the agent's port in the guest.
    pub host_port: u16,
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// File holding the exact canonical host-config bytes.
    pub host_config_file: PathBuf,
    /// File holding the `worker_api::SimulatedTeeConfig` (only with `--tee none`; insecure,
    /// test-only stand-in for TDX hardware, not part of the measured host config).
    pub simulated_tee_file: Option<PathBuf>,
    /// vsock context id of the guest (TDX only; the host is 2).
    pub guest_cid: u32,
    /// Model file attached read-only as a raw virtio-blk disk with serial
    /// [`worker_api::MODEL_DISK_SERIAL`] (the guest reads it into private memory and checks it).
    pub model_disk: Option<PathBuf>,
}

/// Guest-visible machine settings of a TDX launch, from its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxMachine {
    /// Versioned machine type (`pc-q35-10.1`).
    pub machine: String,
    /// `q35-pcihost.pci-hole64-size` in GiB (`None`: QEMU's default).
    pub pci_hole64_gib: Option<u64>,
    /// GPUs of the shape: a table capture puts a stand-in behind each root port (a TDX launch
    /// passes the plan's `gpus` through instead).
    pub gpus: u32,
}

impl LaunchPlan {
    /// The accelerator QEMU runs under: always KVM for `--tee tdx`, else the plan's.
    pub fn accelerator(&self) -> Accel {
        match self.tee {
            Tee::Tdx => Accel::Kvm,
            Tee::None => self.accel,
        }
    }
}

/// Host vsock port of Intel's quote generation service (QGS).
pub const QGS_VSOCK_PORT: u32 = 4050;

/// Oldest QEMU with the `tdx-guest` object.
pub const MIN_TDX_QEMU: (u32, u32) = (10, 1);

fn p(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// The full QEMU argv (program first) for `plan`.
pub fn argv(plan: &LaunchPlan) -> Vec<String> {
    let mut a: Vec<String> = vec![p(&plan.qemu)];
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    let mem = format!("{}M", plan.memory_mib);
    let smp = plan.cpus.to_string();
    match plan.tee {
        Tee::Tdx => {
            let tdx = format!(
                r#"{{"qom-type":"tdx-guest","id":"tdx","quote-generation-socket":{{"type":"vsock","cid":"2","port":"{QGS_VSOCK_PORT}"}}}}"#
            );
            // Every machine option that changes the ACPI tables (and so RTMR0) is explicit:
            // TDX QEMU turns SMM and the PIC off on its own when left on `auto`, and the HPET
            // is on by default for q35; spelling them out makes the tables a function of the
            // shape and the QEMU release alone.
            let machine = plan
                .tdx_machine
                .as_ref()
                .map_or("q35", |m| m.machine.as_str());
            push(&[
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-machine",
                &format!(
                    "{machine},kernel-irqchip=split,smm=off,pic=off,hpet=off,memory-backend=mem0,confidential-guest-support=tdx"
                ),
                "-object",
                &tdx,
                "-object",
                &format!("memory-backend-ram,id=mem0,size={mem}"),
                "-smp",
                &smp,
            ]);
            if let Some(gib) = plan.tdx_machine.as_ref().and_then(|m| m.pci_hole64_gib) {
                push(&["-global", &format!("q35-pcihost.pci-hole64-size={gib}G")]);
            }
        }
        Tee::None => match &plan.tdx_machine {
            // The TD's tables under TCG: the TDX machine line without the TDX object (TDX QEMU
            // only turns SMM and the PIC off, which are explicit here), and the TD's guest
            // physical-address width, which places the DSDT's 64-bit PCI window.
            Some(m) => {
                // The RAM as the TD's line has it (a memory backend), without reserving it:
                // the firmware touches little of it, so a 1 TiB shape captures on a small host.
                push(&[
                    "-accel",
                    "tcg",
                    "-cpu",
                    "max,phys-bits=46",
                    "-machine",
                    &format!("{},smm=off,pic=off,hpet=off,memory-backend=mem0", m.machine),
                    "-object",
                    &format!("memory-backend-ram,id=mem0,size={mem},reserve=off"),
                    "-smp",
                    &smp,
                ]);
                if let Some(gib) = m.pci_hole64_gib {
                    push(&["-global", &format!("q35-pcihost.pci-hole64-size={gib}G")]);
                }
            }
            None => {
                let (accel, cpu) = match plan.accel {
                    Accel::Kvm => ("kvm", "host"),
                    Accel::Tcg => ("tcg", "max"),
                };
                push(&[
                    "-accel", accel, "-cpu", cpu, "-machine", "q35", "-m", &mem, "-smp", &smp,
                ]);
            }
        },
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-bios",
        &p(&plan.firmware),
        "-kernel",
        &p(&plan.kernel),
        "-initrd",
        &p(&plan.initrd),
        "-append",
        &plan.cmdline,
        "-chardev",
        &format!("file,id=con,path={}", p(&plan.console_log)),
        "-serial",
        "chardev:con",
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            p(&plan.qmp_socket)
        ),
        "-mon",
        "chardev=qmp,mode=control",
        "-netdev",
        &format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{}",
            plan.host_port,
            worker_api::AGENT_PORT
        ),
        "-device",
        &if td_layout(plan) {
            format!("virtio-net-pci,netdev=n0,addr={NET_SLOT:#x}")
        } else {
            "virtio-net-pci,netdev=n0".to_owned()
        },
        "-fw_cfg",
        &format!(
            "name={},file={}",
            worker_api::HOST_CONFIG_FW_CFG_NAME,
            p(&plan.host_config_file)
        ),
    ]);
    if plan.tee == Tee::None
        && let Some(f) = &plan.simulated_tee_file
    {
        push(&[
            "-fw_cfg",
            &format!(
                "name={},file={}",
                worker_api::SIMULATED_TEE_FW_CFG_NAME,
                p(f)
            ),
        ]);
    }
    if td_layout(plan) {
        td_devices(plan, &mut a);
    } else if let Some(model) = &plan.model_disk {
        a.extend(model_disk_args(model, None));
    }
    a
}

/// Whether the plan lays its PCI devices out as a TD does: `--tee tdx`, or a table capture of a
/// TDX shape (`capture-acpi --for tdx`). Slot presence changes the DSDT (one `Sxx` device per
/// populated slot), so a TD's slots are fixed and always populated, whatever the launch
/// attaches: the tables, and so RTMR0, depend on the shape alone.
fn td_layout(plan: &LaunchPlan) -> bool {
    plan.tee == Tee::Tdx || plan.tdx_machine.is_some()
}

/// PCI slot of the network device in a TD layout (fixed; see [`td_layout`]).
pub const NET_SLOT: u32 = 0x1;
/// PCI slot of the model disk (or its empty stand-in) in a TD layout.
pub const MODEL_SLOT: u32 = 0x2;
/// PCI slot of vsock (the quote service's transport; a stand-in in a table capture).
pub const VSOCK_SLOT: u32 = 0x3;
/// PCI slot of the first GPU's root port; GPU `i` is behind the root port in slot `0x10 + i`.
pub const FIRST_GPU_SLOT: u32 = 0x10;
/// Serial of the empty disk that holds the model slot of a TD launched without a model.
pub const NO_MODEL_SERIAL: &str = "cw-no-model";
/// 64-bit prefetchable BAR of the GPU stand-in in a table capture: an H100's BAR1 (128 GiB).
pub const GPU_STANDIN_MEMBAR: &str = "128G";

fn model_disk_args(model: &std::path::Path, slot: Option<u32>) -> Vec<String> {
    let addr = slot.map(|s| format!(",addr={s:#x}")).unwrap_or_default();
    // `,` separates QEMU options; a literal comma in a file name is written `,,`.
    vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=model,format=raw,readonly=on",
            p(model).replace(',', ",,")
        ),
        "-device".into(),
        format!(
            "virtio-blk-pci,drive=model,serial={}{addr}",
            worker_api::MODEL_DISK_SERIAL
        ),
    ]
}

/// The devices of a TD layout after the network: model slot, vsock slot, GPU root ports. A
/// table capture (`--tee none` with a TDX machine) puts stand-ins where the TD has devices the
/// capture host cannot or need not provide: `virtio-rng-pci` for vsock (vhost-vsock needs the
/// host's vhost driver), and per GPU a `pci-testdev` with a 64-bit prefetchable BAR of an H100's
/// BAR1 size behind the same root port. Which hot-pluggable, AML-less device sits in a slot
/// does not change the tables, nor do its BARs as long as they fit the shape's 64-bit hole
/// (measurements/docs/tdx-acpi-differences.md, "GPU shapes": pci-testdev and e1000e behind the
/// root ports gave identical blobs; an empty root port does not).
fn td_devices(plan: &LaunchPlan, a: &mut Vec<String>) {
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    match &plan.model_disk {
        Some(model) => {
            let args = model_disk_args(model, Some(MODEL_SLOT));
            push(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        None => push(&[
            "-blockdev",
            "driver=null-co,node-name=nomodel,size=4096,read-zeroes=on",
            "-device",
            &format!("virtio-blk-pci,drive=nomodel,serial={NO_MODEL_SERIAL},addr={MODEL_SLOT:#x}"),
        ]),
    }
    let capture = plan.tee == Tee::None;
    if capture {
        push(&["-device", &format!("virtio-rng-pci,addr={VSOCK_SLOT:#x}")]);
    } else {
        push(&[
            "-device",
            &format!(
                "vhost-vsock-pci,guest-cid={},addr={VSOCK_SLOT:#x}",
                plan.guest_cid
            ),
        ]);
    }
    let root_port = |i: u32| {
        format!(
            "pcie-root-port,id=rp{i},bus=pcie.0,addr={:#x}.0,chassis={}",
            FIRST_GPU_SLOT + i,
            i + 1
        )
    };
    if capture {
        let n = plan.tdx_machine.as_ref().map_or(0, |m| m.gpus);
        for i in 0..n {
            push(&[
                "-device",
                &root_port(i),
                "-device",
                &format!("pci-testdev,bus=rp{i},membar={GPU_STANDIN_MEMBAR}"),
            ]);
        }
        return;
    }
    let iommufd = !plan.vfio_legacy;
    if iommufd && !plan.gpus.is_empty() {
        push(&["-object", "iommufd,id=iommufd0"]);
    }
    // One root port per GPU at fixed slots (0x10, 0x11, ...) with their own chassis numbers:
    // the PCIe topology, and so the tables, depend only on the GPU count.
    for (i, bdf) in (0u32..).zip(&plan.gpus) {
        push(&[
            "-device",
            &root_port(i),
            "-device",
            &format!(
                "vfio-pci,host={},bus=rp{i}{}",
                bdf.as_str(),
                if iommufd { ",iommufd=iommufd0" } else { "" }
            ),
        ]);
    }
}

/// Quotes one word for a POSIX shell (single quotes unless every byte is obviously safe).
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'_' | b'+' | b'=' | b'/' | b'.' | b',' | b':' | b'@' | b'%'
                )
        });
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// One shell-ready line for an argv.
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `qemu-system-x86_64 --version` output into (major, minor, patch).
pub fn parse_version(output: &str) -> Option<(u32, u32, u32)> {
    let rest = output.split("QEMU emulator version ").nth(1)?;
    let ver = rest.split(|c: char| c.is_whitespace() || c == '(').next()?;
    let mut it = ver.split('.').map(|n| n.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next()?.ok()?;
    let patch = it.next().and_then(Result::ok).unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether a QEMU version has what `tee` needs; the error says what to do.
pub fn check_version(tee: Tee, v: (u32, u32, u32)) -> Result<(), String> {
    if tee == Tee::Tdx && (v.0, v.1) < MIN_TDX_QEMU {
        return Err(format!(
            "QEMU {}.{}.{} has no `tdx-guest` object: --tee tdx needs QEMU >= {}.{} (Debian \
             bookworm-backports has 10.0; use a newer QEMU build, or --tee none to test the \
             image without TDX)",
            v.0, v.1, v.2, MIN_TDX_QEMU.0, MIN_TDX_QEMU.1
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn plan(tee: Tee, gpu: Option<&str>) -> LaunchPlan {
        LaunchPlan {
            qemu: "qemu-system-x86_64".into(),
            tee,
            accel: match tee {
                Tee::Tdx => Accel::Kvm,
                Tee::None => Accel::Tcg,
            },
            memory_mib: 2048,
            cpus: 2,
            gpus: gpu.map(|g| g.parse().unwrap()).into_iter().collect(),
            vfio_legacy: false,
            tdx_machine: (tee == Tee::Tdx).then(|| TdxMachine {
                machine: "pc-q35-10.1".into(),
                pci_hole64_gib: gpu.map(|_| 1024),
                gpus: u32::from(gpu.is_some()),
            }),
            firmware: "/img/OVMF.fd".into(),
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd".into(),
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
            host_port: 18443,
            console_log: "/run/w/console.log".into(),
            qmp_socket: "/run/w/qmp.sock".into(),
            host_config_file: "/run/w/host-config.json".into(),
            simulated_tee_file: Some("/run/w/simulated-tee.json".into()),
            guest_cid: 3,
            model_disk: None,
        }
    }

    fn lines(argv: &[String]) -> String {
        // One option per line (an option and its value together) for readable goldens.
        let mut out = String::new();
        for a in argv {
            if a.starts_with('-') || out.is_empty() {
                if !out.is_empty() {
                    out.push('\n');
                }
            } else {
                out.push(' ');
            }
            out.push_str(&shell_quote(a));
        }
        out.push('\n');
        out
    }

    #[test]
    fn tee_none_tcg_argv_golden() {
        expect![[r#"
            qemu-system-x86_64
            -accel tcg
            -cpu max
            -machine q35
            -m 2048M
            -smp 2
            -nodefaults
            -no-user-config
            -display none
            -no-reboot
            -bios /img/OVMF.fd
            -kernel /img/vmlinuz
            -initrd /img/initrd
            -append 'console=ttyS0 panic=-1 quiet'
            -chardev file,id=con,path=/run/w/console.log
            -serial chardev:con
            -chardev socket,id=qmp,path=/run/w/qmp.sock,server=on,wait=off
            -mon chardev=qmp,mode=control
            -netdev user,id=n0,hostfwd=tcp:127.0.0.1:18443-:8443
            -device virtio-net-pci,netdev=n0
            -fw_cfg name=opt/org.confidential-worker/config,file=/run/w/host-config.json
            -fw_cfg name=opt/org.confidential-worker/simulated-tee,file=/run/w/simulated-tee.json
        "#]]
        .assert_eq(&lines(&argv(&plan(Tee::None, None))));
    }

    #[test]
    fn tee_none_kvm_argv_golden() {
        let mut pl = plan(Tee::None, None);
        pl.accel = Accel::Kvm;
        expect![[r#"
            qemu-system-x86_64
            -accel kvm
            -cpu host
            -machine q35
            -m 2048M
            -smp 2
            -nodefaults
            -no-user-config
            -display none
            -no-reboot
            -bios /img/OVMF.fd
            -kernel /img/vmlinuz
            -initrd /img/initrd
            -append 'console=ttyS0 panic=-1 quiet'
            -chardev file,id=con,path=/run/w/console.log
            -serial chardev:con
            -chardev socket,id=qmp,path=/run/w/qmp.sock,server=on,wait=off
            -mon chardev=qmp,mode=control
            -netdev user,id=n0,hostfwd=tcp:127.0.0.1:18443-:8443
            -device virtio-net-pci,netdev=n0
            -fw_cfg name=opt/org.confidential-worker/config,file=/run/w/host-config.json
            -fw_cfg name=opt/org.confidential-worker/simulated-tee,file=/run/w/simulated-tee.json
        "#]]
        .assert_eq(&lines(&argv(&pl)));
    }

    #[test]
    fn kvm_and_tcg_differ_only_in_accelerator_and_cpu() {
        let tcg = argv(&plan(Tee::None, None));
        let mut pl = plan(Tee::None, None);
        pl.accel = Accel::Kvm;
        let kvm = argv(&pl);
        assert_eq!(tcg.len(), kvm.len());
        let diff: Vec<(&str, &str)> = tcg
            .iter()
            .zip(&kvm)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(diff, [("tcg", "kvm"), ("max", "host")]);
        // The accelerator setting never changes a TDX launch (always KVM).
        let mut tdx = plan(Tee::Tdx, None);
        let always = argv(&tdx);
        tdx.accel = Accel::Tcg;
        assert_eq!(argv(&tdx), always);
        assert_eq!(tdx.accelerator(), Accel::Kvm);
        assert_eq!(pl.accelerator(), Accel::Kvm);
        assert_eq!(plan(Tee::None, None).accelerator(), Accel::Tcg);
    }

    #[test]
    fn tdx_argv_golden() {
        expect![[r#"
            qemu-system-x86_64
            -accel kvm
            -cpu host
            -machine pc-q35-10.1,kernel-irqchip=split,smm=off,pic=off,hpet=off,memory-backend=mem0,confidential-guest-support=tdx
            -object '{"qom-type":"tdx-guest","id":"tdx","quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'
            -object memory-backend-ram,id=mem0,size=2048M
            -smp 2
            -nodefaults
            -no-user-config
            -display none
            -no-reboot
            -bios /img/OVMF.fd
            -kernel /img/vmlinuz
            -initrd /img/initrd
            -append 'console=ttyS0 panic=-1 quiet'
            -chardev file,id=con,path=/run/w/console.log
            -serial chardev:con
            -chardev socket,id=qmp,path=/run/w/qmp.sock,server=on,wait=off
            -mon chardev=qmp,mode=control
            -netdev user,id=n0,hostfwd=tcp:127.0.0.1:18443-:8443
            -device virtio-net-pci,netdev=n0,addr=0x1
            -fw_cfg name=opt/org.confidential-worker/config,file=/run/w/host-config.json
            -blockdev driver=null-co,node-name=nomodel,size=4096,read-zeroes=on
            -device virtio-blk-pci,drive=nomodel,serial=cw-no-model,addr=0x2
            -device vhost-vsock-pci,guest-cid=3,addr=0x3
        "#]]
        .assert_eq(&lines(&argv(&plan(Tee::Tdx, None))));
    }

    #[test]
    fn tdx_gpu_argv_golden() {
        let a = argv(&plan(Tee::Tdx, Some("3B:00.0")));
        expect![[r#"
            -device vhost-vsock-pci,guest-cid=3,addr=0x3
            -object iommufd,id=iommufd0
            -device pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,chassis=1
            -device vfio-pci,host=0000:3b:00.0,bus=rp0,iommufd=iommufd0
        "#]]
        .assert_eq(&lines(&a[a.len() - 8..]));
    }

    #[test]
    fn tdx_gpu_argv_golden_legacy_vfio() {
        // Hosts without iommufd (the preflight found no /dev/iommu or VFIO cdev): the same
        // devices through the legacy VFIO container.
        let mut pl = plan(Tee::Tdx, Some("0000:3b:00.0"));
        pl.vfio_legacy = true;
        let a = argv(&pl);
        expect![[r#"
            -device vhost-vsock-pci,guest-cid=3,addr=0x3
            -device pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,chassis=1
            -device vfio-pci,host=0000:3b:00.0,bus=rp0
        "#]]
        .assert_eq(&lines(&a[a.len() - 6..]));
    }

    #[test]
    fn tdx_eight_gpu_shape_argv_golden() {
        let mut pl = plan(Tee::Tdx, None);
        pl.memory_mib = 1_048_576;
        pl.cpus = 96;
        pl.tdx_machine = Some(TdxMachine {
            machine: "pc-q35-10.1".into(),
            pci_hole64_gib: Some(8192),
            gpus: 8,
        });
        pl.gpus = (0..8)
            .map(|i| {
                format!("0000:{:02x}:00.0", 0x18 + 0x10 * i)
                    .parse()
                    .unwrap()
            })
            .collect();
        let a = argv(&pl);
        let text = lines(&a);
        expect![[r#"
            -machine pc-q35-10.1,kernel-irqchip=split,smm=off,pic=off,hpet=off,memory-backend=mem0,confidential-guest-support=tdx
            -object '{"qom-type":"tdx-guest","id":"tdx","quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'
            -object memory-backend-ram,id=mem0,size=1048576M
            -smp 96
            -global q35-pcihost.pci-hole64-size=8192G
        "#]]
        .assert_eq(&lines(&a[5..15]));
        expect![[r#"
            -device vhost-vsock-pci,guest-cid=3,addr=0x3
            -object iommufd,id=iommufd0
            -device pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,chassis=1
            -device vfio-pci,host=0000:18:00.0,bus=rp0,iommufd=iommufd0
            -device pcie-root-port,id=rp1,bus=pcie.0,addr=0x11.0,chassis=2
            -device vfio-pci,host=0000:28:00.0,bus=rp1,iommufd=iommufd0
            -device pcie-root-port,id=rp2,bus=pcie.0,addr=0x12.0,chassis=3
            -device vfio-pci,host=0000:38:00.0,bus=rp2,iommufd=iommufd0
            -device pcie-root-port,id=rp3,bus=pcie.0,addr=0x13.0,chassis=4
            -device vfio-pci,host=0000:48:00.0,bus=rp3,iommufd=iommufd0
            -device pcie-root-port,id=rp4,bus=pcie.0,addr=0x14.0,chassis=5
            -device vfio-pci,host=0000:58:00.0,bus=rp4,iommufd=iommufd0
            -device pcie-root-port,id=rp5,bus=pcie.0,addr=0x15.0,chassis=6
            -device vfio-pci,host=0000:68:00.0,bus=rp5,iommufd=iommufd0
            -device pcie-root-port,id=rp6,bus=pcie.0,addr=0x16.0,chassis=7
            -device vfio-pci,host=0000:78:00.0,bus=rp6,iommufd=iommufd0
            -device pcie-root-port,id=rp7,bus=pcie.0,addr=0x17.0,chassis=8
            -device vfio-pci,host=0000:88:00.0,bus=rp7,iommufd=iommufd0
        "#]]
        .assert_eq(&lines(&a[a.len() - 36..]));
        // The bare alias never reaches a TDX launch built from a shape.
        assert!(!text.contains("-machine q35"), "{text}");
    }

    #[test]
    fn tdx_table_capture_argv_mirrors_the_tdx_launch_under_tcg() {
        let mut pl = plan(Tee::None, None);
        pl.tdx_machine = Some(TdxMachine {
            machine: "pc-q35-10.0".into(),
            pci_hole64_gib: None,
            gpus: 0,
        });
        let a = argv(&pl);
        expect![[r#"
            qemu-system-x86_64
            -accel tcg
            -cpu max,phys-bits=46
            -machine pc-q35-10.0,smm=off,pic=off,hpet=off,memory-backend=mem0
            -object memory-backend-ram,id=mem0,size=2048M,reserve=off
            -smp 2
        "#]]
        .assert_eq(&lines(&a[..11]));
        expect![[r#"
            -blockdev driver=null-co,node-name=nomodel,size=4096,read-zeroes=on
            -device virtio-blk-pci,drive=nomodel,serial=cw-no-model,addr=0x2
            -device virtio-rng-pci,addr=0x3
        "#]]
        .assert_eq(&lines(&a[a.len() - 6..]));
        // The same slots as the TD, each populated: (device, slot or root port).
        let placed = |v: &[String]| -> Vec<(String, String)> {
            v.windows(2)
                .filter(|w| w[0] == "-device")
                .map(|w| {
                    let kind = w[1].split(',').next().unwrap_or("").to_string();
                    let at = w[1]
                        .split(',')
                        .find_map(|o| o.strip_prefix("addr=").or(o.strip_prefix("bus=rp")))
                        .unwrap_or("?")
                        .to_string();
                    (kind, at)
                })
                .collect()
        };
        for gpus in [0u32, 1, 8] {
            let mut cap = pl.clone();
            cap.tdx_machine = Some(TdxMachine {
                machine: "pc-q35-10.0".into(),
                pci_hole64_gib: (gpus > 0).then_some(1024 * u64::from(gpus)),
                gpus,
            });
            let mut tdx = plan(Tee::Tdx, None);
            tdx.tdx_machine = cap.tdx_machine.clone();
            tdx.gpus = (0..gpus)
                .map(|i| format!("0000:{:02x}:00.0", 0x18 + i).parse().unwrap())
                .collect();
            let (c, t) = (placed(&argv(&cap)), placed(&argv(&tdx)));
            let slots = |v: &[(String, String)]| v.iter().map(|d| d.1.clone()).collect::<Vec<_>>();
            assert_eq!(slots(&c), slots(&t), "{gpus} GPU(s)");
            let stand_ins: Vec<(&str, &str)> = c
                .iter()
                .zip(&t)
                .filter(|(a, b)| a.0 != b.0)
                .map(|(a, b)| (a.0.as_str(), b.0.as_str()))
                .collect();
            let mut want = vec![("virtio-rng-pci", "vhost-vsock-pci")];
            want.extend((0..gpus).map(|_| ("pci-testdev", "vfio-pci")));
            assert_eq!(stand_ins, want, "{gpus} GPU(s)");
        }
        let one = {
            let mut cap = pl.clone();
            cap.tdx_machine = Some(TdxMachine {
                machine: "pc-q35-10.0".into(),
                pci_hole64_gib: Some(1024),
                gpus: 1,
            });
            argv(&cap)
        };
        expect![[r#"
            -device virtio-rng-pci,addr=0x3
            -device pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,chassis=1
            -device pci-testdev,bus=rp0,membar=128G
        "#]]
        .assert_eq(&lines(&one[one.len() - 6..]));
    }

    #[test]
    fn model_disk_argv_golden() {
        let mut pl = plan(Tee::Tdx, None);
        pl.model_disk = Some("/models/a,b.gguf".into());
        let a = argv(&pl);
        expect![[r#"
            -fw_cfg name=opt/org.confidential-worker/config,file=/run/w/host-config.json
            -drive file=/models/a,,b.gguf,if=none,id=model,format=raw,readonly=on
            -device virtio-blk-pci,drive=model,serial=cw-model,addr=0x2
            -device vhost-vsock-pci,guest-cid=3,addr=0x3
        "#]]
        .assert_eq(&lines(&a[a.len() - 8..]));
        pl.tee = Tee::None;
        pl.tdx_machine = None;
        let a = argv(&pl);
        assert_eq!(
            a[a.len() - 2..],
            ["-device", "virtio-blk-pci,drive=model,serial=cw-model"]
        );
    }

    #[test]
    fn tcg_ignores_tdx_only_settings() {
        let a = argv(&plan(Tee::None, Some("3b:00.0")));
        let all = a.join(" ");
        for tdx_only in ["tdx-guest", "vfio", "vsock", "kvm", "memory-backend"] {
            assert!(!all.contains(tdx_only), "{tdx_only} in TCG argv");
        }
        // The simulated TEE never reaches a TDX guest.
        let tdx = argv(&plan(Tee::Tdx, None)).join(" ");
        assert!(!tdx.contains("simulated-tee"), "{tdx}");
    }

    #[test]
    fn shell_quoting_round_trips_through_sh() {
        let words = [
            "plain",
            "two words",
            "it's",
            "",
            r#"{"a":"b"}"#,
            "$HOME",
            "a\nb",
        ];
        let line = shell_line(&words.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {line}"))
            .output()
            .unwrap();
        let got: Vec<&str> = std::str::from_utf8(&out.stdout)
            .unwrap()
            .split_terminator('\0')
            .collect();
        assert_eq!(got, words);
    }

    #[test]
    fn qemu_versions_parse_and_gate_tdx() {
        let deb = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                   Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(deb), Some((10, 0, 2)));
        assert_eq!(
            parse_version("QEMU emulator version 10.1.0\n"),
            Some((10, 1, 0))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2\n"),
            Some((7, 2, 0))
        );
        assert_eq!(parse_version("qemu 9"), None);
        assert_eq!(parse_version("QEMU emulator version x.y"), None);
        let e = check_version(Tee::Tdx, (10, 0, 2)).unwrap_err();
        assert!(
            e.contains("QEMU 10.0.2 has no `tdx-guest`") && e.contains(">= 10.1"),
            "{e}"
        );
        assert!(check_version(Tee::Tdx, (10, 1, 0)).is_ok());
        assert!(check_version(Tee::Tdx, (11, 0, 0)).is_ok());
        assert!(check_version(Tee::None, (8, 2, 0)).is_ok());
    }
}
