//! DRBD packet codec: see `tandem_engine::fuzz::packet` for the input format and oracle.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_engine::fuzz::packet::run(data);
});
