//! The vocabulary as the grammar sees it: each token's bytes, a byte trie over all tokens (for
//! computing a state's allowed tokens in one walk), the stop tokens, and [`TokenMask`], the
//! allowed-token bitset handed to the sampler.

use crate::tokenizer::Tokenizer;

/// A set of token ids as a bitset (one bit per vocabulary entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u64>,
    len: usize,
}

impl TokenMask {
    /// No token allowed.
    pub fn none(len: usize) -> Self {
        TokenMask {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Every token allowed.
    pub fn all(len: usize) -> Self {
        let mut m = Self::none(len);
        for w in &mut m.words {
            *w = u64::MAX;
        }
        m.trim();
        m
    }

    fn trim(&mut self) {
        let extra = self.words.len() * 64 - self.len;
        if extra > 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= u64::MAX >> extra;
        }
    }

    /// Vocabulary size the mask covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers no token ids at all (a zero-size vocabulary).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `id` is allowed.
    pub fn contains(&self, id: u32) -> bool {
        let i = id as usize;
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Allows `id` (ids outside the vocabulary are ignored).
    pub fn insert(&mut self, id: u32) {
        let i = id as usize;
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Forbids `id`.
    pub fn remove(&mut self, id: u32) {
        let i = id as usize;
        if i < self.len {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Number of allowed tokens.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Copies `other` into `self` (same vocabulary), reusing the allocation.
    pub fn copy_from(&mut self, other: &TokenMask) {
        self.words.clone_from(&other.words);
        self.len = other.len;
    }

    /// Forbids everything.
    pub fn clear(&mut self) {
        for w in &mut self.words {
            *w = 0;
        }
    }

    /// The allowed ids in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some((wi * 64) as u32 + b)
            })
        })
    }

    /// Sets `logits[i]` to minus infinity for every id not in the mask (ids beyond the
    /// mask's vocabulary too).
    pub fn apply(&self, logits: &mut [f32]) {
        for (wi, chunk) in logits.chunks_mut(64).enumerate() {
            let w = self.words.get(wi).copied().unwrap_or(0);
            if w == u64::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if w & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// One trie node: its children (by byte) and the tokens whose bytes end here.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrieNode {
    /// Index of the first child in [`VocabIndex::edges`].
    pub first_edge: u32,
    /// Number of children.
    pub n_edges: u32,
    /// Index of the first token ending here in [`VocabIndex::token_ids`].
    pub first_token: u32,
    /// Number of tokens ending here.
    pub n_tokens: u32,
}

/// The vocabulary prepared for constrained decoding. Built once per model (not per request).
#[derive(Debug, Clone)]
pub struct VocabIndex {
    vocab: usize,
    /// Each token's bytes (empty for control and unused tokens).
    bytes: Vec<Vec<u8>>,
    /// Tokens that end generation.
    stop: Vec<u32>,
    /// Tokens with no bytes that do not stop generation (control, unused).
    empty: Vec<u32>,
    pub(crate) nodes: Vec<TrieNode>,
    /// (byte, child node) per edge, each node's edges sorted by byte.
    pub(crate) edges: Vec<(u8, u32)>,
    pub(crate) token_ids: Vec<u32>,
    /// Whether every byte value has a single-byte token (then the grammar can always finish
    /// within as many tokens as the shortest completion has bytes).
    pub(crate) all_single_bytes: bool,
}

impl VocabIndex {
    /// Builds the index of a model's tokenizer.
    pub fn from_tokenizer(tok: &Tokenizer) -> Self {
        let n = tok.vocab_size();
        let bytes: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let mut b = Vec::new();
                tok.token_bytes(id, false, &mut b);
                b
            })
            .collect();
        Self::new(bytes, tok.stop_tokens.clone())
    }

    /// Builds the index from each token's bytes and the stop tokens (tests build vocabularies
    /// by hand this way).
    pub fn new(bytes: Vec<Vec<u8>>, stop: Vec<u32>) -> Self {
        let vocab = bytes.len();
        let stop: Vec<u32> = stop.into_iter().filter(|&s| (s as usize) < vocab).collect();
        let empty = (0..vocab as u32)
            .filter(|&i| bytes[i as usize].is_empty() && !stop.contains(&i))
            .collect();
        // Sort the non-empty, non-stop tokens by bytes: a node's tokens and children are then
        // contiguous, and the trie is built in one pass.
        let mut order: Vec<u32> = (0..vocab as u32)
            .filter(|&i| !bytes[i as usize].is_empty() && !stop.contains(&i))
            .collect();
        order.sort_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]).then(a.cmp(&b)));
        // Build a pointer trie first, then flatten it breadth-first.
        struct Tmp {
            children: Vec<(u8, usize)>,
            tokens: Vec<u32>,
        }
        let mut tmp = vec![Tmp {
            children: Vec::new(),
            tokens: Vec::new(),
        }];
        for &id in &order {
            let mut node = 0;
            for &b in &bytes[id as usize] {
                node = match tmp[node].children.iter().find(|(cb, _)| *cb == b) {
                    Some(&(_, c)) => c,
                    None => {
                        tmp.push(Tmp {
                            children: Vec::new(),
                            tokens: Vec::new(),
                        });
                        let c = tmp.len() - 1;
                        tmp[node].children.push((b, c));
                        c
                    }
                };
            }
            tmp[node].tokens.push(id);
        }
        let mut nodes = vec![TrieNode::default(); tmp.len()];
        let mut edges = Vec::with_capacity(tmp.len());
        let mut token_ids = Vec::with_capacity(order.len());
        for (i, t) in tmp.iter_mut().enumerate() {
            t.children.sort_by_key(|c| c.0);
            nodes[i].first_edge = edges.len() as u32;
            nodes[i].n_edges = t.children.len() as u32;
            edges.extend(t.children.iter().map(|&(b, c)| (b, c as u32)));
            nodes[i].first_token = token_ids.len() as u32;
            nodes[i].n_tokens = t.tokens.len() as u32;
            token_ids.extend_from_slice(&t.tokens);
        }
        let mut single = [false; 256];
        for b in &bytes {
            if let [x] = b.as_slice() {
                single[*x as usize] = true;
            }
        }
        VocabIndex {
            vocab,
            bytes,
            stop,
            empty,
            nodes,
            edges,
            token_ids,
            all_single_bytes: single.iter().all(|&s| s),
        }
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.vocab
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.vocab == 0
    }

    /// A token's bytes.
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The stop tokens.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// Whether `id` is a stop token.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.contains(&id)
    }

    /// Tokens without bytes that do not stop (control and unused tokens).
    pub(crate) fn empty_tokens(&self) -> &[u32] {
        &self.empty
    }

    /// Whether every byte has its own token (see the module docs of [`super`]).
    pub fn has_all_single_bytes(&self) -> bool {
        self.all_single_bytes
    }

    /// Trie nodes (for statistics).
    pub fn trie_nodes(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mask_ops() {
        let mut m = TokenMask::none(130);
        assert_eq!(m.count(), 0);
        m.insert(0);
        m.insert(64);
        m.insert(129);
        m.insert(500);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(m.contains(64) && !m.contains(65) && !m.contains(500));
        m.remove(64);
        assert_eq!(m.count(), 2);
        let all = TokenMask::all(130);
        assert_eq!(all.count(), 130);
        let mut logits = vec![1.0f32; 131];
        m.apply(&mut logits);
        assert_eq!(logits[0], 1.0);
        assert_eq!(logits[129], 1.0);
        assert!(logits[1].is_infinite() && logits[130].is_infinite());
    }

    #[test]
    fn trie_holds_every_token_once() {
        let toks: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"a".to_vec(),
            b"ab".to_vec(),
            b"abc".to_vec(),
            b"b".to_vec(),
            b"ab".to_vec(),
        ];
        let v = VocabIndex::new(toks, vec![0]);
        assert_eq!(v.token_ids.len(), 5);
        assert!(v.empty_tokens().is_empty());
        // root, a, ab, abc, b
        assert_eq!(v.trie_nodes(), 5);
        assert!(!v.has_all_single_bytes());
    }
}
