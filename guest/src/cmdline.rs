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
//! | `hostile=console` / `ports` / `both` | a hostile guest, for tests of the VMM's bounds: instead of the workload, every vCPU writes to the serial port (console), or to and from ports no device decodes (ports), as fast as it can, forever | off |
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
    /// Bit 0: spam the console; bit 1: spam unknown ports.
    pub hostile: u8,
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
            hostile: 0,
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
            (b"hostile", _) => {
                o.hostile = match value {
                    Some(b"console") => 1,
                    Some(b"ports") => 2,
                    Some(b"both") => 3,
                    _ => 0,
                };
                o.hostile != 0
            }
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
