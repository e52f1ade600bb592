//! `e2e`: one command that measures tandem side by side with its limits and nbdkit, prints
//! the markdown table and writes it with JSON and an SVG chart under `bench/results/`.
//!
//! `cargo run --release -p tandem-bench --bin e2e -- [--quick] [--size 1GiB] [--runtime 15]`

use clap::Parser;

fn main() -> std::process::ExitCode {
    let opts = tandem_bench::e2e::Opts::parse();
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
