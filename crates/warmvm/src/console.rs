//! `warmvm vm console NAME`: print a VM's console log (the file the daemon names in the VM's
//! report, `console_log`) and follow it live, as `tail -f` would, until the VM ends.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use warmvm_api::{Client, ClientError};
use warmvm_vmm::Lifecycle;

use crate::failure::{self, Failure, EXIT_HOST};

/// How often the log is polled for new output while following.
const POLL: Duration = Duration::from_millis(20);
/// How often the daemon is asked whether the VM still runs.
const STATE_POLL: Duration = Duration::from_millis(500);

/// States in which a VM may still write to its console.
fn may_write(state: &Lifecycle) -> bool {
    matches!(
        state,
        Lifecycle::Created | Lifecycle::Running | Lifecycle::Paused
    )
}

/// The byte offset where the last `n` lines of `buf` start.
pub fn last_lines_start(buf: &[u8], n: usize) -> usize {
    if n == 0 {
        return buf.len();
    }
    // A final newline ends the last line; it does not start an empty one.
    let end = if buf.last() == Some(&b'\n') {
        buf.len() - 1
    } else {
        buf.len()
    };
    let mut seen = 0;
    for i in (0..end).rev() {
        if buf[i] == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

/// Write to standard output; false once the reader has gone (a closed pipe).
fn emit(out: &mut impl Write, bytes: &[u8]) -> Result<bool, Failure> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Failure::new(EXIT_HOST, format!("writing the console: {e}"))),
    }
}

pub fn follow(
    client: &Client,
    name: &str,
    lines: Option<usize>,
    follow: bool,
) -> Result<(), Failure> {
    let report = client
        .typed()
        .show(name)
        .map_err(failure::api)?
        .into_value();
    let path = report.console_log;
    let unreadable = |e: std::io::Error| {
        Failure::new(
            EXIT_HOST,
            format!("cannot read console log {}: {e}", path.display()),
        )
    };
    let mut file = std::fs::File::open(&path).map_err(unreadable)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(unreadable)?;
    let start = lines.map_or(0, |n| last_lines_start(&buf, n));
    let mut out = std::io::stdout().lock();
    if !emit(&mut out, &buf[start..])? || !follow {
        return Ok(());
    }
    let mut running = may_write(&report.lifecycle);
    let mut asked = Instant::now();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut chunk).map_err(unreadable)?;
        if n > 0 {
            if !emit(&mut out, &chunk[..n])? {
                return Ok(());
            }
            continue;
        }
        // Everything written so far is out: stop once the VM can write no more.
        if !running {
            return Ok(());
        }
        // A log truncated under us (e.g. by the operator) is read again from its start.
        let len = file.metadata().map_err(unreadable)?.len();
        if len < file.stream_position().map_err(unreadable)? {
            file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
        }
        std::thread::sleep(POLL);
        if asked.elapsed() >= STATE_POLL {
            asked = Instant::now();
            running = match client.typed().show(name) {
                Ok(r) => may_write(&r.lifecycle),
                // Deleted meanwhile: nothing more will come.
                Err(ClientError::Api { status: 404, .. }) => false,
                Err(e) => return Err(failure::api(e)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::last_lines_start;

    #[test]
    fn last_lines_are_found() {
        let b = b"one\ntwo\nthree\n";
        assert_eq!(&b[last_lines_start(b, 1)..], b"three\n");
        assert_eq!(&b[last_lines_start(b, 2)..], b"two\nthree\n");
        assert_eq!(&b[last_lines_start(b, 9)..], b);
        assert_eq!(&b[last_lines_start(b, 0)..], b"");
        let partial = b"one\ntwo";
        assert_eq!(&partial[last_lines_start(partial, 1)..], b"two");
        assert_eq!(last_lines_start(b"", 3), 0);
    }
}
