use std::sync::atomic::{AtomicU64, Ordering};

/// Counts accesses to ports and addresses no device decodes. A guest can make millions of
/// them, so logging is rate-limited to the 1st, 2nd, 4th, 8th... of each kind.
#[derive(Debug, Default)]
pub struct UnknownAccesses {
    pio_reads: AtomicU64,
    pio_writes: AtomicU64,
    mmio_reads: AtomicU64,
    mmio_writes: AtomicU64,
}

/// A snapshot of [`UnknownAccesses`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnknownCounts {
    pub pio_reads: u64,
    pub pio_writes: u64,
    pub mmio_reads: u64,
    pub mmio_writes: u64,
}

impl UnknownAccesses {
    pub fn pio(&self, vm: &str, port: u16, len: usize, write: bool) {
        let counter = if write {
            &self.pio_writes
        } else {
            &self.pio_reads
        };
        let n = counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if n.is_power_of_two() {
            tracing::warn!(
                vm,
                port = format_args!("{port:#x}"),
                len,
                write,
                count = n,
                "guest accessed a port no device handles"
            );
        }
    }

    pub fn mmio(&self, vm: &str, addr: u64, len: usize, write: bool) {
        let counter = if write {
            &self.mmio_writes
        } else {
            &self.mmio_reads
        };
        let n = counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if n.is_power_of_two() {
            tracing::warn!(
                vm,
                addr = format_args!("{addr:#x}"),
                len,
                write,
                count = n,
                "guest accessed an MMIO address no device handles"
            );
        }
    }

    pub fn counts(&self) -> UnknownCounts {
        UnknownCounts {
            pio_reads: self.pio_reads.load(Ordering::Relaxed),
            pio_writes: self.pio_writes.load(Ordering::Relaxed),
            mmio_reads: self.mmio_reads.load(Ordering::Relaxed),
            mmio_writes: self.mmio_writes.load(Ordering::Relaxed),
        }
    }
}
