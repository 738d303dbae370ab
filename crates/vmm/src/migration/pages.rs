//! Which guest pages to send, and moving them: the sender's page sets (pages the guest
//! ever touched for round 0; KVM's dirty log ORed with the VMM's own writes for every
//! round after), reading them into page runs, and the receiver's writing of runs into a
//! fresh RAM.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress};
use warmvm_memory::GuestRam;

use super::stream::{self, Msg, PageRun, Pages, RunData, StreamError, MAX_RUN, PAGE};
use super::MigrationError;
use crate::Vm;

/// A set of pages per RAM region, one bit per page (KVM's dirty-log layout).
#[derive(Clone, Debug, Default)]
pub(crate) struct PageSet {
    /// (region's guest address, bits).
    regions: Vec<(u64, Vec<u64>)>,
}

impl PageSet {
    /// An empty set shaped after `ram`'s regions.
    pub fn empty(ram: &GuestRam) -> Self {
        PageSet {
            regions: ram
                .regions()
                .iter()
                .map(|r| (r.guest_addr, vec![0; r.size.div_ceil(PAGE * 64) as usize]))
                .collect(),
        }
    }

    /// Every page of `ram` that holds data: the memfd's data extents (pages the guest or
    /// the VMM ever wrote; the rest were never touched and read as zero on any host).
    pub fn touched(ram: &GuestRam) -> Result<Self, MigrationError> {
        let mut set = Self::empty(ram);
        for (i, r) in ram.regions().iter().enumerate() {
            let extents = crate::snapshot::ramfile::data_extents(&r.file, r.size)
                .map_err(MigrationError::RamExtents)?;
            for (off, len) in extents {
                let first = off / PAGE;
                let end = (off + len).div_ceil(PAGE).min(r.size / PAGE);
                for p in first..end {
                    set.regions[i].1[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
        }
        Ok(set)
    }

    /// OR `bits` into region `index`.
    pub fn or(&mut self, index: usize, bits: &[u64]) {
        if let Some((_, mine)) = self.regions.get_mut(index) {
            for (m, b) in mine.iter_mut().zip(bits) {
                *m |= b;
            }
        }
    }

    pub fn pages(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn clear(&mut self) {
        for (_, bits) in &mut self.regions {
            bits.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// The set as runs of consecutive pages, each at most [`MAX_RUN`] bytes: (gpa, len).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (base, bits) in &self.regions {
            let mut open: Option<(u64, u64)> = None;
            for (w, word) in bits.iter().enumerate() {
                if *word == 0 {
                    if let Some(run) = open.take() {
                        out.push(run);
                    }
                    continue;
                }
                for b in 0..64 {
                    let page = w as u64 * 64 + b;
                    if word & (1 << b) != 0 {
                        let gpa = base + page * PAGE;
                        match &mut open {
                            Some((start, len)) if *start + *len == gpa && *len < MAX_RUN => {
                                *len += PAGE
                            }
                            _ => {
                                if let Some(run) = open.replace((gpa, PAGE)) {
                                    out.push(run);
                                }
                            }
                        }
                    } else if let Some(run) = open.take() {
                        out.push(run);
                    }
                }
            }
            if let Some(run) = open.take() {
                out.push(run);
            }
        }
        out
    }
}

/// The dirty log of a VM under migration: KVM's log of the guest's writes and the RAM's
/// record of the VMM's own, both switched on by [`DirtyLog::start`].
pub(crate) struct DirtyLog<'a> {
    vm: &'a Vm,
    /// KVM slot of each RAM region, by index.
    slots: Vec<u32>,
}

impl<'a> DirtyLog<'a> {
    /// Start logging. From here every page written, by the guest or the VMM, is in a later
    /// [`DirtyLog::harvest`]. What the VMM wrote before is dropped: round 0 reads the pages
    /// as they are now.
    pub fn start(vm: &'a Vm) -> Result<Self, MigrationError> {
        let kvm = vm.shared.kvm_vm();
        let kvm_slots = kvm.memory_slots();
        let mut slots = Vec::new();
        for r in vm.shared.ram.regions() {
            let slot = kvm_slots
                .iter()
                .find(|s| s.guest_addr == r.guest_addr && s.size == r.size)
                .ok_or(MigrationError::NoSlot(r.guest_addr))?;
            slots.push(slot.slot);
        }
        kvm.start_dirty_log().map_err(MigrationError::dirty_log)?;
        for i in 0..slots.len() {
            vm.shared.ram.take_vmm_dirty(i);
        }
        Ok(DirtyLog { vm, slots })
    }

    /// OR every page written since the last harvest into `into`, emptying both logs.
    pub fn harvest(&self, into: &mut PageSet) -> Result<(), MigrationError> {
        let kvm = self.vm.shared.kvm_vm();
        for (i, slot) in self.slots.iter().enumerate() {
            let guest = kvm.dirty_log(*slot).map_err(MigrationError::dirty_log)?;
            into.or(i, &guest);
            if let Some(vmm) = self.vm.shared.ram.take_vmm_dirty(i) {
                into.or(i, &vmm);
            }
        }
        Ok(())
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.vm.shared.kvm_vm().stop_dirty_log() {
            tracing::warn!(vm = %self.vm.name(), error = %e, "could not stop the dirty log");
        }
    }
}

/// What sending a set of pages cost.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sent {
    pub pages: u64,
    pub zero_pages: u64,
    /// Bytes written to the stream (frames, headers included).
    pub bytes: u64,
}

fn is_zero(page: &[u8]) -> bool {
    // Folded per 64-byte chunk so that the compiler vectorises it.
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, b| a | b) == 0)
}

/// Read the pages of `set` from `ram` and send them as `round`: runs of non-zero pages as
/// their bytes, runs of zero pages as their length, in frames of about
/// [`stream::FRAME_DATA`] bytes.
pub(crate) fn send_set<W: Write>(
    w: &mut W,
    ram: &GuestRam,
    set: &PageSet,
    round: u32,
) -> Result<Sent, MigrationError> {
    let mut sent = Sent::default();
    let mut frame: Vec<PageRun> = Vec::new();
    let mut frame_bytes = 0usize;
    let mut buf = vec![0u8; MAX_RUN as usize];
    let mut flush = |frame: &mut Vec<PageRun>, sent: &mut Sent| -> Result<(), StreamError> {
        if !frame.is_empty() {
            let runs = std::mem::take(frame);
            sent.bytes += stream::send(w, &Msg::Pages(Pages { round, runs }))?;
        }
        Ok(())
    };
    for (gpa, len) in set.runs() {
        let data = &mut buf[..len as usize];
        ram.memory()
            .read_slice(data, GuestAddress(gpa))
            .map_err(|err| MigrationError::ReadRam { gpa, err })?;
        // Split the run where pages turn from zero to data and back.
        let mut start = 0usize;
        while start < data.len() {
            let zero = is_zero(&data[start..start + PAGE as usize]);
            let mut end = start + PAGE as usize;
            while end < data.len() && is_zero(&data[end..end + PAGE as usize]) == zero {
                end += PAGE as usize;
            }
            let pages = ((end - start) as u64) / PAGE;
            sent.pages += pages;
            let run = PageRun {
                gpa: gpa + start as u64,
                len: (end - start) as u64,
                data: if zero {
                    sent.zero_pages += pages;
                    RunData::Zero
                } else {
                    frame_bytes += end - start;
                    RunData::Bytes(data[start..end].to_vec())
                },
            };
            frame.push(run);
            start = end;
            if frame_bytes >= stream::FRAME_DATA || frame.len() >= 4096 {
                flush(&mut frame, &mut sent)?;
                frame_bytes = 0;
            }
        }
    }
    flush(&mut frame, &mut sent)?;
    Ok(sent)
}

/// Why a run cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("run at {gpa:#x}+{len:#x} is not whole pages")]
    Unaligned { gpa: u64, len: u64 },
    #[error("run at {gpa:#x}+{len:#x} is longer than {MAX_RUN} bytes")]
    TooLong { gpa: u64, len: u64 },
    #[error("run at {gpa:#x}+{len:#x} is not inside one RAM region")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("run at {gpa:#x} says {len} bytes and carries {got}")]
    Length { gpa: u64, len: u64, got: u64 },
}

/// Write `run` into `ram` (the destination's, which no vCPU runs on yet). `fresh`: the RAM
/// was never written (round 0), so a zero run needs no write.
pub(crate) fn apply(ram: &GuestRam, run: &PageRun, fresh: bool) -> Result<(), RunError> {
    let (gpa, len) = (run.gpa, run.len);
    if len == 0 || !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(RunError::Unaligned { gpa, len });
    }
    if len > MAX_RUN {
        return Err(RunError::TooLong { gpa, len });
    }
    let inside = ram.regions().iter().any(|r| {
        gpa >= r.guest_addr
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= r.guest_addr + r.size)
    });
    if !inside {
        return Err(RunError::OutsideRam { gpa, len });
    }
    let outside = || RunError::OutsideRam { gpa, len };
    match &run.data {
        RunData::Bytes(b) if b.len() as u64 != len => Err(RunError::Length {
            gpa,
            len,
            got: b.len() as u64,
        }),
        RunData::Bytes(b) => ram
            .memory()
            .write_slice(b, GuestAddress(gpa))
            .map_err(|_| outside()),
        RunData::Zero if fresh => Ok(()),
        RunData::Zero => {
            static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
            for off in (0..len).step_by(PAGE as usize) {
                ram.memory()
                    .write_slice(&ZEROS, GuestAddress(gpa + off))
                    .map_err(|_| outside())?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_becomes_runs_of_consecutive_pages_capped_at_the_run_limit() {
        let ram = GuestRam::create("t", 16 << 20, false).unwrap();
        let mut set = PageSet::empty(&ram);
        let mut bits = vec![0u64; 64];
        for p in [1u64, 2, 3, 63, 64, 65, 200] {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        // 1200 consecutive pages from 1500: more than one run's worth.
        for p in 1500..2700u64 {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        set.or(0, &bits);
        assert_eq!(set.pages(), 7 + 1200);
        let runs = set.runs();
        assert_eq!(
            runs[..3],
            [(PAGE, 3 * PAGE), (63 * PAGE, 3 * PAGE), (200 * PAGE, PAGE)]
        );
        let long: Vec<_> = runs[3..].to_vec();
        assert_eq!(long[0], (1500 * PAGE, MAX_RUN));
        assert_eq!(long.iter().map(|r| r.1).sum::<u64>(), 1200 * PAGE);
        assert!(long.iter().all(|r| r.1 <= MAX_RUN));
        set.clear();
        assert_eq!(set.pages(), 0);
    }

    #[test]
    fn zero_pages_go_as_runs_and_every_page_arrives() {
        let src = GuestRam::create("s", 8 << 20, false).unwrap();
        src.memory()
            .write_obj(0xabu8, GuestAddress(0x5123))
            .unwrap();
        src.memory()
            .write_obj(0xcdu8, GuestAddress(0x7000))
            .unwrap();
        // Pages 4..=8: data, zero (0x6000 written with zero), data, zero, zero.
        src.memory().write_obj(0u8, GuestAddress(0x6000)).unwrap();
        let mut set = PageSet::empty(&src);
        set.or(0, &[0b1_1111_0000]);
        let mut wire = Vec::new();
        let sent = send_set(&mut wire, &src, &set, 3).unwrap();
        assert_eq!((sent.pages, sent.zero_pages), (5, 3));
        assert!(sent.bytes < 3 * PAGE, "zero pages are not sent as bytes");
        let mut r = wire.as_slice();
        let Msg::Pages(pages) = stream::recv(&mut r).unwrap() else {
            panic!("not pages")
        };
        assert_eq!(pages.round, 3);
        let shape: Vec<_> = pages
            .runs
            .iter()
            .map(|r| (r.gpa, r.len, matches!(r.data, RunData::Zero)))
            .collect();
        assert_eq!(
            shape,
            [
                (0x4000, PAGE, true),
                (0x5000, PAGE, false),
                (0x6000, PAGE, true),
                (0x7000, PAGE, false),
                (0x8000, PAGE, true)
            ]
        );
        let dst = GuestRam::create("d", 8 << 20, false).unwrap();
        dst.memory()
            .write_obj(0xffu8, GuestAddress(0x8004))
            .unwrap();
        for run in &pages.runs {
            apply(&dst, run, false).unwrap();
        }
        let byte = |m: &GuestRam, a: u64| m.memory().read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(byte(&dst, 0x5123), 0xab);
        assert_eq!(byte(&dst, 0x7000), 0xcd);
        assert_eq!(byte(&dst, 0x8004), 0, "a zero run clears the page");
    }

    #[test]
    fn runs_outside_ram_or_malformed_are_refused() {
        let ram = GuestRam::create("t", 4 << 20, false).unwrap();
        let run = |gpa, len, data| PageRun { gpa, len, data };
        let cases = [
            run(0x1001, PAGE, RunData::Zero),
            run(0x1000, 100, RunData::Zero),
            run(0, 0, RunData::Zero),
            run(4 << 20, PAGE, RunData::Zero),
            run((4 << 20) - PAGE, 2 * PAGE, RunData::Zero),
            run(u64::MAX - PAGE + 1, PAGE, RunData::Zero),
            run(0, 2 * MAX_RUN, RunData::Zero),
            run(0x1000, PAGE, RunData::Bytes(vec![1; 10])),
        ];
        for c in &cases {
            assert!(apply(&ram, c, false).is_err(), "{:?}", (c.gpa, c.len));
        }
    }
}
