//! Tokenizers embedded in GGUF files, special tokens and chat templates.
//!
//! Two vocabularies are supported:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE (SmolLM2, Llama 3, Qwen2). Text is first
//!   split by a pre-tokenizer chosen from `tokenizer.ggml.pre` (`smollm`: single digits, then the
//!   GPT-2 pattern; `llama-bpe`/`llama3`: the Llama 3 pattern; `qwen2`: Llama 3 pattern with single
//!   digits; anything else: GPT-2), each piece's bytes are mapped to printable characters
//!   ([`byte_to_unicode`]) and merged by merge rank.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style (scores, `▁` for spaces, `<0xXX>`
//!   byte fallback), merged greedily by highest score.
//!
//! Control/user-defined tokens (e.g. `<|im_start|>`) are only recognised in text when the caller
//! asks (`parse_special`), so user content cannot inject them.

use std::collections::HashMap;

use crate::error::InferenceError;
use crate::gguf::{Gguf, Value};

/// GPT-2's reversible byte → printable-character map used by byte-level BPE vocabularies:
/// printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in order.
pub fn byte_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let keep = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if keep {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    out
}

/// Token types as stored in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Ordinary text.
    Normal,
    /// Unknown-token placeholder.
    Unknown,
    /// Control token (bos/eos/chat markers): not printed.
    Control,
    /// User-defined literal token.
    UserDefined,
    /// Never produced.
    Unused,
    /// SentencePiece byte token `<0xXX>`.
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Pre-tokenizer pattern family for byte-level BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2 pattern.
    Gpt2,
    /// Single digits, then GPT-2 (SmolLM).
    SmolLm,
    /// Llama 3 pattern (case-insensitive contractions, digit groups of up to 3).
    Llama3,
    /// Llama 3 pattern with single digits (Qwen2).
    Qwen2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bpe(PreTokenizer),
    Spm,
}

/// Which chat prompt format a model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n`, with an optional default system prompt.
    ChatMl {
        /// System prompt the template inserts when the conversation has none.
        default_system: Option<String>,
    },
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` after `<|begin_of_text|>`.
    Llama3,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// A tokenizer loaded from GGUF metadata.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    kind: Kind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, u32>,
    /// (left, right) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Specials matched literally when `parse_special`, longest first.
    specials: Vec<(String, u32)>,
    byte_tokens: [Option<u32>; 256],
    unicode_to_byte: HashMap<char, u8>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Whether prompts start with BOS.
    pub add_bos: bool,
    add_space_prefix: bool,
    unk: Option<u32>,
    /// Tokens that end generation (eos, end-of-turn markers).
    pub stop_tokens: Vec<u32>,
    /// The chat format inferred from `tokenizer.chat_template` (`None`: no usable template).
    pub chat: Option<ChatFormat>,
    /// How the chat template writes tool calls (`None`: it has no tool format we render).
    pub tool_format: Option<crate::chat::ToolFormat>,
}

fn meta_err(s: impl Into<String>) -> InferenceError {
    InferenceError::Tokenizer(s.into())
}

impl Tokenizer {
    /// Loads the tokenizer from GGUF metadata.
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Self, InferenceError> {
        let model = g.get_str("tokenizer.ggml.model").ok_or_else(|| {
            meta_err("tokenizer.ggml.model is missing; the GGUF has no embedded tokenizer")
        })?;
        let kind = match model {
            "gpt2" => Kind::Bpe(match g.get_str("tokenizer.ggml.pre").unwrap_or("default") {
                "smollm" => PreTokenizer::SmolLm,
                "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => PreTokenizer::Llama3,
                "qwen2" | "deepseek-r1-qwen" => PreTokenizer::Qwen2,
                _ => PreTokenizer::Gpt2,
            }),
            "llama" => Kind::Spm,
            other => {
                return Err(meta_err(format!(
                    "tokenizer model {other:?} is not supported (supported: gpt2, llama)"
                )));
            }
        };
        let tokens: Vec<String> = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| meta_err("tokenizer.ggml.tokens is missing"))?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| meta_err("tokenizer.ggml.tokens holds a non-string"))?;
        let n = tokens.len();
        if n == 0 || n >= (1 << 24) {
            return Err(meta_err(format!("vocabulary size {n} out of range")));
        }
        let types: Vec<TokenType> =
            match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
                Some(a) if a.len() == n => a
                    .iter()
                    .map(|v| TokenType::from_i64(v.as_i64().unwrap_or(1)))
                    .collect(),
                Some(_) => {
                    return Err(meta_err(
                        "tokenizer.ggml.token_type length differs from tokens",
                    ));
                }
                None => vec![TokenType::Normal; n],
            };
        let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
            _ => vec![0.0; n],
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        let mut merges = HashMap::new();
        if let Kind::Bpe(_) = kind {
            let list = g
                .get("tokenizer.ggml.merges")
                .and_then(Value::as_array)
                .ok_or_else(|| meta_err("tokenizer.ggml.merges is missing for a gpt2 tokenizer"))?;
            for (rank, m) in list.iter().enumerate() {
                let s = m
                    .as_str()
                    .ok_or_else(|| meta_err("merge is not a string"))?;
                let Some((a, b)) = s.split_once(' ') else {
                    return Err(meta_err(format!("merge {s:?} has no space")));
                };
                if let (Some(&ia), Some(&ib), Some(&im)) = (
                    token_to_id.get(a),
                    token_to_id.get(b),
                    token_to_id.get(&format!("{a}{b}")),
                ) {
                    merges.entry((ia, ib)).or_insert((rank as u32, im));
                }
            }
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                matches!(types[*i], TokenType::Control | TokenType::UserDefined) && !t.is_empty()
            })
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let b2u = byte_to_unicode();
        let mut byte_tokens = [None; 256];
        let mut unicode_to_byte = HashMap::new();
        for (b, c) in b2u.iter().enumerate() {
            unicode_to_byte.insert(*c, b as u8);
            byte_tokens[b] = match kind {
                Kind::Bpe(_) => token_to_id.get(&c.to_string()).copied(),
                Kind::Spm => token_to_id.get(&format!("<0x{b:02X}>")).copied(),
            };
        }
        let id = |key: &str| {
            g.get_u64(key)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < n)
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let unk = id("tokenizer.ggml.unknown_token_id");
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(kind == Kind::Spm);
        let add_space_prefix = g
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(Value::as_bool)
            .unwrap_or(kind == Kind::Spm);
        let mut stop_tokens: Vec<u32> = eos.into_iter().collect();
        for s in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
            "<|eom_id|>",
        ] {
            if let Some(&i) = token_to_id.get(s)
                && types[i as usize] == TokenType::Control
                && !stop_tokens.contains(&i)
            {
                stop_tokens.push(i);
            }
        }
        let template = g.get_str("tokenizer.chat_template").unwrap_or("");
        let chat = detect_chat_format(template, &token_to_id).ok();
        let tool_format = crate::chat::ToolFormat::detect(template);
        Ok(Tokenizer {
            kind,
            tokens,
            types,
            scores,
            token_to_id,
            merges,
            specials,
            byte_tokens,
            unicode_to_byte,
            bos,
            eos,
            add_bos,
            add_space_prefix,
            unk,
            stop_tokens,
            chat,
            tool_format,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token string, if present.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.token_to_id.get(s).copied()
    }

    /// The raw vocabulary string of a token.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }

    /// Encodes text. With `parse_special`, control tokens written literally in `text` (such as
    /// `<|im_start|>`) become their ids; otherwise they are encoded as plain text. Adds BOS when
    /// the model asks for it and `add_bos` is true.
    pub fn encode(&self, text: &str, parse_special: bool, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos
            && self.add_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        let mut first_text = true;
        let mut rest = text;
        while !rest.is_empty() {
            let found = if parse_special {
                self.find_special(rest)
            } else {
                None
            };
            let (plain, special) = match found {
                Some((pos, len, id)) => (&rest[..pos], Some((len, id, pos))),
                None => (rest, None),
            };
            if !plain.is_empty() {
                self.encode_plain(plain, first_text, &mut out);
                first_text = false;
            }
            match special {
                Some((len, id, pos)) => {
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => break,
            }
        }
        out
    }

    fn find_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (s, id) in &self.specials {
            if let Some(p) = text.find(s.as_str()) {
                // Earliest position wins; at equal position the longest (list is sorted by length).
                if best.is_none_or(|(bp, _, _)| p < bp) {
                    best = Some((p, s.len(), *id));
                }
            }
        }
        best
    }

    fn encode_plain(&self, text: &str, first: bool, out: &mut Vec<u32>) {
        match self.kind {
            Kind::Bpe(pre) => {
                for piece in pre_tokenize(pre, text) {
                    self.bpe_piece(piece, out);
                }
            }
            Kind::Spm => {
                let mut s = String::with_capacity(text.len() + 3);
                if first && self.add_space_prefix {
                    s.push('▁');
                }
                for c in text.chars() {
                    s.push(if c == ' ' { '▁' } else { c });
                }
                self.spm(&s, out);
            }
        }
    }

    fn bpe_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let b2u = byte_to_unicode();
        let mut syms: Vec<u32> = Vec::with_capacity(piece.len());
        for b in piece.bytes() {
            match self.byte_tokens[b as usize] {
                Some(id) => syms.push(id),
                None => {
                    if let Some(u) = self.unk {
                        syms.push(u);
                    }
                    let _ = b2u;
                }
            }
        }
        // Fast path: whole piece is one token.
        if syms.len() > 1 {
            let mapped: String = piece.bytes().map(|b| b2u[b as usize]).collect();
            if let Some(&id) = self.token_to_id.get(&mapped) {
                out.push(id);
                return;
            }
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1]))
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, merged));
                }
            }
            match best {
                Some((_, i, merged)) => {
                    syms[i] = merged;
                    syms.remove(i + 1);
                }
                None => break,
            }
        }
        out.extend_from_slice(&syms);
    }

    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols are string slices; merge the adjacent pair with the highest score while the
        // concatenation is in the vocabulary.
        let mut syms: Vec<String> = text.chars().map(|c| c.to_string()).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                let cat = format!("{}{}", syms[i], syms[i + 1]);
                if let Some(&id) = self.token_to_id.get(&cat) {
                    let sc = self.scores[id as usize];
                    if best.is_none_or(|(bs, _)| sc > bs) {
                        best = Some((sc, i));
                    }
                }
            }
            match best {
                Some((_, i)) => {
                    let right = syms.remove(i + 1);
                    syms[i].push_str(&right);
                }
                None => break,
            }
        }
        for s in syms {
            match self.token_to_id.get(&s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// Bytes a token stands for (control tokens: nothing unless `special`).
    pub fn token_bytes(&self, id: u32, special: bool, out: &mut Vec<u8>) {
        let Some(tok) = self.tokens.get(id as usize) else {
            return;
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unused | TokenType::Unknown => {
                if special {
                    out.extend_from_slice(tok.as_bytes());
                }
            }
            TokenType::UserDefined => out.extend_from_slice(tok.as_bytes()),
            TokenType::Byte => {
                if let Some(b) = tok
                    .strip_prefix("<0x")
                    .and_then(|t| t.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(b);
                }
            }
            TokenType::Normal => match self.kind {
                Kind::Bpe(_) => {
                    for c in tok.chars() {
                        match self.unicode_to_byte.get(&c) {
                            Some(&b) => out.push(b),
                            None => {
                                let mut buf = [0u8; 4];
                                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                }
                Kind::Spm => {
                    for c in tok.chars() {
                        if c == '▁' {
                            out.push(b' ');
                        } else {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            },
        }
    }

    /// Decodes ids to text (control tokens omitted; invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.token_bytes(id, false, &mut bytes);
        }
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if self.kind == Kind::Spm && self.add_space_prefix && s.starts_with(' ') {
            s.remove(0);
        }
        s
    }

    /// Builds the chat prompt text (with special tokens written literally) for `messages`,
    /// ending with the assistant header so the model answers.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, InferenceError> {
        let mut s = String::new();
        match self.chat_format()? {
            ChatFormat::ChatMl { default_system } => {
                if let Some(sys) = default_system
                    && messages.first().is_none_or(|m| m.role != "system")
                {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                for m in messages {
                    s.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role, m.content
                    ));
                }
                s.push_str("<|im_start|>assistant\n");
            }
            ChatFormat::Llama3 => {
                s.push_str("<|begin_of_text|>");
                for m in messages {
                    s.push_str(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    ));
                }
                s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        Ok(s)
    }

    fn chat_format(&self) -> Result<&ChatFormat, InferenceError> {
        self.chat.as_ref().ok_or_else(|| {
            InferenceError::Tokenizer(
                "the model's chat template is neither ChatML nor Llama 3 style; use plain completions (no --chat, /v1/completions)".into(),
            )
        })
    }

    /// Tokenizes a chat: template markers become special tokens, message contents are encoded
    /// as plain text (so user text cannot forge markers).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        // Encode the template with specials, but each content separately without.
        let mut out = Vec::new();
        let push_tpl = |out: &mut Vec<u32>, t: &str| out.extend(self.encode(t, true, false));
        match self.chat_format()? {
            ChatFormat::ChatMl { default_system } => {
                if let Some(sys) = default_system
                    && messages.first().is_none_or(|m| m.role != "system")
                {
                    push_tpl(&mut out, "<|im_start|>system\n");
                    out.extend(self.encode(sys, false, false));
                    push_tpl(&mut out, "<|im_end|>\n");
                }
                for m in messages {
                    push_tpl(&mut out, "<|im_start|>");
                    out.extend(self.encode(&format!("{}\n", m.role), false, false));
                    out.extend(self.encode(&m.content, false, false));
                    push_tpl(&mut out, "<|im_end|>\n");
                }
                push_tpl(&mut out, "<|im_start|>assistant\n");
            }
            ChatFormat::Llama3 => {
                push_tpl(&mut out, "<|begin_of_text|>");
                for m in messages {
                    push_tpl(&mut out, "<|start_header_id|>");
                    out.extend(self.encode(&m.role, false, false));
                    push_tpl(&mut out, "<|end_header_id|>\n\n");
                    out.extend(self.encode(m.content.trim(), false, false));
                    push_tpl(&mut out, "<|eot_id|>");
                }
                push_tpl(
                    &mut out,
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
                );
            }
        }
        Ok(out)
    }
}

fn detect_chat_format(
    template: &str,
    vocab: &HashMap<String, u32>,
) -> Result<ChatFormat, InferenceError> {
    if template.contains("<|start_header_id|>")
        || (template.is_empty() && vocab.contains_key("<|start_header_id|>"))
    {
        return Ok(ChatFormat::Llama3);
    }
    if template.contains("<|im_start|>") || vocab.contains_key("<|im_start|>") {
        // SmolLM2 inserts a default system prompt when the first message is not a system one.
        let default_system = if template.contains("!= 'system'") {
            template
                .split_once("<|im_start|>system\n")
                .and_then(|(_, rest)| rest.split_once("<|im_end|>"))
                .map(|(sys, _)| sys.to_owned())
                .filter(|s| !s.contains('{') && !s.contains('\''))
        } else {
            None
        };
        return Ok(ChatFormat::ChatMl { default_system });
    }
    // Unknown template: ChatML is the most common; it needs the markers in the vocabulary.
    Err(InferenceError::Tokenizer(
        "the model's chat template is neither ChatML nor Llama 3 style; use plain completions (no --chat)".into(),
    ))
}

fn is_letter(c: char) -> bool {
    c.is_alphabetic()
}
fn is_number(c: char) -> bool {
    c.is_numeric()
}

/// Splits text into pre-tokens (no allocation of the pieces; they borrow `text`).
pub fn pre_tokenize(pre: PreTokenizer, text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    match pre {
        PreTokenizer::Gpt2 => gpt2_split(text, &mut out),
        PreTokenizer::Llama3 => llama3_split(text, 3, &mut out),
        PreTokenizer::SmolLm | PreTokenizer::Qwen2 => {
            // Split out every single digit first, then apply the main pattern to the rest.
            let mut start = 0;
            for (i, c) in text.char_indices() {
                if is_number(c) {
                    if start < i {
                        if pre == PreTokenizer::SmolLm {
                            gpt2_split(&text[start..i], &mut out);
                        } else {
                            llama3_split(&text[start..i], 1, &mut out);
                        }
                    }
                    out.push(&text[i..i + c.len_utf8()]);
                    start = i + c.len_utf8();
                }
            }
            if start < text.len() {
                if pre == PreTokenizer::SmolLm {
                    gpt2_split(&text[start..], &mut out);
                } else {
                    llama3_split(&text[start..], 1, &mut out);
                }
            }
        }
    }
    out
}

/// Length in bytes of the run of chars from `i` satisfying `f`.
fn run(text: &str, i: usize, f: impl Fn(char) -> bool) -> usize {
    text[i..]
        .char_indices()
        .find(|&(_, c)| !f(c))
        .map_or(text.len() - i, |(j, _)| j)
}

/// Whitespace rule shared by both patterns: `\s+(?!\S)|\s+` at `i` (text[i] is whitespace).
fn whitespace_len(text: &str, i: usize) -> usize {
    let n = run(text, i, char::is_whitespace);
    if i + n < text.len() {
        // Followed by non-space: leave the last whitespace char for the next piece if the run has more than one char.
        let last = text[i..i + n].chars().next_back().map_or(0, char::len_utf8);
        if n > last { n - last } else { n }
    } else {
        n
    }
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn gpt2_split<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        if let Some(n) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
            .iter()
            .find(|c| rest.starts_with(**c))
            .map(|c| c.len())
        {
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        let mut chars = rest.chars();
        let c0 = chars.next().unwrap_or(' ');
        let (skip, c) = if c0 == ' ' {
            match chars.next() {
                Some(c1) if !c1.is_whitespace() => (1, c1),
                _ => (0, c0),
            }
        } else {
            (0, c0)
        };
        let n = if c.is_whitespace() {
            whitespace_len(text, i)
        } else if is_letter(c) {
            skip + run(text, i + skip, is_letter)
        } else if is_number(c) {
            skip + run(text, i + skip, is_number)
        } else {
            skip + run(text, i + skip, |c| {
                !c.is_whitespace() && !is_letter(c) && !is_number(c)
            })
        };
        let n = n.max(c0.len_utf8());
        out.push(&text[i..i + n]);
        i += n;
    }
}

/// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// (`max_digits` = 1 gives the Qwen2 variant).
fn llama3_split<'a>(text: &'a str, max_digits: usize, out: &mut Vec<&'a str>) {
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let lower: String = rest.chars().take(3).collect::<String>().to_lowercase();
        if let Some(n) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
            .iter()
            .find(|c| lower.starts_with(**c))
            .map(|c| c.len())
            && rest.is_char_boundary(n)
        {
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        let mut chars = rest.chars();
        let c0 = chars.next().unwrap_or(' ');
        let c1 = chars.next();
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if is_letter(c0) {
            let n = run(text, i, is_letter);
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        if c0 != '\r' && c0 != '\n' && !is_number(c0) && c1.is_some_and(is_letter) {
            let k = c0.len_utf8();
            let n = k + run(text, i + k, is_letter);
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        // \p{N}{1,3}
        if is_number(c0) {
            let n: usize = rest
                .chars()
                .take_while(|&c| is_number(c))
                .take(max_digits)
                .map(char::len_utf8)
                .sum();
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let is_punct = |c: char| !c.is_whitespace() && !is_letter(c) && !is_number(c);
        let skip = usize::from(c0 == ' ' && c1.is_some_and(is_punct));
        if skip == 1 || is_punct(c0) {
            let mut n = skip + run(text, i + skip, is_punct);
            n += run(text, i + n, |c| c == '\r' || c == '\n');
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        // \s*[\r\n]+
        let ws = run(text, i, char::is_whitespace);
        if let Some(last_nl) = rest[..ws].rfind(['\r', '\n']) {
            let n = last_nl + 1;
            out.push(&rest[..n]);
            i += n;
            continue;
        }
        let n = whitespace_len(text, i).max(c0.len_utf8());
        out.push(&rest[..n]);
        i += n;
    }
}

/// Incremental detokenizer for streaming: returns only complete UTF-8 text.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A fresh decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the newly completed text (may be empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        tok.token_bytes(id, false, &mut self.pending);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_owned();
                self.pending.clear();
                s
            }
            Err(e) => {
                let valid = e.valid_up_to();
                if e.error_len().is_some() {
                    // Invalid (not just incomplete): flush lossily.
                    let s = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return s;
                }
                let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                s
            }
        }
    }

    /// Flushes any incomplete trailing bytes (lossily).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::LlamaConfig;
    use crate::synthetic::synthetic_gguf;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_unicode();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b'A' as usize], 'A');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn gpt2_pre_tokenizer() {
        assert_eq!(
            pre_tokenize(PreTokenizer::Gpt2, "Hello world's  end 123!!\n\nx"),
            vec![
                "Hello", " world", "'s", " ", " end", " 123", "!!", "\n", "\n", "x"
            ]
        );
        assert_eq!(
            pre_tokenize(PreTokenizer::SmolLm, "ab 12 c"),
            vec!["ab", " ", "1", "2", " c"]
        );
        assert_eq!(pre_tokenize(PreTokenizer::Gpt2, "a   "), vec!["a", "   "]);
    }

    #[test]
    fn llama3_pre_tokenizer() {
        assert_eq!(
            pre_tokenize(PreTokenizer::Llama3, "Hello World's 12345 (x)\n\n y"),
            vec![
                "Hello", " World", "'s", " ", "123", "45", " (", "x", ")\n\n", " y"
            ]
        );
    }

    fn synthetic_tok() -> Tokenizer {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), crate::GgmlType::Q8_0, 0).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        Tokenizer::from_gguf(&g).unwrap()
    }

    #[test]
    fn synthetic_bpe() {
        let t = synthetic_tok();
        // Specials 0..3, bytes 3..259, merges from 259: Ġt=259, he=260, Ġthe=261.
        let ids = t.encode(" the", false, true);
        assert_eq!(ids, vec![261]);
        assert_eq!(t.decode(&ids), " the");
        let ids = t.encode("<|im_start|>hi", true, false);
        assert_eq!(ids[0], 1);
        let ids = t.encode("<|im_start|>hi", false, false);
        assert!(ids.len() > 3 && !ids.contains(&1));
        assert_eq!(t.decode(&ids), "<|im_start|>hi");
        assert!(t.is_stop(2));
        let text = "héllo wörld 😀 \n\t x";
        assert_eq!(t.decode(&t.encode(text, false, false)), text);
    }

    #[test]
    fn stream_decoder_holds_partial_utf8() {
        let t = synthetic_tok();
        let ids = t.encode("é😀", false, false);
        let mut d = StreamDecoder::new();
        let mut s = String::new();
        let mut saw_partial = false;
        for id in ids {
            let piece = d.push(&t, id);
            saw_partial |= piece.is_empty();
            s.push_str(&piece);
        }
        s.push_str(&d.finish());
        assert!(saw_partial);
        assert_eq!(s, "é😀");
    }

    #[test]
    fn chat_templates() {
        let t = synthetic_tok();
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }];
        assert_eq!(
            t.chat_prompt(&msgs).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.encode_chat(&msgs).unwrap(),
            t.encode(&t.chat_prompt(&msgs).unwrap(), true, false)
        );
        let vocab: HashMap<String, u32> = HashMap::new();
        assert_eq!(
            detect_chat_format("{{ '<|start_header_id|>' }}", &vocab).unwrap(),
            ChatFormat::Llama3
        );
        assert!(detect_chat_format("[INST]", &vocab).is_err());
    }

    #[test]
    fn sentencepiece_scores_and_byte_fallback() {
        use crate::gguf::{GgufWriter, Value};
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let pieces = [
            "▁", "h", "e", "l", "o", "▁h", "ll", "he", "▁he", "llo", "▁hello", "w", "r", "d",
        ];
        for p in pieces {
            tokens.push(p.into());
            types.push(1);
        }
        let n = tokens.len();
        // Higher score = merged first; "▁hello" must win over partial merges.
        let scores: Vec<Value> = (0..n).map(|i| Value::F32(i as f32)).collect();
        let mut w = GgufWriter::new();
        w.kv("tokenizer.ggml.model", Value::String("llama".into()))
            .kv(
                "tokenizer.ggml.tokens",
                Value::Array(tokens.iter().cloned().map(Value::String).collect()),
            )
            .kv(
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            )
            .kv("tokenizer.ggml.scores", Value::Array(scores))
            .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
            .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
            .kv("tokenizer.ggml.unknown_token_id", Value::U32(0));
        let bytes = w.to_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        // No chat markers in this vocabulary: loading must still work for plain completion.
        let t = Tokenizer::from_gguf(&g);
        let t = match t {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let id = |s: &str| t.token_id(s).unwrap();
        assert!(t.chat.is_none());
        assert!(t.encode_chat(&[]).is_err());
        let ids = t.encode("hello", false, true);
        assert_eq!(ids, vec![1, id("▁hello")]);
        // 'x' is not in the vocabulary: byte fallback <0x78>.
        let ids = t.encode("hex", false, false);
        assert_eq!(ids, vec![id("▁he"), id("<0x78>")]);
        assert_eq!(t.decode(&ids), "hex");
        let text = "hello world ü";
        assert_eq!(t.decode(&t.encode(text, false, true)), text);
    }

    fn real() -> Option<Tokenizer> {
        let path = crate::test_support::real_model_path()?;
        let f = crate::ModelFile::open(&path).unwrap();
        let g = f.gguf().unwrap();
        Some(Tokenizer::from_gguf(&g).unwrap())
    }

    #[test]
    fn smollm2_known_ids_and_round_trips() {
        let Some(t) = real() else { return };
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.eos, Some(2));
        assert_eq!(t.bos, Some(1));
        assert!(!t.add_bos);
        // From the vocabulary listing: 17 control tokens, the byte alphabet, then one token
        // per merge: 'Ġt' (first merge) = 252, 'Ġthe' = 260, 'Ġof' = 282, 'Ġand' = 284.
        assert_eq!(t.token_id("Ġt"), Some(252));
        assert_eq!(t.token_id("Ġthe"), Some(260));
        assert_eq!(t.encode(" the", false, false), vec![260]);
        assert_eq!(t.encode(" the and of", false, false), vec![260, 284, 282]);
        // Digits are split individually: '1' is the 17 + ('1' - '!') = 33rd token.
        assert_eq!(t.encode("12", false, false), vec![33, 34]);
        assert_eq!(
            t.encode("<|im_start|>user\n", true, false)[0],
            1,
            "chat marker is a special token"
        );
        assert!(
            matches!(t.chat, Some(ChatFormat::ChatMl { default_system: Some(ref s) }) if s.contains("SmolLM"))
        );
        let chat = t
            .encode_chat(&[ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }])
            .unwrap();
        assert_eq!(chat[0], 1, "starts with <|im_start|>");
        assert_eq!(
            t.decode(&chat),
            "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\nHi\nassistant\n"
        );
        for text in [
            "The capital of France is",
            "Hello, world! How are you?\n\nFine, thanks.",
            "  leading spaces and trailing   ",
            "unicode: naïve café — 東京 😀",
            "code: fn main() { println!(\"{}\", 1 + 2); }",
        ] {
            let ids = t.encode(text, false, false);
            assert_eq!(t.decode(&ids), text, "{ids:?}");
        }
        // Decoding ids then encoding gives the same ids for a canonical encoding.
        let ids = t.encode("The capital of France is", false, false);
        assert_eq!(t.encode(&t.decode(&ids), false, false), ids);
        // The / Ġcapital / Ġof / ĠFrance / Ġis
        assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
        assert_eq!(t.encode("\n\n", false, false), vec![1116]);
    }
}
