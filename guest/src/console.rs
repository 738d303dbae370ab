//! A polled 16550 writer. Each byte costs two exits (LSR poll, THR write), so the guest
//! prints only a handful of lines.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::io;

/// Serialises lines from different vCPUs (in .data rather than .bss: see workload.rs).
#[link_section = ".data.warmvm_console_lock"]
static LOCK: AtomicBool = AtomicBool::new(false);

/// LSR bit 5: the transmit holding register is empty.
const LSR_THRE: u8 = 0x20;
/// Give up waiting for THRE after this many polls (a missing UART must not hang the guest).
const MAX_POLLS: u32 = 1000;

pub struct Serial;

impl Serial {
    fn put(&mut self, byte: u8) {
        let port = io::serial_port();
        for _ in 0..MAX_POLLS {
            if io::inb(port.wrapping_add(5)) & LSR_THRE != 0 {
                break;
            }
        }
        io::outb(port, byte);
    }

    /// Printable ASCII as is, anything else as '?'.
    pub fn put_sanitised(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.put(if (0x20..0x7f).contains(&b) { b } else { b'?' });
        }
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Run `f` with the console to itself.
pub fn with_console<R>(f: impl FnOnce(&mut Serial) -> R) -> R {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let r = f(&mut Serial);
    LOCK.store(false, Ordering::Release);
    r
}

/// Print one line (a newline is appended).
pub fn print_line(args: fmt::Arguments) {
    with_console(|s| {
        let _ = s.write_fmt(args);
        let _ = s.write_str("\n");
    });
}

/// Print without taking the lock (the panic handler: the lock may be ours already).
pub fn print_unlocked(args: fmt::Arguments) {
    let _ = Serial.write_fmt(args);
}

macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::print_line(format_args!($($arg)*))
    };
}
