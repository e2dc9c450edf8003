//! GPU memory as the driver reports it per process (NVML), to reconcile with the traced device
//! classes: the residual is memory nobody traced (driver context, modules, graph pools, ...).
//!
//! The source is replaceable: NVML, loaded at run time (absent NVML is "not available", never an
//! error), or recorded samples replayed from a file for tests (`ALLOCTRACE_GPU_SAMPLES`).

use std::collections::BTreeMap;

/// Per-process GPU memory in bytes, by PID.
pub type GpuUsage = BTreeMap<u32, u64>;

pub trait GpuMemorySource {
    /// Memory used on all GPUs by each of `pids` that uses any.
    fn sample(&mut self, pids: &[u32]) -> GpuUsage;
    fn describe(&self) -> String;
}

/// NVML through nvml-wrapper (dlopens libnvidia-ml.so.1).
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
}

impl GpuMemorySource for Nvml {
    fn sample(&mut self, pids: &[u32]) -> GpuUsage {
        let mut usage = GpuUsage::new();
        let count = self.nvml.device_count().unwrap_or(0);
        for index in 0..count {
            let Ok(device) = self.nvml.device_by_index(index) else {
                continue;
            };
            for p in device.running_compute_processes().unwrap_or_default() {
                if let nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) = p.used_gpu_memory
                    && pids.contains(&p.pid)
                {
                    *usage.entry(p.pid).or_default() += bytes;
                }
            }
        }
        usage
    }

    fn describe(&self) -> String {
        format!("NVML ({} GPUs)", self.nvml.device_count().unwrap_or(0))
    }
}

/// Recorded samples: one line per sample, `SECOND PID BYTES` (PID 0: every traced process); the
/// latest line at or before the current second applies.
pub struct Replay {
    lines: Vec<(u64, u32, u64)>,
    started: std::time::Instant,
}

impl GpuMemorySource for Replay {
    fn sample(&mut self, pids: &[u32]) -> GpuUsage {
        let now = self.started.elapsed().as_secs();
        let mut usage = GpuUsage::new();
        for &(t, pid, bytes) in self.lines.iter().filter(|l| l.0 <= now) {
            let _ = t;
            for &p in pids {
                if pid == 0 || pid == p {
                    usage.insert(p, bytes);
                }
            }
        }
        usage
    }

    fn describe(&self) -> String {
        "recorded samples (ALLOCTRACE_GPU_SAMPLES)".into()
    }
}

pub fn parse_replay(text: &str) -> Result<Vec<(u64, u32, u64)>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [t, pid, bytes] => Ok((
                    t.parse().map_err(|_| format!("bad second in {l:?}"))?,
                    pid.parse().map_err(|_| format!("bad PID in {l:?}"))?,
                    bytes.parse().map_err(|_| format!("bad bytes in {l:?}"))?,
                )),
                _ => Err(format!("expected `SECOND PID BYTES`, got {l:?}")),
            }
        })
        .collect()
}

/// The GPU memory source to use: replayed samples when `ALLOCTRACE_GPU_SAMPLES` names a file,
/// else NVML; `Err` says why none is available.
pub fn open_source() -> Result<Box<dyn GpuMemorySource>, String> {
    if let Some(path) = std::env::var_os("ALLOCTRACE_GPU_SAMPLES") {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.to_string_lossy()))?;
        let lines = parse_replay(&text)?;
        return Ok(Box::new(Replay {
            lines,
            started: std::time::Instant::now(),
        }));
    }
    match nvml_wrapper::Nvml::init() {
        Ok(nvml) => Ok(Box::new(Nvml { nvml })),
        Err(e) => Err(format!("NVML not available ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_applies_the_latest_sample_per_process() {
        let lines = parse_replay("# t pid bytes\n0 0 100\n0 7 300\n").unwrap();
        let mut r = Replay {
            lines,
            started: std::time::Instant::now(),
        };
        let usage = r.sample(&[7, 8]);
        assert_eq!(usage, GpuUsage::from([(7, 300), (8, 100)]));
        assert!(parse_replay("1 2").is_err());
        assert!(parse_replay("x 2 3").is_err());
    }
}
