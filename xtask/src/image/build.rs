//! `cargo xtask image build`: from the lock to `out/<image>/` (OVMF.fd, vmlinuz, initrd, cmdline,
//! manifest.json), reproducibly.
//!
//! Steps: verify the lock against worker.yaml; fetch and verify exactly the locked .debs; extract
//! them; build the guest agent with reproducible flags; assemble the initramfs (agent as `/init`,
//! the glibc files it needs from the locked runtime packages, the selected kernel modules in load
//! order, release and module lists); compress it; write every output and the manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;
use serde::Serialize;

use super::apt::{Apt, AptConfig};
use super::buildroot::{self, Bind, BuildRoot};
use super::cache;
use super::cpio::{Node, Tree};
use super::definition::{ImageDefinition, Role};
use super::elf::Elf;
use super::kconfig;
use super::kmod;
use super::lock::Lock;
use super::manifest::{
    BuildInfo, FileEntry, ImageId, Input, Launch, MANIFEST_SCHEMA_VERSION, Manifest,
};
use super::sources;
use super::toolchain;
use crate::progress::{Progress, bytes};
use crate::tools;

/// Upper bound for the four boot parts together.
pub const MAX_BOOT_BYTES: u64 = 150 * 1000 * 1000;

/// Where the build reads from and writes to.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Repository root (holds `image/` and the workspace).
    pub repo: PathBuf,
    /// Output directory for this image (default `out/<name>`).
    pub out: PathBuf,
    /// Content-addressed .deb cache.
    pub cache: PathBuf,
    /// Mirror override for downloads of missing inputs.
    pub mirror: Option<String>,
    /// Cargo target directory for the agent build.
    pub agent_target_dir: PathBuf,
    pub quiet: bool,
}

/// What a build produced (printed with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub out: PathBuf,
    pub files: Vec<FileEntry>,
    pub boot_bytes: u64,
    pub kernel_release: String,
    pub modules: Vec<String>,
    pub seconds: f64,
    pub step_seconds: BTreeMap<String, f64>,
}

/// Run the whole build.
pub fn build(opts: &BuildOptions) -> anyhow::Result<BuildReport> {
    let progress = Progress::new(opts.quiet);
    let mut steps = BTreeMap::new();
    let mut mark = |name: &str, since: &mut f64, p: &Progress| {
        let now = p.elapsed();
        steps.insert(name.to_string(), now - *since);
        *since = now;
    };
    let mut t = 0.0;

    let def_path = opts.repo.join("image/worker.yaml");
    let lock_path = opts.repo.join("image/worker.lock");
    let def = ImageDefinition::load(&def_path)?;
    let lock_bytes = std::fs::read(&lock_path).with_context(|| {
        format!(
            "reading {}; run `cargo xtask image lock`",
            lock_path.display()
        )
    })?;
    let lock = Lock::parse(
        &String::from_utf8_lossy(&lock_bytes),
        &lock_path.display().to_string(),
    )?;
    lock.check_matches(&def)?;
    buildroot::check_libc_matches(&lock)?;
    tools::require(&["dpkg-deb"])?;
    let (rustc, rust_sysroot) = toolchain::resolve(&opts.repo)?;
    progress.step(
        "toolchain",
        format!(
            "{} (pinned by rust-toolchain.toml) at {}",
            rustc.version_line,
            rust_sysroot.display()
        ),
    );
    progress.step(
        "lock",
        format!(
            "{} inputs pinned by {}",
            lock.packages.len(),
            lock_path.display()
        ),
    );

    // 1. Inputs.
    let apt_factory = || {
        Apt::new(AptConfig {
            state_dir: opts.cache.join("apt-state"),
            mirror: sources::resolve_mirror(opts.mirror.as_deref())?,
            suites: def.debian.suites.clone(),
            components: def.debian.components.clone(),
            arch: def.debian.architecture.clone(),
            // Old pinned versions may come from a snapshot mirror; the lock's sha256 pins the bytes.
            check_valid_until: false,
        })
    };
    let debs = cache::ensure_all(&lock.packages, &opts.cache, apt_factory, &progress)?;
    mark("fetch", &mut t, &progress);

    // 2. Extract.
    let work = tempfile::Builder::new()
        .prefix("worker-image-")
        .tempdir()
        .context("creating a work directory")?;
    let mut roots = BTreeMap::new();
    // Every kernel-role package (one monolithic linux-image, or Debian's split linux-image +
    // linux-binary + linux-modules + linux-base) is extracted into one root. Debian package
    // names never start with `.`, so this cannot collide with a package root.
    let kernel_root = work.path().join(".kernel");
    // NVRTC's packages (role cuda-compiler) go into one root too; it is bound into the build
    // root to compile the CUDA kernels and nothing of it enters the image.
    let nvrtc_root = work.path().join(".cuda-compiler");
    let mut build_debs = Vec::new();
    for (pkg, deb) in lock.packages.iter().zip(&debs) {
        if pkg.role == Role::Build {
            build_debs.push((pkg, deb.as_path()));
            continue;
        }
        let root = if pkg.role == Role::Kernel {
            kernel_root.clone()
        } else if pkg.role == Role::CudaCompiler {
            nvrtc_root.clone()
        } else {
            work.path().join(&pkg.name)
        };
        std::fs::create_dir_all(&root)?;
        progress.step("extract", format!("{} {}", pkg.name, pkg.version));
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&root)
            .status()
            .context("running dpkg-deb -x")?;
        if !status.success() {
            anyhow::bail!(
                "dpkg-deb -x {} failed (input {} {})",
                deb.display(),
                pkg.name,
                pkg.version
            );
        }
        roots.insert(pkg.name.clone(), root);
    }
    mark("extract", &mut t, &progress);

    let build_root = buildroot::assemble(
        &work.path().join(".build-root"),
        &def.build_root,
        &build_debs,
        &progress,
    )?;
    mark("extract", &mut t, &progress);

    // 3. Agent (and the CUDA kernels, compiled ahead of time in the same root).
    let cuda = def.cuda.as_ref().map(|c| CudaRequest {
        archs: c.archs.clone(),
        nvrtc_root: nvrtc_root.clone(),
        out: work.path().join(".cuda-out"),
    });
    let agent = build_agent(
        opts,
        &def,
        &build_root,
        &rustc,
        &rust_sysroot,
        cuda.as_ref(),
        &progress,
    )?;
    mark("agent", &mut t, &progress);

    // 4. Kernel and firmware.
    let kernel_names = lock
        .with_role(Role::Kernel)
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(" + ");
    if kernel_names.is_empty() {
        anyhow::bail!("the lock has no kernel");
    }
    let kernel = KernelFiles::find(&kernel_root)
        .with_context(|| format!("finding the kernel in {kernel_names}"))?;
    let kernel_release = kernel.release.clone();
    let vmlinuz = std::fs::read(&kernel.vmlinuz)
        .with_context(|| format!("reading {}", kernel.vmlinuz.display()))?;
    check_kernel_config(&kernel, &def.kernel.required_config, &progress)?;
    let fw_pkg = lock
        .with_role(Role::Firmware)
        .next()
        .ok_or_else(|| anyhow::anyhow!("the lock has no firmware"))?;
    let ovmf = std::fs::read(roots[&fw_pkg.name].join(def.firmware.path.trim_start_matches('/')))
        .with_context(|| {
        format!(
            "{} has no {} (firmware.path in worker.yaml)",
            fw_pkg.name, def.firmware.path
        )
    })?;

    // 5. Initrd.
    let mut tree = Tree::new();
    for (d, mode) in [
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
    ] {
        tree.dir(d, mode)?;
    }
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    tree.insert(
        "dev/console",
        Node::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    )?;
    tree.file("init", 0o755, agent.binary.clone())?;
    for (name, data) in &agent.cuda_files {
        tree.file(&format!("{CUDA_KERNELS_DIR}/{name}"), 0o644, data.clone())?;
    }
    let runtime_roots: Vec<&PathBuf> = lock
        .with_role(Role::Runtime)
        .map(|p| &roots[&p.name])
        .collect();
    add_runtime_libs(&mut tree, &agent.binary, &runtime_roots, &def.agent.target)?;
    let modules = add_modules(
        &mut tree,
        &kernel.mod_root,
        &kernel_release,
        &def.kernel.modules,
        &def.kernel.gpu_modules,
        &progress,
    )?;
    let release = worker_api::ImageRelease {
        name: def.name.clone(),
        version: def.version.clone(),
    };
    let mut release_json = serde_json::to_vec(&release)?;
    release_json.push(b'\n');
    tree.file(worker_api::IMAGE_RELEASE_PATH, 0o644, release_json)?;
    let cpio = tree.to_newc(
        u32::try_from(def.source_date_epoch).context("source_date_epoch does not fit newc")?,
    );
    progress.step(
        "initrd",
        format!(
            "cpio {} ({} entries); compressing with zstd -19",
            bytes(cpio.len() as u64),
            tree.entries().count()
        ),
    );
    let initrd = zstd::bulk::compress(&cpio, 19).context("zstd compression of the initrd")?;
    mark("initrd", &mut t, &progress);

    // 6. Outputs.
    let cmdline = def.kernel.cmdline.clone().into_bytes();
    let parts: [(&str, &str, &[u8]); 4] = [
        ("OVMF.fd", "firmware", &ovmf),
        ("cmdline", "cmdline", &cmdline),
        ("initrd", "initrd", &initrd),
        ("vmlinuz", "kernel", &vmlinuz),
    ];
    let boot_bytes: u64 = parts.iter().map(|p| p.2.len() as u64).sum();
    if boot_bytes > MAX_BOOT_BYTES {
        anyhow::bail!(
            "boot parts total {} > {}: trim kernel.modules or the agent",
            bytes(boot_bytes),
            bytes(MAX_BOOT_BYTES)
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut files = Vec::new();
    for (path, role, data) in parts {
        write_atomic(&opts.out.join(path), data)?;
        files.push(FileEntry {
            path: path.into(),
            role: role.into(),
            sha256: cache::sha256_bytes(data),
            size: data.len() as u64,
        });
    }
    let mut manifest = Manifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        image: ImageId {
            name: def.name.clone(),
            version: def.version.clone(),
        },
        files: files.clone(),
        launch: Launch {
            memory_mib: def.launch.memory_mib,
            cpus: def.launch.cpus,
            cmdline: def.kernel.cmdline.clone(),
            tdx: Some(def.tdx.clone()),
        },
        kernel_release: kernel_release.clone(),
        inputs: lock.packages.iter().map(Input::from).collect(),
        build: BuildInfo {
            source_date_epoch: def.source_date_epoch,
            rustc: rustc.version_line.clone(),
            rustc_commit: rustc.commit_hash.clone(),
            rust_toolchain: toolchain::pinned_channel(&opts.repo)?,
            agent_target: def.agent.target.clone(),
            lock_sha256: cache::sha256_bytes(&lock_bytes),
            build_root_cc: agent.cc.clone(),
        },
    };
    manifest.normalize();
    write_atomic(
        &opts.out.join("manifest.json"),
        manifest.to_text().as_bytes(),
    )?;
    write_measurements_json(&opts.out, &manifest, &progress)?;
    mark("write", &mut t, &progress);
    progress.step(
        "done",
        format!(
            "{} (boot parts {}, initrd {}, vmlinuz {}, OVMF.fd {})",
            opts.out.display(),
            bytes(boot_bytes),
            bytes(initrd.len() as u64),
            bytes(vmlinuz.len() as u64),
            bytes(ovmf.len() as u64)
        ),
    );
    Ok(BuildReport {
        out: opts.out.clone(),
        files: manifest.files,
        boot_bytes,
        kernel_release,
        modules,
        seconds: progress.elapsed(),
        step_seconds: steps,
    })
}

/// Writes `measurements.json` beside `manifest.json`: the registers and image hashes a TD will
/// report for the manifest's launch configuration, exactly what `measurements image --json`
/// prints for this directory. Registers whose inputs the image does not carry (RTMR0 needs the
/// launch's ACPI tables in `acpi/`) are listed under `missing` with the reason. Returns what it
/// wrote.
pub fn write_measurements_json(
    out: &Path,
    manifest: &Manifest,
    progress: &Progress,
) -> anyhow::Result<measurements::image::ImageMeasurements> {
    let path = out.join("measurements.json");
    let m = measurements::image::measure_image_dir(out, &measurements::image::Options::default())
        .with_context(|| {
        format!(
            "computing the measurements of {} {}",
            manifest.image.name, manifest.image.version
        )
    })?;
    let mut text = serde_json::to_string_pretty(&m)?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    let missing = if m.missing.is_empty() {
        String::new()
    } else {
        format!(
            " (not computable here: {})",
            m.missing.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    progress.step(
        "measurements",
        format!(
            "mrtd {}…, rtmr1 {}…, rtmr2 {}…{missing}",
            &m.mrtd.to_string()[..16],
            &m.rtmr1.to_string()[..16],
            &m.rtmr2.to_string()[..16]
        ),
    );
    Ok(m)
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Where the extracted kernel packages keep their files: `/usr/lib/modules/<release>/` (Debian
/// trixie and later: `vmlinuz`, `config`, `modules.builtin`, `kernel/`) or the older
/// `/lib/modules/<release>/` with `/boot/vmlinuz-<release>` and `/boot/config-<release>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KernelFiles {
    release: String,
    mod_root: PathBuf,
    vmlinuz: PathBuf,
    config: Option<PathBuf>,
}

impl KernelFiles {
    fn find(root: &Path) -> anyhow::Result<Self> {
        let modules = ["usr/lib/modules", "lib/modules"]
            .into_iter()
            .map(|d| root.join(d))
            .find(|d| d.is_dir())
            .ok_or_else(|| anyhow::anyhow!("no usr/lib/modules or lib/modules directory"))?;
        let release = single_subdir(&modules)?;
        let mod_root = modules.join(&release);
        let first = |cands: [PathBuf; 2]| cands.into_iter().find(|p| p.is_file());
        let vmlinuz = first([
            mod_root.join("vmlinuz"),
            root.join(format!("boot/vmlinuz-{release}")),
        ])
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no vmlinuz for kernel {release} (looked for {}/vmlinuz and boot/vmlinuz-{release})",
                mod_root.display()
            )
        })?;
        let config = first([
            mod_root.join("config"),
            root.join(format!("boot/config-{release}")),
        ]);
        Ok(KernelFiles {
            release,
            mod_root,
            vmlinuz,
            config,
        })
    }
}

/// Fail unless the kernel's `config` has every `kernel.required_config` option of worker.yaml.
fn check_kernel_config(
    kernel: &KernelFiles,
    required: &[String],
    progress: &Progress,
) -> anyhow::Result<()> {
    if required.is_empty() {
        return Ok(());
    }
    let path = kernel.config.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "kernel {} ships no config file, so kernel.required_config in image/worker.yaml cannot be checked",
            kernel.release
        )
    })?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    kconfig::check(&kconfig::parse(&text), required).map_err(|missing| {
        anyhow::anyhow!(
            "kernel {} lacks options image/worker.yaml requires (kernel.required_config): {missing}. \
             Lock a kernel that has them (a newer suite in worker.yaml, then `cargo xtask image lock`)",
            kernel.release
        )
    })?;
    progress.step(
        "kernel",
        format!(
            "{}: {} required config options present",
            kernel.release,
            required.len()
        ),
    );
    Ok(())
}

fn single_subdir(dir: &Path) -> anyhow::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.len() {
        1 => Ok(names.remove(0)),
        n => anyhow::bail!(
            "expected one directory in {}, found {n}: {names:?}",
            dir.display()
        ),
    }
}

/// The built agent.
struct Agent {
    binary: Vec<u8>,
    /// `cc --version` (first line) of the build root.
    cc: String,
    /// The ahead-of-time CUDA kernels (`kernels.json`, `sm_<arch>.cubin`), sorted by name.
    cuda_files: Vec<(String, Vec<u8>)>,
}

/// Where the initrd carries the ahead-of-time CUDA kernels (inference's
/// `cuda::prebuilt::DEFAULT_DIR`, without the leading `/`).
pub const CUDA_KERNELS_DIR: &str = "usr/lib/worker/cuda";

/// What `cuda` in worker.yaml asks the agent build for.
struct CudaRequest {
    archs: Vec<i32>,
    /// Where NVRTC's packages are extracted.
    nvrtc_root: PathBuf,
    /// Host directory `cuda-aot` writes into.
    out: PathBuf,
}

pub(crate) fn cargo_home() -> anyhow::Result<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or_else(|| anyhow::anyhow!("neither CARGO_HOME nor HOME is set"))
}

/// `--remap-path-prefix` flags that give every crate source one fixed name whatever the
/// registry's directory is called on this host (`index.crates.io-<hash>` or a mirror's).
fn registry_remaps(cargo_home: &Path) -> Vec<String> {
    let mut flags = vec![format!(
        "--remap-path-prefix={}=/cargo",
        buildroot::CARGO_HOME
    )];
    for (sub, fixed) in [
        ("registry/src", "/cargo/registry/src/crates"),
        ("git/checkouts", "/cargo/git/checkouts/git"),
    ] {
        let Ok(rd) = std::fs::read_dir(cargo_home.join(sub)) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            flags.push(format!(
                "--remap-path-prefix={}/{sub}/{n}={fixed}",
                buildroot::CARGO_HOME
            ));
        }
    }
    flags
}

/// Build the guest agent inside the build root (see `buildroot`) into its own target directory.
fn build_agent(
    opts: &BuildOptions,
    def: &ImageDefinition,
    root: &BuildRoot,
    rustc: &toolchain::Rustc,
    rust_sysroot: &Path,
    cuda: Option<&CudaRequest>,
    progress: &Progress,
) -> anyhow::Result<Agent> {
    std::fs::create_dir_all(&opts.agent_target_dir)?;
    let target_dir = opts.agent_target_dir.canonicalize()?;
    let repo = opts.repo.canonicalize()?;
    let home = cargo_home()?;
    std::fs::create_dir_all(&home)?;
    // Crate sources come in outside the root (the network and the host's cargo configuration
    // live here); Cargo.lock's checksums pin them. Inside, cargo runs --frozen.
    progress.step("agent", "cargo fetch --locked (crate sources)");
    let st = Command::new(rust_sysroot.join("bin/cargo"))
        .current_dir(&repo)
        .args(["fetch", "--locked", "--quiet"])
        .env("RUSTC", rust_sysroot.join("bin/rustc"))
        .status()
        .context("running cargo fetch")?;
    if !st.success() {
        anyhow::bail!(
            "cargo fetch --locked failed: the crate registry (or the machine's cargo mirror) is unreachable, \
             or Cargo.lock is out of date; fix that and re-run"
        );
    }
    let binds = [
        Bind {
            src: rust_sysroot.to_path_buf(),
            dst: buildroot::RUST.into(),
        },
        Bind {
            src: repo.clone(),
            dst: buildroot::SRC.into(),
        },
        Bind {
            src: target_dir.clone(),
            dst: buildroot::TARGET.into(),
        },
        Bind {
            src: home.clone(),
            dst: buildroot::CARGO_HOME.into(),
        },
        Bind {
            src: "/proc".into(),
            dst: "/proc".into(),
        },
        Bind {
            src: "/dev".into(),
            dst: "/dev".into(),
        },
    ];
    let cc = &root.spec.cc;
    let env_of = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PATH", format!("{}/bin:/usr/bin:/bin", buildroot::RUST)),
            ("HOME", buildroot::HOME.into()),
            ("TMPDIR", "/tmp".into()),
            ("LC_ALL", "C".into()),
            ("TZ", "UTC".into()),
            ("SOURCE_DATE_EPOCH", def.source_date_epoch.to_string()),
        ];
        env.extend(extra.iter().cloned());
        // Cargo's own diagnostics pass through (they do not change what is built).
        if let Ok(v) = std::env::var("CARGO_LOG") {
            env.push(("CARGO_LOG", v));
        }
        env
    };
    let cc_version = {
        let mut c = root
            .command(
                &format!("/usr/bin/{cc}"),
                &binds,
                &env_of(&[]),
                buildroot::SRC,
            )
            .context("preparing the build root")?;
        let out = c.arg("--version").output().map_err(|e| {
            anyhow::anyhow!(
                "running {cc} in the build root failed: {e}; {}",
                buildroot::namespace_hint()
            )
        })?;
        if !out.status.success() {
            anyhow::bail!(
                "{cc} --version failed in the build root: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    progress.step("agent", format!("build root compiler: {cc_version}"));
    let mut flags = registry_remaps(&home);
    flags.push(format!("--remap-path-prefix={}=/build/src", buildroot::SRC));
    flags.extend(["-C".into(), "link-arg=-Wl,--build-id=none".into()]);
    let target_env = def.agent.target.to_uppercase().replace('-', "_");
    let env = env_of(&[
        ("CARGO_HOME", buildroot::CARGO_HOME.into()),
        ("CARGO_TARGET_DIR", buildroot::TARGET.into()),
        ("RUSTC", format!("{}/bin/rustc", buildroot::RUST)),
        ("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}")),
        ("CC", cc.clone()),
        ("AR", root.spec.ar.clone()),
        ("CARGO_TERM_COLOR", "never".into()),
    ]);
    let linker_key = format!("CARGO_TARGET_{target_env}_LINKER");
    progress.step(
        "agent",
        format!(
            "cargo build --release --frozen -p {} --target {} ({}) in the build root",
            def.agent.package, def.agent.target, rustc.version_line
        ),
    );
    // Cargo in the build root with the root's linker driver (the agent, then cuda-aot).
    let root_cargo = || -> anyhow::Result<Command> {
        let mut cmd = root
            .command(
                &format!("{}/bin/cargo", buildroot::RUST),
                &binds,
                &env,
                buildroot::SRC,
            )
            .context("preparing the build root")?;
        cmd.env(&linker_key, cc);
        Ok(cmd)
    };
    let mut cmd = root_cargo()?;
    cmd.args([
        "build",
        "--release",
        "--frozen",
        "--message-format=json-render-diagnostics",
        "-p",
    ])
    .arg(&def.agent.package)
    .arg("--target")
    .arg(&def.agent.target);
    if !def.agent.features.is_empty() {
        cmd.arg("--features").arg(def.agent.features.join(","));
    }
    cmd.stdout(Stdio::piped()).stderr(if opts.quiet {
        Stdio::piped()
    } else {
        Stdio::inherit()
    });
    let out = cmd.output().map_err(|e| {
        anyhow::anyhow!(
            "starting cargo in the build root failed: {e}; {}",
            buildroot::namespace_hint()
        )
    })?;
    if !out.status.success() {
        anyhow::bail!(
            "building {} failed (see the compiler output above{}); fix the agent and re-run",
            def.agent.package,
            if opts.quiet {
                format!(":\n{}", String::from_utf8_lossy(&out.stderr))
            } else {
                String::new()
            }
        );
    }
    let mut exe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
            && let Some(e) = v["executable"].as_str()
        {
            exe = Some(PathBuf::from(e));
        }
    }
    let exe =
        exe.ok_or_else(|| anyhow::anyhow!("cargo built no executable for {}", def.agent.package))?;
    // The path cargo reports is inside the root.
    let host_exe = exe
        .strip_prefix(buildroot::TARGET)
        .map(|rel| target_dir.join(rel))
        .map_err(|_| {
            anyhow::anyhow!(
                "cargo reported {} outside {}",
                exe.display(),
                buildroot::TARGET
            )
        })?;
    let binary =
        std::fs::read(&host_exe).with_context(|| format!("reading {}", host_exe.display()))?;
    progress.step(
        "agent",
        format!("{} ({})", host_exe.display(), bytes(binary.len() as u64)),
    );
    let cuda_files = match cuda {
        None => Vec::new(),
        Some(req) => {
            // The same cargo, flags and target directory: only the tool's own crate is new.
            progress.step(
                "cuda",
                "cargo build --release --frozen -p inference --bin cuda-aot in the build root",
            );
            let mut cmd = root_cargo()?;
            cmd.args([
                "build",
                "--release",
                "--frozen",
                "-p",
                "inference",
                "--bin",
                "cuda-aot",
                "--target",
            ])
            .arg(&def.agent.target);
            run_in_root(cmd, opts.quiet, "building cuda-aot")?;
            compile_cuda_kernels(
                root,
                &binds,
                &env,
                &def.agent.target,
                req,
                opts.quiet,
                progress,
            )?
        }
    };
    Ok(Agent {
        binary,
        cc: cc_version,
        cuda_files,
    })
}

/// Runs a prepared build-root command; on failure says what failed (with its output when quiet).
fn run_in_root(mut cmd: Command, quiet: bool, what: &str) -> anyhow::Result<()> {
    cmd.stdout(if quiet {
        Stdio::piped()
    } else {
        Stdio::inherit()
    })
    .stderr(if quiet {
        Stdio::piped()
    } else {
        Stdio::inherit()
    });
    let out = cmd.output().map_err(|e| {
        anyhow::anyhow!(
            "{what}: starting the command in the build root failed: {e}; {}",
            buildroot::namespace_hint()
        )
    })?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed in the build root{}",
            if quiet {
                format!(
                    ":\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            } else {
                " (see the output above)".to_string()
            }
        );
    }
    Ok(())
}

/// Inside-root paths of the NVRTC library directory and of `cuda-aot`'s output.
const NVRTC_IN_ROOT: &str = "/build/nvrtc";
const CUDA_OUT_IN_ROOT: &str = "/build/cuda-out";

/// Runs `cuda-aot` in the build root with the lock's NVRTC: one CUBIN per architecture plus
/// `kernels.json`. Returns the files (name, bytes), sorted by name.
fn compile_cuda_kernels(
    root: &BuildRoot,
    binds: &[Bind],
    env: &[(&'static str, String)],
    target: &str,
    req: &CudaRequest,
    quiet: bool,
    progress: &Progress,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let ma = multiarch(target)?;
    let lib_dir = req.nvrtc_root.join("usr/lib").join(ma);
    if !lib_dir.is_dir() {
        anyhow::bail!(
            "the cuda-compiler packages of the lock have no {}: lock libnvrtc12 (and its builtins) for `cuda`",
            Path::new("usr/lib").join(ma).display()
        );
    }
    std::fs::create_dir_all(&req.out)?;
    let mut binds = binds.to_vec();
    binds.push(Bind {
        src: lib_dir,
        dst: NVRTC_IN_ROOT.into(),
    });
    binds.push(Bind {
        src: req.out.clone(),
        dst: CUDA_OUT_IN_ROOT.into(),
    });
    let mut env = env.to_vec();
    env.push(("LD_LIBRARY_PATH", NVRTC_IN_ROOT.into()));
    let exe = format!("{}/{target}/release/cuda-aot", buildroot::TARGET);
    let mut cmd = root
        .command(&exe, &binds, &env, buildroot::SRC)
        .context("preparing the build root")?;
    for a in &req.archs {
        cmd.arg("--arch").arg(a.to_string());
    }
    cmd.arg("--out").arg(CUDA_OUT_IN_ROOT);
    progress.step(
        "cuda",
        format!(
            "NVRTC (from the lock) compiles the kernels for {}",
            req.archs
                .iter()
                .map(|a| format!("sm_{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    // NVRTC's warnings are part of the build log; quiet builds keep them for the error only.
    run_in_root(cmd, quiet, "compiling the CUDA kernels (cuda-aot)")?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&req.out)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        files.push((name, std::fs::read(entry.path())?));
    }
    files.sort();
    let expected = req.archs.len() + 1;
    if files.len() != expected {
        anyhow::bail!(
            "cuda-aot wrote {} files, expected {expected} (kernels.json and one CUBIN per architecture)",
            files.len()
        );
    }
    for (name, data) in &files {
        progress.step(
            "cuda",
            format!("{CUDA_KERNELS_DIR}/{name} ({})", bytes(data.len() as u64)),
        );
    }
    Ok(files)
}

/// Debian multiarch directory of a Rust target triple.
fn multiarch(target: &str) -> anyhow::Result<&'static str> {
    match target {
        "x86_64-unknown-linux-gnu" => Ok("x86_64-linux-gnu"),
        t => anyhow::bail!(
            "agent.target {t} is not supported by the image pipeline (use x86_64-unknown-linux-gnu)"
        ),
    }
}

/// Resolve a path inside an extracted package root, following symlinks within the root.
fn resolve_in_root(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut p = root.join(rel);
    for _ in 0..16 {
        let meta = std::fs::symlink_metadata(&p).ok()?;
        if !meta.file_type().is_symlink() {
            return meta.is_file().then_some(p);
        }
        let target = std::fs::read_link(&p).ok()?;
        p = if target.is_absolute() {
            root.join(target.strip_prefix("/").ok()?)
        } else {
            p.parent()?.join(target)
        };
    }
    None
}

/// Put the shared libraries the agent needs (transitively) into the tree, taken from the
/// locked runtime packages, plus the program interpreter at its expected path.
fn add_runtime_libs(
    tree: &mut Tree,
    agent: &[u8],
    roots: &[&PathBuf],
    target: &str,
) -> anyhow::Result<()> {
    let ma = multiarch(target)?;
    let elf = Elf::parse(agent).context("reading the agent binary")?;
    let lib_dirs = [
        format!("lib/{ma}"),
        format!("usr/lib/{ma}"),
        "lib64".to_string(),
        "lib".to_string(),
    ];
    let find = |name: &str| -> Option<(PathBuf, bool)> {
        roots.iter().find_map(|r| {
            lib_dirs.iter().find_map(|d| {
                resolve_in_root(r, &Path::new(d).join(name)).map(|p| {
                    let exec = std::fs::metadata(&p)
                        .map(|m| m.permissions().mode() & 0o111 != 0)
                        .unwrap_or(false);
                    (p, exec)
                })
            })
        })
    };
    let mut todo: Vec<String> = elf.needed()?;
    let interp = elf.interpreter()?;
    if let Some(i) = &interp {
        let base = i.rsplit('/').next().unwrap_or(i).to_string();
        todo.push(base.clone());
        let in_dir = format!("/lib/{ma}/{base}");
        if *i != in_dir {
            tree.symlink(i, &in_dir)?;
        }
    }
    let mut done = BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !done.insert(name.clone()) {
            continue;
        }
        let (path, exec) = find(&name).ok_or_else(|| {
            anyhow::anyhow!(
                "the agent needs {name}, which no package with role runtime in image/worker.yaml provides: add the \
                 Debian package that ships it and run `cargo xtask image lock`"
            )
        })?;
        let data = std::fs::read(&path)?;
        let lib = Elf::parse(&data).with_context(|| format!("reading {name}"))?;
        todo.extend(lib.needed()?);
        tree.file(
            &format!("lib/{ma}/{name}"),
            if exec { 0o755 } else { 0o644 },
            data,
        )?;
    }
    Ok(())
}

/// Add the selected kernel modules and `/etc/worker-image/modules.list`, and the GPU modules
/// (`kernel.gpu_modules` with the dependencies the first list does not already load) and
/// `/etc/worker-image/gpu-modules.list`, which the agent loads only when an NVIDIA device is
/// present (no GPU modules: no such file, so images without them keep their bytes). Returns the
/// load order of the first list.
fn add_modules(
    tree: &mut Tree,
    mod_root: &Path,
    release: &str,
    requested: &[String],
    gpu_requested: &[String],
    progress: &Progress,
) -> anyhow::Result<Vec<String>> {
    let mut available = BTreeMap::new();
    let mut stack = vec![mod_root.join("kernel")];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for p in files {
        let rel = p.strip_prefix(mod_root)?.to_string_lossy().into_owned();
        if let Some(name) = kmod::name_of_path(&rel) {
            available.entry(name).or_insert(rel);
        }
    }
    let builtin = kmod::parse_builtin(
        &std::fs::read_to_string(mod_root.join("modules.builtin")).unwrap_or_default(),
    );
    let mut raw = BTreeMap::new();
    let sel = kmod::load_order(requested, &available, &builtin, |name| {
        let rel = &available[name];
        let path = mod_root.join(rel);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let elf = kmod::decompress(&path, &data)?;
        let deps = kmod::depends(&elf).with_context(|| format!("reading .modinfo of {rel}"))?;
        raw.insert(name.to_string(), data);
        Ok(deps)
    })?;
    if !sel.builtin.is_empty() {
        progress.step(
            "modules",
            format!(
                "built into the kernel, nothing to load: {}",
                sel.builtin.join(", ")
            ),
        );
    }
    let mut list = String::new();
    for name in &sel.load_order {
        let path = format!("/lib/modules/{release}/{}", available[name]);
        let data = raw
            .remove(name)
            .ok_or_else(|| anyhow::anyhow!("module {name} was not read"))?;
        tree.file(&path, 0o644, data)?;
        list.push_str(&path);
        list.push('\n');
    }
    tree.file("etc/worker-image/modules.list", 0o644, list.into_bytes())?;
    if !gpu_requested.is_empty() {
        // What the first list loads counts as present: only the rest goes into the GPU list.
        let mut present = builtin.clone();
        present.extend(sel.load_order.iter().cloned());
        let gpu = kmod::load_order(gpu_requested, &available, &present, |name| {
            let rel = &available[name];
            let path = mod_root.join(rel);
            let data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let elf = kmod::decompress(&path, &data)?;
            let deps = kmod::depends(&elf).with_context(|| format!("reading .modinfo of {rel}"))?;
            raw.insert(name.to_string(), data);
            Ok(deps)
        })
        .context("kernel.gpu_modules")?;
        let mut gpu_list = String::new();
        for name in &gpu.load_order {
            let path = format!("/lib/modules/{release}/{}", available[name]);
            let data = raw
                .remove(name)
                .ok_or_else(|| anyhow::anyhow!("module {name} was not read"))?;
            tree.file(&path, 0o644, data)?;
            gpu_list.push_str(&path);
            gpu_list.push('\n');
        }
        tree.file(
            "etc/worker-image/gpu-modules.list",
            0o644,
            gpu_list.into_bytes(),
        )?;
        progress.step(
            "modules",
            format!(
                "{} GPU modules (loaded only with an NVIDIA device): {}",
                gpu.load_order.len(),
                gpu.load_order.join(" ")
            ),
        );
    }
    progress.step(
        "modules",
        format!(
            "{} modules: {}",
            sel.load_order.len(),
            sel.load_order.join(" ")
        ),
    );
    Ok(sel.load_order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_split_and_classic_kernel_layouts() {
        let d = tempfile::tempdir().expect("tmp");
        let m = d.path().join("usr/lib/modules/7.3.4+deb13-amd64");
        std::fs::create_dir_all(m.join("kernel")).expect("mkdir");
        std::fs::write(m.join("vmlinuz"), b"MZ").expect("write");
        std::fs::write(m.join("config"), b"CONFIG_TSM_MEASUREMENTS=y\n").expect("write");
        let k = KernelFiles::find(d.path()).expect("split layout");
        assert_eq!(k.release, "7.3.4+deb13-amd64");
        assert_eq!(k.vmlinuz, m.join("vmlinuz"));
        assert_eq!(k.config.as_deref(), Some(m.join("config").as_path()));
        let quiet = Progress::new(true);
        check_kernel_config(&k, &["CONFIG_TSM_MEASUREMENTS=y".into()], &quiet).expect("met");
        let err = check_kernel_config(&k, &["CONFIG_INTEL_TDX_GUEST=y".into()], &quiet)
            .expect_err("unmet")
            .to_string();
        assert!(
            err.contains("CONFIG_INTEL_TDX_GUEST=y") && err.contains("7.3.4+deb13-amd64"),
            "{err}"
        );

        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("lib/modules/6.12.95+deb12-amd64")).expect("mkdir");
        std::fs::create_dir_all(d.path().join("boot")).expect("mkdir");
        std::fs::write(d.path().join("boot/vmlinuz-6.12.95+deb12-amd64"), b"MZ").expect("write");
        let k = KernelFiles::find(d.path()).expect("classic layout");
        assert_eq!(k.release, "6.12.95+deb12-amd64");
        assert!(k.config.is_none());
        let err = check_kernel_config(&k, &["CONFIG_X".into()], &quiet)
            .expect_err("no config")
            .to_string();
        assert!(err.contains("no config"), "{err}");
        check_kernel_config(&k, &[], &quiet).expect("nothing required");
        assert!(KernelFiles::find(&d.path().join("boot")).is_err());
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let d = tempfile::tempdir().expect("tmp");
        let lib = d.path().join("lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&lib).expect("mkdir");
        std::fs::create_dir_all(d.path().join("lib64")).expect("mkdir");
        std::fs::write(lib.join("ld-linux-x86-64.so.2"), b"ld").expect("write");
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            d.path().join("lib64/ld-linux-x86-64.so.2"),
        )
        .expect("symlink");
        std::os::unix::fs::symlink("ld-linux-x86-64.so.2", lib.join("ld.so")).expect("symlink");
        assert_eq!(
            resolve_in_root(d.path(), Path::new("lib64/ld-linux-x86-64.so.2")),
            Some(lib.join("ld-linux-x86-64.so.2"))
        );
        assert_eq!(
            resolve_in_root(d.path(), Path::new("lib/x86_64-linux-gnu/ld.so")),
            Some(lib.join("ld-linux-x86-64.so.2"))
        );
        assert_eq!(resolve_in_root(d.path(), Path::new("lib/nothing")), None);
    }

    #[test]
    fn runtime_libs_come_from_the_package_roots_transitively() {
        use crate::image::elf::tests::build_elf;
        let d = tempfile::tempdir().expect("tmp");
        let lib = d.path().join("lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&lib).expect("mkdir");
        std::fs::write(
            lib.join("libc.so.6"),
            build_elf(&[], &["ld-linux-x86-64.so.2"]),
        )
        .expect("libc");
        std::fs::write(lib.join("ld-linux-x86-64.so.2"), build_elf(&[], &[])).expect("ld");
        let agent = build_elf(
            &[(".interp", b"/lib64/ld-linux-x86-64.so.2\0")],
            &["libc.so.6"],
        );
        let mut tree = Tree::new();
        let root = d.path().to_path_buf();
        add_runtime_libs(&mut tree, &agent, &[&root], "x86_64-unknown-linux-gnu").expect("libs");
        let names: Vec<&String> = tree.entries().map(|(p, _)| p).collect();
        assert_eq!(
            names,
            [
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib64",
                "lib64/ld-linux-x86-64.so.2"
            ]
        );
        let missing = build_elf(&[], &["libcuda.so.1"]);
        let err = add_runtime_libs(
            &mut Tree::new(),
            &missing,
            &[&root],
            "x86_64-unknown-linux-gnu",
        )
        .expect_err("missing")
        .to_string();
        assert!(
            err.contains("libcuda.so.1") && err.contains("cargo xtask image lock"),
            "{err}"
        );
    }
}
