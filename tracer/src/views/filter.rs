//! What a view shows of a recording (`flamegraph --class/--layer/--phase/--pid`): the cells of
//! some classes, phases and processes; the rest of the recording is left out before rendering.

use crate::{
    model::{CellKey, Class},
    recording::Recorded,
};

/// Host or device memory: one chart each, so that gigabytes of device memory and the host's
/// megabytes are not drawn to one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Host,
    Device,
}

impl Layer {
    /// The classes of the layer. PyTorch's device views are device memory; its pinned views and
    /// the CUDA driver's pinned and registered host memory are host memory.
    pub fn classes(self) -> Vec<Class> {
        let device = |c: Class| {
            matches!(
                c,
                Class::Cuda
                    | Class::CudaPool
                    | Class::CudaManaged
                    | Class::CudaVmm
                    | Class::CudaGraph
                    | Class::CudaIpc
                    | Class::GpuUntraced
                    | Class::Torch
                    | Class::TorchCached
            )
        };
        (Class::ALL.into_iter())
            .filter(|&c| device(c) == (self == Layer::Device))
            .collect()
    }
}

/// The cells a view keeps: empty lists keep everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CellFilter {
    pub classes: Vec<Class>,
    pub phases: Vec<String>,
    pub pids: Vec<u32>,
}

impl CellFilter {
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.phases.is_empty() && self.pids.is_empty()
    }

    pub fn keeps(&self, key: &CellKey) -> bool {
        (self.classes.is_empty() || self.classes.contains(&key.class))
            && (self.phases.is_empty() || self.phases.contains(&key.phase))
            && (self.pids.is_empty() || self.pids.contains(&key.pid))
    }

    /// Leaves out of `rec` the cells (and their batches, and the page faults of other
    /// processes) the filter does not keep.
    pub fn apply(&self, rec: &mut Recorded) {
        if self.is_empty() {
            return;
        }
        rec.state.cells.retain(|k, _| self.keeps(k));
        if let Some(batches) = &mut rec.batches {
            batches.cells.retain(|(k, _)| self.keeps(k));
        }
        if !self.pids.is_empty() {
            rec.state
                .faults
                .retain(|(pid, _), _| self.pids.contains(pid));
        }
    }

    /// What it keeps, for a subtitle: `class heap, cuda · phase serve · PID 7`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let list = |what: &str, items: Vec<String>| format!("{what} {}", items.join(", "));
        if !self.classes.is_empty() {
            let names = self.classes.iter().map(|c| c.name().to_string()).collect();
            parts.push(list("class", names));
        }
        if !self.phases.is_empty() {
            parts.push(list("phase", self.phases.clone()));
        }
        if !self.pids.is_empty() {
            parts.push(list("PID", self.pids.iter().map(u32::to_string).collect()));
        }
        parts.join(" · ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixture::recorded;

    #[test]
    fn a_filter_keeps_the_cells_of_its_classes_phases_and_processes() {
        let mut rec = recorded();
        let all = rec.state.cells.len();
        CellFilter::default().apply(&mut rec);
        assert_eq!(
            rec.state.cells.len(),
            all,
            "an empty filter keeps everything"
        );
        let heap = CellFilter {
            classes: vec![Class::Heap],
            ..CellFilter::default()
        };
        let mut only_heap = recorded();
        heap.apply(&mut only_heap);
        assert!(!only_heap.state.cells.is_empty());
        assert!(only_heap.state.cells.keys().all(|k| k.class == Class::Heap));
        let serve = CellFilter {
            phases: vec!["serve".into()],
            pids: vec![7],
            ..CellFilter::default()
        };
        let mut served = recorded();
        serve.apply(&mut served);
        assert!(!served.state.cells.is_empty());
        assert!(
            served
                .state
                .cells
                .keys()
                .all(|k| k.phase == "serve" && k.pid == 7)
        );
        assert_eq!(serve.describe(), "phase serve · PID 7");
        let nobody = CellFilter {
            pids: vec![1],
            ..CellFilter::default()
        };
        nobody.apply(&mut rec);
        assert!(rec.state.cells.is_empty() && rec.state.faults.is_empty());
    }

    #[test]
    fn the_layers_split_every_class_once() {
        let (host, device) = (Layer::Host.classes(), Layer::Device.classes());
        assert_eq!(host.len() + device.len(), Class::ALL.len());
        assert!(host.contains(&Class::Heap) && host.contains(&Class::CudaPinned));
        assert!(device.contains(&Class::Cuda) && device.contains(&Class::Torch));
    }
}
