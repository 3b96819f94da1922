//! Deterministic test data: a seeded generator (splitmix64) and the bytes it makes. Pure code, no
//! randomness: the same seed gives the same bytes everywhere, so the tests of every crate, the fixtures and
//! the benchmarks share one generator. Built for tests, and with the `testdata` feature.

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }

    /// A float in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// An approximately normal float (sum of uniforms), mean 0, standard deviation 1.
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..12).map(|_| self.unit()).sum();
        s - 6.0
    }
}

/// `len` deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One edit of [`mutate`]: a position (taken modulo the length), a byte, and what to do there (0: flip
/// the bits of `byte | 1`, 1: insert `byte`, else: cut the bytes off).
pub type Edit = (u32, u8, u8);

/// Damages `bytes` by `edits`. Property tests start from valid encodings and mutate them, so that the
/// parsers are exercised past their first checks (random bytes rarely pass a magic or a tag).
pub fn mutate(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for &(at, byte, op) in edits {
        let at = at as usize % (bytes.len() + 1);
        match op {
            0 if at < bytes.len() => bytes[at] ^= byte | 1,
            0 => {}
            1 => bytes.insert(at, byte),
            _ => bytes.truncate(at),
        }
    }
}
