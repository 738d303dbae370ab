//! Network namespaces for tests that give guests TAP devices: the namespace keeps the TAPs,
//! the addresses and all traffic away from the host's own network, and goes when dropped.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

/// Run `ip ARGS`; panic with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of a test's own, deleted when dropped (also when the test panics,
/// as the guard is dropped while unwinding).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace `wvm-PID-TAG` with its loopback up; `tag` keeps tests apart. A
    /// leftover of the same name (a killed earlier run) is deleted first.
    pub fn new(tag: &str) -> Netns {
        let name = format!("wvm-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// A persistent TAP `tap`, up, with the host's address `host_cidr` on it if given
    /// (e.g. `10.77.0.1/24`).
    pub fn add_tap(&self, tap: &str, host_cidr: Option<&str>) {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        if let Some(cidr) = host_cidr {
            self.ip(&["addr", "add", cidr, "dev", tap]);
        }
        self.ip(&["link", "set", tap, "up"]);
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Move the calling thread into the namespace: TAPs it opens and sockets it makes
    /// live there.
    pub fn enter(&self) {
        enter_netns(&self.name);
    }

    /// `GET http://ADDR/PATH` with curl from inside the namespace (at most 5 s); the body
    /// if it answered 2xx.
    pub fn fetch(&self, addr: &str, path: &str) -> Option<Vec<u8>> {
        let out = self
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "5"])
            .arg(format!("http://{addr}{path}"))
            .output()
            .expect("run curl");
        out.status.success().then_some(out.stdout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Move the calling thread into network namespace `name`.
pub fn enter_netns(name: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{name}")).expect("open the netns");
    // SAFETY: setns on this thread only, with an open netns fd; no memory is touched.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Run `f` on a thread that has entered network namespace `name` (sockets and TAPs it
/// opens live there); its result.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter_netns(&name);
        f()
    })
    .join()
    .expect("the thread in the netns")
}

/// A TCP connection to the reference guest's HTTP server at `ip`:80 (connect within 5 s,
/// reads time out after 20 s).
pub fn connect_http(ip: &str) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect_timeout(
        &format!("{ip}:80").parse().expect("an IP address"),
        Duration::from_secs(5),
    )
    .expect("connect to the guest");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    s
}
