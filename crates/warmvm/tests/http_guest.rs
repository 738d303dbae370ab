//! The reference guest as a web server on virtio-net and virtio-blk, in a network namespace
//! of the test's own: real TCP clients fetch files from the tar archive on its disk; a long
//! download and a keep-alive connection started before a warm reboot complete byte for byte
//! after it, and files that were warm before it cause no new cache misses after it; clients
//! that keep stopping, with less buffer than the window they offered, still get every byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use warmvm_testkit::http_get as get;
use warmvm_testkit::*;

const GUEST: &str = "10.77.0.2";

fn connect() -> TcpStream {
    connect_http(GUEST)
}

/// Shrink `s`'s receive buffer to 16 KiB after the handshake offered a much larger window:
/// Linux then drops segments the guest sends into the window it was promised, and the
/// guest's TCP must retransmit and probe its way on.
fn shrink_receive_buffer(s: &TcpStream) {
    let size: libc::c_int = 16 * 1024;
    // SAFETY: setsockopt reads an int from a pointer valid for the call, on the stream's
    // open socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

fn stats(s: &mut TcpStream) -> serde_json::Value {
    let (status, body) = get(s, "/stats");
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// A daemon in `ns` with one reference guest `name` serving `files` from its disk over
/// HTTP; the daemon and the guest's console log, once the guest says it serves.
fn start_web_guest(
    dir: &Path,
    ns: &Netns,
    name: &str,
    files: &[(&str, Vec<u8>)],
) -> (Daemon, std::path::PathBuf) {
    let image = dir.join("site.img");
    std::fs::write(&image, tar_image(files, 8192)).unwrap();
    let d = Daemon::start_in_netns(dir, &ns.name);
    let created = d.cli_json(&[
        "vm",
        "create",
        "--name",
        name,
        "--memory",
        "96",
        "--cmdline",
        &format!("quiet interval_ms=20 disk_check_ms=0 ip={GUEST}/24 cache_mib=16"),
        "--disk",
        image.to_str().unwrap(),
        "--net",
        &ns.tap,
    ]);
    let console = std::path::PathBuf::from(created["console_log"].as_str().unwrap());
    assert!(
        wait_until(60, || read(&console).contains("http: serving")),
        "the guest never served\n{}\n{}",
        read(&console),
        d.log()
    );
    (d, console)
}

#[test]
fn http_from_a_cached_disk_across_a_warm_reboot() {
    if !warmvm_testkit::kvm_available("http_from_a_cached_disk_across_a_warm_reboot") {
        return;
    }
    let dir = scratch("http");
    let ns = Netns::new("http", "10.77.0.1/24");
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "index.html",
            b"<html><body>warmvm serves</body></html>\n".to_vec(),
        ),
        ("big.bin", warmvm_vmm::testing::noise(3 << 20, 11)),
        ("docs/a.txt", warmvm_vmm::testing::noise(10_000, 12)),
    ];
    let (mut d, console) = start_web_guest(&dir, &ns, "web-1", &files);

    // Cold: every file comes from the disk, and is right.
    let expected = files.clone();
    let warm_misses = in_netns(&ns.name, move || {
        let mut s = connect();
        let fresh = stats(&mut s);
        assert_eq!(fresh["hits"], 0, "a cold guest's cache is empty: {fresh}");
        for (name, data) in &expected {
            let (status, body) = get(&mut s, &format!("/{name}"));
            assert_eq!(status, 200, "{name}");
            assert!(body == *data, "{name}: wrong bytes");
        }
        assert_eq!(get(&mut s, "/missing").0, 404);
        let warm = stats(&mut s);
        assert!(warm["misses"].as_u64().unwrap() > 0, "{warm}");
        warm["misses"].as_u64().unwrap()
    });

    // A keep-alive connection and a long download, both begun before the reboot.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let big = files[1].1.clone();
    let small = files[2].1.clone();
    let ns_name = ns.name.clone();
    let client = std::thread::spawn(move || {
        in_netns(&ns_name, move || {
            let mut keep = connect();
            assert_eq!(get(&mut keep, "/docs/a.txt").1, small);
            let mut long = connect();
            // A small receive buffer, and a reader that stops until the reboot is done,
            // keep all but a few KiB of the download for after the reboot.
            shrink_receive_buffer(&long);
            write!(long, "GET /big.bin HTTP/1.1\r\nHost: guest\r\n\r\n").unwrap();
            let mut first = vec![0u8; 200_000];
            long.read_exact(&mut first).unwrap();
            started_tx.send(()).unwrap();
            rx.recv().unwrap(); // the reboot is done
            let split = first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head = String::from_utf8_lossy(&first[..split]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(len, big.len());
            let mut body = first[split..].to_vec();
            let mut rest = vec![0u8; len - body.len()];
            long.read_exact(&mut rest)
                .expect("the long download was cut");
            body.extend_from_slice(&rest);
            assert!(body == big, "the long download has wrong bytes");
            // The same keep-alive connection answers after the reboot.
            assert_eq!(get(&mut keep, "/docs/a.txt").1, small);
            let (status, body) = get(&mut keep, "/index.html");
            assert_eq!(status, 200);
            body
        })
    });
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the download began");
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    tx.send(()).unwrap();
    let index = client.join().expect("clients across the reboot");
    assert_eq!(index, files[0].1);

    // Warm files cost no new misses after the reboot.
    let expected = files.clone();
    in_netns(&ns.name, move || {
        let mut s = connect();
        for (name, data) in &expected {
            assert!(get(&mut s, &format!("/{name}")).1 == *data, "{name}");
        }
        let after = stats(&mut s);
        assert_eq!(
            after["misses"].as_u64().unwrap(),
            warm_misses,
            "files warm before the reboot missed after it: {after}"
        );
    });
    let log = read(&console);
    assert!(!log.contains("MISMATCH"), "{log}");
    let r = d.cli_json(&["vm", "stop", "web-1", "--grace-secs", "10"]);
    assert_eq!(r["exit_status"], 0, "{r}");
    d.terminate_adopted();
}

#[test]
fn http_from_a_cached_disk_across_a_saved_reboot() {
    if !warmvm_testkit::kvm_available("http_from_a_cached_disk_across_a_saved_reboot") {
        return;
    }
    let dir = scratch("http-saved");
    let ns = Netns::new("httpsv", "10.77.0.1/24");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("index.html", b"<html>saved and restored</html>\n".to_vec()),
        ("big.bin", warmvm_vmm::testing::noise(2 << 20, 31)),
    ];
    let (mut d, console) = start_web_guest(&dir, &ns, "web-s", &files);
    // Warm the guest's page cache, and keep a connection open across the reboot.
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_client) = std::sync::mpsc::channel::<u64>();
    let expected = files.clone();
    let ns_name = ns.name.clone();
    let client = std::thread::spawn(move || {
        in_netns(&ns_name, move || {
            let mut keep = connect();
            for (name, data) in &expected {
                assert!(get(&mut keep, &format!("/{name}")).1 == *data, "{name}");
            }
            let warm = stats(&mut keep)["misses"].as_u64().unwrap();
            to_test.send(warm).unwrap();
            from_test.recv().unwrap(); // the reboot is done
                                       // The same connection answers after the reboot, from the cache it had.
            for (name, data) in &expected {
                assert!(get(&mut keep, &format!("/{name}")).1 == *data, "{name}");
            }
            let mut fresh = connect();
            let after = stats(&mut fresh);
            assert_eq!(
                after["misses"].as_u64().unwrap(),
                warm,
                "files cached before the saved reboot missed after it: {after}"
            );
        })
    });
    from_client
        .recv_timeout(Duration::from_secs(30))
        .expect("the client warmed the cache");
    let out = d.cli_json(&["reboot", "--mode", "saved"]);
    let new_pid = out["handover"]["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    let vms = out["reboot"]["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{out}");
    assert!(vms[0]["error"].is_null(), "{out}\n{}", d.log());
    to_client.send(()).unwrap();
    client.join().expect("HTTP across the saved reboot");
    let web = d.client().show("web-s").unwrap();
    assert_eq!(web["state"], "running", "{web}");
    assert!(!read(&console).contains("MISMATCH"));
    assert!(
        std::fs::read(dir.join("site.img")).unwrap() == tar_image(&files, 8192),
        "the guest only reads its disk, yet it changed"
    );
    let r = d.cli_json(&["vm", "stop", "web-s", "--grace-secs", "10"]);
    assert_eq!(r["exit_status"], 0, "{r}");
    d.terminate_adopted();
}

/// Fetch `/big.bin` (`big`) as a client that reads 5000 bytes, stops for 30 ms and reads
/// again, into a buffer smaller than the window it first offered (a busy or memory-starved
/// host); how many times it stopped.
fn download_stopping_often(big: &[u8]) -> u32 {
    let mut s = connect();
    shrink_receive_buffer(&s);
    // A stall the guest recovers from lasts at most its keep-alive interval (0.5 s); one it
    // does not recover from lasts for ever.
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    write!(s, "GET /big.bin HTTP/1.1\r\nHost: guest\r\n\r\n").unwrap();
    let mut got = Vec::with_capacity(big.len() + 512);
    let mut chunk = [0u8; 5000];
    let split = loop {
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).expect("the response head");
        assert!(n > 0, "the guest closed before its head");
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..split]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut stops = 0u32;
    while got.len() - split < big.len() {
        let want = chunk.len().min(big.len() - (got.len() - split));
        s.read_exact(&mut chunk[..want]).unwrap_or_else(|e| {
            panic!(
                "the download stopped at {} of {} bytes after {stops} stops: {e}",
                got.len() - split,
                big.len()
            )
        });
        got.extend_from_slice(&chunk[..want]);
        std::thread::sleep(Duration::from_millis(30));
        stops += 1;
    }
    assert!(got[split..] == big[..], "the download has wrong bytes");
    stops
}

/// Clients that keep stopping, into buffers smaller than the windows they first offered,
/// make Linux drop segments and shut and reopen its windows over and over. Before the
/// guest's connections sent keep-alive probes, about one such download in four stopped for
/// good, early, while the window shrank: smoltcp had given up its retransmission on a shut
/// window, and Linux, whose segments had been dropped rather than refused, sent nothing
/// more. Eight in a row make that all but certain to show (downloads side by side spread
/// the guest's bursts and hid it).
#[test]
fn readers_that_keep_stopping_get_their_whole_downloads() {
    if !warmvm_testkit::kvm_available("readers_that_keep_stopping_get_their_whole_downloads") {
        return;
    }
    let dir = scratch("http-slow");
    let ns = Netns::new("httpslow", "10.77.0.1/24");
    let big = warmvm_vmm::testing::noise(128 << 10, 41);
    let files: Vec<(&str, Vec<u8>)> = vec![("big.bin", big.clone())];
    let (d, console) = start_web_guest(&dir, &ns, "web-slow", &files);
    let stops = in_netns(&ns.name, move || {
        (0..8)
            .map(|_| download_stopping_often(&big))
            .collect::<Vec<u32>>()
    });
    assert!(stops.iter().all(|&n| n >= 25), "{stops:?}");
    let log = read(&console);
    assert!(!log.contains("MISMATCH"), "{log}");
    let r = d.cli_json(&["vm", "stop", "web-slow", "--grace-secs", "10"]);
    assert_eq!(r["exit_status"], 0, "{r}");
}
