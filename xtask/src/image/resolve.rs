//! `cargo xtask image lock`: resolve every package of `worker.yaml` against the (signed) Debian
//! indexes and pin it in `image/worker.lock`.

use std::path::Path;

use anyhow::Context as _;

use super::apt::{Apt, AptConfig, Stanza, first_dependency};
use super::definition::{ImageDefinition, PackageSpec, Resolve};
use super::lock::{Lock, LockedPackage};
use super::sources;
use crate::progress::Progress;

/// Options of `image lock`.
#[derive(Debug, Clone)]
pub struct LockOptions {
    pub mirror: Option<String>,
    pub cache: std::path::PathBuf,
    pub quiet: bool,
}

/// Resolve the definition into a lock (does not write it).
pub fn resolve(def: &ImageDefinition, opts: &LockOptions) -> anyhow::Result<Lock> {
    let progress = Progress::new(opts.quiet);
    let mirror = sources::resolve_mirror(opts.mirror.as_deref())?;
    let explicit = opts.mirror.is_some()
        || std::env::var_os("WORKER_APT_MIRROR").is_some_and(|m| !m.is_empty());
    let mut apt = Apt::new(AptConfig {
        state_dir: opts.cache.join("apt-state"),
        mirror,
        suites: def.debian.suites.clone(),
        components: def.debian.components.clone(),
        arch: def.debian.architecture.clone(),
        // A live mirror's Release files must be fresh; a user-chosen (snapshot) mirror's are old.
        check_valid_until: !explicit,
    })?;
    progress.step(
        "lock",
        format!("apt-get update ({})", def.debian.suites.join(" ")),
    );
    apt.update()?;
    let mut out = Vec::new();
    for spec in &def.packages {
        let stanza = resolve_one(&mut apt, spec)?;
        let p = locked(spec, &stanza)?;
        progress.step(
            "lock",
            format!("{} {} {} ({})", p.name, p.version, p.suite, &p.sha256[..12]),
        );
        out.push(p);
    }
    Ok(Lock::new(&def.name, out))
}

fn resolve_one(apt: &mut Apt, spec: &PackageSpec) -> anyhow::Result<Stanza> {
    let st = single(
        apt.lookup(&spec.suite, &spec.name)?,
        &spec.name,
        &spec.suite,
    )?;
    match spec.resolve {
        Resolve::Exact => Ok(st),
        Resolve::MetapackageDepends => {
            let deps = st.get("Depends").map(String::as_str).unwrap_or("");
            let (name, version) = first_dependency(deps).ok_or_else(|| {
                anyhow::anyhow!("{} ({}) has no Depends to resolve", spec.name, spec.suite)
            })?;
            let target = single(apt.lookup(&spec.suite, &name)?, &name, &spec.suite)
                .with_context(|| format!("resolving metapackage {}", spec.name))?;
            if let Some(v) = version
                && target.get("Version") != Some(&v)
            {
                anyhow::bail!(
                    "{} depends on {name} (= {v}) but {} has version {:?}: the mirror is mid-update, retry later",
                    spec.name,
                    spec.suite,
                    target.get("Version")
                );
            }
            Ok(target)
        }
    }
}

fn single(mut found: Vec<Stanza>, name: &str, suite: &str) -> anyhow::Result<Stanza> {
    match found.len() {
        0 => anyhow::bail!(
            "package {name} is not in suite {suite}: check the name and suite in image/worker.yaml"
        ),
        1 => Ok(found.remove(0)),
        n => {
            let versions: Vec<_> = found.iter().filter_map(|s| s.get("Version")).collect();
            anyhow::bail!(
                "suite {suite} lists {n} versions of {name} ({versions:?}): pin one in image/worker.yaml"
            )
        }
    }
}

fn locked(spec: &PackageSpec, st: &Stanza) -> anyhow::Result<LockedPackage> {
    let field = |k: &str| {
        st.get(k)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("index record of {} lacks the {k} field", spec.name))
    };
    Ok(LockedPackage {
        name: field("Package")?,
        version: field("Version")?,
        arch: field("Architecture")?,
        suite: spec.suite.clone(),
        role: spec.role,
        requested: spec.name.clone(),
        sha256: field("SHA256")?.to_ascii_lowercase(),
        size: field("Size")?
            .parse()
            .with_context(|| format!("Size of {}", spec.name))?,
        filename: field("Filename")?,
    })
}

/// Write the lock file if its content changed; returns whether it changed.
pub fn write_lock(path: &Path, lock: &Lock) -> anyhow::Result<bool> {
    let text = lock.to_text();
    if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Human summary of a lock change.
pub fn describe(lock: &Lock) -> String {
    lock.packages
        .iter()
        .map(|p| {
            format!(
                "  {:<34} {:<22} {:<6} {:<20} {}",
                p.name, p.version, p.arch, p.suite, p.sha256
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
