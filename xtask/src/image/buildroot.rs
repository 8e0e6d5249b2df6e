//! The hermetic build root: a directory made only of the lock's `build` packages (compiler,
//! binutils, libc6-dev and their dependency closure), in which the agent is compiled and linked.
//!
//! The command runs in a private mount namespace (a user namespace too when not root) chrooted
//! into that directory, with only these bind mounts, all at fixed paths:
//!
//! | inside | what |
//! | --- | --- |
//! | `/build/rust` | the Rust toolchain pinned by `rust-toolchain.toml` (read from the host) |
//! | `/build/src` | the repository |
//! | `/build/target` | the agent's cargo target directory |
//! | `/build/cargo` | `CARGO_HOME` (crate sources already fetched and checksummed by Cargo.lock) |
//! | `/proc`, `/dev` | the host's, for the processes themselves |
//!
//! So the compiler, assembler, linker driver, C start files, libc and every path the compiler
//! sees are the same on every build host, whatever its distribution or checkout directory: the
//! host contributes only the pinned Rust toolchain (and its kernel).

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use super::definition::{BuildRootSpec, Role};
use super::lock::{Lock, LockedPackage};
use crate::progress::Progress;

/// Inside-root paths of the bind mounts.
pub const RUST: &str = "/build/rust";
pub const SRC: &str = "/build/src";
pub const TARGET: &str = "/build/target";
pub const CARGO_HOME: &str = "/build/cargo";
pub const HOME: &str = "/build/home";

/// An assembled build root.
#[derive(Debug, Clone)]
pub struct BuildRoot {
    pub path: PathBuf,
    pub spec: BuildRootSpec,
}

/// One bind mount: host `src` appears at `dst` (absolute, inside the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: String,
}

/// The build root's libc6 must be the runtime's: the agent links against one glibc and runs on
/// the other.
pub fn check_libc_matches(lock: &Lock) -> anyhow::Result<()> {
    let find =
        |role: Role| -> Option<&LockedPackage> { lock.with_role(role).find(|p| p.name == "libc6") };
    match (find(Role::Build), find(Role::Runtime)) {
        (Some(b), Some(r)) if b.version != r.version => anyhow::bail!(
            "the build root's libc6 is {} ({}) but the image's runtime libc6 is {} ({}): the agent would link \
             against one glibc and run on another. Put build_root.suite and the runtime libc6 in the same \
             suite in image/worker.yaml and run `cargo xtask image lock`",
            b.version,
            b.suite,
            r.version,
            r.suite
        ),
        (None, _) => anyhow::bail!(
            "the lock's build root has no libc6: add libc6-dev to build_root.packages in image/worker.yaml \
             and run `cargo xtask image lock`"
        ),
        _ => Ok(()),
    }
}

/// Extract the build packages (`(package, verified .deb)`) into `dir` and prepare the mount
/// points. Every package is extracted with `dpkg-deb -x` (no maintainer scripts run).
pub fn assemble(
    dir: &Path,
    spec: &BuildRootSpec,
    debs: &[(&LockedPackage, &Path)],
    progress: &Progress,
) -> anyhow::Result<BuildRoot> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let total: u64 = debs.iter().map(|(p, _)| p.size).sum();
    progress.step(
        "build-root",
        format!(
            "extracting {} locked packages ({}) into {}",
            debs.len(),
            crate::progress::bytes(total),
            dir.display()
        ),
    );
    for (pkg, deb) in debs {
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(dir)
            .status()
            .context("running dpkg-deb -x")?;
        if !status.success() {
            anyhow::bail!(
                "dpkg-deb -x {} failed (build-root input {} {})",
                deb.display(),
                pkg.name,
                pkg.version
            );
        }
    }
    for d in [RUST, SRC, TARGET, CARGO_HOME, HOME, "/proc", "/dev", "/tmp"] {
        let p = dir.join(d.trim_start_matches('/'));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let root = BuildRoot {
        path: dir.to_path_buf(),
        spec: spec.clone(),
    };
    for tool in [&spec.cc, &spec.ar] {
        if !root.path.join("usr/bin").join(tool).exists() {
            anyhow::bail!(
                "the build root has no /usr/bin/{tool} (build_root.cc / build_root.ar in image/worker.yaml): \
                 add the package that ships it to build_root.packages and run `cargo xtask image lock`"
            );
        }
    }
    Ok(root)
}

impl BuildRoot {
    /// A command that runs `program` (a path inside the root) chrooted into the root with the
    /// given bind mounts, a clean environment (`env` only) and `cwd` (inside the root).
    pub fn command(
        &self,
        program: &str,
        binds: &[Bind],
        env: &[(&str, String)],
        cwd: &str,
    ) -> anyhow::Result<Command> {
        chroot_command(&self.path, program, binds, env, cwd)
    }
}

/// A command that runs `program` (a path inside `root`) in a private mount namespace (and a
/// user namespace when not root) chrooted into `root`, with the bind mounts, a clean
/// environment (`env` only) and `cwd` (inside the root). Mount points are created as needed.
pub fn chroot_command(
    root: &Path,
    program: &str,
    binds: &[Bind],
    env: &[(&str, String)],
    cwd: &str,
) -> anyhow::Result<Command> {
    let plan = Plan::new(root, binds, cwd)?;
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: the closure runs in the forked child before exec; it only makes raw system
    // calls (unshare, open/write/close, mount, chroot, chdir) on data prepared before the
    // fork (no allocation, no locks), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || plan.enter());
    }
    Ok(cmd)
}

/// Everything the child needs, as C strings made before the fork.
struct Plan {
    root: CString,
    /// (source on the host, mount point on the host = root + dst)
    binds: Vec<(CString, CString)>,
    cwd: CString,
    /// Not root: enter a user namespace mapping our uid/gid to 0 first.
    user_ns: Option<(Vec<u8>, Vec<u8>)>,
}

fn cstr(p: &OsStr) -> anyhow::Result<CString> {
    CString::new(p.as_bytes()).with_context(|| format!("path {p:?} contains a NUL byte"))
}

impl Plan {
    fn new(root: &Path, binds: &[Bind], cwd: &str) -> anyhow::Result<Plan> {
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving {}", root.display()))?;
        let mut b = Vec::new();
        for bind in binds {
            let src = bind
                .src
                .canonicalize()
                .with_context(|| format!("bind mount source {}", bind.src.display()))?;
            let dst = root.join(bind.dst.trim_start_matches('/'));
            if !dst.exists() {
                if src.is_dir() {
                    std::fs::create_dir_all(&dst)
                } else {
                    std::fs::write(&dst, b"")
                }
                .with_context(|| format!("creating mount point {}", dst.display()))?;
            }
            b.push((cstr(src.as_os_str())?, cstr(dst.as_os_str())?));
        }
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let user_ns = (uid != 0).then(|| {
            (
                format!("0 {uid} 1").into_bytes(),
                format!("0 {gid} 1").into_bytes(),
            )
        });
        Ok(Plan {
            root: cstr(root.as_os_str())?,
            binds: b,
            cwd: CString::new(cwd).context("cwd contains a NUL byte")?,
            user_ns,
        })
    }

    /// Runs in the child between fork and exec.
    fn enter(&self) -> std::io::Result<()> {
        fn check(r: libc::c_int) -> std::io::Result<()> {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        fn write_file(path: &[u8], data: &[u8]) -> std::io::Result<()> {
            // SAFETY: `path` is NUL-terminated (a literal below); the fd is closed on every path.
            unsafe {
                let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, data.as_ptr().cast(), data.len());
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n < 0 || n as usize != data.len() {
                    return Err(err);
                }
            }
            Ok(())
        }
        // SAFETY: raw system calls on NUL-terminated strings owned by `self`, which outlives the
        // calls; none of them touches memory of the parent process.
        unsafe {
            if let Some((uid_map, gid_map)) = &self.user_ns {
                check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
                write_file(b"/proc/self/setgroups\0", b"deny")?;
                write_file(b"/proc/self/uid_map\0", uid_map)?;
                write_file(b"/proc/self/gid_map\0", gid_map)?;
            } else {
                check(libc::unshare(libc::CLONE_NEWNS))?;
            }
            // Nothing we mount leaks back to the host's mount table.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // The root becomes a mount point of its own, so that a namespace made inside it
            // (a build root inside a cross-host root) can mark "/" private in turn.
            check(libc::mount(
                self.root.as_ptr(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            for (src, dst) in &self.binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
            }
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(self.cwd.as_ptr()))?;
        }
        Ok(())
    }
}

/// What to tell a user whose system refused the namespace.
pub fn namespace_hint() -> &'static str {
    "the agent is built in a private mount namespace chrooted into the build root: run the build as \
     root, or allow unprivileged user namespaces (Debian: sysctl kernel.unprivileged_userns_clone=1; \
     Ubuntu 24.04: sysctl kernel.apparmor_restrict_unprivileged_userns=0)"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str, role: Role) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            suite: "bookworm".into(),
            role,
            requested: name.into(),
            sha256: "ab".repeat(32),
            size: 1,
            filename: "pool/x.deb".into(),
        }
    }

    #[test]
    fn the_build_roots_libc_must_be_the_runtimes() {
        let ok = Lock::new(
            "w",
            vec![
                pkg("libc6", "2.36-9", Role::Build),
                pkg("libc6", "2.36-9", Role::Runtime),
            ],
        );
        check_libc_matches(&ok).expect("same glibc");
        let skew = Lock::new(
            "w",
            vec![
                pkg("libc6", "2.41-12", Role::Build),
                pkg("libc6", "2.36-9", Role::Runtime),
            ],
        );
        let err = check_libc_matches(&skew).expect_err("skew").to_string();
        assert!(err.contains("2.41-12") && err.contains("2.36-9"), "{err}");
        assert!(err.contains("cargo xtask image lock"), "{err}");
        let none = Lock::new("w", vec![pkg("libc6", "2.36-9", Role::Runtime)]);
        assert!(check_libc_matches(&none).is_err());
    }

    /// A real namespace + chroot. The root is empty but for bind mounts of the host's /bin,
    /// /usr and /lib* (so a shell can run) and a data directory at /build/src: the command must
    /// see the data at its fixed path, not the host's /etc, and nothing may stay mounted.
    #[test]
    fn a_command_sees_only_the_root_and_its_binds() {
        let root = tempfile::tempdir().expect("tmp");
        let data = tempfile::tempdir().expect("tmp");
        std::fs::write(data.path().join("marker"), b"hello from the host\n").expect("w");
        let mut binds = vec![Bind {
            src: data.path().to_path_buf(),
            dst: "/build/src".into(),
        }];
        // The host's shell and its libraries, so that something can run inside.
        for d in ["/bin", "/usr", "/lib", "/lib64"] {
            if Path::new(d).exists() {
                binds.push(Bind {
                    src: d.into(),
                    dst: d.into(),
                });
            }
        }
        let br = BuildRoot {
            path: root.path().to_path_buf(),
            spec: BuildRootSpec {
                suite: "x".into(),
                packages: vec![],
                cc: "cc".into(),
                ar: "ar".into(),
            },
        };
        let mut cmd = br
            .command(
                "/bin/sh",
                &binds,
                &[("PATH", "/usr/bin:/bin".into())],
                "/build/src",
            )
            .expect("plan");
        cmd.args(["-c", "cat marker; pwd; ls /etc 2>&1 || true"]);
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                // Some sandboxes forbid namespaces for everyone; the build then fails with
                // namespace_hint(). Say so visibly rather than pass silently; CI must run it.
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI cannot create a mount namespace: {e}"
                );
                eprintln!(
                    "SKIPPED: cannot create a mount namespace here ({e}): {}",
                    namespace_hint()
                );
                return;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.starts_with("hello from the host\n/build/src\n"),
            "{text}"
        );
        // The host's /etc is not visible inside the root.
        assert!(text.contains("No such file"), "{text}");
        // And nothing stayed mounted on the host side.
        assert!(
            std::fs::read_dir(root.path().join("build/src"))
                .expect("dir")
                .next()
                .is_none(),
            "the bind mount leaked to the host"
        );
    }
}
