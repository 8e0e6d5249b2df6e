//! GGUF v3 reader and writer.
//!
//! The reader works over a byte slice (usually a memory map of the model file) and never trusts
//! the file: every count, size and offset is checked against the bytes actually present before
//! anything is allocated or sliced, so a hostile file yields [`GgufError`], never a panic or a
//! huge allocation. Tensor data is not copied: [`Gguf::tensor_data`] returns a sub-slice.
//!
//! Layout (all little endian): magic `GGUF`, `u32` version (2 or 3 accepted), `u64` tensor count,
//! `u64` metadata count, the metadata key/value pairs, the tensor infos (name, `u32` n_dims,
//! `n_dims` x `u64` dims with `dims[0]` the contiguous one, `u32` type, `u64` offset relative to
//! the data section), padding to `general.alignment` (default 32), then the data section.
//!
//! [`GgufWriter`] produces such files; it is used by tests and by [`crate::synthetic`].

use std::collections::BTreeMap;

/// Default alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// File magic.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Nesting limit for array values (arrays of arrays of ...).
const MAX_ARRAY_DEPTH: usize = 4;
/// Dimension count limit for one tensor (ggml supports 4).
const MAX_DIMS: u32 = 4;

/// Errors from parsing a GGUF file.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GgufError {
    /// The file ended before a structure was complete.
    #[error(
        "GGUF file truncated at byte {offset} while reading {what}; the file is incomplete or corrupt: download it again"
    )]
    Truncated {
        /// Offset where the read was attempted.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// Wrong magic bytes.
    #[error("not a GGUF file (magic {0:02x?} instead of \"GGUF\"); pass a .gguf model file")]
    BadMagic([u8; 4]),
    /// Version other than 2 or 3.
    #[error(
        "unsupported GGUF version {0}; only versions 2 and 3 are supported: convert the model with a current llama.cpp"
    )]
    UnsupportedVersion(u32),
    /// Structurally invalid content.
    #[error("invalid GGUF file: {0}")]
    Invalid(String),
    /// A ggml type id that this crate does not know.
    #[error("unknown ggml tensor type id {0}")]
    UnknownType(u32),
}

/// A ggml tensor element type. Only some are computable by this crate
/// (see [`GgmlType::is_supported`]); the others are recognised so errors can name them.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 32 x 4-bit, one f16 scale: `x = (q - 8) * d`.
    Q4_0,
    /// 32 x 4-bit, f16 scale and min: `x = q * d + m`.
    Q4_1,
    /// 5-bit (unsupported).
    Q5_0,
    /// 5-bit with min (unsupported).
    Q5_1,
    /// 32 x i8, one f16 scale: `x = q * d`.
    Q8_0,
    /// 8-bit with sum (activation format; unsupported as a weight type).
    Q8_1,
    /// K-quant (unsupported).
    Q2_K,
    /// K-quant (unsupported).
    Q3_K,
    /// K-quant (256-element super-blocks, see [`crate::quant`]).
    Q4_K,
    /// K-quant (256-element super-blocks, see [`crate::quant`]).
    Q5_K,
    /// K-quant (256-element super-blocks, see [`crate::quant`]).
    Q6_K,
    /// K-quant (256-element super-blocks, see [`crate::quant`]).
    Q8_K,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// Maps a ggml type id to the enum.
    pub fn from_id(id: u32) -> Result<Self, GgufError> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            other => return Err(GgufError::UnknownType(other)),
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
        }
    }

    /// Whether this crate can compute with tensors of this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q8_0
                | Self::Q4_K
                | Self::Q5_K
                | Self::Q6_K
                | Self::Q8_K
        )
    }

    /// Bytes needed for `n_elements` elements; `None` if not a whole number of blocks or overflow.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.block_bytes())
    }

    /// Canonical upper-case name (as llama.cpp prints it).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
            Self::BF16 => "BF16",
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GgmlType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let all = [
            Self::F32,
            Self::F16,
            Self::BF16,
            Self::Q4_0,
            Self::Q4_1,
            Self::Q8_0,
            Self::Q4_K,
            Self::Q5_K,
            Self::Q6_K,
        ];
        all.into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown or unsupported type {s:?}; use one of F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K"
                )
            })
    }
}

/// GGUF metadata value type ids.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `f32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced lossily).
    String(String),
    /// Homogeneous array.
    Array(Vec<Value>),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f64`
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => vt::U8,
            Value::I8(_) => vt::I8,
            Value::U16(_) => vt::U16,
            Value::I16(_) => vt::I16,
            Value::U32(_) => vt::U32,
            Value::I32(_) => vt::I32,
            Value::F32(_) => vt::F32,
            Value::Bool(_) => vt::BOOL,
            Value::String(_) => vt::STRING,
            Value::Array(_) => vt::ARRAY,
            Value::U64(_) => vt::U64,
            Value::I64(_) => vt::I64,
            Value::F64(_) => vt::F64,
        }
    }

    /// Integer value as u64 (any integer type, non-negative).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Integer value as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Float value (f32/f64, or integer converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// String value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description from the file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, `dims[0]` contiguous (ggml `ne`).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data relative to the data section (validated: aligned, in bounds).
    pub offset: u64,
    /// Size of the data in bytes (validated).
    pub size: u64,
}

impl TensorInfo {
    /// Total element count.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file borrowing its bytes (all of them, or only the header: see
/// [`Gguf::parse_header`]).
#[derive(Debug, Clone)]
pub struct Gguf<'a> {
    data: &'a [u8],
    /// Length of the whole file (= `data.len()` unless only the header was given).
    file_len: u64,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, sorted by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment.
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Length of the whole file; `buf` may be only its beginning.
    file_len: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let truncated = GgufError::Truncated {
            offset: self.pos as u64,
            what,
        };
        let n = usize::try_from(n).map_err(|_| truncated.clone())?;
        let end = self.pos.checked_add(n).ok_or_else(|| truncated.clone())?;
        let s = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(s)
    }
    /// Bytes of the file after the read position (what the file can still hold, even when
    /// `buf` is only its beginning).
    fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos as u64)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            vt::U8 => Value::U8(self.arr::<1>(W)?[0]),
            vt::I8 => Value::I8(i8::from_le_bytes(self.arr(W)?)),
            vt::U16 => Value::U16(u16::from_le_bytes(self.arr(W)?)),
            vt::I16 => Value::I16(i16::from_le_bytes(self.arr(W)?)),
            vt::U32 => Value::U32(u32::from_le_bytes(self.arr(W)?)),
            vt::I32 => Value::I32(i32::from_le_bytes(self.arr(W)?)),
            vt::F32 => Value::F32(f32::from_le_bytes(self.arr(W)?)),
            vt::BOOL => match self.arr::<1>(W)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Invalid(format!("bool value {b} is not 0 or 1"))),
            },
            vt::STRING => Value::String(self.string("metadata string")?),
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Invalid("arrays nested too deeply".into()));
                }
                let elem_ty = self.u32("array element type")?;
                let count = self.u64("array length")?;
                let min_size = match elem_ty {
                    vt::U8 | vt::I8 | vt::BOOL => 1,
                    vt::U16 | vt::I16 => 2,
                    vt::U32 | vt::I32 | vt::F32 => 4,
                    vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
                    vt::ARRAY => 12,
                    other => {
                        return Err(GgufError::Invalid(format!(
                            "unknown metadata value type {other}"
                        )));
                    }
                };
                // Each element needs at least `min_size` bytes: refuse counts the file cannot hold
                // before allocating anything.
                if count > self.remaining() / min_size {
                    return Err(GgufError::Truncated {
                        offset: self.pos as u64,
                        what: "array elements",
                    });
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(v)
            }
            vt::U64 => Value::U64(u64::from_le_bytes(self.arr(W)?)),
            vt::I64 => Value::I64(i64::from_le_bytes(self.arr(W)?)),
            vt::F64 => Value::F64(f64::from_le_bytes(self.arr(W)?)),
            other => {
                return Err(GgufError::Invalid(format!(
                    "unknown metadata value type {other}"
                )));
            }
        })
    }
}

impl<'a> Gguf<'a> {
    /// Parses and validates a whole GGUF file.
    pub fn parse(data: &'a [u8]) -> Result<Self, GgufError> {
        Self::parse_impl(data, data.len() as u64)
    }

    /// Parses the header (metadata and tensor infos) from the first bytes of a file of
    /// `file_len` bytes, validating every tensor's extent against `file_len`. The tensor data is
    /// not available: [`Gguf::tensor_data`] returns empty slices and the caller reads each
    /// tensor at [`Gguf::tensor_file_offset`] itself (streamed loading, e.g. from a dm-verity
    /// device). A prefix that ends inside the header gives [`GgufError::Truncated`]: read more and
    /// try again.
    pub fn parse_header(prefix: &'a [u8], file_len: u64) -> Result<Self, GgufError> {
        if prefix.len() as u64 > file_len {
            return Err(GgufError::Invalid(format!(
                "header prefix of {} bytes is longer than the {file_len}-byte file",
                prefix.len()
            )));
        }
        Self::parse_impl(prefix, file_len)
    }

    fn parse_impl(data: &'a [u8], file_len: u64) -> Result<Self, GgufError> {
        let mut r = Reader {
            buf: data,
            pos: 0,
            file_len,
        };
        let magic = r.arr::<4>("magic")?;
        if &magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // A KV pair needs at least 8 (key len) + 4 (type) + 1 bytes; a tensor info at least 8 + 4 + 4 + 8.
        if n_kv > r.remaining() / 13 {
            return Err(GgufError::Invalid(format!(
                "metadata count {n_kv} exceeds what the file can hold"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Invalid(format!(
                    "duplicate metadata key {key:?}"
                )));
            }
        }
        if n_tensors > r.remaining() / 24 {
            return Err(GgufError::Invalid(format!(
                "tensor count {n_tensors} exceeds what the file can hold"
            )));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(GgufError::Invalid(format!(
                        "general.alignment {v:?} is not a power of two up to 1 MiB"
                    )));
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Invalid(format!(
                    "tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let ty_id = r.u32("tensor type")?;
            let ty = GgmlType::from_id(ty_id).map_err(|_| {
                GgufError::Invalid(format!("tensor {name:?} has unknown ggml type id {ty_id}"))
            })?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, ty, offset));
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_len = file_len.saturating_sub(data_offset);
        if data_offset > file_len && n_tensors > 0 {
            return Err(GgufError::Truncated {
                offset: file_len,
                what: "tensor data section",
            });
        }
        let mut tensors = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, ty, offset) in raw {
            let n = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| GgufError::Invalid(format!("tensor {name:?} dims overflow")))?;
            if dims[0] % ty.block_size() != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name:?}: first dimension {} is not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_size()
                )));
            }
            let size = ty
                .bytes_for(n)
                .ok_or_else(|| GgufError::Invalid(format!("tensor {name:?} size overflows")))?;
            if offset % alignment != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name:?} offset {offset} is not aligned to {alignment}"
                )));
            }
            match offset.checked_add(size) {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(GgufError::Invalid(format!(
                        "tensor {name:?} (offset {offset}, {size} bytes) extends past the end of the file ({data_len} data bytes); the file is truncated or corrupt"
                    )));
                }
            }
            if !names.insert(name.clone()) {
                return Err(GgufError::Invalid(format!(
                    "duplicate tensor name {name:?}"
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        Ok(Gguf {
            data,
            file_len,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The bytes of one tensor (bounds were validated by [`Gguf::parse`]); empty when only the
    /// header was parsed ([`Gguf::parse_header`]).
    pub fn tensor_data(&self, info: &TensorInfo) -> &'a [u8] {
        if self.is_header_only() {
            return &[];
        }
        let start = self.data_offset.saturating_add(info.offset);
        let end = start.saturating_add(info.size);
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| self.data.get(s..e))
            .unwrap_or(&[])
    }

    /// Whether only the header was parsed (the tensor data must be read by the caller).
    pub fn is_header_only(&self) -> bool {
        self.data.len() as u64 != self.file_len
    }

    /// Length of the whole file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Absolute byte offset of a tensor's data in the file.
    pub fn tensor_file_offset(&self, info: &TensorInfo) -> u64 {
        self.data_offset.saturating_add(info.offset)
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// An unsigned integer metadata value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// A float metadata value.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
}

/// Builds a GGUF v3 file in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    alignment: Option<u64>,
}

impl GgufWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a non-default alignment (also written as `general.alignment`).
    pub fn alignment(&mut self, a: u64) -> &mut Self {
        self.alignment = Some(a);
        self.kv("general.alignment", Value::U32(a as u32))
    }

    /// Adds (or replaces) a metadata pair.
    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self.kvs.push((key.to_owned(), value));
        self
    }

    /// Adds a tensor; `data` must be exactly `ty.bytes_for(product(dims))` bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_owned(), dims.to_vec(), ty, data));
        self
    }

    /// Serialises the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment.unwrap_or(DEFAULT_ALIGNMENT) as usize;
        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            write_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            write_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            write_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            let elem_ty = a.first().map_or(vt::U8, Value::type_id);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for e in a {
                write_value(out, e);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::String("llama".into()))
            .kv("a.u8", Value::U8(7))
            .kv("a.i8", Value::I8(-7))
            .kv("a.u16", Value::U16(700))
            .kv("a.i16", Value::I16(-700))
            .kv("a.u32", Value::U32(70000))
            .kv("a.i32", Value::I32(-70000))
            .kv("a.f32", Value::F32(1.5))
            .kv("a.bool", Value::Bool(true))
            .kv("a.u64", Value::U64(1 << 40))
            .kv("a.i64", Value::I64(-(1 << 40)))
            .kv("a.f64", Value::F64(2.25))
            .kv(
                "a.arr",
                Value::Array(vec![Value::String("x".into()), Value::String("yz".into())]),
            )
            .kv(
                "a.nested",
                Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(2)])]),
            );
        w.tensor(
            "t0",
            &[4, 2],
            GgmlType::F32,
            (0..32).map(|i| i as u8).collect(),
        );
        w.tensor("t1", &[32], GgmlType::Q8_0, vec![9u8; 34]);
        w.to_bytes()
    }

    #[test]
    fn round_trip_all_value_types_and_tensors() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.alignment, 32);
        assert_eq!(g.data_offset % 32, 0);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get("a.u8"), Some(&Value::U8(7)));
        assert_eq!(g.get("a.i8"), Some(&Value::I8(-7)));
        assert_eq!(g.get("a.u16"), Some(&Value::U16(700)));
        assert_eq!(g.get("a.i16"), Some(&Value::I16(-700)));
        assert_eq!(g.get_u64("a.u32"), Some(70000));
        assert_eq!(g.get("a.i32").unwrap().as_i64(), Some(-70000));
        assert_eq!(g.get_f64("a.f32"), Some(1.5));
        assert_eq!(g.get("a.bool").unwrap().as_bool(), Some(true));
        assert_eq!(g.get_u64("a.u64"), Some(1 << 40));
        assert_eq!(g.get("a.i64").unwrap().as_i64(), Some(-(1 << 40)));
        assert_eq!(g.get_f64("a.f64"), Some(2.25));
        assert_eq!(g.get("a.arr").unwrap().as_array().unwrap().len(), 2);
        assert_eq!(
            g.get("a.nested"),
            Some(&Value::Array(vec![Value::Array(vec![
                Value::I32(1),
                Value::I32(2)
            ])]))
        );
        let t0 = g.tensor("t0").unwrap();
        assert_eq!(t0.dims, vec![4, 2]);
        assert_eq!(t0.ty, GgmlType::F32);
        assert_eq!(
            g.tensor_data(t0),
            &(0..32).map(|i| i as u8).collect::<Vec<_>>()[..]
        );
        let t1 = g.tensor("t1").unwrap();
        assert_eq!(t1.offset, 32);
        assert_eq!(g.tensor_data(t1), &[9u8; 34][..]);
    }

    #[test]
    fn header_only_parse_from_a_prefix() {
        let bytes = sample();
        let full = Gguf::parse(&bytes).unwrap();
        let len = bytes.len() as u64;
        // Every prefix that ends inside the header is reported as truncated (read more).
        for cut in [0usize, 3, 10, 40, 200, 400] {
            let e = Gguf::parse_header(&bytes[..cut], len).unwrap_err();
            assert!(matches!(e, GgufError::Truncated { .. }), "cut {cut}: {e}");
        }
        // The header alone is enough; tensors are checked against the file length.
        let h = Gguf::parse_header(&bytes[..full.data_offset as usize], len).unwrap();
        assert!(h.is_header_only());
        assert_eq!(h.tensors, full.tensors);
        assert_eq!(h.metadata, full.metadata);
        let t1 = h.tensor("t1").unwrap();
        assert!(h.tensor_data(t1).is_empty());
        let at = h.tensor_file_offset(t1) as usize;
        assert_eq!(&bytes[at..at + 34], &[9u8; 34][..]);
        // A file shorter than its tensors is refused from the header alone.
        let e = Gguf::parse_header(&bytes[..full.data_offset as usize], len - 1).unwrap_err();
        assert!(e.to_string().contains("extends past the end"), "{e}");
        assert!(Gguf::parse_header(&bytes, len - 1).is_err());
        assert!(!full.is_header_only());
        assert_eq!(full.file_len(), len);
    }

    #[test]
    fn custom_alignment() {
        let mut w = GgufWriter::new();
        w.alignment(64);
        w.tensor("a", &[3], GgmlType::F32, vec![1; 12]);
        w.tensor("b", &[1], GgmlType::F32, vec![2; 4]);
        let bytes = w.to_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset % 64, 0);
        assert_eq!(g.tensor("b").unwrap().offset, 64);
        assert_eq!(g.tensor_data(g.tensor("b").unwrap()), &[2; 4]);
    }

    #[test]
    fn hostile_inputs_are_errors() {
        assert!(matches!(Gguf::parse(b""), Err(GgufError::Truncated { .. })));
        assert!(matches!(
            Gguf::parse(b"GGUX\x03\0\0\0"),
            Err(GgufError::BadMagic(_))
        ));
        assert_eq!(
            Gguf::parse(b"GGUF\x09\0\0\0").unwrap_err(),
            GgufError::UnsupportedVersion(9)
        );
        // Huge KV count.
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Huge string length.
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 32]);
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Truncated { .. })));
        // Huge array count.
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&vt::ARRAY.to_le_bytes());
        b.extend_from_slice(&vt::STRING.to_le_bytes());
        b.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Truncated { .. })));
        // Bad bool.
        let mut w = GgufWriter::new();
        w.kv("b", Value::U8(5));
        let mut b = w.to_bytes();
        let pos = 24 + 8 + 1;
        b[pos..pos + 4].copy_from_slice(&vt::BOOL.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
    }

    #[test]
    fn hostile_tensor_infos_are_errors() {
        let mk = |dims: &[u64], ty: GgmlType, data: Vec<u8>| {
            let mut w = GgufWriter::new();
            w.tensor("t", dims, ty, data);
            w.to_bytes()
        };
        // Data shorter than declared.
        let b = mk(&[8], GgmlType::F32, vec![0; 16]);
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Not whole blocks.
        let b = mk(&[16], GgmlType::Q4_0, vec![0; 18]);
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Overflowing dims.
        let b = mk(&[u64::MAX, 4], GgmlType::F32, vec![]);
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Unknown type id.
        let mut b = mk(&[1], GgmlType::F32, vec![0; 4]);
        let info_ty_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8;
        b[info_ty_pos..info_ty_pos + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Misaligned offset.
        let mut b = mk(&[1], GgmlType::F32, vec![0; 4]);
        b[info_ty_pos + 4..info_ty_pos + 12].copy_from_slice(&3u64.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Offset past end.
        let mut b = mk(&[1], GgmlType::F32, vec![0; 4]);
        b[info_ty_pos + 4..info_ty_pos + 12].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
        // Too many dims.
        let b = mk(&[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]);
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Invalid(_))));
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error() {
        let bytes = sample();
        for n in 0..bytes.len() {
            assert!(Gguf::parse(&bytes[..n]).is_err(), "prefix {n} parsed");
        }
    }

    #[test]
    fn type_table() {
        for id in [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30] {
            assert_eq!(GgmlType::from_id(id).unwrap().id(), id);
        }
        assert_eq!(GgmlType::from_id(4), Err(GgufError::UnknownType(4)));
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert!(GgmlType::Q4_K.is_supported());
        assert!(!GgmlType::Q3_K.is_supported());
        assert_eq!("q4_1".parse::<GgmlType>(), Ok(GgmlType::Q4_1));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Gguf::parse(&bytes);
        }

        #[test]
        fn mutated_valid_file_never_panics(pos in 0usize..400, val in proptest::num::u8::ANY) {
            let mut b = sample();
            let p = pos % b.len();
            b[p] = val;
            if let Ok(g) = Gguf::parse(&b) {
                for t in &g.tensors {
                    proptest::prop_assert_eq!(g.tensor_data(t).len() as u64, t.size);
                }
            }
        }
    }
}
