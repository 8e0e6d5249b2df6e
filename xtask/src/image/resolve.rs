//! `cargo xtask image lock`: resolve every package of `worker.yaml` against the (signed) Debian
//! indexes and pin it in `image/worker.lock`.

use std::path::Path;

use anyhow::Context as _;

use super::apt::{Apt, AptConfig, Index, Stanza, dependencies, dependency_alternatives};
use super::definition::{ImageDefinition, PackageSpec, Resolve, Role};
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
        for stanza in resolve_one(|suite, name| apt.lookup(suite, name), spec)? {
            let p = locked(spec, &stanza)?;
            progress.step(
                "lock",
                format!("{} {} {} ({})", p.name, p.version, p.suite, &p.sha256[..12]),
            );
            out.push(p);
        }
    }
    let br = &def.build_root;
    progress.step(
        "lock",
        format!(
            "build root: {} and their dependencies ({})",
            br.packages.join(", "),
            br.suite
        ),
    );
    let closure = build_root_closure(apt.index(&br.suite)?, &br.suite, &br.packages)?;
    for st in &closure {
        let spec = PackageSpec {
            name: BUILD_ROOT_REQUESTED.to_string(),
            suite: br.suite.clone(),
            role: Role::Build,
            resolve: Resolve::Exact,
        };
        out.push(locked(&spec, st)?);
    }
    progress.step(
        "lock",
        format!(
            "build root: {} packages, {}",
            closure.len(),
            crate::progress::bytes(
                out.iter()
                    .filter(|p| p.role == Role::Build)
                    .map(|p| p.size)
                    .sum()
            )
        ),
    );
    Ok(Lock::new(&def.name, out))
}

/// `requested` of every build-root entry in the lock.
pub const BUILD_ROOT_REQUESTED: &str = "build-root";

/// The packages `roots` need, with their `Pre-Depends`/`Depends` closure, from one suite's index,
/// sorted by name. For each dependency the first alternative already chosen (or provided by a
/// chosen package) satisfies it; else the first alternative that is a real package, else the
/// first package that provides it. `(= version)` relations must match the index.
pub fn build_root_closure(
    idx: &Index,
    suite: &str,
    roots: &[String],
) -> anyhow::Result<Vec<Stanza>> {
    let mut chosen: std::collections::BTreeMap<String, Stanza> = Default::default();
    let mut queue: std::collections::VecDeque<(String, String)> = roots
        .iter()
        .map(|r| {
            (
                r.clone(),
                "build_root.packages in image/worker.yaml".to_string(),
            )
        })
        .collect();
    let satisfied = |chosen: &std::collections::BTreeMap<String, Stanza>, name: &str| {
        chosen.contains_key(name) || idx.providers(name).iter().any(|p| chosen.contains_key(p))
    };
    while let Some((name, why)) = queue.pop_front() {
        if chosen.contains_key(&name) {
            continue;
        }
        let st = single(idx.get(&name).to_vec(), &name, suite)
            .with_context(|| format!("{name} is needed by {why}"))?;
        let fields = [
            st.get("Pre-Depends").map(String::as_str).unwrap_or(""),
            st.get("Depends").map(String::as_str).unwrap_or(""),
        ]
        .join(",");
        chosen.insert(name.clone(), st);
        for alts in dependency_alternatives(&fields) {
            if alts.iter().any(|(n, _)| satisfied(&chosen, n))
                || alts.iter().any(|(n, _)| queue.iter().any(|(q, _)| q == n))
            {
                continue;
            }
            let pick = alts
                .iter()
                .find(|(n, _)| !idx.get(n).is_empty())
                .map(|(n, v)| (n.clone(), v.clone()))
                .or_else(|| {
                    alts.iter()
                        .find_map(|(n, _)| idx.providers(n).first().map(|p| (p.clone(), None)))
                })
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{name} depends on {} which suite {suite} neither has nor provides: \
                         add a package that provides it to build_root.packages in image/worker.yaml",
                        alts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" | ")
                    )
                })?;
            if let Some(v) = &pick.1 {
                let have = idx
                    .get(&pick.0)
                    .iter()
                    .filter_map(|s| s.get("Version"))
                    .collect::<Vec<_>>();
                if !have.contains(&v) {
                    anyhow::bail!(
                        "{name} needs {} (= {v}) but {suite} has {have:?}: the mirror is mid-update, retry later",
                        pick.0
                    );
                }
            }
            queue.push_back((pick.0, name.clone()));
        }
    }
    Ok(chosen.into_values().collect())
}

/// The index records one definition entry locks: one for `exact`; for `metapackage-depends` the
/// concrete package the metapackage names plus the parts that package pins to its own version.
fn resolve_one(
    mut lookup: impl FnMut(&str, &str) -> anyhow::Result<Vec<Stanza>>,
    spec: &PackageSpec,
) -> anyhow::Result<Vec<Stanza>> {
    let st = single(lookup(&spec.suite, &spec.name)?, &spec.name, &spec.suite)?;
    match spec.resolve {
        Resolve::Exact => Ok(vec![st]),
        Resolve::MetapackageDepends => {
            let deps = dependencies(st.get("Depends").map(String::as_str).unwrap_or(""));
            // `linux-image-amd64` depends on `linux-image-<abi>-amd64` (and, since Debian split its
            // kernel packages, first on `linux-base-amd64`): prefer the dependency that shares the
            // metapackage's stem (`linux-image-`), else the first one.
            let stem = spec
                .name
                .rsplit_once('-')
                .map(|(s, _)| format!("{s}-"))
                .unwrap_or_default();
            let (name, version) = deps
                .iter()
                .find(|(n, _)| !stem.is_empty() && n.starts_with(&stem))
                .or(deps.first())
                .cloned()
                .ok_or_else(|| {
                    anyhow::anyhow!("{} ({}) has no Depends to resolve", spec.name, spec.suite)
                })?;
            let target = single(lookup(&spec.suite, &name)?, &name, &spec.suite)
                .with_context(|| format!("resolving metapackage {}", spec.name))?;
            check_version(spec, &name, version.as_deref(), &target)?;
            // Split kernel packages (Debian >= 6.19): `linux-image-<abi>` only pins
            // `linux-binary-<abi>` (vmlinuz), `linux-modules-<abi>` and `linux-base-<abi>` (config,
            // modules.builtin) to its own version. Lock those parts too, transitively.
            let own = target.get("Version").cloned().unwrap_or_default();
            let mut out = vec![target];
            let mut i = 0;
            while i < out.len() {
                let pinned: Vec<String> =
                    dependencies(out[i].get("Depends").map(String::as_str).unwrap_or(""))
                        .into_iter()
                        .filter(|(_, v)| v.as_deref() == Some(own.as_str()))
                        .map(|(n, _)| n)
                        .collect();
                for n in pinned {
                    if out.iter().any(|s| s.get("Package") == Some(&n)) {
                        continue;
                    }
                    let part = single(lookup(&spec.suite, &n)?, &n, &spec.suite)
                        .with_context(|| format!("resolving {} (part of {})", n, spec.name))?;
                    check_version(spec, &n, Some(&own), &part)?;
                    out.push(part);
                }
                i += 1;
            }
            Ok(out)
        }
    }
}

fn check_version(
    spec: &PackageSpec,
    name: &str,
    want: Option<&str>,
    found: &Stanza,
) -> anyhow::Result<()> {
    if let Some(v) = want
        && found.get("Version").map(String::as_str) != Some(v)
    {
        anyhow::bail!(
            "{} needs {name} (= {v}) but {} has version {:?}: the mirror is mid-update, retry later",
            spec.name,
            spec.suite,
            found.get("Version")
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::apt::parse_stanza;
    use crate::image::definition::Role;

    fn index(text: &str) -> Vec<Stanza> {
        text.split("\n\n").map(parse_stanza).collect()
    }

    fn lookup_in(idx: &[Stanza]) -> impl FnMut(&str, &str) -> anyhow::Result<Vec<Stanza>> + '_ {
        move |_suite, name| {
            Ok(idx
                .iter()
                .filter(|s| s.get("Package").map(String::as_str) == Some(name))
                .cloned()
                .collect())
        }
    }

    fn spec(name: &str) -> PackageSpec {
        PackageSpec {
            name: name.into(),
            suite: "trixie-backports".into(),
            role: Role::Kernel,
            resolve: Resolve::MetapackageDepends,
        }
    }

    #[test]
    fn the_build_root_closure_follows_depends_alternatives_and_provides() {
        let idx = Index::parse(
            "Package: gcc-12\nArchitecture: amd64\nVersion: 12.2\nDepends: cpp-12 (= 12.2), binutils (>= 2.40), libc6 (>= 2.36)\n\n\
             Package: cpp-12\nArchitecture: amd64\nVersion: 12.2\nDepends: libc6\n\n\
             Package: binutils\nArchitecture: amd64\nVersion: 2.40\nDepends: binutils-x86-64 (= 2.40)\n\n\
             Package: binutils-x86-64\nArchitecture: amd64\nVersion: 2.40\nDepends: libc6, libjansson4 | libjansson-old\n\n\
             Package: libjansson4\nArchitecture: amd64\nVersion: 2.14\n\n\
             Package: libc6\nArchitecture: amd64\nVersion: 2.36\nPre-Depends: libgcc-s1\n\n\
             Package: libgcc-s1\nArchitecture: amd64\nVersion: 12.2\nDepends: libc6\n\n\
             Package: libc6-dev\nArchitecture: amd64\nVersion: 2.36\nDepends: libc6 (= 2.36), libc-dev-bin | other, libcrypt-dev\n\n\
             Package: libxcrypt-dev\nArchitecture: amd64\nVersion: 4.4\nProvides: libcrypt-dev (= 1:4.4)\n\n\
             Package: rpcsvc\nArchitecture: i386\nVersion: 1\n\n\
             Package: libc-dev-bin\nArchitecture: amd64\nVersion: 2.36\n",
            "amd64",
        );
        let roots = ["gcc-12".to_string(), "libc6-dev".to_string()];
        let got = build_root_closure(&idx, "bookworm", &roots).expect("closure");
        assert_eq!(
            names(&got),
            [
                "binutils",
                "binutils-x86-64",
                "cpp-12",
                "gcc-12",
                "libc-dev-bin",
                "libc6",
                "libc6-dev",
                "libgcc-s1",
                "libjansson4",
                "libxcrypt-dev"
            ]
        );
        // A dependency nobody has is named with the package that needs it.
        let err = build_root_closure(&idx, "bookworm", &["rpcsvc".to_string()])
            .expect_err("i386 only")
            .to_string();
        assert!(
            err.contains("rpcsvc is not in suite bookworm") || err.contains("rpcsvc"),
            "{err}"
        );
        let broken = Index::parse(
            "Package: a\nArchitecture: amd64\nVersion: 1\nDepends: b | c\n",
            "amd64",
        );
        let err = build_root_closure(&broken, "bookworm", &["a".to_string()])
            .expect_err("missing dep")
            .to_string();
        assert!(err.contains("a depends on b | c"), "{err}");
        assert!(err.contains("build_root.packages"), "{err}");
        let skew = Index::parse(
            "Package: a\nArchitecture: amd64\nVersion: 1\nDepends: b (= 2)\n\n\
             Package: b\nArchitecture: amd64\nVersion: 1\n",
            "amd64",
        );
        let err = build_root_closure(&skew, "bookworm", &["a".to_string()])
            .expect_err("version skew")
            .to_string();
        assert!(err.contains("mid-update"), "{err}");
    }

    fn names(v: &[Stanza]) -> Vec<&str> {
        v.iter().map(|s| s["Package"].as_str()).collect()
    }

    #[test]
    fn a_monolithic_kernel_metapackage_locks_one_package() {
        let idx = index(
            "Package: linux-image-amd64\nVersion: 6.12.95-1~bpo12+1\nDepends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)\n\n\
             Package: linux-image-6.12.95+deb12-amd64\nVersion: 6.12.95-1~bpo12+1\nDepends: kmod, linux-base (>= 4.3~)\n",
        );
        let got = resolve_one(lookup_in(&idx), &spec("linux-image-amd64")).expect("resolve");
        assert_eq!(names(&got), ["linux-image-6.12.95+deb12-amd64"]);
    }

    #[test]
    fn a_split_kernel_locks_its_binary_modules_and_base() {
        let idx = index(
            "Package: linux-image-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: linux-base-amd64 (= 7.3.4-1~bpo13+1), linux-image-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-modules-amd64 (= 7.3.4-1~bpo13+1)\n\n\
             Package: linux-image-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n\n\
             Package: linux-base-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\n\n\
             Package: linux-binary-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n\n\
             Package: linux-modules-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\nDepends: kmod, linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n",
        );
        let got = resolve_one(lookup_in(&idx), &spec("linux-image-amd64")).expect("resolve");
        assert_eq!(
            names(&got),
            [
                "linux-image-7.3.4+deb13-amd64",
                "linux-base-7.3.4+deb13-amd64",
                "linux-binary-7.3.4+deb13-amd64",
                "linux-modules-7.3.4+deb13-amd64"
            ]
        );
    }

    #[test]
    fn a_part_with_another_version_is_a_mid_update_error() {
        let idx = index(
            "Package: linux-image-amd64\nVersion: 7.3.4-1\nDepends: linux-image-7.3.4-amd64 (= 7.3.4-1)\n\n\
             Package: linux-image-7.3.4-amd64\nVersion: 7.3.4-1\nDepends: linux-binary-7.3.4-amd64 (= 7.3.4-1)\n\n\
             Package: linux-binary-7.3.4-amd64\nVersion: 7.3.3-1\n",
        );
        let err = resolve_one(lookup_in(&idx), &spec("linux-image-amd64"))
            .expect_err("mismatch")
            .to_string();
        assert!(err.contains("mid-update"), "{err}");
        let err = resolve_one(lookup_in(&idx[..1]), &spec("linux-image-amd64"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("resolving metapackage"), "{err}");
    }
}
