//! Progress of long-running commands on standard error: one line rewritten in place on a
//! terminal, plain lines (one per step) otherwise, so logs and CI output stay readable.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    what: String,
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
}

impl Progress {
    /// `total` steps of `what`.
    pub fn new(what: &str, total: usize) -> Self {
        Self {
            what: what.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// The line for the step about to start (`step` describes it).
    fn line(&self, step: &str) -> String {
        let elapsed = self.started.elapsed().as_secs();
        let eta = if self.done > 0 {
            let per = self.started.elapsed().as_secs_f64() / self.done as f64;
            format!(
                ", about {} s left",
                (per * (self.total - self.done) as f64).round()
            )
        } else {
            String::new()
        };
        format!(
            "{}: [{}/{}] {step} ({elapsed} s{eta})",
            self.what,
            self.done + 1,
            self.total
        )
    }

    /// A step starts.
    pub fn step(&mut self, step: &str) {
        let line = self.line(step);
        let mut err = std::io::stderr().lock();
        let _ = if self.terminal {
            // Rewrite the line in place; clear what a longer previous line left.
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    /// The step that started last is over.
    pub fn done(&mut self) {
        self.done = (self.done + 1).min(self.total);
    }

    /// Every step is over: end the terminal's line.
    pub fn finish(&mut self) {
        let mut err = std::io::stderr().lock();
        let secs = self.started.elapsed().as_secs_f64();
        let _ = if self.terminal {
            writeln!(
                err,
                "\r\x1b[2K{}: {} steps in {secs:.0} s",
                self.what, self.done
            )
        } else {
            writeln!(err, "{}: {} steps in {secs:.0} s", self.what, self.done)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn lines_count_steps_and_estimate_the_rest() {
        let mut p = Progress::new("bench", 4);
        assert!(
            p.line("a").starts_with("bench: [1/4] a (0 s"),
            "{}",
            p.line("a")
        );
        assert!(!p.line("a").contains("left"));
        p.done();
        assert!(p.line("b").starts_with("bench: [2/4] b"));
        assert!(p.line("b").contains("s left"), "{}", p.line("b"));
    }
}
