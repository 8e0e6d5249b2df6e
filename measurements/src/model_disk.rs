//! Model disks: a GGUF file followed by its dm-verity hash tree, `model.json`, and the model hash
//! the root contract lists (format version 1, defined here; the full description with the disk
//! layout is in `measurements/README.md`, "Model disks").
//!
//! Disk layout (one file, attached read-only):
//!
//! ```text
//! [0, hash_offset)            the GGUF bytes, then zeros up to a multiple of 4096
//! [hash_offset, disk_size)    the hash tree, top level first, no verity superblock
//! ```
//!
//! Hash tree (dm-verity format version 1, SHA-256, 4096-byte data and hash blocks): every block
//! of a level is hashed as `SHA-256(salt || block)`; the 32-byte digests are packed 128 to a
//! 4096-byte hash block in order, the last block of a level padded with zeros; each level is
//! hashed the same way into the next, until a level has one block. The root hash is
//! `SHA-256(salt || that block)`; with exactly one data block there are no hash blocks and the
//! root hash is the digest of the data block. The number of levels and where each level sits
//! follow the kernel's dm-verity target and `veritysetup`: the top level first, level 0 (the
//! digests of the data blocks) last.
//!
//! The salt is the fixed [`SALT`] = `SHA-256("confidential-worker/model-disk/v1")`: the root hash
//! then depends on the GGUF bytes only (the same file packed under two names has one tree), and
//! the guest needs no extra measured input to set up dm-verity.
//!
//! Model hash (Cocoon's formula, `../../shared/docs/cocoon-compat.md`, "Their image"): the model id is
//! the UTF-8 string `name@revision:root_hash_hex` (lowercase hex) and the model hash is the
//! SHA-256 of that string, as the root contract's `model_hashes` list stores it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Data and hash block size in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Digests per hash block (4096 / 32).
pub const HASHES_PER_BLOCK: u64 = (BLOCK_SIZE / 32) as u64;
const HASH_BITS: u32 = 7;
/// dm-verity hash format version (1: the salt is hashed before the block).
pub const VERITY_VERSION: u32 = 1;
/// Hash algorithm name as `veritysetup` and the dm-verity table spell it.
pub const HASH_ALGORITHM: &str = "sha256";
/// Version of `model.json` and of this disk format.
pub const FORMAT_VERSION: u32 = 1;
/// The string the fixed salt is derived from.
pub const SALT_SOURCE: &str = "confidential-worker/model-disk/v1";
/// The fixed salt: `SHA-256("confidential-worker/model-disk/v1")`.
pub const SALT: [u8; 32] = [
    0x2f, 0x4d, 0x22, 0xc1, 0x36, 0x48, 0x1b, 0xc8, 0x7d, 0xa6, 0xdf, 0x9a, 0x2b, 0x50, 0xb9, 0x28,
    0x35, 0x03, 0x85, 0x0c, 0x97, 0xb2, 0x50, 0x46, 0x40, 0xcf, 0x21, 0x78, 0x61, 0x1f, 0x3f, 0xdc,
];
/// The disk image's file name inside a packed model directory.
pub const DISK_FILE: &str = "model.img";
/// The description's file name inside a packed model directory.
pub const JSON_FILE: &str = "model.json";
/// Longest accepted name or revision.
pub const MAX_LABEL_LEN: usize = 128;

/// `SHA-256(salt || block)`: the digest of one data or hash block (verity format 1).
pub fn block_digest(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The model id `name@revision:root_hash_hex`.
pub fn model_id(name: &str, revision: &str, root_hash: &[u8; 32]) -> String {
    format!("{name}@{revision}:{}", hex::encode(root_hash))
}

/// The model hash: SHA-256 of [`model_id`] (Cocoon's formula).
pub fn model_hash(name: &str, revision: &str, root_hash: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(model_id(name, revision, root_hash).as_bytes()).into()
}

/// Checks a model name or revision: 1 to 128 characters from `[A-Za-z0-9._-]`, not starting
/// with `.` or `-` (so `@` and `:`, the separators of the model id, never occur in it).
pub fn check_label(what: &str, s: &str) -> Result<()> {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if s.is_empty()
        || s.len() > MAX_LABEL_LEN
        || !ok_chars
        || s.starts_with('.')
        || s.starts_with('-')
    {
        return Err(Error::Input(format!(
            "{what} {s:?} is not allowed: use 1-{MAX_LABEL_LEN} characters from A-Z a-z 0-9 . _ - \
             (not starting with . or -), e.g. smollm2-135m or a commit id"
        )));
    }
    Ok(())
}

/// One level of the tree inside the hash area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// First block of the level, counted from the start of the hash area.
    pub start: u64,
    /// Number of hash blocks of the level.
    pub blocks: u64,
}

/// Where everything sits on the disk, a pure function of the GGUF size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// GGUF size in bytes.
    pub file_size: u64,
    /// Data blocks (the GGUF rounded up to 4096 bytes).
    pub data_blocks: u64,
    /// Levels, index 0 = the digests of the data blocks; the last one has one block.
    pub levels: Vec<Level>,
    /// Hash blocks in all levels.
    pub hash_blocks: u64,
}

impl Layout {
    /// The layout for a GGUF of `file_size` bytes (refused when 0: dm-verity needs a block).
    pub fn new(file_size: u64) -> Result<Self> {
        if file_size == 0 {
            return Err(Error::Input(
                "the model file is empty: pass a GGUF file with content".into(),
            ));
        }
        let data_blocks = file_size.div_ceil(BLOCK_SIZE as u64);
        // As the kernel counts them: the least number of levels whose top covers every block.
        let mut n_levels = 0u32;
        while HASH_BITS * n_levels < 64 && (data_blocks - 1) >> (HASH_BITS * n_levels) != 0 {
            n_levels += 1;
        }
        let sizes: Vec<u64> = (0..n_levels)
            .map(|i| {
                let shift = HASH_BITS * (i + 1);
                if shift >= 64 {
                    1
                } else {
                    data_blocks.div_ceil(1u64 << shift)
                }
            })
            .collect();
        let mut levels = vec![
            Level {
                start: 0,
                blocks: 0
            };
            sizes.len()
        ];
        let mut pos = 0u64;
        for i in (0..sizes.len()).rev() {
            levels[i] = Level {
                start: pos,
                blocks: sizes[i],
            };
            pos += sizes[i];
        }
        Ok(Layout {
            file_size,
            data_blocks,
            levels,
            hash_blocks: pos,
        })
    }

    /// Byte offset of the hash area (= the padded data size).
    pub fn hash_offset(&self) -> u64 {
        self.data_blocks * BLOCK_SIZE as u64
    }

    /// Size of the whole disk in bytes.
    pub fn disk_size(&self) -> u64 {
        (self.data_blocks + self.hash_blocks) * BLOCK_SIZE as u64
    }
}

/// Where the builder keeps hash blocks: block indices count from the start of the hash area.
pub trait HashStore {
    /// Store hash block `index`.
    fn write_block(&mut self, index: u64, block: &[u8; BLOCK_SIZE]) -> std::io::Result<()>;
    /// Read back hash block `index` (written before).
    fn read_block(&mut self, index: u64, block: &mut [u8; BLOCK_SIZE]) -> std::io::Result<()>;
}

/// A hash area in memory (tests, small models).
impl HashStore for Vec<u8> {
    fn write_block(&mut self, index: u64, block: &[u8; BLOCK_SIZE]) -> std::io::Result<()> {
        let at = usize::try_from(index)
            .map_err(std::io::Error::other)?
            .checked_mul(BLOCK_SIZE)
            .ok_or_else(|| std::io::Error::other("hash block index too large"))?;
        if self.len() < at + BLOCK_SIZE {
            self.resize(at + BLOCK_SIZE, 0);
        }
        self[at..at + BLOCK_SIZE].copy_from_slice(block);
        Ok(())
    }

    fn read_block(&mut self, index: u64, block: &mut [u8; BLOCK_SIZE]) -> std::io::Result<()> {
        let at = usize::try_from(index).map_err(std::io::Error::other)? * BLOCK_SIZE;
        let src = self
            .get(at..at + BLOCK_SIZE)
            .ok_or_else(|| std::io::Error::other("hash block read before it was written"))?;
        block.copy_from_slice(src);
        Ok(())
    }
}

/// Packs digests into hash blocks and hands each full block to the store.
struct LevelPacker {
    block: Box<[u8; BLOCK_SIZE]>,
    fill: usize,
    next_index: u64,
    written: u64,
}

impl LevelPacker {
    fn new(level: Level) -> Self {
        LevelPacker {
            block: Box::new([0u8; BLOCK_SIZE]),
            fill: 0,
            next_index: level.start,
            written: 0,
        }
    }

    fn push(&mut self, digest: &[u8; 32], store: &mut impl HashStore) -> std::io::Result<()> {
        self.block[self.fill..self.fill + 32].copy_from_slice(digest);
        self.fill += 32;
        if self.fill == BLOCK_SIZE {
            self.flush(store)?;
        }
        Ok(())
    }

    /// Writes a partly filled block (the rest zeros).
    fn flush(&mut self, store: &mut impl HashStore) -> std::io::Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        self.block[self.fill..].fill(0);
        store.write_block(self.next_index, &self.block)?;
        self.next_index += 1;
        self.written += 1;
        self.fill = 0;
        Ok(())
    }
}

fn io_err(e: std::io::Error) -> Error {
    Error::Input(format!("writing or reading the hash tree: {e}"))
}

/// Streaming builder of the hash tree: feed the GGUF bytes in any chunks with [`Self::update`],
/// then [`Self::finish`] pads the last data block, writes the upper levels (reading each level
/// back from the store) and returns the root hash. Memory: two 4 KiB blocks.
pub struct TreeBuilder<S: HashStore> {
    layout: Layout,
    salt: Vec<u8>,
    store: S,
    data_block: Box<[u8; BLOCK_SIZE]>,
    data_fill: usize,
    data_seen: u64,
    level0: Option<LevelPacker>,
    single_digest: Option<[u8; 32]>,
}

impl<S: HashStore> TreeBuilder<S> {
    /// A builder for `layout` with `salt`, writing hash blocks to `store`.
    pub fn new(layout: Layout, salt: &[u8], store: S) -> Self {
        let level0 = layout.levels.first().copied().map(LevelPacker::new);
        TreeBuilder {
            layout,
            salt: salt.to_vec(),
            store,
            data_block: Box::new([0u8; BLOCK_SIZE]),
            data_fill: 0,
            data_seen: 0,
            level0,
            single_digest: None,
        }
    }

    /// Feed the next bytes of the GGUF.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.data_seen += bytes.len() as u64;
        if self.data_seen > self.layout.file_size {
            return Err(Error::Input(format!(
                "the model file grew while it was packed (more than {} bytes); do not change it \
                 during `model pack`",
                self.layout.file_size
            )));
        }
        while !bytes.is_empty() {
            let take = (BLOCK_SIZE - self.data_fill).min(bytes.len());
            self.data_block[self.data_fill..self.data_fill + take].copy_from_slice(&bytes[..take]);
            self.data_fill += take;
            bytes = &bytes[take..];
            if self.data_fill == BLOCK_SIZE {
                self.data_block_done()?;
            }
        }
        Ok(())
    }

    fn data_block_done(&mut self) -> Result<()> {
        let d = block_digest(&self.salt, &self.data_block[..]);
        self.data_fill = 0;
        match &mut self.level0 {
            Some(p) => p.push(&d, &mut self.store).map_err(io_err),
            None => {
                self.single_digest = Some(d);
                Ok(())
            }
        }
    }

    /// Finish: returns the root hash and the store.
    pub fn finish(mut self) -> Result<([u8; 32], S)> {
        if self.data_seen != self.layout.file_size {
            return Err(Error::Input(format!(
                "the model file changed size while it was packed ({} bytes expected, {} read); \
                 do not change it during `model pack`",
                self.layout.file_size, self.data_seen
            )));
        }
        if self.data_fill > 0 {
            self.data_block[self.data_fill..].fill(0);
            self.data_block_done()?;
        }
        let Some(mut p0) = self.level0.take() else {
            let root = self.single_digest.ok_or_else(|| {
                Error::Input("no data block was hashed; the model file is empty".into())
            })?;
            return Ok((root, self.store));
        };
        p0.flush(&mut self.store).map_err(io_err)?;
        check_level(0, &p0, self.layout.levels[0])?;
        let mut buf = Box::new([0u8; BLOCK_SIZE]);
        for i in 1..self.layout.levels.len() {
            let below = self.layout.levels[i - 1];
            let mut p = LevelPacker::new(self.layout.levels[i]);
            for b in below.start..below.start + below.blocks {
                self.store.read_block(b, &mut buf).map_err(io_err)?;
                p.push(&block_digest(&self.salt, &buf[..]), &mut self.store)
                    .map_err(io_err)?;
            }
            p.flush(&mut self.store).map_err(io_err)?;
            check_level(i, &p, self.layout.levels[i])?;
        }
        let top = self.layout.levels[self.layout.levels.len() - 1];
        self.store.read_block(top.start, &mut buf).map_err(io_err)?;
        Ok((block_digest(&self.salt, &buf[..]), self.store))
    }
}

fn check_level(i: usize, p: &LevelPacker, want: Level) -> Result<()> {
    if p.written != want.blocks {
        return Err(Error::Input(format!(
            "internal error: level {i} has {} hash blocks, the layout says {}; report this",
            p.written, want.blocks
        )));
    }
    Ok(())
}

/// The GGUF file as packed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GgufInfo {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// The dm-verity parameters (what `veritysetup` or a dm table needs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityInfo {
    /// dm-verity hash format version (1).
    pub format: u32,
    /// `sha256`.
    pub hash_algorithm: String,
    /// 4096.
    pub data_block_size: u64,
    /// 4096.
    pub hash_block_size: u64,
    /// Data blocks (GGUF size rounded up to 4096).
    pub data_blocks: u64,
    /// Hash blocks after the data.
    pub hash_blocks: u64,
    /// Byte offset of the hash tree on the disk (= data_blocks × 4096).
    pub hash_offset: u64,
    /// Whether a verity superblock precedes the tree (always false in format 1).
    pub superblock: bool,
    /// Salt, lowercase hex.
    pub salt: String,
    /// Root hash, lowercase hex.
    pub root_hash: String,
}

impl VerityInfo {
    /// Checks the parameters against the format for a `file_size`-byte GGUF on a
    /// `disk_size`-byte disk (layout, block sizes, SHA-256, fixed salt, no superblock, hex
    /// fields) and returns the root hash. What the guest checks before it trusts the
    /// parameters of a measured host config to set up dm-verity.
    pub fn validate(&self, file_size: u64, disk_size: u64) -> Result<[u8; 32]> {
        let bad = |reason: String| Error::Malformed {
            what: "model disk verity parameters",
            reason,
        };
        let root = parse_hex32("verity.root_hash", &self.root_hash)?;
        let layout = Layout::new(file_size).map_err(|e| bad(e.to_string()))?;
        let expect = [
            (
                "verity.format",
                u64::from(self.format),
                u64::from(VERITY_VERSION),
            ),
            (
                "verity.data_block_size",
                self.data_block_size,
                BLOCK_SIZE as u64,
            ),
            (
                "verity.hash_block_size",
                self.hash_block_size,
                BLOCK_SIZE as u64,
            ),
            ("verity.data_blocks", self.data_blocks, layout.data_blocks),
            ("verity.hash_blocks", self.hash_blocks, layout.hash_blocks),
            ("verity.hash_offset", self.hash_offset, layout.hash_offset()),
            ("disk_size", disk_size, layout.disk_size()),
        ];
        for (field, got, want) in expect {
            if got != want {
                return Err(bad(format!(
                    "{field} is {got}, but a {file_size}-byte GGUF needs {want}"
                )));
            }
        }
        if self.hash_algorithm != HASH_ALGORITHM {
            return Err(bad(format!(
                "verity.hash_algorithm is {:?}, format {FORMAT_VERSION} uses {HASH_ALGORITHM:?}",
                self.hash_algorithm
            )));
        }
        if self.superblock {
            return Err(bad("verity.superblock is true; format 1 has none".into()));
        }
        if self.salt != hex::encode(SALT) {
            return Err(bad(format!(
                "verity.salt is {:?}, format {FORMAT_VERSION} uses the fixed salt {}",
                self.salt,
                hex::encode(SALT)
            )));
        }
        Ok(root)
    }
}

/// `model.json`: fields in this fixed order, pretty-printed, with a trailing newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelJson {
    /// Version of this document ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Model name.
    pub name: String,
    /// Revision (e.g. the upstream commit).
    pub revision: String,
    /// `name@revision:root_hash`.
    pub model_id: String,
    /// SHA-256 of `model_id`, lowercase hex: what the root contract lists.
    pub model_hash: String,
    /// The GGUF inside.
    pub gguf: GgufInfo,
    /// File name of the disk image beside model.json.
    pub disk: String,
    /// Size of the disk image in bytes.
    pub disk_size: u64,
    /// The hash tree.
    pub verity: VerityInfo,
}

fn parse_hex32(what: &str, s: &str) -> Result<[u8; 32]> {
    let bad = || Error::Malformed {
        what: "model.json",
        reason: format!("{what} must be 64 lowercase hex digits, got {s:?}"),
    };
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let v = hex::decode(s).map_err(|_| bad())?;
    v.try_into().map_err(|_| bad())
}

impl ModelJson {
    /// The document for a packed GGUF.
    pub fn new(
        name: &str,
        revision: &str,
        layout: &Layout,
        gguf_sha256: &[u8; 32],
        root_hash: &[u8; 32],
    ) -> Self {
        ModelJson {
            format_version: FORMAT_VERSION,
            name: name.to_string(),
            revision: revision.to_string(),
            model_id: model_id(name, revision, root_hash),
            model_hash: hex::encode(model_hash(name, revision, root_hash)),
            gguf: GgufInfo {
                size: layout.file_size,
                sha256: hex::encode(gguf_sha256),
            },
            disk: DISK_FILE.to_string(),
            disk_size: layout.disk_size(),
            verity: VerityInfo {
                format: VERITY_VERSION,
                hash_algorithm: HASH_ALGORITHM.to_string(),
                data_block_size: BLOCK_SIZE as u64,
                hash_block_size: BLOCK_SIZE as u64,
                data_blocks: layout.data_blocks,
                hash_blocks: layout.hash_blocks,
                hash_offset: layout.hash_offset(),
                superblock: false,
                salt: hex::encode(SALT),
                root_hash: hex::encode(root_hash),
            },
        }
    }

    /// The canonical bytes: pretty JSON in the struct's field order, then `\n`.
    pub fn to_canonical_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses and [validates](Self::validate) a model.json.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let m: ModelJson = serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
            what: "model.json",
            reason: format!("{e}; write it with `cargo xtask model pack`"),
        })?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every field against the format and each other: labels, hex fields, the layout
    /// for the GGUF size, the fixed salt, the model id and the model hash.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::Malformed {
            what: "model.json",
            reason: format!("{reason}; pack the model again with `cargo xtask model pack`"),
        };
        if self.format_version != FORMAT_VERSION {
            return Err(Error::Unsupported {
                what: "model.json",
                reason: format!(
                    "format_version {} (this tool reads {FORMAT_VERSION}); use a matching release",
                    self.format_version
                ),
            });
        }
        check_label("name", &self.name)?;
        check_label("revision", &self.revision)?;
        parse_hex32("gguf.sha256", &self.gguf.sha256)?;
        let root = parse_hex32("verity.root_hash", &self.verity.root_hash)?;
        let hash = parse_hex32("model_hash", &self.model_hash)?;
        self.verity
            .validate(self.gguf.size, self.disk_size)
            .map_err(|e| match e {
                Error::Malformed { reason, .. } => bad(reason),
                other => other,
            })?;
        if self.disk != DISK_FILE {
            return Err(bad(format!(
                "disk is {:?}, expected {DISK_FILE:?}",
                self.disk
            )));
        }
        let id = model_id(&self.name, &self.revision, &root);
        if self.model_id != id {
            return Err(bad(format!(
                "model_id is {:?}, but name, revision and root hash give {id:?}",
                self.model_id
            )));
        }
        if hash != model_hash(&self.name, &self.revision, &root) {
            return Err(bad(format!(
                "model_hash {} is not SHA-256 of {id:?}",
                self.model_hash
            )));
        }
        Ok(())
    }

    /// The model hash as bytes (after [`Self::validate`]).
    pub fn model_hash_bytes(&self) -> Result<[u8; 32]> {
        parse_hex32("model_hash", &self.model_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent, recursive reference of the tree: hash the blocks of a level, pack the
    /// digests into zero-padded blocks, recurse until one block; returns (root, levels top-first).
    fn reference(data: &[u8], salt: &[u8]) -> ([u8; 32], Vec<Vec<u8>>) {
        fn blocks_of(bytes: &[u8]) -> Vec<Vec<u8>> {
            bytes
                .chunks(BLOCK_SIZE)
                .map(|c| {
                    let mut b = c.to_vec();
                    b.resize(BLOCK_SIZE, 0);
                    b
                })
                .collect()
        }
        fn go(blocks: Vec<Vec<u8>>, salt: &[u8], out: &mut Vec<Vec<u8>>) -> [u8; 32] {
            let digests: Vec<u8> = blocks
                .iter()
                .flat_map(|b| {
                    let mut h = Sha256::new();
                    h.update(salt);
                    h.update(b);
                    h.finalize().to_vec()
                })
                .collect();
            if blocks.len() == 1 {
                return digests.try_into().expect("one digest");
            }
            let level = blocks_of(&digests);
            let root = go(level.clone(), salt, out);
            out.push(level.concat());
            root
        }
        let mut levels = Vec::new();
        let root = go(blocks_of(data), salt, &mut levels);
        (root, levels)
    }

    fn build(data: &[u8], chunk: usize) -> ([u8; 32], Vec<u8>, Layout) {
        let layout = Layout::new(data.len() as u64).expect("layout");
        let mut b = TreeBuilder::new(layout.clone(), &SALT, Vec::new());
        for c in data.chunks(chunk) {
            b.update(c).expect("update");
        }
        let (root, area) = b.finish().expect("finish");
        (root, area, layout)
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as u8
            })
            .collect()
    }

    #[test]
    fn salt_is_the_documented_derivation() {
        assert_eq!(Sha256::digest(SALT_SOURCE.as_bytes()).as_slice(), &SALT);
    }

    #[test]
    fn tree_matches_recursive_reference_at_level_boundaries() {
        let cases = [
            ("1 byte", 1usize),
            ("1 block", BLOCK_SIZE),
            ("128 blocks: one hash block", 128 * BLOCK_SIZE),
            ("129 blocks: two levels", 129 * BLOCK_SIZE),
            ("not a multiple of 4096", 3 * BLOCK_SIZE + 1234),
            ("16385 blocks: three levels", 16385 * BLOCK_SIZE - 7),
        ];
        for (what, n) in cases {
            let data = pseudo_random(n, n as u32);
            let (want_root, want_levels) = reference(&data, &SALT);
            for chunk in [1000, 4096, 1 << 20] {
                let (root, area, layout) = build(&data, chunk);
                assert_eq!(root, want_root, "{what}, chunks of {chunk}");
                assert_eq!(area, want_levels.concat(), "{what}: hash area");
                assert_eq!(area.len() as u64, layout.hash_blocks * BLOCK_SIZE as u64);
            }
        }
    }

    #[test]
    fn layout_at_boundaries() {
        let l = Layout::new(1).expect("1");
        assert_eq!((l.data_blocks, l.hash_blocks, l.levels.len()), (1, 0, 0));
        assert_eq!(l.disk_size(), 4096);
        let l = Layout::new(128 * 4096).expect("128");
        assert_eq!(
            l.levels,
            [Level {
                start: 0,
                blocks: 1
            }]
        );
        let l = Layout::new(129 * 4096).expect("129");
        // Top level first in the hash area, level 0 after it.
        assert_eq!(
            l.levels,
            [
                Level {
                    start: 1,
                    blocks: 2
                },
                Level {
                    start: 0,
                    blocks: 1
                }
            ]
        );
        assert_eq!(l.hash_offset(), 129 * 4096);
        assert_eq!(l.disk_size(), (129 + 3) * 4096);
        let e = Layout::new(0).expect_err("empty");
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn one_block_root_is_digest_of_the_block() {
        let data = pseudo_random(100, 9);
        let mut block = data.clone();
        block.resize(BLOCK_SIZE, 0);
        let (root, area, _) = build(&data, 7);
        assert!(area.is_empty());
        let mut h = Sha256::new();
        h.update(SALT);
        h.update(&block);
        assert_eq!(root.as_slice(), h.finalize().as_slice());
    }

    #[test]
    fn flipped_byte_changes_root() {
        let mut data = pseudo_random(200 * BLOCK_SIZE + 5, 3);
        let (a, _, _) = build(&data, 65536);
        data[150 * BLOCK_SIZE + 17] ^= 1;
        let (b, _, _) = build(&data, 65536);
        assert_ne!(a, b);
    }

    #[test]
    fn size_change_during_pack_is_refused() {
        let layout = Layout::new(10).expect("layout");
        let mut b = TreeBuilder::new(layout.clone(), &SALT, Vec::new());
        b.update(&[0; 5]).expect("ok");
        assert!(b.finish().is_err());
        let mut b = TreeBuilder::new(layout, &SALT, Vec::new());
        assert!(b.update(&[0; 11]).is_err());
    }

    #[test]
    fn model_hash_formula_by_hand() {
        let root = [0xabu8; 32];
        let id = model_id("smollm2-135m", "v1", &root);
        assert_eq!(id, format!("smollm2-135m@v1:{}", "ab".repeat(32)));
        // echo -n "smollm2-135m@v1:abab…ab" | sha256sum
        assert_eq!(
            hex::encode(model_hash("smollm2-135m", "v1", &root)),
            "c6f416c2f5d627dd0411d7423062050a5846144078fcf62c7eaf8c6d7bfad5f1"
        );
    }

    #[test]
    fn labels() {
        for ok in ["a", "smollm2-135m", "Qwen2.5_7B", &"x".repeat(128)] {
            check_label("name", ok).expect(ok);
        }
        for bad in [
            "",
            "a@b",
            "a:b",
            "a/b",
            "a b",
            ".hidden",
            "-x",
            "é",
            &"x".repeat(129),
        ] {
            let e = check_label("name", bad).expect_err(bad);
            assert!(e.to_string().contains("A-Z a-z 0-9"), "{e}");
        }
    }

    #[test]
    fn model_json_round_trip_and_validation() {
        let data = pseudo_random(5000, 1);
        let (root, _, layout) = build(&data, 4096);
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let m = ModelJson::new("tiny", "r1", &layout, &sha, &root);
        let text = m.to_canonical_json();
        assert!(text.ends_with("}\n"));
        assert!(text.starts_with("{\n  \"format_version\": 1,\n  \"name\": \"tiny\","));
        let back = ModelJson::parse(text.as_bytes()).expect("parse");
        assert_eq!(back, m);
        assert_eq!(back.to_canonical_json(), text);
        assert_eq!(
            back.model_hash_bytes().expect("hash"),
            model_hash("tiny", "r1", &root)
        );

        let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
            f(&mut v);
            ModelJson::parse(v.to_string().as_bytes())
                .expect_err("must be refused")
                .to_string()
        };
        let e = mutate(&|v| v["model_hash"] = "00".repeat(32).into());
        assert!(e.contains("model_hash"), "{e}");
        let e = mutate(&|v| v["revision"] = "r2".into());
        assert!(e.contains("model_id"), "{e}");
        let e = mutate(&|v| v["verity"]["hash_offset"] = 0.into());
        assert!(e.contains("verity.hash_offset"), "{e}");
        let e = mutate(&|v| v["verity"]["salt"] = "00".into());
        assert!(e.contains("fixed salt"), "{e}");
        let e = mutate(&|v| v["verity"]["root_hash"] = "AB".repeat(32).into());
        assert!(e.contains("lowercase hex"), "{e}");
        let e = mutate(&|v| v["extra"] = 1.into());
        assert!(e.contains("unknown field"), "{e}");
        let e = mutate(&|v| v["format_version"] = 2.into());
        assert!(e.contains("format_version 2"), "{e}");
        let e = ModelJson::parse(b"not json")
            .expect_err("garbage")
            .to_string();
        assert!(e.contains("cargo xtask model pack"), "{e}");
    }
}
