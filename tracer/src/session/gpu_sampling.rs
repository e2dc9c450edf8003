//! Sampling the GPU memory of traced processes, to reconcile with the traced device classes.

use std::time::Instant;

use crate::{
    cuda::nvml::GpuMemorySource, model::Class, model::GpuSample, recording::Writer,
    session::sink::EventSink,
};

/// Samples the GPU memory of `pids`, records it and charges the residual's change (class
/// `gpu-untraced`) to the opaque calls since the last sample.
pub fn sample_gpu(
    source: &mut dyn GpuMemorySource,
    sink: &mut EventSink,
    pids: &[u32],
    started: Instant,
    writer: &mut Writer,
) -> anyhow::Result<()> {
    let t_s = started.elapsed().as_secs();
    let usage = source.sample(pids);
    let mut samples = Vec::with_capacity(usage.len());
    for &p in pids {
        match usage.get(&p) {
            Some(&used) => {
                // (gpu-untraced is not a device class: charging it leaves this unchanged.)
                let traced = sink.ledger.live_of(p, Class::is_device);
                sink.sample_hidden(p, used, traced);
                samples.push(GpuSample {
                    t_s,
                    pid: p,
                    used,
                    traced,
                });
            }
            // Not on a GPU (yet): nothing to charge.
            None => sink.cuda.hidden.forget(p),
        }
    }
    writer.add_gpu_samples(&samples)?;
    Ok(())
}
