//! Clients that try to exhaust the daemon: slow-loris connections on the loopback metrics
//! port (open to every local user) must not lock root out of the API socket or stop a warm
//! reboot, and a crowd of concurrent clients gets answers or 503s, never a reset.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use warmvm_testkit::*;

/// What a client read back: the status of a complete HTTP answer, or why there was none.
fn outcome(mut s: impl Read) -> Result<u16, String> {
    let mut data = Vec::new();
    match s.read_to_end(&mut data) {
        Ok(_) if data.is_empty() => Err("closed without an answer".into()),
        Ok(_) => warmvm_api::http::parse_response(&data)
            .map(|r| {
                if r.status == 503 {
                    let v: serde_json::Value = serde_json::from_slice(&r.body)
                        .unwrap_or_else(|e| panic!("a 503 without a JSON body ({e})"));
                    assert!(v["error"].is_string(), "{v}");
                }
                r.status
            })
            .map_err(|e| format!("bad answer: {e}")),
        Err(e) => Err(format!("{:?}: {e}", e.kind())),
    }
}

#[test]
fn slow_clients_on_the_metrics_port_lock_out_neither_the_api_nor_a_warm_reboot() {
    if !warmvm_testkit::kvm_available(
        "slow_clients_on_the_metrics_port_lock_out_neither_the_api_nor_a_warm_reboot",
    ) {
        return;
    }
    let dir = scratch("slowloris");
    let addr = "127.0.0.1:19481";
    let mut d = Daemon::start(
        &dir,
        &["--metrics-addr", addr, "--request-timeout-ms", "3000"],
    );
    let c = d.client();
    c.create(&serde_json::from_value(reference_vm("calm")).unwrap())
        .unwrap();

    // 100 connections (the old shared limit was 64), each sending one byte of a request
    // and then one more now and then: the lock-out.
    let mut slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"G").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for s in &mut slow {
        let _ = s.write_all(b"E");
    }

    // The metrics port's own budget is used up: one more scraper gets a 503 with a body.
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(outcome(&extra), Ok(503));

    let t = Instant::now();
    let status = c
        .status()
        .expect("the API answers while the metrics port is flooded");
    let status_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status["vm_count"], 1);

    let t = Instant::now();
    let report = c.reboot("warm", None).expect("a warm reboot goes through");
    let reboot_ms = t.elapsed().as_secs_f64() * 1e3;
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    eprintln!(
        "with 100 slow metrics clients: GET /v1/status {status_ms:.1} ms, warm reboot {reboot_ms:.1} ms"
    );

    // Every slow client got an answer (503 over the budget, 408 past its deadline) or was
    // closed when the old daemon handed over and exited; none is held past its deadline.
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for s in slow {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let key = match outcome(&s) {
            Ok(code) => code.to_string(),
            Err(e) => e,
        };
        *statuses.entry(key).or_default() += 1;
    }
    eprintln!("slow clients' outcomes: {statuses:?}");
    assert!(
        statuses
            .keys()
            .all(|k| ["503", "408", "closed without an answer"].contains(&k.as_str())),
        "{statuses:?}"
    );
    let vm = d.client().show("calm").unwrap();
    assert_eq!(vm["state"], "running", "{vm}");
}

#[test]
fn two_hundred_concurrent_clients_get_answers_or_503s_never_resets() {
    if !warmvm_testkit::kvm_available(
        "two_hundred_concurrent_clients_get_answers_or_503s_never_resets",
    ) {
        return;
    }
    let dir = scratch("crowd");
    let d = Daemon::start(&dir, &["--max-connections", "16"]);
    // 12 idle connections hold most of the budget, so the crowd overflows it for sure.
    let idle: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let clients = 200;
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = d.socket.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut s = UnixStream::connect(&socket).map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .map_err(|e| format!("send: {e}"))?;
                outcome(&s)
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for t in threads {
        let key = match t.join().unwrap() {
            Ok(code) => code.to_string(),
            Err(e) => e,
        };
        *statuses.entry(key).or_default() += 1;
    }
    drop(idle);
    eprintln!("200 concurrent clients, 4 free connections: {statuses:?}");
    let answered = statuses.get("200").copied().unwrap_or(0);
    let refused = statuses.get("503").copied().unwrap_or(0);
    assert_eq!(answered + refused, clients, "{statuses:?}");
    assert!(
        refused > 0,
        "the crowd never overflowed the budget: {statuses:?}"
    );
    let metrics = d.client().metrics().unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("warmvm_api_refused_connections_total "))
        .unwrap();
    assert_eq!(
        line,
        format!("warmvm_api_refused_connections_total {refused}")
    );
}
