//! What the binaries print on standard output and standard error, written so that a reader
//! who went away is the end of the output rather than a failure.
//!
//! `lockhub audit | head -3` closes the pipe once it has its lines. Rust ignores SIGPIPE, so
//! the next write fails with `BrokenPipe`, and `println!` turns that into a panic (exit 101,
//! "failed printing to stdout"). A C tool would have died of the signal, silently; the reader
//! had what it wanted, so that is what we do too: the command ends quietly and successfully.
//! Restoring SIGPIPE's default instead would also kill the control client, which writes to
//! the daemon's socket with write(2) and must see a daemon that hung up as an error.
//!
//! On standard output every other write error (a full disk behind a redirection, say) is still
//! an error, and says it was standard output that failed. Standard error carries what a person
//! is told on the side (progress, prompts, the final error): failing to write it changes
//! neither what a command does nor its exit status, so [`note`] lets it go.

use std::fmt;
use std::io::{self, Write};

/// Whether anyone is still reading standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// The output was written (a later write may still find the reader gone).
    Reading,
    /// The reader closed its end: nothing more will be read, so nothing more needs writing.
    Gone,
}

/// Writing to standard output failed for a reason other than its reader going away.
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct OutputError(#[source] io::Error);

/// Writes what `write` writes to standard output, then flushes it.
///
/// Works for writers that take any `io::Write` (a man page renderer, say) as for lines.
pub fn write_with(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<Reader, OutputError> {
    written(write_to(&mut io::stdout().lock(), write))
}

/// Writes one line (the text and a newline) to standard output, flushed.
pub fn line(text: fmt::Arguments<'_>) -> Result<Reader, OutputError> {
    write_with(|out| {
        out.write_fmt(text)?;
        out.write_all(b"\n")
    })
}

/// [`line()`] with `format!`'s arguments: `outln!("{name}: ok")?`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::standard_streams::line(::std::format_args!($($arg)*))
    };
}

/// Writes one line to standard error; a failure to (its reader gone, say) is let go.
pub fn note(text: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(text).and_then(|()| err.write_all(b"\n"));
}

/// Asks on standard error, leaving the cursor on the line for the answer; a failure is let go.
pub fn ask(question: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(question);
}

/// [`note`] with `format!`'s arguments: `errln!("{step}…")`.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::standard_streams::note(::std::format_args!($($arg)*))
    };
}

fn write_to<W: Write>(out: &mut W, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
    write(out)?;
    out.flush()
}

fn written(result: io::Result<()>) -> Result<Reader, OutputError> {
    match result {
        Ok(()) => Ok(Reader::Reading),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Reader::Gone),
        Err(e) => Err(OutputError(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose every write fails as told.
    struct Failing(io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(self.0))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_gone_ends_the_output_and_anything_else_is_an_error() {
        let gone = written(write_to(&mut Failing(io::ErrorKind::BrokenPipe), |out| out.write_all(b"x")));
        assert_eq!(gone.unwrap(), Reader::Gone);
        let full = written(write_to(&mut Failing(io::ErrorKind::StorageFull), |out| out.write_all(b"x")));
        let message = full.unwrap_err().to_string();
        assert!(message.starts_with("writing to standard output: "), "{message}");
        let mut buffer = Vec::new();
        let fine = written(write_to(&mut buffer, |out| writeln!(out, "a {}", 1)));
        assert_eq!((fine.unwrap(), buffer.as_slice()), (Reader::Reading, &b"a 1\n"[..]));
    }
}
