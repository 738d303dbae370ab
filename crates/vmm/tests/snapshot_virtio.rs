//! Snapshots of a VM with virtio-net and virtio-blk on a real KVM, in a network namespace
//! of the test's own: the reference guest serves its disk's files over HTTP; a snapshot
//! taken while it serves restores with byte-identical RAM over the same disk image and TAP,
//! and the guest serves again (its page cache still warm, a connection opened before the
//! snapshot still answering). A copy beside the original needs a TAP and a writable disk
//! of its own, and runs with them.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warmvm_vmm::config::{DiskConfig, NetConfig};
use warmvm_vmm::snapshot::{self, Backing, SnapshotError};
use warmvm_vmm::{Host, HostError, Lifecycle, Vm, VmConfig};

const GUEST: &str = "10.78.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with two persistent TAPs; the host side has an address on the
/// first. Deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("wvm-{}-snapvirtio", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["tuntap", "add", "dev", "wvtapA", "mode", "tap"],
            &["tuntap", "add", "dev", "wvtapB", "mode", "tap"],
            &["addr", "add", "10.78.0.1/24", "dev", "wvtapA"],
            &["link", "set", "wvtapA", "up"],
            &["link", "set", "wvtapB", "up"],
        ] {
            let mut a = vec!["-n", ns.0.as_str()];
            a.extend_from_slice(args);
            ip(&a);
        }
        ns
    }

    /// Move this thread into the namespace: TAPs it opens and sockets it makes live there.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on this thread only, with an open netns fd; no memory is touched.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warmvm-snapv-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn connect() -> TcpStream {
    let s = TcpStream::connect_timeout(
        &format!("{GUEST}:80").parse().unwrap(),
        Duration::from_secs(5),
    )
    .expect("connect to the guest");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn misses(s: &mut TcpStream) -> u64 {
    let (status, body) = warmvm_vmm::testing::http_get(s, "/stats");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["misses"].as_u64().unwrap()
}

fn web_config(name: &str, image: &Path, tap: &str) -> VmConfig {
    let mut c = VmConfig::reference(name, 96, 1);
    c.cmdline = Some(format!(
        "quiet interval_ms=20 disk_check_ms=0 ip={GUEST}/24 cache_mib=16"
    ));
    c.disks = vec![DiskConfig {
        path: image.to_path_buf(),
        read_only: false,
        cache: Default::default(),
    }];
    c.nets = vec![NetConfig {
        tap: Some(tap.into()),
        tap_fd: None,
        mac: None,
    }];
    c
}

fn wait_serving(vm: &Vm, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("http: serving")
    {
        assert!(
            Instant::now() < deadline,
            "VM {} never served: {}",
            vm.name(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until the guest has verified every page `passes` more times, cleanly.
fn wait_verified(vm: &Vm, passes: u64) {
    let start = vm.guest_figures().map_or(0, |g| g.min_passes);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let g = vm.guest_figures();
        if let Some(g) = &g {
            assert_eq!(g.mismatches, 0, "VM {}: {g:?}", vm.name());
            if g.all_verified_clean() && g.min_passes >= start + passes {
                return;
            }
        }
        assert!(Instant::now() < deadline, "VM {}: {g:?}", vm.name());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ram_bytes(vm: &Vm) -> Vec<u8> {
    use warmvm_memory::vm_memory::{Bytes, GuestAddress};
    let mut out = Vec::new();
    for r in vm.shared().ram.regions() {
        let mut buf = vec![0u8; r.size as usize];
        vm.shared()
            .ram
            .memory()
            .read_slice(&mut buf, GuestAddress(r.guest_addr))
            .expect("RAM readable");
        out.extend_from_slice(&buf);
    }
    out
}

#[test]
fn a_serving_virtio_vm_round_trips_through_a_snapshot() {
    if !warmvm_vmm::testing::kvm_available("snapshot_virtio") {
        return;
    }
    let dir = scratch("web");
    let ns = Netns::new();
    ns.enter();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("index.html", b"<html>snapshots serve</html>\n".to_vec()),
        ("big.bin", warmvm_vmm::testing::noise(2 << 20, 21)),
    ];
    let mut image_bytes = warmvm_vmm::testing::ustar_entries(&files);
    image_bytes.resize(8192 * 512, 0);
    let image = dir.join("site.img");
    std::fs::write(&image, &image_bytes).unwrap();

    let mut host = Host::open(&dir).expect("KVM opens");
    let web = host
        .create_vm(&web_config("web", &image, "wvtapA"))
        .expect("VM created");
    web.start().expect("VM starts");
    let log = dir.join("web").join("console.log");
    wait_serving(&web, &log);
    let mut keep = connect();
    for (name, data) in &files {
        assert!(
            warmvm_vmm::testing::http_get(&mut keep, &format!("/{name}")).1 == *data,
            "{name}"
        );
    }
    let warm_misses = misses(&mut keep);

    // Left paused: neither its RAM nor its disk can change while we compare.
    let snap = dir.join("snap");
    let saved = snapshot::save(&web, &snap, false).expect("snapshot of a virtio VM");
    assert_eq!(web.lifecycle(), Lifecycle::Paused);
    let ram_before = ram_bytes(&web);
    assert!(std::fs::read(&image).unwrap() == image_bytes);

    // Beside the original: its TAP and its disk are taken; with its own it runs.
    let copy_image = dir.join("copy.img");
    std::fs::copy(&image, &copy_image).unwrap();
    let mut refused =
        |backing: &Backing, what: &str| match host.restore_snapshot(&snap, Some("copy"), backing) {
            Err(HostError::Snapshot(e @ SnapshotError::InUse { .. })) => {
                assert!(e.to_string().contains(what), "{e}")
            }
            Err(e) => panic!("wrong refusal: {e}"),
            Ok(_) => panic!("restored beside the original over its {what}"),
        };
    refused(&Backing::default(), "TAP wvtapA");
    refused(
        &Backing {
            taps: vec!["wvtapB".into()],
            disks: vec![],
        },
        "disk image",
    );
    assert!(host.find("copy").is_none());
    let too_many = Backing {
        taps: vec!["wvtapB".into(), "wvtapC".into()],
        disks: vec![],
    };
    assert!(matches!(
        host.restore_snapshot(&snap, Some("copy"), &too_many),
        Err(HostError::Snapshot(SnapshotError::BadBacking { .. }))
    ));
    let (copy, _) = host
        .restore_snapshot(
            &snap,
            Some("copy"),
            &Backing {
                taps: vec!["wvtapB".into()],
                disks: vec![copy_image.clone()],
            },
        )
        .expect("a copy with its own TAP and disk");
    assert_eq!(copy.config.nets[0].tap.as_deref(), Some("wvtapB"));
    assert_eq!(copy.config.disks[0].path, copy_image);
    wait_verified(&copy, 1);
    copy.stop(Duration::from_secs(5));
    drop(copy);
    host.remove("copy").expect("copy removed");

    // The original goes; its snapshot brings it back over the same TAP and disk.
    web.stop(Duration::from_secs(5));
    drop(web);
    host.remove("web").expect("original removed");
    let restored = snapshot::restore(
        host.hypervisor(),
        &snap,
        None,
        &Backing::default(),
        &dir.join("restored"),
    )
    .expect("snapshot restored over the same TAP and disk");
    assert!(
        ram_bytes(&restored.vm) == ram_before,
        "the restored RAM differs from the snapshotted VM's"
    );
    assert_eq!(restored.report.ram_bytes, 96 << 20);
    assert!(saved.written_bytes > 0);
    let web: Arc<Vm> = restored.start();
    // The connection opened before the snapshot answers: the guest's TCP state was in
    // its RAM, and the TAP kept the host's side of it.
    assert_eq!(
        warmvm_vmm::testing::http_get(&mut keep, "/index.html").1,
        files[0].1
    );
    let mut fresh = connect();
    for (name, data) in &files {
        assert!(
            warmvm_vmm::testing::http_get(&mut fresh, &format!("/{name}")).1 == *data,
            "{name}"
        );
    }
    assert_eq!(
        misses(&mut fresh),
        warm_misses,
        "files cached before the snapshot missed after the restore"
    );
    wait_verified(&web, 1);
    assert!(
        std::fs::read(&image).unwrap() == image_bytes,
        "the disk changed"
    );
    web.stop(Duration::from_secs(5));
    drop(ns);
    let _ = std::fs::remove_dir_all(dir);
}
