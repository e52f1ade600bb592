//! Fuzz body for the management request parser: any bytes give a request or an error
//! message, never a panic; a parsed request re-parses from its canonical form.

use crate::mgmt::parse_request;

/// Parses `data` as one request line.
pub fn run(data: &[u8]) {
    if let Ok(req) = parse_request(data) {
        let canonical = req.canonical().to_string();
        assert_eq!(parse_request(canonical.as_bytes()), Ok(req));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn random_and_mutated_lines_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d676d74);
        let seeds: [&[u8]; 5] = [
            br#"{"cmd":"status"}"#,
            br#"{"cmd":"primary","force":true}"#,
            b"[]",
            br#"{"cmd":1}"#,
            br#"{"cmd":"connect","discard-my-data":false}"#,
        ];
        for i in 0..20_000 {
            let mut line: Vec<u8> = if i % 2 == 0 {
                (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect()
            } else {
                seeds[i % seeds.len()].to_vec()
            };
            for _ in 0..rng.gen_range(0..4) {
                if !line.is_empty() {
                    let at = rng.gen_range(0..line.len());
                    line[at] = rng.gen();
                }
            }
            run(&line);
        }
    }
}
