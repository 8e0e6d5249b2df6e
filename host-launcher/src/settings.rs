//! Launch settings: the `worker.yaml` file, the command-line overrides, and their validation.
//!
//! Precedence, highest first: command-line flag, YAML file, the image manifest's `launch`
//! defaults, built-in defaults. Relative paths in the YAML file are resolved against the
//! directory of that file, so a config can travel together with its image.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

/// Which trusted execution environment the guest runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tee {
    /// Intel TDX under KVM (production; needs QEMU >= 10.1 and a TDX-enabled host kernel).
    Tdx,
    /// No TEE: the same image under QEMU, with KVM when this host can run it, else the TCG
    /// emulator (tests and demos; nothing is attested; see [`AccelMode`]).
    None,
}

impl fmt::Display for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tee::Tdx => "tdx",
            Tee::None => "none",
        })
    }
}

/// Which accelerator `--tee none` asks for (`--tee tdx` always runs under KVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM when `/dev/kvm` can really create VMs on a CPU with VMX/SVM, else TCG.
    #[default]
    Auto,
    /// KVM or an error that says why not and what to fix.
    Kvm,
    /// TCG emulation, without looking at `/dev/kvm`.
    Tcg,
}

/// A guest memory size, kept in MiB (QEMU's unit for `-m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize {
    pub mib: u64,
}

impl FromStr for MemSize {
    type Err = String;

    /// Accepts `2048` (MiB), `2048M`, `2048MiB`, `2G`, `2GiB`, `1T` (binary units, as QEMU);
    /// the parser is `gateway::trust::MemMib`'s, shared with `verify --memory`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let gateway::trust::MemMib(mib) = s.parse()?;
        Ok(MemSize { mib })
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}M", self.mib)
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MemSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a memory size such as 2048 (MiB), 2048M, 2G or 2GiB")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MemSize, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MemSize, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MemSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A PCI address `DDDD:BB:DD.F` (domain optional on input), normalised to lowercase with domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciBdf(String);

impl PciBdf {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PciBdf {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid PCI address `{s}`: expected DDDD:BB:DD.F or BB:DD.F in hex, \
                 e.g. 0000:3b:00.0 (see `lspci -D` for your GPU)"
            )
        };
        let t = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = t.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (*d, *b, *df),
            [b, df] => ("0000", *b, *df),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let hex = |x: &str, len: usize| x.len() == len && x.bytes().all(|c| c.is_ascii_hexdigit());
        if !hex(domain, 4) || !hex(bus, 2) || !hex(dev, 2) || !hex(func, 1) {
            return Err(bad());
        }
        let dev_n = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
        let func_n = u8::from_str_radix(func, 16).map_err(|_| bad())?;
        if dev_n > 0x1f || func_n > 7 {
            return Err(format!(
                "invalid PCI address `{s}`: device must be 00-1f and function 0-7"
            ));
        }
        Ok(PciBdf(format!("{domain}:{bus}:{dev}.{func}")))
    }
}

impl<'de> Deserialize<'de> for PciBdf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The `worker.yaml` document. Every field is optional; unknown keys are errors (typos must
/// not silently fall back to defaults).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub image: Option<PathBuf>,
    pub tee: Option<Tee>,
    /// Accelerator for `--tee none` (default auto).
    pub accel: Option<AccelMode>,
    pub memory: Option<MemSize>,
    pub cpus: Option<u32>,
    pub gpu: Option<PciBdf>,
    /// Several GPUs (a shape with `gpus: N` takes N); not together with `gpu`.
    pub gpus: Option<Vec<PciBdf>>,
    /// TDX launch shape from the image's manifest (`launch.tdx.shapes`); default: the shape
    /// whose memory, vCPUs and GPU count match the launch.
    pub shape: Option<String>,
    /// Launch `--tee tdx` outside the declared shapes / QEMU releases (the image hash of such a
    /// launch is on no allow-list).
    pub allow_unlisted_shape: Option<bool>,
    /// Packed dm-verity model disk (`cargo xtask model pack`'s directory or its model.json).
    pub model_disk: Option<PathBuf>,
    /// Model file on the host, attached read-only as a raw model disk (small models).
    pub model: Option<PathBuf>,
    pub model_sha256: Option<String>,
    /// The model's id on `/v1/*` (default: the file name without extension, lowercased).
    pub model_name: Option<String>,
    pub payout_wallet: Option<String>,
    pub root_contract: Option<String>,
    pub listen_port: Option<u16>,
    pub console_log: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub health_timeout_secs: Option<u64>,
    pub shutdown_timeout_secs: Option<u64>,
    pub guest_cid: Option<u32>,
    /// DEVELOPMENT ONLY: let the guest serve on GPUs that are not in confidential-computing
    /// mode (measured in the host config).
    pub dev_allow_gpu_without_cc: Option<bool>,
    /// Mutual RA-TLS: PEM certificates of the only TLS clients the agent admits (pinned by
    /// SHA-256 in the measured host config and the RTMR3 `client_auth` event).
    pub allow_client_cert: Option<Vec<PathBuf>>,
}

/// A YAML settings error with its position, formatted `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key the error is about, when it can be named.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": ")?;
        if let Some(k) = &self.key {
            write!(f, "key `{k}`: ")?;
        }
        write!(
            f,
            "{}\n(see host-launcher/examples/worker.yaml for every accepted key)",
            self.message
        )
    }
}

impl std::error::Error for YamlError {}

/// Parses a `worker.yaml` text; `file` is only used for messages.
pub fn parse_yaml(text: &str, file: &Path) -> Result<FileSettings, YamlError> {
    if text.trim().is_empty() {
        return Ok(FileSettings::default());
    }
    serde_yaml_ng::from_str::<FileSettings>(text).map_err(|e| {
        let loc = e.location();
        let message = e.to_string();
        let key = offending_key(&message, text, loc.as_ref().map(|l| l.line()));
        let mut message = strip_location(&message);
        if let Some(rest) = key
            .as_ref()
            .and_then(|k| message.strip_prefix(&format!("{k}: ")))
        {
            message = rest.to_owned();
        }
        YamlError {
            file: file.to_path_buf(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            key,
            message,
        }
    })
}

/// The key an error message is about: `unknown field `x``, a `key: ...` path prefix, or the key
/// written on the error's line.
fn offending_key(message: &str, text: &str, line: Option<usize>) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    if let Some((path, _)) = message.split_once(": ")
        && !path.contains(' ')
        && !path.is_empty()
    {
        return Some(path.to_owned());
    }
    let l = line?;
    let src = text.lines().nth(l.checked_sub(1)?)?;
    let (k, _) = src.split_once(':')?;
    let k = k.trim().trim_start_matches("- ");
    (!k.is_empty() && !k.contains(' ') && !k.starts_with('#')).then(|| k.to_owned())
}

/// serde_yaml_ng appends " at line L column C"; the position is printed separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Reads and parses a YAML settings file; relative paths become relative to its directory.
pub fn load_yaml(path: &Path) -> anyhow::Result<FileSettings> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read settings file {}: check the --config path",
            path.display()
        )
    })?;
    let mut s = parse_yaml(&text, path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [
        &mut s.image,
        &mut s.console_log,
        &mut s.run_dir,
        &mut s.cache_dir,
        &mut s.model,
        &mut s.model_disk,
    ]
    .into_iter()
    .flatten()
    .chain(s.allow_client_cert.iter_mut().flatten())
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(s)
}

/// Overlays `over` (command line) on `base` (file): fields set in `over` win.
pub fn overlay(base: FileSettings, over: FileSettings) -> FileSettings {
    let (over_has_gpu, over_has_gpus) = (over.gpu.is_some(), over.gpus.is_some());
    let (over_has_model, over_has_model_disk) = (over.model.is_some(), over.model_disk.is_some());
    FileSettings {
        image: over.image.or(base.image),
        tee: over.tee.or(base.tee),
        accel: over.accel.or(base.accel),
        memory: over.memory.or(base.memory),
        cpus: over.cpus.or(base.cpus),
        // The command line's GPUs replace the file's, whichever key either used.
        gpu: if over_has_gpus {
            over.gpu
        } else {
            over.gpu.or(base.gpu)
        },
        gpus: if over_has_gpu {
            over.gpus
        } else {
            over.gpus.or(base.gpus)
        },
        shape: over.shape.or(base.shape),
        allow_unlisted_shape: over.allow_unlisted_shape.or(base.allow_unlisted_shape),
        // The command line's model replaces the file's, whichever key either used.
        model: if over_has_model_disk {
            over.model
        } else {
            over.model.or(base.model)
        },
        model_disk: if over_has_model {
            over.model_disk
        } else {
            over.model_disk.or(base.model_disk)
        },
        // A packed disk carries its own name and digest: the file's raw-model keys do not apply.
        model_sha256: if over_has_model_disk {
            over.model_sha256
        } else {
            over.model_sha256.or(base.model_sha256)
        },
        model_name: if over_has_model_disk {
            over.model_name
        } else {
            over.model_name.or(base.model_name)
        },
        payout_wallet: over.payout_wallet.or(base.payout_wallet),
        root_contract: over.root_contract.or(base.root_contract),
        listen_port: over.listen_port.or(base.listen_port),
        console_log: over.console_log.or(base.console_log),
        run_dir: over.run_dir.or(base.run_dir),
        cache_dir: over.cache_dir.or(base.cache_dir),
        qemu: over.qemu.or(base.qemu),
        health_timeout_secs: over.health_timeout_secs.or(base.health_timeout_secs),
        allow_client_cert: over.allow_client_cert.or(base.allow_client_cert),
        shutdown_timeout_secs: over.shutdown_timeout_secs.or(base.shutdown_timeout_secs),
        guest_cid: over.guest_cid.or(base.guest_cid),
        dev_allow_gpu_without_cc: over
            .dev_allow_gpu_without_cc
            .or(base.dev_allow_gpu_without_cc),
    }
}

/// Checks a lowercase 64-hex-digit SHA-256.
pub fn validate_sha256_hex(what: &str, v: &str) -> Result<(), String> {
    if v.len() == 64 && v.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!(
            "{what} `{v}` is not a SHA-256: write 64 lowercase hex digits (as `sha256sum` prints)"
        ))
    }
}

/// Checks a TON address: user-friendly (48 base64/base64url characters, checksum verified) or raw
/// (`<workchain>:<64 hex>`), so a typo is caught before the address is measured into the guest.
pub fn validate_ton_address(what: &str, v: &str) -> Result<(), String> {
    // Full parse: base64 alphabet, length, tag byte and CRC16 checksum of the friendly form, or the
    // raw <workchain>:<64 hex> form. The network flag is not checked here (`Local` accepts both):
    // `--network` is checked where the address is used on chain.
    ton_root::wallet::parse_address(v, ton_root::wallet::Network::Local)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{what} `{v}` is not a valid TON address ({e}): use the 48-character form \
                 (EQ.../UQ..., copied whole; its checksum must match) or the raw form \
                 <workchain>:<64 hex digits>"
            )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_in_binary_units() {
        for (s, mib) in [
            ("2048", 2048),
            ("2048M", 2048),
            ("2048MiB", 2048),
            ("2G", 2048),
            ("2GiB", 2048),
            ("1T", 1024 * 1024),
            (" 512M ", 512),
        ] {
            assert_eq!(s.parse::<MemSize>(), Ok(MemSize { mib }), "{s}");
        }
        for bad in ["", "G", "2X", "2.5G", "-1G", "32M", "99999999999999999999T"] {
            let e = bad.parse::<MemSize>().expect_err(bad);
            assert!(e.contains("memory size"), "{bad}: {e}");
        }
        assert_eq!(MemSize { mib: 2048 }.to_string(), "2048M");
    }

    #[test]
    fn pci_addresses_are_validated_and_normalised() {
        assert_eq!(
            "0000:3B:00.0".parse::<PciBdf>().unwrap().as_str(),
            "0000:3b:00.0"
        );
        assert_eq!(
            "3b:00.0".parse::<PciBdf>().unwrap().as_str(),
            "0000:3b:00.0"
        );
        assert_eq!(
            "0001:ff:1f.7".parse::<PciBdf>().unwrap().as_str(),
            "0001:ff:1f.7"
        );
        for bad in [
            "",
            "3b:00",
            "3b.00.0",
            "0000:3b:00.8",
            "0000:3b:20.0",
            "000:3b:00.0",
            "0000:3g:00.0",
            "0000:3b:00.0;rm",
            "a:b:c:d",
        ] {
            assert!(bad.parse::<PciBdf>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn yaml_parses_every_key() {
        let y = "image: out/worker\ntee: none\nmemory: 2G\ncpus: 2\ngpu: '3b:00.0'\n\
                 model: smollm2\nmodel_sha256: null\nlisten_port: 18443\nhealth_timeout_secs: 30\n";
        let s = parse_yaml(y, Path::new("w.yaml")).unwrap();
        assert_eq!(s.tee, Some(Tee::None));
        assert_eq!(s.memory, Some(MemSize { mib: 2048 }));
        assert_eq!(s.cpus, Some(2));
        assert_eq!(s.gpu.unwrap().as_str(), "0000:3b:00.0");
        assert_eq!(s.listen_port, Some(18443));
        assert_eq!(s.health_timeout_secs, Some(30));
        assert_eq!(s.accel, None);
        for (v, want) in [
            ("auto", AccelMode::Auto),
            ("kvm", AccelMode::Kvm),
            ("tcg", AccelMode::Tcg),
        ] {
            let s = parse_yaml(&format!("accel: {v}\n"), Path::new("w.yaml")).unwrap();
            assert_eq!(s.accel, Some(want), "{v}");
        }
        let e = parse_yaml("accel: hvf\n", Path::new("w.yaml")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accel"), "{e}");
        let s = parse_yaml("memory: 4096\n", Path::new("w.yaml")).unwrap();
        assert_eq!(s.memory, Some(MemSize { mib: 4096 }));
        assert_eq!(
            parse_yaml("# nothing\n", Path::new("w.yaml")).unwrap(),
            FileSettings::default()
        );
    }

    #[test]
    fn yaml_unknown_key_names_line_column_and_key() {
        let e = parse_yaml("tee: none\nmemroy: 2G\n", Path::new("w.yaml")).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(e.column, Some(1));
        assert_eq!(e.key.as_deref(), Some("memroy"));
        let shown = e.to_string();
        assert!(
            shown.starts_with("w.yaml:2:1: key `memroy`: unknown field"),
            "{shown}"
        );
    }

    #[test]
    fn yaml_bad_values_name_line_column_and_key() {
        let e = parse_yaml("tee: none\ncpus: many\n", Path::new("w.yaml")).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("cpus")), "{e}");
        assert!(e.column.is_some());
        let e = parse_yaml("memory: 2X\n", Path::new("w.yaml")).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("memory")), "{e}");
        assert!(e.message.contains("unit"), "{e}");
        let e = parse_yaml("tee: sgx\n", Path::new("w.yaml")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tee"), "{e}");
        let e = parse_yaml("gpu: '3b:00'\n", Path::new("w.yaml")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("gpu"), "{e}");
        let e = parse_yaml("tee: [none\n", Path::new("w.yaml")).unwrap_err();
        assert!(e.line.is_some(), "syntax errors carry a position: {e}");
    }

    #[test]
    fn example_file_parses() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/worker.yaml"));
        let s = load_yaml(p).unwrap();
        assert_eq!(s.tee, Some(Tee::None));
        assert!(s.image.unwrap().ends_with("out/worker"));
        // Every commented-out key is valid too.
        let text = std::fs::read_to_string(p).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(": ").is_some_and(|(k, _)| {
                        k.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let all = parse_yaml(&uncommented, p).unwrap();
        assert_eq!(all.memory, Some(MemSize { mib: 4096 }));
        assert_eq!(all.guest_cid, Some(3));
        assert_eq!(all.dev_allow_gpu_without_cc, Some(false));
        assert_eq!(all.accel, Some(AccelMode::Auto));
        assert!(all.payout_wallet.is_some() && all.shutdown_timeout_secs.is_some());
    }

    #[test]
    fn overlay_prefers_command_line() {
        let file = FileSettings {
            cpus: Some(1),
            tee: Some(Tee::Tdx),
            ..FileSettings::default()
        };
        let cli = FileSettings {
            tee: Some(Tee::None),
            ..FileSettings::default()
        };
        let s = overlay(file, cli);
        assert_eq!((s.cpus, s.tee), (Some(1), Some(Tee::None)));
        let file = FileSettings {
            accel: Some(AccelMode::Kvm),
            ..FileSettings::default()
        };
        assert_eq!(
            overlay(file.clone(), FileSettings::default()).accel,
            Some(AccelMode::Kvm)
        );
        let cli = FileSettings {
            accel: Some(AccelMode::Tcg),
            ..FileSettings::default()
        };
        assert_eq!(overlay(file, cli).accel, Some(AccelMode::Tcg));
    }

    #[test]
    fn relative_yaml_paths_follow_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("worker.yaml");
        std::fs::write(&p, "image: out/worker\nconsole_log: /var/log/c.log\n").unwrap();
        let s = load_yaml(&p).unwrap();
        assert_eq!(s.image, Some(d.path().join("out/worker")));
        assert_eq!(s.console_log, Some(PathBuf::from("/var/log/c.log")));
    }

    #[test]
    fn the_command_line_model_replaces_the_file_s_either_way() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("worker.yaml");
        std::fs::write(&p, "model_disk: models/smollm2-135m\n").unwrap();
        let file = load_yaml(&p).unwrap();
        assert_eq!(file.model_disk, Some(d.path().join("models/smollm2-135m")));
        // --model on the command line replaces the file's model_disk (and vice versa), so the
        // two never reach the launcher together from different sources.
        let cli = FileSettings {
            model: Some("m.gguf".into()),
            ..FileSettings::default()
        };
        let s = overlay(file.clone(), cli);
        assert_eq!(
            (s.model.as_deref(), s.model_disk),
            (Some(Path::new("m.gguf")), None)
        );
        let raw_file = FileSettings {
            model: Some("old.gguf".into()),
            model_sha256: Some("ab".repeat(32)),
            model_name: Some("old".into()),
            ..FileSettings::default()
        };
        let cli = FileSettings {
            model_disk: Some("packed".into()),
            ..FileSettings::default()
        };
        let s = overlay(raw_file, cli);
        assert_eq!(
            (
                s.model,
                s.model_sha256,
                s.model_name,
                s.model_disk.as_deref()
            ),
            (None, None, None, Some(Path::new("packed")))
        );
        assert!(overlay(file, FileSettings::default()).model_disk.is_some());
    }

    #[test]
    fn hashes_and_addresses_are_checked() {
        assert!(validate_sha256_hex("model_sha256", &"a".repeat(64)).is_ok());
        assert!(validate_sha256_hex("model_sha256", &"A".repeat(64)).is_err());
        assert!(validate_sha256_hex("model_sha256", "abc").is_err());
        let friendly = "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73k";
        assert!(validate_ton_address("root_contract", friendly).is_ok());
        assert!(validate_ton_address("w", &format!("0:{}", "ab".repeat(32))).is_ok());
        assert!(validate_ton_address("w", &format!("-1:{}", "ab".repeat(32))).is_ok());
        assert!(validate_ton_address("w", "EQshort").is_err());
        assert!(validate_ton_address("w", "0:xyz").is_err());
        // One changed character breaks the CRC16 checksum of the friendly form.
        let typo = "EQCns7bYSp0igFvS1wpb5wsZjCKCV19MD5AVzI4EyxsnU73j";
        let e = validate_ton_address("root_contract", typo).expect_err("checksum");
        assert!(e.contains("checksum must match"), "{e}");
    }
}
