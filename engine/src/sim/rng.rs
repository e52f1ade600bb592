//! SplitMix64: a tiny, fully specified PRNG, so a seed replays the same run on every
//! platform and every version of the `rand` crate.

/// The simulator's random source.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
}

/// One SplitMix64 output step for `x` (also used as a hash for data patterns).
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// A scenario's own stream for `seed` (`tag` names the scenario, so that adding one
    /// leaves every other stream as it was) and whether the scenario happens on this
    /// seed (with probability `ppm` per million, the stream's first draw).
    pub(crate) fn scenario(seed: u64, tag: u64, ppm: u64) -> (Rng, bool) {
        let mut rng = Rng::new(mix(seed ^ tag));
        let happens = rng.chance(ppm);
        (rng, happens)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state.wrapping_sub(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform index in `0..n` (0 when `n == 0`).
    #[cfg(test)]
    pub(crate) fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }

    /// One random byte.
    #[cfg(test)]
    pub(crate) fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// True with probability `ppm` per million.
    pub(crate) fn chance(&mut self, ppm: u64) -> bool {
        self.below(1_000_000) < ppm
    }
}
