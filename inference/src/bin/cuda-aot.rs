//! `cuda-aot`: compiles the CUDA kernels ahead of time, for the image pipeline.
//!
//! Runs NVRTC (no GPU needed) over the kernel source this crate carries, once per architecture,
//! and writes `sm_<arch>.cubin` files plus the `kernels.json` index that
//! [`inference::cuda::prebuilt`] checks before the guest loads them. `cargo xtask image build`
//! runs it inside the hermetic build root with the NVRTC library from the image lock, so the
//! CUBINs are the same bytes on every build host.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Parser;
use inference::cuda::kernels::KERNEL_SOURCE;
use inference::cuda::nvrtc::{self, Image, Target};
use inference::cuda::prebuilt::{self, IndexedImage, KernelIndex};
use sha2::{Digest as _, Sha256};

/// Compile the inference CUDA kernels to CUBINs ahead of time (no GPU needed).
///
/// NVRTC is loaded from the library path (LD_LIBRARY_PATH=DIR with libnvrtc.so.12 and
/// libnvrtc-builtins in DIR). Writes `OUT/sm_<ARCH>.cubin` for every --arch and OUT/kernels.json,
/// the index the CUDA backend verifies (kernel-source SHA-256, file SHA-256) before it loads a
/// prebuilt CUBIN instead of compiling at start-up.
#[derive(Parser, Debug)]
#[command(name = "cuda-aot")]
struct Args {
    /// Architecture as major*10+minor (90 = sm_90: H100, H200); repeat for several.
    #[arg(long = "arch", required = true, value_parser = clap::value_parser!(i32).range(80..=130))]
    archs: Vec<i32>,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !nvrtc::nvrtc_present() {
        bail!("{}", nvrtc::no_nvrtc_message());
    }
    let (major, minor) = nvrtc::nvrtc_version().map_err(anyhow::Error::msg)?;
    let supported = nvrtc::supported_archs();
    let mut archs = args.archs.clone();
    archs.sort_unstable();
    archs.dedup();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut images = Vec::new();
    for arch in archs {
        if !supported.is_empty() && !supported.contains(&arch) {
            bail!(
                "NVRTC {major}.{minor} cannot compile for sm_{arch} (it knows {supported:?}): \
                 lock an NVRTC that supports it or drop the architecture from cuda.archs"
            );
        }
        let t0 = Instant::now();
        let (image, log) = nvrtc::compile(KERNEL_SOURCE, Target::Cubin(arch))
            .map_err(|e| anyhow::anyhow!("compiling the kernels for sm_{arch}: {e}"))?;
        let Image::Cubin(bytes) = image else {
            bail!("NVRTC returned PTX for sm_{arch} where a CUBIN was asked for");
        };
        let file = prebuilt::cubin_name(arch);
        std::fs::write(args.out.join(&file), &bytes)
            .with_context(|| format!("writing {}", args.out.join(&file).display()))?;
        eprintln!(
            "cuda-aot: sm_{arch}: {} bytes in {:.1} s (NVRTC {major}.{minor}){}",
            bytes.len(),
            t0.elapsed().as_secs_f64(),
            if log.trim().is_empty() {
                String::new()
            } else {
                format!("\nNVRTC log:\n{}", log.trim_end())
            }
        );
        images.push(IndexedImage {
            arch,
            file,
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        });
    }
    let options: Vec<String> = nvrtc::compile_options(Target::Cubin(0))
        .into_iter()
        .filter(|o| !o.starts_with("--gpu-architecture"))
        .collect();
    let index = KernelIndex {
        schema: prebuilt::SCHEMA,
        source_sha256: prebuilt::source_sha256(),
        nvrtc: format!("{major}.{minor}"),
        options,
        images,
    };
    let mut json = serde_json::to_vec_pretty(&index)?;
    json.push(b'\n');
    let path = args.out.join(prebuilt::INDEX_FILE);
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
