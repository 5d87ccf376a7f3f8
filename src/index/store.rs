//! The persistent index: one SQLite database (WAL) in the node's state directory.
//!
//! Per path it holds the [`Record`] (kind, size, mtime, mode, hash, link target,
//! version vector, tombstone flag, the node that made the version) under this node's
//! sequence number, plus the [`StatKey`] that proves the file on disk unchanged since
//! it was hashed. Every change of a record, local or applied from a peer, takes the
//! next sequence number, so a peer can ask for "everything after N" and a node
//! relays what it learned from others. Per peer it remembers the peer's index id
//! and the last sequence applied from it.
//!
//! Durability: `synchronous=FULL`, one transaction per batch. Files are fsynced
//! before the transaction that calls them synced commits (see the engine).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::StatKey;
use crate::hash::ContentHash;
use crate::sync::record::{Kind, Record};
use crate::sync::version::VersionVector;
use crate::wire::Timestamp;

/// Identifies one incarnation of an index: a peer that sees a new id starts over
/// from sequence 0 instead of trusting old sequence numbers.
pub type IndexId = [u8; 16];

/// Errors of the index database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("index database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("index database holds an unreadable record for {path}: {reason}")]
    Corrupt { path: String, reason: String },
}

/// A record with what proves the local file matches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub record: Record,
    pub stat: Option<StatKey>,
}

/// A change to write: the record (its `seq` is assigned on commit) and its stat.
#[derive(Clone, Debug)]
pub struct Update {
    pub record: Record,
    pub stat: Option<StatKey>,
}

pub struct Store {
    pub(super) conn: Connection,
    index_id: IndexId,
    max_seq: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    kind INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_s INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    hash BLOB NOT NULL,
    target TEXT,
    version BLOB NOT NULL,
    deleted INTEGER NOT NULL,
    modified_by TEXT NOT NULL,
    seq INTEGER NOT NULL,
    st_size INTEGER, st_mtime INTEGER, st_ctime INTEGER, st_ino INTEGER, st_dev INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS files_seq ON files(seq);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash) WHERE deleted = 0 AND kind = 0;
CREATE TABLE IF NOT EXISTS peers (
    name TEXT PRIMARY KEY,
    index_id BLOB NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    path TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    since_s INTEGER NOT NULL,
    since_ns INTEGER NOT NULL,
    expires_s INTEGER,
    releasing INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_s INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    record BLOB NOT NULL,
    staged TEXT
);
CREATE INDEX IF NOT EXISTS queue_path ON queue(path, id);
CREATE TABLE IF NOT EXISTS outvoted (
    peer TEXT NOT NULL,
    path TEXT NOT NULL,
    record BLOB NOT NULL,
    our_seq INTEGER NOT NULL,
    PRIMARY KEY (peer, path)
);
";

/// The columns of a file entry, in `read_entry`'s order (a macro, so that the
/// statements run per request are constants, not formatted each time).
macro_rules! columns {
    () => {
        "path, kind, size, mtime_s, mtime_ns, mode, hash, target, version, deleted, \
         modified_by, seq, st_size, st_mtime, st_ctime, st_ino, st_dev"
    };
}
const COLUMNS: &str = columns!();

/// The condition for `?1` and what is below it, with [`scope_params`] (a macro,
/// for `concat!`). '/' + 1 == '0': the half-open range [path/, path0) holds
/// exactly the descendants of `path` in byte order.
macro_rules! in_scope {
    () => {
        "(path = ?1 OR (path >= ?2 AND path < ?3))"
    };
}

/// The parameters of [`in_scope!`] for `path`.
fn scope_params(path: &str) -> (&str, String, String) {
    (path, format!("{path}/"), format!("{path}0"))
}

fn kind_code(k: Kind) -> i64 {
    match k {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
    }
}

pub(super) fn corrupt(path: &str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

/// The part of a record that serving a fetch checks ([`Reader::served`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub kind: Kind,
    pub deleted: bool,
    pub hash: ContentHash,
    pub size: u64,
}

/// A second connection to the index, read-only, for the lookup that serves each
/// fetch of a peer. In WAL mode a reader never waits for the writer: a fetch is
/// answered from the last committed state while a scan or an install commits,
/// instead of waiting behind the commit (during a first scan the fetches of a peer
/// waited ~60 ms in all, 1-5 ms at a time, behind the commits of its parts).
pub struct Reader {
    conn: Connection,
    /// When the read transaction [`Reader::served`] answers from began, if one is
    /// open (see [`SNAPSHOT_FOR`]).
    snapshot: Option<std::time::Instant>,
}

/// How long [`Reader::served`] answers from one read transaction. Each query in
/// a transaction of its own takes and drops SQLite's file lock (two `fcntl`
/// calls) and its WAL snapshot: two thirds of a lookup's ~16 µs, once per file
/// served (measured on `gen.py small`). Within a few milliseconds an answer can
/// only be stale in the safe direction: a version committed since is not seen
/// (the caller asks again with [`Reader::served_now`]), and a file changed since
/// is caught by the receiver's hash check, as it is when the file changes after
/// a fresh look-up. Held no longer than this, the WAL is not kept from being
/// checkpointed for long.
pub const SNAPSHOT_FOR: std::time::Duration = std::time::Duration::from_millis(20);

impl Reader {
    /// Opens the index at `path`, which a [`Store`] has already opened (so it
    /// exists, in WAL mode).
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        Ok(Reader {
            conn: open_read_only(path)?,
            snapshot: None,
        })
    }

    /// What a peer's fetch of `path` is checked against, without decoding the
    /// rest of the record: its kind, whether it is a tombstone, its hash and size.
    /// Answered from a read transaction at most [`SNAPSHOT_FOR`] old.
    pub fn served(&mut self, path: &str) -> Result<Option<Served>, StoreError> {
        if self.snapshot.is_none_or(|t| t.elapsed() >= SNAPSHOT_FOR) {
            self.end_snapshot();
            self.conn.execute_batch("BEGIN")?;
            self.snapshot = Some(std::time::Instant::now());
        }
        let found = self.look_up(path);
        if found.is_err() {
            self.end_snapshot();
        }
        found
    }

    /// [`Reader::served`] from what is committed now.
    pub fn served_now(&mut self, path: &str) -> Result<Option<Served>, StoreError> {
        self.end_snapshot();
        self.served(path)
    }

    /// Ends the read transaction if it is older than [`SNAPSHOT_FOR`] (called
    /// on every look-up, and periodically, so an idle reader holds none).
    pub fn end_stale_snapshot(&mut self) {
        if self.snapshot.is_some_and(|t| t.elapsed() >= SNAPSHOT_FOR) {
            self.end_snapshot();
        }
    }

    fn end_snapshot(&mut self) {
        self.snapshot = None;
        if !self.conn.is_autocommit() {
            // Nothing to write: this only lets go of the lock and the snapshot (and
            // if it ever failed, the next look-up would try again before its BEGIN).
            let _ = self.conn.execute_batch("COMMIT");
        }
    }

    fn look_up(&self, path: &str) -> Result<Option<Served>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT kind, deleted, hash, size FROM files WHERE path = ?1")?;
        let mut rows = stmt.query(params![path])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        Ok(Some(Served {
            kind: kind_of(path, row.get(0)?)?,
            deleted: row.get::<_, i64>(1)? != 0,
            hash: hash_of(path, row.get(2)?)?,
            size: row.get::<_, i64>(3)? as u64,
        }))
    }
}

/// What a scan checks a path it meets against ([`Snapshot::proof`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    pub kind: Kind,
    pub deleted: bool,
    pub hash: ContentHash,
    pub mode: u32,
    pub target: Option<String>,
    pub stat: Option<StatKey>,
}

#[cfg(test)]
impl Proof {
    /// `entry`'s proof.
    pub fn of(entry: &Entry) -> Proof {
        let r = &entry.record;
        Proof {
            kind: r.kind,
            deleted: r.deleted,
            hash: r.hash,
            mode: r.mode,
            target: r.target.clone(),
            stat: entry.stat,
        }
    }
}

/// A read-only connection for scans: a scan compares the disk with one
/// [`Snapshot`] of the index, looking each path up as the walk meets it, instead
/// of loading every entry first (about 420 bytes a file at a full rescan's peak:
/// 42 MB for 100,000 files, and again at every periodic rescan). What a scan holds
/// is then what changed, and one bit for each entry it found as indexed.
pub struct ScanReader {
    conn: Connection,
}

impl ScanReader {
    /// Opens the index at `path`, which a [`Store`] has already opened.
    pub fn open(path: &Path) -> Result<ScanReader, StoreError> {
        Ok(ScanReader {
            conn: open_read_only(path)?,
        })
    }

    /// Begins a read transaction: whatever is read through the snapshot is the
    /// index as one commit left it, however long the scan takes (in WAL mode the
    /// writer goes on meanwhile). It ends when the snapshot is dropped. While it
    /// is open, checkpoints cannot move the WAL past it, so the WAL grows by
    /// what the node commits during the scan, and is reused once it ends.
    pub fn snapshot(&mut self) -> Result<Snapshot<'_>, StoreError> {
        self.conn.execute_batch("BEGIN DEFERRED")?;
        // Made first, so that an error below still ends the transaction.
        let mut snapshot = Snapshot {
            conn: &self.conn,
            max_seq: 0,
            max_id: 0,
        };
        // The snapshot is taken at the first read, which is this one.
        let max_seq: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM files", [], |r| r.get(0))?;
        // Both from an index's end, not a count of the rows (which a scan of a
        // few paths would pay for the whole table); two queries, because SQLite
        // reads a MAX from an index's end only when it is the query's one aggregate.
        let max_id: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(rowid), 0) FROM files", [], |r| {
                    r.get(0)
                })?;
        snapshot.max_seq = max_seq as u64;
        snapshot.max_id = max_id;
        Ok(snapshot)
    }
}

/// One read transaction of a [`ScanReader`] (see there).
pub struct Snapshot<'c> {
    conn: &'c Connection,
    max_seq: u64,
    max_id: i64,
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        if !self.conn.is_autocommit() {
            // Read-only: ending it only lets go of the snapshot and the lock.
            let _ = self.conn.execute_batch("COMMIT");
        }
    }
}

impl Snapshot<'_> {
    /// The highest sequence number in the snapshot.
    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// Whether it holds no entry at all (not even a tombstone).
    pub fn is_empty(&self) -> bool {
        // Row ids start at 1.
        self.max_id <= 0
    }

    /// An empty set of its entries, to mark those a scan found: `whole` for a
    /// scan of the whole tree (which finds most of them), else one of a few paths.
    pub fn seen(&self, whole: bool) -> Seen {
        Seen::new(self.max_id, whole)
    }

    /// The entry for `path`, tombstones included, with its row id (for [`Seen`]).
    pub fn get(&self, path: &str) -> Result<Option<(i64, Entry)>, StoreError> {
        get_with_id(self.conn, path)
    }

    /// What a scan checks `path` against, with its row id (for [`Seen`]): the
    /// entry without its version, author or path, which only a changed path needs
    /// (see [`Snapshot::get`]).
    pub fn proof(&self, path: &str) -> Result<Option<(i64, Proof)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rowid, kind, deleted, hash, mode, target, \
             st_size, st_mtime, st_ctime, st_ino, st_dev FROM files WHERE path = ?1",
        )?;
        let mut rows = stmt.query(params![path])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        let proof = Proof {
            kind: kind_of(path, row.get(1)?)?,
            deleted: row.get::<_, i64>(2)? != 0,
            hash: hash_of(path, row.get(3)?)?,
            mode: row.get::<_, i64>(4)? as u32,
            target: row.get(5)?,
            stat: stat_of(row, 6)?,
        };
        Ok(Some((row.get(0)?, proof)))
    }

    /// Hands `f` every live entry (not a tombstone) of `scope` and below it
    /// (`None`: of the whole index) that is not in `seen`: what a scan did not
    /// find, and so may have been deleted. Only those are decoded; tombstones,
    /// which pile up in a tree where files come and go, are not even read.
    pub fn each_unseen(
        &self,
        scope: Option<&str>,
        seen: &Seen,
        f: &mut dyn FnMut(Entry),
    ) -> Result<(), StoreError> {
        let mut stmt = match scope {
            None => self.conn.prepare_cached(concat!(
                "SELECT ",
                columns!(),
                ", rowid FROM files WHERE deleted = 0"
            ))?,
            Some(_) => self.conn.prepare_cached(concat!(
                "SELECT ",
                columns!(),
                ", rowid FROM files WHERE deleted = 0 AND ",
                in_scope!()
            ))?,
        };
        let mut rows = match scope {
            None => stmt.query([])?,
            Some(path) => stmt.query(scope_params(path))?,
        };
        while let Some(row) = rows.next()? {
            if !seen.contains(row.get(ID_COLUMN)?) {
                f(read_entry(row)?);
            }
        }
        Ok(())
    }
}

/// The entry for `path` on `conn`, tombstones included, with its row id.
fn get_with_id(conn: &Connection, path: &str) -> Result<Option<(i64, Entry)>, StoreError> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT ",
        columns!(),
        ", rowid FROM files WHERE path = ?1"
    ))?;
    let mut rows = stmt.query(params![path])?;
    match rows.next()? {
        Some(row) => Ok(Some((row.get(ID_COLUMN)?, read_entry(row)?))),
        None => Ok(None),
    }
}

/// Where the row id is in the rows [`get_with_id`] and [`Snapshot`] read: after
/// [`columns!`].
const ID_COLUMN: usize = 17;

/// The entries of a [`Snapshot`] a scan found, by row id: for a scan of the whole
/// tree, one bit for each id up to the highest (SQLite gives a new row the
/// highest id plus one, so they are dense); for a scan of a few paths, a set.
pub enum Seen {
    Bits(Vec<u64>),
    Set(std::collections::HashSet<i64>),
}

/// The most row ids [`Seen`] keeps as bits (8 MiB of them); past that, a set.
const MAX_BITS: i64 = 1 << 26;

impl Seen {
    fn new(max_id: i64, whole: bool) -> Seen {
        if whole && (0..=MAX_BITS).contains(&max_id) {
            Seen::Bits(vec![0; (max_id as usize) / 64 + 1])
        } else {
            Seen::Set(std::collections::HashSet::new())
        }
    }

    pub fn insert(&mut self, id: i64) {
        match self {
            Seen::Bits(bits) => {
                // An id past the bits is not a row of the snapshot: nothing to mark.
                if let Some((word, bit)) = bit_of(bits.len(), id) {
                    bits[word] |= bit;
                }
            }
            Seen::Set(set) => {
                set.insert(id);
            }
        }
    }

    pub fn contains(&self, id: i64) -> bool {
        match self {
            Seen::Bits(bits) => {
                bit_of(bits.len(), id).is_some_and(|(word, bit)| bits[word] & bit != 0)
            }
            Seen::Set(set) => set.contains(&id),
        }
    }
}

/// Where row `id`'s bit is in `words` words of bits: the word and its mask.
fn bit_of(words: usize, id: i64) -> Option<(usize, u64)> {
    let i = usize::try_from(id).ok()?;
    (i / 64 < words).then(|| (i / 64, 1 << (i % 64)))
}

/// A read-only connection to the index at `path`, which a [`Store`] has already
/// opened (so it exists, in WAL mode).
fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    Ok(Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?)
}

/// The kind stored as `code` (see [`kind_code`]).
fn kind_of(path: &str, code: i64) -> Result<Kind, StoreError> {
    match code {
        0 => Ok(Kind::File),
        1 => Ok(Kind::Dir),
        2 => Ok(Kind::Symlink),
        k => Err(corrupt(path, format!("unknown kind {k}"))),
    }
}

/// A stored content hash.
fn hash_of(path: &str, blob: Vec<u8>) -> Result<ContentHash, StoreError> {
    let hash: [u8; 32] = blob
        .try_into()
        .map_err(|_| corrupt(path, "hash is not 32 bytes"))?;
    Ok(ContentHash(hash))
}

/// The stat proof stored in the five columns from `first` on (size, mtime,
/// ctime, inode, device), if there is one.
fn stat_of(row: &Row<'_>, first: usize) -> Result<Option<StatKey>, StoreError> {
    Ok(match row.get::<_, Option<i64>>(first)? {
        Some(size) => Some(StatKey {
            size: size as u64,
            mtime_ns: row.get::<_, i64>(first + 1)? as i128,
            ctime_ns: row.get::<_, i64>(first + 2)? as i128,
            ino: row.get::<_, i64>(first + 3)? as u64,
            dev: row.get::<_, i64>(first + 4)? as u64,
        }),
        None => None,
    })
}

fn read_entry(row: &Row<'_>) -> Result<Entry, StoreError> {
    let path: String = row.get(0)?;
    let kind = kind_of(&path, row.get(1)?)?;
    let hash = hash_of(&path, row.get(6)?)?;
    let version: Vec<u8> = row.get(8)?;
    let version: VersionVector = postcard::from_bytes(&version).map_err(|e| corrupt(&path, e))?;
    let stat = stat_of(row, 12)?;
    let record = Record {
        kind,
        size: row.get::<_, i64>(2)? as u64,
        modified: Timestamp {
            secs: row.get(3)?,
            nanos: row.get::<_, i64>(4)? as u32,
        },
        mode: row.get::<_, i64>(5)? as u32,
        hash,
        target: row.get(7)?,
        version,
        deleted: row.get::<_, i64>(9)? != 0,
        modified_by: row.get(10)?,
        seq: row.get::<_, i64>(11)? as u64,
        path,
    };
    Ok(Entry { record, stat })
}

impl Store {
    /// Opens (creating if needed) the index at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        // Added after the first release of the schema: which peer a record was
        // taken from unchanged (so it is not echoed back to that peer).
        let has_source = conn
            .prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = 'source'")?
            .exists([])?;
        if !has_source {
            conn.execute_batch("ALTER TABLE files ADD COLUMN source TEXT")?;
        }
        let index_id = match conn
            .query_row("SELECT value FROM meta WHERE key = 'index_id'", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
        {
            Some(v) => v
                .try_into()
                .map_err(|_| corrupt("meta", "index_id is not 16 bytes"))?,
            None => {
                let id = new_index_id();
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('index_id', ?1)",
                    params![id.to_vec()],
                )?;
                id
            }
        };
        let max_seq: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM files", [], |r| r.get(0))?;
        Ok(Store {
            conn,
            index_id,
            max_seq: max_seq as u64,
        })
    }

    pub fn index_id(&self) -> IndexId {
        self.index_id
    }

    /// The highest sequence number given to a record so far.
    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// Runs `f` inside one read transaction: many lookups share one snapshot and
    /// one set of file locks instead of taking them per statement.
    pub fn read<R>(
        &mut self,
        f: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conn.execute_batch("BEGIN DEFERRED")?;
        let result = f(self);
        // A read-only transaction: ending it cannot lose anything.
        let _ = self.conn.execute_batch("COMMIT");
        result
    }

    /// The entry for `path`, tombstones included.
    pub fn get(&self, path: &str) -> Result<Option<Entry>, StoreError> {
        Ok(get_with_id(&self.conn, path)?.map(|(_, entry)| entry))
    }

    /// Up to `limit` records after `seq` for `peer`, leaving out those above
    /// `filter_after` that were taken from `peer` unchanged (it has them); returns
    /// them and the last sequence number looked at (the cursor moves past what was
    /// left out).
    pub fn since_for(
        &self,
        seq: u64,
        limit: usize,
        peer: &str,
        filter_after: u64,
    ) -> Result<(Vec<Record>, u64), StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS}, source FROM files WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let mut rows = stmt.query(params![seq as i64, limit as i64])?;
        let (mut out, mut last) = (Vec::new(), seq);
        while let Some(row) = rows.next()? {
            let e = read_entry(row)?;
            last = e.record.seq;
            let echo = e.record.seq > filter_after
                && row.get::<_, Option<String>>(17)?.as_deref() == Some(peer);
            if !echo {
                out.push(e.record);
            }
        }
        Ok((out, last))
    }

    /// Live regular files, in path order.
    pub fn live_files(&self) -> Result<Vec<Record>, StoreError> {
        let entries = self.select(
            &format!("SELECT {COLUMNS} FROM files WHERE deleted = 0 AND kind = 0 ORDER BY path"),
            params![],
        )?;
        Ok(entries.into_iter().map(|e| e.record).collect())
    }

    /// A live regular file with this content, if any.
    pub fn find_by_hash(&self, hash: &ContentHash) -> Result<Option<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path FROM files WHERE hash = ?1 AND deleted = 0 AND kind = 0 LIMIT 1",
        )?;
        Ok(stmt
            .query_row(params![hash.0.to_vec()], |r| r.get(0))
            .optional()?)
    }

    /// Number of live files and their total size.
    pub fn totals(&self) -> Result<(u64, u64), StoreError> {
        let (n, bytes): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE deleted = 0 AND kind = 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n as u64, bytes as u64))
    }

    fn select(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        self.select_each(sql, args, &mut |e| out.push(e))?;
        Ok(out)
    }

    /// Hands each entry of `sql`'s rows to `f`, one at a time.
    fn select_each(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        f: &mut dyn FnMut(Entry),
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(args)?;
        while let Some(row) = rows.next()? {
            f(read_entry(row)?);
        }
        Ok(())
    }

    /// Writes `updates` in one transaction, each under the next sequence number, and
    /// with them (atomically) what was applied from a peer. Returns the new maximum
    /// sequence number.
    pub fn commit(
        &mut self,
        updates: &[Update],
        peer_progress: Option<(&str, IndexId, u64)>,
    ) -> Result<u64, StoreError> {
        self.commit_with(updates, peer_progress, &[], &[], None)
    }

    /// [`Store::commit`], plus staged versions of locked paths appended to their
    /// queues and applied ones removed, all in the same transaction: a crash leaves
    /// either all of it or none.
    pub fn commit_with(
        &mut self,
        updates: &[Update],
        peer_progress: Option<(&str, IndexId, u64)>,
        enqueue: &[super::queue::NewQueued],
        dequeue: &[i64],
        taken_from: Option<(&str, &std::collections::HashSet<String>)>,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        super::queue::write_queue(&tx, enqueue, dequeue)?;
        let mut seq = self.max_seq;
        {
            let mut stmt = tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO files ({COLUMNS}, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
            ))?;
            for u in updates {
                seq += 1;
                let r = &u.record;
                let version = postcard::to_allocvec(&r.version).map_err(|e| corrupt(&r.path, e))?;
                let s = u.stat.as_ref();
                stmt.execute(params![
                    r.path,
                    kind_code(r.kind),
                    r.size as i64,
                    r.modified.secs,
                    r.modified.nanos as i64,
                    r.mode as i64,
                    r.hash.0.to_vec(),
                    r.target,
                    version,
                    r.deleted as i64,
                    r.modified_by,
                    seq as i64,
                    s.map(|s| s.size as i64),
                    s.map(|s| s.mtime_ns as i64),
                    s.map(|s| s.ctime_ns as i64),
                    s.map(|s| s.ino as i64),
                    s.map(|s| s.dev as i64),
                    taken_from
                        .filter(|(_, paths)| paths.contains(&r.path))
                        .map(|(peer, _)| peer),
                ])?;
            }
        }
        if let Some((peer, id, last)) = peer_progress {
            tx.execute(
                "INSERT OR REPLACE INTO peers (name, index_id, last_seq) VALUES (?1, ?2, ?3)",
                params![peer, id.to_vec(), last as i64],
            )?;
        }
        tx.commit()?;
        self.max_seq = seq;
        Ok(seq)
    }

    /// Refreshes the stat proof of a path without making a new version (the file was
    /// touched but its content and metadata are unchanged).
    pub fn refresh_stat(&mut self, path: &str, stat: &StatKey) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE files SET st_size = ?2, st_mtime = ?3, st_ctime = ?4, st_ino = ?5, st_dev = ?6 WHERE path = ?1",
            params![path, stat.size as i64, stat.mtime_ns as i64, stat.ctime_ns as i64, stat.ino as i64, stat.dev as i64],
        )?;
        Ok(())
    }

    /// `peer`'s records that lost a conflict to ours, each with the sequence number
    /// of our record (see `engine::session`).
    pub fn outvoted(&self, peer: &str) -> Result<Vec<(Record, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT path, record, our_seq FROM outvoted WHERE peer = ?1")?;
        let rows = stmt.query_map(params![peer], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (path, blob, seq) = row?;
            let record: Record = postcard::from_bytes(&blob).map_err(|e| corrupt(&path, e))?;
            out.push((record, seq as u64));
        }
        Ok(out)
    }

    /// Adds (or replaces) and removes outvoted records of `peer`, in one transaction.
    pub fn update_outvoted(
        &mut self,
        peer: &str,
        add: &[(Record, u64)],
        remove: &[String],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM outvoted WHERE peer = ?1 AND path = ?2")?;
            for path in remove {
                del.execute(params![peer, path])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO outvoted (peer, path, record, our_seq) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (r, seq) in add {
                let blob = postcard::to_allocvec(r).map_err(|e| corrupt(&r.path, e))?;
                put.execute(params![peer, r.path, blob, *seq as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// What we last applied from `peer`: its index id and sequence number.
    pub fn peer_progress(&self, peer: &str) -> Result<Option<(IndexId, u64)>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT index_id, last_seq FROM peers WHERE name = ?1",
                params![peer],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?;
        match row {
            Some((id, seq)) => {
                let id: IndexId = id
                    .try_into()
                    .map_err(|_| corrupt(peer, "peer index id is not 16 bytes"))?;
                Ok(Some((id, seq as u64)))
            }
            None => Ok(None),
        }
    }
}

/// 16 bytes that differ between index incarnations: BLAKE3 of the time, the process
/// id and a stack address (no extra RNG dependency needed for uniqueness here).
fn new_index_id() -> IndexId {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let marker = 0u8;
    let mut h = blake3::Hasher::new();
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&(&marker as *const u8 as usize).to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(path: &str, by: &str) -> Update {
        let mut version = VersionVector::default();
        version.bump(by);
        Update {
            record: Record {
                path: path.into(),
                kind: Kind::File,
                size: 1,
                modified: Timestamp { secs: 1, nanos: 0 },
                mode: 0o644,
                hash: ContentHash([1; 32]),
                target: None,
                version,
                deleted: false,
                modified_by: by.into(),
                seq: 0,
            },
            stat: None,
        }
    }

    #[test]
    fn served_is_the_records_kind_tombstone_hash_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("index.db");
        let mut s = Store::open(&db).unwrap();
        // Opened before the commit: a reader sees what is committed after it opened.
        let mut r = Reader::open(&db).unwrap();
        assert!(r.served("f").unwrap().is_none());
        // The look-up's read transaction stays open for the next ones.
        assert!(!r.conn.is_autocommit());
        std::thread::sleep(SNAPSHOT_FOR); // let the snapshot of that look-up age
        let mut gone = update("gone", "a");
        gone.record.deleted = true;
        gone.record.kind = Kind::Dir;
        s.commit(&[update("f", "a"), gone], None).unwrap();
        for path in ["f", "gone", "absent"] {
            let want = s.get(path).unwrap().map(|e| Served {
                kind: e.record.kind,
                deleted: e.record.deleted,
                hash: e.record.hash,
                size: e.record.size,
            });
            assert_eq!(r.served(path).unwrap(), want, "{path}");
        }
        assert!(r.served("absent").unwrap().is_none());
        // An answer from the snapshot may predate a commit; asked now, it does not,
        // and once the snapshot is older than SNAPSHOT_FOR no answer does.
        let mut again = update("f", "a");
        again.record.hash = ContentHash([2; 32]);
        s.commit(&[again], None).unwrap();
        assert_eq!(
            r.served_now("f").unwrap().unwrap().hash,
            ContentHash([2; 32])
        );
        let mut third = update("f", "a");
        third.record.hash = ContentHash([3; 32]);
        s.commit(&[third], None).unwrap();
        std::thread::sleep(SNAPSHOT_FOR);
        assert_eq!(r.served("f").unwrap().unwrap().hash, ContentHash([3; 32]));
        // An idle reader lets go of its snapshot: the WAL can be checkpointed whole.
        std::thread::sleep(SNAPSHOT_FOR);
        r.end_stale_snapshot();
        assert!(r.conn.is_autocommit());
        // Read-only: the reader cannot change the index.
        assert!(r.conn.execute("DELETE FROM files", []).is_err());
        assert!(s.get("f").unwrap().is_some());
    }

    #[test]
    fn outvoted_records_survive_a_reopen_per_peer() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("index.db");
        let (x, y) = (update("x", "b").record, update("y", "b").record);
        {
            let mut s = Store::open(&db).unwrap();
            s.update_outvoted("b", &[(x.clone(), 7), (y.clone(), 8)], &[])
                .unwrap();
            s.update_outvoted("c", &[(x.clone(), 9)], &[]).unwrap();
            s.update_outvoted("b", &[], &["y".to_string()]).unwrap();
        }
        let s = Store::open(&db).unwrap();
        assert_eq!(s.outvoted("b").unwrap(), vec![(x.clone(), 7)]);
        assert_eq!(s.outvoted("c").unwrap(), vec![(x, 9)]);
        assert!(s.outvoted("d").unwrap().is_empty());
    }

    #[test]
    fn records_taken_from_a_peer_are_not_sent_back_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("index.db")).unwrap();
        s.commit(&[update("mine", "a")], None).unwrap();
        let from_b: std::collections::HashSet<String> = ["theirs".to_string()].into();
        s.commit_with(
            &[update("theirs", "b")],
            None,
            &[],
            &[],
            Some(("b", &from_b)),
        )
        .unwrap();
        s.commit(&[update("later", "a")], None).unwrap();
        let paths = |(r, last): (Vec<Record>, u64)| {
            (r.into_iter().map(|r| r.path).collect::<Vec<_>>(), last)
        };
        // b resuming: everything but what came from b.
        assert_eq!(
            paths(s.since_for(0, 10, "b", 0).unwrap()),
            (vec!["mine".to_string(), "later".to_string()], 3)
        );
        // c gets everything.
        assert_eq!(s.since_for(0, 10, "c", 0).unwrap().0.len(), 3);
        // b starting from scratch gets back what it gave before the session.
        assert_eq!(s.since_for(0, 10, "b", 3).unwrap().0.len(), 3);
        // The cursor moves past a page of echoes only.
        assert_eq!(paths(s.since_for(1, 1, "b", 0).unwrap()), (vec![], 2));
    }

    #[test]
    fn a_scan_snapshot_is_one_moment_and_hands_over_only_the_unseen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("index.db");
        let mut s = Store::open(&db).unwrap();
        let mut reader = ScanReader::open(&db).unwrap();
        assert!(reader.snapshot().unwrap().is_empty());
        let mut linked = update("d/link", "a");
        linked.record.kind = Kind::Symlink;
        linked.record.target = Some("../x".into());
        linked.stat = Some(StatKey {
            size: 4,
            mtime_ns: 5,
            ctime_ns: 6,
            ino: 7,
            dev: 8,
        });
        let mut tombstone = update("d/gone", "a");
        tombstone.record.deleted = true;
        s.commit(
            &[
                update("d", "a"),
                linked,
                update("d/f", "a"),
                update("e", "a"),
                tombstone,
            ],
            None,
        )
        .unwrap();
        let max = s.max_seq();
        let snapshot = reader.snapshot().unwrap();
        assert!(!snapshot.is_empty());
        assert_eq!(snapshot.max_seq(), max);
        // A commit after the snapshot began is not seen through it.
        s.commit(&[update("new", "b")], None).unwrap();
        assert!(snapshot.proof("new").unwrap().is_none());
        assert_eq!(snapshot.max_seq(), max);
        // A proof is the entry's, without the rest.
        let (link_id, proof) = snapshot.proof("d/link").unwrap().unwrap();
        let (same_id, entry) = snapshot.get("d/link").unwrap().unwrap();
        assert_eq!(link_id, same_id);
        assert_eq!(proof, Proof::of(&entry));
        assert_eq!(proof.target.as_deref(), Some("../x"));
        assert_eq!(proof.stat.map(|s| s.ino), Some(7));
        // Of a scope, only the live entries not marked seen (whole or scoped alike).
        for whole in [true, false] {
            let mut seen = snapshot.seen(whole);
            assert_eq!(matches!(seen, Seen::Bits(_)), whole);
            seen.insert(link_id);
            let unseen = |scope: Option<&str>| {
                let mut paths = Vec::new();
                snapshot
                    .each_unseen(scope, &seen, &mut |e| paths.push(e.record.path))
                    .unwrap();
                paths.sort();
                paths
            };
            assert_eq!(unseen(Some("d")), ["d", "d/f"]);
            assert_eq!(unseen(None), ["d", "d/f", "e"]);
            assert!(!seen.contains(link_id + 1000));
        }
        drop(snapshot);
        // A new snapshot sees the later commit.
        assert!(reader.snapshot().unwrap().proof("new").unwrap().is_some());
    }
}
