//! Every fuzz target's kept corpus and every crash input ever found, replayed; then a short
//! mutation run from the corpus (a few seconds per target, deterministic unless
//! WARMVM_FUZZ_SEED is set). The long coverage-guided runs are AFL++'s (`scripts/fuzz`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warmvm_fuzz::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_corpus_and_survives_it_and_every_crash_found() {
    for (name, target) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
        let crashes = files(&fuzz_dir().join("crashes").join(name));
        for (path, bytes) in corpus.iter().chain(&crashes) {
            eprintln!("{name}: {}", path.display());
            target(bytes);
        }
        eprintln!(
            "{name}: {} corpus inputs, {} crash inputs",
            corpus.len(),
            crashes.len()
        );
    }
}

/// xorshift64*: enough randomness for mutations, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// AFL-style havoc on `input`: flips, interesting values, deletions, duplications, splices.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'\n', b'"', b'{'];
    for _ in 0..1 + rng.below(8) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1).min(64);
                input.drain(i..i + n);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1).min(64);
                let chunk = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            4 if !other.is_empty() => {
                let i = rng.below(other.len());
                let n = rng.below(other.len() - i + 1).min(256);
                let at = rng.below(len + 1);
                input.splice(at..at, other[i..i + n].iter().copied());
            }
            5 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = [0u64, u64::MAX, 1 << 31, 1 << 63, 0x1000][rng.below(5)];
                input[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

#[test]
fn a_short_mutation_run_from_the_corpus_finds_nothing() {
    let seed = std::env::var("WARMVM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let per_target = Duration::from_millis(
        std::env::var("WARMVM_FUZZ_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2000),
    );
    let mut rng = Rng(seed | 1);
    for (name, target) in TARGETS {
        let corpus: Vec<Vec<u8>> = files(&fuzz_dir().join("corpus").join(name))
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let start = Instant::now();
        let mut runs = 0u64;
        while start.elapsed() < per_target {
            let mut input = corpus[rng.below(corpus.len())].clone();
            let other = &corpus[rng.below(corpus.len())];
            mutate(&mut rng, &mut input, other);
            let before = Instant::now();
            target(&input);
            assert!(
                before.elapsed() < Duration::from_secs(5),
                "{name}: one input took {:?} (a hang?), seed {seed}, input {input:?}",
                before.elapsed()
            );
            runs += 1;
        }
        eprintln!("{name}: {runs} mutated inputs in {per_target:?}, seed {seed:#x}");
    }
}

/// Writes the seed inputs into fuzz/corpus (run by hand when a format changes:
/// `cargo test -p warmvm-fuzz --test regression -- --ignored write_seeds`).
#[test]
#[ignore]
fn write_seeds() {
    let corpus = fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for (name, bytes) in warmvm_vmm::handover::fuzzing::seeds() {
        let target = match name {
            n if n.starts_with("message") => "handover_message",
            "state-payload" => "handover_payload",
            _ => "handover_envelope",
        };
        put(target, name, &bytes);
    }
    let http = [
        (
            "get-status",
            "\x07GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
        ),
        ("post-vm", {
            let body = r#"{"name": "web-1", "memory_mib": 64, "vcpus": 2, "cmdline": "quiet interval_ms=20"}"#;
            format!("\x10POST /v1/vms HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        }),
        ("put-stop", {
            let body = r#"{"grace_secs": 5}"#;
            format!("\x03PUT /v1/vms/web-1/stop HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        }),
        ("put-reboot", {
            let body = r#"{"mode": "warm", "stage_timeout_ms": 1000, "ready_budget_ms": 100}"#;
            format!(
                "\x3fPUT /v1/reboot HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }),
        (
            "delete-query",
            "\x01DELETE /v1/vms/web-1?keep_logs=true HTTP/1.1\r\n\r\n".to_string(),
        ),
    ];
    for (name, text) in http {
        put("http_request", name, text.as_bytes());
    }
    put(
        "config",
        "readme.toml",
        br#"state_dir = "/var/lib/warmvm"

[[vm]]
name = "ref-1"
memory_mib = 256
vcpus = 2
cmdline = "interval_ms=100"

[[vm]]
name = "linux-1"
memory_mib = 1024
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd.img"
cmdline = "console=ttyS0 root=/dev/vda"
boot = "auto"
console_stdout = true
hugepages = false
"#,
    );
    put(
        "config",
        "vm.json",
        br#"{"name": "web-1", "memory_mib": 64, "vcpus": 1, "cmdline": "quiet", "boot": "ring3"}"#,
    );
    put(
        "kernel_image",
        "reference-guest.elf",
        warmvm_guest_image::REFERENCE_GUEST_ELF,
    );
    // A bzImage's setup header (boot protocol 2.15) before a few KiB of "kernel".
    let mut bz = vec![0u8; 8192];
    bz[0x1f1] = 1; // setup_sects
    bz[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x211] = 1; // loadflags: LOADED_HIGH
    bz[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    bz[0x234] = 1; // relocatable
    bz[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    bz[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
    put("kernel_image", "bzimage-header", &bz);
    // COM1: set DLAB, divisor, 8N1, enable FIFO and interrupts, print "hi"; the wait port.
    let ops: &[[u8; 4]] = &[
        [1, 3, 0, 0x80],
        [1, 0, 0, 1],
        [1, 1, 0, 0],
        [1, 3, 0, 3],
        [1, 2, 0, 0xc7],
        [1, 1, 0, 0x0f],
        [1, 0, 0, b'h'],
        [1, 0, 0, b'i'],
        [1, 0, 0, b'\n'],
        [0, 5, 0, 0],
        [0x20 | 0x80, 0, 0, 0],
        [0x80, 4, 0, 0],
        [0xc3, 0x10, 0xfe, 0x55],
    ];
    put("device_registers", "com1-setup", &ops.concat());
    for (name, bytes) in warmvm_fuzz::virtio_seeds() {
        put("virtio_queues", name, &bytes);
    }
    for (name, bytes) in warmvm_vmm::snapshot::fuzzing::seeds() {
        put("snapshot", name, &bytes);
    }
    put(
        "migration_stream",
        "every-message",
        &warmvm_vmm::migration::fuzzing::seed(),
    );
}

/// `scripts/fuzz` builds fuzz/afl with `--locked`; its lock file lives apart from the
/// workspace's, so a dependency added to a fuzzed crate would break the long runs unseen.
#[test]
fn the_afl_workspace_lock_file_is_current() {
    let manifest = fuzz_dir().join("afl/Cargo.toml");
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fuzz/afl/Cargo.lock is out of date (run cargo generate-lockfile --offline --manifest-path fuzz/afl/Cargo.toml): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
