//! Fuzz body for the config parser: any text gives a config or an error that names a
//! key, never a panic.

use crate::config::Config;

/// Parses `data` (lossily as UTF-8) as a config file.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = Config::parse(&text, "fuzz") {
        assert_eq!(cfg.nodes.len(), 2, "a valid config has exactly two nodes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn random_and_mutated_configs_never_panic() {
        let valid = Config::demo_text(std::path::Path::new("/tmp/x"), "64MiB", "C").into_bytes();
        run(&valid);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x636f6e66);
        for i in 0..5_000 {
            let mut text = if i % 4 == 0 {
                (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect()
            } else {
                valid.clone()
            };
            for _ in 0..rng.gen_range(1..6) {
                if !text.is_empty() {
                    let at = rng.gen_range(0..text.len());
                    text[at] = match rng.gen_range(0..4) {
                        0 => rng.gen(),
                        1 => b'"',
                        2 => b'9',
                        _ => b'\n',
                    };
                }
            }
            run(&text);
        }
    }
}
