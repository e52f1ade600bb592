//! cargo-fuzz target for the DRBD 9 metadata superblock decoder and its validation; the
//! body lives in `tandem_engine::fuzz::superblock` so the stable test suite runs the same
//! code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_engine::fuzz::superblock::run(data);
});
