//! Streamed model loading: a model read piece by piece from a positioned reader (a file, a
//! dm-verity block device) instead of one mapping of the whole file.
//!
//! The GGUF header is read first (growing the prefix until it parses, at most
//! [`MAX_HEADER_BYTES`]), then [`crate::model::LlamaWeights`] describes every tensor by its
//! offset and size ([`crate::gguf::Gguf::parse_header`]), and each backend reads one tensor at a
//! time with [`fetch`] and turns it into its own form: the CPU backend repacks it (so RAM holds
//! one copy of the weights plus one tensor in flight), the CUDA backend streams it through a
//! bounded staging buffer into device memory. Every read goes through [`ReadAt`], so a read
//! error (EIO from dm-verity on a corrupted block) stops the load with the reader's message.

use std::borrow::Cow;

use crate::error::InferenceError;
use crate::gguf::{Gguf, GgufError};
use crate::model::TensorRef;

/// Largest GGUF header read (metadata + tensor infos; 128k-token vocabularies take ~10 MiB).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;
/// First header read.
const FIRST_HEADER_READ: u64 = 1 << 20;

/// A source of model bytes read at absolute offsets.
pub trait ReadAt: Sync {
    /// Length of the model file in bytes (the GGUF, without any padding after it).
    fn len(&self) -> u64;
    /// Whether the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `offset` (all of them, or an error).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

fn slice_read_at(bytes: &[u8], buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let start = usize::try_from(offset).map_err(std::io::Error::other)?;
    let src = start
        .checked_add(buf.len())
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the model",
            )
        })?;
    buf.copy_from_slice(src);
    Ok(())
}

/// An in-memory model (tests, small files).
impl ReadAt for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        slice_read_at(self, buf, offset)
    }
}

/// An in-memory model (tests, small files).
impl ReadAt for Vec<u8> {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        slice_read_at(self, buf, offset)
    }
}

/// The first `len` bytes of a file or block device (a block device's metadata says 0 bytes,
/// and a dm-verity device is longer than the GGUF it carries: the length is given).
#[derive(Debug)]
pub struct FileReadAt {
    /// The open file.
    pub file: std::fs::File,
    /// The model's length.
    pub len: u64,
}

impl ReadAt for FileReadAt {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the model",
            ));
        }
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
}

fn read_err(what: &str, offset: u64, len: usize, source: std::io::Error) -> InferenceError {
    InferenceError::Read {
        what: what.to_owned(),
        offset,
        len: len as u64,
        source,
    }
}

/// Reads the GGUF header from `src`: the smallest power-of-two prefix (from 1 MiB, at most
/// [`MAX_HEADER_BYTES`] or the whole file) that [`Gguf::parse_header`] accepts. Returns the
/// prefix; parse it again with `Gguf::parse_header(&prefix, src.len())`.
pub fn read_header(src: &dyn ReadAt) -> Result<Vec<u8>, InferenceError> {
    let file_len = src.len();
    let mut want = FIRST_HEADER_READ.min(file_len);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let have = buf.len();
        let n = usize::try_from(want)
            .map_err(|_| InferenceError::InvalidArgument("header too large".into()))?;
        buf.resize(n, 0);
        src.read_exact_at(&mut buf[have..], have as u64)
            .map_err(|e| read_err("the GGUF header", have as u64, n - have, e))?;
        match Gguf::parse_header(&buf, file_len) {
            Ok(_) => return Ok(buf),
            Err(GgufError::Truncated { .. }) if want < file_len.min(MAX_HEADER_BYTES) => {
                want = (want * 2).min(file_len).min(MAX_HEADER_BYTES);
            }
            Err(GgufError::Truncated { .. }) if want < file_len => {
                return Err(InferenceError::Gguf(GgufError::Invalid(format!(
                    "the GGUF header is larger than {} MiB; this loader refuses it",
                    MAX_HEADER_BYTES >> 20
                ))));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The bytes of tensor `t`: its own data when it has some (a fully mapped file), else `t.size`
/// bytes read from `src` at `t.offset`.
pub fn fetch<'a>(
    src: Option<&dyn ReadAt>,
    t: &TensorRef<'a>,
) -> Result<Cow<'a, [u8]>, InferenceError> {
    let size = usize::try_from(t.size)
        .map_err(|_| InferenceError::Tensor(format!("{} is too large", t.name)))?;
    match src {
        None => {
            if t.data.len() != size {
                return Err(InferenceError::Tensor(format!(
                    "{} holds {} bytes, expected {size} (the weights were described from the \
                     header only: load them with a reader)",
                    t.name,
                    t.data.len()
                )));
            }
            Ok(Cow::Borrowed(t.data))
        }
        Some(src) => {
            let mut v: Vec<u8> = Vec::new();
            v.try_reserve_exact(size).map_err(|_| {
                InferenceError::InvalidArgument(format!(
                    "cannot allocate {size} bytes for tensor {}: give the machine more memory",
                    t.name
                ))
            })?;
            v.resize(size, 0);
            src.read_exact_at(&mut v, t.offset)
                .map_err(|e| read_err(&format!("tensor {}", t.name), t.offset, size, e))?;
            Ok(Cow::Owned(v))
        }
    }
}

/// Reads `buf.len()` bytes of tensor `t` starting `at` bytes into it (chunked streaming).
pub fn fetch_part(
    src: &dyn ReadAt,
    t: &TensorRef<'_>,
    at: u64,
    buf: &mut [u8],
) -> Result<(), InferenceError> {
    if at.saturating_add(buf.len() as u64) > t.size {
        return Err(InferenceError::Tensor(format!(
            "read of {} bytes at {at} past the {}-byte tensor {}",
            buf.len(),
            t.size,
            t.name
        )));
    }
    let offset = t.offset.saturating_add(at);
    src.read_exact_at(buf, offset)
        .map_err(|e| read_err(&format!("tensor {}", t.name), offset, buf.len(), e))
}

/// Bytes the CPU backend keeps for the weights of the model whose header is `g`: quantized
/// matrices (Q4_0, Q4_1, Q8_0) repacked at their size (rows padded to groups of 16), every other
/// tensor widened to f32 (a tied output projection is the embedding matrix, held once). What a
/// launcher must leave room for besides the KV cache.
pub fn cpu_weight_bytes(g: &Gguf<'_>) -> u64 {
    g.tensors
        .iter()
        .map(|t| {
            let n = t.n_elements();
            let cols = t.dims.first().copied().unwrap_or(0);
            let rows = n.checked_div(cols).unwrap_or(0);
            if crate::packed::PackedMatrix::supports(t.ty) && t.dims.len() >= 2 {
                let padded =
                    rows.div_ceil(crate::packed::GROUP as u64) * crate::packed::GROUP as u64;
                t.ty.bytes_for(padded.saturating_mul(cols))
                    .unwrap_or(u64::MAX)
            } else {
                n.saturating_mul(4)
            }
        })
        .fold(0u64, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gguf::GgmlType;
    use crate::model::{LlamaConfig, LlamaWeights};
    use crate::synthetic::synthetic_gguf;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts reads and remembers the largest one.
    struct Counting<'a> {
        bytes: &'a [u8],
        read: AtomicU64,
        largest: AtomicU64,
        fail_at: Option<u64>,
    }

    impl ReadAt for Counting<'_> {
        fn len(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if let Some(bad) = self.fail_at
                && offset <= bad
                && bad < offset + buf.len() as u64
            {
                return Err(std::io::Error::other("data block 7 is corrupted"));
            }
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.largest.fetch_max(buf.len() as u64, Ordering::Relaxed);
            slice_read_at(self.bytes, buf, offset)
        }
    }

    #[test]
    fn header_is_read_in_growing_prefixes_and_tensors_at_their_offsets() {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 5).unwrap();
        let full = Gguf::parse(&bytes).unwrap();
        let header = read_header(&bytes).unwrap();
        assert!(header.len() as u64 >= full.data_offset || header.len() == bytes.len());
        let g = Gguf::parse_header(&header, bytes.len() as u64).unwrap();
        let w_full = LlamaWeights::from_gguf(&full).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let a = &w_full.layers[1].ffn_up;
        let b = &w.layers[1].ffn_up;
        assert_eq!((a.offset, a.size), (b.offset, b.size));
        let got = fetch(Some(&bytes), b).unwrap();
        assert_eq!(&got[..], a.data);
        assert_eq!(&fetch(None, a).unwrap()[..], a.data);
        if g.is_header_only() {
            assert!(fetch(None, b).is_err(), "no data without a reader");
        }
        let mut part = vec![0u8; 10];
        fetch_part(&bytes, b, 5, &mut part).unwrap();
        assert_eq!(&part[..], &a.data[5..15]);
        assert!(fetch_part(&bytes, b, b.size - 5, &mut part).is_err());
    }

    #[test]
    fn a_large_header_grows_the_prefix_and_a_read_error_names_the_offset() {
        // A vocabulary large enough that the header exceeds the first 1 MiB read.
        let mut cfg = LlamaConfig::tiny();
        cfg.vocab = 70_000;
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap();
        let full = Gguf::parse(&bytes).unwrap();
        assert!(full.data_offset > FIRST_HEADER_READ, "{}", full.data_offset);
        let src = Counting {
            bytes: &bytes,
            read: AtomicU64::new(0),
            largest: AtomicU64::new(0),
            fail_at: None,
        };
        let header = read_header(&src).unwrap();
        assert!(header.len() as u64 >= full.data_offset);
        assert_eq!(src.read.load(Ordering::Relaxed), header.len() as u64);
        let bad = Counting {
            fail_at: Some(10),
            ..src
        };
        let e = read_header(&bad).unwrap_err().to_string();
        assert!(
            e.contains("the GGUF header") && e.contains("data block 7 is corrupted"),
            "{e}"
        );
    }

    #[test]
    fn cpu_weight_bytes_counts_repacked_and_widened_tensors() {
        let cfg = LlamaConfig::tiny();
        for (ty, per_elem) in [(GgmlType::Q8_0, 34.0 / 32.0), (GgmlType::F16, 4.0)] {
            let bytes = synthetic_gguf(&cfg, ty, 1).unwrap();
            let g = Gguf::parse(&bytes).unwrap();
            let got = cpu_weight_bytes(&g) as f64;
            let want = cfg.n_params() as f64 * per_elem;
            // Norm vectors are f32 in every case; rows are padded to 16.
            assert!(
                (got - want).abs() / want < 0.1,
                "{ty}: {got} vs about {want}"
            );
        }
    }
}
