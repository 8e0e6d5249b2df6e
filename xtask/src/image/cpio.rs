//! A reproducible `newc` cpio writer (the initramfs format the kernel unpacks).
//!
//! Entries are sorted by path in byte order (`LC_ALL=C`), parents are created as needed,
//! every owner is 0:0, every mtime is the image's `source_date_epoch`, modes are explicit and
//! inode numbers are assigned in order, so the bytes depend only on the tree's content.

use std::collections::BTreeMap;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// Errors while building a tree.
#[derive(Debug, PartialEq, Eq)]
pub enum TreeError {
    /// A path was added twice with different content, or a file stands where a directory must be.
    Conflict(String),
    /// Empty, absolute-after-trim, `.`/`..` components, or not representable.
    BadPath(String),
}

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeError::Conflict(p) => {
                write!(f, "initrd path {p} is added twice with different content")
            }
            TreeError::BadPath(p) => write!(f, "invalid initrd path {p:?}"),
        }
    }
}

impl std::error::Error for TreeError {}

/// A file tree, keyed by path without leading `/`.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn normalize(path: &str) -> Result<String, TreeError> {
    let p = path.trim_start_matches('/');
    if p.is_empty()
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || p.contains('\0')
    {
        return Err(TreeError::BadPath(path.to_string()));
    }
    Ok(p.to_string())
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    /// Insert a node, creating missing parent directories with mode 0755.
    pub fn insert(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        let p = normalize(path)?;
        let mut parent = String::new();
        let comps: Vec<&str> = p.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(TreeError::Conflict(parent)),
            }
        }
        match self.nodes.get(&p) {
            None => {
                self.nodes.insert(p, node);
                Ok(())
            }
            // An explicit directory mode replaces an implicit parent's.
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {
                self.nodes.insert(p, node);
                Ok(())
            }
            Some(existing) if *existing == node => Ok(()),
            Some(_) => Err(TreeError::Conflict(p)),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), TreeError> {
        self.insert(path, Node::Dir { mode })
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), TreeError> {
        self.insert(path, Node::File { mode, data })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Entries in archive order.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Serialise as a `newc` archive with every mtime set to `mtime`.
    pub fn to_newc(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in (1u32..).zip(self.nodes.iter()) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | (mode & 0o7777), 2, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
                Node::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                Node::CharDevice { mode, major, minor } => {
                    (S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor))
                }
            };
            write_entry(&mut out, ino, mode, nlink, mtime, path, data, rdev);
        }
        write_entry(&mut out, 0, 0, 1, 0, "TRAILER!!!", &[], (0, 0));
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        mtime,
        u32::try_from(data.len()).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// One entry read back from a `newc` archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// Read a `newc` archive (up to its `TRAILER!!!`), for comparing two builds.
pub fn parse_newc(data: &[u8]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let align = |p: usize| (p + 3) & !3;
    loop {
        let hdr = data
            .get(pos..pos + 110)
            .ok_or_else(|| format!("truncated header at byte {pos}"))?;
        if &hdr[..6] != b"070701" {
            return Err(format!("no newc magic at byte {pos}"));
        }
        let field = |i: usize| -> Result<usize, String> {
            let s = std::str::from_utf8(&hdr[6 + i * 8..14 + i * 8])
                .map_err(|_| format!("bad header at byte {pos}"))?;
            usize::from_str_radix(s, 16).map_err(|_| format!("bad header field at byte {pos}"))
        };
        let mode = u32::try_from(field(1)?).map_err(|_| "mode out of range".to_string())?;
        let size = field(6)?;
        let namesize = field(11)?;
        let name_start = pos + 110;
        let name_bytes = data
            .get(name_start..name_start + namesize.saturating_sub(1))
            .ok_or_else(|| format!("truncated name at byte {name_start}"))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let data_start = align(name_start + namesize);
        let body = data
            .get(data_start..data_start + size)
            .ok_or_else(|| format!("truncated data of {name}"))?;
        pos = align(data_start + size);
        if name == "TRAILER!!!" {
            return Ok(out);
        }
        out.push(Entry {
            name,
            mode,
            data: body.to_vec(),
        });
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tree {
        let mut t = Tree::new();
        // Inserted out of order on purpose.
        t.file("/init", 0o755, b"#!\n".to_vec()).expect("init");
        t.symlink("/lib64/ld.so", "/lib/ld.so").expect("link");
        t.dir("/tmp", 0o1777).expect("tmp");
        t.insert(
            "dev/console",
            Node::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .expect("console");
        t
    }

    #[test]
    fn newc_reads_back_what_it_writes() {
        let mut t = Tree::new();
        t.dir("etc", 0o755).expect("dir");
        t.file("etc/a.json", 0o644, b"{}\n".to_vec()).expect("file");
        t.file("init", 0o755, vec![7u8; 5]).expect("file");
        let got = parse_newc(&t.to_newc(1)).expect("parse");
        let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["etc", "etc/a.json", "init"]);
        assert_eq!(got[2].data, vec![7u8; 5]);
        assert_eq!(got[2].mode, S_IFREG | 0o755);
        assert!(parse_newc(b"070701garbage").is_err());
        let full = t.to_newc(1);
        assert!(parse_newc(&full[..full.len() / 2]).is_err(), "truncated");
    }

    #[test]
    fn golden_bytes_of_a_tiny_tree() {
        let bytes = tiny().to_newc(1_700_000_000);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let headers: Vec<&str> = text
            .match_indices("070701")
            .map(|(i, _)| &text[i..i + 110])
            .collect();
        assert_eq!(
            headers.len(),
            7,
            "dev, dev/console, init, lib64, lib64/ld.so, tmp, trailer"
        );
        let names: Vec<String> = text
            .match_indices("070701")
            .map(|(i, _)| {
                let namesize = usize::from_str_radix(&text[i + 94..i + 102], 16).expect("hex");
                text[i + 110..i + 110 + namesize - 1].to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib64",
                "lib64/ld.so",
                "tmp",
                "TRAILER!!!"
            ]
        );
        // dev: ino 1, dir 0755, uid/gid 0, nlink 2, mtime 0x6553F100.
        assert_eq!(
            headers[0],
            "07070100000001000041ED000000000000000000000002\
             6553F100000000000000000000000000000000000000000000000004\
             00000000"
        );
        // dev/console: char device 5,1 mode 0600.
        assert_eq!(
            headers[1],
            "070701000000020000218000000000000000000000000\
             16553F10000000000000000000000000000000005000000010000000C00000000"
        );
        // Full golden digest of the archive (any change to the format shows up here).
        expect_test::expect!["84a41de252d10110122be2b7090001d619c3e17784d1529813601c8eb869f39e"]
            .assert_eq(&crate::image::cache::sha256_bytes(&bytes));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn file_entry_layout_and_padding() {
        let mut t = Tree::new();
        t.file("a", 0o644, b"hello".to_vec()).expect("a");
        let b = t.to_newc(7);
        let mut want = Vec::new();
        want.extend_from_slice(
            b"07070100000001000081A4000000000000000000000001000000070000000500000000000000000000000000000000000000020000000\
0",
        );
        want.extend_from_slice(b"a\0"); // 110 + 2 = 112, aligned
        want.extend_from_slice(b"hello\0\0\0");
        assert_eq!(&b[..want.len()], &want[..]);
        assert!(b[want.len()..].starts_with(b"070701"));
        assert!(String::from_utf8_lossy(&b).contains("TRAILER!!!"));
    }

    #[test]
    fn owner_and_mtime_are_normalised_whatever_the_insertion_order() {
        let a = tiny().to_newc(42);
        let mut t = Tree::new();
        t.dir("tmp", 0o1777).expect("tmp");
        t.insert(
            "dev/console",
            Node::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .expect("c");
        t.symlink("lib64/ld.so", "/lib/ld.so").expect("l");
        t.file("init", 0o755, b"#!\n".to_vec()).expect("i");
        assert_eq!(a, t.to_newc(42), "insertion order does not matter");
        let text = String::from_utf8_lossy(&a).into_owned();
        for (i, _) in text.match_indices("070701") {
            let h = &text[i..i + 110];
            assert_eq!(&h[22..38], "0000000000000000", "uid and gid are 0");
            let mtime = &h[46..54];
            assert!(
                mtime == "0000002A" || h.contains("TRAILER") || mtime == "00000000",
                "{h}"
            );
        }
    }

    #[test]
    fn conflicts_and_bad_paths() {
        let mut t = Tree::new();
        t.file("x", 0o644, vec![1]).expect("x");
        assert_eq!(
            t.file("x", 0o644, vec![1]),
            Ok(()),
            "identical re-insert is fine"
        );
        assert_eq!(
            t.file("x", 0o644, vec![2]),
            Err(TreeError::Conflict("x".into()))
        );
        assert_eq!(
            t.file("x/y", 0o644, vec![]),
            Err(TreeError::Conflict("x".into()))
        );
        assert!(matches!(
            t.file("a/../b", 0o644, vec![]),
            Err(TreeError::BadPath(_))
        ));
        assert!(matches!(
            t.file("/", 0o644, vec![]),
            Err(TreeError::BadPath(_))
        ));
    }
}
