//! The guest's disk workload: vCPU 0 indexes the tar archive on the first virtio-blk disk,
//! prints its files with their checksums, and re-reads and re-checks them every
//! `disk_check_ms` (so a warm reboot is crossed by disk I/O, not only by RAM).

use crate::blk::{self, Blk};
use crate::boot::Machine;
use crate::tar::{self, Index, TarError};
use crate::time;

pub struct Disk {
    blk: Blk,
    index: &'static mut Index,
    pub checks: u64,
    pub mismatches: u64,
    pub errors: u64,
    last_check_ns: u64,
}

const _: () = assert!(blk::AREA_BYTES + tar::INDEX_BYTES <= crate::boot::IO_AREA_SIZE);

fn report_error(what: &str, e: TarError) {
    say!("warmvm-guest: disk0: {}: {:?}", what, e);
}

impl Disk {
    /// Set up the first virtio-blk device as a disk and index it (vCPU 0, once); with
    /// `hostile`, then break the protocol on it once.
    pub fn open(m: &Machine, hostile: Option<crate::cmdline::Hostile>) -> Option<Self> {
        let window = crate::virtio::find(m, crate::virtio::TYPE_BLOCK)?;
        let mut blk = match Blk::new(window, m.io_area) {
            Ok(b) => b,
            Err(e) => {
                say!("warmvm-guest: disk0: cannot set up: {:?}", e);
                return None;
            }
        };
        // SAFETY: the index lies in the I/O area after the driver's own part; only vCPU 0
        // uses the I/O area, and only through this one `Disk`.
        let index = unsafe { &mut *((m.io_area + blk::AREA_BYTES) as *mut Index) };
        if let Err(e) = tar::scan(&mut blk, index) {
            report_error("not a readable tar archive", e);
            return None;
        }
        say!(
            "warmvm-guest: disk0: {} sectors, tar archive of {} files, {} bytes",
            blk.sectors,
            index.count,
            index.bytes
        );
        for e in &index.entries[..index.count] {
            crate::console::with_console(|s| {
                use core::fmt::Write;
                let _ = s.write_str("warmvm-guest: disk0: file ");
                s.put_sanitised(e.name());
                let _ = writeln!(s, " {} bytes fnv1a {:016x}", e.size, e.fnv);
            });
        }
        if let Some(how) = hostile {
            let failed = blk.misbehave(how);
            say!(
                "warmvm-guest: hostile {:?}: the disk {} a reset",
                how,
                if failed { "needs" } else { "does NOT need" }
            );
            return None;
        }
        Some(Self {
            blk,
            index,
            checks: 0,
            mismatches: 0,
            errors: 0,
            last_check_ns: time::now_ns(),
        })
    }

    /// The file named `name`.
    pub fn find(&self, name: &[u8]) -> Option<tar::Entry> {
        self.index.entries[..self.index.count]
            .iter()
            .find(|e| e.name() == name)
            .copied()
    }

    pub fn blk(&mut self) -> &mut Blk {
        &mut self.blk
    }

    /// Re-read every file and compare its checksum, if `every_ms` has passed.
    pub fn maybe_check(&mut self, every_ms: u64, quiet: bool) {
        let now = time::now_ns();
        if every_ms == 0 || now.saturating_sub(self.last_check_ns) < every_ms * 1_000_000 {
            return;
        }
        self.last_check_ns = now;
        let mut bad = 0u64;
        for i in 0..self.index.count {
            let e = self.index.entries[i];
            match tar::checksum(&mut self.blk, &e) {
                Ok(h) if h == e.fnv => {}
                Ok(_) => {
                    bad += 1;
                    crate::console::with_console(|s| {
                        use core::fmt::Write;
                        let _ = s.write_str("warmvm-guest: disk0: DISK MISMATCH in ");
                        s.put_sanitised(e.name());
                        let _ = s.write_str("\n");
                    });
                }
                Err(err) => {
                    self.errors += 1;
                    report_error("read failed", err);
                    return;
                }
            }
        }
        self.checks += 1;
        self.mismatches += bad;
        if !quiet || bad != 0 {
            say!(
                "warmvm-guest: disk check {}: {} files, {} mismatches, {} reads, t={} ms",
                self.checks,
                self.index.count,
                self.mismatches,
                self.blk.reads,
                time::now_ns() / 1_000_000
            );
        }
    }
}
