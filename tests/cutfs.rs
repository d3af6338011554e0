//! The power-cut file system on its own: a cut keeps exactly what was
//! synced. These pin the model the power-cut loop relies on.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::cutfs::CutFs;

/// A mounted file system in a fresh directory, or `None` (said loudly)
/// where FUSE is not available.
fn mounted() -> Option<(tempfile::TempDir, CutFs)> {
    if !CutFs::available() {
        eprintln!(
            "SKIPPED: no /dev/fuse or not root; the power-cut file system cannot be mounted here"
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = CutFs::mount(dir.path()).expect("mounting cutfs");
    Some((dir, fs))
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn unsynced_data_is_gone_after_a_cut_and_synced_data_stays() {
    let Some((dir, mut fs)) = mounted() else {
        return;
    };
    let root = dir.path();
    let path = root.join("log");
    let mut f = File::create(&path).unwrap();
    sync_dir(root);
    f.write_all(b"synced").unwrap();
    f.sync_data().unwrap();
    f.write_all(b" and not").unwrap();
    assert_eq!(
        fs::read(&path).unwrap(),
        b"synced and not",
        "live reads see every write"
    );
    drop(f);
    fs.cut();
    assert_eq!(fs::read(&path).unwrap(), b"synced");
    let counts = fs.counts();
    assert_eq!(counts.cuts, 1);
    assert_eq!(counts.bytes_dropped, 8);
}

#[test]
fn an_overwrite_in_place_reverts_to_the_synced_bytes() {
    let Some((dir, mut fs)) = mounted() else {
        return;
    };
    let path = dir.path().join("mark");
    let f = File::create(&path).unwrap();
    sync_dir(dir.path());
    f.write_all_at(&[1; 12], 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&[2; 12], 0).unwrap();
    // Past a page boundary too: pages are shared between the layers.
    f.write_all_at(&[3; 10], 4090).unwrap();
    drop(f);
    fs.cut();
    assert_eq!(fs::read(&path).unwrap(), vec![1; 12]);
}

#[test]
fn an_unsynced_truncation_is_undone() {
    let Some((dir, mut fs)) = mounted() else {
        return;
    };
    let path = dir.path().join("db");
    let f = File::create(&path).unwrap();
    sync_dir(dir.path());
    f.write_all_at(&vec![7; 10_000], 0).unwrap();
    f.sync_all().unwrap();
    f.set_len(100).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 100);
    drop(f);
    fs.cut();
    assert_eq!(fs::read(&path).unwrap(), vec![7; 10_000]);
}

#[test]
fn a_new_file_needs_its_directory_synced() {
    let Some((dir, mut fs)) = mounted() else {
        return;
    };
    let root = dir.path();
    // Name synced, data not: there, empty (a file's new size is lost too).
    let mut empty = File::create(root.join("empty")).unwrap();
    fs::create_dir(root.join("sub")).unwrap();
    sync_dir(root);
    empty.write_all(b"unsynced").unwrap();
    // Data synced, name not: gone.
    let mut lost = File::create(root.join("lost")).unwrap();
    lost.write_all(b"x").unwrap();
    lost.sync_all().unwrap();
    // A file in a directory whose own entry is durable but whose entries
    // were never synced: gone.
    let deep = File::create(root.join("sub/deep")).unwrap();
    deep.sync_all().unwrap();
    drop((lost, empty, deep));
    fs.cut();
    assert!(!root.join("lost").exists());
    assert_eq!(fs::read(root.join("empty")).unwrap(), b"");
    assert!(root.join("sub").is_dir());
    assert!(!root.join("sub/deep").exists());
}

#[test]
fn renames_and_removals_need_their_directory_synced() {
    let Some((dir, mut fs)) = mounted() else {
        return;
    };
    let root = dir.path();
    for name in ["a", "b", "c"] {
        let mut f = File::create(root.join(name)).unwrap();
        f.write_all(name.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    sync_dir(root);
    fs::rename(root.join("a"), root.join("a2")).unwrap();
    fs::remove_file(root.join("b")).unwrap();
    fs.cut();
    assert_eq!(
        fs::read(root.join("a")).unwrap(),
        b"a",
        "unsynced rename undone"
    );
    assert!(!root.join("a2").exists());
    assert_eq!(
        fs::read(root.join("b")).unwrap(),
        b"b",
        "unsynced removal undone"
    );
    // Synced, they stay.
    fs::rename(root.join("a"), root.join("a2")).unwrap();
    fs::remove_file(root.join("b")).unwrap();
    sync_dir(root);
    fs.cut();
    assert_eq!(fs::read(root.join("a2")).unwrap(), b"a");
    assert!(!root.join("a").exists() && !root.join("b").exists());
    assert_eq!(fs::read(root.join("c")).unwrap(), b"c");
}

#[test]
fn hard_links_share_the_file_and_its_syncs() {
    let Some((dir, mut fs)) = mounted() else {
        return;
    };
    let root = dir.path();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(root.join("blob"))
        .unwrap();
    f.write_all(b"blob").unwrap();
    f.sync_all().unwrap();
    fs::hard_link(root.join("blob"), root.join("keep")).unwrap();
    sync_dir(root);
    fs::remove_file(root.join("blob")).unwrap();
    sync_dir(root);
    drop(f);
    fs.cut();
    assert!(!root.join("blob").exists());
    assert_eq!(fs::read(root.join("keep")).unwrap(), b"blob");
}
