//! `guest-agent`: command line of the worker TD's PID 1 (see the library docs and ARCHITECTURE.md).
//!
//! As `/init` (PID 1, no arguments) it runs `init`. On a developer machine `serve --no-init`
//! runs the same HTTP server without touching the system.

mod run;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guest_agent::log_line;
use guest_agent::platform::power;

const AFTER_HELP: &str = "\
Examples:
  # Inside the image: the kernel starts /init = guest-agent with no arguments, which means `init`.
  guest-agent init

  # On a developer machine: only the RA-TLS server, nothing mounted or powered off.
  guest-agent serve --no-init --listen 127.0.0.1:8443 --simulate-tee
  #   prints: simulated TEE public key: <HEX>
  host-launcher verify --url https://127.0.0.1:8443 --allow-simulated --simulated-key <HEX>
  curl -k https://127.0.0.1:8443/health            # (curl cannot check RA-TLS evidence)
  curl -k -X POST https://127.0.0.1:8443/shutdown  # the process exits

  # Pretend to be a guest: a fake root with etc/worker-image/release.json, dev/tdx_guest,
  # sys/firmware/qemu_fw_cfg/by_name/opt/org.confidential-worker/config/raw ...
  guest-agent serve --no-init --root /tmp/fake-guest

Log lines go to standard error (the serial console as PID 1) as
`[seconds.micros] guest-agent: message`; `guest-agent: ready` marks a listening server.";

/// The worker TD's init process and agent.
#[derive(Debug, Parser)]
#[command(
    name = "guest-agent",
    version,
    about = "PID 1 of the confidential worker VM: init duties plus the host<->guest HTTP server",
    long_about = "PID 1 of the confidential worker VM (a TDX trust domain).\n\n\
        As init it mounts /proc, /sys, /dev, /run, /tmp and configfs, loads the kernel modules \
        listed in /etc/worker-image/modules.list, gives the first virtio NIC 10.0.2.15/24 via \
        10.0.2.2 (QEMU user networking; the kernel command line may override them with \
        guest_agent.ip=A.B.C.D/N and guest_agent.gw=A.B.C.D|none), reads and hashes the host config from fw_cfg, reaps orphans, and \
        serves GET /health, GET /attestation and POST /shutdown over RA-TLS (TLS 1.3, quote in the \
        certificate) on port 8443. A shutdown request (or a fatal \
        error) syncs and powers the VM off.\n\n\
        Run with no command as PID 1 it behaves like `init`.",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as the image's PID 1: init duties, then serve on 0.0.0.0:8443; power off on /shutdown.
    ///
    /// Refuses to run unless this process is PID 1 (it mounts file systems, configures the
    /// network and powers the machine off). Use `serve --no-init` elsewhere.
    Init,
    /// Run the HTTP server (init duties too only when PID 1 and without --no-init).
    ///
    /// When not PID 1, a POST /shutdown (or SIGTERM/SIGINT) just ends the process (exit status 0).
    Serve(ServeArgs),
    /// Generate text with a local GGUF model (scripts and debugging; see `generate --help`).
    Generate(Box<inference::cli::GenerateArgs>),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address and port to listen on (inside the guest the agent uses 0.0.0.0:8443).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Never perform init duties (mounts, modules, network), even as PID 1. (As PID 1 the agent
    /// still powers off when it stops: init must never exit.)
    #[arg(long)]
    no_init: bool,
    /// Directory standing in for `/` when reading the release file, the module list, fw_cfg and
    /// the TDX device nodes (development and tests; needs --no-init unless it is `/`).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Serve this GGUF model on /v1/* (OpenAI-compatible) instead of the host config's model.
    #[arg(long, value_name = "FILE", requires = "model_sha256")]
    model: Option<PathBuf>,
    /// Expected SHA-256 of --model (64 hex digits); the file is checked before it is served.
    #[arg(long, value_name = "HEX")]
    model_sha256: Option<String>,
    /// Without TDX (and without a simulated-TEE fw_cfg file under --root), sign RA-TLS quotes
    /// with a fresh simulator key and print its public key ("simulated TEE public key: HEX") for
    /// `host-launcher verify --allow-simulated --simulated-key HEX`. INSECURE, development only.
    /// Without it such an agent serves an unattested certificate every verifier rejects.
    #[arg(long)]
    simulate_tee: bool,
    /// Development only: the cw-v1 image hash this agent checks against the host config's
    /// root_contract, instead of the one computed from its evidence (outside a TD there is none,
    /// or only the simulated TEE's). Never used by the image's init.
    #[arg(long, value_name = "HEX", value_parser = parse_hash32)]
    assume_image_hash: Option<[u8; 32]>,
    /// Seconds between two approval checks against the root contract.
    #[arg(long, value_name = "SECS", default_value_t = guest_agent::approval::DEFAULT_RECHECK.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    approval_recheck_secs: u64,
}

fn parse_hash32(s: &str) -> Result<[u8; 32], String> {
    hex::decode(s.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| "expected 64 hex digits (a SHA-256)".to_string())
}

fn main() -> ExitCode {
    run::install_panic_hook();
    let pid1 = power::is_pid1();
    let command = if pid1 {
        // The kernel hands unknown command-line words to init as arguments: never fail on them.
        match Cli::try_parse() {
            Ok(cli) => cli.command.unwrap_or(Command::Init),
            Err(e) => {
                log_line!(
                    "ignoring arguments the kernel passed to init ({}); running `init`",
                    e.kind()
                );
                Command::Init
            }
        }
    } else {
        match Cli::parse().command {
            Some(c) => c,
            None => {
                eprintln!(
                    "error: no command given. Inside the image the agent runs as PID 1 and starts \
                     `init` by itself; on this machine try\n  guest-agent serve --no-init --listen \
                     127.0.0.1:8443\nSee `guest-agent --help`."
                );
                return ExitCode::from(2);
            }
        }
    };

    match command {
        Command::Generate(args) => match inference::cli::run_generate(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Init => {
            if !pid1 {
                eprintln!(
                    "error: `guest-agent init` must run as PID 1 of the VM (it mounts file systems \
                     and powers the machine off). To run only the server here use\n  guest-agent \
                     serve --no-init --listen 127.0.0.1:8443"
                );
                return ExitCode::from(2);
            }
            run::run_as_pid1(run::AgentOptions::init())
        }
        Command::Serve(args) => {
            let init_duties = pid1 && !args.no_init;
            if init_duties && args.root != std::path::Path::new("/") {
                eprintln!("error: --root only works together with --no-init");
                return ExitCode::from(2);
            }
            let opts = run::AgentOptions {
                listen: args.listen,
                init_duties,
                paths: guest_agent::paths::Paths::new(args.root),
                model: args.model,
                model_sha256: args.model_sha256,
                simulate_tee: args.simulate_tee,
                image_hash: args.assume_image_hash,
                approval_recheck: std::time::Duration::from_secs(args.approval_recheck_secs),
            };
            if pid1 {
                run::run_as_pid1(opts)
            } else {
                match run::run_agent(opts) {
                    Ok(reason) => {
                        log_line!("stopped: {reason}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        log_line!("error: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults_to_loopback() {
        let cli = Cli::try_parse_from(["guest-agent", "serve", "--no-init"]).expect("parse");
        match cli.command {
            Some(Command::Serve(a)) => {
                assert_eq!(a.listen, "127.0.0.1:8443".parse().expect("addr"));
                assert!(a.no_init);
                assert_eq!(a.root, PathBuf::from("/"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn no_command_parses_to_none() {
        let cli = Cli::try_parse_from(["guest-agent"]).expect("parse");
        assert!(cli.command.is_none());
    }
}
