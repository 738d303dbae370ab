//! Live migration on /dev/kvm: reference guests move between two hosts of this process
//! over loopback TCP.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::stream::{self, Msg};
use super::*;
use crate::testing::{kvm_available, running_vm, wait_verified, ScratchDir};
use crate::{Host, Lifecycle, Vm};

const MIB: u64 = 256;

/// A connected pair of loopback TCP streams with timeouts, as a daemon would set them.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    let client = TcpStream::connect(addr).expect("connected");
    let (server, _) = listener.accept().expect("accepted");
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
    }
    (client, server)
}

/// Migrate `vm` from `from` to `to`; the VM as it runs at `to`, and the report.
fn migrate(
    from: &mut Host,
    to: &mut Host,
    vm: Arc<Vm>,
    opts: &SendOptions,
) -> (Arc<Vm>, MigrationReport) {
    let (src, dst) = tcp_pair();
    let (sent, received) = std::thread::scope(|s| {
        let to_ref = &*to;
        let receiver = s.spawn(move || {
            let taken = |name: &str| to_ref.find(name).is_some();
            receive(
                to_ref.hypervisor(),
                dst,
                &ReceiveOptions {
                    state_dir: to_ref.state_dir().to_path_buf(),
                    name_taken: &taken,
                    answer: &|_, _| Outcome::NotCommitted,
                },
            )
        });
        let sent = send(&vm, src, opts);
        (sent, receiver.join().expect("the receiver did not panic"))
    });
    let report = sent.expect("migrated");
    let received = received.expect("received");
    let expected = if opts.force {
        EndReason::Forced
    } else {
        EndReason::Converged
    };
    assert_eq!(report.end, expected, "{}", summary(&report));
    // The source's copy: handed over, and not running (its counter stands still).
    assert_eq!(vm.lifecycle(), Lifecycle::HandedOver);
    let frozen = vm.guest_figures().expect("figures").counter;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        vm.guest_figures().expect("figures").counter,
        frozen,
        "the source's copy ran after the commit"
    );
    from.drop_handed_over();
    drop(vm);
    let moved = Arc::new(received.vm);
    to.attach(moved.clone());
    assert_eq!(moved.lifecycle(), Lifecycle::Running);
    // It continues where it stopped: its counter goes on from the frozen copy's.
    wait_verified(&moved, 1);
    let g = moved.guest_figures().expect("figures");
    assert!(g.counter > frozen, "counter {} after {frozen}", g.counter);
    assert_eq!(
        (
            g.mismatches,
            g.register_check_failures,
            g.time_went_backwards
        ),
        (0, 0, 0),
        "{g:?}"
    );
    (moved, report)
}

fn summary(r: &MigrationReport) -> String {
    let rounds: Vec<String> = r
        .rounds
        .iter()
        .map(|x| {
            format!(
                "{}:{}p/{}z/{}KiB",
                x.round,
                x.pages,
                x.zero_pages,
                x.bytes >> 10
            )
        })
        .collect();
    format!(
        "total {} ms, downtime {} us (final round {} us, state {} us, commit {} us, resume {} us), {} KiB sent, bandwidth {} MiB/s, rounds [{}]",
        r.total_us / 1000,
        r.downtime_us,
        r.final_round_us,
        r.state_us,
        r.commit_us,
        r.resume_us,
        r.bytes_total >> 10,
        r.bandwidth_bps >> 20,
        rounds.join(" ")
    )
}

#[test]
fn a_reference_guest_migrates_there_and_back_and_never_runs_twice() {
    let test = "a_reference_guest_migrates_there_and_back_and_never_runs_twice";
    if !kvm_available(test) {
        return;
    }
    let (dir_a, dir_b) = (ScratchDir::new("mig-a"), ScratchDir::new("mig-b"));
    let mut a = Host::open(&dir_a).expect("KVM opens");
    let mut b = Host::open(&dir_b).expect("KVM opens");
    let vm = running_vm(&mut a, "travel", MIB);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Progress>::new()));
    let log = seen.clone();
    let opts = SendOptions {
        progress: Some(ProgressHook(Arc::new(move |p| {
            log.lock().unwrap().push(p.clone())
        }))),
        ..Default::default()
    };
    let there = migrate(&mut a, &mut b, vm, &opts);
    // One progress report per pre-copy round, the last one's estimate within the budget.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), there.1.rounds.len() - 1, "{seen:?}");
    let last = seen.last().expect("a round");
    assert!(last.downtime_estimate_us <= 300_000, "{last:?}");
    assert_eq!(last.bandwidth_bps, there.1.bandwidth_bps);
    eprintln!("{test}: A→B {}", summary(&there.1));
    let back = migrate(&mut b, &mut a, there.0, &SendOptions::default());
    eprintln!("{test}: B→A {}", summary(&back.1));
    assert!(a.find("travel").is_some() && b.find("travel").is_none());
    // Bytes sent: no more than the RAM the guest touched and the rounds' re-sends.
    assert!(
        there.1.bytes_total <= there.1.ram_bytes * 2,
        "{}",
        summary(&there.1)
    );
    back.0.stop(Duration::from_millis(100));
}

/// A page the VMM itself writes while pre-copy runs (KVM's log does not see it) reaches
/// the destination.
#[test]
fn a_page_the_vmm_writes_between_rounds_arrives() {
    let test = "a_page_the_vmm_writes_between_rounds_arrives";
    if !kvm_available(test) {
        return;
    }
    let (dir_a, dir_b) = (ScratchDir::new("migw-a"), ScratchDir::new("migw-b"));
    let mut a = Host::open(&dir_a).expect("KVM opens");
    let mut b = Host::open(&dir_b).expect("KVM opens");
    let vm = running_vm(&mut a, "vmmwrite", 64);
    // The end of the command line's page: the guest read it at boot and never touches it.
    let at = GuestAddress(warmvm_abi::layout::CMDLINE_ADDR + warmvm_abi::layout::CMDLINE_MAX - 8);
    let marker = 0x005e_ed0f_da7a_u64;
    let writer = vm.clone();
    let opts = SendOptions {
        between_rounds: Some(RoundHook(Arc::new(move |round| {
            if round == 0 {
                writer
                    .shared
                    .ram
                    .memory()
                    .write_obj(marker, at)
                    .expect("written");
            }
        }))),
        ..Default::default()
    };
    let (moved, report) = migrate(&mut a, &mut b, vm, &opts);
    eprintln!("{test}: {}", summary(&report));
    let got: u64 = moved.shared.ram.memory().read_obj(at).expect("read");
    assert_eq!(
        got, marker,
        "the VMM's write after round 0 did not reach the destination"
    );
    moved.stop(Duration::from_millis(100));
}

/// A destination that takes the pages and drops the stream when the state comes: the
/// source resumes and the guest runs on, verified.
#[test]
fn a_destination_that_drops_the_stream_before_ready_leaves_the_vm_running_here() {
    let test = "a_destination_that_drops_the_stream_before_ready_leaves_the_vm_running_here";
    if !kvm_available(test) {
        return;
    }
    let dir = ScratchDir::new("migdrop");
    let mut a = Host::open(&dir).expect("KVM opens");
    let vm = running_vm(&mut a, "stays", 64);
    let (src, mut dst) = tcp_pair();
    let fake = std::thread::spawn(move || {
        stream::read_magic(&mut dst).expect("magic");
        assert!(matches!(stream::recv(&mut dst), Ok(Msg::Hello(_))));
        stream::send(
            &mut dst,
            &Msg::Accepted {
                receiver: "fake".into(),
            },
        )
        .expect("sent");
        loop {
            match stream::recv(&mut dst).expect("a message") {
                Msg::RoundEnd { round } => {
                    stream::send(&mut dst, &Msg::RoundAck { round }).expect("sent");
                }
                Msg::State { .. } => return, // drops the stream
                _ => {}
            }
        }
    });
    let before = vm.guest_figures().expect("figures").counter;
    let failed = send(&vm, src, &SendOptions::default()).expect_err("the destination vanished");
    fake.join().expect("the fake destination did not panic");
    eprintln!("{test}: {} ({:?})", failed.error, failed.report.end);
    assert!(
        matches!(failed.report.end, EndReason::Failed { ref step, .. } if step == "restore"),
        "{:?}",
        failed.report.end
    );
    assert_eq!(vm.lifecycle(), Lifecycle::Running);
    wait_verified(&vm, 1);
    assert!(vm.guest_figures().expect("figures").counter > before);
    vm.stop(Duration::from_millis(100));
}

/// A guest that dirties more than a (tiny) budget allows never converges: at the round
/// or time limit the migration is cancelled, the destination discards its copy, and the
/// VM runs on at the source, verified.
#[test]
fn pre_copy_that_does_not_converge_is_cancelled_at_the_round_and_time_limits() {
    let test = "pre_copy_that_does_not_converge_is_cancelled_at_the_round_and_time_limits";
    if !kvm_available(test) {
        return;
    }
    let (dir_a, dir_b) = (ScratchDir::new("migc-a"), ScratchDir::new("migc-b"));
    let mut a = Host::open(&dir_a).expect("KVM opens");
    let b = Host::open(&dir_b).expect("KVM opens");
    let vm = busy_vm(&mut a, "busy");
    // At the round limit, and (a second attempt on the same VM) at the time limit.
    let by_rounds = SendOptions {
        downtime: Duration::from_nanos(1),
        max_rounds: 4,
        between_rounds: Some(let_the_guest_run()),
        ..Default::default()
    };
    let by_time = SendOptions {
        downtime: Duration::from_nanos(1),
        timeout: Duration::from_millis(1500),
        between_rounds: Some(let_the_guest_run()),
        ..Default::default()
    };
    for (opts, says) in [(by_rounds, "4 rounds sent"), (by_time, "1500 ms passed")] {
        let (src, dst) = tcp_pair();
        let (sent, received) = std::thread::scope(|s| {
            let b = &b;
            let receiver = s.spawn(move || {
                receive(
                    b.hypervisor(),
                    dst,
                    &ReceiveOptions {
                        state_dir: b.state_dir().to_path_buf(),
                        name_taken: &|_| false,
                        answer: &|_, _| Outcome::NotCommitted,
                    },
                )
            });
            (send(&vm, src, &opts), receiver.join().expect("no panic"))
        });
        let failed = sent.expect_err("cancelled");
        eprintln!("{test}: {}: {}", failed.error, summary(&failed.report));
        assert!(
            matches!(failed.report.end, EndReason::Cancelled { ref why } if why.contains(says)),
            "{:?}",
            failed.report.end
        );
        if opts.max_rounds == 4 {
            assert_eq!(failed.report.rounds.len(), 4);
        }
        assert!(
            failed.report.rounds[1..].iter().all(|r| r.pages > 0),
            "the guest dirtied pages every round"
        );
        assert!(matches!(received, Err(MigrationError::Aborted(_))));
        assert_eq!(failed.report.downtime_us, 0, "the VM never paused");
        assert_eq!(vm.lifecycle(), Lifecycle::Running);
        assert!(
            !vm.shared.kvm_vm().dirty_logging(),
            "logging stops with the migration"
        );
        wait_verified(&vm, 1);
    }
    wait_verified(&vm, 1);
    vm.stop(Duration::from_millis(100));
}

/// A reference guest of 64 MiB that rewrites every page on every pass, without a pause
/// between passes: a working set that does not converge under a tiny budget.
fn busy_vm(host: &mut Host, name: &str) -> Arc<Vm> {
    let mut c = crate::VmConfig::reference(name, 64, 1);
    c.cmdline = Some("quiet interval_ms=0 refill_every=1".into());
    let vm = host.create_vm(&c).expect("VM created");
    vm.start().expect("VM starts");
    wait_verified(&vm, 1);
    vm
}

/// Give the guest 100 ms between rounds: on a loaded host a round can end before its
/// vCPU thread got a core, and a round with nothing dirty rightly converges.
fn let_the_guest_run() -> RoundHook {
    RoundHook(Arc::new(|_| std::thread::sleep(Duration::from_millis(100))))
}

/// The same working set with `force`: at the round limit it stops and copies, and the
/// guest runs on at the destination, verified.
#[test]
fn pre_copy_that_does_not_converge_is_forced_at_the_round_limit_with_force() {
    let test = "pre_copy_that_does_not_converge_is_forced_at_the_round_limit_with_force";
    if !kvm_available(test) {
        return;
    }
    let (dir_a, dir_b) = (ScratchDir::new("migf-a"), ScratchDir::new("migf-b"));
    let mut a = Host::open(&dir_a).expect("KVM opens");
    let mut b = Host::open(&dir_b).expect("KVM opens");
    let vm = busy_vm(&mut a, "forced");
    let opts = SendOptions {
        downtime: Duration::from_nanos(1),
        max_rounds: 3,
        force: true,
        between_rounds: Some(let_the_guest_run()),
        ..Default::default()
    };
    let (moved, report) = migrate(&mut a, &mut b, vm, &opts);
    eprintln!("{test}: {}", summary(&report));
    assert_eq!(
        report.rounds.len(),
        4,
        "three pre-copy rounds and the final one"
    );
    moved.stop(Duration::from_millis(100));
}

/// Refusals come before anything pauses: a state format too new, a name taken. The VM
/// never stopped.
#[test]
fn an_incompatible_destination_refuses_before_the_pause() {
    let test = "an_incompatible_destination_refuses_before_the_pause";
    if !kvm_available(test) {
        return;
    }
    let (dir_a, dir_b) = (ScratchDir::new("migr-a"), ScratchDir::new("migr-b"));
    let mut a = Host::open(&dir_a).expect("KVM opens");
    let b = Host::open(&dir_b).expect("KVM opens");
    let vm = running_vm(&mut a, "picky", 64);
    let newer = SendOptions {
        announce_state_format: Some(crate::state::envelope::FORMAT_VERSION + 1),
        ..Default::default()
    };
    for (opts, taken, says) in [
        (newer, false, "state format"),
        (SendOptions::default(), true, "already exists"),
    ] {
        let (src, dst) = tcp_pair();
        let parked_before = vm.handles()[0].park_times();
        let t = Instant::now();
        let (sent, received) = std::thread::scope(|s| {
            let b = &b;
            let receiver = s.spawn(move || {
                receive(
                    b.hypervisor(),
                    dst,
                    &ReceiveOptions {
                        state_dir: b.state_dir().to_path_buf(),
                        name_taken: &|_| taken,
                        answer: &|_, _| Outcome::NotCommitted,
                    },
                )
            });
            (send(&vm, src, &opts), receiver.join().expect("no panic"))
        });
        let failed = sent.expect_err("refused");
        eprintln!(
            "{test}: {} after {} ms",
            failed.error,
            t.elapsed().as_millis()
        );
        assert!(
            matches!(failed.error, MigrationError::Refused(ref why) if why.contains(says)),
            "{}",
            failed.error
        );
        assert!(received.is_err());
        assert_eq!(failed.report.downtime_us, 0);
        assert_eq!(
            vm.handles()[0].park_times(),
            parked_before,
            "the vCPU never parked"
        );
        assert_eq!(vm.lifecycle(), Lifecycle::Running);
    }
    wait_verified(&vm, 1);
    vm.stop(Duration::from_millis(100));
}

/// The stream breaks after `Commit` left, before `Running` came back: the source cannot
/// know whether the destination runs the VM, so it keeps it paused, in doubt, and
/// nothing resumes it.
#[test]
fn a_stream_that_breaks_after_the_commit_leaves_the_vm_paused_in_doubt() {
    let test = "a_stream_that_breaks_after_the_commit_leaves_the_vm_paused_in_doubt";
    if !kvm_available(test) {
        return;
    }
    let dir = ScratchDir::new("migdoubt");
    let mut a = Host::open(&dir).expect("KVM opens");
    let vm = running_vm(&mut a, "doubt", 64);
    let (src, mut dst) = tcp_pair();
    let fake = std::thread::spawn(move || {
        stream::read_magic(&mut dst).expect("magic");
        assert!(matches!(stream::recv(&mut dst), Ok(Msg::Hello(_))));
        stream::send(
            &mut dst,
            &Msg::Accepted {
                receiver: "fake".into(),
            },
        )
        .expect("sent");
        loop {
            match stream::recv(&mut dst).expect("a message") {
                Msg::RoundEnd { round } => {
                    stream::send(&mut dst, &Msg::RoundAck { round }).expect("sent");
                }
                Msg::State { .. } => stream::send(&mut dst, &Msg::Ready).map(drop).expect("sent"),
                Msg::Commit => return, // drops the stream without `Running`
                _ => {}
            }
        }
    });
    let failed = send(&vm, src, &SendOptions::default()).expect_err("not confirmed");
    fake.join().expect("the fake destination did not panic");
    eprintln!("{test}: {}", failed.error);
    assert!(
        matches!(failed.error, MigrationError::InDoubt(_)),
        "{}",
        failed.error
    );
    assert!(matches!(failed.report.end, EndReason::Failed { ref step, .. } if step == "commit"));
    assert_eq!(vm.lifecycle(), Lifecycle::InDoubt);
    // Paused: the guest's counter stands still, and a resume is refused.
    let frozen = vm.guest_figures().expect("figures").counter;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.guest_figures().expect("figures").counter, frozen);
    assert!(
        crate::Pausable::resume(&*vm).is_err(),
        "an in-doubt VM was resumed"
    );
    assert_eq!(vm.guest_figures().expect("figures").counter, frozen);

    // Settled by an answer only: "undecided" changes nothing; "never committed" resumes
    // it here, and its counter goes on from where it stood.
    assert!(matches!(
        settle(&vm, Outcome::Undecided),
        Err(MigrationError::Undecided)
    ));
    assert_eq!(vm.lifecycle(), Lifecycle::InDoubt);
    settle(&vm, Outcome::NotCommitted).expect("resumed");
    assert_eq!(vm.lifecycle(), Lifecycle::Running);
    wait_verified(&vm, 1);
    assert!(vm.guest_figures().expect("figures").counter > frozen);
    assert!(matches!(
        settle(&vm, Outcome::Committed),
        Err(MigrationError::NotInDoubt { .. })
    ));
    assert_eq!(vm.lifecycle(), Lifecycle::Running);
}

#[test]
fn once_commit_has_left_the_source_never_reports_the_vm_running() {
    let test = "once_commit_has_left_the_source_never_reports_the_vm_running";
    if !kvm_available(test) {
        return;
    }
    let dir = ScratchDir::new("migcommit");
    let mut a = Host::open(&dir).expect("KVM opens");
    let vm = running_vm(&mut a, "committing", 64);
    let (src, mut dst) = tcp_pair();
    let seen = vm.clone();
    // A destination that, holding Commit, looks at the source's VM before it answers: it
    // may run the VM from now on, so the source must not call it running.
    let fake = std::thread::spawn(move || {
        stream::read_magic(&mut dst).expect("magic");
        assert!(matches!(stream::recv(&mut dst), Ok(Msg::Hello(_))));
        stream::send(
            &mut dst,
            &Msg::Accepted {
                receiver: "fake".into(),
            },
        )
        .expect("sent");
        loop {
            match stream::recv(&mut dst).expect("a message") {
                Msg::RoundEnd { round } => {
                    stream::send(&mut dst, &Msg::RoundAck { round }).expect("sent");
                }
                Msg::State { .. } => stream::send(&mut dst, &Msg::Ready).map(drop).expect("sent"),
                Msg::Commit => {
                    let at_commit = seen.lifecycle();
                    stream::send(&mut dst, &Msg::Running { resume_us: 0 }).expect("sent");
                    return at_commit;
                }
                _ => {}
            }
        }
    });
    let report = send(&vm, src, &SendOptions::default()).expect("migrated");
    let at_commit = fake.join().expect("the fake destination did not panic");
    assert_eq!(report.end, EndReason::Converged);
    assert_eq!(
        at_commit,
        Lifecycle::InDoubt,
        "the source called the VM {} while the destination held Commit",
        at_commit.name()
    );
    assert_eq!(vm.lifecycle(), Lifecycle::HandedOver);
}

/// The disk's requests per device counter: (failures, requests).
fn disk_counters(vm: &Vm) -> (u64, u64) {
    let counters = vm.shared.devices.virtio_counters();
    let disk = counters.iter().find(|c| c.0 == "disk0").expect("a disk");
    (disk.1, disk.2)
}

/// Wait until the VM's disk has served `n` requests, none failing.
fn wait_disk_requests(vm: &Vm, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (failures, requests) = disk_counters(vm);
        assert_eq!(failures, 0, "VM {}: the disk failed", vm.name());
        if requests >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VM {}: {requests} disk requests",
            vm.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest that re-reads and checks the files on its virtio disk every 20 ms migrates in
/// the middle of that I/O: the device's writes into guest memory (data, used ring) during
/// pre-copy and the quiesce reach the destination, whose disk serves on, and no check
/// fails on either side.
#[test]
fn a_guest_reading_its_disk_migrates_mid_io() {
    let test = "a_guest_reading_its_disk_migrates_mid_io";
    if !kvm_available(test) {
        return;
    }
    let (dir_a, dir_b) = (ScratchDir::new("migd-a"), ScratchDir::new("migd-b"));
    let image = dir_a.join("disk.img");
    let mut bytes = crate::testing::ustar_entries(&[
        ("a.bin", crate::testing::noise(256 << 10, 7)),
        ("b.bin", crate::testing::noise(64 << 10, 8)),
    ]);
    bytes.resize(2048 * 512, 0);
    std::fs::write(&image, &bytes).expect("disk image");
    let mut a = Host::open(&dir_a).expect("KVM opens");
    let mut b = Host::open(&dir_b).expect("KVM opens");
    let mut c = crate::VmConfig::reference("disky", 64, 1);
    c.cmdline = Some("quiet interval_ms=10 disk_check_ms=20".into());
    c.disks = vec![crate::config::DiskConfig {
        path: image.clone(),
        read_only: true,
        cache: Default::default(),
    }];
    let vm = a.create_vm(&c).expect("VM created");
    vm.start().expect("VM starts");
    wait_verified(&vm, 1);
    wait_disk_requests(&vm, 50);
    let source_log = vm.console_log.clone();
    let (moved, report) = migrate(&mut a, &mut b, vm, &SendOptions::default());
    eprintln!("{test}: {}", summary(&report));
    wait_disk_requests(&moved, 50);
    wait_verified(&moved, 1);
    for log in [source_log, moved.console_log.clone()] {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for bad in ["DISK MISMATCH", "read failed"] {
            assert!(!text.contains(bad), "{}: {bad}\n{text}", log.display());
        }
    }
    moved.stop(Duration::from_millis(100));
}
