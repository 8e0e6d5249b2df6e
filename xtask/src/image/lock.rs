//! `image/worker.lock`: every Debian input pinned to name, version, arch, suite, sha256, size.
//!
//! The format is pretty-printed JSON with a schema version, packages sorted by name (then suite),
//! one field per line, so a lock refresh reads as a small diff.

use serde::{Deserialize, Serialize};

use super::definition::{ImageDefinition, Role};

/// Current lock schema version.
pub const LOCK_SCHEMA_VERSION: u32 = 1;

/// The whole lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub schema_version: u32,
    /// Image the lock belongs to (`name` in worker.yaml).
    pub image: String,
    /// Sorted by (name, suite).
    pub packages: Vec<LockedPackage>,
}

/// One pinned .deb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    /// Concrete package name.
    pub name: String,
    pub version: String,
    pub arch: String,
    pub suite: String,
    pub role: Role,
    /// The name written in worker.yaml (differs from `name` for a resolved metapackage).
    pub requested: String,
    /// Lowercase hex SHA-256 of the .deb.
    pub sha256: String,
    pub size: u64,
    /// Path of the .deb in the archive (`pool/...`).
    pub filename: String,
}

impl Lock {
    /// Build a lock, sorting the packages into their canonical order.
    pub fn new(image: &str, mut packages: Vec<LockedPackage>) -> Self {
        packages.sort_by(|a, b| (&a.name, &a.suite, a.role).cmp(&(&b.name, &b.suite, b.role)));
        Lock {
            schema_version: LOCK_SCHEMA_VERSION,
            image: image.to_string(),
            packages,
        }
    }

    /// Canonical text (what `cargo xtask image lock` writes).
    pub fn to_text(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parse lock text; rejects other schema versions and unsorted or duplicate entries.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        let lock: Lock = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{origin}:{}:{}: invalid lock file: {e}; regenerate it with `cargo xtask image lock`",
                e.line(),
                e.column()
            )
        })?;
        if lock.schema_version != LOCK_SCHEMA_VERSION {
            anyhow::bail!(
                "{origin}: lock schema_version {} is not supported (this xtask writes {LOCK_SCHEMA_VERSION}); \
                 regenerate it with `cargo xtask image lock`",
                lock.schema_version
            );
        }
        let sorted = Lock::new(&lock.image, lock.packages.clone());
        if sorted.packages != lock.packages {
            anyhow::bail!(
                "{origin}: packages are not sorted by (name, suite, role); regenerate with `cargo xtask image lock`"
            );
        }
        for w in lock.packages.windows(2) {
            if w[0].name == w[1].name && w[0].suite == w[1].suite && w[0].role == w[1].role {
                anyhow::bail!(
                    "{origin}: package {} ({}) is listed twice with the same role",
                    w[0].name,
                    w[0].suite
                );
            }
        }
        for p in &lock.packages {
            if p.sha256.len() != 64
                || !p
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                anyhow::bail!(
                    "{origin}: package {} has a malformed sha256 {:?}",
                    p.name,
                    p.sha256
                );
            }
        }
        Ok(lock)
    }

    /// Check that the lock pins exactly the packages the definition asks for.
    pub fn check_matches(&self, def: &ImageDefinition) -> anyhow::Result<()> {
        if self.image != def.name {
            anyhow::bail!(
                "the lock is for image {:?} but the definition is {:?}; run `cargo xtask image lock`",
                self.image,
                def.name
            );
        }
        let of_spec = |spec: &super::definition::PackageSpec| {
            self.packages
                .iter()
                .filter(|p| {
                    p.requested == spec.name && p.suite == spec.suite && p.role == spec.role
                })
                .count()
        };
        for spec in &def.packages {
            let n = of_spec(spec);
            // A metapackage may lock several parts (Debian's split kernel); anything else is one.
            let ok = match spec.resolve {
                super::definition::Resolve::Exact => n == 1,
                super::definition::Resolve::MetapackageDepends => n >= 1,
            };
            if !ok {
                anyhow::bail!(
                    "the lock has {n} entries for {} ({}, role {:?}) from worker.yaml: the lock is out of date; \
                     run `cargo xtask image lock`",
                    spec.name,
                    spec.suite,
                    spec.role
                );
            }
        }
        let br = &def.build_root;
        let build: Vec<&LockedPackage> = self.with_role(Role::Build).collect();
        for want in &br.packages {
            if !build.iter().any(|p| &p.name == want && p.suite == br.suite) {
                anyhow::bail!(
                    "the lock's build root lacks {want} ({}) from build_root.packages in worker.yaml: the lock is out \
                     of date; run `cargo xtask image lock`",
                    br.suite
                );
            }
        }
        if let Some(p) = build
            .iter()
            .find(|p| p.suite != br.suite || p.requested != super::resolve::BUILD_ROOT_REQUESTED)
        {
            anyhow::bail!(
                "the lock's build-root entry {} ({}, requested as {}) does not match build_root in worker.yaml: \
                 run `cargo xtask image lock`",
                p.name,
                p.suite,
                p.requested
            );
        }
        if let Some(p) = self.packages.iter().find(|p| {
            p.role != Role::Build
                && !def
                    .packages
                    .iter()
                    .any(|s| p.requested == s.name && p.suite == s.suite && p.role == s.role)
        }) {
            anyhow::bail!(
                "the lock pins {} (requested as {}, {}) which worker.yaml no longer asks for: run `cargo xtask image lock`",
                p.name,
                p.requested,
                p.suite
            );
        }
        Ok(())
    }

    /// The locked packages with a role.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &LockedPackage> {
        self.packages.iter().filter(move |p| p.role == role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, suite: &str, role: Role) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: "1.0-1".into(),
            arch: "amd64".into(),
            suite: suite.into(),
            role,
            requested: name.into(),
            sha256: "ab".repeat(32),
            size: 42,
            filename: format!("pool/main/x/{name}_1.0-1_amd64.deb"),
        }
    }

    #[test]
    fn round_trips_and_sorts() {
        let lock = Lock::new(
            "worker",
            vec![
                pkg("ovmf", "trixie", Role::Firmware),
                pkg("libc6", "bookworm", Role::Runtime),
            ],
        );
        assert_eq!(lock.packages[0].name, "libc6", "sorted by name");
        let text = lock.to_text();
        assert!(text.ends_with("}\n"));
        assert!(text.starts_with("{\n  \"schema_version\": 1,\n"), "{text}");
        let back = Lock::parse(&text, "w.lock").expect("parse");
        assert_eq!(back, lock);
        assert_eq!(back.to_text(), text, "stable text");
    }

    #[test]
    fn rejects_other_schema_versions() {
        let mut lock = Lock::new("worker", vec![pkg("libc6", "bookworm", Role::Runtime)]);
        lock.schema_version = 2;
        let err = Lock::parse(&lock.to_text(), "w.lock")
            .expect_err("v2")
            .to_string();
        assert!(
            err.contains("schema_version 2") && err.contains("cargo xtask image lock"),
            "{err}"
        );
    }

    #[test]
    fn rejects_unsorted_and_malformed() {
        let mut lock = Lock::new(
            "worker",
            vec![pkg("a", "s", Role::Runtime), pkg("b", "s", Role::Runtime)],
        );
        lock.packages.swap(0, 1);
        let err = Lock::parse(&lock.to_text(), "w.lock")
            .expect_err("unsorted")
            .to_string();
        assert!(err.contains("not sorted"), "{err}");
        let text = Lock::new("worker", vec![pkg("a", "s", Role::Runtime)])
            .to_text()
            .replace("\"size\"", "\"sise\"");
        let err = Lock::parse(&text, "w.lock")
            .expect_err("unknown field")
            .to_string();
        assert!(err.starts_with("w.lock:") && err.contains("sise"), "{err}");
        let mut bad = Lock::new("worker", vec![pkg("a", "s", Role::Runtime)]);
        bad.packages[0].sha256 = "XYZ".into();
        assert!(Lock::parse(&bad.to_text(), "w.lock").is_err());
    }
}
