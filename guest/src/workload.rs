//! The integrity workload: fill this vCPU's stripe of free RAM with the pattern, then verify
//! it pass after pass, publishing figures in the status area.
//!
//! Free RAM is every boot-info RAM range from max(range start, free_start) to its end, in
//! 4 KiB pages, numbered across the ranges in order; the first `fill`% of those pages are
//! used, and page k belongs to vCPU k % vcpu_count. Every 8-byte word at guest-physical (=
//! virtual, identity mapping) address `a` holds `pattern_word(a, generation)`.
//!
//! A refill pass (every `refill_every`th pass) verifies each page against generation g and
//! rewrites it with g+1; the published generation moves to g+1 at the end of that pass, so
//! while it runs, the pages already visited hold g+1 and the rest g.
//!
//! CPU-state proof: the per-page counter is mirrored in the FS base (when the CPU has
//! FSGSBASE) and in XMM15, checked against its memory copy at every page and after every
//! wait; a difference counts as a register check failure (then the registers are rewritten,
//! so one loss counts once).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use warmvm_abi::{
    pattern_word, VcpuStatus, HOST_COMMAND_POWEROFF, MAX_RAM_RANGES, PHASE_BOOTING, PHASE_FILLING,
    PHASE_POWERING_OFF, PHASE_VERIFYING, WAIT_FOREVER,
};

use crate::boot::{Machine, PAGE_SIZE};
use crate::cmdline::Options;
use crate::status::Status;
use crate::{cpu, io, time, EXIT_INTEGRITY_FAILURE, EXIT_OK};

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;
/// Publish figures, read the clock and poll the host command this often (in pages).
const TICK_PAGES: u64 = 64;
/// Longest single wait, so a host command is seen within this many µs while idling.
const MAX_WAIT_US: u64 = 100_000;
/// Mismatches and register failures each vCPU describes on the console (it counts them all).
const MAX_REPORTS: u32 = 4;
/// vCPU 0 reads the ACPI power button's status (a port read, so a VM exit) every this many
/// ticks while it works, and after every wait.
const POWER_BUTTON_POLL_TICKS: u32 = 16;
/// Without a TSC frequency, per-pass lines appear every this many passes.
const PRINT_EVERY_PASSES_UNTIMED: u64 = 16;

// Zero-initialised statics would land in .bss, which a loader that copies only p_filesz
// (linux-loader does) leaves as it was: keep them in .data, so that loading the image again
// over used RAM resets them too.

/// vCPUs that have finished their fill (the last one prints the fill line).
#[link_section = ".data.warmvm_filled_vcpus"]
static FILLED_VCPUS: AtomicU32 = AtomicU32::new(0);
/// Set by vCPU 0 when it saw the power button pressed: the other vCPUs stop too.
#[link_section = ".data.warmvm_power_button"]
static POWER_BUTTON_PRESSED: AtomicU32 = AtomicU32::new(0);
/// TSC when the first vCPU began to fill.
#[link_section = ".data.warmvm_fill_start_tsc"]
static FILL_START_TSC: AtomicU64 = AtomicU64::new(0);

/// This vCPU's share of the free RAM.
#[derive(Clone, Copy, Debug)]
pub struct Stripe {
    /// (first page address, page count) of each free range.
    ranges: [(u64, u64); MAX_RAM_RANGES],
    count: usize,
    free_pages: u64,
    /// Pages used by all vCPUs together (`fill`% of the free pages).
    total: u64,
    vcpu: u64,
    vcpus: u64,
}

impl Stripe {
    pub fn new(m: &Machine, fill_percent: u64, vcpu: u64) -> Self {
        let mut s = Stripe {
            ranges: [(0, 0); MAX_RAM_RANGES],
            count: 0,
            free_pages: 0,
            total: 0,
            vcpu,
            vcpus: u64::from(m.vcpu_count.max(1)),
        };
        for r in m.ram_ranges() {
            let end = r.start.saturating_add(r.len) / PAGE_SIZE * PAGE_SIZE;
            let start = r.start.max(m.free_start).next_multiple_of(PAGE_SIZE);
            if end > start && s.count < MAX_RAM_RANGES {
                let pages = (end - start) / PAGE_SIZE;
                s.ranges[s.count] = (start, pages);
                s.count += 1;
                s.free_pages += pages;
            }
        }
        let total = u128::from(s.free_pages) * u128::from(fill_percent.min(100)) / 100;
        s.total = total as u64;
        s
    }

    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    pub fn total_pages(&self) -> u64 {
        self.total
    }

    /// Pages this vCPU owns.
    pub fn owned(&self) -> u64 {
        if self.total > self.vcpu {
            (self.total - 1 - self.vcpu) / self.vcpus + 1
        } else {
            0
        }
    }

    /// Addresses of this vCPU's pages, in order.
    pub fn pages(&self) -> StripePages {
        StripePages {
            stripe: *self,
            k: self.vcpu,
            idx: 0,
            base: 0,
        }
    }
}

pub struct StripePages {
    stripe: Stripe,
    /// Global page number of the next page.
    k: u64,
    /// Range holding page `k`, and the global number of that range's first page.
    idx: usize,
    base: u64,
}

impl Iterator for StripePages {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        let s = &self.stripe;
        if self.k >= s.total {
            return None;
        }
        // `total` ≤ the sum of the range sizes, so this stays within `count` ranges.
        while self.idx < s.count && self.k >= self.base + s.ranges[self.idx].1 {
            self.base += s.ranges[self.idx].1;
            self.idx += 1;
        }
        if self.idx >= s.count {
            return None;
        }
        let addr = s.ranges[self.idx].0 + (self.k - self.base) * PAGE_SIZE;
        self.k += s.vcpus;
        Some(addr)
    }
}

/// What a page verification found.
#[derive(Clone, Copy, Default)]
struct PageCheck {
    bad_words: u64,
    first_bad: u64,
    found: u64,
    expected: u64,
}

fn page_words(addr: u64) -> *mut u64 {
    addr as *mut u64
}

/// Write generation `generation` of the pattern into the page at `addr`.
#[inline(always)]
fn fill_page(addr: u64, generation: u64) {
    let p = page_words(addr);
    for i in 0..WORDS_PER_PAGE {
        let a = addr + 8 * i as u64;
        // SAFETY: `addr` is a page of this vCPU's stripe: free RAM that only this vCPU
        // touches, identity-mapped. Volatile, so the compiler cannot elide or merge the
        // stores with the later verification.
        unsafe { p.add(i).write_volatile(pattern_word(a, generation)) };
    }
}

/// Compare the page with generation `generation`; words that differ are counted and
/// repaired (so each corruption counts once). With `rewrite`, every word is then rewritten
/// with generation `generation + 1` (a refill).
#[inline(always)]
fn check_page(addr: u64, generation: u64, rewrite: Option<u64>) -> PageCheck {
    let p = page_words(addr);
    let mut r = PageCheck::default();
    for i in 0..WORDS_PER_PAGE {
        let a = addr + 8 * i as u64;
        let expected = pattern_word(a, generation);
        // SAFETY: as in `fill_page`. Volatile: the value must really be read from RAM.
        let found = unsafe { p.add(i).read_volatile() };
        let repair = if found != expected {
            if r.bad_words == 0 {
                r.first_bad = a;
                r.found = found;
                r.expected = expected;
            }
            r.bad_words += 1;
            Some(expected)
        } else {
            None
        };
        if let Some(v) = rewrite.map(|g| pattern_word(a, g)).or(repair) {
            // SAFETY: as above.
            unsafe { p.add(i).write_volatile(v) };
        }
    }
    r
}

#[inline(never)]
fn verify_page(addr: u64, generation: u64) -> PageCheck {
    check_page(addr, generation, None)
}

#[inline(never)]
fn refill_page(addr: u64, generation: u64) -> PageCheck {
    check_page(addr, generation, Some(generation.wrapping_add(1)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    HostCommand,
    PowerButton,
    PassesDone,
}

pub struct Worker {
    vcpu: usize,
    vcpus: usize,
    status: Status,
    opts: Options,
    stripe: Stripe,
    fsgsbase: bool,
    st: VcpuStatus,
    reports: u32,
    register_reports: u32,
    last_print_ns: u64,
    /// TSC at the last verified page (0 after a deliberate wait), for `max_gap_ns`.
    gap_last_tsc: u64,
    gap_max_ticks: u64,
    gap_epoch_seen: u64,
    /// `heartbeat_us` in TSC ticks (0: no heartbeat), and when the next beat is due.
    beat_ticks: u64,
    next_beat_tsc: u64,
    /// Ticks since vCPU 0 last read the power button, and whether the next tick follows a
    /// wait (a press rings the doorbell, so a wait that ended may have been the press).
    ticks_since_button: u32,
    after_wait: bool,
    /// No PM1 status register answered (another VMM): stop looking.
    no_power_button: bool,
    services: crate::services::Services,
}

impl Worker {
    pub fn new(
        vcpu: usize,
        vcpus: usize,
        status: Status,
        opts: Options,
        stripe: Stripe,
        fsgsbase: bool,
        services: crate::services::Services,
    ) -> Self {
        let seq = status.current_seq(vcpu).next_multiple_of(2);
        let mut w = Worker {
            vcpu,
            vcpus,
            status,
            opts,
            stripe,
            fsgsbase,
            st: VcpuStatus {
                seq,
                phase: PHASE_BOOTING,
                pages_owned: stripe.owned(),
                ..VcpuStatus::default()
            },
            reports: 0,
            register_reports: 0,
            last_print_ns: 0,
            gap_last_tsc: 0,
            gap_max_ticks: 0,
            gap_epoch_seen: 0,
            beat_ticks: 0,
            next_beat_tsc: 0,
            ticks_since_button: 0,
            after_wait: false,
            no_power_button: false,
            services,
        };
        if vcpu == 0 && opts.heartbeat_us != 0 {
            // Without a known TSC frequency, assume 1 GHz: the beat is for a probe that
            // measures gaps between beats, so only its steadiness matters.
            let khz = match time::tsc_khz() {
                0 => 1_000_000,
                k => k,
            };
            w.beat_ticks = (opts.heartbeat_us * khz / 1000).max(1);
        }
        w.gap_epoch_seen = w.status.gap_epoch(vcpu);
        w.publish();
        w
    }

    fn publish(&mut self) {
        self.status.publish(self.vcpu, &mut self.st);
    }

    /// Read the clock, publish, and act on a host command.
    fn tick(&mut self) {
        let now = time::now_ns();
        if now < self.st.guest_time_ns {
            self.st.time_went_backwards = self.st.time_went_backwards.wrapping_add(1);
        }
        self.st.guest_time_ns = now;
        let epoch = self.status.gap_epoch(self.vcpu);
        if epoch != self.gap_epoch_seen {
            self.gap_epoch_seen = epoch;
            self.gap_max_ticks = 0;
        }
        self.st.max_gap_ns = time::ticks_to_ns(self.gap_max_ticks);
        self.publish();
        if self.status.host_command() == HOST_COMMAND_POWEROFF {
            self.stop(Stop::HostCommand);
        }
        self.watch_power_button();
    }

    /// Stop if the ACPI power button was pressed: vCPU 0 reads PM1 status (unless told to
    /// ignore the button), the others follow vCPU 0.
    fn watch_power_button(&mut self) {
        let after_wait = core::mem::take(&mut self.after_wait);
        if POWER_BUTTON_PRESSED.load(Ordering::Acquire) != 0 {
            self.stop(Stop::PowerButton);
        }
        if self.vcpu != 0 || self.opts.ignore_power_button || self.no_power_button {
            return;
        }
        self.ticks_since_button += 1;
        if !after_wait && self.ticks_since_button < POWER_BUTTON_POLL_TICKS {
            return;
        }
        self.ticks_since_button = 0;
        match io::take_power_button() {
            Some(true) => {
                POWER_BUTTON_PRESSED.store(1, Ordering::Release);
                self.stop(Stop::PowerButton);
            }
            Some(false) => {}
            None => self.no_power_button = true,
        }
    }

    /// Check that the FS base and XMM15 still hold the counter; with `advance`, count one
    /// more verified page. The registers are (re)written either way.
    #[inline(always)]
    fn check_registers(&mut self, advance: bool) {
        let expected = self.st.counter;
        let next = if advance {
            expected.wrapping_add(1)
        } else {
            expected
        };
        if self.fsgsbase {
            let fs = cpu::read_fs_base();
            if fs != expected {
                self.register_failure("FS base", fs, expected);
            }
            if fs != next {
                cpu::write_fs_base(next);
            }
        }
        let xmm = cpu::warmvm_guest_xmm15_swap(next);
        if xmm != expected {
            self.register_failure("XMM15", xmm, expected);
        }
        self.st.counter = next;
    }

    #[cold]
    fn register_failure(&mut self, what: &str, found: u64, expected: u64) {
        self.st.register_check_failures = self.st.register_check_failures.wrapping_add(1);
        if self.register_reports < MAX_REPORTS {
            self.register_reports += 1;
            say!(
                "warmvm-guest: vcpu {} REGISTER CHECK FAILED: {} = {:#x}, counter {:#x}",
                self.vcpu,
                what,
                found,
                expected
            );
        }
    }

    #[cold]
    fn mismatch(&mut self, r: &PageCheck) {
        self.st.mismatches = self.st.mismatches.wrapping_add(r.bad_words);
        self.st.last_mismatch_addr = r.first_bad;
        if self.reports < MAX_REPORTS {
            self.reports += 1;
            say!(
                "warmvm-guest: vcpu {} MISMATCH: {} words in page {:#x}, first {:#x}: {:#018x}, expected {:#018x} (generation {})",
                self.vcpu,
                r.bad_words,
                r.first_bad & !(PAGE_SIZE - 1),
                r.first_bad,
                r.found,
                r.expected,
                self.st.generation
            );
        }
    }

    /// Load the counter into the FS base and XMM15 without checking them (at start, before
    /// they mean anything).
    fn sync_registers(&mut self) {
        if self.fsgsbase {
            cpu::write_fs_base(self.st.counter);
        }
        let _ = cpu::warmvm_guest_xmm15_swap(self.st.counter);
    }

    pub fn run(mut self) -> ! {
        self.sync_registers();
        // A slow boot: still PHASE_BOOTING meanwhile, answering the host's commands.
        if self.opts.boot_delay_ms > 0 {
            self.idle(self.opts.boot_delay_ms.saturating_mul(1000));
        }
        self.fill();
        self.st.phase = PHASE_VERIFYING;
        self.tick();
        loop {
            self.pass();
        }
    }

    fn fill(&mut self) {
        let t0 = cpu::rdtsc();
        let _ = FILL_START_TSC.compare_exchange(0, t0, Ordering::AcqRel, Ordering::Acquire);
        self.st.phase = PHASE_FILLING;
        self.tick();
        let generation = self.st.generation;
        let mut n: u64 = 0;
        for addr in self.stripe.pages() {
            fill_page(addr, generation);
            self.st.pages_filled = self.st.pages_filled.wrapping_add(1);
            self.check_registers(false);
            n += 1;
            if n % TICK_PAGES == 0 {
                self.tick();
            }
        }
        self.tick();
        let done = FILLED_VCPUS.fetch_add(1, Ordering::AcqRel) + 1;
        if done as usize == self.vcpus {
            let start = FILL_START_TSC.load(Ordering::Acquire);
            let ns = time::ticks_to_ns(cpu::rdtsc().saturating_sub(start));
            let total = self.stripe.total_pages();
            say!(
                "warmvm-guest: filled {} pages ({} MiB) in {} ms",
                total,
                (total * PAGE_SIZE) >> 20,
                ns / 1_000_000
            );
        }
    }

    fn pass(&mut self) {
        let passes = self.st.passes.wrapping_add(1);
        let refill = self.opts.refill_every != 0 && passes % self.opts.refill_every == 0;
        let generation = self.st.generation;
        let t0 = cpu::rdtsc();
        let mut n: u64 = 0;
        for addr in self.stripe.pages() {
            let r = if refill {
                refill_page(addr, generation)
            } else {
                verify_page(addr, generation)
            };
            if r.bad_words != 0 {
                self.mismatch(&r);
            }
            if refill {
                self.st.pages_filled = self.st.pages_filled.wrapping_add(1);
            }
            self.st.pages_verified = self.st.pages_verified.wrapping_add(1);
            self.check_registers(true);
            self.note_progress();
            n += 1;
            if n % TICK_PAGES == 0 {
                self.tick();
                if self.services.poll() {
                    // Serving clients is not a stall of the RAM workload.
                    self.gap_last_tsc = 0;
                }
            }
        }
        if refill {
            self.st.generation = generation.wrapping_add(1);
        }
        self.st.passes = passes;
        // Look at the power button after every pass, however short the wait that follows.
        self.after_wait = true;
        self.tick();
        let pass_ns = time::ticks_to_ns(cpu::rdtsc().saturating_sub(t0));
        self.maybe_print_pass(pass_ns);
        self.services.periodic(&self.opts);
        // Disk I/O waits in the VMM: not a stall of the RAM workload.
        self.gap_last_tsc = 0;
        if self.opts.passes != 0 && self.st.passes >= self.opts.passes {
            self.stop(Stop::PassesDone);
        }
        self.idle(self.opts.interval_ms.saturating_mul(1000));
    }

    /// One more page verified: track the longest stretch without progress.
    #[inline(always)]
    fn note_progress(&mut self) {
        let now = cpu::rdtsc();
        if self.gap_last_tsc != 0 {
            let gap = now.wrapping_sub(self.gap_last_tsc);
            if gap > self.gap_max_ticks && gap < u64::MAX / 2 {
                self.gap_max_ticks = gap;
            }
        }
        self.gap_last_tsc = now;
        if self.beat_ticks != 0 && now >= self.next_beat_tsc {
            io::outb(warmvm_abi::HEARTBEAT_PORT, warmvm_abi::HEARTBEAT_VALUE);
            self.next_beat_tsc = now + self.beat_ticks;
        }
    }

    fn maybe_print_pass(&mut self, pass_ns: u64) {
        if self.vcpu != 0 || self.opts.quiet {
            return;
        }
        let now = self.st.guest_time_ns;
        let due = if time::tsc_khz() == 0 {
            self.st.passes % PRINT_EVERY_PASSES_UNTIMED == 1
        } else {
            self.last_print_ns == 0 || now.saturating_sub(self.last_print_ns) >= 1_000_000_000
        };
        if !due {
            return;
        }
        self.last_print_ns = now;
        say!(
            "warmvm-guest: pass {} gen {}: {} pages in {}.{} ms, {} mismatches, t={} ms",
            self.st.passes,
            self.st.generation,
            self.st.pages_owned,
            pass_ns / 1_000_000,
            pass_ns / 100_000 % 10,
            self.st.mismatches,
            now / 1_000_000
        );
    }

    /// Wait `micros` µs through the wait port, in slices, checking the registers and the
    /// host command after each.
    fn idle(&mut self, micros: u64) {
        let mut left = micros;
        while left > 0 {
            let slice = left.min(MAX_WAIT_US);
            self.services.idle(slice);
            // A requested wait is not a stall.
            self.gap_last_tsc = 0;
            left -= slice;
            self.check_registers(false);
            self.after_wait = true;
            self.tick();
        }
    }

    /// Stop the workload: every vCPU enters PHASE_POWERING_OFF; vCPU 0 waits for the others,
    /// prints the verdict and powers off.
    fn stop(&mut self, why: Stop) -> ! {
        self.st.phase = PHASE_POWERING_OFF;
        self.st.guest_time_ns = self.st.guest_time_ns.max(time::now_ns());
        self.publish();
        if self.vcpu != 0 {
            loop {
                io::wait(WAIT_FOREVER);
            }
        }

        // Wait for the other vCPUs to stop. After passes=N they get there on their own; once
        // the host asked for a power-off, they get 2 s (counted in 1 ms waits if the guest
        // has no clock).
        let mut told_since: Option<u64> = (why != Stop::PassesDone).then(time::now_ns);
        let mut waits: u64 = 0;
        let stragglers = loop {
            let stragglers = (1..self.vcpus)
                .filter(|&i| self.status.read(i).phase != PHASE_POWERING_OFF)
                .count();
            if stragglers == 0 {
                break 0;
            }
            if told_since.is_none()
                && (self.status.host_command() == HOST_COMMAND_POWEROFF
                    || POWER_BUTTON_PRESSED.load(Ordering::Acquire) != 0)
            {
                told_since = Some(time::now_ns());
                waits = 0;
            }
            if let Some(t) = told_since {
                let timed_out = if time::tsc_khz() != 0 {
                    time::now_ns().saturating_sub(t) >= 2_000_000_000
                } else {
                    waits >= 2000
                };
                if timed_out {
                    break stragglers;
                }
            }
            io::wait(1000);
            waits += 1;
        };

        let (mut mismatches, mut register_failures, mut backwards) = (0u64, 0u64, 0u64);
        for i in 0..self.vcpus {
            let s = if i == 0 { self.st } else { self.status.read(i) };
            mismatches = mismatches.wrapping_add(s.mismatches);
            register_failures = register_failures.wrapping_add(s.register_check_failures);
            backwards = backwards.wrapping_add(s.time_went_backwards);
        }
        let exit = if mismatches == 0 && register_failures == 0 {
            EXIT_OK
        } else {
            EXIT_INTEGRITY_FAILURE
        };
        say!(
            "warmvm-guest: power off ({}): {} passes, {} mismatches, {} register check failures, {} time jumps back, {} vCPUs not stopped, t={} ms, status {}",
            match why {
                Stop::HostCommand => "host command",
                Stop::PowerButton => "power button",
                Stop::PassesDone => "passes done",
            },
            self.st.passes,
            mismatches,
            register_failures,
            backwards,
            stragglers,
            time::now_ns() / 1_000_000,
            exit
        );
        // Asked by the power button, a clean guest powers off the way the platform offers
        // (ACPI S5); an unclean one keeps its verdict in the power port's exit status.
        if why == Stop::PowerButton && exit == EXIT_OK {
            io::acpi_power_off()
        }
        io::power_off(exit)
    }
}
