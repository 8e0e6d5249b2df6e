//! `cargo xtask bench inference`: prefill and decode tokens/s of the inference backends.
//!
//! Builds `inference-bench` in release mode (numbers from a debug build would be meaningless),
//! then measures on SmolLM2-135M Q4_1 (fetched into the model cache if absent): the CPU backend
//! with 1 and 2 threads, the CUDA backend when a GPU is usable (with its share of the
//! memory-bandwidth floor), and llama.cpp's `llama-bench` as a baseline when it is on PATH.
//!
//! Options: `--model FILE`, `--prompt-tokens N` (128), `--gen-tokens N` (64),
//! `--threads LIST` (1,2), `--no-cuda`, `--json`.

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
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        model: None,
        prompt_tokens: 128,
        gen_tokens: 64,
        threads: vec![1, 2],
        cuda: true,
        json: false,
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
            "--json" => o.json = true,
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench inference [--model FILE] [--prompt-tokens N] [--gen-tokens N] [--threads 1,2] [--no-cuda] [--json]\n\n\
Measures prefill and decode tokens/s of the CPU backend (per thread count), the CUDA backend\n\
when a GPU is present, and llama.cpp's llama-bench when installed. The model defaults to\n\
SmolLM2-135M Q4_1 from the model cache (fetched if absent)."
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

/// llama.cpp baseline through node-llama-cpp's prebuilt binaries when `LLAMA_CPP_NODE_DIR`
/// names a directory where `npm install node-llama-cpp@3.22.1` was run (see
/// `inference/bench/llama-cpp-baseline.mjs`).
fn llama_cpp_node(model: &str, o: &Opts) -> anyhow::Result<Vec<Value>> {
    let Some(dir) = std::env::var_os("LLAMA_CPP_NODE_DIR") else {
        return Ok(vec![]);
    };
    let script = PathBuf::from(dir).join("llama-cpp-baseline.mjs");
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../inference/bench/llama-cpp-baseline.mjs"
    );
    std::fs::copy(src, &script)
        .with_context(|| format!("copying the baseline script to {}", script.display()))?;
    let mut rows = Vec::new();
    for t in &o.threads {
        let out = Command::new("node")
            .arg(&script)
            .args([
                model,
                &t.to_string(),
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
        rows.push(serde_json::from_str(line)?);
    }
    Ok(rows)
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
pub fn inference(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let model = match &o.model {
        Some(m) => m.clone(),
        None => crate::model::fetch("smollm2-135m", None)?,
    };
    let model_s = model.display().to_string();
    let common = vec![
        "--model".to_owned(),
        model_s.clone(),
        "--prompt-tokens".into(),
        o.prompt_tokens.to_string(),
        "--gen-tokens".into(),
        o.gen_tokens.to_string(),
    ];
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
            "llama.cpp: no `llama-bench` on PATH (not packaged for Debian bookworm) and LLAMA_CPP_NODE_DIR unset; see inference/bench/llama-cpp-baseline.mjs".into(),
        );
    }

    rows.extend(lc);
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": model_s, "results": rows, "notes": notes})
            )?
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
    }
}
