//! The per-cell time series cut into batches after a warm-up: the form the leak judgement reads
//! (`views::report::suspects`, rules in docs/accounting.md, "Leak suspects"). The reader computes
//! it while streaming the series one cell at a time, so that hours of points take memory in
//! proportion to the cells, not to the points.
//!
//! The recording starts at 0 s; its first third is the warm-up; the rest, up to the end (the last
//! series point holds through its second, and the last values hold to the end of the recording),
//! is cut into `BATCHES` equal batches. A cell's series is a step function (each point holds
//! until the cell's next one, 0 before its first); a batch's figures are its mean there and its
//! spread (standard deviation) around that mean.

use crate::model::{CellKey, SeriesPoint};

/// The windows of a duty-cycled heap that a cell's live bytes rose in, from its series streamed
/// in order (`push`). A rise at second `t` belongs to the last window opened by the end of that
/// second, if `t` is within that window's reach (window, detach and grace) and a second more:
/// series points are whole seconds. A block made in a window and still live after its grace
/// leaves a rise there; a stack that leaks per request rises in every window that sees a
/// request, a start-up allocation in one.
pub struct WindowRises<'a> {
    starts: &'a [f64],
    reach_s: f64,
    last_live: u64,
    last_window: Option<usize>,
    windows: u32,
}

impl<'a> WindowRises<'a> {
    /// `starts`: the windows' openings in seconds, in order; `reach_s`: how long after its
    /// opening a window's blocks can still show.
    pub fn new(starts: &'a [f64], reach_s: f64) -> WindowRises<'a> {
        WindowRises {
            starts,
            reach_s,
            last_live: 0,
            last_window: None,
            windows: 0,
        }
    }

    pub fn push(&mut self, t_s: u64, live: u64) {
        let rose = live > self.last_live;
        self.last_live = live;
        if !rose {
            return;
        }
        let t = t_s as f64;
        let opened = self.starts.partition_point(|&s| s <= t + 1.0);
        let Some(window) = opened.checked_sub(1) else {
            return;
        };
        if t <= self.starts[window] + self.reach_s + 1.0 && self.last_window != Some(window) {
            self.last_window = Some(window);
            self.windows += 1;
        }
    }

    /// The windows the cell rose in.
    pub fn windows(&self) -> u32 {
        self.windows
    }
}

/// Batches the judged part of a recording is cut into.
pub const BATCHES: usize = 4;

/// The shortest judged part a judgement rests on: a second per batch.
const MIN_JUDGED_S: f64 = BATCHES as f64;

/// Every cell's live bytes in each batch of the judged part.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesBatches {
    /// The judged part: from the end of the warm-up to the end of the recording (seconds).
    pub from_s: f64,
    pub to_s: f64,
    /// Cells with anything live in the judged part, with their figures in every batch.
    pub cells: Vec<(CellKey, BatchFigures)>,
}

/// A cell's live bytes in each batch: the mean, and the spread around it (standard deviation
/// over the batch's time). Merged cells (`Recorded::merge_identical_stacks`) add both: means
/// add exactly, spreads add to a bound of the merged spread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchFigures {
    pub means: [u64; BATCHES],
    pub spreads: [u64; BATCHES],
}

impl BatchFigures {
    pub fn add(&mut self, other: &BatchFigures) {
        for b in 0..BATCHES {
            self.means[b] += other.means[b];
            self.spreads[b] += other.spreads[b];
        }
    }
}

/// The judged part of a recording whose last series point is at second `last_t` and that lasted
/// `duration_s`, after a warm-up of `warmup_s` seconds (the first third by default): `None` when
/// it is shorter than `MIN_JUDGED_S`.
pub fn judged_window(last_t: u64, duration_s: f64, warmup_s: Option<f64>) -> Option<(f64, f64)> {
    let end = (last_t as f64 + 1.0).max(duration_s);
    let from = warmup_s.unwrap_or(end / 3.0);
    (end - from >= MIN_JUDGED_S).then_some((from, end))
}

/// The means of one cell's step function over each batch of `[from, to)`, fed its points in
/// time order.
pub struct StepMeans {
    from: f64,
    width: f64,
    area: [f64; BATCHES],
    /// The integral of the square, for the spread.
    square: [f64; BATCHES],
    /// The point that holds until the next one.
    holding: Option<(f64, u64)>,
}

impl StepMeans {
    pub fn new((from, to): (f64, f64)) -> StepMeans {
        StepMeans {
            from,
            width: (to - from) / BATCHES as f64,
            area: [0.0; BATCHES],
            square: [0.0; BATCHES],
            holding: None,
        }
    }

    /// The cell's live bytes became `value` at second `t` (not before the previous point).
    pub fn push(&mut self, t: f64, value: u64) {
        if let Some((since, held)) = self.holding {
            self.add(since, t, held);
        }
        self.holding = Some((t, value));
    }

    fn add(&mut self, since: f64, until: f64, value: u64) {
        let v = value as f64;
        for b in 0..BATCHES {
            let lo = self.from + self.width * b as f64;
            let overlap = until.min(lo + self.width) - since.max(lo);
            if overlap > 0.0 {
                self.area[b] += v * overlap;
                self.square[b] += v * v * overlap;
            }
        }
    }

    /// The figures of each batch (the last point holds to the end).
    pub fn finish(mut self) -> BatchFigures {
        if let Some((since, held)) = self.holding.take() {
            let end = self.from + self.width * BATCHES as f64;
            self.add(since, end, held);
        }
        let mut figures = BatchFigures::default();
        for b in 0..BATCHES {
            let mean = self.area[b] / self.width;
            let variance = (self.square[b] / self.width - mean * mean).max(0.0);
            figures.means[b] = mean.round() as u64;
            figures.spreads[b] = variance.sqrt().round() as u64;
        }
        figures
    }
}

impl SeriesBatches {
    /// From a series held in memory (points in commit order, so in time order per cell).
    pub fn from_points(series: &[SeriesPoint], duration_s: f64) -> Option<SeriesBatches> {
        let last_t = series.iter().map(|p| p.t_s).max()?;
        let window = judged_window(last_t, duration_s, None)?;
        let mut cells: Vec<(&CellKey, StepMeans)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for p in series {
            let i = *index.entry(&p.key).or_insert_with(|| {
                cells.push((&p.key, StepMeans::new(window)));
                cells.len() - 1
            });
            cells[i].1.push(p.t_s as f64, p.live_bytes);
        }
        let mut batches = SeriesBatches {
            from_s: window.0,
            to_s: window.1,
            cells: Vec::new(),
        };
        for (key, means) in cells {
            batches.add(key, means.finish());
        }
        Some(batches)
    }

    /// Keeps `key`'s figures unless it had nothing live in the judged part.
    pub fn add(&mut self, key: &CellKey, figures: BatchFigures) {
        if figures.means.iter().any(|&m| m > 0) {
            self.cells.push((key.clone(), figures));
        }
    }
}

#[cfg(test)]
mod tests {
    /// Windows at 10, 24 and 38 s reaching 2.5 s: a per-request leak rises in each; a start-up
    /// block in the first only; rises outside any window's reach, or twice in one window,
    /// count once or not at all; falls count nothing.
    #[test]
    fn a_cell_rising_in_every_window_is_told_from_one_that_rose_once() {
        let starts = [10.0, 24.0, 38.0];
        let rises = |points: &[(u64, u64)]| {
            let mut w = super::WindowRises::new(&starts, 2.5);
            for &(t, live) in points {
                w.push(t, live);
            }
            w.windows()
        };
        assert_eq!(
            rises(&[(10, 16), (12, 32), (24, 48), (25, 64), (38, 80)]),
            3
        );
        assert_eq!(rises(&[(10, 1000)]), 1);
        // Rounded down to the second before the window opened: still its own.
        assert_eq!(rises(&[(9, 10)]), 1);
        // Before the first window, and past a window's reach: no window's.
        assert_eq!(rises(&[(3, 10), (17, 20)]), 0);
        // A fall and the same level again: not a rise.
        assert_eq!(rises(&[(10, 50), (11, 40), (24, 40)]), 1);
    }

    use super::*;

    fn figures(points: &[(f64, u64)], window: (f64, f64)) -> BatchFigures {
        let mut m = StepMeans::new(window);
        for &(t, v) in points {
            m.push(t, v);
        }
        m.finish()
    }

    fn means(points: &[(f64, u64)], window: (f64, f64)) -> [u64; BATCHES] {
        figures(points, window).means
    }

    /// The spread is the standard deviation over the batch's time: 0 where the value held, half
    /// the swing where it spent half the batch at each of two values.
    #[test]
    fn a_batch_spread_is_the_standard_deviation_over_its_time() {
        let f = figures(&[(0.0, 10), (1.0, 30), (2.0, 30), (5.0, 0)], (0.0, 8.0));
        assert_eq!(f.means, [20, 30, 15, 0]);
        assert_eq!(f.spreads, [10, 0, 15, 0]);
    }

    #[test]
    fn a_step_function_is_averaged_over_each_batch() {
        // 0 until 2, then 10 until 6, then 30: batches [0,2) [2,4) [4,6) [6,8).
        assert_eq!(
            means(&[(0.0, 0), (2.0, 10), (6.0, 30)], (0.0, 8.0)),
            [0, 10, 10, 30]
        );
        // A change inside a batch is weighed by how long it held; nothing before the first point.
        assert_eq!(means(&[(1.0, 100)], (0.0, 8.0)), [50, 100, 100, 100]);
        // Points before the window count from its start.
        assert_eq!(means(&[(0.0, 7), (1.0, 9)], (4.0, 8.0)), [9, 9, 9, 9]);
    }

    #[test]
    fn the_judged_part_is_the_last_two_thirds_and_at_least_four_seconds() {
        assert_eq!(judged_window(29, 29.5, None), Some((10.0, 30.0)));
        assert_eq!(judged_window(5, 5.03, None), Some((2.0, 6.0)));
        assert_eq!(judged_window(4, 5.0, None), None);
        // The last values hold to the end of the recording.
        assert_eq!(judged_window(2, 9.0, None), Some((3.0, 9.0)));
        // A warm-up given (`report --warmup`).
        assert_eq!(judged_window(29, 29.5, Some(2.0)), Some((2.0, 30.0)));
        assert_eq!(
            judged_window(29, 29.5, Some(27.0)),
            None,
            "4 s at least after it"
        );
    }
}
