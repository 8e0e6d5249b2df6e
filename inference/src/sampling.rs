//! Token sampling: a pure module (no I/O, no backend), deterministic for a given seed.
//!
//! One step turns the backend's raw logits for the next position into a token id, in this order
//! (the same order as llama.cpp's default chain, restricted to these steps):
//!
//! 1. **logit_bias**: `logit[id] += bias` for every given id.
//! 2. **penalties**, over the [`Sampler`]'s history:
//!    - `repetition_penalty` r (HF / llama.cpp semantics) over every distinct token of the
//!      prompt *and* the tokens generated so far (the whole sequence, which the context window
//!      bounds): a positive logit is divided by r, a negative one multiplied by r;
//!    - then `frequency_penalty` f and `presence_penalty` p (OpenAI's formula) over the
//!      *generated* tokens only: `logit[j] -= c[j] * f + (c[j] > 0) * p`, c = times sampled.
//! 3. **temperature** T: `logit / T`; T = 0 is greedy: the argmax after steps 1-2 (steps 4-6
//!    cannot change the most likely token, so they are skipped).
//! 4. **top_k** k: keep the k largest (0 = off).
//! 5. **top_p** p: softmax over what is left, keep the smallest most-likely prefix whose mass
//!    is >= p (always at least one token; 1 = off).
//! 6. **min_p** m: keep the tokens whose probability is >= m × the largest one (0 = off).
//! 7. **sample**: draw from what is left, renormalized, with xoshiro256** seeded by the request.
//!
//! With constrained decoding ([`crate::grammar`]) a step 0 comes first: tokens outside the
//! grammar's mask get minus infinity ([`Sampler::sample_masked`]).
//!
//! Ties are broken by the lower token id everywhere, so a run is a pure function of the logits,
//! the parameters and the seed. Logprobs ([`logprobs_of`]) are computed separately, from the
//! log-softmax of the *raw* logits (before bias, penalties and temperature): they describe the
//! model, not the sampling settings (what vLLM calls `raw_logprobs`; OpenAI does not document
//! which one it returns).

use std::collections::{HashMap, HashSet};

use crate::grammar::TokenMask;

/// Largest number of alternatives a logprobs request may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep tokens with probability >= `min_p` × the top probability; 0 disables.
    pub min_p: f32,
    /// OpenAI frequency penalty (generated tokens), -2..=2; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty (generated tokens), -2..=2; 0 disables.
    pub presence_penalty: f32,
    /// HF/llama.cpp repetition penalty (prompt + generated tokens), > 0; 1 disables.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// RNG seed (same seed + same prompt = same output).
    pub seed: u64,
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Generation stops before any of these strings (not included in the output).
    pub stop: Vec<String>,
    /// `Some(k)`: report each generated token's logprob and the k most likely alternatives
    /// (k <= [`MAX_TOP_LOGPROBS`]); `None`: no logprobs.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: 0,
            max_tokens: 128,
            stop: Vec::new(),
            logprobs: None,
        }
    }
}

/// The seed of choice `index` of a request with `n` choices: choice 0 uses the request's seed
/// (so `n = 1` and the first of `n` choices agree), choice i > 0 a SplitMix64 mix of both.
pub fn derive_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        return seed;
    }
    let mut z = seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

/// Step 1: adds `bias` to the logits of its ids (ids outside `logits` are ignored; the server
/// rejects them before they get here).
pub fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
}

/// Step 2a: the repetition penalty over `context` (distinct ids of prompt + generated):
/// a positive logit is divided by `penalty`, a non-positive one multiplied by it.
pub fn apply_repetition_penalty<'a>(
    logits: &mut [f32],
    context: impl IntoIterator<Item = &'a u32>,
    penalty: f32,
) {
    if penalty == 1.0 {
        return;
    }
    for &id in context {
        if let Some(l) = logits.get_mut(id as usize) {
            if *l > 0.0 {
                *l /= penalty;
            } else {
                *l *= penalty;
            }
        }
    }
}

/// Step 2b: OpenAI's frequency and presence penalties, `counts` = (id, times generated).
pub fn apply_frequency_presence<'a>(
    logits: &mut [f32],
    counts: impl IntoIterator<Item = (&'a u32, &'a u32)>,
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    for (&id, &c) in counts {
        if let Some(l) = logits.get_mut(id as usize)
            && c > 0
        {
            *l -= c as f32 * frequency + presence;
        }
    }
}

/// Step 3: divides every logit by `temperature` (> 0).
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    let inv = 1.0 / temperature;
    for l in logits {
        *l *= inv;
    }
}

/// Orders candidates most likely first, lower id first on ties.
fn by_value_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Step 4: keeps the `k` largest `(logit, id)` candidates, sorted most likely first
/// (`k` = 0 or >= the count: all of them, unsorted).
pub fn apply_top_k(cands: &mut Vec<(f32, u32)>, k: usize) {
    if k == 0 || k >= cands.len() {
        return;
    }
    cands.select_nth_unstable_by(k - 1, by_value_desc);
    cands.truncate(k);
    cands.sort_unstable_by(by_value_desc);
}

/// Turns `(logit, id)` candidates into `(probability, id)` in place (softmax over them).
pub fn softmax_candidates(cands: &mut [(f32, u32)]) {
    let max = cands.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for c in cands.iter_mut() {
        c.0 = (c.0 - max).exp();
        sum += f64::from(c.0);
    }
    if sum > 0.0 {
        let inv = (1.0 / sum) as f32;
        for c in cands.iter_mut() {
            c.0 *= inv;
        }
    }
}

/// Step 5: keeps the smallest most-likely prefix of `(probability, id)` candidates whose mass
/// is >= `p` (at least one; `p` >= 1: all). Leaves them sorted most likely first.
pub fn apply_top_p(probs: &mut Vec<(f32, u32)>, p: f32) {
    if p >= 1.0 || probs.is_empty() {
        return;
    }
    probs.sort_unstable_by(by_value_desc);
    let total: f32 = probs.iter().map(|c| c.0).sum();
    let target = p * total;
    let mut acc = 0.0f32;
    let mut keep = probs.len();
    for (i, c) in probs.iter().enumerate() {
        acc += c.0;
        if acc >= target {
            keep = i + 1;
            break;
        }
    }
    probs.truncate(keep);
}

/// Step 6: keeps the `(probability, id)` candidates whose probability is >= `m` × the largest.
pub fn apply_min_p(probs: &mut Vec<(f32, u32)>, m: f32) {
    if m <= 0.0 {
        return;
    }
    let max = probs.iter().map(|c| c.0).fold(0.0f32, f32::max);
    let threshold = m * max;
    probs.retain(|c| c.0 >= threshold);
}

/// Step 7: the candidate where the cumulative (renormalized) probability first exceeds
/// `u` ∈ [0, 1).
pub fn pick(probs: &[(f32, u32)], u: f32) -> u32 {
    let total: f32 = probs.iter().map(|c| c.0).sum();
    let r = u * total;
    let mut acc = 0.0;
    for &(p, id) in probs {
        acc += p;
        if r < acc {
            return id;
        }
    }
    probs.last().map_or(0, |&(_, id)| id)
}

/// One sampling step that a model can take by itself (on the device, next to the logits): the
/// steps of the module docs that remain when a request sets no bias, no penalties, no `top_k`
/// and no `min_p` — greedy, or temperature then top-p then the draw — with the uniform number
/// of step 7 already drawn from the request's own RNG stream ([`Sampler::next_simple`]).
/// [`SimpleSample::pick`] is the host's answer, bit for bit what [`Sampler::sample`] returns;
/// a device implementation (`cuda::batch`'s `sample_rows`) computes the same sets with its own
/// float rounding, so it can differ only where the draw lands within rounding of a boundary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimpleSample {
    /// The argmax (lower id first on ties).
    Greedy,
    /// Softmax at `temperature` (> 0), the smallest most-likely prefix of mass >= `top_p`
    /// (`top_p` >= 1: every token, in id order), then the token where the running mass first
    /// exceeds `u` × the kept mass.
    Nucleus {
        /// Temperature, > 0 and finite.
        temperature: f32,
        /// Nucleus mass; >= 1 keeps every token (walked in id order, as the host does).
        top_p: f32,
        /// The uniform draw in [0, 1).
        u: f32,
    },
}

impl SimpleSample {
    /// The token the host sampler picks from raw `logits` with this step.
    pub fn pick(&self, logits: &[f32]) -> u32 {
        match *self {
            SimpleSample::Greedy => argmax(logits),
            SimpleSample::Nucleus {
                temperature,
                top_p,
                u,
            } => {
                let mut work = logits.to_vec();
                let mut cands = Vec::new();
                nucleus_pick(&mut work, &mut cands, temperature, 0, top_p, 0.0, u)
            }
        }
    }
}

/// Steps 3-7 on `work` (logits after steps 1-2) with temperature `t` > 0.
fn nucleus_pick(
    work: &mut [f32],
    cands: &mut Vec<(f32, u32)>,
    t: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    u: f32,
) -> u32 {
    apply_temperature(work, t);
    cands.clear();
    // Masked-out (minus infinity) tokens are never candidates.
    cands.extend(
        work.iter()
            .enumerate()
            .filter(|(_, l)| **l != f32::NEG_INFINITY)
            .map(|(i, &l)| (l, i as u32)),
    );
    apply_top_k(cands, top_k);
    softmax_candidates(cands);
    apply_top_p(cands, top_p);
    apply_min_p(cands, min_p);
    pick(cands, u)
}

/// A generated token's logprob and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token id.
    pub id: u32,
    /// Its log-probability under the raw logits.
    pub logprob: f32,
    /// The `k` most likely `(id, logprob)`, most likely first (lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

/// `ln Σ exp(logits)`, computed stably in f64.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::from(max);
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    max + sum.ln()
}

/// The `k` most likely `(id, logit)` of `logits`, most likely first, lower id first on ties.
pub fn top_n(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return Vec::new();
    }
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == k && l <= best[k - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= l);
        best.insert(at, (l, i as u32));
        best.truncate(k);
    }
    best.into_iter().map(|(l, i)| (i, l)).collect()
}

/// The log-softmax logprob of `id` and the `k` most likely alternatives, from raw `logits`.
pub fn logprobs_of(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: top_n(logits, k)
            .into_iter()
            .map(|(i, l)| (i, lp(l)))
            .collect(),
    }
}

/// A stateful sampler for one sequence: parameters, the RNG, the penalty history and scratch.
#[derive(Debug, Clone)]
pub struct Sampler {
    p: SamplingParams,
    rng: Rng,
    /// Times each token was generated (frequency/presence penalties).
    generated: HashMap<u32, u32>,
    /// Distinct tokens of prompt + generated (repetition penalty).
    context: HashSet<u32>,
    work: Vec<f32>,
    cands: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler with an empty history.
    pub fn new(p: &SamplingParams) -> Self {
        Self::with_prompt(p, &[])
    }

    /// A sampler whose repetition-penalty history starts with `prompt`.
    pub fn with_prompt(p: &SamplingParams, prompt: &[u32]) -> Self {
        let context = if p.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Sampler {
            p: p.clone(),
            rng: Rng::new(p.seed),
            generated: HashMap::new(),
            context,
            work: Vec::new(),
            cands: Vec::new(),
        }
    }

    fn penalties_active(&self) -> bool {
        self.p.repetition_penalty != 1.0
            || self.p.frequency_penalty != 0.0
            || self.p.presence_penalty != 0.0
    }

    /// Picks the next token from raw logits (steps 1-7 of the module docs) and records it in
    /// the penalty history.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_masked(logits, None)
    }

    /// [`Sampler::sample`] among the tokens of `mask` only (constrained decoding): step 0,
    /// before the others, sets every other token's logit to minus infinity, so no bias or
    /// penalty can bring one back. An empty mask is ignored.
    pub fn sample_masked(&mut self, logits: &[f32], mask: Option<&TokenMask>) -> u32 {
        let id = match mask {
            Some(m) if m.count() > 0 => self.choose_masked(logits, m),
            _ => self.choose(logits),
        };
        self.accept(id);
        id
    }

    fn choose_masked(&mut self, logits: &[f32], mask: &TokenMask) -> u32 {
        let t = self.p.temperature;
        let greedy = t <= 0.0 || !t.is_finite();
        if greedy && self.p.logit_bias.is_empty() && !self.penalties_active() {
            // Argmax over the allowed tokens only (lower id first on ties): no copy.
            let mut best: Option<(f32, u32)> = None;
            for id in mask.iter() {
                let Some(&l) = logits.get(id as usize) else {
                    break;
                };
                if best.is_none_or(|(b, _)| l > b) {
                    best = Some((l, id));
                }
            }
            return best.map_or(0, |(_, id)| id);
        }
        self.work.clear();
        self.work.extend_from_slice(logits);
        mask.apply(&mut self.work);
        self.choose_work()
    }

    /// Records `id` as generated (done by [`Sampler::sample`]; for tokens chosen elsewhere).
    pub fn accept(&mut self, id: u32) {
        if self.p.frequency_penalty != 0.0 || self.p.presence_penalty != 0.0 {
            *self.generated.entry(id).or_insert(0) += 1;
        }
        if self.p.repetition_penalty != 1.0 {
            self.context.insert(id);
        }
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let t = self.p.temperature;
        let greedy = t <= 0.0 || !t.is_finite();
        if greedy && self.p.logit_bias.is_empty() && !self.penalties_active() {
            return argmax(logits); // nothing to change: no copy
        }
        self.work.clear();
        self.work.extend_from_slice(logits);
        self.choose_work()
    }

    /// Steps 1-7 on the logits in `self.work`.
    fn choose_work(&mut self) -> u32 {
        let t = self.p.temperature;
        let greedy = t <= 0.0 || !t.is_finite();
        apply_logit_bias(&mut self.work, &self.p.logit_bias);
        if self.penalties_active() {
            apply_repetition_penalty(&mut self.work, &self.context, self.p.repetition_penalty);
            apply_frequency_presence(
                &mut self.work,
                &self.generated,
                self.p.frequency_penalty,
                self.p.presence_penalty,
            );
        }
        if greedy {
            return argmax(&self.work);
        }
        let u = self.rng.next_f32();
        nucleus_pick(
            &mut self.work,
            &mut self.cands,
            t,
            self.p.top_k,
            self.p.top_p,
            self.p.min_p,
            u,
        )
    }

    /// Whether every step of this sampler is a [`SimpleSample`] (no bias, no penalties, no
    /// `top_k`, no `min_p`), so a model may sample for it.
    pub fn is_simple(&self) -> bool {
        self.p.logit_bias.is_empty()
            && !self.penalties_active()
            && self.p.top_k == 0
            && self.p.min_p <= 0.0
    }

    /// The next step as a [`SimpleSample`] when [`Sampler::is_simple`], drawing its uniform
    /// number from this sampler's RNG now (exactly the draw [`Sampler::sample`] would make),
    /// so `next_simple().pick(logits)` then [`Sampler::accept`] is the same as `sample(logits)`.
    /// `None` (nothing drawn) when the step needs the host.
    pub fn next_simple(&mut self) -> Option<SimpleSample> {
        if !self.is_simple() {
            return None;
        }
        let t = self.p.temperature;
        if t <= 0.0 || !t.is_finite() {
            return Some(SimpleSample::Greedy);
        }
        Some(SimpleSample::Nucleus {
            temperature: t,
            top_p: self.p.top_p,
            u: self.rng.next_f32(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn simple_steps_equal_the_sampler() {
        let mut rng = Rng::new(7);
        for (t, top_p) in [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (1.3, 0.5), (0.2, 0.05)] {
            let p = SamplingParams {
                temperature: t,
                top_p,
                seed: 99,
                ..Default::default()
            };
            let mut a = Sampler::new(&p);
            let mut b = Sampler::new(&p);
            assert!(b.is_simple());
            for step in 0..200 {
                // A few exact ties and a minus infinity among random logits.
                let mut logits: Vec<f32> = (0..64).map(|_| rng.next_f32() * 8.0 - 4.0).collect();
                logits[3] = logits[9];
                logits[11] = f32::NEG_INFINITY;
                let want = a.sample(&logits);
                let s = b.next_simple().unwrap();
                let got = s.pick(&logits);
                b.accept(got);
                assert_eq!(got, want, "t {t} top_p {top_p} step {step} {s:?}");
            }
        }
        for p in [
            SamplingParams {
                top_k: 5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.1,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(1, 2.0)],
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(&p);
            assert!(!s.is_simple());
            assert_eq!(s.next_simple(), None);
        }
    }

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
        let got: HashSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
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

    #[test]
    fn step_logit_bias() {
        let mut l = [1.0, 2.0, 3.0];
        apply_logit_bias(&mut l, &[(0, 5.0), (2, -100.0), (7, 1.0)]);
        assert_eq!(l, [6.0, 2.0, -97.0]);
    }

    #[test]
    fn step_repetition_penalty() {
        // Positive logits are divided, negative (and zero) multiplied; others untouched.
        let mut l = [2.0, -2.0, 1.0, 0.0];
        apply_repetition_penalty(&mut l, &[0, 1, 3], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0, 0.0]);
        let mut l = [2.0, -2.0];
        apply_repetition_penalty(&mut l, &[0, 1], 0.5);
        assert_eq!(l, [4.0, -1.0]);
    }

    #[test]
    fn step_frequency_presence() {
        // logit[j] -= c[j] * f + (c[j] > 0) * p
        let mut l = [1.0, 1.0, 1.0];
        let counts: HashMap<u32, u32> = [(0, 2), (1, 1)].into_iter().collect();
        apply_frequency_presence(&mut l, &counts, 0.5, 1.0);
        assert_eq!(l, [-1.0, -0.5, 1.0]);
        let mut l = [1.0, 1.0];
        apply_frequency_presence(&mut l, &counts, -1.0, -0.25);
        assert_eq!(l, [3.25, 2.25]);
    }

    #[test]
    fn step_temperature() {
        let mut l = [1.0, 2.0, -4.0];
        apply_temperature(&mut l, 2.0);
        assert_eq!(l, [0.5, 1.0, -2.0]);
    }

    #[test]
    fn step_top_k() {
        let mut c = vec![(1.0, 0), (3.0, 1), (2.0, 2), (3.0, 3)];
        apply_top_k(&mut c, 3);
        assert_eq!(c, vec![(3.0, 1), (3.0, 3), (2.0, 2)]);
        let mut c = vec![(1.0, 0), (3.0, 1)];
        apply_top_k(&mut c, 0);
        assert_eq!(c.len(), 2);
        apply_top_k(&mut c, 5);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn step_softmax() {
        // exp(0) : exp(ln 3) = 1 : 3
        let mut c = vec![(0.0, 0), (3.0f32.ln(), 1)];
        softmax_candidates(&mut c);
        assert!(close(c[0].0, 0.25) && close(c[1].0, 0.75), "{c:?}");
    }

    #[test]
    fn step_top_p() {
        let probs = vec![(0.2, 2), (0.5, 0), (0.3, 1)];
        let mut c = probs.clone();
        apply_top_p(&mut c, 0.75);
        assert_eq!(c, vec![(0.5, 0), (0.3, 1)]);
        let mut c = probs.clone();
        apply_top_p(&mut c, 0.4);
        assert_eq!(c, vec![(0.5, 0)]);
        let mut c = probs.clone();
        apply_top_p(&mut c, 0.9);
        assert_eq!(c.len(), 3);
        let mut c = probs;
        apply_top_p(&mut c, 1.0);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn step_min_p() {
        let mut c = vec![(0.5, 0), (0.3, 1), (0.2, 2)];
        apply_min_p(&mut c, 0.5); // threshold 0.25
        assert_eq!(c, vec![(0.5, 0), (0.3, 1)]);
        let mut c = vec![(0.5, 0), (0.3, 1), (0.2, 2)];
        apply_min_p(&mut c, 0.0);
        assert_eq!(c.len(), 3);
        apply_min_p(&mut c, 1.0);
        assert_eq!(c, vec![(0.5, 0)]);
    }

    #[test]
    fn step_pick() {
        // Unnormalized on purpose: pick renormalizes (total 2.0).
        let c = [(0.5, 7), (1.5, 9)];
        assert_eq!(pick(&c, 0.0), 7);
        assert_eq!(pick(&c, 0.2), 7); // 0.4 < 0.5
        assert_eq!(pick(&c, 0.3), 9); // 0.6 >= 0.5
        assert_eq!(pick(&c, 0.999), 9);
        assert_eq!(pick(&[], 0.5), 0);
    }

    #[test]
    fn order_bias_before_penalty_before_temperature() {
        // bias makes token 0 positive (1 + 3 = 4), the repetition penalty halves it (2), then
        // greedy compares 2 with token 1's 2.5: token 1. With the penalty first, token 0 would
        // be 1 / 2 + 3 = 3.5 and win.
        let p = SamplingParams {
            logit_bias: vec![(0, 3.0)],
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::with_prompt(&p, &[0]);
        assert_eq!(s.sample(&[1.0, 2.5]), 1);
    }

    #[test]
    fn greedy_with_penalties_is_deterministic_and_moves_on() {
        // Frequency penalty 1: after token 0 is generated twice it drops below token 1.
        let logits = [3.0, 1.5, 0.0];
        let p = SamplingParams {
            frequency_penalty: 1.0,
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(&p);
            (0..4).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        // 3.0 > 1.5; 2.0 > 1.5; 1.0 < 1.5 → 1; then 1.0 vs 0.5 → 0.
        assert_eq!(run(), vec![0, 0, 1, 0]);
        assert_eq!(run(), run());
        // Presence penalty 2 applies once per distinct token.
        let mut s = Sampler::new(&SamplingParams {
            presence_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(
            (0..3).map(|_| s.sample(&logits)).collect::<Vec<_>>(),
            vec![0, 1, 0]
        );
        // Repetition penalty counts the prompt: token 0 in the prompt → 3 / 4 < 1.5.
        let mut s = Sampler::with_prompt(
            &SamplingParams {
                repetition_penalty: 4.0,
                ..Default::default()
            },
            &[0],
        );
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn top_k_and_min_p_restrict_sampling() {
        let logits = [2.0, 1.9, 1.8, 1.7];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 5,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        let got: HashSet<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert_eq!(got, [0, 1].into_iter().collect());
        // min_p 0.9: p(1)/p(0) = e^-0.1 ≈ 0.905 kept, e^-0.2 ≈ 0.82 dropped.
        let mut s = Sampler::new(&SamplingParams {
            top_k: 0,
            min_p: 0.9,
            ..p
        });
        let got: HashSet<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert_eq!(got, [0, 1].into_iter().collect());
    }

    #[test]
    fn logit_bias_forces_and_bans() {
        let logits = [0.0, 5.0, 1.0];
        let mut s = Sampler::new(&SamplingParams {
            temperature: 1.0,
            logit_bias: vec![(2, 100.0)],
            ..Default::default()
        });
        assert!((0..100).all(|_| s.sample(&logits) == 2));
        let mut s = Sampler::new(&SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 2);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_raw_logits() {
        // logits ln1, ln2, ln3, ln4 → probabilities 0.1, 0.2, 0.3, 0.4.
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        assert!((log_sum_exp(&logits) - 10.0f64.ln()).abs() < 1e-6);
        let lp = logprobs_of(&logits, 1, 3);
        assert!(close(lp.logprob, 0.2f32.ln()));
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![3, 2, 1]);
        assert!(close(lp.top[0].1, 0.4f32.ln()));
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(logprobs_of(&logits, 0, 0).top.is_empty());
        // Ties: lower id first.
        assert_eq!(top_n(&[1.0, 2.0, 2.0, 0.0], 2), vec![(1, 2.0), (2, 2.0)]);
        assert_eq!(top_n(&[1.0, 2.0], 5), vec![(1, 2.0), (0, 1.0)]);
    }

    #[test]
    fn masked_sampling_stays_in_the_mask() {
        let logits = [5.0, 4.0, 3.0, 2.0, 1.0];
        let mut mask = TokenMask::none(5);
        mask.insert(2);
        mask.insert(4);
        // Greedy: the best allowed token, not the best overall.
        let mut s = Sampler::new(&SamplingParams::default());
        assert_eq!(s.sample_masked(&logits, Some(&mask)), 2);
        // A bias cannot bring a masked token back; penalties do not either.
        let mut s = Sampler::new(&SamplingParams {
            logit_bias: vec![(0, 100.0)],
            repetition_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample_masked(&logits, Some(&mask)), 2);
        // Sampling with top_k larger than the mask: only masked tokens come out.
        let mut s = Sampler::new(&SamplingParams {
            temperature: 2.0,
            top_k: 4,
            seed: 1,
            ..Default::default()
        });
        let got: HashSet<u32> = (0..300)
            .map(|_| s.sample_masked(&logits, Some(&mask)))
            .collect();
        assert_eq!(got, [2, 4].into_iter().collect());
        // An empty mask is ignored (never happens with a grammar; no panic either way).
        let mut s = Sampler::new(&SamplingParams::default());
        assert_eq!(s.sample_masked(&logits, Some(&TokenMask::none(5))), 0);
    }

    #[test]
    fn derived_seeds() {
        assert_eq!(derive_seed(7, 0), 7);
        let s: HashSet<u64> = (0..5).map(|i| derive_seed(7, i)).collect();
        assert_eq!(s.len(), 5);
        assert_eq!(derive_seed(7, 3), derive_seed(7, 3));
        assert_ne!(derive_seed(7, 1), derive_seed(8, 1));
    }
}
