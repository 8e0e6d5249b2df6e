//! Host-tool checks: every command states which external programs it needs, and a missing one
//! is reported with the Debian package that provides it (`cargo xtask demo` installs them).

use std::path::{Path, PathBuf};

/// (program, Debian package, note).
const TOOLS: &[(&str, &str, &str)] = &[
    ("dpkg-deb", "dpkg", ""),
    ("apt-get", "apt", ""),
    ("/usr/lib/apt/apt-helper", "apt", ""),
    (
        "qemu-system-x86_64",
        "qemu-system-x86",
        " from bookworm-backports (QEMU 10.x): apt-get install -t bookworm-backports qemu-system-x86",
    ),
    ("cargo", "", "install the Rust toolchain with rustup"),
    ("rustc", "", "install the Rust toolchain with rustup"),
];

/// The Debian package that provides `program`, if it is one we know.
pub fn package_for(program: &str) -> Option<&'static str> {
    TOOLS
        .iter()
        .find(|(p, _, _)| *p == program)
        .map(|(_, pkg, _)| *pkg)
        .filter(|p| !p.is_empty())
}

/// Find a program on `PATH` (or check an absolute path).
pub fn find(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Programs from `programs` that are missing.
pub fn missing<'a>(programs: &[&'a str]) -> Vec<&'a str> {
    programs
        .iter()
        .copied()
        .filter(|p| find(p).is_none())
        .collect()
}

/// Fail with install instructions unless every program is present.
pub fn require(programs: &[&str]) -> anyhow::Result<()> {
    let missing = missing(programs);
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|m| match TOOLS.iter().find(|(p, _, _)| p == m) {
            Some((_, pkg, note)) if !pkg.is_empty() => {
                format!("  {m}: install the Debian package `{pkg}`{note}")
            }
            Some((_, _, note)) => format!("  {m}: {note}"),
            None => format!("  {m}: not found on PATH"),
        })
        .collect();
    anyhow::bail!(
        "missing host tools:\n{}\n(`cargo xtask demo` installs the Debian packages for you)",
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_package_of_a_missing_tool() {
        assert_eq!(package_for("dpkg-deb"), Some("dpkg"));
        assert_eq!(package_for("cargo"), None);
        let err = require(&["sh", "definitely-not-a-tool-xyz"])
            .expect_err("missing")
            .to_string();
        assert!(err.contains("definitely-not-a-tool-xyz"), "{err}");
        assert!(
            !err.contains("  sh:"),
            "present tools are not listed: {err}"
        );
        assert!(require(&["sh"]).is_ok());
    }

    #[test]
    fn qemu_hint_names_backports() {
        // Check the message, whether or not QEMU is installed here.
        let (_, pkg, note) = TOOLS
            .iter()
            .find(|(p, _, _)| *p == "qemu-system-x86_64")
            .expect("entry");
        assert_eq!(*pkg, "qemu-system-x86");
        assert!(note.contains("bookworm-backports"));
    }
}
