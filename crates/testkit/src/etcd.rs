//! The fleet's test rig: an etcd cluster of 1 or 3 members, each in a network namespace of
//! its own (a "host", where a test also starts that host's daemon), joined by a bridge in
//! a fourth namespace; with `tls`, members speak mTLS only (clients and peers), with
//! certificates made here. Faults: SIGKILL and restart, SIGSTOP/SIGCONT, a host's link
//! cut. Everything (members, namespaces, the scratch directory unless the test failed)
//! goes when the guard is dropped, also on panic.
//!
//! Addresses live only inside the namespaces: host `i` is `10.A.B.(i+1)/24` on its `eth0`,
//! whose veth peer `v{i}` is a port of bridge `br0` in the bridge's namespace. Nothing is
//! made in the host's own network namespace.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::netns::{ip, Namespace};

/// How long a new cluster may take to become healthy before [`EtcdCluster::start`]
/// panics with every member's log.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);

/// The etcd and etcdctl executables (Debian's etcd-server and etcd-client).
pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// Clusters made by this process so far: keeps names, subnets and tokens apart between
/// the tests of one `cargo test`.
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Whether a test that needs etcd can run: /usr/bin/etcd and /usr/bin/etcdctl exist.
/// Without them the test is skipped, or fails under `WARMVM_REQUIRE_KVM=1` or `CI` (see
/// [`crate::skip_or_fail`]).
pub fn etcd_available(test: &str) -> bool {
    if Path::new(ETCD).exists() && Path::new(ETCDCTL).exists() {
        return true;
    }
    let why = "etcd is not installed (/usr/bin/etcd, /usr/bin/etcdctl: Debian's etcd-server and etcd-client)";
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} and CI is set");
    }
    crate::skip_or_fail(test, why)
}

/// The files a client needs to reach a TLS cluster: the CA that signed the members'
/// certificates, and a client certificate (signed by it) with its key.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

struct Member {
    ns: Namespace,
    ip: String,
    data: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
}

/// An etcd cluster of the test's own; see the module's documentation.
pub struct EtcdCluster {
    dir: PathBuf,
    tls: Option<ClientTls>,
    members: Vec<Member>,
    /// The members' raft ids, in member order (they survive restarts).
    ids: Vec<u64>,
    bridge: Namespace,
}

impl EtcdCluster {
    /// `members` = 1 or 3; with `tls` members serve client and peer traffic over mTLS
    /// only, refusing clients without a certificate signed by the rig's CA. Returns once
    /// every member is healthy; panics with the tail of every member's log if that takes
    /// more than [`HEALTHY_TIMEOUT`].
    pub fn start(tag: &str, members: usize, tls: bool) -> EtcdCluster {
        assert!(
            members == 1 || members == 3,
            "an etcd rig has 1 or 3 members"
        );
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = crate::scratch(&format!("etcd{seq}-{tag}"));
        // Names: at most 15 characters and unique per process and cluster (the namespaces
        // are the host's; interfaces live inside them only).
        let name = |role: &str| format!("wve{pid:x}-{seq:x}{role}");
        let subnet = format!("10.{}.{}", 100 + pid % 100, seq % 256);
        let bridge = new_namespace(name("b"));
        let mut cluster = EtcdCluster {
            dir: dir.clone(),
            tls: None,
            members: Vec::new(),
            ids: Vec::new(),
            bridge,
        };
        cluster.bridge.ip(&["link", "add", "br0", "type", "bridge"]);
        cluster.bridge.ip(&["link", "set", "br0", "up"]);
        let ips: Vec<String> = (0..members)
            .map(|i| format!("{subnet}.{}", i + 1))
            .collect();
        let certs = tls.then(|| Certs::new(&dir, &ips));
        let scheme = if tls { "https" } else { "http" };
        let initial: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, a)| format!("m{i}={scheme}://{a}:{PEER_PORT}"))
            .collect();
        let initial = initial.join(",");
        let token = format!("wvm-{pid}-{seq}-{tag}");
        for (i, addr) in ips.iter().enumerate() {
            let ns = new_namespace(name(&i.to_string()));
            let peer = format!("v{i}");
            cluster.bridge.ip(&[
                "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            cluster.bridge.ip(&["link", "set", &peer, "master", "br0"]);
            cluster.bridge.ip(&["link", "set", &peer, "up"]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            let data = dir.join(format!("m{i}.etcd"));
            let client = format!("{scheme}://{addr}:{CLIENT_PORT}");
            let peer_url = format!("{scheme}://{addr}:{PEER_PORT}");
            let mut args: Vec<String> = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                &token,
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ]
            .map(String::from)
            .to_vec();
            if let Some(c) = &certs {
                let (cert, key) = &c.members[i];
                let ca = c.ca.display().to_string();
                let (cert, key) = (cert.display().to_string(), key.display().to_string());
                args.extend(
                    [
                        "--cert-file",
                        &cert,
                        "--key-file",
                        &key,
                        "--client-cert-auth",
                        "--trusted-ca-file",
                        &ca,
                        "--peer-cert-file",
                        &cert,
                        "--peer-key-file",
                        &key,
                        "--peer-client-cert-auth",
                        "--peer-trusted-ca-file",
                        &ca,
                    ]
                    .map(String::from),
                );
            }
            cluster.members.push(Member {
                ns,
                ip: addr.clone(),
                data,
                log: dir.join(format!("m{i}.log")),
                args,
                child: Mutex::new(None),
            });
        }
        cluster.tls = certs.map(|c| c.client);
        let started = Instant::now();
        for i in 0..members {
            cluster.spawn(i);
        }
        if !cluster.wait_healthy(HEALTHY_TIMEOUT) {
            panic!(
                "etcd rig {tag}: not healthy after {HEALTHY_TIMEOUT:?}\n{}",
                cluster.log_tails()
            );
        }
        cluster.ids = cluster.read_member_ids();
        eprintln!(
            "etcd rig {tag}: {members} member(s){} healthy in {:.2} s",
            if tls { " (mTLS)" } else { "" },
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never: a cluster has 1 or 3 members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, comma-separated, in member order.
    pub fn endpoints(&self) -> String {
        (0..self.len())
            .map(|i| self.member_endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s client URL.
    pub fn member_endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", self.members[i].ip)
    }

    /// Host `i`'s network namespace: start its daemon there ([`crate::Start::netns`]).
    pub fn netns(&self, i: usize) -> &str {
        &self.members[i].ns.name
    }

    /// Host `i`'s address on the bridge.
    pub fn host_ip(&self, i: usize) -> String {
        self.members[i].ip.clone()
    }

    /// The client's TLS files when the cluster speaks mTLS.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// The scratch directory: members' data and logs, certificates.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].data
    }

    /// Member `i`'s log file.
    pub fn log(&self, i: usize) -> &Path {
        &self.members[i].log
    }

    /// The daemon's flags to reach this cluster: `--fleet-etcd ENDPOINTS` and, with TLS,
    /// `--fleet-etcd-ca/-cert/-key`.
    pub fn fleet_args(&self) -> Vec<String> {
        let mut a = vec!["--fleet-etcd".to_string(), self.endpoints()];
        if let Some(t) = &self.tls {
            for (flag, path) in [
                ("--fleet-etcd-ca", &t.ca),
                ("--fleet-etcd-cert", &t.cert),
                ("--fleet-etcd-key", &t.key),
            ] {
                a.push(flag.to_string());
                a.push(path.display().to_string());
            }
        }
        a
    }

    /// `etcdctl ARGS` (API v3) from host 0's namespace against every member, with the
    /// client certificate when the cluster speaks TLS.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_command(0, &self.endpoints(), true)
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// An `etcdctl` command (API v3, arguments still to add) run in host `host`'s
    /// namespace against `endpoints`; with `client_cert` false a TLS cluster's client
    /// gets the CA but no certificate (which the members must refuse).
    pub fn etcdctl_command(&self, host: usize, endpoints: &str, client_cert: bool) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.netns(host), ETCDCTL])
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"));
        if let Some(t) = &self.tls {
            c.arg(format!("--cacert={}", t.ca.display()));
            if client_cert {
                c.arg(format!("--cert={}", t.cert.display()));
                c.arg(format!("--key={}", t.key.display()));
            }
        }
        c.stdin(Stdio::null());
        c
    }

    /// SIGKILL member `i` and reap it; its data directory stays for [`Self::restart`].
    pub fn kill(&self, i: usize) {
        let child = self.members[i].child.lock().expect("member lock").take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `i` again on its data directory (killing it first if it still runs).
    pub fn restart(&self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// SIGSTOP member `i`.
    pub fn stop(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONT member `i`.
    pub fn cont(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    /// Cut host `i` from the bridge (its port set down): it reaches no other host, and no
    /// other host reaches it; its own member still answers inside its namespace.
    pub fn link_down(&self, i: usize) {
        self.bridge.ip(&["link", "set", &format!("v{i}"), "down"]);
    }

    /// Join host `i` to the bridge again.
    pub fn link_up(&self, i: usize) {
        self.bridge.ip(&["link", "set", &format!("v{i}"), "up"]);
    }

    /// Member `i`'s pid while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i]
            .child
            .lock()
            .expect("member lock")
            .as_ref()
            .map(Child::id)
    }

    /// Every running member's pid.
    pub fn pids(&self) -> Vec<u32> {
        (0..self.len()).filter_map(|i| self.pid(i)).collect()
    }

    /// The names of every namespace the rig made (the hosts' and the bridge's).
    pub fn namespaces(&self) -> Vec<String> {
        let mut n: Vec<String> = self.members.iter().map(|m| m.ns.name.clone()).collect();
        n.push(self.bridge.name.clone());
        n
    }

    /// Member `i`'s raft id (as `endpoint status` and `member list` print it).
    pub fn member_id(&self, i: usize) -> u64 {
        self.ids[i]
    }

    /// Which member leads: the leader a majority of the members follow, each asked from
    /// its own host's namespace (so a cut host answers too, and host 0's link does not
    /// matter). None while no majority agrees (an election under way, a majority down).
    pub fn leader(&self) -> Option<usize> {
        let asked: Vec<_> = (0..self.len())
            .filter_map(|i| {
                self.etcdctl_command(i, &self.member_endpoint(i), true)
                    .args(["endpoint", "status", "-w", "json"])
                    .args(["--dial-timeout=1s", "--command-timeout=1s"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        let mut votes: Vec<u64> = Vec::new();
        for child in asked {
            let Ok(out) = child.wait_with_output() else {
                continue;
            };
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            // No leader: the field is left out (or 0).
            match status[0]["Status"]["leader"].as_u64() {
                Some(l) if l != 0 => votes.push(l),
                _ => {}
            }
        }
        let leader = votes
            .iter()
            .copied()
            .find(|l| votes.iter().filter(|v| *v == l).count() * 2 > self.len())?;
        self.ids.iter().position(|&id| id == leader)
    }

    /// Wait until a majority follows one leader, at most `timeout`; which member.
    pub fn wait_leader(&self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every member answers healthy (it has a leader and serves a read), at
    /// most `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let healthy = self
                .etcdctl_command(0, &self.endpoints(), true)
                .args([
                    "endpoint",
                    "health",
                    "--dial-timeout=1s",
                    "--command-timeout=1s",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if healthy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every member's log, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let log = crate::read(&m.log);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            s.push_str(&format!(
                "--- member {i} ({}) ---\n{}\n",
                m.log.display(),
                tail.join("\n")
            ));
        }
        s
    }

    /// The members' ids, from `member list`, matched to members by client URL.
    fn read_member_ids(&self) -> Vec<u64> {
        let out = self.etcdctl(&["member", "list", "-w", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "etcd rig: member list: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let members = list["members"].as_array().cloned().unwrap_or_default();
        (0..self.len())
            .map(|i| {
                let url = self.member_endpoint(i);
                members
                    .iter()
                    .find(|m| {
                        m["clientURLs"]
                            .as_array()
                            .is_some_and(|u| u.iter().any(|u| u.as_str() == Some(&url)))
                    })
                    .and_then(|m| m["ID"].as_u64())
                    .unwrap_or_else(|| panic!("etcd rig: member {i} ({url}) not in {list}"))
            })
            .collect()
    }

    fn spawn(&self, i: usize) {
        let m = &self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap_or_else(|e| panic!("etcd log {}: {e}", m.log.display()));
        let err = log.try_clone().expect("clone the log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &m.ns.name, ETCD])
            .args(&m.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start etcd member {i}: {e}"));
        *m.child.lock().expect("member lock") = Some(child);
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(pid) = self.pid(i) {
            // SAFETY: kill has no memory effects; the pid is our own unreaped child (an
            // etcd member), so it cannot name another process.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A stopped process dies of SIGKILL as well.
            self.kill(i);
        }
        // The namespaces go when their guards drop (after this); the scratch directory
        // stays when the test failed, to read the members' logs.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("etcd rig logs kept in {}", self.dir.display());
        }
    }
}

/// A namespace named `name` (a leftover of the same name is deleted first), `lo` up,
/// deleted when dropped.
fn new_namespace(name: String) -> Namespace {
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    ip(&["netns", "add", &name]);
    let ns = Namespace { name };
    ns.ip(&["link", "set", "lo", "up"]);
    ns
}

/// The rig's certificates: a CA, one server certificate per member (its IP as SAN; also
/// its peer certificate, so it serves and is a client), and one client certificate.
struct Certs {
    ca: PathBuf,
    members: Vec<(PathBuf, PathBuf)>,
    client: ClientTls,
}

impl Certs {
    fn new(dir: &Path, ips: &[String]) -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "warmvm etcd rig CA");
        let ca_cert = params.self_signed(&ca_key).expect("the CA certificate");
        let ca = dir.join("ca.pem");
        write(&ca, &ca_cert.pem());
        let issue = |name: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(sans).expect("certificate params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = usages;
            let cert = params
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("a signed certificate");
            let (c, k) = (
                dir.join(format!("{name}.crt")),
                dir.join(format!("{name}.key")),
            );
            write(&c, &cert.pem());
            write(&k, &key.serialize_pem());
            (c, k)
        };
        let both = || {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        let members = ips
            .iter()
            .enumerate()
            .map(|(i, a)| issue(&format!("m{i}"), vec![a.clone()], both()))
            .collect();
        let (cert, key) = issue(
            "warmvm",
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        Certs {
            ca: ca.clone(),
            members,
            client: ClientTls { ca, cert, key },
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
