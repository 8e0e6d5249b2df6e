//! One sequence's generation, step by step: sampling (with an optional [`TokenConstraint`]),
//! stop tokens, stop strings, `max_tokens`, the context window, logprobs, and the text pieces a
//! consumer sees as they become final.
//!
//! The model side is not here: a [`Continuation`] is given the logits after each forward pass
//! and answers with the token to feed next or the reason to stop. The single-sequence
//! [`crate::engine::Engine`] and the continuous-batching [`crate::scheduler::Scheduler`] both
//! drive it, so a request produces the same tokens, text, pieces and finish reason whichever
//! path serves it.

use std::sync::Arc;

use crate::engine::{FinishReason, GeneratedToken, Generation, Piece, Timings};
use crate::error::InferenceError;
use crate::grammar::TokenConstraint;
use crate::sampling::{MAX_TOP_LOGPROBS, Sampler, SamplingParams, SimpleSample, logprobs_of};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Where the next token comes from.
enum Next<'a> {
    /// Sample it from these logits.
    Logits(&'a [f32]),
    /// A model sampled it with [`Continuation::simple_step`]'s step.
    Picked(u32),
}

/// What [`Continuation::advance`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// Feed this token (it was sampled and reported); call `advance` again with its logits.
    Feed(u32),
    /// Generation ended; call [`Continuation::finish`].
    Done(FinishReason),
}

/// The generation state of one sequence (see the module docs).
pub struct Continuation<'c> {
    tokenizer: Arc<Tokenizer>,
    params: SamplingParams,
    constraint: Option<Box<dyn TokenConstraint + 'c>>,
    sampler: Sampler,
    /// The step [`Continuation::simple_step`] drew for the next token, until it is used.
    drawn: Option<SimpleSample>,
    decoder: StreamDecoder,
    max_ctx: usize,
    prompt_tokens: usize,
    top_logprobs: Option<usize>,
    max_hold: usize,
    out_tokens: Vec<u32>,
    text: String,
    text_chars: usize,
    /// Tokens not yet reported, with the byte offset of their first byte in `text`.
    pending: Vec<(usize, GeneratedToken)>,
    reported: Vec<GeneratedToken>,
    sent: usize,
    cut_by_stop_string: bool,
}

impl std::fmt::Debug for Continuation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Continuation")
            .field("prompt_tokens", &self.prompt_tokens)
            .field("generated", &self.out_tokens.len())
            .field("constrained", &self.constraint.is_some())
            .finish()
    }
}

impl<'c> Continuation<'c> {
    /// A continuation of `prompt` (used for repetition penalties and the context count) in a
    /// sequence that can hold `max_ctx` positions.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt: &[u32],
        params: SamplingParams,
        constraint: Option<Box<dyn TokenConstraint + 'c>>,
        max_ctx: usize,
    ) -> Self {
        Continuation {
            sampler: Sampler::with_prompt(&params, prompt),
            drawn: None,
            top_logprobs: params.logprobs.map(|k| k.min(MAX_TOP_LOGPROBS)),
            max_hold: params.stop.iter().map(String::len).max().unwrap_or(0),
            tokenizer,
            params,
            constraint,
            decoder: StreamDecoder::new(),
            max_ctx,
            prompt_tokens: prompt.len(),
            out_tokens: Vec::new(),
            text: String::new(),
            text_chars: 0,
            pending: Vec::new(),
            reported: Vec::new(),
            sent: 0,
            cut_by_stop_string: false,
        }
    }

    /// The sampling parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Tokens generated so far (a final stop token included).
    pub fn generated(&self) -> &[u32] {
        &self.out_tokens
    }

    /// Whether the next [`Continuation::advance`] will end without sampling (`max_tokens` is
    /// reached); a caller may then skip the forward pass.
    fn budget_spent(&self) -> Option<FinishReason> {
        if self.out_tokens.len() < self.params.max_tokens {
            return None;
        }
        // A constrained output that is complete when the budget runs out ended properly
        // (the constraint only lets it grow when it can still be closed).
        Some(if self.constraint_complete() {
            FinishReason::Stop
        } else {
            FinishReason::Length
        })
    }

    fn constraint_complete(&self) -> bool {
        self.constraint.as_deref().is_some_and(|c| c.is_complete())
    }

    /// The decision before any token was sampled (`max_tokens` 0 ends at once).
    pub fn start(&self) -> Option<FinishReason> {
        self.budget_spent()
    }

    /// Samples the next token from `logits` (the model's output after `filled` positions of
    /// this sequence are in its cache), reports the text that became final through `on_piece`
    /// (which returns `false` when the consumer went away) and says what comes next.
    pub fn advance(
        &mut self,
        logits: &[f32],
        filled: usize,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Result<Advance, InferenceError> {
        self.advance_with(Next::Logits(logits), filled, on_piece)
    }

    /// The next token's sampling step when the model may take it itself: no constraint, no
    /// logprobs and a [`Sampler::is_simple`] sampler. Draws the step's random number now (the
    /// draw [`Continuation::advance`] would make), so the caller must follow with
    /// [`Continuation::advance_picked`] and the token the step picked. `None` (nothing drawn):
    /// the caller needs the logits and [`Continuation::advance`].
    pub fn simple_step(&mut self) -> Option<SimpleSample> {
        if self.constraint.is_some() || self.top_logprobs.is_some() {
            return None;
        }
        if self.drawn.is_none() {
            self.drawn = self.sampler.next_simple();
        }
        self.drawn
    }

    /// [`Continuation::advance`] with the token a model picked by the step of
    /// [`Continuation::simple_step`] (same reports, stops and decisions).
    pub fn advance_picked(
        &mut self,
        token: u32,
        filled: usize,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Result<Advance, InferenceError> {
        self.advance_with(Next::Picked(token), filled, on_piece)
    }

    fn advance_with(
        &mut self,
        next: Next<'_>,
        filled: usize,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Result<Advance, InferenceError> {
        if let Some(r) = self.budget_spent() {
            return Ok(Advance::Done(r));
        }
        let logits = match (next, self.drawn.take()) {
            // The step was drawn already: use it, never draw twice.
            (Next::Logits(l), Some(step)) => {
                let id = step.pick(l);
                self.sampler.accept(id);
                return self.emit(id, l, filled, on_piece);
            }
            (Next::Logits(l), None) => l,
            (Next::Picked(id), Some(_)) => {
                self.sampler.accept(id);
                return self.emit(id, &[], filled, on_piece);
            }
            (Next::Picked(_), None) => {
                return Err(InferenceError::InvalidArgument(
                    "a model-picked token came for a step that was not offered to the model (a scheduler bug)".into(),
                ));
            }
        };
        let next = match self.constraint.as_deref_mut() {
            Some(c) => {
                // Tokens that may still be generated, this one included.
                let remaining = (self.params.max_tokens - self.out_tokens.len())
                    .min((self.max_ctx + 1).saturating_sub(filled));
                let next = self
                    .sampler
                    .sample_masked(logits, Some(c.allowed(remaining)));
                c.accept(next)?;
                next
            }
            None => self.sampler.sample(logits),
        };
        self.emit(next, logits, filled, on_piece)
    }

    /// Records the sampled `next` (`logits`: its step's logits, for logprobs; empty when a
    /// model picked it) and decides what comes next.
    fn emit(
        &mut self,
        next: u32,
        logits: &[f32],
        filled: usize,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Result<Advance, InferenceError> {
        self.out_tokens.push(next);
        if self.tokenizer.is_stop(next) {
            return Ok(Advance::Done(FinishReason::Stop));
        }
        let complete = self.constraint.as_deref().is_some_and(|c| c.is_terminal());
        let token = GeneratedToken {
            id: next,
            text_offset: self.text_chars,
            logprob: self.top_logprobs.map(|k| logprobs_of(logits, next, k)),
        };
        self.pending.push((self.text.len(), token));
        let piece = self.decoder.push(&self.tokenizer, next);
        self.text_chars += piece.chars().count();
        self.text.push_str(&piece);
        // Stop strings: search the region that could contain a new match.
        let search_from = floor_char_boundary(&self.text, self.sent.saturating_sub(self.max_hold));
        if let Some(cut) = self
            .params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| i + search_from)
            })
            .min()
        {
            self.text.truncate(cut);
            self.pending.retain(|(off, _)| *off < cut);
            self.cut_by_stop_string = true;
            if !self.report(cut, true, on_piece) {
                return Ok(Advance::Done(FinishReason::Cancelled));
            }
            return Ok(Advance::Done(FinishReason::Stop));
        }
        let safe = floor_char_boundary(
            &self.text,
            self.text.len() - held_back(&self.text, &self.params.stop),
        );
        if safe > self.sent && !self.report(safe, false, on_piece) {
            return Ok(Advance::Done(FinishReason::Cancelled));
        }
        if complete {
            return Ok(Advance::Done(FinishReason::Stop));
        }
        if filled >= self.max_ctx {
            return Ok(Advance::Done(if self.constraint_complete() {
                FinishReason::Stop
            } else {
                FinishReason::Length
            }));
        }
        // The budget is spent: end now rather than after one more (wasted) forward pass.
        if let Some(r) = self.budget_spent() {
            return Ok(Advance::Done(r));
        }
        Ok(Advance::Feed(next))
    }

    /// Reports `text[sent..upto]` with the pending tokens that start before `upto` (all of
    /// them when `all`); `false` = the consumer went away.
    fn report(
        &mut self,
        upto: usize,
        all: bool,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> bool {
        let n = if all {
            self.pending.len()
        } else {
            self.pending
                .iter()
                .take_while(|(off, _)| *off < upto)
                .count()
        };
        if upto <= self.sent && n == 0 {
            return true;
        }
        let tokens: Vec<GeneratedToken> = self.pending.drain(..n).map(|(_, t)| t).collect();
        let piece = Piece {
            text: self.text.get(self.sent..upto).unwrap_or_default(),
            tokens: &tokens,
        };
        let go_on = on_piece(&piece);
        self.sent = upto.max(self.sent);
        self.reported.extend(tokens);
        go_on
    }

    /// Ends the generation with `finish`: reports what is still held back (unless cancelled
    /// or cut by a stop string) and returns the result.
    pub fn finish(
        mut self,
        finish: FinishReason,
        timings: Timings,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Generation {
        if finish != FinishReason::Cancelled && !self.cut_by_stop_string {
            let rest = self.decoder.finish();
            self.text.push_str(&rest);
            let end = self.text.len();
            self.report(end, true, on_piece);
        }
        Generation {
            tokens: self.out_tokens,
            text: self.text,
            finish_reason: finish,
            prompt_tokens: self.prompt_tokens,
            timings,
            logprobs: if self.top_logprobs.is_some() {
                self.reported
            } else {
                Vec::new()
            },
        }
    }
}

/// Bytes at the end of `text` that might start a stop string.
pub(crate) fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if k <= hold {
                break;
            }
            if text.as_bytes().ends_with(&s.as_bytes()[..k]) {
                hold = k;
                break;
            }
        }
    }
    hold
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
