//! Token sampling: greedy, temperature, nucleus (top-p), with a seeded deterministic RNG.

/// Sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// RNG seed (same seed + same prompt = same output).
    pub seed: u64,
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Generation stops before any of these strings (not included in the output).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 128,
            stop: Vec::new(),
        }
    }
}

/// xoshiro256** seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// A sampler with preallocated scratch.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: Rng,
    probs: Vec<(f32, u32)>,
}

impl Sampler {
    /// Creates a sampler from parameters.
    pub fn new(p: &SamplingParams) -> Self {
        Sampler {
            temperature: p.temperature,
            top_p: p.top_p,
            rng: Rng::new(p.seed),
            probs: Vec::new(),
        }
    }

    /// Picks the next token from logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || !self.temperature.is_finite() || logits.is_empty() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / self.temperature;
        self.probs.clear();
        let mut sum = 0.0f32;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - max) * inv_t).exp();
            sum += p;
            self.probs.push((p, i as u32));
        }
        let mut mass = sum;
        if self.top_p < 1.0 && self.top_p > 0.0 {
            self.probs
                .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let target = self.top_p * sum;
            let mut acc = 0.0;
            let mut keep = self.probs.len();
            for (i, &(p, _)) in self.probs.iter().enumerate() {
                acc += p;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.probs.truncate(keep);
            mass = acc;
        }
        let r = self.rng.next_f32() * mass;
        let mut acc = 0.0;
        for &(p, i) in &self.probs {
            acc += p;
            if r < acc {
                return i;
            }
        }
        self.probs.last().map_or(0, |&(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_determinism() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(&SamplingParams::default());
        assert_eq!(s.sample(&logits), 1);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let a: Vec<u32> = (0..50)
            .scan(Sampler::new(&p), |s, _| Some(s.sample(&logits)))
            .collect();
        let b: Vec<u32> = (0..50)
            .scan(Sampler::new(&p), |s, _| Some(s.sample(&logits)))
            .collect();
        assert_eq!(a, b);
        assert!(
            a.contains(&1) && a.contains(&2),
            "temperature 1 samples both top tokens"
        );
        let c: Vec<u32> = (0..50)
            .scan(
                Sampler::new(&SamplingParams {
                    seed: 43,
                    ..p.clone()
                }),
                |s, _| Some(s.sample(&logits)),
            )
            .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
        let mut s = Sampler::new(&SamplingParams { top_p: 0.99, ..p });
        let got: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert_eq!(got, [0, 1].into_iter().collect());
    }

    #[test]
    fn rng_uniform_range() {
        let mut r = Rng::new(0);
        for _ in 0..1000 {
            let v = r.next_f32();
            assert!((0.0..1.0).contains(&v));
        }
    }
}
