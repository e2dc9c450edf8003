//! The recording's schema, version 1. docs/recording.md documents every table and column; change
//! both together, and bump `SCHEMA_VERSION` for any change an older reader would misread.

/// `PRAGMA user_version` of the files this alloctrace writes, and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// `PRAGMA application_id`: "ALCT". Tells an alloctrace recording from any other SQLite file
/// (`file(1)` shows it too).
pub const APPLICATION_ID: i32 = 0x414c_4354;

/// Tables and views, created in the first transaction of a recording.
///
/// Counters are SQLite INTEGERs (signed 64-bit) holding the u64 bit pattern: no byte count comes
/// near 2^63, but a failed `malloc(SIZE_MAX)` has a `size` that reads as -1 in sqlite3.
pub(crate) const CREATE: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value
) WITHOUT ROWID;

CREATE TABLE stacks (
    id     INTEGER PRIMARY KEY,
    frames TEXT NOT NULL
);

CREATE TABLE cells (
    id              INTEGER PRIMARY KEY,
    class           TEXT NOT NULL,
    phase           TEXT NOT NULL,
    stack_id        INTEGER REFERENCES stacks(id),
    live_bytes      INTEGER NOT NULL,
    live_count      INTEGER NOT NULL,
    allocated_bytes INTEGER NOT NULL,
    allocated_count INTEGER NOT NULL,
    freed_bytes     INTEGER NOT NULL,
    freed_count     INTEGER NOT NULL,
    pid             INTEGER NOT NULL
);

CREATE TABLE totals (
    class           TEXT PRIMARY KEY NOT NULL,
    live_bytes      INTEGER NOT NULL,
    live_count      INTEGER NOT NULL,
    peak_bytes      INTEGER NOT NULL,
    allocated_bytes INTEGER NOT NULL,
    allocated_count INTEGER NOT NULL,
    freed_count     INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE failures (
    id       INTEGER PRIMARY KEY,
    class    TEXT NOT NULL,
    function TEXT NOT NULL,
    size     INTEGER NOT NULL,
    error    TEXT NOT NULL,
    stack_id INTEGER REFERENCES stacks(id),
    count    INTEGER NOT NULL,
    pid      INTEGER NOT NULL
);

-- The second each failure (a `failures` row) was first committed, its count's growth by
-- second (absent from older files).
CREATE TABLE failure_seconds (
    failure_id INTEGER NOT NULL,  -- failures(id); kept after a merge removed that row
    t_s        INTEGER NOT NULL,
    count      INTEGER NOT NULL
);

CREATE TABLE lost_events (
    cause TEXT PRIMARY KEY NOT NULL,
    count INTEGER NOT NULL
) WITHOUT ROWID;

-- Appended every second; no index, so that appending stays cheap (queries scan it).
CREATE TABLE series (
    t_s        INTEGER NOT NULL,
    cell_id    INTEGER NOT NULL REFERENCES cells(id),
    live_bytes INTEGER NOT NULL,
    live_count INTEGER NOT NULL
);

-- Per-class live figures, appended at each second they changed.
CREATE TABLE totals_series (
    t_s        INTEGER NOT NULL,
    class      TEXT NOT NULL,
    live_bytes INTEGER NOT NULL,
    live_count INTEGER NOT NULL
);

-- Sampled page faults that brought pages in, by process and stack: `faults` is the number of
-- faults the samples stand for (samples x sampling period); each is one page of RSS growth.
CREATE TABLE faults (
    pid      INTEGER NOT NULL,
    stack_id INTEGER REFERENCES stacks(id),
    faults   INTEGER NOT NULL
);

-- Non-allocating CUDA driver calls (graphs, pools, IPC, host registration, contexts, modules)
-- by process, function and stack: how often they ran and how often they failed.
CREATE TABLE cuda_calls (
    pid      INTEGER NOT NULL,
    function TEXT NOT NULL,
    stack_id INTEGER REFERENCES stacks(id),
    calls    INTEGER NOT NULL,
    failed   INTEGER NOT NULL
);

-- Bytes released with madvise (DONTNEED, FREE, REMOVE) by process and stack.
CREATE TABLE released (
    pid      INTEGER NOT NULL,
    stack_id INTEGER REFERENCES stacks(id),
    bytes    INTEGER NOT NULL
);

-- GPU memory of each traced process that uses any, once a second: what the driver reports
-- (NVML) and the live bytes of its traced device classes.
CREATE TABLE gpu_samples (
    t_s    INTEGER NOT NULL,
    pid    INTEGER NOT NULL,
    used   INTEGER NOT NULL,
    traced INTEGER NOT NULL
);

-- Resident memory of each traced process, sampled once a second from /proc/PID/status.
CREATE TABLE rss_samples (
    t_s   INTEGER NOT NULL,
    pid   INTEGER NOT NULL,
    rss   INTEGER NOT NULL,
    anon  INTEGER NOT NULL,
    file  INTEGER NOT NULL,
    shmem INTEGER NOT NULL,
    swap  INTEGER NOT NULL,
    arena INTEGER NOT NULL,
    traced_resident INTEGER NOT NULL,
    arena_resident  INTEGER NOT NULL
);

-- PyTorch caching allocators by process and device, at each second their figures changed.
CREATE TABLE torch_samples (
    t_s          INTEGER NOT NULL,
    pid          INTEGER NOT NULL,
    device       INTEGER NOT NULL,
    reserved     INTEGER NOT NULL,
    allocated    INTEGER NOT NULL,
    pending      INTEGER NOT NULL,
    segments     INTEGER NOT NULL,
    blocks       INTEGER NOT NULL,
    holes        INTEGER NOT NULL,
    hole_bytes   INTEGER NOT NULL,
    largest_hole INTEGER NOT NULL,
    private_pools     INTEGER NOT NULL,
    private_reserved  INTEGER NOT NULL,
    private_allocated INTEGER NOT NULL,
    sleeping          INTEGER NOT NULL,  -- segment bytes unmapped at the driver (vLLM sleep mode)
    async_backend     INTEGER NOT NULL   -- 1: the cudaMallocAsync backend (tensors only)
);
-- Allocations PyTorch's caching allocator could not satisfy, with its figures right before.
CREATE TABLE torch_ooms (
    t_s          INTEGER NOT NULL,
    requested    INTEGER NOT NULL,
    device_free  INTEGER NOT NULL,
    stack_id     INTEGER REFERENCES stacks(id),
    pid          INTEGER NOT NULL,
    device       INTEGER NOT NULL,
    reserved     INTEGER NOT NULL,
    allocated    INTEGER NOT NULL,
    pending      INTEGER NOT NULL,
    segments     INTEGER NOT NULL,
    blocks       INTEGER NOT NULL,
    holes        INTEGER NOT NULL,
    hole_bytes   INTEGER NOT NULL,
    largest_hole INTEGER NOT NULL,
    private_pools     INTEGER NOT NULL,
    private_reserved  INTEGER NOT NULL,
    private_allocated INTEGER NOT NULL,
    sleeping          INTEGER NOT NULL,  -- segment bytes unmapped at the driver (vLLM sleep mode)
    async_backend     INTEGER NOT NULL   -- 1: the cudaMallocAsync backend (tensors only)
);
-- `record --phase`: how many times each native rule's phase was entered, by second (seconds
-- without entries have no row).
CREATE TABLE phase_activity (
    t_s     INTEGER NOT NULL,
    phase   TEXT NOT NULL,
    entries INTEGER NOT NULL
);
CREATE VIEW series_by_cell AS
    SELECT s.t_s, c.pid, c.class, c.phase, c.stack_id, s.live_bytes, s.live_count
    FROM series AS s JOIN cells AS c ON c.id = s.cell_id;
";

/// Keys of the `meta` table.
pub(crate) mod meta {
    pub const SCHEMA_VERSION: &str = "schema_version";
    pub const TOOL_VERSION: &str = "tool_version";
    pub const TARGET_PIDS: &str = "target_pids";
    pub const TARGET_COMMAND: &str = "target_command";
    /// 1 when the target was attached to by PID, 0 when launched (absent in older recordings).
    pub const TARGET_ATTACHED: &str = "target_attached";
    pub const STARTED_UNIX_NS: &str = "started_unix_ns";
    pub const ENDED_UNIX_NS: &str = "ended_unix_ns";
    pub const DURATION_S: &str = "duration_s";
    pub const COMPLETE: &str = "complete";
    pub const UNMATCHED_FREES: &str = "unmatched_frees";
    /// Where GPU memory samples come from, or why there are none.
    pub const GPU_SOURCE: &str = "gpu_source";
    /// `StackCapture` as JSON.
    pub const STACK_CAPTURE: &str = "stack_capture";
    /// `Thresholds` as JSON: the recording was made by `alloctrace check`, which judges with
    /// them.
    pub const CHECK: &str = "check";
    /// JSON array of `Mark`: the moments a driver marked (`alloctrace check`).
    pub const MARKS: &str = "marks";
    /// `Phases` as JSON (`record --phase`), rewritten every second.
    pub const PHASES: &str = "phases";
    /// Why the recording ended, written when it is finalized.
    pub const STOP_REASON: &str = "stop_reason";
    /// Why writing stopped early (a full file system), written when it did.
    pub const WRITE_FAILURE: &str = "write_failure";
    /// JSON array of `ProcessExit`: the traced processes that ended during the recording.
    pub const EXITS: &str = "exits";
    /// SHA-256 of the recording's content, written when it is finalized (`integrity.rs`).
    pub const CONTENT_DIGEST: &str = "content_digest";
}

/// A table of an amount by (pid, stack) (`model::AmountsByStack`): its statements, so that the
/// writer and the reader treat `faults` and `released` alike. Both are small and rewritten whole.
pub(crate) struct AmountsTable {
    pub delete_all: &'static str,
    pub insert: &'static str,
    pub select: &'static str,
}

/// Sampled page faults: `faults` is the number of faults the samples stand for.
pub(crate) const FAULTS: AmountsTable = AmountsTable {
    delete_all: "DELETE FROM faults",
    insert: "INSERT INTO faults (pid, stack_id, faults) VALUES (?1, ?2, ?3)",
    select: "SELECT pid, stack_id, faults FROM faults",
};

/// Bytes released with madvise.
pub(crate) const RELEASED: AmountsTable = AmountsTable {
    delete_all: "DELETE FROM released",
    insert: "INSERT INTO released (pid, stack_id, bytes) VALUES (?1, ?2, ?3)",
    select: "SELECT pid, stack_id, bytes FROM released",
};

/// A u64 counter as stored (bit pattern kept, see `CREATE`).
pub(crate) fn to_sql(v: u64) -> i64 {
    v as i64
}

pub(crate) fn from_sql(v: i64) -> u64 {
    v as u64
}
