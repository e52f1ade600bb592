//! tandem-bench: micro-benchmarks of hot pure code and the end-to-end fio runner (issue 3).
