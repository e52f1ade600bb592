//! cargo-fuzz target for the NBD option and request decoders; the body lives in
//! `tandem_engine::fuzz::nbd` so the stable test suite runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_engine::fuzz::nbd::run(data);
});
