//! `gpu-check`: one self-contained run that proves the CUDA backend on a GPU machine and
//! measures it. Built here (`cargo build --release -p inference --bin gpu-check`), copied to a
//! GPU machine that needs no Rust toolchain and no network: only the NVIDIA driver and an
//! NVRTC library (CUDA toolkit or pip `nvidia-cuda-nvrtc`).
//!
//! Steps: find the driver and NVRTC (re-executing itself with `LD_LIBRARY_PATH` extended when
//! NVRTC is installed but not on the search path), print the device, compile the kernels,
//! check every kernel against the CPU reference, compare whole synthetic models with the CPU
//! backend, then benchmark decode/prefill on SmolLM2-135M-, Qwen2.5-0.5B-, Llama-3.2-1B- and
//! Llama-3.1-8B-shaped synthetic models (each decode kernel variant, and a per-kernel profile of
//! one decode step), with and without CUDA graphs, against the measured memory bandwidth. Ends with a JSON
//! summary; exits 1 if any check fails, 2 if there is no usable GPU.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use inference::bench::concurrency::run_concurrency_on;
use inference::cpu::{CpuBackend, CpuOptions};
use inference::cuda::batch::{
    check_batch_model, check_batch_model_qwen3, check_batch_model_with, check_sample_rows,
};
use inference::cuda::checks::{
    CheckResult, measure_bandwidth, model_cases, run_kernel_checks, run_kernel_checks_matching,
    run_model_checks,
};
use inference::cuda::device::driver_present;
use inference::cuda::nvrtc::{find_library_dirs, library_files, nvrtc_present};
use inference::cuda::{
    CudaBackend, CudaBatchModel, CudaBatchOptions, CudaOptions, DecodeGraphs, DecodeMatvec, Gpu,
};
use inference::sampling::SimpleSample;
use inference::scheduler::{BatchModel, RowOutput, Scheduler, SchedulerConfig, SeqWork};
use inference::{Backend, GgmlType, Gguf, LlamaConfig, LlamaWeights};
use serde_json::{Value, json};

const HELP: &str = "\
gpu-check: verify and benchmark the CUDA backend on this machine's GPU

USAGE:
    gpu-check [--quick] [--no-bench] [--emulate] [--ordinal N] [--json] [--json-out FILE]
              [--time-limit SECONDS] [--models LIST] [--types LIST]

WHAT IT DOES (about 1-2 minutes on an H100/H200):
    1. loads libcuda and libnvrtc (see LIBRARIES), prints the GPU
    2. compiles the kernels with NVRTC for the GPU's architecture
    3. checks every kernel against the CPU reference (PASS/FAIL lines, max abs/rel error)
    4. runs synthetic models on the CPU backend and on the GPU and compares logits and
       greedy token ids (with and without CUDA graphs)
    5. benchmarks prefill and decode tokens/s on synthetic models with the shapes of
       SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B in Q4_0/Q4_1/Q8_0: each
       decode mat-vec variant (int8 dp4a at 4/8/16 blocks per SM, the float baseline, with
       and without CUDA graphs) against the measured memory bandwidth, then a per-kernel
       profile of one decode step (event-timed; GB/s of each weight product); then batched
       decode (the continuous-batching model, paged KV cache, the served path): aggregate
       tokens/s and inter-token latency at 1, 8, 32 and 64 concurrent sequences vs the
       batch-1 loop, f32 / int8 products, argmax / temperature + top-p on the device, with
       and without the decode step's CUDA graph per batch-size bucket; then the served path
       (the scheduler over that model, as the HTTP server runs it) at the same stream counts:
       aggregate tokens/s, time to first token, inter-token latency, per-stream decode rate
       vs the batch-1 device loop
    6. prints a JSON summary (also written to --json-out FILE)

OPTIONS:
    --quick        benchmark only the SmolLM2-135M shape, no CPU benchmark
    --models LIST  benchmark these shapes (comma-separated: smollm2-135m, qwen2.5-0.5b,
                   llama-3.2-1b, llama-3.1-8b)
    --types LIST   weight types to benchmark (Q4_0, Q4_1, Q8_0, F16; default the first three)
    --no-bench     checks only
    --emulate      self-test without a GPU: run a reduced set of checks and a tiny benchmark
                   on the host kernel emulator (needs g++ or clang++; slow; numbers meaningless)
    --ordinal N    GPU to use (default 0)
    --json         print only the JSON summary on stdout (progress goes to stderr)
    --json-out F   also write the JSON summary to file F
    --time-limit S stop with exit status 3 after S seconds (default 480)
    -h, --help     this text

LIBRARIES:
    libcuda.so.1 comes with the NVIDIA driver. libnvrtc.so (CUDA 12.x or 13.x) comes with
    the CUDA toolkit (/usr/local/cuda/lib64) or the pip package nvidia-cuda-nvrtc
    (site-packages/nvidia/cuda_nvrtc/lib or nvidia/cu13/lib). If it is not on the loader's
    search path, gpu-check looks in those places and re-executes itself with LD_LIBRARY_PATH
    set; to choose one yourself: LD_LIBRARY_PATH=/usr/local/cuda/lib64 gpu-check

EXIT STATUS:
    0 all checks passed, 1 a check failed, 2 no usable GPU/driver/NVRTC, 3 time limit hit";

struct Args {
    quick: bool,
    emulate: bool,
    bench: bool,
    ordinal: usize,
    json_only: bool,
    json_out: Option<PathBuf>,
    time_limit: u64,
    models: Option<String>,
    types: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        emulate: false,
        bench: true,
        ordinal: 0,
        json_only: false,
        json_out: None,
        time_limit: 480,
        models: None,
        types: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--quick" => a.quick = true,
            "--emulate" => a.emulate = true,
            "--no-bench" => a.bench = false,
            "--json" => a.json_only = true,
            "--ordinal" => {
                a.ordinal = it
                    .next()
                    .context("--ordinal needs a number")?
                    .parse()
                    .context("--ordinal needs a number")?
            }
            "--time-limit" => {
                a.time_limit = it
                    .next()
                    .context("--time-limit needs seconds")?
                    .parse()
                    .context("--time-limit needs seconds")?
            }
            "--models" => a.models = Some(it.next().context("--models needs a list")?),
            "--types" => a.types = Some(it.next().context("--types needs a list")?),
            "--json-out" => a.json_out = Some(it.next().context("--json-out needs a file")?.into()),
            other => anyhow::bail!("unknown argument {other:?}; see gpu-check --help"),
        }
    }
    Ok(a)
}

/// The stage now running, for the watchdog's message.
static STAGE: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn stage(s: &str) {
    if let Ok(mut g) = STAGE.lock() {
        *g = s.to_string();
    }
}

/// Exits with status 3 and a clear message if the whole run takes longer than `secs` (a hung
/// kernel must not eat the GPU machine's time).
fn start_watchdog(secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        let st = STAGE.lock().map(|g| g.clone()).unwrap_or_default();
        eprintln!("TIMEOUT: gpu-check exceeded its time limit of {secs} s during: {st}");
        println!(
            "{}",
            json!({"ok": false, "error": format!("timeout after {secs} s during {st}")})
        );
        std::process::exit(3);
    });
}

/// Progress output: stdout normally, stderr with --json.
struct Out {
    json_only: bool,
}

impl Out {
    fn line(&self, s: &str) {
        if self.json_only {
            eprintln!("{s}");
        } else {
            println!("{s}");
            let _ = std::io::stdout().flush();
        }
    }
}

const REEXEC_ENV: &str = "GPU_CHECK_REEXEC";

/// If libcuda or libnvrtc is installed but not loadable by name, re-executes this program with
/// `LD_LIBRARY_PATH` extended (the loader reads it only at start-up). For an NVRTC present only
/// under a versioned name the search would miss (e.g. only `libnvrtc.so.13`), a private
/// directory with a `libnvrtc.so` link is put first.
fn ensure_libraries(out: &Out) -> Result<()> {
    if driver_present() && nvrtc_present() {
        return Ok(());
    }
    if std::env::var_os(REEXEC_ENV).is_some() {
        return Ok(()); // already retried; the caller reports what is missing
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut link_dir: Option<PathBuf> = None;
    if !driver_present() {
        dirs.extend(find_library_dirs("libcuda.so"));
    }
    if !nvrtc_present() {
        let found = find_library_dirs("libnvrtc.so");
        if let Some(d) = found.first() {
            let names = library_files(d, "libnvrtc.so");
            if !names.iter().any(|n| n == "libnvrtc.so")
                && let Some(best) = names.iter().filter(|n| !n.contains("alt")).max()
            {
                let tmp =
                    std::env::temp_dir().join(format!("gpu-check-libs-{}", std::process::id()));
                std::fs::create_dir_all(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                let link = tmp.join("libnvrtc.so");
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(d.join(best), &link)
                    .with_context(|| format!("linking {}", link.display()))?;
                link_dir = Some(tmp);
            }
        }
        dirs.extend(found);
    }
    if dirs.is_empty() && link_dir.is_none() {
        return Ok(());
    }
    let mut parts: Vec<String> = link_dir
        .iter()
        .chain(dirs.iter())
        .map(|p| p.display().to_string())
        .collect();
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
        parts.push(old);
    }
    let lp = parts.join(":");
    out.line(&format!(
        "libraries: re-executing with LD_LIBRARY_PATH={lp}"
    ));
    let exe = std::env::current_exe().context("finding this executable")?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", lp)
        .env(REEXEC_ENV, "1")
        .exec();
    Err(anyhow::anyhow!("re-executing failed: {err}"))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let out = Out {
        json_only: args.json_only,
    };
    start_watchdog(args.time_limit);
    match run(&args, &out) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn check_json(r: &CheckResult) -> Value {
    json!({
        "name": r.name, "passed": r.passed,
        "max_abs": finite(r.max_abs), "max_rel": finite(r.max_rel),
        "tolerance": r.tolerance, "detail": r.detail,
    })
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

fn emit(out: &Out, args: &Args, summary: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(summary)?;
    if !args.json_only {
        println!("\n=== JSON summary ===");
    }
    println!("{text}");
    if let Some(p) = &args.json_out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
        out.line(&format!("summary written to {}", p.display()));
    }
    Ok(())
}

fn run(args: &Args, out: &Out) -> Result<i32> {
    let t_start = Instant::now();
    out.line("=== gpu-check: CUDA backend verification ===");
    let (gpu, info) = if args.emulate {
        let g = Gpu::emulated().map_err(|e| anyhow::anyhow!("{e}"))?;
        out.line("device: HOST KERNEL EMULATOR (self-test mode; no GPU used, timings meaningless)");
        let i = g.info.clone();
        (g, i)
    } else {
        ensure_libraries(out)?;
        let info = match inference::cuda::cuda_available() {
            Ok(i) => i,
            Err(why) => {
                out.line(&format!("NO GPU: {why}"));
                emit(
                    out,
                    args,
                    &json!({"ok": false, "gpu": Value::Null, "error": why}),
                )?;
                return Ok(2);
            }
        };
        out.line(&format!("device: {info}"));
        if !nvrtc_present() {
            let why = inference::cuda::nvrtc::no_nvrtc_message();
            out.line(&format!("NO NVRTC: {why}"));
            emit(out, args, &json!({"ok": false, "error": why}))?;
            return Ok(2);
        }
        let gpu = match Gpu::new(args.ordinal) {
            Ok(g) => g,
            Err(e) => {
                out.line(&format!("FAIL kernel compilation/loading: {e}"));
                emit(
                    out,
                    args,
                    &json!({"ok": false, "device": info.to_string(), "error": e.to_string()}),
                )?;
                return Ok(1);
            }
        };

        (gpu, info)
    };
    out.line(&format!(
        "kernels: {} for {}, ready in {:.0} ms{}",
        gpu.kernels_from,
        gpu.target,
        gpu.compile_ms,
        if gpu.compile_log.trim().is_empty() {
            String::new()
        } else {
            format!("\nNVRTC log:\n{}", gpu.compile_log)
        }
    ));

    stage("kernel checks");
    out.line("\n=== kernel checks (GPU vs CPU reference) ===");
    let kernel = if args.emulate {
        run_kernel_checks_matching(&gpu, |l| {
            matches!(
                l,
                "matvec Q4_0 67x320"
                    | "matvec Q8_0 70x576 +rmsnorm"
                    | "matvec Q4_1 33x1536 +silu"
                    | "matmul Q8_0"
                    | "embed Q4_1"
                    | "rope neox"
                    | "rope_kv norm T=1"
                    | "attention hd=64 T=3 pos=20"
                    | "argmax_step"
            )
        })
    } else {
        run_kernel_checks(&gpu)
    };
    for r in &kernel {
        out.line(&r.line());
    }
    stage("whole-model checks");
    out.line("\n=== whole-model checks (synthetic models, GPU vs CPU backend) ===");
    let cases: Vec<_> = if args.emulate {
        model_cases()
            .into_iter()
            .filter(|c| c.cfg.dim <= 64 && c.ty == GgmlType::Q4_0)
            .map(|mut c| {
                c.n = 3;
                c
            })
            .collect()
    } else {
        model_cases()
    };
    let mut model = run_model_checks(&gpu, &cases);
    // The continuous-batching model (paged KV cache) against the f32 reference.
    let batch_types: &[GgmlType] = if args.emulate {
        &[GgmlType::Q4_0]
    } else {
        &[
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::F16,
        ]
    };
    for ty in batch_types {
        model.push(check_batch_model(&gpu, *ty));
        if *ty != GgmlType::F16 {
            // The served default for quantized weights: int8 activations (matmulq).
            model.push(check_batch_model_with(&gpu, *ty, DecodeMatvec::Int8));
        }
    }
    model.push(check_batch_model_qwen3(&gpu, GgmlType::Q8_0));
    // Device sampling of the served path (greedy, temperature, top-p) against the host sampler,
    // at Llama 3's and Qwen's vocabulary sizes (a small one under the emulator).
    let vocabs: &[usize] = if args.emulate {
        &[3000]
    } else {
        &[128_256, 151_936]
    };
    for &v in vocabs {
        model.push(check_sample_rows(&gpu, v));
    }
    for r in &model {
        out.line(&r.line());
    }
    let failed: Vec<&CheckResult> = kernel.iter().chain(&model).filter(|r| !r.passed).collect();

    let mut bench_json = Value::Null;
    if args.bench {
        stage("benchmark");
        out.line("\n=== benchmark ===");
        match bench(&gpu, args, out) {
            Ok(v) => bench_json = v,
            Err(e) => {
                out.line(&format!("benchmark failed: {e:#}"));
                bench_json = json!({"error": format!("{e:#}")});
            }
        }
    }
    let ok = failed.is_empty();
    out.line(&format!(
        "\n{} checks: {} passed, {} failed; total {:.1} s",
        if ok { "ALL PASS" } else { "FAILURES" },
        kernel.len() + model.len() - failed.len(),
        failed.len(),
        t_start.elapsed().as_secs_f64()
    ));
    for f in &failed {
        out.line(&format!("  failed: {}", f.name));
    }
    let summary = json!({
        "ok": ok,
        "device": {
            "name": info.name, "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
            "total_mem_bytes": info.total_mem, "sm_count": info.sm_count,
            "driver_cuda_version": info.driver_version,
            "nvrtc_version": info.nvrtc_version.map(|(a, b)| format!("{a}.{b}")),
            "target": gpu.target.to_string(), "compile_ms": gpu.compile_ms,
            "kernels_from": gpu.kernels_from,
        },
        "kernel_checks": kernel.iter().map(check_json).collect::<Vec<_>>(),
        "model_checks": model.iter().map(check_json).collect::<Vec<_>>(),
        "failed": failed.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        "bench": bench_json,
        "total_seconds": t_start.elapsed().as_secs_f64(),
    });
    emit(out, args, &summary)?;
    Ok(if ok { 0 } else { 1 })
}

/// A built benchmark model: label, config, weight type, GGUF bytes.
type Built = (String, LlamaConfig, GgmlType, Result<Vec<u8>, String>);

/// Synthetic model bytes for the benchmark shapes, built in parallel (random quant bytes for
/// the block types, see `synthetic_gguf_fast`).
fn build_models(shapes: &[(String, LlamaConfig)], types: &[GgmlType]) -> Vec<Built> {
    let jobs: Vec<(String, LlamaConfig, GgmlType)> = shapes
        .iter()
        .flat_map(|(n, c)| types.iter().map(move |t| (n.clone(), c.clone(), *t)))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(n, c, t)| {
                s.spawn(move || {
                    let r = inference::synthetic::synthetic_gguf_fast(&c, t, 7)
                        .map_err(|e| e.to_string());
                    (n, c, t, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        String::new(),
                        LlamaConfig::tiny(),
                        GgmlType::F32,
                        Err("model builder panicked".into()),
                    )
                })
            })
            .collect()
    })
}

/// The benchmark model shapes (synthetic weights, real architectures' dimensions).
fn bench_shapes() -> Vec<(String, LlamaConfig)> {
    let base = LlamaConfig::smollm2_135m();
    let shape = |vocab, dim, layers, heads, kv, hd, ffn, tied, theta| {
        let mut q = base.clone();
        q.vocab = vocab;
        q.dim = dim;
        q.n_layers = layers;
        q.n_heads = heads;
        q.n_kv_heads = kv;
        q.head_dim = hd;
        q.ffn_dim = ffn;
        q.context_len = 4096;
        q.rope_theta = theta;
        q.tied_embeddings = tied;
        q
    };
    vec![
        ("smollm2-135m".to_string(), base.clone()),
        (
            "qwen2.5-0.5b".to_string(),
            shape(151_936, 896, 24, 14, 2, 64, 4864, true, 1_000_000.0),
        ),
        (
            "llama-3.2-1b".to_string(),
            shape(128_256, 2048, 16, 32, 8, 64, 8192, true, 500_000.0),
        ),
        (
            "llama-3.1-8b".to_string(),
            shape(128_256, 4096, 32, 32, 8, 128, 14_336, false, 500_000.0),
        ),
    ]
}

fn bench(gpu: &Gpu, args: &Args, out: &Out) -> Result<Value> {
    let plan = if args.emulate {
        Plan {
            bw_bytes: 1 << 16,
            prefill: 8,
            decode: 3,
            max_ctx: 64,
        }
    } else {
        Plan {
            bw_bytes: 1 << 30,
            prefill: 256,
            decode: 128,
            max_ctx: 1024,
        }
    };
    let (read_bw, copy_bw) = measure_bandwidth(gpu, plan.bw_bytes).context("bandwidth")?;
    out.line(&format!(
        "memory bandwidth: read kernel {:.0} GB/s, device-to-device copy {:.0} GB/s (read+write)",
        read_bw / 1e9,
        copy_bw / 1e9
    ));
    let all = bench_shapes();
    let shapes: Vec<(String, LlamaConfig)> = if args.emulate {
        vec![("tiny".to_string(), LlamaConfig::tiny())]
    } else if let Some(list) = &args.models {
        let mut v = Vec::new();
        for want in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some(s) = all.iter().find(|(n, _)| n == want) else {
                anyhow::bail!(
                    "unknown benchmark model {want:?}; choose from {}",
                    all.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            v.push(s.clone());
        }
        v
    } else if args.quick {
        all[..1].to_vec()
    } else {
        all
    };
    let types: Vec<GgmlType> = if args.emulate {
        vec![GgmlType::Q4_0]
    } else if let Some(list) = &args.types {
        let mut v = Vec::new();
        for t in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            v.push(match t.to_ascii_uppercase().as_str() {
                "Q4_0" => GgmlType::Q4_0,
                "Q4_1" => GgmlType::Q4_1,
                "Q8_0" => GgmlType::Q8_0,
                "F16" => GgmlType::F16,
                other => anyhow::bail!("unknown type {other:?}; choose from Q4_0, Q4_1, Q8_0, F16"),
            });
        }
        v
    } else {
        vec![GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0]
    };
    let t0 = Instant::now();
    let models = build_models(&shapes, &types);
    out.line(&format!(
        "built {} synthetic models in {:.1} s",
        models.len(),
        t0.elapsed().as_secs_f64()
    ));
    let mut rows = Vec::new();
    let mut cpu_rows = Vec::new();
    let mut batch_rows = Vec::new();
    for (name, cfg, ty, bytes) in &models {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                out.line(&format!("{name} {ty}: building the model failed: {e}"));
                continue;
            }
        };
        stage(&format!("benchmark {name} {ty}"));
        match bench_one(gpu, name, cfg, *ty, bytes, read_bw, &plan, out) {
            Ok(r) => rows.push(r),
            Err(e) => {
                out.line(&format!("{name} {ty}: FAILED: {e:#}"));
                rows.push(json!({"model": name, "type": ty.name(), "error": format!("{e:#}")}));
            }
        }
        stage(&format!("batched decode {name} {ty}"));
        match bench_batched(gpu, name, *ty, bytes, &plan) {
            Ok(r) => batch_rows.push(r),
            Err(e) => {
                out.line(&format!("{name} {ty}: batched decode FAILED: {e:#}"));
                batch_rows
                    .push(json!({"model": name, "type": ty.name(), "error": format!("{e:#}")}));
            }
        }
        if !args.quick && !args.emulate && name == "smollm2-135m" {
            match bench_cpu(cfg, bytes) {
                Ok(r) => cpu_rows.push(json!({"model": name, "type": ty.name(), "prefill_tokens_per_s": r.0, "decode_tokens_per_s": r.1, "threads": r.2})),
                Err(e) => cpu_rows.push(json!({"model": name, "type": ty.name(), "error": format!("{e:#}")})),
            }
        }
    }
    out.line("\n=== decode summary (tokens/s; BW share = weight bytes per token / measured read bandwidth / time per token) ===");
    out.line(&format!(
        "{:<14} {:<5} {:>6} {:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "model",
        "type",
        "params",
        "MB/tok",
        "prefill/s",
        "int8 graph",
        "float grph",
        "int8 nogr",
        "best",
        "floor ms",
        "share",
        "float sh"
    ));
    for r in &rows {
        if r.get("error").is_some() {
            continue;
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        out.line(&format!(
            "{:<14} {:<5} {:>5.0}M {:>8.1} {:>9.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.3} {:>7.0}% {:>7.0}%",
            r["model"].as_str().unwrap_or(""),
            r["type"].as_str().unwrap_or(""),
            f("params") / 1e6,
            f("weight_bytes_per_token") / 1e6,
            f("prefill_tokens_per_s"),
            f("decode_tokens_per_s_graph"),
            f("decode_tokens_per_s_float_graph"),
            f("decode_tokens_per_s_no_graph"),
            f("decode_tokens_per_s_best"),
            f("bandwidth_floor_ms_per_token"),
            100.0 * f("bandwidth_share_best"),
            100.0 * f("bandwidth_share_float"),
        ));
    }
    out.line("\n=== batched decode (CudaBatchModel::step_sampled, the served path: paged KV cache, all sequences of a step as one batch, the pick on the device; matmul: f32 / int8-u = int8 unfused / int8 = int8 with norm and SiLU fused into the quantization (served default); +s = temperature 0.8 top-p 0.95 sampling instead of argmax; -g = decode steps as plain launches instead of one CUDA graph per batch-size bucket (graphs are the served default); aggregate = tokens/s over all sequences; ITL = time per step) ===");
    out.line(&format!(
        "{:<14} {:<5} {:<8} {:>10} {:>5} {:>12} {:>9} {:>9} {:>9} {:>8}",
        "model",
        "type",
        "matmul",
        "loop tok/s",
        "seqs",
        "agg tok/s",
        "ITL ms",
        "ITL p90",
        "ITL max",
        "x loop"
    ));
    for r in &batch_rows {
        if let Some(e) = r.get("error") {
            out.line(&format!(
                "{:<14} {:<5} error: {}",
                r["model"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                e.as_str().unwrap_or("")
            ));
            continue;
        }
        let base = r["loop_tokens_per_s"].as_f64().unwrap_or(0.0);
        for b in r["batches"].as_array().into_iter().flatten() {
            let f = |k: &str| b[k].as_f64().unwrap_or(0.0);
            out.line(&format!(
                "{:<14} {:<5} {:<8} {:>10.1} {:>5} {:>12.1} {:>9.3} {:>9.3} {:>9.3} {:>7.2}x",
                r["model"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                b["matmul"].as_str().unwrap_or(""),
                base,
                b["sequences"].as_u64().unwrap_or(0),
                f("aggregate_tokens_per_s"),
                f("itl_ms_mean"),
                f("itl_ms_p90"),
                f("itl_ms_max"),
                f("aggregate_tokens_per_s") / base.max(1e-9),
            ));
            if let Some(e) = b["graph_error"].as_str() {
                out.line(&format!(
                    "  ^ decode graph capture failed, the row ran plain launches: {e}"
                ));
            }
        }
    }
    out.line("\n=== served path (Scheduler over CudaBatchModel with the served defaults: what the HTTP server runs, minus HTTP; N greedy streams submitted at once, prefix cache off; agg = generated tokens / wall time, prefill included; per-stream decode = 1000 / ITL p50; x loop = per-stream decode / the batch-1 device loop, the issue's target is >= 0.90 at N = 1) ===");
    out.line(&format!(
        "{:<14} {:<5} {:>10} {:>5} {:>10} {:>10} {:>9} {:>9} {:>12} {:>7}",
        "model",
        "type",
        "loop tok/s",
        "N",
        "agg tok/s",
        "TTFT p50",
        "ITL p50",
        "ITL p99",
        "decode/strm",
        "x loop"
    ));
    for r in &batch_rows {
        let base = r["loop_tokens_per_s"].as_f64().unwrap_or(0.0);
        for s in r["served"].as_array().into_iter().flatten() {
            let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
            let per_stream = 1000.0 / f("itl_p50_ms");
            out.line(&format!(
                "{:<14} {:<5} {:>10.1} {:>5} {:>10.1} {:>10.3} {:>9.3} {:>9.3} {:>12.1} {:>6.2}x",
                r["model"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                base,
                s["streams"].as_u64().unwrap_or(0),
                f("tps"),
                f("ttft_p50_ms"),
                f("itl_p50_ms"),
                f("itl_p99_ms"),
                per_stream,
                per_stream / base.max(1e-9),
            ));
        }
        if let Some(e) = r["served_graph_error"].as_str() {
            out.line(&format!(
                "  ^ decode graph capture failed (plain launches): {e}"
            ));
        }
    }
    if !cpu_rows.is_empty() {
        out.line("CPU backend (same synthetic models):");
        for r in &cpu_rows {
            out.line(&format!(
                "  {:<20} {:<5} prefill {:>8.1} tok/s   decode {:>7.1} tok/s   ({} threads)",
                r["model"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
                r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                r["threads"].as_u64().unwrap_or(0),
            ));
        }
    }
    Ok(json!({
        "read_bandwidth_bytes_per_s": read_bw,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "gpu": rows,
        "batched": batch_rows,
        "cpu": cpu_rows,
    }))
}

fn parse(bytes: &[u8]) -> Result<Gguf<'_>> {
    Gguf::parse(bytes).context("parsing synthetic GGUF")
}

/// Benchmark sizes.
struct Plan {
    bw_bytes: usize,
    prefill: usize,
    decode: usize,
    max_ctx: usize,
}

/// Decode tokens/s with the backend's current settings: time(prompt + 1 + n) - time(prompt
/// + 1) over n tokens, after a warm-up run (which also captures the graph).
fn decode_rate(be: &mut CudaBackend, prompt: &[u32], n: usize) -> Result<f64> {
    be.generate_greedy_on_device(prompt, n + 1)?;
    let mut best = 0f64;
    for _ in 0..2 {
        let t = Instant::now();
        be.generate_greedy_on_device(prompt, 1)?;
        let base = t.elapsed().as_secs_f64();
        let t = Instant::now();
        be.generate_greedy_on_device(prompt, n + 1)?;
        let full = t.elapsed().as_secs_f64();
        best = best.max(n as f64 / (full - base).max(1e-9));
    }
    Ok(best)
}

#[allow(clippy::too_many_arguments)]
fn bench_one(
    gpu: &Gpu,
    name: &str,
    cfg: &LlamaConfig,
    ty: GgmlType,
    bytes: &[u8],
    read_bw: f64,
    plan: &Plan,
    out: &Out,
) -> Result<Value> {
    let g = parse(bytes)?;
    let w = LlamaWeights::from_gguf(&g).context("weights")?;
    anyhow::ensure!(
        w.config.dim == cfg.dim,
        "synthetic model does not have the requested shape"
    );
    let t_load = Instant::now();
    let mut be = CudaBackend::load_on(
        gpu.clone(),
        &w,
        &CudaOptions {
            ordinal: gpu.info.ordinal,
            max_context: Some(plan.max_ctx),
            max_batch: plan.prefill,
            use_graphs: true,
            ..Default::default()
        },
    )
    .context("loading on the GPU")?;
    let load_s = t_load.elapsed().as_secs_f64();
    let vocab = be.config().vocab as u32;
    let prompt: Vec<u32> = (0..plan.prefill as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    // Prefill: one warm-up, then 3 timed runs of the whole prompt.
    be.forward(&prompt, 0)?;
    let t = Instant::now();
    for _ in 0..3 {
        be.forward(&prompt, 0)?;
    }
    let prefill = 3.0 * plan.prefill as f64 / t.elapsed().as_secs_f64();
    let short = &prompt[..plan.prefill.min(16)];
    let n = plan.decode;
    let wb = be.weight_bytes_per_token() as f64;
    let floor = wb / read_bw;
    let (default_kind, default_bps) = be.decode_matvec();
    // Variants: the default (int8 mat-vec, graph), its grid sizes, the float baseline, and
    // the default without graphs.
    let mut variants = Vec::new();
    let mut tried = Vec::new();
    for (kind, bps, graphs) in [
        (default_kind, default_bps, true),
        (DecodeMatvec::Int8, 4, true),
        (DecodeMatvec::Int8, 8, true),
        (DecodeMatvec::Int8, 16, true),
        (DecodeMatvec::Float, default_bps, true),
        (default_kind, default_bps, false),
    ] {
        if tried.contains(&(kind, bps, graphs)) {
            continue;
        }
        tried.push((kind, bps, graphs));
        be.set_decode_matvec(kind, bps);
        be.set_use_graphs(graphs);
        let rate = decode_rate(&mut be, short, n)?;
        if graphs && let Some(e) = be.graph_error() {
            anyhow::bail!(
                "CUDA graph capture failed (decode numbers would be without graphs): {e}"
            );
        }
        variants.push(json!({
            "matvec": kind.name(), "blocks_per_sm": bps, "graphs": graphs,
            "decode_tokens_per_s": rate, "bandwidth_share": floor * rate,
        }));
    }
    let pick = |kind: DecodeMatvec, graphs: bool, bps: Option<u32>| -> f64 {
        variants
            .iter()
            .filter(|v| {
                v["matvec"] == kind.name()
                    && v["graphs"] == graphs
                    && bps.is_none_or(|b| v["blocks_per_sm"] == b)
            })
            .map(|v| v["decode_tokens_per_s"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    let default_rate = pick(default_kind, true, Some(default_bps));
    let float_rate = pick(DecodeMatvec::Float, true, None);
    let nograph_rate = pick(default_kind, false, Some(default_bps));
    let best_rate = pick(DecodeMatvec::Int8, true, None).max(float_rate);
    // Where one decode step's time goes (default kernels, no graph, event per launch).
    be.set_decode_matvec(default_kind, default_bps);
    be.set_use_graphs(true);
    let prof = if gpu.is_emulated() {
        Vec::new()
    } else {
        be.profile_decode_step(short)?
    };
    let total_ms: f64 = prof.iter().map(|p| p.ms).sum();
    let mut groups: Vec<(String, usize, f64, usize)> = Vec::new();
    for p in &prof {
        let key = if p.label.is_empty() {
            p.kernel.clone()
        } else {
            format!("{} {}", p.kernel, p.label)
        };
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                g.1 += 1;
                g.2 += p.ms;
                g.3 += p.bytes;
            }
            None => groups.push((key, 1, p.ms, p.bytes)),
        }
    }
    groups.sort_by(|a, b| b.2.total_cmp(&a.2));
    out.line(&format!(
        "\n{name} {ty}: {:.0}M params, {:.1} MB/token, floor {:.3} ms, loaded in {load_s:.1} s; prefill {prefill:.0} tok/s",
        cfg.n_params() as f64 / 1e6,
        wb / 1e6,
        floor * 1e3
    ));
    for v in &variants {
        out.line(&format!(
            "  decode {:<5} blocks/SM {:>2} {:<8} {:>9.1} tok/s  {:>6.3} ms/token  {:>4.0}% of floor",
            v["matvec"].as_str().unwrap_or(""),
            v["blocks_per_sm"].as_u64().unwrap_or(0),
            if v["graphs"] == true { "graph" } else { "no graph" },
            v["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            1e3 / v["decode_tokens_per_s"].as_f64().unwrap_or(1e-9).max(1e-9),
            100.0 * v["bandwidth_share"].as_f64().unwrap_or(0.0),
        ));
    }
    out.line(&format!(
        "  one decode step without graph, per kernel (event-timed, {} launches, {:.3} ms):",
        prof.len(),
        total_ms
    ));
    let mut prof_json = Vec::new();
    for (key, count, ms, bytes) in &groups {
        let gbs = if *bytes > 0 {
            *bytes as f64 / (ms * 1e-3) / 1e9
        } else {
            0.0
        };
        if prof_json.len() < 12 {
            out.line(&format!(
                "    {:<40} x{:<3} {:>8.1} us {:>5.1}%{}",
                key,
                count,
                ms * 1e3,
                100.0 * ms / total_ms.max(1e-12),
                if *bytes > 0 {
                    format!("  {:>6.0} GB/s", gbs)
                } else {
                    String::new()
                }
            ));
        }
        prof_json.push(json!({"kernel": key, "launches": count, "ms": ms, "bytes": bytes}));
    }
    Ok(json!({
        "model": name, "type": ty.name(), "params": be.config().n_params(),
        "weight_bytes_per_token": wb,
        "load_s": load_s,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s_graph": default_rate,
        "decode_tokens_per_s_float_graph": float_rate,
        "decode_tokens_per_s_no_graph": nograph_rate,
        "decode_tokens_per_s_best": best_rate,
        "bandwidth_floor_ms_per_token": floor * 1e3,
        "bandwidth_share_graph": floor * default_rate,
        "bandwidth_share_float": floor * float_rate,
        "bandwidth_share_no_graph": floor * nograph_rate,
        "bandwidth_share_best": floor * best_rate,
        "variants": variants,
        "profile_step_ms": total_ms,
        "profile": prof_json,
    }))
}

/// Batched decode on the continuous-batching model: for each concurrency, that many sequences
/// (distinct 16-token prompts, each in its own blocks of the paged pool) are prefilled in one
/// step, then decoded together for `steps` steps with the greedy pick on the device (one
/// device-to-host copy of the token ids per step, as the scheduler needs them). Compared with
/// the batch-1 device loop (`generate_greedy_on_device`, CUDA graph) on the same model.
fn bench_batched(gpu: &Gpu, name: &str, ty: GgmlType, bytes: &[u8], plan: &Plan) -> Result<Value> {
    let emu = gpu.is_emulated();
    let counts: &[usize] = if emu { &[1, 2] } else { &[1, 8, 32, 64] };
    let steps: usize = if emu { 2 } else { 64 };
    let prompt_len: usize = if emu { 4 } else { 16 };
    let block_size: usize = 16;
    let ctx = (prompt_len + steps + 1).next_multiple_of(block_size);
    let g = parse(bytes)?;
    let w = LlamaWeights::from_gguf(&g).context("weights")?;
    let mut be = CudaBackend::load_on(
        gpu.clone(),
        &w,
        &CudaOptions {
            ordinal: gpu.info.ordinal,
            max_context: Some(ctx),
            max_batch: plan.prefill.min(ctx),
            use_graphs: true,
            ..Default::default()
        },
    )
    .context("loading on the GPU")?;
    let vocab = be.config().vocab as u32;
    let prompt_of = |seq: usize| -> Vec<u32> {
        (0..prompt_len as u32)
            .map(|i| (i * 7919 + 13 + seq as u32 * 104_729) % vocab)
            .collect()
    };
    let loop_rate = decode_rate(&mut be, &prompt_of(0), steps)?;
    let slots = counts.iter().copied().max().unwrap_or(1);
    let per_seq = ctx / block_size;
    let mut m = CudaBatchModel::new(
        be,
        &CudaBatchOptions {
            slots,
            block_size,
            kv_blocks: slots * per_seq,
            max_context: Some(ctx),
            max_step_tokens: slots * prompt_len,
        },
    )
    .context("batched model")?;
    let served_kind = m.matmul_kind();
    let tables: Vec<Vec<u32>> = (0..slots)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let mut out = Vec::new();
    // Quantized weights: the f32 matmul, the int8 matmulq without and with the fused
    // norm/SiLU quantization, and the served default (int8, fused) with temperature + top-p
    // sampling on the device instead of the argmax, side by side.
    // (label, products, fused, sampled, graphs)
    let variants: &[(&str, DecodeMatvec, bool, bool, bool)] =
        if matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
            &[
                ("f32", DecodeMatvec::Float, true, false, true),
                ("int8-u", DecodeMatvec::Int8, false, false, true),
                ("int8", DecodeMatvec::Int8, true, false, true),
                ("int8+s-g", DecodeMatvec::Int8, true, true, false),
                ("int8+s", DecodeMatvec::Int8, true, true, true),
            ]
        } else {
            &[
                ("f32", DecodeMatvec::Float, true, false, true),
                ("f32+s-g", DecodeMatvec::Float, true, true, false),
                ("f32+s", DecodeMatvec::Float, true, true, true),
            ]
        };
    for (&(label, kind, fused, sampled, graphs), &b) in variants
        .iter()
        .flat_map(|k| counts.iter().map(move |b| (k, b)))
    {
        m.set_matmul(kind);
        m.set_fused(fused);
        m.set_decode_graphs(if graphs {
            DecodeGraphs::Graphs
        } else {
            DecodeGraphs::Off
        });
        let picks: Vec<Option<SimpleSample>> = (0..b)
            .map(|s| {
                Some(if sampled {
                    SimpleSample::Nucleus {
                        temperature: 0.8,
                        top_p: 0.95,
                        u: ((s * 37 + 11) % 100) as f32 / 100.0,
                    }
                } else {
                    SimpleSample::Greedy
                })
            })
            .collect();
        let step = |m: &mut CudaBatchModel, work: &[SeqWork<'_>]| -> Result<Vec<u32>> {
            Ok(m.step_sampled(work, &picks)?
                .into_iter()
                .map(|p| match p {
                    Some(RowOutput::Token(t)) => t,
                    _ => 0,
                })
                .collect())
        };
        let prompts: Vec<Vec<u32>> = (0..b).map(prompt_of).collect();
        let work: Vec<SeqWork<'_>> = (0..b)
            .map(|s| SeqWork {
                slot: s,
                tokens: &prompts[s],
                start_pos: 0,
                blocks: &tables[s],
                want_logits: true,
            })
            .collect();
        let t = Instant::now();
        let mut last: Vec<u32> = step(&mut m, &work)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let mut times = Vec::with_capacity(steps);
        for i in 0..steps {
            let toks = last.clone();
            let work: Vec<SeqWork<'_>> = (0..b)
                .map(|s| SeqWork {
                    slot: s,
                    tokens: std::slice::from_ref(&toks[s]),
                    start_pos: prompt_len + i,
                    blocks: &tables[s],
                    want_logits: true,
                })
                .collect();
            let t = Instant::now();
            last = step(&mut m, &work)?;
            times.push(t.elapsed().as_secs_f64());
        }
        // The first decode step warms up (kernel first use); report the rest.
        let warm = if times.len() > 1 {
            &times[1..]
        } else {
            &times[..]
        };
        let total: f64 = warm.iter().sum();
        let mut sorted = warm.to_vec();
        sorted.sort_by(f64::total_cmp);
        let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
        out.push(json!({
            "matmul": label,
            "decode_graphs": format!("{:?}", m.decode_graphs()),
            "graph_error": m.graph_error(),
            "sequences": b,
            "prefill_tokens": b * prompt_len,
            "prefill_s": prefill_s,
            "decode_steps": warm.len(),
            "aggregate_tokens_per_s": (b * warm.len()) as f64 / total.max(1e-12),
            "itl_ms_mean": 1e3 * total / warm.len().max(1) as f64,
            "itl_ms_p90": 1e3 * p90,
            "itl_ms_max": 1e3 * sorted.last().copied().unwrap_or(0.0),
        }));
    }
    // The served path: the scheduler over the same model with the served defaults (what the
    // HTTP server drives, minus HTTP): per-request continuation, detokenized pieces, events.
    let kv_pool_bytes = m.kv_bytes();
    m.set_matmul(served_kind);
    m.set_fused(true);
    m.set_decode_graphs(DecodeGraphs::Graphs);
    let (_, tok) = inference::engine::weights_and_tokenizer(&g).context("tokenizer")?;
    let cfg = SchedulerConfig {
        block_size,
        kv_blocks: slots * per_seq,
        max_queued: slots,
        ..SchedulerConfig::default()
    };
    // Prefix cache off: a later row's streams repeat an earlier row's prompts, and every row
    // should compute its prompts (TTFT) as a first request does.
    let mut sched = Scheduler::new(m, std::sync::Arc::new(tok), cfg).with_prefix_cache(false);
    let mut served = Vec::new();
    for &b in counts {
        let r = run_concurrency_on(&mut sched, b, prompt_len, steps)
            .with_context(|| format!("served path, {b} streams"))?;
        served.push(serde_json::to_value(&r)?);
    }
    Ok(json!({
        "model": name, "type": ty.name(),
        "loop_tokens_per_s": loop_rate,
        "kv_pool_bytes": kv_pool_bytes,
        "batches": out,
        "served": served,
        "served_graph_error": sched.model().graph_error(),
    }))
}

fn bench_cpu(_cfg: &LlamaConfig, bytes: &[u8]) -> Result<(f64, f64, usize)> {
    let g = parse(bytes)?;
    let w = LlamaWeights::from_gguf(&g).context("weights")?;
    let mut cpu = CpuBackend::new(
        &w,
        &CpuOptions {
            max_context: 256,
            ..Default::default()
        },
    )?;
    let threads = cpu.threads();
    let vocab = w.config.vocab as u32;
    let prompt: Vec<u32> = (0..64u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let t = Instant::now();
    let mut logits = cpu.forward(&prompt, 0)?;
    let prefill = 64.0 / t.elapsed().as_secs_f64();
    let n = 16;
    let t = Instant::now();
    for i in 0..n {
        let next = inference::cuda::checks::argmax_ref(&logits) as u32;
        logits = cpu.forward(&[next], 64 + i)?;
    }
    let decode = n as f64 / t.elapsed().as_secs_f64();
    Ok((prefill, decode, threads))
}
