//! The eBPF programs' log (`record --debug-bpf`): aya-log records from the object's log ring,
//! printed on standard error by a thread of their own until the probes are dropped.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::Ebpf;
use aya_log::EbpfLogger;

/// How long the reader waits for records before it looks whether to stop.
const POLL_MS: i32 = 100;

/// Prints every record on stderr, whatever `RUST_LOG` says: `--debug-bpf` asked for them.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        eprintln!("alloctrace: bpf {}: {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

/// The thread that prints the programs' log.
pub struct KernelLog {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl KernelLog {
    /// Takes the log ring of `ebpf` and prints what the programs write into it.
    pub fn start(ebpf: &mut Ebpf) -> Result<KernelLog, String> {
        let mut logger = EbpfLogger::init_with_logger(ebpf, Stderr).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let reader = std::thread::Builder::new()
            .name("bpf-log".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    wait_readable(logger.as_raw_fd());
                    logger.flush();
                }
                // What the programs wrote before they were detached.
                logger.flush();
            })
            .map_err(|e| e.to_string())?;
        Ok(KernelLog {
            stop,
            reader: Some(reader),
        })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Waits until `fd` has data or `POLL_MS` passed.
fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the result only decides when to look again.
    unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
}
