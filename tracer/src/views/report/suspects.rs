//! Leak suspects: the stacks whose live memory kept growing once the program was warm.
//!
//! The method of a leak test (warm up, then measure in batches), applied to the recording's time
//! series. The first third of the recording is the warm-up (imports, model loading, caches
//! filling); the rest is cut into `BATCHES` equal batches. A cell's mean live bytes in each batch
//! come from its series, a step function (each point holds until the cell's next one). A cell is
//! a suspect when its mean rose from every batch to the next: memory that grows while the
//! program repeats the same work. A cache or pool that filled and stopped (a plateau) is not,
//! nor is static memory (loaded files, thread stacks reserved at start). A cell whose values
//! swing within a batch by more than it grows from one batch to the next is too noisy to judge,
//! and said so. Suspects are ranked by their growth from the first batch to the last.

use crate::{
    model::{CellKey, Class},
    recording::{
        Recorded,
        batches::{BATCHES, SeriesBatches},
    },
};

/// What the recording says about leaks, once warm.
#[derive(Debug)]
pub struct Suspects<'a> {
    /// The judged part: from the end of the warm-up to the end of the recording (seconds).
    pub from_s: f64,
    pub to_s: f64,
    /// Steady growers, the most growth first (ties by key).
    pub rows: Vec<Suspect<'a>>,
    /// Cells that grew over the judged part but not in every batch (levelled off, or noisy).
    pub not_steady: usize,
    /// Cells that rose in every batch, by less than they swing within one: too noisy to judge.
    pub too_noisy: Vec<&'a CellKey>,
}

#[derive(Debug, PartialEq)]
pub struct Suspect<'a> {
    pub key: &'a CellKey,
    /// Mean live bytes in each batch.
    pub batch_means: [u64; BATCHES],
    /// Last batch's mean minus the first's.
    pub growth: u64,
    /// `growth` over the time between the first and the last batches' middles.
    pub bytes_per_s: f64,
    /// `growth` as a percentage of the first batch's mean (`None` when that was 0: grown from
    /// nothing).
    pub growth_percent: Option<f64>,
}

/// Memory that is there by construction, not grown by work (`Class::is_static`).
pub(super) fn is_static(class: Class) -> bool {
    class.is_static()
}

/// The suspects, `None` when the recording is too short to judge (or was read without its
/// batches).
pub fn suspects(rec: &Recorded) -> Option<Suspects<'_>> {
    judge(rec.batches.as_ref()?)
}

fn judge(batches: &SeriesBatches) -> Option<Suspects<'_>> {
    let batch = (batches.to_s - batches.from_s) / BATCHES as f64;
    let mut rows = Vec::new();
    let mut not_steady = 0;
    let mut too_noisy = Vec::new();
    for (key, figures) in &batches.cells {
        let means = &figures.means;
        if is_static(key.class) || means[BATCHES - 1] <= means[0] {
            continue;
        }
        if !means.windows(2).all(|w| w[1] > w[0]) {
            not_steady += 1;
            continue;
        }
        let growth = means[BATCHES - 1] - means[0];
        // A steady ramp spreads by a step/√12 within a batch; values that swing by more than a
        // whole step say nothing about the trend.
        let step = growth / (BATCHES as u64 - 1);
        if figures.spreads.iter().any(|&spread| spread > step) {
            too_noisy.push(key);
            continue;
        }
        rows.push(Suspect {
            key,
            batch_means: *means,
            growth,
            bytes_per_s: growth as f64 / (batch * (BATCHES - 1) as f64),
            growth_percent: (means[0] > 0).then(|| growth as f64 * 100.0 / means[0] as f64),
        });
    }
    rows.sort_by(|a, b| b.growth.cmp(&a.growth).then_with(|| a.key.cmp(b.key)));
    too_noisy.sort();
    Some(Suspects {
        from_s: batches.from_s,
        to_s: batches.to_s,
        rows,
        not_steady,
        too_noisy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PHASE_NONE, SeriesPoint};

    fn key(class: Class, stack: u32) -> CellKey {
        CellKey {
            class,
            pid: 7,
            phase: PHASE_NONE.to_string(),
            stack: Some(stack),
        }
    }

    fn recording(series: Vec<SeriesPoint>) -> Recorded {
        let mut rec = crate::views::fixture::recorded();
        rec.duration_s = series.iter().map(|p| p.t_s as f64).fold(0.0, f64::max);
        rec.batches = SeriesBatches::from_points(&series, rec.duration_s);
        rec.series = series;
        rec
    }

    fn point(t_s: u64, key: &CellKey, live_bytes: u64) -> SeriesPoint {
        SeriesPoint {
            t_s,
            key: key.clone(),
            live_bytes,
            live_count: 1,
        }
    }

    /// A per-request leak grows in every batch after the warm-up and is the first suspect; a
    /// cache that filled during the run and stopped is not a suspect; growth during the warm-up
    /// and static memory are not judged.
    #[test]
    fn steady_growth_is_a_suspect_and_a_plateau_is_not() {
        let leak = key(Class::Heap, 1);
        let cache = key(Class::Heap, 2);
        let import = key(Class::Mmap, 3);
        let library = key(Class::MmapFile, 4);
        let mut series = Vec::new();
        for t in 0..30u64 {
            // 1 KiB a second, all along.
            series.push(point(t, &leak, 1024 * (t + 1)));
            // Fills to 1 MiB by second 18, then stays.
            series.push(point(t, &cache, (t.min(18) + 1) << 16));
            // Grows steadily too, but it is a loaded file.
            series.push(point(t, &library, t << 20));
        }
        // Loaded during the warm-up only.
        series.push(point(2, &import, 64 << 20));
        let rec = recording(series);
        let s = suspects(&rec).unwrap();
        assert_eq!((s.from_s, s.to_s), (10.0, 30.0));
        assert_eq!(s.rows.len(), 1, "{:?}", s.rows);
        let leak_row = &s.rows[0];
        assert_eq!(leak_row.key, &leak);
        // Batches of 5 s from 10 s: means of 1 KiB × (t + 1) over t in each batch.
        assert_eq!(
            leak_row.batch_means,
            [13 * 1024, 18 * 1024, 23 * 1024, 28 * 1024]
        );
        assert_eq!(leak_row.growth, 15 * 1024);
        assert!((leak_row.bytes_per_s - 1024.0).abs() < 1e-9);
        let first = leak_row.batch_means[0] as f64;
        let percent = leak_row.growth_percent.unwrap();
        assert!((percent - leak_row.growth as f64 * 100.0 / first).abs() < 1e-9);
        assert_eq!(s.not_steady, 1, "the cache levelled off");
        assert!(s.too_noisy.is_empty());
    }

    /// A cell that rises a little from batch to batch while it swings far more within each is
    /// too noisy to judge: said, not ranked.
    #[test]
    fn growth_smaller_than_the_swing_is_too_noisy_to_judge() {
        let noisy = key(Class::Heap, 1);
        let leak = key(Class::Heap, 2);
        let series: Vec<SeriesPoint> = (0..30u64)
            .flat_map(|t| {
                // Once in every 5 s (each batch's width): the batch means still rise.
                let swing = if t % 5 == 0 { 1 << 20 } else { 0 };
                [
                    point(t, &noisy, 1000 * t + swing),
                    point(t, &leak, 1000 * t),
                ]
            })
            .collect();
        let rec = recording(series);
        let s = suspects(&rec).unwrap();
        assert_eq!(s.too_noisy, vec![&noisy]);
        assert_eq!(s.rows.len(), 1);
        assert_eq!(s.rows[0].key, &leak);
    }

    #[test]
    fn a_recording_too_short_after_its_warm_up_is_not_judged() {
        let leak = key(Class::Heap, 1);
        let rec = recording((1..5).map(|t| point(t, &leak, t * 100)).collect());
        assert!(suspects(&rec).is_none(), "5 s: 3.3 s judged");
        let rec = recording((1..6).map(|t| point(t, &leak, t * 100)).collect());
        assert!(suspects(&rec).is_some(), "6 s: 4 s judged");
        assert!(suspects(&recording(Vec::new())).is_none());
    }
}
