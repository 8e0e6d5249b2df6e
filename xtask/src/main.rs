//! `cargo xtask`: the project's task runner (image pipeline, demo, model fetch, benchmarks).
//!
//! See ARCHITECTURE.md for the pipeline; `cargo xtask <command> --help` for each command.

mod bench;
mod bench_gateway;
mod bench_model_disk;
mod chain;
mod demo;
mod image;
mod model;
mod progress;
mod test_cmd;
mod tools;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use image::build::BuildOptions;
use image::definition::ImageDefinition;

/// Task runner of the confidential worker.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    about,
    after_help = "Typical use:\n  \
        cargo xtask image lock          # pin image/worker.yaml's packages in image/worker.lock\n  \
        cargo xtask image build         # out/worker/: OVMF.fd vmlinuz initrd cmdline manifest.json\n  \
        cargo xtask image repro-check   # build twice, compare every byte\n  \
        cargo xtask image package       # out/worker-<version>.tar.zst + .sha256\n  \
        cargo xtask image audit out/worker-0.1.0.tar.zst  # rebuild, compare every byte and register (exit 0 reproduced)\n  \
        cargo xtask image capture-acpi  # boot once (QEMU TCG), save out/worker/acpi/, add RTMR0 to measurements.json\n  \
        cargo xtask demo                # tools, build, boot under QEMU (no TEE; KVM or TCG), /health, stop\n  \
        cargo xtask test                # install test needs, build the image once, run every suite\n\n\
        Environment: WORKER_CACHE_DIR (download cache), WORKER_APT_MIRROR (Debian mirror or snapshot URL)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The reproducible image pipeline: lock, build, repro-check, package, audit, capture-acpi.
    #[command(subcommand)]
    Image(ImageCmd),
    /// The whole story on local defaults (no TDX, no GPU, no internet beyond package registries):
    /// install missing host tools (QEMU 10 from bookworm-backports), build the image, capture
    /// its launch ACPI tables (measurements.json then has every register and the image hash),
    /// start the local chain and publish the image hash to its root contract, boot the image
    /// under QEMU without TEE with host-launcher checking the hash on-chain first, wait for
    /// /health, stop cleanly, and report timings.
    Demo {
        #[command(flatten)]
        build: BuildArgs,
        /// Print the timings as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The README's test command: install what the tests need (host tools, npm packages, the
    /// small model), build the image once, then run `cargo test --workspace` (unit and end-to-end
    /// tests with real QEMU) and the contract's tests. Prints a table of step times.
    Test {
        #[command(flatten)]
        build: BuildArgs,
        /// Never install host packages; fail naming what is missing instead.
        #[arg(long)]
        no_install: bool,
        /// Extra arguments for `cargo test` (e.g. `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Start the local chain: an @ton/sandbox TVM with the root contract and a funded team
    /// wallet, serving a toncenter v2 subset on 127.0.0.1 (default port 8081). Arguments after
    /// `--` go to the server, e.g. `cargo xtask chain -- --port 0 --state-file chain.json`.
    Chain {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Models for the inference engine.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Subcommand)]
enum ModelCmd {
    /// Download a pinned model and check its sha256.
    Fetch {
        /// Model name.
        name: String,
        /// Directory to put it in (default: the model cache).
        #[arg(long)]
        dest: Option<PathBuf>,
    },
    /// Pack a GGUF into a dm-verity model disk: DIR/model.img (the GGUF, zeros to 4 KiB, the
    /// hash tree: SHA-256, 4096-byte blocks, verity format 1, fixed salt, no superblock) and
    /// DIR/model.json (sizes, hashes, verity parameters, root hash, model hash
    /// sha256("name@revision:root")). Byte-identical output for the same file, name and
    /// revision. Format: measurements/README.md, "Model disks".
    #[command(after_help = "Example:
          cargo xtask model pack ~/.cache/confidential-worker/models/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-135m --revision v0.1.2
          host-launcher publish model-hash out/models/smollm2-135m/model.json --root ... --rpc ...")]
    Pack {
        /// The GGUF file.
        gguf: PathBuf,
        /// Model name: 1-128 characters from A-Z a-z 0-9 . _ - (no leading . or -).
        #[arg(long)]
        name: String,
        /// Revision, e.g. the upstream commit (same characters as --name). Default: sha256-
        /// and the first 16 hex digits of the file's SHA-256.
        #[arg(long)]
        revision: Option<String>,
        /// Output directory, created if missing (default: out/models/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
        /// Print model.json on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Inference benchmark; arguments are passed through.
    Inference {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Gateway overhead vs a direct RA-TLS connection, and concurrent streams; arguments are
    /// passed through (--help lists them).
    Gateway {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Structured output: decode tokens/s with a JSON schema vs unconstrained, schema compile
    /// and token-mask times; arguments are passed through (see `--help`).
    Structured {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// dm-verity model disk vs copy-and-hash: guest load throughput, raw vs verity read,
    /// memory high-water mark of a 1.5 GiB model, boot-to-first-token (boots QEMU; --help).
    ModelDisk {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Resolve every package of image/worker.yaml against the signed Debian indexes (private apt
    /// configuration; mirror taken from the host's apt sources) and write image/worker.lock.
    Lock {
        /// Debian mirror or snapshot URL (default: the Debian archive of the host's apt sources).
        #[arg(long, env = "WORKER_APT_MIRROR")]
        mirror: Option<String>,
        /// Cache directory (private apt state lives in <cache>/apt-state).
        #[arg(long, env = "WORKER_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Only check that the lock is up to date; exit 1 if it would change.
        #[arg(long)]
        check: bool,
        /// Print the lock as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Build out/<image>/ (OVMF.fd, vmlinuz, initrd, cmdline, manifest.json) from exactly the
    /// locked inputs. The same commit and lock give byte-identical outputs anywhere.
    Build {
        #[command(flatten)]
        build: BuildArgs,
        /// Print a JSON report (files, sizes, timings) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Build twice in two temporary directories (sharing only the download cache) and compare
    /// every output byte for byte; exit 1 naming the files that differ.
    ///
    /// With --host SUITE the second build runs inside a clean Debian root of SUITE made by
    /// mmdebstrap from the same mirror (installed if missing and run as root), with the
    /// repository at another path: only the pinned Rust toolchain, the crate sources and the
    /// verified .deb cache are shared. A difference is named down to the initrd entry and, for
    /// the agent, the first differing ELF section. Needs root or unprivileged user namespaces.
    ReproCheck {
        #[command(flatten)]
        build: BuildArgs,
        /// Build the second time inside a clean root of this Debian suite (e.g. trixie).
        #[arg(long, value_name = "SUITE", value_parser = image::crosshost::parse_suite)]
        host: Option<String>,
        /// Keep both build directories for inspection.
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write one deterministic archive <name>-<version>.tar.zst of out/<image>/ plus its .sha256.
    Package {
        /// Image directory to package (default: out/<name>).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Where to write the archive (default: out/).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Audit a release in one command: open the bundle (or image directory), rebuild the image
    /// from this checkout and its lock, compare every part byte for byte (manifest.json field by
    /// field), check the bundle's acpi/ (launch data captured from QEMU, used as is), compute
    /// MRTD, RTMR0-3 and both image hashes from the rebuilt parts and that acpi/ and compare them
    /// with the bundle's measurements.json; with --root/--rpc also ask the root contract whether
    /// the cw-v1 image hash is approved.
    #[command(after_help = "Exit status:\n  \
        0  reproduced (and approved on chain, when --root was given)\n  \
        1  usage or build error (nothing was judged)\n  \
        3  NOT reproduced: a part or register differs, a file is missing or extra, the bundle was \
        refused (path traversal, link, duplicate entry) or does not match its .sha256\n  \
        4  reproduced, but the root contract does not list the image hash (or the release has no \
        acpi/, hence no image hash)\n  \
        5  reproduced, but the chain could not be asked (never counted as approved)")]
    Audit {
        /// The release: a bundle <name>-<version>.tar.zst from `image package` (a .sha256 beside
        /// it is checked) or an image directory.
        #[arg(value_name = "BUNDLE|DIR")]
        target: PathBuf,
        /// Root contract address (EQ…/UQ…/0:hex): also check that the image hash is approved.
        #[arg(long, value_name = "ADDRESS", requires = "rpc")]
        root: Option<String>,
        /// toncenter v2 endpoint up to /api/v2 for --root (e.g. http://127.0.0.1:8081/api/v2 for
        /// `cargo xtask chain`).
        #[arg(long, value_name = "URL", requires = "root")]
        rpc: Option<String>,
        /// toncenter API key (sent as X-API-Key; never printed).
        #[arg(
            long,
            env = "TONCENTER_API_KEY",
            value_name = "KEY",
            hide_env_values = true
        )]
        api_key: Option<String>,
        /// Keep the rebuilt image in this new (or empty) directory (default: a temporary
        /// directory, removed afterwards).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[command(flatten)]
        build: BuildInputArgs,
        /// Print the report as JSON on stdout (schema_version 1; verdict and exit_code included).
        #[arg(long)]
        json: bool,
    },
    /// Boot the built image once under QEMU (TCG, `host-launcher capture-acpi`) to save the
    /// launch's ACPI blobs in <image>/acpi/, then rewrite <image>/measurements.json, which then
    /// carries RTMR0 and both image hashes. Needs qemu-system-x86_64; `image build` does not.
    /// The tables are this host's QEMU's: see measurements/README.md, "Capturing ACPI".
    CaptureAcpi {
        /// Image directory (default: out/<name>).
        #[arg(long)]
        image: Option<PathBuf>,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
        /// Print RTMR0, the image hashes and what is still missing as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// Output directory of the image (default: out/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    inputs: BuildInputArgs,
}

/// Where a build reads its inputs from (every command that builds the image).
#[derive(Debug, Args)]
struct BuildInputArgs {
    /// Content-addressed .deb cache (default: ${XDG_CACHE_HOME:-~/.cache}/confidential-worker/debs).
    #[arg(long, env = "WORKER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Debian mirror or snapshot URL used to download missing inputs.
    #[arg(long, env = "WORKER_APT_MIRROR")]
    mirror: Option<String>,
    /// Cargo target directory for the agent (default: ${CARGO_TARGET_DIR:-target}/image-agent).
    #[arg(long)]
    agent_target_dir: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

/// Repository root (this crate lives in `<root>/xtask`).
fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

fn definition(repo: &Path) -> anyhow::Result<ImageDefinition> {
    ImageDefinition::load(&repo.join("image/worker.yaml"))
}

impl BuildArgs {
    fn options(&self, repo: &Path) -> anyhow::Result<BuildOptions> {
        let def = definition(repo)?;
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| repo.join("out").join(&def.name));
        self.inputs.options(repo, out)
    }
}

impl BuildInputArgs {
    fn options(&self, repo: &Path, out: PathBuf) -> anyhow::Result<BuildOptions> {
        let target_base = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target"));
        Ok(BuildOptions {
            repo: repo.to_path_buf(),
            out,
            cache: image::cache::cache_dir(self.cache_dir.as_deref())?,
            mirror: self.mirror.clone(),
            agent_target_dir: self
                .agent_target_dir
                .clone()
                .unwrap_or_else(|| target_base.join("image-agent")),
            quiet: self.quiet,
        })
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let repo = repo_root();
    match cli.command {
        Cmd::Image(ImageCmd::Lock {
            mirror,
            cache_dir,
            check,
            json,
        }) => {
            let def = definition(&repo)?;
            let opts = image::resolve::LockOptions {
                mirror,
                cache: image::cache::cache_dir(cache_dir.as_deref())?,
                quiet: json,
            };
            let lock = image::resolve::resolve(&def, &opts)?;
            let path = repo.join("image/worker.lock");
            if check {
                let current = std::fs::read_to_string(&path).unwrap_or_default();
                if current != lock.to_text() {
                    eprintln!(
                        "{} is out of date; run `cargo xtask image lock`:\n{}",
                        path.display(),
                        image::resolve::describe(&lock)
                    );
                    return Ok(ExitCode::FAILURE);
                }
                eprintln!("{} is up to date", path.display());
            } else {
                let changed = image::resolve::write_lock(&path, &lock)?;
                eprintln!(
                    "{} {}:\n{}",
                    path.display(),
                    if changed { "written" } else { "unchanged" },
                    image::resolve::describe(&lock)
                );
            }
            if json {
                print_json(&lock)?;
            }
        }
        Cmd::Image(ImageCmd::Build { build, json }) => {
            let report = image::build::build(&build.options(&repo)?)?;
            if json {
                print_json(&report)?;
            }
        }
        Cmd::Image(ImageCmd::ReproCheck {
            build,
            host: Some(suite),
            keep,
            json,
        }) => {
            let r = image::crosshost::repro_check_host(&build.options(&repo)?, &suite, keep)?;
            if json {
                print_json(&r)?;
            }
            eprintln!(
                "repro-check --host {suite}: root {:.0}s, build on this host {:.0}s, build in {suite} {:.0}s",
                r.seconds_root, r.seconds_host_build, r.seconds_other_build
            );
            if !r.files.ok() {
                for f in &r.files.differing {
                    eprintln!("repro-check: DIFFERS between this host and {suite}: {f}");
                }
                for f in &r.files.only_in_one {
                    eprintln!("repro-check: only in one build: {f}");
                }
                for d in &r.details {
                    eprintln!("repro-check:   {d}");
                }
                return Ok(ExitCode::FAILURE);
            }
            eprintln!(
                "repro-check: OK, this host and {suite} built {} byte-identical files: {}",
                r.files.identical.len(),
                r.files.identical.join(" ")
            );
        }
        Cmd::Image(ImageCmd::ReproCheck {
            build,
            host: None,
            keep,
            json,
        }) => {
            let c = image::repro::repro_check(&build.options(&repo)?, keep)?;
            if json {
                print_json(&c)?;
            }
            if !c.ok() {
                for f in &c.differing {
                    eprintln!("repro-check: DIFFERS: {f}");
                }
                for f in &c.only_in_one {
                    eprintln!("repro-check: only in one build: {f}");
                }
                return Ok(ExitCode::FAILURE);
            }
            eprintln!(
                "repro-check: OK, {} files byte-identical: {}",
                c.identical.len(),
                c.identical.join(" ")
            );
        }
        Cmd::Image(ImageCmd::Audit {
            target,
            root,
            rpc,
            api_key,
            out,
            build,
            json,
        }) => {
            // The build options' own `out` is replaced by the audit's rebuild directory.
            let opts = image::audit::AuditOptions {
                target,
                build: build.options(&repo, std::env::temp_dir())?,
                keep: out,
                chain: match (root, rpc) {
                    (Some(root), Some(rpc)) => {
                        Some(image::audit::ChainTarget { root, rpc, api_key })
                    }
                    _ => None,
                },
            };
            let report = image::audit::audit(&opts)?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", image::audit::render(&report));
            }
            return Ok(ExitCode::from(report.exit_code));
        }
        Cmd::Image(ImageCmd::CaptureAcpi { image, quiet, json }) => {
            let def = definition(&repo)?;
            let dir = image.unwrap_or_else(|| repo.join("out").join(&def.name));
            let r = image::capture::capture_acpi(&repo, &dir, quiet)?;
            if json {
                print_json(&r)?;
            } else {
                println!("measurements.json of {} rewritten:", r.image_dir.display());
                println!(
                    "  rtmr0                 {}",
                    r.rtmr0.as_deref().unwrap_or("(missing)")
                );
                println!(
                    "  image_hash_cocoon_v1  {}",
                    r.image_hash_cocoon_v1.as_deref().unwrap_or("(missing)")
                );
                println!(
                    "  image_hash_cw_v1      {}",
                    r.image_hash_cw_v1.as_deref().unwrap_or("(missing)")
                );
                for m in &r.missing {
                    println!("  still missing: {m}");
                }
                for (shape, hash) in &r.shapes {
                    println!(
                        "  shape {shape:<12} cw-v1 {}",
                        hash.as_deref().unwrap_or("(missing)")
                    );
                }
            }
        }
        Cmd::Image(ImageCmd::Package {
            image: dir,
            out,
            json,
        }) => {
            let def = definition(&repo)?;
            let dir = dir.unwrap_or_else(|| repo.join("out").join(&def.name));
            let out = out.unwrap_or_else(|| repo.join("out"));
            let stem = format!("{}-{}", def.name, def.version);
            let (path, sha) =
                image::package::package(&dir, &out, &stem, &def.name, def.source_date_epoch)?;
            eprintln!("wrote {} (sha256 {sha})", path.display());
            if json {
                print_json(
                    &serde_json::json!({"archive": path, "sha256": sha, "sha256_file": format!("{}.sha256", path.display())}),
                )?;
            }
        }
        Cmd::Demo { build, json } => {
            let report = demo::run(&build.options(&repo)?)?;
            eprintln!(
                "demo: OK. host tools {:.1}s, image build {:.1}s, launcher build {:.1}s, measure + local chain + publish {:.1}s, boot + model + chat + clean stop {:.1}s (accelerator: {}), boot parts {}",
                report.install_seconds,
                report.build_seconds,
                report.launcher_build_seconds,
                report.measure_and_publish_seconds,
                report.boot_to_healthy_and_stop_seconds,
                report
                    .accelerator
                    .as_deref()
                    .and_then(|a| a.split_whitespace().next())
                    .unwrap_or("not reported"),
                progress::bytes(report.boot_bytes)
            );
            if let Some(c) = &report.chat {
                println!("prompt: {}\nanswer: {}", c.prompt, c.reply.trim());
            }
            if json {
                print_json(&report)?;
            }
        }
        Cmd::Test {
            build,
            no_install,
            cargo_args,
        } => {
            test_cmd::run(&test_cmd::TestOptions {
                build: build.options(&repo)?,
                no_install,
                cargo_args,
            })?;
        }
        Cmd::Chain { args } => chain::run(&repo, &args)?,
        Cmd::Model(ModelCmd::Fetch { name, dest }) => {
            let path = model::fetch(&name, dest.as_deref())
                .with_context(|| format!("fetching model {name}"))?;
            println!("{}", path.display());
        }
        Cmd::Model(ModelCmd::Pack {
            gguf,
            name,
            revision,
            out,
            quiet,
            json,
        }) => {
            let out = out.unwrap_or_else(|| model::pack::default_out(&repo, &name));
            let p = model::pack::pack(&model::pack::PackOptions {
                gguf: gguf.clone(),
                name,
                revision,
                out,
                quiet,
            })
            .with_context(|| format!("packing {}", gguf.display()))?;
            eprintln!(
                "model pack: {} ({}) -> {} and {} in {:.1}s\n  root hash  {}\n  model id   {}\n  model hash {}",
                gguf.display(),
                progress::bytes(p.json.gguf.size),
                p.disk.display(),
                p.json_path.display(),
                p.seconds,
                p.json.verity.root_hash,
                p.json.model_id,
                p.json.model_hash
            );
            if json {
                print!("{}", p.json.to_canonical_json());
            }
        }
        Cmd::Bench(BenchCmd::Inference { args }) => bench::inference(&args)?,
        Cmd::Bench(BenchCmd::Gateway { args }) => bench_gateway::gateway(&args)?,
        Cmd::Bench(BenchCmd::Structured { args }) => bench::structured(&args)?,
        Cmd::Bench(BenchCmd::ModelDisk { args }) => bench_model_disk::model_disk(&repo, &args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
