//! Shared helpers of the end-to-end tests (`tests/tests/*.rs`): where the repository and the
//! target directory are, building and locating the real binaries, the image under test, and the
//! visible-skip rule (a missing tool prints `SKIPPED: ...`, except under CI where it fails).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cargo running the tests.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| "cargo".into())
}

/// The target directory the tests were built into.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Whether we run under CI (`CI=true`), where skips are failures.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Prints a visible skip for `test`, or panics under CI.
pub fn skip(test: &str, why: &str) {
    assert!(!under_ci(), "{test}: {why} (CI must provide it)");
    eprintln!("SKIPPED: {why} ({test})");
}

/// Builds a workspace binary once per test process (cargo cannot hand another crate's binary
/// to a test) and returns its path, read from cargo's own JSON messages.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let out = Command::new(cargo())
        .current_dir(repo_root())
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no {bin} executable"))
}

/// The host-launcher binary (built once).
pub fn host_launcher() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("host-launcher", "host-launcher"))
}

/// Whether QEMU can be used; prints SKIPPED (or fails under CI) when it cannot.
pub fn qemu_or_skip(test: &str) -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip(
            test,
            "qemu-system-x86_64 not found; install qemu-system-x86 from bookworm-backports (cargo xtask test does)",
        );
    }
    found
}

/// The image to boot: `WORKER_IMAGE_DIR`, or one built once by `cargo xtask image build`.
pub fn image_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("WORKER_IMAGE_DIR") {
            return PathBuf::from(d);
        }
        let out = target_dir().join("e2e").join("worker");
        eprintln!(
            "building the image with `cargo xtask image build --out {}` (set WORKER_IMAGE_DIR to use an existing one)",
            out.display()
        );
        let st = Command::new(cargo())
            .current_dir(repo_root())
            .args(["run", "--quiet", "-p", "xtask", "--", "image", "build", "--out"])
            .arg(&out)
            .status()
            .expect("run cargo xtask image build");
        assert!(st.success(), "cargo xtask image build failed ({st})");
        out
    })
}

/// Copies the files (not sub-folders) of an image directory.
pub fn copy_image(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create image copy");
    for e in std::fs::read_dir(src).expect("read image dir") {
        let e = e.expect("dir entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy image file");
        }
    }
}

/// The Python interpreter and `PYTHONPATH` with the pinned client libraries (the official
/// `openai` SDK, `jsonschema`) that `cargo xtask test` installs and exports as
/// `WORKER_PYTHONPATH`. Without it (or when `import openai, jsonschema` fails) prints SKIPPED
/// (fails under CI) and returns `None`.
pub fn python_clients_or_skip(test: &str) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("WORKER_PYTHONPATH").map(PathBuf::from) else {
        skip(
            test,
            "WORKER_PYTHONPATH is not set: run `cargo xtask test`, which installs the pinned openai and jsonschema packages",
        );
        return None;
    };
    let ok = Command::new("python3")
        .env("PYTHONPATH", &dir)
        .args(["-c", "import openai, jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(
            test,
            &format!(
                "python3 cannot import openai and jsonschema from {}: run `cargo xtask test` to install them",
                dir.display()
            ),
        );
        return None;
    }
    Some(dir)
}
