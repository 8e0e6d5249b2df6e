//! Finding the Debian archive mirror in the host's apt configuration.
//!
//! The repository never names a mirror: the pipeline reads `/etc/apt/sources.list`,
//! `/etc/apt/sources.list.d/*.list` (one-line format) and `*.sources` (deb822), and picks the
//! first `deb` entry that is Debian's main archive (signed by `debian-archive-keyring`, or serving
//! a Debian suite), skipping security and third-party repositories. `--mirror` or
//! `WORKER_APT_MIRROR` override it (for example with a snapshot mirror).

use std::path::Path;

/// One `deb` source entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    pub uri: String,
    pub suites: Vec<String>,
    pub signed_by: Option<String>,
}

const DEBIAN_CODENAMES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "oldstable",
    "testing",
    "unstable",
];

impl SourceEntry {
    /// Whether this entry is Debian's main archive (not security, not a third party).
    pub fn is_debian_archive(&self) -> bool {
        if self.suites.iter().any(|s| s.ends_with("-security"))
            || self.uri.trim_end_matches('/').ends_with("-security")
        {
            return false;
        }
        let signed_by_debian = self
            .signed_by
            .as_deref()
            .is_some_and(|k| k.contains("debian-archive-keyring"));
        let debian_suite = self.suites.iter().any(|s| {
            let base = s.split('-').next().unwrap_or(s);
            DEBIAN_CODENAMES.contains(&base)
        });
        match &self.signed_by {
            // An explicit keyring must be Debian's (a third party may reuse suite names).
            Some(_) => signed_by_debian,
            None => debian_suite,
        }
    }
}

/// Parse one-line `sources.list` text (only `deb` lines).
pub fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = match line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        {
            Some(r) => r.trim_start(),
            None => continue,
        };
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some(end) = opts.find(']') else { continue };
            for opt in opts[..end].split_whitespace() {
                if let Some(v) = opt.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_string());
                }
            }
            rest = opts[end + 1..].trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(SourceEntry {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            signed_by,
        });
    }
    out
}

/// Parse deb822 `.sources` text (only stanzas with `Types: deb` that are not disabled).
pub fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for stanza in split_stanzas(text) {
        let get = |k: &str| {
            stanza
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        if !get("Types")
            .unwrap_or("")
            .split_whitespace()
            .any(|t| t == "deb")
        {
            continue;
        }
        if get("Enabled").is_some_and(|v| v.trim().eq_ignore_ascii_case("no")) {
            continue;
        }
        let suites: Vec<String> = get("Suites")
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let signed_by = get("Signed-By").map(|v| v.trim().to_string());
        for uri in get("URIs").unwrap_or("").split_whitespace() {
            out.push(SourceEntry {
                uri: uri.to_string(),
                suites: suites.clone(),
                signed_by: signed_by.clone(),
            });
        }
    }
    out
}

/// Split deb822 text into stanzas of (key, value) with continuation lines folded in.
fn split_stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stanzas = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !cur.is_empty() {
                stanzas.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some((_, v)) = cur.last_mut() {
                v.push('\n');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        stanzas.push(cur);
    }
    stanzas
}

/// Read every source entry under an apt configuration root (`/etc/apt` normally), in apt's order.
pub fn read_apt_sources(etc_apt: &Path) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(etc_apt.join("sources.list")) {
        out.extend(parse_one_line(&text));
    }
    let mut files: Vec<_> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_one_line(&text)),
            Some("sources") => out.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    out
}

/// The Debian archive mirror configured under `etc_apt`, without a trailing slash.
pub fn derive_mirror(etc_apt: &Path) -> Option<String> {
    read_apt_sources(etc_apt)
        .into_iter()
        .find(|e| {
            e.is_debian_archive()
                && (e.uri.starts_with("http://")
                    || e.uri.starts_with("https://")
                    || e.uri.starts_with("file:"))
        })
        .map(|e| e.uri.trim_end_matches('/').to_string())
}

/// The mirror to use: explicit override, then `WORKER_APT_MIRROR`, then the host's apt config.
pub fn resolve_mirror(explicit: Option<&str>) -> anyhow::Result<String> {
    if let Some(m) = explicit.filter(|m| !m.is_empty()) {
        return Ok(m.trim_end_matches('/').to_string());
    }
    if let Ok(m) = std::env::var("WORKER_APT_MIRROR")
        && !m.is_empty()
    {
        return Ok(m.trim_end_matches('/').to_string());
    }
    derive_mirror(Path::new("/etc/apt")).ok_or_else(|| {
        anyhow::anyhow!(
            "found no Debian archive in /etc/apt/sources.list{{,.d/*.list,.d/*.sources}}: \
             pass --mirror URL or set WORKER_APT_MIRROR (a Debian mirror or snapshot URL)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_the_archive_not_security_or_third_party() {
        let text = "Types: deb\n# comment\nURIs: https://example.invalid/node\nSuites: nodistro\nComponents: main\n\
                    Signed-By: /usr/share/keyrings/nodesource.gpg\n\n\
                    Types: deb deb-src\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
                    Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        let entries = parse_deb822(text);
        assert_eq!(entries.len(), 3);
        let picked: Vec<_> = entries.iter().filter(|e| e.is_debian_archive()).collect();
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].uri, "http://mirror.example/debian/");
        assert_eq!(picked[0].suites, vec!["bookworm", "bookworm-updates"]);
    }

    #[test]
    fn deb822_skips_disabled_and_source_only() {
        let text = "Types: deb-src\nURIs: http://a/debian\nSuites: bookworm\n\n\
                    Enabled: no\nTypes: deb\nURIs: http://b/debian\nSuites: bookworm\n\n\
                    Types: deb\nURIs: http://c/debian\nSuites: trixie\n";
        let uris: Vec<_> = parse_deb822(text).into_iter().map(|e| e.uri).collect();
        assert_eq!(uris, vec!["http://c/debian"]);
    }

    #[test]
    fn one_line_format_with_options_and_comments() {
        let text = "# deb http://commented/debian bookworm main\n\
                    deb-src http://src/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/usr/share/keyrings/other.gpg] https://third.party/apt stable main\n\
                    deb http://security.example/debian-security bookworm-security main\n\
                    deb http://mirror.example/debian bookworm main contrib # trailing\n";
        let entries = parse_one_line(text);
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].signed_by.as_deref(),
            Some("/usr/share/keyrings/other.gpg")
        );
        assert!(!entries[0].is_debian_archive(), "third-party keyring");
        assert!(!entries[1].is_debian_archive(), "security");
        assert!(entries[2].is_debian_archive());
    }

    #[test]
    fn derives_from_a_directory_in_apt_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("sources.list"), "# empty\n").expect("write");
        let d = dir.path().join("sources.list.d");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(
            d.join("a-vendor.list"),
            "deb [signed-by=/k/vendor.gpg] https://vendor/apt bookworm main\n",
        )
        .expect("write");
        std::fs::write(
            d.join("debian.sources"),
            "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .expect("write");
        std::fs::write(
            d.join("z.list.disabled"),
            "deb http://disabled/debian bookworm main\n",
        )
        .expect("write");
        assert_eq!(
            derive_mirror(dir.path()).as_deref(),
            Some("http://mirror.example/debian")
        );
        std::fs::remove_file(d.join("debian.sources")).expect("rm");
        assert_eq!(derive_mirror(dir.path()), None);
    }
}
