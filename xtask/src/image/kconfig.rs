//! Kernel-configuration check: the options `worker.yaml` (`kernel.required_config`) says the image
//! cannot work without, checked against the locked kernel's own `config` file at build time.
//!
//! A requirement is `CONFIG_NAME=y` (built in), `CONFIG_NAME=m` (a module), or `CONFIG_NAME`
//! (either). A failing check names every missing option and what the kernel has instead.

use std::collections::BTreeMap;

/// Parse a kernel `.config`: `CONFIG_X=value` lines; `# CONFIG_X is not set` and comments are
/// skipped (an option that is absent is "not set").
pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("CONFIG_"))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Check every requirement; `Err` lists each unmet one.
pub fn check(config: &BTreeMap<String, String>, required: &[String]) -> Result<(), String> {
    let mut missing = Vec::new();
    for req in required {
        let (name, want) = match req.split_once('=') {
            Some((n, w)) => (n, Some(w)),
            None => (req.as_str(), None),
        };
        let have = config.get(name).map(String::as_str);
        let ok = match (want, have) {
            (Some(w), Some(h)) => w == h,
            (None, Some(h)) => h == "y" || h == "m",
            (_, None) => false,
        };
        if !ok {
            missing.push(format!(
                "{req} (the kernel has {})",
                have.map(|h| format!("{name}={h}"))
                    .unwrap_or_else(|| "it not set".into())
            ));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// Validate the syntax of one requirement (for worker.yaml parsing).
pub fn valid_requirement(req: &str) -> bool {
    let (name, want) = match req.split_once('=') {
        Some((n, w)) => (n, Some(w)),
        None => (req, None),
    };
    name.len() > "CONFIG_".len()
        && name.starts_with("CONFIG_")
        && name[7..]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && want.is_none_or(|w| w == "y" || w == "m")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "#\n# Automatically generated file; DO NOT EDIT.\n#\nCONFIG_INTEL_TDX_GUEST=y\n\
        CONFIG_TDX_GUEST_DRIVER=m\nCONFIG_TSM_MEASUREMENTS=y\n# CONFIG_INTEL_TDX_HOST is not set\n\
        CONFIG_MODULE_SIG_HASH=\"sha256\"\n";

    #[test]
    fn parses_set_options_only() {
        let c = parse(CONFIG);
        assert_eq!(c["CONFIG_TDX_GUEST_DRIVER"], "m");
        assert_eq!(c["CONFIG_MODULE_SIG_HASH"], "\"sha256\"");
        assert!(!c.contains_key("CONFIG_INTEL_TDX_HOST"));
    }

    #[test]
    fn checks_exact_and_either_requirements() {
        let c = parse(CONFIG);
        let req = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check(
            &c,
            &req(&[
                "CONFIG_INTEL_TDX_GUEST=y",
                "CONFIG_TDX_GUEST_DRIVER",
                "CONFIG_TSM_MEASUREMENTS=y",
            ]),
        )
        .expect("all met");
        let err = check(
            &c,
            &req(&[
                "CONFIG_TDX_GUEST_DRIVER=y",
                "CONFIG_INTEL_TDX_HOST",
                "CONFIG_TSM_MEASUREMENTS=y",
            ]),
        )
        .expect_err("two unmet");
        assert!(
            err.contains("CONFIG_TDX_GUEST_DRIVER=y (the kernel has CONFIG_TDX_GUEST_DRIVER=m)"),
            "{err}"
        );
        assert!(
            err.contains("CONFIG_INTEL_TDX_HOST (the kernel has it not set)"),
            "{err}"
        );
        assert!(!err.contains("TSM_MEASUREMENTS"), "{err}");
    }

    #[test]
    fn validates_requirement_syntax() {
        assert!(valid_requirement("CONFIG_TSM_MEASUREMENTS=y"));
        assert!(valid_requirement("CONFIG_VFIO_PCI"));
        assert!(valid_requirement("CONFIG_EROFS_FS=m"));
        assert!(!valid_requirement("TSM_MEASUREMENTS=y"));
        assert!(!valid_requirement("CONFIG_X=n"));
        assert!(!valid_requirement("CONFIG_lower"));
        assert!(!valid_requirement("CONFIG_"));
    }
}
