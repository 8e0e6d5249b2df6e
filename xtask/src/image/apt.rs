//! A private apt instance: resolves and downloads the image's .debs without touching the host's
//! apt state.
//!
//! It has its own sources list (exactly the suites of `worker.yaml`, Debian's archive keyring as
//! `Signed-By`, so Release signatures are verified), its own lists, cache and an empty dpkg
//! status, all under the cache directory. The host's `apt.conf.d` (proxies and the like) still
//! applies.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::tools;

/// Debian's archive keyring (package `debian-archive-keyring`).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

/// Settings of the private apt instance.
#[derive(Debug, Clone)]
pub struct AptConfig {
    /// Directory that holds the private state (lists, cache, sources).
    pub state_dir: PathBuf,
    pub mirror: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub arch: String,
    /// Refuse expired Release files (off for snapshot mirrors, whose Release files are old;
    /// the lock's sha256 still pins every byte).
    pub check_valid_until: bool,
}

/// A configured private apt.
pub struct Apt {
    cfg: AptConfig,
    updated: bool,
    /// Parsed Packages indexes, by suite (read once per instance).
    indexes: BTreeMap<String, Index>,
    /// Exclusive lock on the private state while this instance lives (apt runs with
    /// `Debug::NoLocking`, so two builds sharing a cache must not update it at once).
    _lock: std::fs::File,
}

/// One stanza of a Packages index.
pub type Stanza = BTreeMap<String, String>;

impl Apt {
    /// Prepare the private directories and sources list.
    pub fn new(cfg: AptConfig) -> anyhow::Result<Self> {
        tools::require(&["apt-get", APT_HELPER])?;
        if !Path::new(DEBIAN_KEYRING).exists() {
            anyhow::bail!(
                "{DEBIAN_KEYRING} is missing: install it with `apt-get install debian-archive-keyring`"
            );
        }
        let s = &cfg.state_dir;
        std::fs::create_dir_all(s).with_context(|| format!("creating {}", s.display()))?;
        let lock = std::fs::File::create(s.join("lock"))
            .with_context(|| format!("creating {}/lock", s.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}/lock", s.display()))?;
        for d in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "lists/partial",
            "cache/archives/partial",
        ] {
            std::fs::create_dir_all(s.join(d))
                .with_context(|| format!("creating {}", s.join(d).display()))?;
        }
        let sources = format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\nArchitectures: {}\nSigned-By: {DEBIAN_KEYRING}\nTargets: Packages\n",
            cfg.mirror,
            cfg.suites.join(" "),
            cfg.components.join(" "),
            cfg.arch
        );
        std::fs::write(s.join("etc/sources.list.d/worker-image.sources"), sources)?;
        std::fs::write(s.join("status"), "")?;
        Ok(Apt {
            cfg,
            updated: false,
            indexes: BTreeMap::new(),
            _lock: lock,
        })
    }

    fn options(&self) -> Vec<String> {
        let s = &self.cfg.state_dir;
        let d = |p: &str| s.join(p).display().to_string();
        let mut o = vec![
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={}", d("etc/sources.list.d")),
            "Dir::Etc::Preferences=/dev/null".to_string(),
            format!("Dir::Etc::PreferencesParts={}", d("etc/preferences.d")),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::State::status={}", d("status")),
            format!("Dir::Cache={}", d("cache")),
            "Dir::Cache::pkgcache=".to_string(),
            "Dir::Cache::srcpkgcache=".to_string(),
            format!("APT::Architecture={}", self.cfg.arch),
            format!("APT::Architectures={}", self.cfg.arch),
            "Debug::NoLocking=true".to_string(),
            "Acquire::Languages=none".to_string(),
        ];
        if !self.cfg.check_valid_until {
            o.push("Acquire::Check-Valid-Until=false".to_string());
        }
        let is_root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        if is_root {
            // Our private directories belong to root; the `_apt` sandbox user could not write them.
            o.push("APT::Sandbox::User=root".to_string());
        }
        o
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for o in self.options() {
            c.arg("-o").arg(o);
        }
        c.env("LC_ALL", "C");
        c
    }

    /// `apt-get update` against the private sources (signatures verified with Debian's keyring).
    pub fn update(&mut self) -> anyhow::Result<()> {
        if self.updated {
            return Ok(());
        }
        let out = self
            .command("apt-get")
            .args(["-q", "update"])
            .output()
            .context("running apt-get update")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("W: ") || stderr.contains("E: ") {
            if !out.status.success() || stderr.contains("E: ") {
                anyhow::bail!(
                    "apt-get update against {} failed:\n{}{}\nCheck the mirror (--mirror URL / WORKER_APT_MIRROR) \
                     and the network.",
                    self.cfg.mirror,
                    String::from_utf8_lossy(&out.stdout),
                    stderr
                );
            }
            eprint!("{stderr}");
        }
        self.updated = true;
        Ok(())
    }

    /// Local paths of the (verified) Packages indexes of `suite`, one per component.
    fn index_files(&self, suite: &str) -> anyhow::Result<Vec<PathBuf>> {
        let out = self
            .command("apt-get")
            .args(["indextargets", "--format", "$(FILENAME)"])
            .arg(format!("Release: {suite}"))
            .arg("Identifier: Packages")
            .output()
            .context("running apt-get indextargets")?;
        if !out.status.success() {
            anyhow::bail!(
                "apt-get indextargets failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut files: Vec<PathBuf> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            anyhow::bail!("no Packages index for suite {suite} on {}", self.cfg.mirror);
        }
        Ok(files)
    }

    /// The parsed Packages index of `suite` (every component of `debian.components`; this
    /// architecture and `all`).
    pub fn index(&mut self, suite: &str) -> anyhow::Result<&Index> {
        if !self.indexes.contains_key(suite) {
            self.update()?;
            let mut text = String::new();
            for file in self.index_files(suite)? {
                let out = Command::new(APT_HELPER)
                    .arg("cat-file")
                    .arg(&file)
                    .output()
                    .with_context(|| format!("reading {}", file.display()))?;
                if !out.status.success() {
                    anyhow::bail!(
                        "apt-helper cat-file {} failed: {}",
                        file.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                text.push_str(&String::from_utf8_lossy(&out.stdout));
                // Stanzas of the next component start after a blank line.
                text.push_str("\n\n");
            }
            let idx = Index::parse(&text, &self.cfg.arch);
            self.indexes.insert(suite.to_string(), idx);
        }
        self.indexes
            .get(suite)
            .ok_or_else(|| anyhow::anyhow!("index of {suite} vanished"))
    }

    /// Every stanza of `suite`'s index whose `Package` is `name`.
    pub fn lookup(&mut self, suite: &str, name: &str) -> anyhow::Result<Vec<Stanza>> {
        Ok(self.index(suite)?.get(name).to_vec())
    }

    /// Download every `(name, version)` into `dir` with one apt-get call; returns the .deb files.
    pub fn download(
        &mut self,
        pkgs: &[(String, String)],
        dir: &Path,
    ) -> anyhow::Result<Vec<PathBuf>> {
        self.update()?;
        let out = self
            .command("apt-get")
            .args(["-q", "download"])
            .args(pkgs.iter().map(|(n, v)| format!("{n}={v}")))
            .current_dir(dir)
            .output()
            .context("running apt-get download")?;
        let list = pkgs
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("Can't find a source")
                || stderr.contains("not found")
                || stderr.contains("Unable to locate")
            {
                anyhow::bail!(
                    "a pinned input ({list}) is gone from {} (superseded versions leave the live archive): \
                     refresh the lock with `cargo xtask image lock` (and commit it), or build against a snapshot \
                     mirror with --mirror URL / WORKER_APT_MIRROR.\napt said: {}",
                    self.cfg.mirror,
                    stderr.trim()
                );
            }
            anyhow::bail!("apt-get download of {list} failed: {}", stderr.trim());
        }
        let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        debs.sort();
        Ok(debs)
    }
}

/// One suite's Packages index: stanzas by package name, and which packages provide a virtual
/// name.
#[derive(Debug, Clone, Default)]
pub struct Index {
    by_name: BTreeMap<String, Vec<Stanza>>,
    providers: BTreeMap<String, Vec<String>>,
}

impl Index {
    /// Parse Packages text, keeping the stanzas of architecture `arch` and `all`.
    pub fn parse(text: &str, arch: &str) -> Self {
        let mut idx = Index::default();
        for chunk in text.split("\n\n") {
            let st = parse_stanza(chunk);
            let Some(name) = st.get("Package").cloned() else {
                continue;
            };
            if !st
                .get("Architecture")
                .is_some_and(|a| a == arch || a == "all")
            {
                continue;
            }
            for (virt, _) in dependencies(st.get("Provides").map(String::as_str).unwrap_or("")) {
                let v = idx.providers.entry(virt).or_default();
                if !v.contains(&name) {
                    v.push(name.clone());
                }
            }
            idx.by_name.entry(name).or_default().push(st);
        }
        idx
    }

    /// The stanzas of a real package (empty when there is none).
    pub fn get(&self, name: &str) -> &[Stanza] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Real packages that `Provides` a (virtual) name, in index order.
    pub fn providers(&self, name: &str) -> &[String] {
        self.providers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Parse one deb822 stanza (continuation lines folded with `\n`).
pub fn parse_stanza(text: &str) -> Stanza {
    let mut m = Stanza::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(k) = &last
                && let Some(v) = m.get_mut(k)
            {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            m.insert(k.to_string(), v.trim().to_string());
            last = Some(k.to_string());
        }
    }
    m
}

/// Every entry of a `Depends`-style field with all its alternatives (`a | b`), each as
/// `(name, Some(version))` for `name (= version)`, `(name, None)` otherwise.
pub fn dependency_alternatives(depends: &str) -> Vec<Vec<(String, Option<String>)>> {
    depends
        .split(',')
        .map(|entry| {
            entry
                .split('|')
                .filter_map(one_dependency)
                .collect::<Vec<_>>()
        })
        .filter(|alts| !alts.is_empty())
        .collect()
}

/// First alternative of every entry of a `Depends` field, in order: `(name, Some(version))` for
/// `name (= version)`, `(name, None)` for an unversioned or non-`=` relation.
pub fn dependencies(depends: &str) -> Vec<(String, Option<String>)> {
    depends.split(',').filter_map(one_dependency).collect()
}

fn one_dependency(entry: &str) -> Option<(String, Option<String>)> {
    let first = entry.split('|').next()?.trim();
    let (name, rest) = match first.find('(') {
        Some(i) => (first[..i].trim(), Some(&first[i..])),
        None => (first, None),
    };
    let name = name.split(':').next()?.trim().to_string();
    if name.is_empty() {
        return None;
    }
    let version = rest.and_then(|r| {
        let inner = r.trim_start_matches('(').trim_end_matches(')').trim();
        inner.strip_prefix('=').map(|v| v.trim().to_string())
    });
    Some((name, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stanzas_and_dependencies() {
        let st = parse_stanza(
            "Package: linux-image-amd64\nVersion: 6.12.95-1~bpo12+1\nDepends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)\n\
             Description: Linux\n more text\nSize: 1484\n",
        );
        assert_eq!(st["Size"], "1484");
        assert_eq!(st["Description"], "Linux\nmore text");
        assert_eq!(
            dependencies(&st["Depends"]),
            [(
                "linux-image-6.12.95+deb12-amd64".to_string(),
                Some("6.12.95-1~bpo12+1".to_string())
            )]
        );
        assert_eq!(
            dependencies("a | b, c (>= 1)"),
            [("a".to_string(), None), ("c".to_string(), None)]
        );
        assert_eq!(
            dependencies("libc6:any (>= 2.36)"),
            [("libc6".to_string(), None)]
        );
        assert_eq!(
            dependencies(
                "dracut | initramfs-tools (>= 0.120+deb8u2), kmod, linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)"
            ),
            [
                ("dracut".to_string(), None),
                ("kmod".to_string(), None),
                (
                    "linux-binary-7.3.4+deb13-amd64".to_string(),
                    Some("7.3.4-1~bpo13+1".to_string())
                )
            ]
        );
        assert!(dependencies("").is_empty());
    }
}
