//! Helpers for tests that need a real KVM.

mod netns;
mod vm;

pub use netns::{connect_http, enter_netns, in_netns, ip, Netns};
pub use vm::{ram_bytes, running_vm, wait_verified, ScratchDir};

// The one KVM gate of the tests (WARMVM_REQUIRE_KVM=1 turns a skip into a failure) is the
// test kit's (crates/testkit): the kit depends on this crate, so this crate compiles the
// kit's gate in rather than depending on it.
#[path = "../../testkit/src/kvm.rs"]
mod kvm;
pub use kvm::{kvm_available, kvm_required, skip_or_fail};

/// Send a GET on `s` (a keep-alive connection to the reference guest's HTTP server) and
/// read its whole response: (status, body).
pub fn http_get<S: std::io::Read + std::io::Write>(s: &mut S, path: &str) -> (u32, Vec<u8>) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: guest\r\n\r\n").expect("send the request");
    http_response(s)
}

/// Read one HTTP/1.1 response with a Content-Length from `s`: (status, body).
fn http_response<S: std::io::Read>(s: &mut S) -> (u32, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("an ASCII response head");
    let status = head[9..12].parse().expect("a status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse().expect("a Content-Length"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("response body");
    (status, body)
}

/// Deterministic pseudo-random bytes (xorshift): file contents for the reference guest's
/// disk tests that no compression or pattern can pass for.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The entries of a ustar archive holding `files` (name, contents), each padded to 512
/// bytes, without the closing zero blocks: the callers pad to the disk size they need.
/// The reference guest's virtio-blk tests and `warmvm bench cache` give it as its disk.
pub fn ustar_entries<N: AsRef<str>>(files: &[(N, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let name = name.as_ref();
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out
}
