//! Message bodies of the root contract, as Cocoon's contract reads them.
//!
//! Every hash-list change is `op:uint32 query_id:uint64 hash:uint256` with no references.
//! Cocoon's FunC contract rejects trailing bits or references (exit code 9), so the parser here
//! is just as strict.

use num_bigint::BigUint;
use tonlib_core::cell::{Cell, CellBuilder};

use crate::{Error, Hash256, HashKind};

/// Add a worker (image) hash.
pub const OP_ADD_WORKER_HASH: u32 = 0xe34b_1c60;
/// Remove a worker (image) hash.
pub const OP_DEL_WORKER_HASH: u32 = 0x8d94_a79a;
/// Add a model hash.
pub const OP_ADD_MODEL_HASH: u32 = 0xc146_134d;
/// Remove a model hash.
pub const OP_DEL_MODEL_HASH: u32 = 0x92b1_1c18;
/// Add a proxy image hash.
pub const OP_ADD_PROXY_HASH: u32 = 0x7186_0e80;
/// Remove a proxy image hash.
pub const OP_DEL_PROXY_HASH: u32 = 0x3c41_d0b2;
/// The contract's excess refund to the sender (non-bounceable, same query id).
pub const OP_EXCESSES: u32 = 0x2565_934c;

/// Whether a hash is added to or removed from its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Remove,
}

/// One change of a hash list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashUpdate {
    pub kind: HashKind,
    pub change: Change,
    pub query_id: u64,
    pub hash: Hash256,
}

const TABLE: [(HashKind, Change, u32); 6] = [
    (HashKind::Image, Change::Add, OP_ADD_WORKER_HASH),
    (HashKind::Image, Change::Remove, OP_DEL_WORKER_HASH),
    (HashKind::Model, Change::Add, OP_ADD_MODEL_HASH),
    (HashKind::Model, Change::Remove, OP_DEL_MODEL_HASH),
    (HashKind::Proxy, Change::Add, OP_ADD_PROXY_HASH),
    (HashKind::Proxy, Change::Remove, OP_DEL_PROXY_HASH),
];

impl HashUpdate {
    /// The opcode of this change.
    pub fn opcode(&self) -> u32 {
        TABLE
            .iter()
            .find(|(k, c, _)| *k == self.kind && *c == self.change)
            .map(|(_, _, op)| *op)
            .unwrap_or_default()
    }

    /// The body cell.
    pub fn to_cell(&self) -> Result<Cell, Error> {
        let build = |e: tonlib_core::cell::TonCellError| Error::Build(e.to_string());
        let mut b = CellBuilder::new();
        b.store_u32(32, self.opcode()).map_err(build)?;
        b.store_u64(64, self.query_id).map_err(build)?;
        b.store_uint(256, &BigUint::from_bytes_be(&self.hash.0))
            .map_err(build)?;
        b.build().map_err(build)
    }

    /// Parses a body strictly: a known opcode, exactly 352 bits, no references.
    pub fn from_cell(cell: &Cell) -> Result<Self, Error> {
        let bad = |e: tonlib_core::cell::TonCellError| Error::Body(e.to_string());
        if !cell.references().is_empty() {
            return Err(Error::Body(format!(
                "{} references, a hash update has none",
                cell.references().len()
            )));
        }
        if cell.bit_len() != 32 + 64 + 256 {
            return Err(Error::Body(format!(
                "{} bits, a hash update has exactly 352",
                cell.bit_len()
            )));
        }
        let mut p = cell.parser();
        let op = p.load_u32(32).map_err(bad)?;
        let (kind, change) = TABLE
            .iter()
            .find(|(_, _, o)| *o == op)
            .map(|(k, c, _)| (*k, *c))
            .ok_or_else(|| Error::Body(format!("unknown opcode 0x{op:08x}")))?;
        let query_id = p.load_u64(64).map_err(bad)?;
        let n = p.load_uint(256).map_err(bad)?;
        let bytes = n.to_bytes_be();
        let mut hash = [0u8; 32];
        hash[32 - bytes.len()..].copy_from_slice(&bytes);
        Ok(HashUpdate {
            kind,
            change,
            query_id,
            hash: Hash256(hash),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonlib_core::cell::BagOfCells;

    fn h(byte: u8) -> Hash256 {
        Hash256([byte; 32])
    }

    #[test]
    fn every_update_round_trips() {
        for (kind, change, op) in TABLE {
            let u = HashUpdate {
                kind,
                change,
                query_id: 0x0102_0304_0506_0708,
                hash: h(0xab),
            };
            assert_eq!(u.opcode(), op);
            let cell = u.to_cell().expect("build");
            assert_eq!(cell.bit_len(), 352);
            assert_eq!(&cell.data()[..4], &op.to_be_bytes());
            assert_eq!(&cell.data()[4..12], &0x0102_0304_0506_0708u64.to_be_bytes());
            assert_eq!(&cell.data()[12..44], &[0xab; 32]);
            assert_eq!(HashUpdate::from_cell(&cell).expect("parse"), u);
        }
    }

    #[test]
    fn golden_boc_of_add_worker_hash() {
        let u = HashUpdate {
            kind: HashKind::Image,
            change: Change::Add,
            query_id: 7,
            hash: Hash256([0x11; 32]),
        };
        let boc = BagOfCells::from_root(u.to_cell().expect("build"))
            .serialize(false)
            .expect("boc");
        // b5ee9c72 magic, 1 cell, 352-bit body: e34b1c60 | 0000000000000007 | 11 x 32.
        let hex = hex::encode(&boc);
        assert!(hex.starts_with("b5ee9c72"), "{hex}");
        assert!(
            hex.ends_with(&format!("e34b1c600000000000000007{}", "11".repeat(32))),
            "{hex}"
        );
    }

    #[test]
    fn strict_parser_rejects_trailing_data_and_unknown_ops() {
        let mut b = CellBuilder::new();
        b.store_u32(32, OP_ADD_MODEL_HASH).expect("op");
        b.store_u64(64, 1).expect("qid");
        b.store_uint(256, &BigUint::from(5u8)).expect("hash");
        b.store_bit(true).expect("trailing");
        let e = HashUpdate::from_cell(&b.build().expect("cell")).expect_err("trailing bit");
        assert!(e.to_string().contains("353 bits"), "{e}");

        let mut b = CellBuilder::new();
        b.store_u32(32, 0xdead_beef).expect("op");
        b.store_u64(64, 1).expect("qid");
        b.store_uint(256, &BigUint::from(5u8)).expect("hash");
        let e = HashUpdate::from_cell(&b.build().expect("cell")).expect_err("unknown op");
        assert!(e.to_string().contains("0xdeadbeef"), "{e}");
    }

    #[test]
    fn small_hash_values_keep_leading_zeros() {
        let mut hash = [0u8; 32];
        hash[31] = 1;
        let u = HashUpdate {
            kind: HashKind::Model,
            change: Change::Remove,
            query_id: 0,
            hash: Hash256(hash),
        };
        assert_eq!(
            HashUpdate::from_cell(&u.to_cell().expect("build"))
                .expect("parse")
                .hash,
            u.hash
        );
    }
}
