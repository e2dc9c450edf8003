//! Line tables: which source line a bytecode offset belongs to, from `co_linetable` (3.10's
//! address/line delta pairs, 3.11+'s PEP 657 location table).

/// Bytecode bytes `[start, end)` that belong to source line `line` (`None`: no line).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LineRange {
    pub start: u64,
    pub end: u64,
    pub line: Option<i32>,
}

/// One 3.11+ location entry: bytecode bytes `[start, end)` and their source span, as
/// `co_positions()` reports it (`None` where Python says `None`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub start: u64,
    pub end: u64,
    pub line: Option<i32>,
    pub end_line: Option<i32>,
    pub column: Option<i32>,
    pub end_column: Option<i32>,
}

/// The line of the instruction at byte `offset`.
pub fn line_at(ranges: &[LineRange], offset: u64) -> Option<i32> {
    let i = ranges.partition_point(|r| r.end <= offset);
    ranges
        .get(i)
        .filter(|r| r.start <= offset)
        .and_then(|r| r.line)
}

/// 3.10 `co_linetable`: pairs (byte delta: u8, line delta: i8), line delta -128 = no line;
/// entries with a zero byte delta only move the line (Objects/lnotab_notes.txt).
pub fn decode_line_table_310(table: &[u8], first_line: i32) -> Vec<LineRange> {
    let mut out = Vec::new();
    let (mut start, mut line) = (0u64, first_line);
    for pair in table.chunks_exact(2) {
        let end = start + u64::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line = line.wrapping_add(i32::from(delta));
            Some(line)
        };
        if end > start {
            out.push(LineRange {
                start,
                end,
                line: this,
            });
        }
        start = end;
    }
    out
}

/// 3.11+ `co_linetable` (PEP 657, Objects/locations.md). Each entry starts with a byte with the
/// top bit set: bits 3-6 a code, bits 0-2 the length − 1 in 2-byte code units. Codes 0-9: same
/// line, columns in one more byte; 10-12: line += code − 10, column and end column bytes; 13:
/// line delta (signed varint), no columns; 14: line delta, end line delta, column + 1, end
/// column + 1 (varints); 15: no location. A truncated table ends the decoding.
pub fn decode_location_table(table: &[u8], first_line: i32) -> Vec<Location> {
    let mut out = Vec::new();
    let mut r = Reader { data: table, at: 0 };
    let (mut start, mut line) = (0u64, first_line);
    while let Some(first) = r.byte() {
        if first & 0x80 == 0 {
            break; // not an entry start: corrupt table
        }
        let end = start + 2 * (u64::from(first & 7) + 1);
        let Some(span) = r.span((first >> 3) & 15, &mut line) else {
            break;
        };
        out.push(Location {
            start,
            end,
            line: span.line,
            end_line: span.end_line,
            column: span.column,
            end_column: span.end_column,
        });
        start = end;
    }
    out
}

/// Line ranges of a location table (consecutive entries of one line merged).
pub fn line_ranges(locations: &[Location]) -> Vec<LineRange> {
    let mut out: Vec<LineRange> = Vec::new();
    for l in locations {
        match out.last_mut() {
            Some(last) if last.line == l.line && last.end == l.start => last.end = l.end,
            _ => out.push(LineRange {
                start: l.start,
                end: l.end,
                line: l.line,
            }),
        }
    }
    out
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// 6-bit chunks, least significant first; bit 6 says another chunk follows.
    fn varint(&mut self) -> Option<u32> {
        let mut b = self.byte()?;
        let mut v = u32::from(b & 63);
        let mut shift = 0;
        while b & 64 != 0 {
            b = self.byte()?;
            shift += 6;
            if shift >= 32 {
                return None;
            }
            v |= u32::from(b & 63) << shift;
        }
        Some(v)
    }

    /// Sign in the lowest bit, magnitude above it.
    fn svarint(&mut self) -> Option<i32> {
        let v = self.varint()?;
        let m = (v >> 1) as i32;
        Some(if v & 1 != 0 { -m } else { m })
    }

    /// The source span of a location entry with `code`, read after its first byte; moves
    /// `line`, the current line, as the entry says. `None` where the table is cut.
    fn span(&mut self, code: u8, line: &mut i32) -> Option<Span> {
        let column = |v: u32| i32::try_from(v).ok().map(|v| v - 1).filter(|&v| v >= 0);
        match code {
            15 => Some(Span::default()),
            14 => {
                *line = line.wrapping_add(self.svarint()?);
                let end_line = line.wrapping_add(self.varint()? as i32);
                let (c, ec) = (self.varint()?, self.varint()?);
                Some(Span::new(*line, end_line, column(c), column(ec)))
            }
            13 => {
                *line = line.wrapping_add(self.svarint()?);
                Some(Span::new(*line, *line, None, None))
            }
            10..=12 => {
                *line = line.wrapping_add(i32::from(code) - 10);
                let (c, ec) = (self.byte()?, self.byte()?);
                Some(Span::new(*line, *line, Some(c.into()), Some(ec.into())))
            }
            _ => {
                let b = self.byte()?;
                let c = i32::from(code) << 3 | i32::from(b >> 4);
                Some(Span::new(
                    *line,
                    *line,
                    Some(c),
                    Some(c + i32::from(b & 15)),
                ))
            }
        }
    }
}

/// Where a location entry points in the source (`None` where Python says `None`).
#[derive(Default)]
struct Span {
    line: Option<i32>,
    end_line: Option<i32>,
    column: Option<i32>,
    end_column: Option<i32>,
}

impl Span {
    fn new(line: i32, end_line: i32, column: Option<i32>, end_column: Option<i32>) -> Span {
        Span {
            line: Some(line),
            end_line: Some(end_line),
            column,
            end_column,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        // 300 = 0b100_101100: low chunk 44 with the continuation bit, then 4.
        let mut r = Reader {
            data: &[64 | 44, 4, 7, 6],
            at: 0,
        };
        assert_eq!(r.varint(), Some(300));
        assert_eq!(r.svarint(), Some(-3));
        assert_eq!(r.svarint(), Some(3));
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn truncated_location_table_stops() {
        // A long-form entry (code 14) cut after its line delta.
        let locs = decode_location_table(&[0x80 | 14 << 3, 2], 10);
        assert!(locs.is_empty());
        // Short form code 1 (column 8 + 2), two code units; then "no location".
        let locs = decode_location_table(&[0x80 | 1 << 3 | 1, 0x23, 0x80 | 15 << 3], 5);
        assert_eq!(
            locs.iter()
                .map(|l| (l.start, l.end, l.line, l.column, l.end_column))
                .collect::<Vec<_>>(),
            [
                (0, 4, Some(5), Some(10), Some(13)),
                (4, 6, None, None, None)
            ]
        );
    }
}
