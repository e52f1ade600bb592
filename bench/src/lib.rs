//! tandem-bench: the end-to-end comparison runner (issue 3) and, in `benches/`, criterion
//! micro-benchmarks of the hot pure code.
//!
//! - [`e2e`]: runs fio against the backing file, nbdkit and tandem (disconnected, protocol
//!   C, protocol A) in one run, with the loopback TCP limits beside them, then the
//!   activity log's cost and resync (full and crash resync times, IO during a resync).
//! - [`fio`]: the job command lines and the parser of fio's JSON.
//! - [`report`]: the result as a markdown table, JSON and an SVG chart, with the
//!   docs/design.md §11 ratios marked met or not met.

pub mod e2e;
pub mod fio;
pub mod report;
