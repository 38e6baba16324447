//! Reads a secret (an MFA code) from the controlling terminal, with echo off before the prompt shows.
//!
//! Why not `rpassword::prompt_password`: it writes the prompt first and only then turns echo
//! off, so a code typed the moment the prompt appears (a person typing ahead, a password
//! manager, a test driving a pseudo-terminal) is echoed on the screen in that window. Here the
//! terminal is switched to no-echo, non-canonical input *before* the prompt is written, and the
//! original settings are restored on every way out (Enter, Ctrl-C, Ctrl-D, an error).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};

use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};

/// Longest secret accepted; anything longer is not a code and is refused rather than buffered.
const MAX_SECRET_BYTES: usize = 1024;

/// What one typed byte does to the line being read.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    Done,
    Cancelled,
    EndOfInput,
    TooLong,
}

/// Line editing for a hidden line: Enter ends it, Backspace/Delete removes a byte, Ctrl-U clears
/// the line, Ctrl-C cancels, Ctrl-D on an empty line ends input. Pure, so it is unit-tested.
fn edit(line: &mut Vec<u8>, byte: u8) -> Step {
    match byte {
        b'\r' | b'\n' => Step::Done,
        0x03 => Step::Cancelled,
        0x04 if line.is_empty() => Step::EndOfInput,
        0x04 => Step::Continue,
        0x08 | 0x7f => {
            line.pop();
            Step::Continue
        }
        0x15 => {
            line.clear();
            Step::Continue
        }
        _ if line.len() >= MAX_SECRET_BYTES => Step::TooLong,
        _ => {
            line.push(byte);
            Step::Continue
        }
    }
}

/// Puts the terminal's original settings back when dropped.
struct RestoreOnDrop<'a> {
    tty: &'a File,
    original: Termios,
}

impl Drop for RestoreOnDrop<'_> {
    fn drop(&mut self) {
        // TCSANOW: restore at once; nothing typed after the secret is thrown away.
        let _ = termios::tcsetattr(self.tty, SetArg::TCSANOW, &self.original);
    }
}

/// Writes `prompt` on the controlling terminal and reads one line from it without echo.
/// Errors: no controlling terminal (`NotFound`-like errors from opening `/dev/tty`), Ctrl-C
/// (`Interrupted`), end of input (`UnexpectedEof`), a line over 1 KiB (`InvalidData`).
pub fn prompt_secret(prompt: &str) -> io::Result<String> {
    let tty = OpenOptions::new().read(true).write(true).open("/dev/tty")?;
    let original = termios::tcgetattr(&tty).map_err(io::Error::from)?;
    let mut hidden = original.clone();
    // ISIG off too: Ctrl-C arrives as a byte and ends the read here, so the settings are
    // restored instead of the process dying with echo still off.
    hidden
        .local_flags
        .remove(LocalFlags::ECHO | LocalFlags::ECHONL | LocalFlags::ICANON | LocalFlags::ISIG);
    hidden.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    hidden.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    termios::tcsetattr(&tty, SetArg::TCSANOW, &hidden).map_err(io::Error::from)?;
    let restore = RestoreOnDrop {
        tty: &tty,
        original,
    };

    (&tty).write_all(prompt.as_bytes())?;
    (&tty).flush()?;
    let read = read_hidden_line(&tty);
    let _ = (&tty).write_all(b"\n");
    drop(restore);
    read
}

fn read_hidden_line(mut tty: &File) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = match tty.read(&mut byte) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match edit(&mut line, byte[0]) {
            Step::Continue => {}
            Step::Done => {
                return String::from_utf8(line).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "the typed line is not UTF-8")
                })
            }
            Step::Cancelled => return Err(io::ErrorKind::Interrupted.into()),
            Step::EndOfInput => return Err(io::ErrorKind::UnexpectedEof.into()),
            Step::TooLong => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the typed line is longer than 1 KiB",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(bytes: &[u8]) -> (Vec<u8>, Step) {
        let mut line = Vec::new();
        for &b in bytes {
            let step = edit(&mut line, b);
            if step != Step::Continue {
                return (line, step);
            }
        }
        (line, Step::Continue)
    }

    #[test]
    fn enter_ends_the_line_and_editing_keys_edit_it() {
        assert_eq!(typed(b"123456\r"), (b"123456".to_vec(), Step::Done));
        assert_eq!(typed(b"123457\x7f6\n"), (b"123456".to_vec(), Step::Done));
        assert_eq!(typed(b"999\x15123456\r"), (b"123456".to_vec(), Step::Done));
        assert_eq!(typed(b"\x08\x08\r"), (Vec::new(), Step::Done));
    }

    #[test]
    fn ctrl_c_cancels_and_ctrl_d_ends_only_an_empty_line() {
        assert_eq!(typed(b"12\x03").1, Step::Cancelled);
        assert_eq!(typed(b"\x04").1, Step::EndOfInput);
        assert_eq!(typed(b"12\x0434\r"), (b"1234".to_vec(), Step::Done));
    }

    #[test]
    fn a_line_past_the_cap_is_refused_not_buffered() {
        let mut long = vec![b'7'; MAX_SECRET_BYTES + 10];
        long.push(b'\r');
        let (line, step) = typed(&long);
        assert_eq!(step, Step::TooLong);
        assert_eq!(line.len(), MAX_SECRET_BYTES);
    }
}
