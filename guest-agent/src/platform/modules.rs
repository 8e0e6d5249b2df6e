//! Kernel module loading from `/etc/worker-image/modules.list`.
//!
//! The image pipeline writes one absolute module path per line, already in dependency order, and
//! the modules stay compressed (`.ko.xz`): the agent hands each file to `finit_module(2)` with
//! `MODULE_INIT_COMPRESSED_FILE` and the kernel decompresses it. A module that fails is logged
//! with its errno and the agent goes on: one missing driver must not stop the boot. `EEXIST`
//! (already loaded) is success, and `tdx-guest` answering `ENODEV` is expected outside a real TD.

use std::ffi::CStr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::PlatformError;

/// `MODULE_INIT_COMPRESSED_FILE` from `<linux/module.h>` (not in the `libc` crate): the kernel
/// decompresses the module itself (Linux 6.4+ with `CONFIG_MODULE_DECOMPRESS`).
pub const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// The module list, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleList {
    /// Module files to load, in order.
    pub modules: Vec<PathBuf>,
    /// Lines that were skipped, with the reason (for the log).
    pub problems: Vec<String>,
}

/// Parses the module list: one absolute path per line; blank lines and `#` comments are ignored;
/// relative paths are reported and skipped.
pub fn parse_modules_list(text: &str) -> ModuleList {
    let mut list = ModuleList::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with('/') {
            list.problems.push(format!(
                "modules.list line {}: {line:?} is not an absolute path; skipped (the image build \
                 must write absolute paths)",
                i + 1
            ));
            continue;
        }
        list.modules.push(PathBuf::from(line));
    }
    list
}

/// The kernel's name for a module file: `/lib/modules/…/tdx-guest.ko.xz` → `tdx_guest`.
pub fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(&file);
    stem.replace('-', "_")
}

/// Whether the file is compressed (so the kernel must decompress it).
pub fn is_compressed(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".ko.xz") || name.ends_with(".ko.zst") || name.ends_with(".ko.gz")
}

/// Modules whose `ENODEV` is expected when the hardware is absent (TCG, non-TDX hosts).
pub const EXPECTED_NO_DEVICE: &[&str] = &["tdx_guest"];

/// How loading one module ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Loaded now.
    Loaded,
    /// Already loaded (`EEXIST`).
    AlreadyLoaded,
    /// The module found no device and that is expected here (e.g. `tdx_guest` under TCG).
    NoDeviceExpected,
    /// A real failure: the errno.
    Failed(i32),
}

/// Classifies the result of `finit_module` for module `name` (pure).
pub fn classify(name: &str, result: Result<(), i32>) -> LoadOutcome {
    match result {
        Ok(()) => LoadOutcome::Loaded,
        Err(libc::EEXIST) => LoadOutcome::AlreadyLoaded,
        Err(libc::ENODEV) if EXPECTED_NO_DEVICE.contains(&name) => LoadOutcome::NoDeviceExpected,
        Err(errno) => LoadOutcome::Failed(errno),
    }
}

/// Loads one module file with `finit_module(2)`. Returns the errno on failure
/// (an open failure too, e.g. `ENOENT` for a file the image lacks).
pub fn finit_module(path: &Path) -> Result<(), i32> {
    let file = std::fs::File::open(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let flags = if is_compressed(path) {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params: &CStr = c"";
    // SAFETY: the descriptor is open for the duration of the call (owned by `file`), `params` is a
    // valid NUL-terminated string, and finit_module reads nothing else from our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

/// The result of loading one module, for the log and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleReport {
    /// Kernel module name.
    pub name: String,
    /// The file given to the kernel.
    pub path: PathBuf,
    /// What happened.
    pub outcome: LoadOutcome,
    /// How long the load took.
    pub elapsed: std::time::Duration,
}

impl ModuleReport {
    /// One human-readable log line.
    pub fn describe(&self) -> String {
        let ms = self.elapsed.as_millis();
        match &self.outcome {
            LoadOutcome::Loaded => format!("module {} loaded ({ms} ms)", self.name),
            LoadOutcome::AlreadyLoaded => format!("module {} already loaded", self.name),
            LoadOutcome::NoDeviceExpected => format!(
                "module {}: no such device (expected outside a TDX guest)",
                self.name
            ),
            LoadOutcome::Failed(errno) => format!(
                "error: module {} ({}) failed to load: {} (errno {errno}); continuing without it",
                self.name,
                self.path.display(),
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

/// Loads every module of `list` in order with `load` (normally [`finit_module`]), calling `log`
/// with each report as it happens. Never stops early.
pub fn load_all(
    list: &[PathBuf],
    mut load: impl FnMut(&Path) -> Result<(), i32>,
    mut log: impl FnMut(&ModuleReport),
) -> Vec<ModuleReport> {
    let mut reports = Vec::with_capacity(list.len());
    for path in list {
        let name = module_name(path);
        let start = std::time::Instant::now();
        let outcome = classify(&name, load(path));
        let report = ModuleReport {
            name,
            path: path.clone(),
            outcome,
            elapsed: start.elapsed(),
        };
        log(&report);
        reports.push(report);
    }
    reports
}

/// Reads and parses the module list file; `Ok(None)` when it does not exist.
pub fn read_modules_list(path: &Path) -> Result<Option<ModuleList>, PlatformError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(parse_modules_list(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PlatformError::Os {
            what: format!("read {}", path.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parsing_keeps_order_and_reports_bad_lines() {
        let text = "\
# generated by the image build
/lib/modules/6.12/kernel/drivers/virtio/virtio.ko.xz

/lib/modules/6.12/kernel/drivers/net/virtio_net.ko.xz  
relative/thing.ko.xz
/lib/modules/6.12/kernel/arch/x86/virt/tdx-guest.ko.xz
";
        let list = parse_modules_list(text);
        assert_eq!(
            list.modules,
            vec![
                PathBuf::from("/lib/modules/6.12/kernel/drivers/virtio/virtio.ko.xz"),
                PathBuf::from("/lib/modules/6.12/kernel/drivers/net/virtio_net.ko.xz"),
                PathBuf::from("/lib/modules/6.12/kernel/arch/x86/virt/tdx-guest.ko.xz"),
            ]
        );
        assert_eq!(list.problems.len(), 1);
        assert!(list.problems[0].contains("line 5"), "{:?}", list.problems);
    }

    #[test]
    fn module_names_follow_kernel_rules() {
        assert_eq!(module_name(Path::new("/x/tdx-guest.ko.xz")), "tdx_guest");
        assert_eq!(module_name(Path::new("/x/virtio_net.ko")), "virtio_net");
        assert_eq!(module_name(Path::new("/x/dm-verity.ko.zst")), "dm_verity");
        assert!(is_compressed(Path::new("/x/a.ko.xz")));
        assert!(!is_compressed(Path::new("/x/a.ko")));
    }

    #[test]
    fn outcomes_are_classified() {
        assert_eq!(classify("virtio_net", Ok(())), LoadOutcome::Loaded);
        assert_eq!(
            classify("virtio_net", Err(libc::EEXIST)),
            LoadOutcome::AlreadyLoaded
        );
        assert_eq!(
            classify("tdx_guest", Err(libc::ENODEV)),
            LoadOutcome::NoDeviceExpected
        );
        assert_eq!(
            classify("virtio_net", Err(libc::ENODEV)),
            LoadOutcome::Failed(libc::ENODEV)
        );
        assert_eq!(
            classify("tdx_guest", Err(libc::EINVAL)),
            LoadOutcome::Failed(libc::EINVAL)
        );
    }

    #[test]
    fn load_all_continues_after_failures_and_logs_each() {
        let list = vec![
            PathBuf::from("/m/a.ko.xz"),
            PathBuf::from("/m/b.ko.xz"),
            PathBuf::from("/m/tdx-guest.ko.xz"),
            PathBuf::from("/m/c.ko.xz"),
        ];
        let mut logged = Vec::new();
        let reports = load_all(
            &list,
            |p| match module_name(p).as_str() {
                "b" => Err(libc::ENOEXEC),
                "tdx_guest" => Err(libc::ENODEV),
                "c" => Err(libc::EEXIST),
                _ => Ok(()),
            },
            |r| logged.push(r.describe()),
        );
        let outcomes: Vec<_> = reports.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            vec![
                LoadOutcome::Loaded,
                LoadOutcome::Failed(libc::ENOEXEC),
                LoadOutcome::NoDeviceExpected,
                LoadOutcome::AlreadyLoaded
            ]
        );
        assert_eq!(logged.len(), 4);
        assert!(logged[1].starts_with("error: module b (/m/b.ko.xz) failed to load"));
        assert!(logged[1].contains("errno 8"), "{}", logged[1]);
    }

    #[test]
    fn missing_module_file_is_an_errno_not_a_panic() {
        assert_eq!(
            finit_module(Path::new("/nonexistent/x.ko.xz")),
            Err(libc::ENOENT)
        );
    }

    #[test]
    fn missing_list_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            read_modules_list(&dir.path().join("modules.list")).expect("read"),
            None
        );
        std::fs::write(dir.path().join("modules.list"), "/a.ko\n").expect("write");
        let list = read_modules_list(&dir.path().join("modules.list"))
            .expect("read")
            .expect("some");
        assert_eq!(list.modules, vec![PathBuf::from("/a.ko")]);
    }
}
