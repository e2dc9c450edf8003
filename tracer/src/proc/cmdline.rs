//! `/proc/PID/cmdline`: a process's command line.

use std::fs;

use super::ProcError;

/// The arguments of a NUL-separated command line joined by spaces (empty arguments dropped,
/// invalid UTF-8 replaced).
pub fn parse_cmdline(raw: &[u8]) -> String {
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.join(" ")
}

/// The command line of `pid`, arguments joined by spaces.
pub fn read_command_line(pid: u32) -> Result<String, ProcError> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| ProcError::from_io(pid, "cmdline", e))?;
    Ok(parse_cmdline(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_arguments() {
        assert_eq!(parse_cmdline(b"python3\0-m\0vllm\0"), "python3 -m vllm");
        assert_eq!(parse_cmdline(b"a\0\0b"), "a b");
        assert_eq!(parse_cmdline(b""), "");
        assert_eq!(parse_cmdline(b"\xff\0x"), "\u{fffd} x");
    }
}
