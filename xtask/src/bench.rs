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
//! With `--vs-llama-cpp`, the concurrency table gets a llama.cpp column group: for each N,
//! `bench/llama-cpp/concurrent.mjs` runs the same N prompts (same ids per stream) as N sequences
//! of one node-llama-cpp context, whose batching puts all pending tokens into one llama_decode
//! per step (llama-server's continuous batching), right after ours for that N (alternating which
//! goes first). `--vs-llama-cpp --concurrency-only` prints
//! only that table; `--vs-llama-cpp --concurrency LIST` prints it after the decode comparison
//! (`--vs-llama-cpp` alone does not run it). When node or the package is unavailable, the
//! columns read `-` and a `note:` line says why.
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
    /// `--concurrency` was given (with `--vs-llama-cpp`: the table follows the comparison).
    concurrency_given: bool,
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
        concurrency_given: false,
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
                o.concurrency_given = true;
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
With --vs-llama-cpp the table adds llama.cpp beside per-seq and batched (bench/llama-cpp/\n\
concurrent.mjs: the same N prompts as N sequences of one node-llama-cpp context, all pending\n\
tokens in one llama_decode batch per step, as llama-server batches; per N right after ours,\n\
alternating which goes first; installed on demand like the comparison above; a note: line\n\
when it cannot run). --vs-llama-cpp --concurrency-only prints only this table;\n\
--vs-llama-cpp --concurrency LIST prints it after the decode comparison; --vs-llama-cpp alone\n\
skips it.\n\
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
    // With an explicit --concurrency, the concurrency table with llama.cpp follows.
    let (conc, notes) = if o.concurrency_given && !o.concurrency.is_empty() {
        concurrency_all(model, o)?
    } else {
        (Vec::new(), Vec::new())
    };
    if o.json {
        let mut v = serde_json::json!({
            "model": model, "prompt_tokens": o.prompt_tokens, "gen_tokens": o.gen_tokens,
            "rounds": o.rounds, "llama_cpp": "node-llama-cpp 3.22.1 (prebuilt, CPU)",
            "results": rows,
        });
        if !conc.is_empty() {
            v["concurrency"] = conc.into();
            v["notes"] = notes.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
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
    if !conc.is_empty() {
        println!();
        print!("{}", concurrency_text(&conc, o));
        for n in notes {
            println!("note: {n}");
        }
    }
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
    if o.concurrency_only {
        if o.concurrency.is_empty() {
            bail!("--concurrency-only with --concurrency off measures nothing");
        }
        let (c, notes) = concurrency_all(&model_s, &o)?;
        if o.json {
            let v = serde_json::json!({"model": model_s, "concurrency": c, "notes": notes});
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("model: {model_s}");
            print!("{}", concurrency_text(&c, &o));
            for n in notes {
                println!("note: {n}");
            }
        }
        return Ok(());
    }
    if o.vs_llama_cpp {
        return vs_llama_cpp(&model_s, &common, &o);
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
    concurrency_for(model, o, &o.concurrency)
}

/// [`concurrency`] for the stream counts `counts` (one `inference-bench` run).
fn concurrency_for(model: &str, o: &Opts, counts: &[usize]) -> anyhow::Result<Vec<Value>> {
    let list: Vec<String> = counts.iter().map(ToString::to_string).collect();
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

/// One run of `bench/llama-cpp/concurrent.mjs` with `streams` streams.
fn llama_cpp_concurrent_once(
    model: &str,
    threads: usize,
    streams: usize,
    o: &Opts,
) -> anyhow::Result<Value> {
    let out = Command::new("node")
        .arg(llama_cpp_dir().join("concurrent.mjs"))
        .args([
            model,
            &threads.to_string(),
            &streams.to_string(),
            &o.stream_prompt_tokens.to_string(),
            &o.stream_max_tokens.to_string(),
        ])
        .output()
        .context("running node (install nodejs)")?;
    if !out.status.success() {
        bail!(
            "concurrent.mjs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_concurrent_output(&String::from_utf8_lossy(&out.stdout), streams)
}

/// The row `concurrent.mjs` printed for `streams` streams: its last non-empty line, one JSON
/// object in the shape of our `ConcurrencyRow` (`model` "llama.cpp", `streams`, `tokens`,
/// `wall_s`, `tps`, `ttft_p50_ms`, `itl_p50_ms`, `itl_p99_ms`, and `threads`, `batch_size`,
/// `context_size`).
fn parse_concurrent_output(stdout: &str, streams: usize) -> anyhow::Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("concurrent.mjs printed nothing")?;
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("concurrent.mjs printed no JSON row: {line:?}"))?;
    if v["model"].as_str() != Some(LLAMA_CPP_ROW) {
        bail!("concurrent.mjs row has no \"model\": \"{LLAMA_CPP_ROW}\": {line}");
    }
    if v["streams"].as_u64() != Some(streams as u64) {
        bail!("concurrent.mjs ran {} streams, not {streams}", v["streams"]);
    }
    for k in ["tokens", "wall_s", "tps"] {
        if !v[k].as_f64().is_some_and(|x| x.is_finite() && x >= 0.0) {
            bail!("concurrent.mjs row lacks a number {k:?}: {line}");
        }
    }
    Ok(v)
}

/// The concurrency table's rows, and notes for what could not run. Without `--vs-llama-cpp`:
/// ours ([`concurrency`]). With it: per stream count, ours and llama.cpp
/// (`bench/llama-cpp/concurrent.mjs`, the pinned package installed on demand) one right after
/// the other, alternating which goes first, so a change of load on the machine skews both
/// alike; the batch-1 loop from the first count's run.
fn concurrency_all(model: &str, o: &Opts) -> anyhow::Result<(Vec<Value>, Vec<String>)> {
    if !o.vs_llama_cpp {
        return Ok((concurrency(model, o)?, Vec::new()));
    }
    if let Err(e) = install_llama_cpp() {
        let note = format!(
            "llama.cpp: not measured, the pinned node-llama-cpp is not installable ({e:#}); install nodejs and npm, then rerun"
        );
        return Ok((concurrency(model, o)?, vec![note]));
    }
    let threads = concurrency_threads(o);
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    for (i, &n) in o.concurrency.iter().enumerate() {
        let mut run_ours = || -> anyhow::Result<()> {
            let ours = concurrency_for(model, o, &[n])?;
            let first = rows.is_empty();
            rows.extend(
                ours.into_iter()
                    .filter(|r| first || r["model"].as_str() != Some("batch-1 loop")),
            );
            Ok(())
        };
        let run_lc = || {
            eprintln!("concurrency {n}: llama.cpp ({threads} threads) ...");
            llama_cpp_concurrent_once(model, threads, n, o)
        };
        let lc = if i % 2 == 0 {
            run_ours()?;
            run_lc()
        } else {
            let lc = run_lc();
            run_ours()?;
            lc
        };
        match lc {
            Ok(v) => rows.push(v),
            Err(e) => notes.push(format!("llama.cpp, {n} streams: not measured ({e:#})")),
        }
    }
    Ok((rows, notes))
}

/// The `model` of llama.cpp's rows in the concurrency table (`bench/llama-cpp/concurrent.mjs`).
const LLAMA_CPP_ROW: &str = "llama.cpp";

/// The concurrency table as text: the batch-1 loop, then one line per stream count with the
/// per-sequence (baseline) and the batched model side by side, and llama.cpp beside them when
/// it was asked for (`--vs-llama-cpp`) or has rows.
fn concurrency_text(rows: &[Value], o: &Opts) -> String {
    use std::fmt::Write;
    let num = |r: &Value, k: &str| r[k].as_f64().filter(|x| x.is_finite());
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1}"));
    let find = |model: &str, n: u64| {
        rows.iter()
            .find(|r| r["model"].as_str() == Some(model) && r["streams"].as_u64() == Some(n))
    };
    let lc = o.vs_llama_cpp
        || rows
            .iter()
            .any(|r| r["model"].as_str() == Some(LLAMA_CPP_ROW));
    // (column label, row model) per model; the ratio columns of the aggregate group.
    let mut models = vec![("per-seq", "cpu-per-sequence"), ("batched", "cpu-batched")];
    let mut ratios = vec!["speedup"];
    if lc {
        models.push(("llama.cpp", LLAMA_CPP_ROW));
        ratios.push("vs llama");
    }
    let w = if lc { 9 } else { 8 };
    let span = |cols: usize| cols * w + cols.saturating_sub(1);
    let line = |first: String, groups: &[Vec<String>]| {
        let cells: Vec<String> = groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|c| format!("{c:>w$}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        format!("{first:>7} | {}", cells.join(" | "))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "concurrency: N greedy streams submitted to the scheduler at once (prompt {} ids, up to {} tokens each), CPU, {} threads",
        o.stream_prompt_tokens,
        o.stream_max_tokens,
        concurrency_threads(o)
    );
    if lc {
        let batch = rows
            .iter()
            .find(|r| r["model"].as_str() == Some(LLAMA_CPP_ROW))
            .and_then(|r| r["batch_size"].as_u64())
            .map_or(String::new(), |b| format!(" of up to {b} tokens"));
        let _ = writeln!(
            out,
            "llama.cpp = node-llama-cpp 3.22.1 prebuilt (CPU): the N streams as N sequences of one context, the same prompt ids, all pending tokens in one llama_decode batch{batch} per step (llama-server's continuous batching; node-llama-cpp's per-sequence sampling and JS between steps included)"
        );
    }
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
    let (agg, lat) = (span(models.len() + ratios.len()), span(models.len()));
    let _ = writeln!(
        out,
        "{:>7} | {:^agg$} | {:^lat$} | {:^lat$} | {:^lat$}",
        "", "aggregate tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms"
    );
    let labels: Vec<String> = models.iter().map(|(l, _)| (*l).to_owned()).collect();
    let mut agg_labels = labels.clone();
    agg_labels.extend(ratios.iter().map(|r| (*r).to_owned()));
    let _ = writeln!(
        out,
        "{}",
        line(
            "streams".into(),
            &[agg_labels, labels.clone(), labels.clone(), labels]
        )
    );
    for &n in &o.concurrency {
        let rs: Vec<Option<&Value>> = models.iter().map(|(_, m)| find(m, n as u64)).collect();
        let col =
            |k: &str| -> Vec<String> { rs.iter().map(|r| f(r.and_then(|r| num(r, k)))).collect() };
        let tps = |i: usize| rs.get(i).copied().flatten().and_then(|r| num(r, "tps"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let mut aggs = col("tps");
        aggs.push(ratio(tps(1), tps(0)));
        if lc {
            aggs.push(ratio(tps(1), tps(2)));
        }
        let _ = writeln!(
            out,
            "{}",
            line(
                n.to_string(),
                &[
                    aggs,
                    col("ttft_p50_ms"),
                    col("itl_p50_ms"),
                    col("itl_p99_ms")
                ]
            )
        );
    }
    let _ = writeln!(
        out,
        "(aggregate tok/s: all streams' tokens over the wall time from submission to the last token, prefill included; wall-clock, so other load on the machine skews it)"
    );
    if lc {
        let _ = writeln!(
            out,
            "(speedup = batched / per-seq, vs llama = batched / llama.cpp aggregate tok/s: >= 1.00x means at least on par; per N, ours and llama.cpp run one right after the other, alternating which goes first)"
        );
    }
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

    fn conc_row(model: &str, n: u64, tps: f64, ttft: f64) -> Value {
        serde_json::json!({"model": model, "streams": n, "tps": tps,
            "ttft_p50_ms": ttft, "itl_p50_ms": 3.0, "itl_p99_ms": 9.5})
    }

    #[test]
    fn concurrency_table_without_llama_cpp_has_no_llama_columns() {
        let o = parse(&args(&["--concurrency", "1,8"])).expect("parse");
        let rows = vec![
            conc_row("cpu-per-sequence", 8, 40.0, 12.0),
            conc_row("cpu-batched", 8, 160.0, 11.0),
        ];
        let t = concurrency_text(&rows, &o);
        assert!(!t.contains("llama"), "{t}");
        let header = t
            .lines()
            .find(|l| l.trim_start().starts_with("streams |"))
            .expect("a header line");
        assert_eq!(header.matches("per-seq").count(), 4, "{header}");
        // Every line of the table has its column separators in the same places.
        let bars = |l: &str| -> Vec<usize> { l.match_indices('|').map(|(i, _)| i).collect() };
        let line8 = t
            .lines()
            .find(|l| l.trim_start().starts_with("8 |"))
            .expect("a line for 8 streams");
        assert_eq!(bars(header), bars(line8));
        let line1 = t
            .lines()
            .find(|l| l.trim_start().starts_with("1 |"))
            .expect("a line for 1 stream, even without its rows");
        assert_eq!(bars(header), bars(line1));
        assert!(line1.contains('-'), "{line1}");
    }

    #[test]
    fn concurrency_table_with_llama_cpp_rows() {
        let o = parse(&args(&["--concurrency", "1,8"])).expect("parse");
        let mut lc8 = conc_row(LLAMA_CPP_ROW, 8, 80.0, 33.5);
        lc8["batch_size"] = 512.into();
        let rows = vec![
            conc_row("cpu-per-sequence", 1, 48.0, 12.0),
            conc_row("cpu-batched", 1, 49.0, 12.0),
            conc_row("cpu-per-sequence", 8, 40.0, 12.0),
            conc_row("cpu-batched", 8, 160.0, 11.0),
            lc8,
        ];
        let t = concurrency_text(&rows, &o);
        let lines: Vec<&str> = t.lines().collect();
        let find = |p: &str| {
            *lines
                .iter()
                .find(|l| l.trim_start().starts_with(p))
                .unwrap_or_else(|| panic!("no line {p:?} in\n{t}"))
        };
        let (header, line8, line1) = (find("streams |"), find("8 |"), find("1 |"));
        assert_eq!(header.matches("llama.cpp").count(), 4, "{header}");
        assert!(header.contains("vs llama"), "{header}");
        // 8 streams: llama.cpp 80 tok/s, batched 160: 2.00x; its TTFT 33.5 ms.
        assert!(
            line8.contains("80.0") && line8.contains("2.00x") && line8.contains("4.00x"),
            "{line8}"
        );
        assert!(line8.contains("33.5"), "{line8}");
        // 1 stream has no llama.cpp row: its cells and ratio read "-".
        let cells: Vec<&str> = line1
            .split('|')
            .nth(1)
            .expect("agg")
            .split_whitespace()
            .collect();
        assert_eq!(cells, ["48.0", "49.0", "-", "1.02x", "-"], "{line1}");
        let bars = |l: &str| -> Vec<usize> { l.match_indices('|').map(|(i, _)| i).collect() };
        assert_eq!(bars(header), bars(line8));
        assert_eq!(bars(header), bars(line1));
        assert!(t.contains("batch of up to 512 tokens"), "{t}");
        // Asked for (--vs-llama-cpp) but no row came: the columns are there, empty.
        let o = parse(&args(&["--concurrency", "8", "--vs-llama-cpp"])).expect("parse");
        let t = concurrency_text(&rows[2..4], &o);
        assert!(t.contains("llama.cpp"), "{t}");
        let line8 = t
            .lines()
            .find(|l| l.trim_start().starts_with("8 |"))
            .expect("a line for 8 streams");
        let cells: Vec<&str> = line8
            .split('|')
            .nth(1)
            .expect("agg")
            .split_whitespace()
            .collect();
        assert_eq!(cells, ["40.0", "160.0", "-", "4.00x", "-"], "{line8}");
    }

    #[test]
    fn parses_concurrent_mjs_output() {
        let line = r#"{"model":"llama.cpp","streams":8,"tokens":256,"wall_s":2.5,"tps":102.4,"ttft_p50_ms":90.5,"itl_p50_ms":9.1,"itl_p99_ms":44.2,"threads":2,"batch_size":512,"context_size":2048}"#;
        let v = parse_concurrent_output(&format!("some log\n{line}\n\n"), 8).expect("parse");
        assert_eq!(v["tokens"].as_u64(), Some(256));
        assert_eq!(v["tps"].as_f64(), Some(102.4));
        assert_eq!(v["itl_p99_ms"].as_f64(), Some(44.2));
        assert!(
            parse_concurrent_output(line, 4).is_err(),
            "wrong stream count"
        );
        assert!(parse_concurrent_output("", 8).is_err());
        assert!(parse_concurrent_output("not json", 8).is_err());
        let other = line.replace("\"llama.cpp\"", "\"cpu-batched\"");
        assert!(
            parse_concurrent_output(&other, 8).is_err(),
            "not llama.cpp's row"
        );
        let no_tps = line.replace("\"tps\":102.4", "\"tps\":null");
        assert!(parse_concurrent_output(&no_tps, 8).is_err(), "tps missing");
    }

    #[test]
    fn vs_llama_cpp_runs_the_concurrency_table_only_when_asked() {
        let o = parse(&args(&["--vs-llama-cpp"])).expect("parse");
        assert!(!o.concurrency_given && !o.concurrency.is_empty());
        let o = parse(&args(&["--vs-llama-cpp", "--concurrency", "1,8"])).expect("parse");
        assert!(o.concurrency_given && o.vs_llama_cpp);
    }

    /// Runs `bench/llama-cpp/concurrent.mjs` for real (node, the installed package and the
    /// cached SmolLM2 model); `cargo test -p xtask -- --ignored concurrent_mjs`.
    #[test]
    #[ignore = "needs node, bench/llama-cpp installed and the cached model; slow"]
    fn concurrent_mjs_runs_on_the_cached_model() {
        let model = crate::model::fetch("smollm2-135m", None).expect("model");
        assert!(
            llama_cpp_installed(),
            "bench/llama-cpp is not installed (npm ci there)"
        );
        let o = parse(&args(&[
            "--stream-prompt-tokens",
            "4",
            "--stream-max-tokens",
            "3",
        ]))
        .expect("parse");
        let v = llama_cpp_concurrent_once(&model.display().to_string(), 1, 3, &o).expect("run");
        let tokens = v["tokens"].as_u64().expect("tokens");
        assert!((3..=9).contains(&tokens), "{v}");
        assert!(v["context_size"].as_u64().expect("context") >= 3 * 7, "{v}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
