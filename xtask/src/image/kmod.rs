//! Kernel-module selection: the modules `worker.yaml` names plus their dependencies, in load
//! order (dependencies first), read from each module's `.modinfo` `depends=` after xz
//! decompression (Debian's kernel packages ship no `modules.dep`; depmod runs at install time).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context as _;

use super::elf;

/// Canonical module name: `-` and `_` are the same to the kernel.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a `.ko`/`.ko.xz`/`.ko.zst` file path.
pub fn name_of_path(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .strip_suffix(".xz")
        .or_else(|| file.strip_suffix(".zst"))
        .or_else(|| file.strip_suffix(".gz"))
        .unwrap_or(file);
    stem.strip_suffix(".ko").map(canonical)
}

/// Result of the selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Canonical names in load order.
    pub load_order: Vec<String>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// Compute the load order. `available` maps canonical names to module files, `builtin` holds the
/// canonical names of built-in modules, `deps_of` returns a module's `depends=` list.
pub fn load_order(
    requested: &[String],
    available: &BTreeMap<String, String>,
    builtin: &BTreeSet<String>,
    mut deps_of: impl FnMut(&str) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Selection> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut skipped = Vec::new();
    for r in requested {
        let name = canonical(r);
        if builtin.contains(&name) {
            if !skipped.contains(&name) {
                skipped.push(name);
            }
            continue;
        }
        visit(
            &name,
            None,
            available,
            builtin,
            &mut deps_of,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(Selection {
        load_order: order,
        builtin: skipped,
    })
}

#[allow(clippy::too_many_arguments)]
fn visit(
    name: &str,
    needed_by: Option<&str>,
    available: &BTreeMap<String, String>,
    builtin: &BTreeSet<String>,
    deps_of: &mut impl FnMut(&str) -> anyhow::Result<Vec<String>>,
    done: &mut BTreeSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        anyhow::bail!(
            "kernel module dependency cycle: {} -> {name}",
            stack.join(" -> ")
        );
    }
    if !available.contains_key(name) {
        match needed_by {
            None => anyhow::bail!(
                "kernel module {name} (from kernel.modules in worker.yaml) is neither a module file nor built into \
                 this kernel: fix the name (see /lib/modules/<release>/ in the kernel package)"
            ),
            Some(parent) => anyhow::bail!(
                "kernel module {parent} depends on {name}, which the kernel package lacks"
            ),
        }
    }
    stack.push(name.to_string());
    for dep in deps_of(name)? {
        visit(
            &canonical(&dep),
            Some(name),
            available,
            builtin,
            deps_of,
            done,
            stack,
            order,
        )?;
    }
    stack.pop();
    done.insert(name.to_string());
    order.push(name.to_string());
    Ok(())
}

/// Decompress a module file according to its extension.
pub fn decompress(path: &Path, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(data), &mut out)
            .map_err(|e| anyhow::anyhow!("xz-decompressing {name}: {e:?}"))?;
        Ok(out)
    } else if name.ends_with(".zst") {
        zstd::stream::decode_all(data).with_context(|| format!("zstd-decompressing {name}"))
    } else if name.ends_with(".ko") {
        Ok(data.to_vec())
    } else {
        anyhow::bail!("unsupported module compression: {name}")
    }
}

/// The `depends=` list of a (decompressed) module.
pub fn depends(module_elf: &[u8]) -> anyhow::Result<Vec<String>> {
    let info = elf::modinfo(module_elf)?;
    Ok(info
        .iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// Parse `modules.builtin` (one `kernel/.../name.ko` per line) into canonical names.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(name_of_path).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avail(names: &[&str]) -> BTreeMap<String, String> {
        names
            .iter()
            .map(|n| (canonical(n), format!("kernel/{n}.ko.xz")))
            .collect()
    }

    #[test]
    fn dependencies_come_first_in_request_order() {
        let deps: BTreeMap<&str, Vec<&str>> = [
            ("tdx_guest", vec!["tsm"]),
            ("tsm", vec!["configfs"]),
            ("configfs", vec![]),
            ("dm_verity", vec!["dm-mod", "dm-bufio", "reed_solomon"]),
            ("dm_mod", vec![]),
            ("dm_bufio", vec![]),
            ("reed_solomon", vec![]),
            ("crc32c_generic", vec![]),
        ]
        .into_iter()
        .collect();
        let available = avail(&[
            "tdx-guest",
            "tsm",
            "configfs",
            "dm-verity",
            "dm-mod",
            "dm-bufio",
            "reed_solomon",
            "crc32c_generic",
        ]);
        let builtin: BTreeSet<String> = ["virtio_pci".to_string()].into();
        let req: Vec<String> = [
            "configfs",
            "crc32c_generic",
            "virtio_pci",
            "tdx-guest",
            "dm-verity",
        ]
        .map(String::from)
        .into();
        let sel = load_order(&req, &available, &builtin, |n| {
            Ok(deps[n].iter().map(|s| s.to_string()).collect())
        })
        .expect("order");
        assert_eq!(
            sel.load_order,
            [
                "configfs",
                "crc32c_generic",
                "tsm",
                "tdx_guest",
                "dm_mod",
                "dm_bufio",
                "reed_solomon",
                "dm_verity"
            ]
        );
        assert_eq!(sel.builtin, ["virtio_pci"]);
    }

    #[test]
    fn gpu_modules_leave_out_what_the_first_list_loads() {
        // As add_modules selects kernel.gpu_modules: the first list's load order counts as
        // present, so the GPU list holds only the GPU modules and their other dependencies.
        let available = avail(&[
            "nvidia",
            "nvidia-uvm",
            "nvidia-modeset",
            "drm",
            "virtio_blk",
        ]);
        let deps = |n: &str| {
            Ok(match n {
                "nvidia_uvm" => vec!["nvidia".into()],
                "nvidia" => vec!["drm".into(), "virtio_blk".into()],
                _ => vec![],
            })
        };
        let first = load_order(&["virtio_blk".into()], &available, &BTreeSet::new(), deps)
            .expect("first list");
        let mut present: BTreeSet<String> = ["virtio_pci".to_string()].into();
        present.extend(first.load_order.iter().cloned());
        let gpu = load_order(
            &["nvidia".into(), "nvidia-uvm".into()],
            &available,
            &present,
            deps,
        )
        .expect("gpu list");
        assert_eq!(gpu.load_order, vec!["drm", "nvidia", "nvidia_uvm"]);
    }

    #[test]
    fn unknown_modules_and_cycles_are_errors() {
        let available = avail(&["a", "b"]);
        let none = BTreeSet::new();
        let err = load_order(&["zzz".into()], &available, &none, |_| Ok(vec![]))
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("zzz") && err.contains("worker.yaml"), "{err}");
        let err = load_order(&["a".into()], &available, &none, |n| {
            Ok(vec![if n == "a" { "b" } else { "a" }.into()])
        })
        .expect_err("cycle")
        .to_string();
        assert!(err.contains("cycle"), "{err}");
        let err = load_order(&["a".into()], &available, &none, |_| {
            Ok(vec!["missing_dep".into()])
        })
        .expect_err("dep")
        .to_string();
        assert!(err.contains("a depends on missing_dep"), "{err}");
    }

    #[test]
    fn names_and_builtin_list() {
        assert_eq!(
            name_of_path("kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko.xz").as_deref(),
            Some("tdx_guest")
        );
        assert_eq!(name_of_path("README"), None);
        let b = parse_builtin("kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/fuse/virtiofs.ko\n");
        assert!(b.contains("virtio_pci") && b.contains("virtiofs"));
    }

    #[test]
    fn reads_depends_from_an_xz_compressed_module() {
        let elf = crate::image::elf::tests::build_elf(
            &[(".modinfo", b"depends=tsm,configfs\0name=tdx_guest\0")],
            &[],
        );
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(&elf[..]), &mut xz).expect("xz");
        let raw = decompress(Path::new("tdx-guest.ko.xz"), &xz).expect("decompress");
        assert_eq!(raw, elf);
        assert_eq!(depends(&raw).expect("depends"), ["tsm", "configfs"]);
        let none = crate::image::elf::tests::build_elf(&[(".modinfo", b"depends=\0")], &[]);
        assert!(depends(&none).expect("depends").is_empty());
    }
}
