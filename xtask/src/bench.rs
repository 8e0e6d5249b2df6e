//! `cargo xtask bench inference`: inference benchmarks (placeholder; owned by the inference work).

/// Run the inference benchmark with the remaining command-line arguments.
pub fn inference(args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!(
        "not implemented yet: `cargo xtask bench inference {}` (xtask/src/bench.rs)",
        args.join(" ")
    )
}
