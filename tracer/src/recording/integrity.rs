//! Is a recording what was written? A recording is read as untrusted input: a disk, a copy or
//! a person may have changed any byte, and SQLite reads most such changes without complaint (a
//! flipped bit in a frame name is still valid text). Finalizing stores a SHA-256 digest of the
//! whole logical content; reading recomputes it. A recording that was never finalized (the
//! tracer was killed) has no digest: only SQLite's `quick_check` (run on every read) looks at
//! its structure.

use rusqlite::{Connection, types::ValueRef};
use sha2::{Digest, Sha256};

use super::schema::meta;

/// The digest of every table's rows, in storage order, the digest's own `meta` row left out.
/// Values are hashed with their type, so `1` (integer) and `'1'` (text) differ.
pub(crate) fn content_digest(conn: &Connection) -> rusqlite::Result<String> {
    let mut hasher = Sha256::new();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             ORDER BY name",
        )?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for table in &tables {
        hash_table(conn, table, &mut hasher)?;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn hash_table(conn: &Connection, table: &str, hasher: &mut Sha256) -> rusqlite::Result<()> {
    hasher.update(b"table\0");
    hasher.update(table.as_bytes());
    // Table names come from the schema; quoting keeps an odd one from being read as SQL.
    let quoted = table.replace('"', "\"\"");
    let mut stmt = conn.prepare(&format!("SELECT * FROM \"{quoted}\""))?;
    let columns = stmt.column_count();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        if table == "meta" && row.get_ref(0)?.as_str().ok() == Some(meta::CONTENT_DIGEST) {
            continue;
        }
        hasher.update(b"row\0");
        for i in 0..columns {
            hash_value(hasher, row.get_ref(i)?);
        }
    }
    Ok(())
}

fn hash_value(hasher: &mut Sha256, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => hasher.update([0u8]),
        ValueRef::Integer(i) => {
            hasher.update([1u8]);
            hasher.update(i.to_le_bytes());
        }
        ValueRef::Real(f) => {
            hasher.update([2u8]);
            hasher.update(f.to_bits().to_le_bytes());
        }
        ValueRef::Text(t) => {
            hasher.update([3u8]);
            hasher.update((t.len() as u64).to_le_bytes());
            hasher.update(t);
        }
        ValueRef::Blob(b) => {
            hasher.update([4u8]);
            hasher.update((b.len() as u64).to_le_bytes());
            hasher.update(b);
        }
    }
}
