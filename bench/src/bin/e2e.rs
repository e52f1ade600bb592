//! `e2e`: one command that measures tandem side by side with its limits and nbdkit, prints
//! the markdown table and writes it with JSON and an SVG chart under `bench/results/`.
//!
//! `cargo run --release -p tandem-bench --bin e2e -- [--quick] [--size 1GiB] [--runtime 15]`

use clap::Parser;

fn main() -> std::process::ExitCode {
    let opts = tandem_bench::e2e::Opts::parse();
    if let Some(json) = &opts.render {
        return match render(json) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("e2e: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let report = match tandem_bench::e2e::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("e2e: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("{}", report.to_markdown());
    match tandem_bench::e2e::write(&report, &opts.out_dir) {
        Ok(md) => {
            eprintln!("e2e: wrote {} (+ .json, .svg)", md.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("e2e: writing results: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Rewrites FILE.md and FILE.svg from FILE.json.
fn render(json: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = std::fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
    let report: tandem_bench::report::Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a results file", json.display()))?;
    std::fs::write(json.with_extension("md"), report.to_markdown())?;
    std::fs::write(json.with_extension("svg"), report.to_svg())?;
    eprintln!(
        "e2e: rendered {} (.md, .svg)",
        json.with_extension("").display()
    );
    Ok(())
}
