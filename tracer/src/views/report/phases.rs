//! Memory by request phase (`record --phase`): per phase, what was allocated in it and is still
//! live, and where what it allocated was freed (in the same phase, or later in another). Memory
//! allocated while serving a request and still live after the request ended is the classic
//! per-request leak; `live_per_entry` puts it per request.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{model::PHASE_NONE, recording::Recorded};

/// The figures of one phase, summed over classes and processes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PhaseRow {
    pub phase: String,
    /// Times the phase's function was entered; null for a phase no rule sets (none,
    /// graph-capture).
    pub entries: Option<u64>,
    pub live_bytes: u64,
    pub live_count: u64,
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
    /// Of those, freed in the phase that allocated them; null for a Python rule's phase (a
    /// free has no stack to tell it by).
    pub freed_within_bytes: Option<u64>,
    pub freed_within_count: Option<u64>,
    /// Freed in another phase (or outside every phase); null for a Python rule's phase.
    pub freed_elsewhere_bytes: Option<u64>,
    pub freed_elsewhere_count: Option<u64>,
    /// `live_bytes / entries`: what each entry left behind on average; null without entries.
    pub live_per_entry: Option<f64>,
}

/// One row per phase: the rules' in their order, then the others the ledger used (none last);
/// `None` when the recording has no phase rules.
pub fn phase_rows(rec: &Recorded) -> Option<Vec<PhaseRow>> {
    let phases = rec.phases.as_ref()?;
    // Phases the free matrix covers start at zero; Python rules' stay null.
    let counted = |python: bool| (!python).then_some(0);
    let row_of = |phase: &str, entries, python| PhaseRow {
        phase: phase.to_string(),
        entries,
        freed_within_bytes: counted(python),
        freed_within_count: counted(python),
        freed_elsewhere_bytes: counted(python),
        freed_elsewhere_count: counted(python),
        ..PhaseRow::default()
    };
    // One row a phase: a phase's rules (a profile has several) add their entries; its frees are
    // split unless every rule of it is a Python one.
    let mut rows: Vec<PhaseRow> = Vec::new();
    for rule in &phases.rules {
        match rows.iter_mut().find(|r| r.phase == rule.name) {
            Some(row) => {
                if let Some(n) = rule.entries {
                    row.entries = Some(row.entries.unwrap_or(0) + n);
                }
                if rule.file.is_some() && row.freed_within_bytes.is_none() {
                    *row = row_of(&rule.name, row.entries, false);
                }
            }
            None => rows.push(row_of(&rule.name, rule.entries, rule.file.is_none())),
        }
    }
    let mut others: BTreeMap<&str, PhaseRow> = BTreeMap::new();
    for (key, c) in &rec.state.cells {
        let row = match rows.iter_mut().find(|r| r.phase == key.phase) {
            Some(row) => row,
            None => (others.entry(&key.phase)).or_insert_with(|| row_of(&key.phase, None, false)),
        };
        row.live_bytes += c.live_bytes;
        row.live_count += c.live_count;
        row.allocated_bytes += c.allocated_bytes;
        row.allocated_count += c.allocated_count;
        row.freed_bytes += c.freed_bytes;
        row.freed_count += c.freed_count;
    }
    let none = others.remove(PHASE_NONE);
    rows.extend(others.into_values());
    rows.extend(none);
    let add = |n: &mut Option<u64>, v: u64| {
        if let Some(n) = n {
            *n += v;
        }
    };
    for f in &phases.frees {
        let Some(row) = rows.iter_mut().find(|r| r.phase == f.allocated_in) else {
            continue;
        };
        if f.freed_in == f.allocated_in {
            add(&mut row.freed_within_bytes, f.bytes);
            add(&mut row.freed_within_count, f.count);
        } else {
            add(&mut row.freed_elsewhere_bytes, f.bytes);
            add(&mut row.freed_elsewhere_count, f.count);
        }
    }
    for row in &mut rows {
        row.live_per_entry = (row.entries)
            .filter(|&n| n > 0)
            .map(|n| row.live_bytes as f64 / n as f64);
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{CellKey, Class, PhaseFrees, PhaseRuleFigures, Phases, StackCounters},
        views::fixture::recorded,
    };

    fn cell(rec: &mut Recorded, class: Class, phase: &str, stack: u32, live: u64, alloc: u64) {
        let key = CellKey {
            class,
            pid: 7,
            phase: phase.into(),
            stack: Some(stack),
        };
        let counters = StackCounters {
            live_bytes: live,
            live_count: live / 100,
            allocated_bytes: alloc,
            allocated_count: alloc / 100,
            freed_bytes: alloc - live,
            freed_count: (alloc - live) / 100,
        };
        rec.state.cells.insert(key, counters);
    }

    #[test]
    fn each_phase_sums_its_cells_and_splits_its_frees_by_where_they_happened() {
        let mut rec = recorded();
        rec.phases = None;
        assert_eq!(phase_rows(&rec), None, "no rules, no phases section");
        rec.state.cells.clear();
        let rule = |name: &str, entries| PhaseRuleFigures {
            name: name.into(),
            rule: format!("{name}=lib:f"),
            file: Some("/lib".into()),
            entries: Some(entries),
        };
        let free = |a: &str, f: &str, bytes| PhaseFrees {
            class: Class::Heap,
            allocated_in: a.into(),
            freed_in: f.into(),
            bytes,
            count: bytes / 100,
        };
        rec.phases = Some(Phases {
            profiles: Vec::new(),
            rules: vec![
                rule("serve", 50),
                // A phase of several rules (a profile's): one row, entries added.
                rule("serve", 7),
                PhaseRuleFigures {
                    name: "serve".into(),
                    rule: "serve=py:server:serve".into(),
                    file: None,
                    entries: None,
                },
                rule("load", 0),
                PhaseRuleFigures {
                    name: "prefill".into(),
                    rule: "prefill=py:server:prefill".into(),
                    file: None,
                    entries: None,
                },
            ],
            frees: vec![free("serve", "serve", 20_000), free("serve", "none", 1_000)],
        });
        cell(&mut rec, Class::Heap, "serve", 1, 5_000, 26_000);
        cell(&mut rec, Class::Mmap, "serve", 2, 65_500, 65_500);
        cell(&mut rec, Class::Heap, "none", 3, 300, 300);
        cell(&mut rec, Class::Cuda, "graph-capture", 4, 1_000, 1_000);
        cell(&mut rec, Class::Torch, "prefill", 5, 2_000, 3_000);
        let rows = phase_rows(&rec).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.phase.as_str()).collect();
        assert_eq!(names, ["serve", "load", "prefill", "graph-capture", "none"]);
        let serve = &rows[0];
        assert_eq!((serve.live_bytes, serve.allocated_bytes), (70_500, 91_500));
        assert_eq!((serve.freed_bytes, serve.freed_count), (21_000, 210));
        assert_eq!(
            (serve.freed_within_bytes, serve.freed_within_count),
            (Some(20_000), Some(200))
        );
        assert_eq!(
            (serve.freed_elsewhere_bytes, serve.freed_elsewhere_count),
            (Some(1_000), Some(10))
        );
        assert_eq!(serve.entries, Some(57));
        assert_eq!(serve.live_per_entry, Some(70_500.0 / 57.0));
        assert_eq!(rows[1].entries, Some(0));
        assert_eq!(rows[1].live_per_entry, None, "never entered");
        let prefill = &rows[2];
        assert_eq!((prefill.live_bytes, prefill.freed_bytes), (2_000, 1_000));
        assert_eq!((prefill.entries, prefill.live_per_entry), (None, None));
        assert_eq!(
            (prefill.freed_within_bytes, prefill.freed_elsewhere_bytes),
            (None, None),
            "a free has no Python stack"
        );
        assert_eq!((rows[3].entries, rows[3].live_bytes), (None, 1_000));
        assert_eq!(rows[3].freed_within_bytes, Some(0));
        assert_eq!(rows[4].live_bytes, 300);
    }
}
