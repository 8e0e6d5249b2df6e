//! `cargo xtask bench inference`: prefill and decode tokens/s of the inference backends.
//!
//! Builds `inference-bench` in release mode (numbers from a debug build would be meaningless),
//! then measures on SmolLM2-135M Q4_1 (fetched into the model cache if absent): the CPU backend
//! with 1 and 2 threads, the CUDA backend when a GPU is usable (with its share of the
//! memory-bandwidth floor), and llama.cpp as a baseline: `llama-bench` when it is on PATH, else
//! the prebuilt llama.cpp of the pinned npm package node-llama-cpp (`bench/llama-cpp/`) when its
//! `node_modules` is installed.
//!
//! `--vs-llama-cpp` is the side-by-side comparison (issue 5's target): it installs
//! `bench/llama-cpp` on demand (`npm ci`), then for each thread count runs our CPU backend and
//! llama.cpp on the same model, prompt token ids and token counts, alternating which goes first,
//! `--rounds` times, and prints the medians and the ratio ours / llama.cpp.
//!
//! `--kquant MIX` (`q4_k_m` or `q5_k_m`) measures a K-quant file instead: it is made from the
//! model (SmolLM2 Q4_1 by default) on demand with `inference-bench --write-kquant` into
//! `$CARGO_TARGET_DIR/kquant/` (never committed; see `inference::requant`).
//!
//! `--agree` checks greedy agreement with llama.cpp first: the same prompt ids, 32 greedy
//! tokens from our CPU backend and from llama.cpp (`bench/llama-cpp/greedy.mjs`); it prints the
//! matching prefix and fails when the first 8 tokens differ, or prints a SKIPPED line when
//! llama.cpp cannot be installed.
//!
//! The concurrency table (issue 12): for each N of `--concurrency LIST` (1,8,32,64; `off`
//! skips it), N greedy streams submitted to the continuous-batching scheduler at once, over
//! the batched CPU model (`inference::cpu_batched`) and over the per-sequence one (baseline),
//! side by side, beside the batch-1 loop: aggregate tokens/s, time to first token p50 and
//! inter-token latency p50/p99. Streams are short (`--stream-prompt-tokens` 16,
//! `--stream-max-tokens` 32) so the default run stays within a few minutes on 2 cores; it uses
//! the largest `--threads` value. `--concurrency-only` prints only this table.
//!
//! Options: `--model FILE`, `--prompt-tokens N` (128), `--gen-tokens N` (64),
//! `--threads LIST` (1,2), `--no-cuda`, `--vs-llama-cpp`, `--rounds N` (3), `--json`,
//! `--kquant MIX`, `--agree`, `--concurrency LIST|off`, `--stream-prompt-tokens N`,
//! `--stream-max-tokens N`, `--concurrency-only`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

#[derive(Debug)]
struct Opts {
    model: Option<PathBuf>,
    prompt_tokens: usize,
    gen_tokens: usize,
    threads: Vec<usize>,
    cuda: bool,
    json: bool,
    vs_llama_cpp: bool,
    rounds: usize,
    kquant: Option<String>,
    agree: bool,
    /// Stream counts of the concurrency table (empty: no table).
    concurrency: Vec<usize>,
    stream_prompt_tokens: usize,
    stream_max_tokens: usize,
    concurrency_only: bool,
}

/// Default stream counts of the concurrency table.
const CONCURRENCY: [usize; 4] = [1, 8, 32, 64];

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        model: None,
        prompt_tokens: 128,
        gen_tokens: 64,
        threads: vec![1, 2],
        cuda: true,
        json: false,
        vs_llama_cpp: false,
        rounds: 3,
        kquant: None,
        agree: false,
        concurrency: CONCURRENCY.to_vec(),
        stream_prompt_tokens: 16,
        stream_max_tokens: 32,
        concurrency_only: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--model" => o.model = Some(PathBuf::from(val("--model")?)),
            "--prompt-tokens" => o.prompt_tokens = val("--prompt-tokens")?.parse()?,
            "--gen-tokens" => o.gen_tokens = val("--gen-tokens")?.parse()?,
            "--threads" => {
                o.threads = val("--threads")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--threads takes a comma-separated list like 1,2")?
            }
            "--no-cuda" => o.cuda = false,
            "--vs-llama-cpp" => o.vs_llama_cpp = true,
            "--rounds" => {
                o.rounds = val("--rounds")?.parse()?;
                if o.rounds == 0 {
                    bail!("--rounds must be at least 1");
                }
            }
            "--json" => o.json = true,
            "--kquant" => {
                let m = val("--kquant")?.to_ascii_lowercase();
                if m != "q4_k_m" && m != "q5_k_m" {
                    bail!("--kquant takes q4_k_m or q5_k_m, not {m:?}");
                }
                o.kquant = Some(m);
            }
            "--agree" => o.agree = true,
            "--concurrency" => {
                let v = val("--concurrency")?;
                o.concurrency = if v == "off" {
                    Vec::new()
                } else {
                    v.split(',')
                        .map(|s| s.trim().parse::<usize>().ok().filter(|&n| n > 0))
                        .collect::<Option<_>>()
                        .context("--concurrency takes a comma-separated list of stream counts like 1,8,32,64 (each at least 1), or off")?
                };
            }
            "--stream-prompt-tokens" => {
                o.stream_prompt_tokens = val("--stream-prompt-tokens")?.parse()?;
                if o.stream_prompt_tokens == 0 {
                    bail!("--stream-prompt-tokens must be at least 1");
                }
            }
            "--stream-max-tokens" => {
                o.stream_max_tokens = val("--stream-max-tokens")?.parse()?;
                if o.stream_max_tokens == 0 {
                    bail!("--stream-max-tokens must be at least 1");
                }
            }
            "--concurrency-only" => o.concurrency_only = true,
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench inference [--model FILE] [--prompt-tokens N] [--gen-tokens N] [--threads 1,2] [--no-cuda] [--vs-llama-cpp [--rounds N]] [--json] [--kquant q4_k_m|q5_k_m] [--agree]\n\
    [--concurrency 1,8,32,64|off] [--stream-prompt-tokens 16] [--stream-max-tokens 32] [--concurrency-only]\n\n\
Measures prefill and decode tokens/s of the CPU backend (per thread count), the CUDA backend\n\
when a GPU is present, and llama.cpp (llama-bench on PATH, or bench/llama-cpp when installed).\n\
The model defaults to SmolLM2-135M Q4_1 from the model cache (fetched if absent).\n\n\
--vs-llama-cpp: CPU backend vs llama.cpp side by side (installs bench/llama-cpp with npm ci if\n\
needed; needs node and npm): same model, prompt ids and token counts, per thread count, runs\n\
alternating, --rounds each (default 3); prints medians and the ratio ours/llama.cpp. Other\n\
processes on the machine skew both sides; run it on a quiet machine for numbers to quote.\n\n\
--kquant MIX: measure a K-quant re-encoding of the model instead (made on demand into\n\
$CARGO_TARGET_DIR/kquant/ by inference-bench --write-kquant; never committed).\n\
--agree: first check greedy agreement with llama.cpp (32 tokens; fails if the first 8 differ;\n\
SKIPPED line when llama.cpp cannot be installed).\n\n\
Concurrency table (CPU, the largest --threads value): for each N of --concurrency (default\n\
1,8,32,64; off skips it), N greedy streams (prompts of --stream-prompt-tokens ids, default 16,\n\
--stream-max-tokens tokens each, default 32) submitted to the scheduler at once, over the\n\
batched CPU model and over the per-sequence model (baseline) side by side, plus the batch-1\n\
loop: aggregate tokens/s (all streams' tokens over the wall time, prefill included), time to\n\
first token p50, inter-token latency p50/p99. --concurrency-only prints only this table.\n\
Timings are wall-clock: other processes on the machine skew them."
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?}; see `cargo xtask bench inference --help`"),
        }
    }
    Ok(o)
}

fn run_bench_bin(extra: &[String]) -> anyhow::Result<Value> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "inference",
            "--bin",
            "inference-bench",
            "--",
        ])
        .args(extra)
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .context("inference-bench printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

/// The folder with the pinned node-llama-cpp (package.json, package-lock.json, baseline.mjs).
fn llama_cpp_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/llama-cpp"))
}

fn llama_cpp_installed() -> bool {
    llama_cpp_dir()
        .join("node_modules/node-llama-cpp/package.json")
        .is_file()
}

/// `npm ci` in `bench/llama-cpp` (only the linux-x64 CPU prebuilt: optional GPU builds are
/// omitted, install scripts skipped: nothing is downloaded or compiled besides the packages).
fn install_llama_cpp() -> anyhow::Result<()> {
    if llama_cpp_installed() {
        return Ok(());
    }
    let dir = llama_cpp_dir();
    eprintln!(
        "installing the llama.cpp baseline: npm ci in {}",
        dir.display()
    );
    let npm = |verb: &[&str]| {
        Command::new("npm")
            .args(verb)
            .args([
                "--omit=optional",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
            ])
            .env("NODE_LLAMA_CPP_SKIP_DOWNLOAD", "true")
            .current_dir(&dir)
            .status()
            .context("running npm (install nodejs and npm)")
    };
    let mut st = npm(&["ci"])?;
    if !st.success() {
        // npm 11 refuses `ci` when the lock file lacks entries for other platforms' optional
        // packages; `install --no-save` installs the same locked versions without rewriting it.
        eprintln!("npm ci failed; retrying with npm install --no-save (same lock file)");
        st = npm(&["install", "--no-save"])?;
    }
    if !st.success() {
        bail!(
            "npm ci / npm install in {} failed ({st}); see its output above",
            dir.display()
        );
    }
    Ok(())
}

/// One llama.cpp measurement through `bench/llama-cpp/baseline.mjs`.
fn llama_cpp_node_once(model: &str, threads: usize, o: &Opts) -> anyhow::Result<Value> {
    let out = Command::new("node")
        .arg(llama_cpp_dir().join("baseline.mjs"))
        .args([
            model,
            &threads.to_string(),
            &o.prompt_tokens.to_string(),
            &o.gen_tokens.to_string(),
        ])
        .output()
        .context("running node (install nodejs)")?;
    if !out.status.success() {
        bail!(
            "llama.cpp baseline failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("baseline printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

/// llama.cpp baseline through node-llama-cpp when `bench/llama-cpp` is installed.
fn llama_cpp_node(model: &str, o: &Opts) -> anyhow::Result<Vec<Value>> {
    if !llama_cpp_installed() {
        return Ok(vec![]);
    }
    o.threads
        .iter()
        .map(|t| llama_cpp_node_once(model, *t, o))
        .collect()
}

/// Median of a non-empty list (mean of the middle two for even lengths).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `--vs-llama-cpp`: alternating runs, medians, ratios.
fn vs_llama_cpp(model: &str, common: &[String], o: &Opts) -> anyhow::Result<()> {
    install_llama_cpp()?;
    eprintln!("building inference-bench (release) ...");
    let mut rows = Vec::new();
    for &t in &o.threads {
        let (mut ours_d, mut ours_p, mut lc_d, mut lc_p) = (vec![], vec![], vec![], vec![]);
        for round in 0..o.rounds {
            let mut run_ours = || -> anyhow::Result<()> {
                let mut a = common.to_vec();
                a.extend(["--threads".into(), t.to_string()]);
                let v = run_bench_bin(&a).with_context(|| format!("CPU backend, {t} threads"))?;
                ours_d.extend(v["decode_tps"].as_f64());
                ours_p.extend(v["prefill_tps"].as_f64());
                Ok(())
            };
            let mut run_lc = || -> anyhow::Result<()> {
                let v = llama_cpp_node_once(model, t, o)?;
                lc_d.extend(v["decode_tps"].as_f64());
                lc_p.extend(v["prefill_tps"].as_f64());
                Ok(())
            };
            if round % 2 == 0 {
                run_ours()?;
                run_lc()?;
            } else {
                run_lc()?;
                run_ours()?;
            }
            eprintln!("  {t} thread(s): round {}/{} done", round + 1, o.rounds);
        }
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let (od, ld, op, lp) = (
            median(&ours_d),
            median(&lc_d),
            median(&ours_p),
            median(&lc_p),
        );
        rows.push(serde_json::json!({
            "threads": t,
            "ours_decode_tps": od, "llama_cpp_decode_tps": ld, "decode_ratio": ratio(od, ld),
            "ours_prefill_tps": op, "llama_cpp_prefill_tps": lp, "prefill_ratio": ratio(op, lp),
            "ours_decode_runs": ours_d, "llama_cpp_decode_runs": lc_d,
        }));
    }
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model, "prompt_tokens": o.prompt_tokens, "gen_tokens": o.gen_tokens,
                "rounds": o.rounds, "llama_cpp": "node-llama-cpp 3.22.1 (prebuilt, CPU)",
                "results": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "model: {model}\nprompt {} tokens, decode {} tokens (greedy), medians of {} alternating rounds; llama.cpp = node-llama-cpp 3.22.1 prebuilt (CPU)",
        o.prompt_tokens, o.gen_tokens, o.rounds
    );
    println!(
        "{:>7} {:>12} {:>14} {:>8} {:>14} {:>16} {:>8}",
        "threads",
        "ours decode",
        "llama.cpp dec",
        "ratio",
        "ours prefill",
        "llama.cpp pref",
        "ratio"
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    let r2 = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    for r in &rows {
        println!(
            "{:>7} {:>12} {:>14} {:>8} {:>14} {:>16} {:>8}",
            r["threads"],
            f(&r["ours_decode_tps"]),
            f(&r["llama_cpp_decode_tps"]),
            r2(&r["decode_ratio"]),
            f(&r["ours_prefill_tps"]),
            f(&r["llama_cpp_prefill_tps"]),
            r2(&r["prefill_ratio"]),
        );
    }
    println!("(tokens/s; ratio = ours / llama.cpp, >= 1.00 means at least on par)");
    Ok(())
}

/// llama.cpp baseline via `llama-bench -o json`, if installed.
fn llama_cpp(model: &str, o: &Opts) -> Vec<Value> {
    let threads: Vec<String> = o.threads.iter().map(ToString::to_string).collect();
    let out = Command::new("llama-bench")
        .args([
            "-m",
            model,
            "-p",
            &o.prompt_tokens.to_string(),
            "-n",
            &o.gen_tokens.to_string(),
        ])
        .args(["-t", &threads.join(","), "-o", "json"])
        .output();
    let Ok(out) = out else { return vec![] };
    if !out.status.success() {
        return vec![];
    }
    let Ok(Value::Array(rows)) = serde_json::from_slice::<Value>(&out.stdout) else {
        return vec![];
    };
    // Each row is either a prompt (n_prompt > 0) or a generation (n_gen > 0) test.
    let mut res = Vec::new();
    for t in &o.threads {
        let pick = |prompt: bool| {
            rows.iter()
                .find(|r| {
                    r["n_threads"].as_u64() == Some(*t as u64)
                        && (r["n_prompt"].as_u64().unwrap_or(0) > 0) == prompt
                })
                .and_then(|r| r["avg_ts"].as_f64())
        };
        res.push(serde_json::json!({
            "backend": format!("llama.cpp-{t}t"),
            "prefill_tps": pick(true),
            "decode_tps": pick(false),
        }));
    }
    res
}

/// Run the inference benchmark with the remaining command-line arguments.
/// The K-quant file made from `src` with `mix`, in `$CARGO_TARGET_DIR/kquant/` (made when
/// absent or older than the source).
fn kquant_file(src: &std::path::Path, mix: &str) -> anyhow::Result<PathBuf> {
    let repo = crate::repo_root();
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { repo.join(t) })
        .unwrap_or_else(|| repo.join("target"))
        .join("kquant");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_owned();
    let stem = stem
        .rsplit_once('.')
        .map_or(stem.as_str(), |(a, _)| a)
        .to_owned();
    let out = dir.join(format!("{stem}.{}.gguf", mix.to_ascii_uppercase()));
    let fresh = match (std::fs::metadata(&out), std::fs::metadata(src)) {
        (Ok(o), Ok(s)) => o.modified()? >= s.modified()?,
        _ => false,
    };
    if !fresh {
        eprintln!("making {} from {} ...", out.display(), src.display());
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "inference",
                "--bin",
                "inference-bench",
                "--",
            ])
            .arg("--model")
            .arg(src)
            .args(["--write-kquant", mix, "--out"])
            .arg(&out)
            .status()
            .context("running cargo")?;
        if !st.success() {
            bail!("inference-bench --write-kquant {mix} failed ({st})");
        }
    }
    Ok(out)
}

/// Greedy agreement of our CPU backend with llama.cpp on `model` (see the module docs).
fn agree(model: &str) -> anyhow::Result<()> {
    const PROMPT: &str = "The three primary colors are red, blue and";
    const GEN: usize = 32;
    const MUST: usize = 8;
    if let Err(e) = install_llama_cpp() {
        println!(
            "SKIPPED: greedy agreement with llama.cpp: the baseline is not installable ({e:#})"
        );
        return Ok(());
    }
    let ours = run_bench_bin(&[
        "--model".into(),
        model.into(),
        "--greedy".into(),
        "--prompt-text".into(),
        PROMPT.into(),
        "--gen-tokens".into(),
        GEN.to_string(),
    ])?;
    let ids = |v: &Value, key: &str| -> Vec<u64> {
        v[key]
            .as_array()
            .map_or(vec![], |a| a.iter().filter_map(Value::as_u64).collect())
    };
    let prompt: Vec<String> = ids(&ours, "prompt").iter().map(u64::to_string).collect();
    let out = Command::new("node")
        .arg(llama_cpp_dir().join("greedy.mjs"))
        .arg(model)
        .args([prompt.join(","), GEN.to_string()])
        .output()
        .context("running node (install nodejs)")?;
    if !out.status.success() {
        bail!(
            "llama.cpp greedy run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let theirs: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .context("llama.cpp greedy output is not JSON")?;
    let (a, b) = (ids(&ours, "tokens"), ids(&theirs, "tokens"));
    let same = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    println!(
        "greedy agreement with llama.cpp on {model}, prompt {PROMPT:?}: first {same}/{GEN} tokens identical"
    );
    println!("  ours:      {a:?}");
    println!("  llama.cpp: {b:?}");
    if let Some(g) = ours["gaps"].get(same).and_then(Value::as_f64) {
        println!(
            "  at the first difference our top-1 logit led the runner-up by {g:.3} (a near-tie when small)"
        );
    }
    if a.len() != GEN || b.len() != GEN || same < MUST {
        bail!("greedy outputs diverge within the first {MUST} tokens (at {same})");
    }
    Ok(())
}

pub fn inference(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let mut model = match &o.model {
        Some(m) => m.clone(),
        None => crate::model::fetch("smollm2-135m", None)?,
    };
    if let Some(mix) = &o.kquant {
        model = kquant_file(&model, mix)?;
    }
    let model_s = model.display().to_string();
    if o.agree {
        agree(&model_s)?;
    }
    let common = vec![
        "--model".to_owned(),
        model_s.clone(),
        "--prompt-tokens".into(),
        o.prompt_tokens.to_string(),
        "--gen-tokens".into(),
        o.gen_tokens.to_string(),
    ];
    if o.vs_llama_cpp {
        return vs_llama_cpp(&model_s, &common, &o);
    }
    if o.concurrency_only {
        let c = concurrency(&model_s, &o)?;
        if o.json {
            let v = serde_json::json!({"model": model_s, "concurrency": c});
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("model: {model_s}");
            print!("{}", concurrency_text(&c, &o));
        }
        return Ok(());
    }
    eprintln!("building and running inference-bench (release) ...");
    let mut rows = Vec::new();
    for t in &o.threads {
        let mut a = common.clone();
        a.extend(["--threads".into(), t.to_string()]);
        rows.push(run_bench_bin(&a).with_context(|| format!("CPU benchmark with {t} threads"))?);
    }
    let mut notes = Vec::new();
    if o.cuda {
        let mut a = common.clone();
        a.extend(["--backend".into(), "cuda".into()]);
        match run_bench_bin(&a) {
            Ok(v) => rows.push(v),
            Err(e) => {
                let msg = e.to_string();
                let line = msg
                    .lines()
                    .find(|l| l.contains("Error") || l.contains("unavailable"))
                    .or_else(|| msg.lines().next())
                    .unwrap_or("");
                notes.push(format!("cuda: skipped ({})", line.trim()));
            }
        }
    }
    let mut lc = llama_cpp(&model_s, &o);
    if lc.is_empty() {
        match llama_cpp_node(&model_s, &o) {
            Ok(v) => lc = v,
            Err(e) => notes.push(format!("llama.cpp (node): {e:#}")),
        }
    }
    if lc.is_empty() {
        notes.push(
            "llama.cpp: no `llama-bench` on PATH (not packaged for Debian bookworm) and bench/llama-cpp not installed; `--vs-llama-cpp` installs it (npm ci)".into(),
        );
    }

    rows.extend(lc);
    let conc = if o.concurrency.is_empty() {
        Vec::new()
    } else {
        concurrency(&model_s, &o)?
    };
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model_s, "results": rows, "notes": notes, "concurrency": conc
            }))?
        );
        return Ok(());
    }
    println!(
        "model: {model_s}  (prompt {} tokens, decode {} tokens)",
        o.prompt_tokens, o.gen_tokens
    );
    println!(
        "{:<34} {:>14} {:>14} {:>12}",
        "backend", "prefill tok/s", "decode tok/s", "BW share"
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    for r in &rows {
        let share = r["bandwidth_share"]
            .as_f64()
            .map_or("-".to_owned(), |x| format!("{:.0}%", x * 100.0));
        println!(
            "{:<34} {:>14} {:>14} {:>12}",
            r["backend"].as_str().unwrap_or("?"),
            f(&r["prefill_tps"]),
            f(&r["decode_tps"]),
            share
        );
    }
    for n in notes {
        println!("note: {n}");
    }
    if !conc.is_empty() {
        println!();
        print!("{}", concurrency_text(&conc, &o));
    }
    Ok(())
}

/// Threads of the concurrency table: the largest `--threads` value.
fn concurrency_threads(o: &Opts) -> usize {
    o.threads.iter().copied().max().unwrap_or(1).max(1)
}

/// The concurrency table's rows (`inference::bench::concurrency::ConcurrencyRow` as JSON).
fn concurrency(model: &str, o: &Opts) -> anyhow::Result<Vec<Value>> {
    let list: Vec<String> = o.concurrency.iter().map(ToString::to_string).collect();
    let threads = concurrency_threads(o);
    eprintln!(
        "running the concurrency table ({} streams, {threads} threads; release build) ...",
        list.join(",")
    );
    let v = run_bench_bin(&[
        "--model".into(),
        model.into(),
        "--threads".into(),
        threads.to_string(),
        "--concurrency".into(),
        list.join(","),
        "--prompt-tokens".into(),
        o.stream_prompt_tokens.to_string(),
        "--gen-tokens".into(),
        o.stream_max_tokens.to_string(),
    ])
    .context("concurrency table")?;
    v.as_array()
        .cloned()
        .context("inference-bench --concurrency printed no table")
}

/// The concurrency table as text: the batch-1 loop, then one line per stream count with the
/// per-sequence (baseline) and the batched model side by side.
fn concurrency_text(rows: &[Value], o: &Opts) -> String {
    use std::fmt::Write;
    let num = |r: &Value, k: &str| r[k].as_f64().filter(|x| x.is_finite());
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1}"));
    let find = |model: &str, n: u64| {
        rows.iter()
            .find(|r| r["model"].as_str() == Some(model) && r["streams"].as_u64() == Some(n))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "concurrency: N greedy streams submitted to the scheduler at once (prompt {} ids, up to {} tokens each), CPU, {} threads",
        o.stream_prompt_tokens,
        o.stream_max_tokens,
        concurrency_threads(o)
    );
    if let Some(r) = find("batch-1 loop", 1) {
        let _ = writeln!(
            out,
            "batch-1 loop (Backend::forward, no scheduler): {} tok/s, TTFT {} ms, ITL p50 {} ms, p99 {} ms",
            f(num(r, "tps")),
            f(num(r, "ttft_p50_ms")),
            f(num(r, "itl_p50_ms")),
            f(num(r, "itl_p99_ms"))
        );
    }
    let _ = writeln!(
        out,
        "{:>7} | {:^26} | {:^17} | {:^17} | {:^17}",
        "", "aggregate tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms"
    );
    let _ = writeln!(
        out,
        "{:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
        "streams",
        "per-seq",
        "batched",
        "speedup",
        "per-seq",
        "batched",
        "per-seq",
        "batched",
        "per-seq",
        "batched"
    );
    for &n in &o.concurrency {
        let (a, b) = (
            find("cpu-per-sequence", n as u64),
            find("cpu-batched", n as u64),
        );
        let g = |r: Option<&Value>, k: &str| f(r.and_then(|r| num(r, k)));
        let speedup = match (a.and_then(|r| num(r, "tps")), b.and_then(|r| num(r, "tps"))) {
            (Some(x), Some(y)) if x > 0.0 => format!("{:.2}x", y / x),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
            n,
            g(a, "tps"),
            g(b, "tps"),
            speedup,
            g(a, "ttft_p50_ms"),
            g(b, "ttft_p50_ms"),
            g(a, "itl_p50_ms"),
            g(b, "itl_p50_ms"),
            g(a, "itl_p99_ms"),
            g(b, "itl_p99_ms")
        );
    }
    let _ = writeln!(
        out,
        "(aggregate tok/s: all streams' tokens over the wall time from submission to the last token, prefill included; wall-clock, so other load on the machine skews it)"
    );
    out
}

/// `cargo xtask bench structured`: constrained (JSON schema) vs unconstrained decode on the CPU
/// backend, side by side in one run, plus schema compile and token-mask costs.
pub fn structured(args: &[String]) -> anyhow::Result<()> {
    let mut model = None;
    let mut threads = "1".to_owned();
    let mut gen_tokens = "128".to_owned();
    let mut rounds = "5".to_owned();
    let mut json = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(val("--model")?)),
            "--threads" => threads = val("--threads")?,
            "--gen-tokens" => gen_tokens = val("--gen-tokens")?,
            "--rounds" => rounds = val("--rounds")?,
            "--json" => json = true,
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench structured [--model FILE] [--threads N] [--gen-tokens N] [--rounds N] [--json]\n\n\
Decode tokens/s on the CPU backend without a constraint and under a JSON schema (a list of\n\
people), same prompt and sampling (temperature 0.7, seed 1), --rounds alternating runs each\n\
(medians); the constrained side once with a fresh grammar (empty mask cache) and once reused.\n\
Also: vocabulary index build, 50-property schema compile, one full-vocabulary token mask.\n\
The model defaults to SmolLM2-135M Q4_1 (fetched if absent). Run it on a quiet machine."
                );
                return Ok(());
            }
            other => bail!("unknown option {other:?}; see `cargo xtask bench structured --help`"),
        }
    }
    let model = match model {
        Some(m) => m,
        None => crate::model::fetch("smollm2-135m", None)?,
    };
    eprintln!("building and running inference-bench --structured (release) ...");
    let v = run_bench_bin(&[
        "--structured".into(),
        "--model".into(),
        model.display().to_string(),
        "--threads".into(),
        threads.clone(),
        "--gen-tokens".into(),
        gen_tokens,
        "--rounds".into(),
        rounds.clone(),
    ])?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "model: {}\nCPU backend, {threads} thread(s), {} tokens per generation, medians of {rounds} alternating rounds",
        model.display(),
        v["gen_tokens"]
    );
    println!("{:<34} {:>12} {:>8}", "decode", "tokens/s", "ratio");
    println!(
        "{:<34} {:>12.1} {:>8}",
        "unconstrained",
        f("unconstrained_tps"),
        "1.00"
    );
    for (label, k) in [
        ("JSON schema, fresh grammar", "constrained_cold_tps"),
        ("JSON schema, grammar reused", "constrained_warm_tps"),
    ] {
        println!(
            "{label:<34} {:>12.1} {:>8.2}",
            f(k),
            f(k) / f("unconstrained_tps")
        );
    }
    println!(
        "token masks computed in a fresh generation: {}; all outputs valid: {}",
        v["cold_mask_computations"], v["outputs_valid"]
    );
    println!(
        "vocabulary {} tokens, {} trie nodes; index build {:.1} ms (once per model)",
        v["vocab"],
        v["trie_nodes"],
        f("vocab_index_ms")
    );
    println!(
        "50-property schema: compile {:.3} ms, + first mask {:.3} ms; a full-vocabulary mask (inside a string) {:.2} ms",
        f("compile_50_props_ms"),
        f("compile_and_first_mask_ms"),
        f("string_mask_ms")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let a: Vec<String> = [
            "--threads",
            "1,4",
            "--gen-tokens",
            "8",
            "--no-cuda",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse(&a).expect("parse");
        assert_eq!(o.threads, vec![1, 4]);
        assert_eq!(o.gen_tokens, 8);
        assert!(!o.cuda && o.json);
        assert!(parse(&["--bogus".to_string()]).is_err());
        assert!(parse(&["--threads".to_string(), "x".to_string()]).is_err());
        let o = parse(&[
            "--vs-llama-cpp".to_string(),
            "--rounds".to_string(),
            "5".to_string(),
        ])
        .expect("parse");
        assert!(o.vs_llama_cpp && o.rounds == 5);
        assert!(parse(&["--rounds".to_string(), "0".to_string()]).is_err());
        let o = parse(&["--kquant".into(), "Q4_K_M".into(), "--agree".into()]).expect("parse");
        assert!(o.agree && o.kquant.as_deref() == Some("q4_k_m"));
        assert!(parse(&["--kquant".into(), "q2_k".into()]).is_err());
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_concurrency_options() {
        let o = parse(&[]).expect("parse");
        assert_eq!(o.concurrency, vec![1, 8, 32, 64]);
        assert_eq!((o.stream_prompt_tokens, o.stream_max_tokens), (16, 32));
        assert!(!o.concurrency_only);
        assert_eq!(concurrency_threads(&o), 2, "the largest --threads value");
        let o = parse(&args(&[
            "--concurrency",
            "4, 2",
            "--stream-prompt-tokens",
            "8",
            "--stream-max-tokens",
            "5",
            "--concurrency-only",
            "--threads",
            "1",
        ]))
        .expect("parse");
        assert_eq!(o.concurrency, vec![4, 2]);
        assert_eq!((o.stream_prompt_tokens, o.stream_max_tokens), (8, 5));
        assert!(o.concurrency_only);
        assert_eq!(concurrency_threads(&o), 1);
        assert!(
            parse(&args(&["--concurrency", "off"]))
                .expect("parse")
                .concurrency
                .is_empty()
        );
        for bad in [
            &["--concurrency", "0"][..],
            &["--concurrency", "1,x"],
            &["--concurrency"],
            &["--stream-max-tokens", "0"],
            &["--stream-prompt-tokens", "-1"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn concurrency_table_pairs_the_models_per_stream_count() {
        let o = parse(&args(&["--concurrency", "1,8"])).expect("parse");
        let row = |model: &str, n: u64, tps: f64| {
            serde_json::json!({"model": model, "streams": n, "tps": tps,
                "ttft_p50_ms": 12.0, "itl_p50_ms": 3.0, "itl_p99_ms": 9.5})
        };
        let rows = vec![
            row("batch-1 loop", 1, 50.0),
            row("cpu-per-sequence", 1, 48.0),
            row("cpu-batched", 1, 49.0),
            row("cpu-per-sequence", 8, 40.0),
            row("cpu-batched", 8, 160.0),
        ];
        let t = concurrency_text(&rows, &o);
        let line8 = t
            .lines()
            .find(|l| l.trim_start().starts_with("8 |"))
            .expect("a line for 8 streams");
        assert!(line8.contains("40.0") && line8.contains("160.0"), "{line8}");
        assert!(line8.contains("4.00x"), "{line8}");
        assert!(
            t.contains("batch-1 loop") && t.contains("50.0 tok/s"),
            "{t}"
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
