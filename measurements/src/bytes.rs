//! A bounds-checked little-endian reader: every parser in this crate reads untrusted bytes through
//! it, so a short or lying input becomes an [`Error::Malformed`], never a panic.

use crate::{Error, Result};

/// Cursor over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// New reader; `what` names the structure in error messages.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Reader { data, pos: 0, what }
    }

    /// Current offset.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// The unread rest (does not advance).
    pub fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or(&[])
    }

    /// Take `n` bytes; `field` names them in the error.
    pub fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::Malformed {
                what: self.what,
                reason: format!(
                    "truncated at offset {}: {field} needs {n} bytes, {} left",
                    self.pos,
                    self.remaining()
                ),
            }),
        }
    }

    /// Take a fixed-size array.
    pub fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// u8.
    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    /// u16 LE.
    pub fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// u32 LE.
    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// u64 LE.
    pub fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
}

/// Read a u16 LE at `off` of `data`.
pub fn le_u16(data: &[u8], off: usize, what: &'static str) -> Result<u16> {
    let mut r = Reader::new(data, what);
    r.take(off, "offset")?;
    r.u16("u16")
}

/// Read a u32 LE at `off` of `data`.
pub fn le_u32(data: &[u8], off: usize, what: &'static str) -> Result<u32> {
    let mut r = Reader::new(data, what);
    r.take(off, "offset")?;
    r.u32("u32")
}

/// Sub-slice `[off, off+len)` or a [`Error::Malformed`] naming `field`.
pub fn slice<'a>(
    data: &'a [u8],
    off: usize,
    len: usize,
    what: &'static str,
    field: &str,
) -> Result<&'a [u8]> {
    let mut r = Reader::new(data, what);
    r.take(off, field)?;
    r.take(len, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_rejects_short_input() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0], "test");
        assert_eq!(r.u16("a").ok(), Some(1));
        assert_eq!(r.u32("b").ok(), Some(2));
        let e = r.u8("c").expect_err("empty");
        assert!(e.to_string().contains("truncated at offset 6"), "{e}");
        assert!(slice(&[0u8; 4], usize::MAX, 2, "t", "f").is_err());
        assert!(le_u32(&[0u8; 4], 1, "t").is_err());
    }
}
