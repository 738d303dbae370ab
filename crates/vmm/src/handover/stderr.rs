//! The new VMM's standard error, relayed through the old VMM until the commit.
//!
//! A new VMM that dies before it could say why (a crash, a bad flag, a missing library)
//! leaves only its output behind. The old VMM reads it through a pipe, passes every line
//! on to its own stderr (so nothing is lost to the operator's log) and keeps the last few,
//! to put in the failure report. After the commit the new VMM writes to the old VMM's
//! stderr directly (handed over as the fd named [`super::STDERR_FD`]), so the pipe is
//! not needed once the old VMM has exited.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

/// How many of the new VMM's last lines a failure report quotes.
const TAIL_LINES: usize = 8;
/// Longest line kept (a runaway line must not grow the old VMM without bound).
const MAX_LINE: usize = 512;

pub(crate) struct StderrRelay {
    tail: Arc<Mutex<VecDeque<String>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl StderrRelay {
    /// Relay `pipe` (the new VMM's stderr) on a thread of its own until it closes.
    pub(crate) fn start(pipe: impl Read + Send + 'static) -> Self {
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let keep = tail.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closing = closed.clone();
        let relay = move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // The operator's log gets everything; a failed write there is not ours to fix.
                let _ = std::io::stderr().lock().write_all(&line);
                let text = String::from_utf8_lossy(&line[..line.len().min(MAX_LINE)])
                    .trim_end()
                    .to_string();
                let mut t = keep.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(text);
            }
            closing.store(true, std::sync::atomic::Ordering::Release);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("handover-stderr".into())
            .spawn(move || {
                warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Handover);
                relay()
            })
        {
            tracing::warn!(error = %e, "cannot relay the new VMM's stderr");
        }
        Self { tail, closed }
    }

    /// Wait, at most `timeout`, until the new VMM's stderr has closed (it has exited and
    /// everything it wrote was read).
    pub(crate) fn wait_closed(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.closed.load(std::sync::atomic::Ordering::Acquire)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The last lines the new VMM wrote, oldest first, one per line.
    pub(crate) fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|l| format!("{l}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_are_kept_and_long_lines_cut() {
        let mut input = Vec::new();
        for i in 0..20 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        input.extend_from_slice(&vec![b'x'; 4000]);
        let relay = StderrRelay::start(std::io::Cursor::new(input));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !relay.tail().contains("xxx") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let tail = relay.tail();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES, "{tail}");
        assert_eq!(lines[0], "line 13");
        assert_eq!(lines[TAIL_LINES - 1].len(), MAX_LINE);
    }
}
