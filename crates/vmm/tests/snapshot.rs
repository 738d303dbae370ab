//! VM snapshots on a real KVM: a snapshot restored under a new name runs beside the
//! original with byte-identical RAM; truncated, corrupt and foreign snapshots are refused
//! and create nothing; a full disk leaves the VM running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use warmvm_vmm::snapshot::{self, SnapshotError};
use warmvm_vmm::testing::{ram_bytes, running_vm, wait_verified, ScratchDir};
use warmvm_vmm::{Host, HostError, Lifecycle, Pausable};

#[test]
fn a_snapshot_restored_under_a_new_name_runs_beside_the_original() {
    if !warmvm_vmm::testing::kvm_available("snapshot_new_name") {
        return;
    }
    let dir = ScratchDir::new("snap-rename");
    let mut host = Host::open(&dir).expect("KVM opens");
    let orig = running_vm(&mut host, "orig", 64);
    // Left paused: its RAM cannot change while we compare.
    let saved = snapshot::save(&orig, &dir.join("snap"), false).expect("snapshot taken");
    assert_eq!(orig.lifecycle(), Lifecycle::Paused);
    assert!(
        saved.written_bytes > 0 && saved.written_bytes <= 64 << 20,
        "{saved:?}"
    );
    let restored = snapshot::restore(
        host.hypervisor(),
        &dir.join("snap"),
        Some("copy"),
        &Default::default(),
        &dir,
    )
    .expect("snapshot restored");
    assert_eq!(restored.vm.name(), "copy");
    assert!(
        ram_bytes(&orig) == ram_bytes(&restored.vm),
        "the restored RAM differs from the original's"
    );
    let copy = restored.start();
    orig.resume().expect("the original resumes");
    // Both go on verifying their (identical, now independent) RAM.
    wait_verified(&copy, 2);
    wait_verified(&orig, 2);
    assert_eq!(copy.lifecycle(), Lifecycle::Running);
    assert_eq!(orig.lifecycle(), Lifecycle::Running);
    let log = std::fs::read_to_string(dir.join("copy").join("console.log")).unwrap_or_default();
    assert!(dir.join("copy").join("console.log").exists(), "{log}");
    // A directory that holds a snapshot is not overwritten.
    assert!(matches!(
        snapshot::save(&orig, &dir.join("snap"), true),
        Err(SnapshotError::Exists(_))
    ));
    assert_eq!(orig.lifecycle(), Lifecycle::Running);
    copy.stop(Duration::from_secs(5));
    orig.stop(Duration::from_secs(5));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn truncated_corrupt_and_foreign_snapshots_are_refused_and_create_nothing() {
    if !warmvm_vmm::testing::kvm_available("snapshot_refused") {
        return;
    }
    let dir = ScratchDir::new("snap-refused");
    let mut host = Host::open(&dir).expect("KVM opens");
    let vm = running_vm(&mut host, "src", 32);
    let good = dir.join("good");
    snapshot::save(&vm, &good, true).expect("snapshot taken");
    assert_eq!(vm.lifecycle(), Lifecycle::Running);

    let mut variant = |name: &str, spoil: &dyn Fn(&Path)| -> String {
        let d = dir.join(name);
        copy_dir(&good, &d);
        spoil(&d);
        let before = host.vms().len();
        let err = match host.restore_snapshot(&d, Some(name), &Default::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{name}: a spoilt snapshot was restored"),
        };
        assert_eq!(host.vms().len(), before, "{name}: a VM was created");
        assert!(host.find(name).is_none());
        assert!(!err.contains('\n'), "{name}: not one line: {err}");
        // Each spoilt copy is as large as the snapshot: gone before the next is made.
        std::fs::remove_dir_all(&d).unwrap();
        err
    };
    let e = variant("truncated", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("ram0.bin"))
            .unwrap();
        f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    });
    assert!(e.contains("truncated"), "{e}");
    // The guest filled its RAM from the first MiBs on: byte 2 MiB holds data.
    let e = variant("corrupt-ram", &|d| flip_byte(&d.join("ram0.bin"), 2 << 20));
    assert!(e.contains("corrupt"), "{e}");
    let e = variant("corrupt-state", &|d| {
        let len = std::fs::metadata(d.join("vm.state")).unwrap().len();
        flip_byte(&d.join("vm.state"), len - 3);
    });
    assert!(e.contains("checksum mismatch"), "{e}");
    let e = variant("foreign", &|d| {
        std::fs::write(
            d.join("vm.state"),
            b"WARMVMHO this is a handover state, not a snapshot",
        )
        .unwrap()
    });
    assert!(e.contains("not a warmvm snapshot"), "{e}");
    let e = variant("newer", &|d| {
        let mut b = std::fs::read(d.join("vm.state")).unwrap();
        b[8..12].copy_from_slice(&(snapshot::FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(d.join("vm.state"), b).unwrap();
    });
    assert!(e.contains("newer"), "{e}");
    let e = variant("incomplete", &|d| {
        std::fs::remove_file(d.join("vm.state")).unwrap()
    });
    assert!(e.contains("holds no warmvm snapshot"), "{e}");
    // The original under its own name is refused too: it exists.
    assert!(matches!(
        host.restore_snapshot(&good, None, &Default::default()),
        Err(HostError::Exists(_))
    ));
    // ... and the good one restores.
    let (copy, _) = host
        .restore_snapshot(&good, Some("good-copy"), &Default::default())
        .expect("the intact snapshot restores");
    wait_verified(&copy, 1);
    wait_verified(&vm, 1);
    host.stop_all(Duration::from_secs(5));
}

/// A small tmpfs, unmounted (and its directory removed) when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: PathBuf, mib: u64) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot mount a tmpfs at {} (the test needs root)",
            at.display()
        );
        Self(at)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_fails_the_snapshot_and_leaves_the_vm_running() {
    if !warmvm_vmm::testing::kvm_available("snapshot_full_disk") {
        return;
    }
    let dir = ScratchDir::new("snap-full");
    let mut host = Host::open(&dir).expect("KVM opens");
    let vm = running_vm(&mut host, "big", 64);
    let fs = SmallFs::mount(dir.join("small"), 16);
    assert!(snapshot::free_bytes(&fs.0).unwrap() < snapshot::needed_bytes(&vm));
    let err = snapshot::save(&vm, &fs.0.join("snap"), true).expect_err("the disk is full");
    let msg = err.to_string();
    assert!(msg.contains("No space left"), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(vm.lifecycle(), Lifecycle::Running);
    // Nothing half-written is left behind.
    assert!(!fs.0.join("snap").exists());
    wait_verified(&vm, 2);
    drop(fs);
    host.stop_all(Duration::from_secs(5));
}
