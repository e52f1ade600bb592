//! cargo-fuzz target for the activity log's on-disk format (transaction blocks and the
//! apply-al replay); the body lives in `tandem_engine::fuzz::al` so the stable test suite
//! runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_engine::fuzz::al::run(data);
});
