//! Which declared TDX launch shape a launch is (see `worker_api::shapes`), as a pure function
//! of the image's declaration and the settings, and whether the host's QEMU is a declared
//! release. A TDX launch outside the declaration would report an RTMR0, and so an image hash,
//! that nobody published; it is refused unless `--allow-unlisted-shape`.

use worker_api::shapes::{LaunchShape, TdxLaunch};

use crate::qemu::TdxMachine;

/// The outcome for a `--tee tdx` launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    /// The declared shape, or `None` for an allowed unlisted launch.
    pub shape: Option<LaunchShape>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub machine: TdxMachine,
}

/// What the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request<'a> {
    pub shape: Option<&'a str>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    pub gpus: usize,
    pub allow_unlisted: bool,
}

const UNLISTED: &str = "--allow-unlisted-shape boots it anyway, but the TD then reports an image hash \
     that is on no allow-list (verifiers and the root contract reject it)";

/// Picks the shape. `defaults` are the manifest's launch memory and vCPUs.
pub fn choose(
    tdx: Option<&TdxLaunch>,
    req: &Request<'_>,
    defaults: (u64, u32),
) -> Result<Chosen, String> {
    let memory = req.memory_mib.unwrap_or(defaults.0);
    let cpus = req.cpus.unwrap_or(defaults.1).max(1);
    let gpus = u32::try_from(req.gpus).unwrap_or(u32::MAX);
    let Some(tdx) = tdx else {
        if req.allow_unlisted {
            return Ok(Chosen {
                shape: None,
                memory_mib: memory,
                cpus,
                machine: TdxMachine {
                    machine: "q35".into(),
                    pci_hole64_gib: None,
                    gpus,
                },
            });
        }
        return Err(format!(
            "this image declares no TDX launch shapes (manifest.json launch.tdx): rebuild it with \
             `cargo xtask image build` from a checkout whose image/worker.yaml has `tdx:`. {UNLISTED}"
        ));
    };
    let machine = |s: Option<&LaunchShape>| TdxMachine {
        machine: tdx.machine.clone(),
        pci_hole64_gib: s.and_then(|s| s.pci_hole64_gib),
        gpus,
    };
    if let Some(name) = req.shape {
        let s = tdx.shape(name).ok_or_else(|| {
            format!(
                "--shape {name}: the image declares no such shape; declared: {}",
                tdx.describe()
            )
        })?;
        if let Some(m) = req.memory_mib.filter(|m| *m != s.memory_mib) {
            return Err(format!(
                "--memory {m} MiB contradicts shape {} ({} MiB): drop --memory or choose another --shape ({})",
                s.name,
                s.memory_mib,
                tdx.describe()
            ));
        }
        if let Some(c) = req.cpus.filter(|c| *c != s.cpus) {
            return Err(format!(
                "--cpus {c} contradicts shape {} ({} vCPUs): drop --cpus or choose another --shape ({})",
                s.name,
                s.cpus,
                tdx.describe()
            ));
        }
        if gpus != s.gpus {
            return Err(format!(
                "shape {} takes {} GPU(s) but {} --gpu given: pass exactly {} --gpu BDF, or choose another --shape ({})",
                s.name,
                s.gpus,
                gpus,
                s.gpus,
                tdx.describe()
            ));
        }
        return Ok(Chosen {
            shape: Some(s.clone()),
            memory_mib: s.memory_mib,
            cpus: s.cpus,
            machine: machine(Some(s)),
        });
    }
    if let Some(s) = tdx.matching(memory, cpus, gpus) {
        return Ok(Chosen {
            shape: Some(s.clone()),
            memory_mib: memory,
            cpus,
            machine: machine(Some(s)),
        });
    }
    if req.allow_unlisted {
        return Ok(Chosen {
            shape: None,
            memory_mib: memory,
            cpus,
            machine: machine(None),
        });
    }
    Err(format!(
        "no declared TDX launch shape has {memory} MiB, {cpus} vCPU(s) and {gpus} GPU(s), so a TD \
         launched like this would report an image hash nobody published. Declared: {}. Pass \
         --shape NAME (or the --memory/--cpus/--gpu of one). {UNLISTED}",
        tdx.describe()
    ))
}

/// Whether the host's QEMU `(major, minor, patch)` is a declared release for TDX launches.
pub fn check_qemu(
    tdx: Option<&TdxLaunch>,
    v: (u32, u32, u32),
    allow_unlisted: bool,
) -> Result<Option<String>, String> {
    let Some(tdx) = tdx else {
        return Ok(None);
    };
    if tdx.allows_qemu(v.0, v.1) {
        return Ok(None);
    }
    let msg = format!(
        "QEMU {}.{}.{} is not a release this image's TDX hashes were computed for (declared: {}; \
         machine {}): the ACPI tables, and so RTMR0 and the image hash, may differ",
        v.0,
        v.1,
        v.2,
        tdx.qemu_versions.join(", "),
        tdx.machine
    );
    if allow_unlisted {
        Ok(Some(msg))
    } else {
        Err(format!(
            "{msg}. Install a declared QEMU release, or pass --allow-unlisted-shape to boot anyway \
             (the TD then reports an image hash that is on no allow-list)"
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tdx() -> TdxLaunch {
        let s = |name: &str, memory_mib, cpus, gpus, hole| LaunchShape {
            name: name.into(),
            memory_mib,
            cpus,
            gpus,
            pci_hole64_gib: hole,
        };
        TdxLaunch {
            qemu_versions: vec!["10.1".into()],
            machine: "pc-q35-10.1".into(),
            shapes: vec![
                s("cpu-1c-2g", 2048, 1, 0, None),
                s("h100x1", 131072, 16, 1, Some(1024)),
                s("h100x8", 1048576, 96, 8, Some(8192)),
            ],
        }
    }

    #[test]
    fn the_defaults_match_a_shape() {
        let c = choose(Some(&tdx()), &Request::default(), (2048, 1)).unwrap();
        assert_eq!(c.shape.unwrap().name, "cpu-1c-2g");
        assert_eq!(c.machine.machine, "pc-q35-10.1");
        assert_eq!(c.machine.pci_hole64_gib, None);
    }

    #[test]
    fn a_named_shape_sets_memory_cpus_and_the_pci_hole() {
        let req = Request {
            shape: Some("h100x1"),
            gpus: 1,
            ..Default::default()
        };
        let c = choose(Some(&tdx()), &req, (2048, 1)).unwrap();
        assert_eq!((c.memory_mib, c.cpus), (131072, 16));
        assert_eq!(c.machine.pci_hole64_gib, Some(1024));
        let by_resources = Request {
            memory_mib: Some(1048576),
            cpus: Some(96),
            gpus: 8,
            ..Default::default()
        };
        let c = choose(Some(&tdx()), &by_resources, (2048, 1)).unwrap();
        assert_eq!(c.shape.unwrap().name, "h100x8");
    }

    #[test]
    fn launches_outside_the_shapes_are_refused_naming_the_fix() {
        let req = Request {
            memory_mib: Some(3072),
            ..Default::default()
        };
        let e = choose(Some(&tdx()), &req, (2048, 1)).unwrap_err();
        assert!(
            e.contains("no declared TDX launch shape has 3072 MiB"),
            "{e}"
        );
        assert!(e.contains("cpu-1c-2g (2048 MiB, 1 vCPU, 0 GPUs)"), "{e}");
        assert!(
            e.contains("--shape NAME") && e.contains("--allow-unlisted-shape"),
            "{e}"
        );
        let allowed = Request {
            allow_unlisted: true,
            ..req
        };
        let c = choose(Some(&tdx()), &allowed, (2048, 1)).unwrap();
        assert!(c.shape.is_none());
        assert_eq!(c.memory_mib, 3072);
        assert_eq!(
            c.machine.machine, "pc-q35-10.1",
            "still the versioned machine"
        );

        let unknown = Request {
            shape: Some("h200x4"),
            ..Default::default()
        };
        let e = choose(Some(&tdx()), &unknown, (2048, 1)).unwrap_err();
        assert!(e.contains("--shape h200x4") && e.contains("h100x8"), "{e}");
        let wrong_gpus = Request {
            shape: Some("h100x1"),
            gpus: 2,
            ..Default::default()
        };
        let e = choose(Some(&tdx()), &wrong_gpus, (2048, 1)).unwrap_err();
        assert!(e.contains("takes 1 GPU(s) but 2 --gpu given"), "{e}");
        let contradicting = Request {
            shape: Some("h100x1"),
            memory_mib: Some(4096),
            gpus: 1,
            ..Default::default()
        };
        let e = choose(Some(&tdx()), &contradicting, (2048, 1)).unwrap_err();
        assert!(
            e.contains("--memory 4096 MiB contradicts shape h100x1"),
            "{e}"
        );
        let e = choose(None, &Request::default(), (2048, 1)).unwrap_err();
        assert!(e.contains("declares no TDX launch shapes"), "{e}");
    }

    #[test]
    fn only_declared_qemu_releases_unless_allowed() {
        assert_eq!(check_qemu(Some(&tdx()), (10, 1, 2), false), Ok(None));
        let e = check_qemu(Some(&tdx()), (10, 2, 0), false).unwrap_err();
        assert!(
            e.contains("QEMU 10.2.0") && e.contains("declared: 10.1"),
            "{e}"
        );
        assert!(e.contains("--allow-unlisted-shape"), "{e}");
        let w = check_qemu(Some(&tdx()), (10, 2, 0), true).unwrap().unwrap();
        assert!(w.contains("may differ"), "{w}");
    }
}
