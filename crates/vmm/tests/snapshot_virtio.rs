//! Snapshots of a VM with virtio-net and virtio-blk on a real KVM, in a network namespace
//! of the test's own: the reference guest serves its disk's files over HTTP; a snapshot
//! taken while it serves restores with byte-identical RAM over the same disk image and TAP,
//! and the guest serves again (its page cache still warm, a connection opened before the
//! snapshot still answering). A copy beside the original needs a TAP and a writable disk
//! of its own, and runs with them.

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warmvm_vmm::config::{DiskConfig, NetConfig};
use warmvm_vmm::snapshot::{self, Backing, SnapshotError};
use warmvm_vmm::testing::{ram_bytes, wait_verified, Netns, ScratchDir};
use warmvm_vmm::{Host, HostError, Lifecycle, Vm, VmConfig};

const GUEST: &str = "10.78.0.2";

fn connect() -> TcpStream {
    warmvm_vmm::testing::connect_http(GUEST)
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

#[test]
fn a_serving_virtio_vm_round_trips_through_a_snapshot() {
    if !warmvm_vmm::testing::kvm_available("snapshot_virtio") {
        return;
    }
    let dir = ScratchDir::new("snapv-web");
    // Two TAPs, the host's address on the first: the second is for a copy beside the
    // original.
    let ns = Netns::new("snapvirtio");
    ns.add_tap("wvtapA", Some("10.78.0.1/24"));
    ns.add_tap("wvtapB", None);
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
}
