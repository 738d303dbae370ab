//! How a subcommand of either binary fails: one line (an error and its sources) and an exit
//! status, printed as `warmvm: error: ...` by [`Failure::exit`].

use std::process::ExitCode;

/// A failure the binary turns into one line and an exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    /// One of [`crate::exit`]'s statuses.
    pub code: u8,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }

    /// `e` and its sources on one line (see [`chain`]), with exit status `code`.
    pub fn from_error(code: u8, e: &dyn std::error::Error) -> Self {
        Self::new(code, chain(e))
    }

    /// Print the line on standard error and give the exit status (what both binaries'
    /// `main` does with a failure).
    pub fn exit(self) -> ExitCode {
        eprintln!("warmvm: error: {}", self.message);
        ExitCode::from(self.code)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// `e`'s message and its sources', on one line joined with ": ". A message that already
/// ends with its source's (the one-line messages the API shows include their cause) does
/// not repeat it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::EXIT_HOST;

    /// An error whose message leaves its cause to the chain.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot boot VM a")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// An error whose message already ends with its cause's.
    #[derive(Debug)]
    struct Repeats(std::io::Error);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "VM a: cannot start a vCPU thread: {}", self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn the_chain_is_one_line_joined_with_colons() {
        let e = Outer(std::io::Error::other("the disk is gone"));
        assert_eq!(chain(&e), "cannot boot VM a: the disk is gone");
    }

    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        let e = Repeats(std::io::Error::other("no threads left"));
        let failure = Failure::from_error(EXIT_HOST, &e);
        assert_eq!(
            failure.message,
            "VM a: cannot start a vCPU thread: no threads left"
        );
        assert_eq!(failure.code, EXIT_HOST);
    }
}
