//! Bitmap exchange codec: see `tandem_engine::fuzz::bitmap` for the input format and oracle.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_engine::fuzz::bitmap::run(data);
});
