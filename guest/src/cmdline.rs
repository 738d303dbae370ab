//! The command line: space-separated `key=value` options.
//!
//! | option | meaning | default |
//! | --- | --- | --- |
//! | `fill=PERCENT` | share of the free RAM to fill and verify (0-100) | 100 |
//! | `interval_ms=N` | wait between verification passes (WAIT_PORT); 0 = no wait | 50 |
//! | `refill_every=N` | every Nth pass rewrites each page with the next generation; 0 = never | 8 |
//! | `passes=N` | power off (status 0 if clean) after N passes; 0 = run until told | 0 |
//! | `quiet` | no per-pass console lines | off |
//! | `tsc_khz=N` | TSC frequency, used only if neither boot info nor CPUID gives one | none |
//! | `ip=A.B.C.D/LEN` | serve HTTP on port 80 of the first network device at this address | none |
//! | `cache_mib=N` | the HTTP server's page cache, carved from the workload's RAM | 8 |
//! | `hostile=KIND` | test only: break the virtio protocol on the disk once (`loop`, `addr`, `len`, `index`, `status`) | none |
//! | `hostile_net=KIND` | test only: break the virtio protocol on the network device once (same kinds as `hostile=`; `status` sets DRIVER_OK before FEATURES_OK), then reset it and serve normally | none |
//! | `boot_delay_ms=N` | stay in the booting phase (not yet up, as the host sees it) for N ms before the workload starts, as a slowly booting system would; it still powers off when asked | 0 |
//! | `heartbeat_us=N` | vCPU 0 writes `HEARTBEAT_PORT` every N µs while it verifies (for an outside probe: the host's KVM trace); 0 = never | 0 |
//! | `power_button=ignore` | test only: never look at the ACPI power button, so the VMM must force the guest off | watch it |
//! | `disk_check_ms=N` | re-read and re-check the disk's files every N ms (vCPU 0); 0 = never | 1000 |
//! | `hostile=console` / `ports` / `both` | a hostile guest, for tests of the VMM's bounds: instead of the workload, every vCPU writes to the serial port (console), or to and from ports no device decodes (ports), as fast as it can, forever | off |
//! | `hostile=mmio` / `rings` | as hostile as that: every vCPU reads and writes random virtio-mmio registers and MMIO nothing decodes (mmio); vCPU 0 sets its virtio devices up and writes garbage into their rings, round after round, reporting how often the device failed (rings); see `hostile.rs` | off |
//!
//! Unknown or malformed options are ignored and reported once on the console.

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub fill_percent: u64,
    pub interval_ms: u64,
    pub refill_every: u64,
    pub passes: u64,
    pub quiet: bool,
    pub tsc_khz: Option<u64>,
    pub disk_check_ms: u64,
    pub heartbeat_us: u64,
    /// `power_button=ignore`: never poll the ACPI power button.
    pub ignore_power_button: bool,
    pub boot_delay_ms: u64,
    pub ip: Option<([u8; 4], u8)>,
    pub cache_mib: u64,
    pub hostile: Option<Hostile>,
    pub hostile_net: Option<Hostile>,
    /// `hostile=console|ports|both|mmio|rings`: the bits of [`spam`].
    pub spam: u8,
}

/// What a hostile guest does (`hostile.rs`), as bits of [`Options::spam`].
pub mod spam {
    pub const CONSOLE: u8 = 1;
    pub const PORTS: u8 = 2;
    pub const MMIO: u8 = 4;
    pub const RINGS: u8 = 8;
}

/// Ways the guest can break the virtio protocol on purpose (to test the VMM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// A descriptor chain that loops.
    Loop,
    /// A buffer outside guest RAM.
    Addr,
    /// A buffer of 4 GiB - 1 bytes.
    Len,
    /// An avail index far beyond the queue size.
    Index,
    /// Status bits cleared without a reset.
    Status,
}

impl Hostile {
    fn parse(s: &[u8]) -> Option<Self> {
        match s {
            b"loop" => Some(Hostile::Loop),
            b"addr" => Some(Hostile::Addr),
            b"len" => Some(Hostile::Len),
            b"index" => Some(Hostile::Index),
            b"status" => Some(Hostile::Status),
            _ => None,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fill_percent: 100,
            interval_ms: 50,
            refill_every: 8,
            passes: 0,
            quiet: false,
            tsc_khz: None,
            disk_check_ms: 1000,
            heartbeat_us: 0,
            ignore_power_button: false,
            boot_delay_ms: 0,
            ip: None,
            cache_mib: 8,
            hostile: None,
            hostile_net: None,
            spam: 0,
        }
    }
}

/// Options the guest did not understand (the first few of them).
pub struct Ignored<'a> {
    pub tokens: [&'a [u8]; MAX_IGNORED],
    pub count: usize,
}

/// How many ignored options are kept for the report.
pub const MAX_IGNORED: usize = 8;

impl<'a> Ignored<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.tokens.iter().take(self.count).copied()
    }
}

/// The command line up to its NUL (or `max` bytes).
pub fn until_nul(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// `A.B.C.D/LEN`.
fn parse_cidr(s: &[u8]) -> Option<([u8; 4], u8)> {
    let slash = s.iter().position(|&b| b == b'/')?;
    let prefix = parse_u64(&s[slash + 1..]).filter(|&p| (1..=32).contains(&p))?;
    let mut ip = [0u8; 4];
    let mut parts = s[..slash].split(|&b| b == b'.');
    for b in ip.iter_mut() {
        *b = u8::try_from(parse_u64(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some((ip, prefix as u8))
}

pub fn parse(cmdline: &[u8]) -> (Options, Ignored<'_>) {
    let mut o = Options::default();
    let mut ignored = Ignored {
        tokens: [&[]; MAX_IGNORED],
        count: 0,
    };
    let tokens = cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty());
    for token in tokens {
        let (key, value) = match token.iter().position(|&b| b == b'=') {
            Some(i) => (&token[..i], Some(&token[i + 1..])),
            None => (token, None),
        };
        let number = value.and_then(parse_u64);
        let ok = match (key, number) {
            (b"fill", Some(n)) if n <= 100 => {
                o.fill_percent = n;
                true
            }
            (b"boot_delay_ms", Some(n)) => {
                o.boot_delay_ms = n;
                true
            }
            (b"interval_ms", Some(n)) => {
                o.interval_ms = n;
                true
            }
            (b"refill_every", Some(n)) => {
                o.refill_every = n;
                true
            }
            (b"passes", Some(n)) => {
                o.passes = n;
                true
            }
            (b"tsc_khz", Some(n)) => {
                o.tsc_khz = Some(n).filter(|&n| n != 0);
                true
            }
            (b"disk_check_ms", Some(n)) => {
                o.disk_check_ms = n;
                true
            }
            (b"heartbeat_us", Some(n)) if n <= 1_000_000 => {
                o.heartbeat_us = n;
                true
            }
            (b"cache_mib", Some(n)) if n <= 4096 => {
                o.cache_mib = n;
                true
            }
            (b"ip", None) => match value.and_then(parse_cidr) {
                Some(ip) => {
                    o.ip = Some(ip);
                    true
                }
                None => false,
            },
            (b"hostile", None) => {
                use spam::{CONSOLE, MMIO, PORTS, RINGS};
                match value.unwrap_or(b"") {
                    b"console" => o.spam = CONSOLE,
                    b"ports" => o.spam = PORTS,
                    b"both" => o.spam = CONSOLE | PORTS,
                    b"mmio" => o.spam = MMIO,
                    b"rings" => o.spam = RINGS,
                    _ => {}
                }
                o.hostile = value.and_then(Hostile::parse);
                o.hostile.is_some() || o.spam != 0
            }
            (b"hostile_net", None) => {
                o.hostile_net = value.and_then(Hostile::parse);
                o.hostile_net.is_some()
            }
            (b"power_button", None) => match value {
                Some(b"ignore") => {
                    o.ignore_power_button = true;
                    true
                }
                Some(b"watch") => {
                    o.ignore_power_button = false;
                    true
                }
                _ => false,
            },
            (b"quiet", None) => {
                o.quiet = true;
                true
            }
            _ => false,
        };
        if !ok && ignored.count < MAX_IGNORED {
            ignored.tokens[ignored.count] = token;
            ignored.count += 1;
        }
    }
    (o, ignored)
}
