//! `cargo xtask model pack <file.gguf> --name NAME [--revision REV] [--out DIR]`: write a model
//! disk (`model.img`: the GGUF, zeros to 4 KiB, its dm-verity hash tree) and `model.json`.
//!
//! The format (layout, tree, salt, model hash) is defined in `measurements::model_disk` and
//! described in `measurements/README.md`, "Model disks"; this module only moves bytes. It
//! streams: the GGUF is read in 1 MiB chunks, written to the disk file and hashed as it goes;
//! the tree's level 0 is written into the disk file while the data is copied, the upper levels
//! are computed by reading the level below back from the same file. Memory stays at a few MiB
//! whatever the model size. Output depends only on the GGUF bytes, the name and the revision.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use measurements::model_disk::{
    self, BLOCK_SIZE, DISK_FILE, HashStore, JSON_FILE, Layout, ModelJson, TreeBuilder,
};
use sha2::Digest as _;

use crate::progress;

const CHUNK: usize = 1 << 20;

/// What `pack` is asked to do.
#[derive(Debug, Clone)]
pub struct PackOptions {
    pub gguf: PathBuf,
    pub name: String,
    /// Default: `sha256-` + the first 16 hex digits of the GGUF's SHA-256.
    pub revision: Option<String>,
    pub out: PathBuf,
    pub quiet: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Packed {
    pub disk: PathBuf,
    pub json_path: PathBuf,
    pub json: ModelJson,
    pub seconds: f64,
}

/// The hash area of the disk file being written (offsets from `hash_offset`).
struct FileStore<'a> {
    file: &'a File,
    hash_offset: u64,
}

impl HashStore for FileStore<'_> {
    fn write_block(&mut self, index: u64, block: &[u8; BLOCK_SIZE]) -> std::io::Result<()> {
        self.file
            .write_all_at(block, self.hash_offset + index * BLOCK_SIZE as u64)
    }

    fn read_block(&mut self, index: u64, block: &mut [u8; BLOCK_SIZE]) -> std::io::Result<()> {
        self.file
            .read_exact_at(block, self.hash_offset + index * BLOCK_SIZE as u64)
    }
}

/// Progress lines: every 5 % or every 5 s, whichever comes first (only for files over 64 MiB).
struct Ticker {
    total: u64,
    start: Instant,
    last_pct: u64,
    last_at: Instant,
    on: bool,
}

impl Ticker {
    fn new(total: u64, quiet: bool) -> Self {
        let now = Instant::now();
        Ticker {
            total,
            start: now,
            last_pct: 0,
            last_at: now,
            on: !quiet && total > 64 << 20,
        }
    }

    fn tick(&mut self, done: u64) {
        if !self.on {
            return;
        }
        let pct = done * 100 / self.total.max(1);
        if pct >= self.last_pct + 5 || self.last_at.elapsed() >= Duration::from_secs(5) {
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "model pack: {pct:>3}% ({} of {}, {:.0} MiB/s)",
                progress::bytes(done),
                progress::bytes(self.total),
                done as f64 / secs / f64::from(1 << 20)
            );
            self.last_pct = pct;
            self.last_at = Instant::now();
        }
    }
}

/// Pack `opts.gguf` into `opts.out/model.img` and `opts.out/model.json`.
pub fn pack(opts: &PackOptions) -> anyhow::Result<Packed> {
    let start = Instant::now();
    model_disk::check_label("--name", &opts.name)?;
    if let Some(r) = &opts.revision {
        model_disk::check_label("--revision", r)?;
    }
    let meta = std::fs::metadata(&opts.gguf).with_context(|| {
        format!(
            "cannot read {}: pass an existing GGUF file (e.g. the one `cargo xtask model fetch \
             smollm2-135m` prints)",
            opts.gguf.display()
        )
    })?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file: pass the GGUF file itself",
            opts.gguf.display()
        );
    }
    if meta.len() == 0 {
        bail!(
            "{} is empty: pass a GGUF file with content",
            opts.gguf.display()
        );
    }
    if opts.out.exists() && !opts.out.is_dir() {
        bail!(
            "--out {} exists and is not a directory: pass a directory (it is created if missing)",
            opts.out.display()
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating the output directory {}", opts.out.display()))?;
    let layout = Layout::new(meta.len())?;

    let mut src =
        File::open(&opts.gguf).with_context(|| format!("opening {}", opts.gguf.display()))?;
    let disk_path = opts.out.join(DISK_FILE);
    let tmp_path = opts.out.join(format!("{DISK_FILE}.tmp"));
    // Read and write: the upper levels are read back from the file.
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    // Sized up front: level 0 is written beyond the data while the data is still being copied.
    disk.set_len(layout.disk_size())
        .with_context(|| format!("sizing {} (disk full?)", tmp_path.display()))?;

    let store = FileStore {
        file: &disk,
        hash_offset: layout.hash_offset(),
    };
    let mut tree = TreeBuilder::new(layout.clone(), &model_disk::SALT, store);
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut ticker = Ticker::new(layout.file_size, opts.quiet);
    loop {
        let n = src
            .read(&mut buf)
            .with_context(|| format!("reading {}", opts.gguf.display()))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        disk.write_all_at(chunk, done)
            .with_context(|| format!("writing {}", tmp_path.display()))?;
        sha.update(chunk);
        tree.update(chunk)?;
        done += n as u64;
        ticker.tick(done);
    }
    // The padding of the last data block: already zeros, since set_len extended the file with
    // zeros and nothing else is written there.
    let (root, _) = tree.finish()?;
    disk.sync_all()
        .with_context(|| format!("flushing {}", tmp_path.display()))?;
    drop(disk);
    std::fs::rename(&tmp_path, &disk_path)
        .with_context(|| format!("renaming {} to {}", tmp_path.display(), disk_path.display()))?;

    let gguf_sha: [u8; 32] = sha.finalize().into();
    let revision = opts
        .revision
        .clone()
        .unwrap_or_else(|| format!("sha256-{}", &hex::encode(gguf_sha)[..16]));
    let json = ModelJson::new(&opts.name, &revision, &layout, &gguf_sha, &root);
    json.validate()?;
    let json_path = opts.out.join(JSON_FILE);
    std::fs::write(&json_path, json.to_canonical_json())
        .with_context(|| format!("writing {}", json_path.display()))?;
    Ok(Packed {
        disk: disk_path,
        json_path,
        json,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Default output directory: `<repo>/out/models/<name>`.
pub fn default_out(repo: &Path, name: &str) -> PathBuf {
    repo.join("out").join("models").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf(dir: &Path, n: usize) -> PathBuf {
        let p = dir.join("m.gguf");
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, data).expect("write");
        p
    }

    fn opts(gguf: &Path, out: &Path) -> PackOptions {
        PackOptions {
            gguf: gguf.to_path_buf(),
            name: "tiny".into(),
            revision: Some("r1".into()),
            out: out.to_path_buf(),
            quiet: true,
        }
    }

    #[test]
    fn pack_twice_is_byte_identical_and_layout_is_as_documented() {
        let t = tempfile::tempdir().expect("tmp");
        let src = gguf(t.path(), 130 * 4096 + 77);
        let a = pack(&opts(&src, &t.path().join("a"))).expect("a");
        let b = pack(&opts(&src, &t.path().join("deeper/b"))).expect("b");
        let da = std::fs::read(&a.disk).expect("disk a");
        assert_eq!(da, std::fs::read(&b.disk).expect("disk b"));
        assert_eq!(
            std::fs::read(&a.json_path).expect("json a"),
            std::fs::read(&b.json_path).expect("json b")
        );
        assert_eq!(a.json.verity.root_hash, b.json.verity.root_hash);
        let data = std::fs::read(&src).expect("src");
        let v = &a.json.verity;
        assert_eq!(v.hash_offset, 131 * 4096);
        assert_eq!(&da[..data.len()], &data[..]);
        assert!(
            da[data.len()..v.hash_offset as usize]
                .iter()
                .all(|&x| x == 0)
        );
        assert_eq!(da.len() as u64, a.json.disk_size);
        // The tree on disk equals the in-memory builder's.
        let layout = Layout::new(data.len() as u64).expect("layout");
        let mut tb = TreeBuilder::new(layout, &model_disk::SALT, Vec::new());
        tb.update(&data).expect("update");
        let (root, area) = tb.finish().expect("finish");
        assert_eq!(hex::encode(root), v.root_hash);
        assert_eq!(&da[v.hash_offset as usize..], &area[..]);
        assert_eq!(a.json.gguf.sha256, hex::encode(sha2::Sha256::digest(&data)));
        // No leftover temporary file.
        let names: Vec<_> = std::fs::read_dir(t.path().join("a"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn default_revision_comes_from_the_content() {
        let t = tempfile::tempdir().expect("tmp");
        let src = gguf(t.path(), 10);
        let mut o = opts(&src, &t.path().join("o"));
        o.revision = None;
        let p = pack(&o).expect("pack");
        assert!(p.json.revision.starts_with("sha256-"));
        assert_eq!(p.json.revision.len(), 7 + 16);
        assert!(p.json.gguf.sha256.starts_with(&p.json.revision[7..]));
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let t = tempfile::tempdir().expect("tmp");
        let src = gguf(t.path(), 10);
        let e =
            pack(&opts(&t.path().join("absent.gguf"), &t.path().join("o"))).expect_err("missing");
        assert!(format!("{e:#}").contains("pass an existing GGUF"), "{e:#}");
        let empty = t.path().join("empty.gguf");
        std::fs::write(&empty, b"").expect("write");
        let e = pack(&opts(&empty, &t.path().join("o"))).expect_err("empty");
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
        let mut o = opts(&src, &t.path().join("o"));
        o.name = "bad/name".into();
        let e = pack(&o).expect_err("name");
        assert!(format!("{e:#}").contains("A-Z a-z 0-9"), "{e:#}");
        let mut o = opts(&src, &t.path().join("o"));
        o.revision = Some("a@b".into());
        assert!(pack(&o).is_err());
        let file_out = t.path().join("file");
        std::fs::write(&file_out, b"x").expect("write");
        let e = pack(&opts(&src, &file_out)).expect_err("out is a file");
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
        let e = pack(&opts(t.path(), &t.path().join("o"))).expect_err("dir as input");
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
    }

    fn veritysetup() -> Option<PathBuf> {
        [
            "/usr/sbin/veritysetup",
            "/sbin/veritysetup",
            "/usr/bin/veritysetup",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    }

    /// `veritysetup verify` accepts the packed disk, and `veritysetup format` of the same data
    /// with our parameters gives the same root hash and the same tree bytes.
    #[test]
    fn veritysetup_agrees() {
        let Some(vs) = veritysetup() else {
            eprintln!(
                "SKIPPED: veritysetup not installed (Debian: apt-get install cryptsetup-bin); the \
                 dm-verity compatibility of model pack was not checked"
            );
            return;
        };
        // `veritysetup verify` of a packed disk (data and tree in one file, no superblock).
        let verify = |disk: &Path, v: &measurements::model_disk::VerityInfo| {
            std::process::Command::new(&vs)
                .arg("verify")
                .arg(disk)
                .arg(disk)
                .arg(&v.root_hash)
                .arg("--no-superblock")
                .arg(format!("--hash-offset={}", v.hash_offset))
                .arg(format!("--data-blocks={}", v.data_blocks))
                .arg(format!("--salt={}", v.salt))
                .args(["--data-block-size=4096", "--hash-block-size=4096"])
                .args(["--hash=sha256", "--format=1"])
                .output()
                .expect("run veritysetup verify")
        };
        let t = tempfile::tempdir().expect("tmp");
        for (i, n) in [4096usize, 5000, 129 * 4096 + 3].into_iter().enumerate() {
            let dir = t.path().join(format!("case{i}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            let src = gguf(&dir, n);
            let p = pack(&opts(&src, &dir.join("out"))).expect("pack");
            let v = &p.json.verity;
            let out = verify(&p.disk, v);
            assert!(
                out.status.success(),
                "veritysetup verify refused case {i} ({n} bytes): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // veritysetup's own tree of the padded data, in a separate hash file.
            let disk = std::fs::read(&p.disk).expect("disk");
            let data_path = dir.join("data");
            std::fs::write(&data_path, &disk[..v.hash_offset as usize]).expect("data");
            let hash_path = dir.join("hash");
            let out = std::process::Command::new(&vs)
                .arg("format")
                .arg(&data_path)
                .arg(&hash_path)
                .arg("--no-superblock")
                .arg(format!("--salt={}", v.salt))
                .args(["--data-block-size=4096", "--hash-block-size=4096"])
                .args(["--hash=sha256", "--format=1"])
                .output()
                .expect("run veritysetup format");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let root = stdout
                .lines()
                .find_map(|l| l.strip_prefix("Root hash:"))
                .map(str::trim)
                .expect("veritysetup prints the root hash");
            assert_eq!(root, v.root_hash, "case {i} ({n} bytes)");
            let theirs = std::fs::read(&hash_path).expect("hash file");
            assert_eq!(
                &disk[v.hash_offset as usize..],
                &theirs[..],
                "case {i}: tree bytes"
            );
            // A flipped data byte is caught.
            let mut bad = disk.clone();
            bad[n / 2] ^= 0x40;
            let bad_path = dir.join("bad.img");
            std::fs::write(&bad_path, &bad).expect("bad");
            let out = verify(&bad_path, v);
            assert!(!out.status.success(), "case {i}: corrupted disk accepted");
        }
    }
}
