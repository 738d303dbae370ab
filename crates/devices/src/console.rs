use std::fs::File;
use std::io::{self, Write};

/// Where a VM's console output goes: its log file, and the terminal on request. Output is
/// buffered and written out at each newline (and when the VMM calls [`ConsoleSink::emit`]:
/// when a vCPU waits, parks or ends), so a byte-at-a-time UART does not cost a system call
/// per byte. `Write::flush` deliberately does not write out a partial line: vm-superio
/// flushes its writer after every byte.
pub struct ConsoleSink {
    log: Option<File>,
    to_stdout: bool,
    line: Vec<u8>,
    captured: Option<Vec<u8>>,
}

impl ConsoleSink {
    pub fn new(log: Option<File>, to_stdout: bool) -> Self {
        Self {
            log,
            to_stdout,
            line: Vec::with_capacity(256),
            captured: None,
        }
    }

    /// A sink that keeps everything in memory (for tests).
    pub fn memory() -> Self {
        Self {
            captured: Some(Vec::new()),
            ..Self::new(None, false)
        }
    }

    pub fn captured(&self) -> &[u8] {
        self.captured.as_deref().unwrap_or_default()
    }

    /// The log file, e.g. to hand it over to another VMM process.
    pub fn log_file(&self) -> Option<&File> {
        self.log.as_ref()
    }

    /// Write out everything buffered, partial line included.
    pub fn emit(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        if let Some(f) = self.log.as_mut() {
            f.write_all(&self.line)?;
        }
        if self.to_stdout {
            let mut out = io::stdout().lock();
            out.write_all(&self.line)?;
            out.flush()?;
        }
        if let Some(c) = self.captured.as_mut() {
            c.extend_from_slice(&self.line);
        }
        self.line.clear();
        Ok(())
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= 4096 {
            // A full disk or closed terminal must not stop the guest: the bytes are dropped.
            let _ = self.emit();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_written_out_per_line_not_per_flush() {
        let mut sink = ConsoleSink::memory();
        sink.write_all(b"pro").unwrap();
        sink.flush().unwrap();
        assert_eq!(
            sink.captured(),
            b"",
            "vm-superio's per-byte flush must not write"
        );
        sink.write_all(b"mpt\n").unwrap();
        assert_eq!(sink.captured(), b"prompt\n");
        sink.write_all(b"login: ").unwrap();
        assert_eq!(sink.captured(), b"prompt\n");
        sink.emit().unwrap();
        assert_eq!(sink.captured(), b"prompt\nlogin: ");
    }
}
