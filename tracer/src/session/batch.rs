//! The hand-off of ring records from the ring reader to the sink: a batch of records copied out
//! of the ring into one reused buffer, each behind its length (a native-endian `u32`).
//!
//! Copying frees ring space at once (the kernel side drops events when the ring is full) and
//! lets the reading and the applying of records run as separate stages. The buffer is reused:
//! once the sink has dropped a batch, the next one is written into the same allocation.

use aya::maps::{MapData, RingBuf};
use bytes::{BufMut, Bytes, BytesMut};

/// Bytes a batch holds before it is handed on (it may end one record past this): the ring can
/// hold far more, and a small buffer stays in cache and keeps the tracer's memory flat.
const BATCH_BYTES: usize = 256 << 10;

/// Size of a record's length prefix.
const PREFIX: usize = size_of::<u32>();

/// Records read from the ring, in ring order; frozen, so that a later stage may hold them.
pub struct RecordBatch {
    bytes: Bytes,
}

impl RecordBatch {
    /// The records, in the order they were read.
    pub fn records(&self) -> Records<'_> {
        Records { rest: &self.bytes }
    }
}

/// Iterator over the records of a batch.
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let prefix = self.rest.get(..PREFIX)?;
        let len = u32::from_ne_bytes(prefix.try_into().ok()?) as usize;
        let record = self.rest.get(PREFIX..PREFIX + len)?;
        self.rest = &self.rest[PREFIX + len..];
        Some(record)
    }
}

/// Fills batches with records, reusing one buffer.
#[derive(Default)]
pub struct BatchBuilder {
    buf: BytesMut,
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        BatchBuilder {
            buf: BytesMut::with_capacity(BATCH_BYTES),
        }
    }

    /// Appends a copy of `record`. (A record too long for its prefix, which no ring can hold,
    /// goes in empty: the sink counts it as undecodable.)
    pub fn push(&mut self, record: &[u8]) {
        let len = u32::try_from(record.len()).unwrap_or(0);
        let record = &record[..len as usize];
        // Reclaims the whole buffer once the batches taken from it are dropped.
        self.buf.reserve(PREFIX + record.len());
        self.buf.put_u32_ne(len);
        self.buf.put_slice(record);
    }

    /// Whether the batch being filled is full.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= BATCH_BYTES
    }

    /// The records pushed since the last call, `None` if there are none.
    pub fn take(&mut self) -> Option<RecordBatch> {
        (!self.buf.is_empty()).then(|| RecordBatch {
            bytes: self.buf.split().freeze(),
        })
    }
}

/// Reads the kernel's ring buffer into batches.
pub struct RingReader {
    ring: RingBuf<MapData>,
    batch: BatchBuilder,
}

impl RingReader {
    pub fn new(ring: RingBuf<MapData>) -> RingReader {
        RingReader {
            ring,
            batch: BatchBuilder::new(),
        }
    }

    /// The next batch of records in the ring, `None` once it is empty. Drop each batch before
    /// asking for the next: its buffer is then reused.
    pub fn next_batch(&mut self) -> Option<RecordBatch> {
        while !self.batch.is_full()
            && let Some(record) = self.ring.next()
        {
            self.batch.push(&record);
        }
        self.batch.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_records_on_in_order() {
        let mut builder = BatchBuilder::new();
        assert!(builder.take().is_none());
        builder.push(&[1, 2, 3]);
        builder.push(&[]);
        builder.push(&[4; 100]);
        let batch = builder.take().expect("a batch");
        let records: Vec<&[u8]> = batch.records().collect();
        assert_eq!(records, vec![&[1u8, 2, 3][..], &[], &[4; 100]]);
        assert!(builder.take().is_none(), "records are handed on once");
    }

    #[test]
    fn a_batch_fills_up_at_its_size() {
        let mut builder = BatchBuilder::new();
        let record = [7u8; 1000];
        let mut pushed = 0;
        while !builder.is_full() {
            builder.push(&record);
            pushed += 1;
        }
        assert_eq!(pushed, BATCH_BYTES.div_ceil(PREFIX + record.len()));
        assert_eq!(builder.take().expect("a batch").records().count(), pushed);
    }

    #[test]
    fn reuses_its_buffer_once_batches_are_dropped() {
        let mut builder = BatchBuilder::new();
        builder.push(&[0; 64]);
        let first = builder.take().expect("a batch");
        let start = first.bytes.as_ptr() as usize;
        drop(first);
        for round in 0..100u8 {
            for _ in 0..100 {
                builder.push(&[round; 48]);
            }
            let batch = builder.take().expect("a batch");
            let at = batch.bytes.as_ptr() as usize;
            assert!(
                (start..start + BATCH_BYTES).contains(&at),
                "round {round}: a new buffer"
            );
            assert!(batch.records().all(|r| r == [round; 48]));
        }
    }

    #[test]
    fn a_cut_batch_ends_early_without_panicking() {
        let mut whole = BytesMut::new();
        whole.put_u32_ne(3);
        whole.put_slice(&[1, 2, 3]);
        whole.put_u32_ne(10);
        whole.put_slice(&[1, 2]);
        let batch = RecordBatch {
            bytes: whole.freeze(),
        };
        assert_eq!(batch.records().collect::<Vec<_>>(), vec![&[1u8, 2, 3][..]]);
    }
}
