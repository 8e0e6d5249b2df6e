//! The byte-level automaton: grammar nodes (what a JSON schema or a tool-call format compiles
//! to), the matcher state (a stack of frames), one-byte steps, acceptance and the shortest
//! completion length.
//!
//! Every step is deterministic: a byte either advances the state in exactly one way or is
//! rejected. Alternatives are resolved by their first byte (`AnyOf` branches must start with
//! distinct bytes; the compiler checks this) or by a literal trie; a complete value followed
//! by a byte it cannot take ends (e.g. a number before `,`), and the byte goes to the frame
//! below. So a state is a plain value that can be hashed and cached with its token mask.

/// Index of a node in [`Nodes`].
pub type NodeId = u32;

/// Whitespace bytes one gap between JSON tokens may hold (bounded so that a model cannot
/// stall in whitespace forever; pretty-printed JSON nested a few levels deep fits).
pub const MAX_WS: u8 = 16;
/// Most digits in a number's integer part, fraction and exponent (keeps numbers parseable
/// as JSON doubles and integers by every client).
pub const MAX_INT_DIGITS: u8 = 15;
/// See [`MAX_INT_DIGITS`].
pub const MAX_FRAC_DIGITS: u8 = 15;
/// See [`MAX_INT_DIGITS`].
pub const MAX_EXP_DIGITS: u8 = 2;
/// Deepest stack of frames (free-form JSON nests at most this deep).
pub const MAX_STACK: usize = 48;

/// A byte trie of literals; leaves carry a payload (a continuation node or a property index).
#[derive(Debug, Clone, Default)]
pub struct LitTrie {
    /// Children per node, sorted by byte.
    pub children: Vec<Vec<(u8, u32)>>,
    /// Payload of the literal ending at a node (`Some(None)`: a literal without payload).
    pub leaf: Vec<Option<Option<u32>>>,
    /// Depth of each node (bytes from the root).
    pub depth: Vec<u32>,
    /// Leaf payloads below (and at) each node, sorted (object keys: property indices).
    pub below: Vec<Vec<u32>>,
}

impl LitTrie {
    /// Builds a trie of `(bytes, payload)`; duplicates keep the first payload.
    pub fn new(lits: &[(Vec<u8>, Option<u32>)]) -> Self {
        let mut t = LitTrie {
            children: vec![Vec::new()],
            leaf: vec![None],
            depth: vec![0],
            below: vec![Vec::new()],
        };
        for (bytes, payload) in lits {
            let mut n = 0usize;
            for &b in bytes {
                n = match t.children[n].iter().find(|c| c.0 == b) {
                    Some(&(_, c)) => c as usize,
                    None => {
                        t.children.push(Vec::new());
                        t.leaf.push(None);
                        t.depth.push(t.depth[n] + 1);
                        t.below.push(Vec::new());
                        let c = t.children.len() - 1;
                        t.children[n].push((b, c as u32));
                        c
                    }
                };
            }
            if t.leaf[n].is_none() {
                t.leaf[n] = Some(*payload);
            }
        }
        for c in &mut t.children {
            c.sort_by_key(|e| e.0);
        }
        // Payloads below each node (children have higher indices than their parents).
        for n in (0..t.children.len()).rev() {
            let mut v: Vec<u32> = t.leaf[n].flatten().into_iter().collect();
            for &(_, c) in &t.children[n] {
                v.extend_from_slice(&t.below[c as usize]);
            }
            v.sort_unstable();
            v.dedup();
            t.below[n] = v;
        }
        t
    }

    /// The child of `node` by `b`.
    pub fn child(&self, node: u32, b: u8) -> Option<u32> {
        self.children
            .get(node as usize)?
            .binary_search_by_key(&b, |e| e.0)
            .ok()
            .map(|i| self.children[node as usize][i].1)
    }
}

/// One declared object property.
#[derive(Debug, Clone)]
pub struct Prop {
    /// The key as JSON (quotes included).
    pub key: Vec<u8>,
    /// The value's node.
    pub node: NodeId,
    /// Whether the schema requires it.
    pub required: bool,
}

/// An object with declared properties, emitted in declaration order (optional ones may be
/// skipped); no other keys.
#[derive(Debug, Clone)]
pub struct ObjectNode {
    /// The properties in order.
    pub props: Vec<Prop>,
    /// Trie of the keys after the opening quote (closing quote included); payload = index.
    pub keys: LitTrie,
    /// `next_required[i]`: the first required property at index >= i (`props.len()`: none).
    pub next_required: Vec<u32>,
    /// Filled by [`Nodes::push`]: shortest completion from property i on (see `obj_tail`).
    pub tail: Vec<u32>,
}

/// A grammar node.
#[derive(Debug, Clone)]
pub enum Node {
    /// An object with declared properties.
    Object(ObjectNode),
    /// Any JSON object (free-form keys and values).
    AnyObject,
    /// An array of `item` with `min..=max` items.
    Array {
        /// Item node.
        item: NodeId,
        /// Fewest items.
        min: u32,
        /// Most items.
        max: Option<u32>,
    },
    /// Any JSON string.
    String,
    /// A JSON number (`integer`: no fraction or exponent).
    Number {
        /// Integers only.
        integer: bool,
    },
    /// One of a set of literal byte strings; a leaf's payload, if any, is the node that
    /// follows the literal.
    Lits(LitTrie),
    /// One of several nodes, chosen by the first byte (the first bytes are disjoint).
    AnyOf(Vec<NodeId>),
    /// Any JSON value (nesting bounded by [`MAX_STACK`]).
    AnyValue,
    /// Nodes one after another.
    Seq(Vec<NodeId>),
    /// `first`, then up to `max - 1` times `more`, at least `min` in all.
    Repeat {
        /// The first repetition.
        first: NodeId,
        /// Each later repetition (usually a separator then the item).
        more: NodeId,
        /// Fewest repetitions.
        min: u32,
        /// Most repetitions.
        max: u32,
    },
    /// Free text until `trigger` appears (at the start only, or `anywhere`), then `then`.
    Free {
        /// The trigger bytes (non-empty).
        trigger: Vec<u8>,
        /// KMP failure function of the trigger.
        fail: Vec<u16>,
        /// Whether the trigger may appear after other text.
        anywhere: bool,
        /// What follows the trigger.
        then: NodeId,
    },
}

/// The nodes of a grammar plus what the automaton precomputes about them.
#[derive(Debug, Clone)]
pub struct Nodes {
    pub(crate) nodes: Vec<Node>,
    /// Shortest complete text of each node, in bytes.
    pub(crate) min_len: Vec<u32>,
    /// First bytes each node can start with.
    pub(crate) first: Vec<[u64; 4]>,
    /// Whether the node can be empty.
    pub(crate) nullable: Vec<bool>,
    /// The shared free-form nodes used by `AnyValue`.
    pub(crate) any_value: NodeId,
    pub(crate) any_array: NodeId,
    pub(crate) any_object: NodeId,
    pub(crate) true_false_null: NodeId,
    pub(crate) string: NodeId,
    pub(crate) number: NodeId,
}

/// Byte set helpers.
pub(crate) fn set_has(s: &[u64; 4], b: u8) -> bool {
    s[(b >> 6) as usize] & (1 << (b & 63)) != 0
}
fn set_add(s: &mut [u64; 4], b: u8) {
    s[(b >> 6) as usize] |= 1 << (b & 63);
}
fn set_union(a: &mut [u64; 4], b: &[u64; 4]) {
    for i in 0..4 {
        a[i] |= b[i];
    }
}
pub(crate) fn set_intersects(a: &[u64; 4], b: &[u64; 4]) -> bool {
    (0..4).any(|i| a[i] & b[i] != 0)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// KMP failure function.
pub fn kmp_fail(p: &[u8]) -> Vec<u16> {
    let mut f = vec![0u16; p.len()];
    let mut k = 0usize;
    for i in 1..p.len() {
        while k > 0 && p[i] != p[k] {
            k = f[k - 1] as usize;
        }
        if p[i] == p[k] {
            k += 1;
        }
        f[i] = k as u16;
    }
    f
}

impl Nodes {
    /// An empty node table with the shared free-form nodes in place.
    pub fn new() -> Self {
        let mut n = Nodes {
            nodes: Vec::new(),
            min_len: Vec::new(),
            first: Vec::new(),
            nullable: Vec::new(),
            any_value: 0,
            any_array: 0,
            any_object: 0,
            true_false_null: 0,
            string: 0,
            number: 0,
        };
        n.any_value = n.push(Node::AnyValue);
        n.any_object = n.push(Node::AnyObject);
        n.string = n.push(Node::String);
        let any_value = n.any_value;
        n.any_array = n.push(Node::Array {
            item: any_value,
            min: 0,
            max: None,
        });
        n.true_false_null = n.push(Node::Lits(LitTrie::new(&[
            (b"true".to_vec(), None),
            (b"false".to_vec(), None),
            (b"null".to_vec(), None),
        ])));
        n.number = n.push(Node::Number { integer: false });
        n
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes (never: the shared ones are always there).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds a node whose children are already added; computes its summaries.
    pub fn push(&mut self, mut node: Node) -> NodeId {
        let id = self.nodes.len() as NodeId;
        if let Node::Object(o) = &mut node {
            // tail[i]: the required properties from index i, each with a leading comma, then `}`.
            let mut tail = vec![1u32; o.props.len() + 1];
            for i in (0..o.props.len()).rev() {
                let p = &o.props[i];
                tail[i] = tail[i + 1]
                    + if p.required {
                        1 + p.key.len() as u32 + 1 + self.min_len[p.node as usize]
                    } else {
                        0
                    };
            }
            o.tail = tail;
        }
        let (min, first, nullable) = self.summarize(&node);
        self.nodes.push(node);
        self.min_len.push(min);
        self.first.push(first);
        self.nullable.push(nullable);
        id
    }

    /// The node.
    pub fn get(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    fn summarize(&self, node: &Node) -> (u32, [u64; 4], bool) {
        let mut first = [0u64; 4];
        let one = |b: u8| {
            let mut s = [0u64; 4];
            set_add(&mut s, b);
            s
        };
        let digits_minus = || {
            let mut s = [0u64; 4];
            set_add(&mut s, b'-');
            for d in b'0'..=b'9' {
                set_add(&mut s, d);
            }
            s
        };
        match node {
            Node::Object(o) => {
                let mut min = 2u32;
                let mut n_req = 0;
                for p in o.props.iter().filter(|p| p.required) {
                    min += p.key.len() as u32 + 1 + self.min_len[p.node as usize];
                    n_req += 1;
                }
                min += (n_req as u32).saturating_sub(1);
                (min, one(b'{'), false)
            }
            Node::AnyObject => (2, one(b'{'), false),
            Node::Array { item, min, .. } => {
                let m = 2 + min * self.min_len[*item as usize] + min.saturating_sub(1);
                (m, one(b'['), false)
            }
            Node::String => (2, one(b'"'), false),
            Node::Number { .. } => (1, digits_minus(), false),
            Node::Lits(t) => {
                for &(b, _) in &t.children[0] {
                    set_add(&mut first, b);
                }
                let m = lit_min_rest(self, t, 0);
                let nullable =
                    t.leaf[0].is_some_and(|p| p.is_none_or(|c| self.nullable[c as usize]));
                (m, first, nullable)
            }
            Node::AnyOf(alts) => {
                let mut m = u32::MAX;
                let mut nullable = false;
                for &a in alts {
                    m = m.min(self.min_len[a as usize]);
                    set_union(&mut first, &self.first[a as usize]);
                    nullable |= self.nullable[a as usize];
                }
                (if alts.is_empty() { 0 } else { m }, first, nullable)
            }
            Node::AnyValue => {
                let mut s = digits_minus();
                for b in [b'{', b'[', b'"', b't', b'f', b'n'] {
                    set_add(&mut s, b);
                }
                (1, s, false)
            }
            Node::Seq(parts) => {
                let mut m = 0u32;
                let mut nullable = true;
                for &p in parts {
                    m = m.saturating_add(self.min_len[p as usize]);
                    if nullable {
                        set_union(&mut first, &self.first[p as usize]);
                        nullable = self.nullable[p as usize];
                    }
                }
                (m, first, nullable)
            }
            Node::Repeat {
                first: f,
                more,
                min,
                ..
            } => {
                let m = if *min == 0 {
                    0
                } else {
                    self.min_len[*f as usize] + (min - 1) * self.min_len[*more as usize]
                };
                (
                    m,
                    self.first[*f as usize],
                    *min == 0 || self.nullable[*f as usize],
                )
            }
            Node::Free { .. } => (0, [u64::MAX; 4], true),
        }
    }
}

impl Default for Nodes {
    fn default() -> Self {
        Self::new()
    }
}

/// Shortest number of bytes from trie node `n` to the end of a literal and its continuation.
fn lit_min_rest(nodes: &Nodes, t: &LitTrie, n: u32) -> u32 {
    // Literal tries are small; a DFS is fine.
    let mut best = u32::MAX;
    let mut stack = vec![(n, 0u32)];
    while let Some((x, d)) = stack.pop() {
        if let Some(p) = t.leaf[x as usize] {
            let cont = p.map_or(0, |c| nodes.min_len[c as usize]);
            best = best.min(d + cont);
        }
        for &(_, c) in &t.children[x as usize] {
            stack.push((c, d + 1));
        }
    }
    best
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ObjStage {
    AfterOpen,
    Key(u32),
    AfterKey,
    AfterColon,
    AfterValue,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ArrStage {
    First,
    AfterItem,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum NumStage {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// One frame of the matcher's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Frame {
    /// A value of this node starts with the next byte.
    Value(NodeId),
    Obj {
        node: NodeId,
        next: u32,
        cur: u32,
        stage: ObjStage,
    },
    AnyObj {
        stage: ObjStage,
    },
    Arr {
        node: NodeId,
        count: u32,
        stage: ArrStage,
    },
    /// Inside a string: `esc` 0 plain, 1 after `\`, 2..=5 = 4..=1 hex digits to go;
    /// `utf8` continuation bytes to go, the next one in `lo..=hi` (RFC 3629: no overlong
    /// forms, no surrogates, nothing above U+10FFFF).
    Str {
        esc: u8,
        utf8: u8,
        lo: u8,
        hi: u8,
    },
    Num {
        integer: bool,
        stage: NumStage,
        digits: u8,
    },
    Lit {
        node: NodeId,
        pos: u32,
    },
    Seq {
        node: NodeId,
        idx: u32,
    },
    Rep {
        node: NodeId,
        count: u32,
    },
    Free {
        node: NodeId,
        matched: u16,
        diverged: bool,
    },
}

const STR_START: Frame = Frame::Str {
    esc: 0,
    utf8: 0,
    lo: 0x80,
    hi: 0xBF,
};

/// The matcher state: the frame stack and the current whitespace run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    pub(crate) frames: Vec<Frame>,
    pub(crate) ws: u8,
}

enum Act {
    Ws,
    Eat,
    EatPop,
    EatPush(Frame),
    EatReplace(Frame),
    Push(Frame),
    Replace(Frame),
    PopRetry,
    Reject,
}

impl Nodes {
    /// The state before any byte of `root`.
    pub fn start(&self, root: NodeId) -> State {
        State {
            frames: vec![Frame::Value(root)],
            ws: 0,
        }
    }

    /// Advances `st` by one byte; `false` (and `st` unspecified) when the byte is not allowed.
    pub fn step(&self, st: &mut State, b: u8) -> bool {
        for _ in 0..4 * MAX_STACK {
            let depth = st.frames.len();
            let Some(top) = st.frames.last_mut() else {
                return false;
            };
            match self.frame_step(top, b, depth) {
                Act::Ws => {
                    if st.ws >= MAX_WS {
                        return false;
                    }
                    st.ws += 1;
                    return true;
                }
                Act::Eat => {
                    st.ws = 0;
                    return true;
                }
                Act::EatPop => {
                    st.frames.pop();
                    st.ws = 0;
                    return true;
                }
                Act::EatPush(f) => {
                    if depth >= MAX_STACK {
                        return false;
                    }
                    st.frames.push(f);
                    st.ws = 0;
                    return true;
                }
                Act::EatReplace(f) => {
                    *top = f;
                    st.ws = 0;
                    return true;
                }
                Act::Push(f) => {
                    if depth >= MAX_STACK {
                        return false;
                    }
                    st.frames.push(f);
                }
                Act::Replace(f) => *top = f,
                Act::PopRetry => {
                    st.frames.pop();
                }
                Act::Reject => return false,
            }
        }
        false
    }

    /// Advances by every byte of `bytes`.
    pub fn step_bytes(&self, st: &mut State, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.step(st, b))
    }

    fn frame_step(&self, f: &mut Frame, b: u8, depth: usize) -> Act {
        match f {
            Frame::Value(node) => self.value_step(*node, b, depth),
            Frame::Obj {
                node,
                next,
                cur,
                stage,
            } => {
                let Node::Object(o) = self.get(*node) else {
                    return Act::Reject;
                };
                let n = o.props.len() as u32;
                let no_required_left = o.next_required.get(*next as usize).is_none_or(|&r| r >= n);
                match *stage {
                    _ if is_ws(b) && !matches!(stage, ObjStage::Key(_)) => Act::Ws,
                    ObjStage::AfterOpen => match b {
                        b'}' if no_required_left => Act::EatPop,
                        b'"' if *next < n => {
                            *stage = ObjStage::Key(0);
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                    ObjStage::Key(pos) => {
                        let lo = *next;
                        let hi = o
                            .next_required
                            .get(*next as usize)
                            .copied()
                            .unwrap_or(n)
                            .min(n.saturating_sub(1));
                        let Some(c) = o.keys.child(pos, b) else {
                            return Act::Reject;
                        };
                        let below = &o.keys.below[c as usize];
                        let i = below.partition_point(|&x| x < lo);
                        if below.get(i).is_none_or(|&x| x > hi) {
                            return Act::Reject;
                        }
                        match o.keys.leaf[c as usize] {
                            Some(Some(idx)) if idx >= lo && idx <= hi => {
                                *cur = idx;
                                *next = idx + 1;
                                *stage = ObjStage::AfterKey;
                            }
                            _ => *stage = ObjStage::Key(c),
                        }
                        Act::Eat
                    }
                    ObjStage::AfterKey => match b {
                        b':' => {
                            *stage = ObjStage::AfterColon;
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                    ObjStage::AfterColon => {
                        *stage = ObjStage::AfterValue;
                        Act::Push(Frame::Value(o.props[*cur as usize].node))
                    }
                    ObjStage::AfterValue => match b {
                        b',' if *next < n => {
                            *stage = ObjStage::AfterComma;
                            Act::Eat
                        }
                        b'}' if no_required_left => Act::EatPop,
                        _ => Act::Reject,
                    },
                    ObjStage::AfterComma => match b {
                        b'"' => {
                            *stage = ObjStage::Key(0);
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                }
            }
            Frame::AnyObj { stage } => {
                if is_ws(b) {
                    return Act::Ws;
                }
                match (*stage, b) {
                    (ObjStage::AfterOpen, b'}') | (ObjStage::AfterValue, b'}') => Act::EatPop,
                    (ObjStage::AfterOpen, b'"') | (ObjStage::AfterComma, b'"') => {
                        *stage = ObjStage::AfterKey;
                        Act::EatPush(STR_START)
                    }
                    (ObjStage::AfterKey, b':') => {
                        *stage = ObjStage::AfterColon;
                        Act::Eat
                    }
                    (ObjStage::AfterColon, _) => {
                        *stage = ObjStage::AfterValue;
                        Act::Push(Frame::Value(self.any_value))
                    }
                    (ObjStage::AfterValue, b',') => {
                        *stage = ObjStage::AfterComma;
                        Act::Eat
                    }
                    _ => Act::Reject,
                }
            }
            Frame::Arr { node, count, stage } => {
                let Node::Array { item, min, max } = self.get(*node) else {
                    return Act::Reject;
                };
                if is_ws(b) {
                    return Act::Ws;
                }
                match *stage {
                    ArrStage::First => match b {
                        b']' if *min == 0 => Act::EatPop,
                        b']' => Act::Reject,
                        _ if *max == Some(0) => Act::Reject,
                        _ => {
                            *count = 1;
                            *stage = ArrStage::AfterItem;
                            Act::Push(Frame::Value(*item))
                        }
                    },
                    ArrStage::AfterItem => match b {
                        b',' if max.is_none_or(|m| *count < m) => {
                            *stage = ArrStage::AfterComma;
                            Act::Eat
                        }
                        b']' if *count >= *min => Act::EatPop,
                        _ => Act::Reject,
                    },
                    ArrStage::AfterComma => {
                        *count += 1;
                        *stage = ArrStage::AfterItem;
                        Act::Push(Frame::Value(*item))
                    }
                }
            }
            Frame::Str { esc, utf8, lo, hi } => {
                if *utf8 > 0 {
                    return if (*lo..=*hi).contains(&b) {
                        *utf8 -= 1;
                        *lo = 0x80;
                        *hi = 0xBF;
                        Act::Eat
                    } else {
                        Act::Reject
                    };
                }
                match *esc {
                    0 => match b {
                        b'"' => Act::EatPop,
                        b'\\' => {
                            *esc = 1;
                            Act::Eat
                        }
                        0x00..=0x1F => Act::Reject,
                        0x20..=0x7F => Act::Eat,
                        0xC2..=0xF4 => {
                            let (n, l, h) = match b {
                                0xC2..=0xDF => (1, 0x80, 0xBF),
                                0xE0 => (2, 0xA0, 0xBF),
                                0xED => (2, 0x80, 0x9F),
                                0xE1..=0xEF => (2, 0x80, 0xBF),
                                0xF0 => (3, 0x90, 0xBF),
                                0xF4 => (3, 0x80, 0x8F),
                                _ => (3, 0x80, 0xBF),
                            };
                            *utf8 = n;
                            *lo = l;
                            *hi = h;
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                    1 => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            *esc = 0;
                            Act::Eat
                        }
                        b'u' => {
                            *esc = 2;
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                    e => {
                        if b.is_ascii_hexdigit() {
                            *esc = if e >= 5 { 0 } else { e + 1 };
                            Act::Eat
                        } else {
                            Act::Reject
                        }
                    }
                }
            }
            Frame::Num {
                integer,
                stage,
                digits,
            } => {
                let digit = b.is_ascii_digit();
                let integer = *integer;
                match *stage {
                    NumStage::Minus => match b {
                        // `-0` is a float to some parsers: not an integer.
                        b'0' if !integer => {
                            *stage = NumStage::Zero;
                            Act::Eat
                        }
                        b'1'..=b'9' => {
                            *stage = NumStage::Int;
                            *digits = 1;
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                    NumStage::Zero | NumStage::Int => {
                        if digit && *stage == NumStage::Int && *digits < MAX_INT_DIGITS {
                            *digits += 1;
                            Act::Eat
                        } else if b == b'.' && !integer {
                            *stage = NumStage::Dot;
                            *digits = 0;
                            Act::Eat
                        } else if (b == b'e' || b == b'E') && !integer {
                            *stage = NumStage::Exp;
                            *digits = 0;
                            Act::Eat
                        } else if digit {
                            Act::Reject
                        } else {
                            Act::PopRetry
                        }
                    }
                    NumStage::Dot => {
                        if digit {
                            *stage = NumStage::Frac;
                            *digits = 1;
                            Act::Eat
                        } else {
                            Act::Reject
                        }
                    }
                    NumStage::Frac => {
                        if digit && *digits < MAX_FRAC_DIGITS {
                            *digits += 1;
                            Act::Eat
                        } else if b == b'e' || b == b'E' {
                            *stage = NumStage::Exp;
                            *digits = 0;
                            Act::Eat
                        } else if digit {
                            Act::Reject
                        } else {
                            Act::PopRetry
                        }
                    }
                    NumStage::Exp => match b {
                        b'+' | b'-' => {
                            *stage = NumStage::ExpSign;
                            Act::Eat
                        }
                        _ if digit => {
                            *stage = NumStage::ExpDigits;
                            *digits = 1;
                            Act::Eat
                        }
                        _ => Act::Reject,
                    },
                    NumStage::ExpSign => {
                        if digit {
                            *stage = NumStage::ExpDigits;
                            *digits = 1;
                            Act::Eat
                        } else {
                            Act::Reject
                        }
                    }
                    NumStage::ExpDigits => {
                        if digit && *digits < MAX_EXP_DIGITS {
                            *digits += 1;
                            Act::Eat
                        } else if digit {
                            Act::Reject
                        } else {
                            Act::PopRetry
                        }
                    }
                }
            }
            Frame::Lit { node, pos } => {
                let Node::Lits(t) = self.get(*node) else {
                    return Act::Reject;
                };
                if let Some(c) = t.child(*pos, b) {
                    if t.children[c as usize].is_empty() {
                        return match t.leaf[c as usize] {
                            Some(Some(cont)) => Act::EatReplace(Frame::Value(cont)),
                            _ => Act::EatPop,
                        };
                    }
                    *pos = c;
                    return Act::Eat;
                }
                match t.leaf[*pos as usize] {
                    Some(Some(cont)) => Act::Replace(Frame::Value(cont)),
                    Some(None) => Act::PopRetry,
                    None => Act::Reject,
                }
            }
            Frame::Seq { node, idx } => {
                let Node::Seq(parts) = self.get(*node) else {
                    return Act::Reject;
                };
                match parts.get(*idx as usize) {
                    Some(&p) => {
                        *idx += 1;
                        Act::Push(Frame::Value(p))
                    }
                    None => Act::PopRetry,
                }
            }
            Frame::Rep { node, count } => {
                let Node::Repeat {
                    first,
                    more,
                    min,
                    max,
                } = self.get(*node)
                else {
                    return Act::Reject;
                };
                let next = if *count == 0 { *first } else { *more };
                if *count < *max && set_has(&self.first[next as usize], b) {
                    *count += 1;
                    Act::Push(Frame::Value(next))
                } else if *count >= *min {
                    Act::PopRetry
                } else {
                    Act::Reject
                }
            }
            Frame::Free {
                node,
                matched,
                diverged,
            } => {
                let Node::Free {
                    trigger,
                    fail,
                    anywhere,
                    then,
                } = self.get(*node)
                else {
                    return Act::Reject;
                };
                if *diverged {
                    return Act::Eat;
                }
                let mut k = *matched as usize;
                if *anywhere {
                    while k > 0 && trigger[k] != b {
                        k = fail[k - 1] as usize;
                    }
                    if trigger[k] == b {
                        k += 1;
                    }
                } else if trigger[k] == b {
                    k += 1;
                } else {
                    *diverged = true;
                    return Act::Eat;
                }
                if k == trigger.len() {
                    return Act::EatReplace(Frame::Value(*then));
                }
                *matched = k as u16;
                Act::Eat
            }
        }
    }

    fn value_step(&self, node: NodeId, b: u8, depth: usize) -> Act {
        match self.get(node) {
            Node::Object(_) => match b {
                b'{' => Act::EatReplace(Frame::Obj {
                    node,
                    next: 0,
                    cur: 0,
                    stage: ObjStage::AfterOpen,
                }),
                _ => Act::Reject,
            },
            Node::AnyObject => match b {
                b'{' if depth < MAX_STACK - 2 => Act::EatReplace(Frame::AnyObj {
                    stage: ObjStage::AfterOpen,
                }),
                _ => Act::Reject,
            },
            Node::Array { .. } => match b {
                b'[' if depth < MAX_STACK - 2 => Act::EatReplace(Frame::Arr {
                    node,
                    count: 0,
                    stage: ArrStage::First,
                }),
                _ => Act::Reject,
            },
            Node::String => match b {
                b'"' => Act::EatReplace(STR_START),
                _ => Act::Reject,
            },
            Node::Number { integer } => {
                let integer = *integer;
                match b {
                    b'-' => Act::EatReplace(Frame::Num {
                        integer,
                        stage: NumStage::Minus,
                        digits: 0,
                    }),
                    b'0' => Act::EatReplace(Frame::Num {
                        integer,
                        stage: NumStage::Zero,
                        digits: 0,
                    }),
                    b'1'..=b'9' => Act::EatReplace(Frame::Num {
                        integer,
                        stage: NumStage::Int,
                        digits: 1,
                    }),
                    _ => Act::Reject,
                }
            }
            Node::Lits(_) => Act::Replace(Frame::Lit { node, pos: 0 }),
            Node::AnyOf(alts) => alts
                .iter()
                .find(|&&a| set_has(&self.first[a as usize], b))
                .map_or(Act::Reject, |&a| Act::Replace(Frame::Value(a))),
            Node::AnyValue => match b {
                b'{' => Act::Replace(Frame::Value(self.any_object)),
                b'[' => Act::Replace(Frame::Value(self.any_array)),
                b'"' => Act::Replace(Frame::Value(self.string)),
                b'-' | b'0'..=b'9' => Act::Replace(Frame::Value(self.number)),
                b't' | b'f' | b'n' => Act::Replace(Frame::Value(self.true_false_null)),
                _ => Act::Reject,
            },
            Node::Seq(_) => Act::Replace(Frame::Seq { node, idx: 0 }),
            Node::Repeat { .. } => Act::Replace(Frame::Rep { node, count: 0 }),
            Node::Free { .. } => Act::Replace(Frame::Free {
                node,
                matched: 0,
                diverged: false,
            }),
        }
    }

    /// Whether the text so far is a complete match (generation may stop here).
    pub fn is_accepting(&self, st: &State) -> bool {
        st.frames.iter().all(|f| self.frame_complete(f))
    }

    /// Whether nothing more can follow (only a stop token).
    pub fn is_terminal(&self, st: &State) -> bool {
        st.frames.is_empty()
    }

    fn frame_complete(&self, f: &Frame) -> bool {
        match f {
            Frame::Value(n) => self.nullable[*n as usize],
            Frame::Obj { .. } | Frame::AnyObj { .. } | Frame::Arr { .. } | Frame::Str { .. } => {
                false
            }
            Frame::Num { stage, .. } => matches!(
                stage,
                NumStage::Zero | NumStage::Int | NumStage::Frac | NumStage::ExpDigits
            ),
            Frame::Lit { node, pos } => match self.get(*node) {
                Node::Lits(t) => t.leaf[*pos as usize]
                    .is_some_and(|p| p.is_none_or(|c| self.nullable[c as usize])),
                _ => false,
            },
            Frame::Seq { node, idx } => match self.get(*node) {
                Node::Seq(parts) => parts[(*idx as usize).min(parts.len())..]
                    .iter()
                    .all(|&p| self.nullable[p as usize]),
                _ => false,
            },
            Frame::Rep { node, count } => match self.get(*node) {
                Node::Repeat { min, .. } => count >= min,
                _ => false,
            },
            Frame::Free { .. } => true,
        }
    }

    /// Bytes of the shortest text that takes `st` to an accepting state.
    pub fn dist(&self, st: &State) -> u32 {
        st.frames
            .iter()
            .map(|f| self.frame_rest(f))
            .fold(0u32, u32::saturating_add)
    }

    /// Shortest completion of an object's remaining properties: `tail(i)` = the required
    /// properties from index i, each with a leading comma, then `}`.
    fn obj_tail(&self, o: &ObjectNode, from: u32) -> u32 {
        o.tail.get(from as usize).copied().unwrap_or(1)
    }

    fn frame_rest(&self, f: &Frame) -> u32 {
        match f {
            Frame::Value(n) => self.min_len[*n as usize],
            Frame::Obj {
                node,
                next,
                cur,
                stage,
            } => {
                let Node::Object(o) = self.get(*node) else {
                    return 0;
                };
                let n = o.props.len() as u32;
                let has_req = o.next_required.get(*next as usize).is_some_and(|&r| r < n);
                match *stage {
                    ObjStage::AfterOpen => self.obj_tail(o, *next) - u32::from(has_req),
                    ObjStage::AfterValue => self.obj_tail(o, *next),
                    ObjStage::AfterKey => {
                        1 + self.min_len[o.props[*cur as usize].node as usize]
                            + self.obj_tail(o, *next)
                    }
                    ObjStage::AfterColon => {
                        self.min_len[o.props[*cur as usize].node as usize] + self.obj_tail(o, *next)
                    }
                    ObjStage::AfterComma | ObjStage::Key(_) => {
                        let (pos, consumed) = match *stage {
                            ObjStage::Key(p) => (p, o.keys.depth[p as usize] + 1),
                            _ => (0, 0),
                        };
                        let hi = o
                            .next_required
                            .get(*next as usize)
                            .copied()
                            .unwrap_or(n)
                            .min(n.saturating_sub(1));
                        o.keys.below[pos as usize]
                            .iter()
                            .filter(|&&j| j >= *next && j <= hi)
                            .map(|&j| {
                                let p = &o.props[j as usize];
                                (p.key.len() as u32).saturating_sub(consumed)
                                    + 1
                                    + self.min_len[p.node as usize]
                                    + self.obj_tail(o, j + 1)
                            })
                            .min()
                            .unwrap_or(u32::MAX / 4)
                    }
                }
            }
            Frame::AnyObj { stage } => match stage {
                ObjStage::AfterOpen | ObjStage::AfterValue => 1,
                ObjStage::AfterKey => 3,
                ObjStage::AfterColon => 2,
                ObjStage::AfterComma | ObjStage::Key(_) => 5,
            },
            Frame::Arr { node, count, stage } => {
                let Node::Array { item, min, .. } = self.get(*node) else {
                    return 0;
                };
                let il = self.min_len[*item as usize];
                match stage {
                    ArrStage::First => {
                        if *min == 0 {
                            1
                        } else {
                            min * il + (min - 1) + 1
                        }
                    }
                    ArrStage::AfterItem => min.saturating_sub(*count) * (1 + il) + 1,
                    ArrStage::AfterComma => il + min.saturating_sub(count + 1) * (1 + il) + 1,
                }
            }
            Frame::Str { esc, utf8, .. } => {
                let e = match *esc {
                    0 => 0,
                    1 => 1,
                    e => 6 - u32::from(e),
                };
                e + u32::from(*utf8) + 1
            }
            Frame::Num { stage, .. } => match stage {
                NumStage::Zero | NumStage::Int | NumStage::Frac | NumStage::ExpDigits => 0,
                NumStage::Minus | NumStage::Dot | NumStage::Exp | NumStage::ExpSign => 1,
            },
            Frame::Lit { node, pos } => match self.get(*node) {
                Node::Lits(t) => lit_min_rest(self, t, *pos),
                _ => 0,
            },
            Frame::Seq { node, idx } => match self.get(*node) {
                Node::Seq(parts) => parts[(*idx as usize).min(parts.len())..]
                    .iter()
                    .map(|&p| self.min_len[p as usize])
                    .sum(),
                _ => 0,
            },
            Frame::Rep { node, count } => match self.get(*node) {
                Node::Repeat {
                    first, more, min, ..
                } => {
                    if *count >= *min {
                        0
                    } else if *count == 0 {
                        self.min_len[*first as usize] + (min - 1) * self.min_len[*more as usize]
                    } else {
                        (min - count) * self.min_len[*more as usize]
                    }
                }
                _ => 0,
            },
            Frame::Free { .. } => 0,
        }
    }
}
