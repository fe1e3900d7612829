//! How an error reaches a person at a binary's edge: its message, then those of its causes
//! that the message does not already say.
//!
//! Our error types put their cause's text in their own message (so that a log line written
//! with `%e` says everything) and most also return the cause from `source()` (so that code can
//! look at it). Printed the usual way — the message, then every cause — such an error says the
//! same thing twice: `Error: /etc/lockhub.toml: Is a directory (os error 21)`, then `Caused by:
//! Is a directory (os error 21)`. [`Report`] leaves out a cause whose text the last line it
//! printed already holds, and keeps every cause that adds something (the context a binary puts
//! around an error, say).

use std::error::Error;
use std::fmt;

/// An error as printed on a binary's standard error: `Error: message`, then `Caused by:` and
/// the causes not already said.
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = self.0.to_string();
        write!(f, "Error: {said}")?;
        let mut heading = false;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !said.contains(&text) {
                if !std::mem::replace(&mut heading, true) {
                    write!(f, "\n\nCaused by:")?;
                }
                write!(f, "\n    {text}")?;
                said = text;
            }
            cause = error.source();
        }
        Ok(())
    }
}

/// A binary's exit status from what its `run` returned: success, or the error [`Report`]ed on
/// standard error and failure.
pub fn exit_code<E: AsRef<dyn Error + 'static>>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            crate::errln!("{}", Report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn io(kind: std::io::ErrorKind, text: &str) -> std::io::Error {
        std::io::Error::new(kind, text.to_owned())
    }

    #[test]
    fn a_cause_the_message_already_says_is_not_said_again() {
        let error = crate::config::ConfigError::Read {
            path: "/etc/lockhub.toml".into(),
            source: io(std::io::ErrorKind::IsADirectory, "Is a directory"),
        };
        assert_eq!(Report(&error).to_string(), "Error: /etc/lockhub.toml: Is a directory");
    }

    #[test]
    fn context_around_an_error_is_followed_by_what_it_does_not_say() {
        let inner = io(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let error = Err::<(), _>(inner).context("reading the answer").context("lockhub status").unwrap_err();
        assert_eq!(
            Report(&*error).to_string(),
            "Error: lockhub status\n\nCaused by:\n    reading the answer\n    connection reset by peer"
        );
        // A context that embeds its cause, around an error that embeds its own.
        let config = crate::config::ConfigError::Read {
            path: "/etc/lockhub.toml".into(),
            source: io(std::io::ErrorKind::NotFound, "No such file"),
        };
        let error = anyhow::Error::new(config).context("starting the daemon");
        assert_eq!(
            Report(&*error).to_string(),
            "Error: starting the daemon\n\nCaused by:\n    /etc/lockhub.toml: No such file"
        );
    }

    #[test]
    fn an_error_without_a_cause_is_one_line() {
        let error = io(std::io::ErrorKind::Other, "the gateway answered refused");
        assert_eq!(Report(&error).to_string(), "Error: the gateway answered refused");
    }
}
