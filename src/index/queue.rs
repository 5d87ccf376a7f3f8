//! Locks and the per-path FIFO queues of staged remote versions, in the index
//! database: a lock, its queue and the index records change in the same
//! transactions, so a crash never applies a staged version twice or drops one.

use rusqlite::{params, OptionalExtension, Transaction};

use super::store::{corrupt, Store, StoreError};
use crate::sync::record::Record;
use crate::wire::{LockInfo, Timestamp};

/// A remote version of a locked path, to append to its queue. Its content (for a
/// live file) is already fsynced in the staging directory under `staged`.
#[derive(Clone, Debug)]
pub struct NewQueued {
    pub path: String,
    pub peer: String,
    pub received: Timestamp,
    pub record: Record,
    pub staged: Option<String>,
}

/// One queued version, in FIFO order by `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub id: i64,
    pub path: String,
    pub peer: String,
    pub received: Timestamp,
    pub record: Record,
    /// File name in the staging directory (`None` for a deletion, a directory or a
    /// link: the record says everything).
    pub staged: Option<String>,
}

pub(super) fn write_queue(
    tx: &Transaction<'_>,
    enqueue: &[NewQueued],
    dequeue: &[i64],
) -> Result<(), StoreError> {
    if !enqueue.is_empty() {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO queue (path, peer, received_s, received_ns, record, staged) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for q in enqueue {
            let record = postcard::to_allocvec(&q.record).map_err(|e| corrupt(&q.path, e))?;
            stmt.execute(params![
                q.path,
                q.peer,
                q.received.secs,
                q.received.nanos as i64,
                record,
                q.staged
            ])?;
        }
    }
    for id in dequeue {
        tx.execute("DELETE FROM queue WHERE id = ?1", params![id])?;
    }
    Ok(())
}

fn read_queued(row: &rusqlite::Row<'_>) -> Result<Queued, StoreError> {
    let path: String = row.get(1)?;
    let record: Vec<u8> = row.get(5)?;
    let record: Record = postcard::from_bytes(&record).map_err(|e| corrupt(&path, e))?;
    Ok(Queued {
        id: row.get(0)?,
        peer: row.get(2)?,
        received: Timestamp {
            secs: row.get(3)?,
            nanos: row.get::<_, i64>(4)? as u32,
        },
        record,
        staged: row.get(6)?,
        path,
    })
}

fn read_lock(row: &rusqlite::Row<'_>) -> rusqlite::Result<LockInfo> {
    Ok(LockInfo {
        path: row.get(0)?,
        owner: row.get(1)?,
        since: Timestamp {
            secs: row.get(2)?,
            nanos: row.get::<_, i64>(3)? as u32,
        },
        expires: row
            .get::<_, Option<i64>>(4)?
            .map(|secs| Timestamp { secs, nanos: 0 }),
        releasing: row.get::<_, i64>(5)? != 0,
        queued: row.get::<_, i64>(6)? as u32,
    })
}

const LOCK_COLUMNS: &str = "l.path, l.owner, l.since_s, l.since_ns, l.expires_s, l.releasing, \
     (SELECT COUNT(*) FROM queue q WHERE q.path = l.path)";

impl Store {
    /// Every lock, by path, with its queue length.
    pub fn locks(&self) -> Result<Vec<LockInfo>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {LOCK_COLUMNS} FROM locks l ORDER BY l.path"
        ))?;
        let rows = stmt.query_map([], read_lock)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The lock on `path`, if any.
    pub fn lock(&self, path: &str) -> Result<Option<LockInfo>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {LOCK_COLUMNS} FROM locks l WHERE l.path = ?1"),
                params![path],
                read_lock,
            )
            .optional()?)
    }

    /// Creates or replaces (a TTL refresh by the owner) the lock on `lock.path`.
    pub fn put_lock(&mut self, lock: &LockInfo) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO locks (path, owner, since_s, since_ns, expires_s, releasing) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                lock.path,
                lock.owner,
                lock.since.secs,
                lock.since.nanos as i64,
                lock.expires.map(|t| t.secs),
                lock.releasing as i64
            ],
        )?;
        Ok(())
    }

    /// Marks the lock on `path` as being released (its queue is being applied): a
    /// restart finishes the release instead of keeping the file locked.
    pub fn set_releasing(&mut self, path: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE locks SET releasing = 1 WHERE path = ?1",
            params![path],
        )?;
        Ok(())
    }

    /// Removes the lock on `path` if its queue is empty; returns whether it did.
    pub fn remove_lock_if_drained(&mut self, path: &str) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let queued: i64 = tx.query_row(
            "SELECT COUNT(*) FROM queue WHERE path = ?1",
            params![path],
            |r| r.get(0),
        )?;
        if queued > 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM locks WHERE path = ?1", params![path])?;
        tx.commit()?;
        Ok(true)
    }

    /// The queue of `path`, oldest first.
    pub fn queue(&self, path: &str) -> Result<Vec<Queued>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, path, peer, received_s, received_ns, record, staged FROM queue WHERE path = ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query(params![path])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(read_queued(row)?);
        }
        Ok(out)
    }

    /// Paths with queued versions but no lock (a release interrupted by a crash).
    pub fn orphan_queues(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT path FROM queue WHERE path NOT IN (SELECT path FROM locks) ORDER BY path",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every staged file name the queues refer to.
    pub fn staged_names(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT staged FROM queue WHERE staged IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use crate::sync::record::Kind;
    use crate::sync::version::VersionVector;

    fn record(path: &str, n: u64) -> Record {
        let mut version = VersionVector::default();
        for _ in 0..n {
            version.bump("b");
        }
        Record {
            path: path.into(),
            kind: Kind::File,
            size: n,
            modified: Timestamp { secs: 1, nanos: 0 },
            mode: 0o644,
            hash: ContentHash([n as u8; 32]),
            target: None,
            version,
            deleted: false,
            modified_by: "b".into(),
            seq: n,
        }
    }

    #[test]
    fn queue_is_fifo_and_survives_reopen_and_locks_release_only_when_drained() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("index.db");
        let lock = LockInfo {
            path: "p".into(),
            owner: "alice".into(),
            since: Timestamp { secs: 10, nanos: 5 },
            expires: Some(Timestamp { secs: 99, nanos: 0 }),
            queued: 0,
            releasing: false,
        };
        {
            let mut s = Store::open(&db).unwrap();
            s.put_lock(&lock).unwrap();
            let new: Vec<NewQueued> = (1..=3)
                .map(|n| NewQueued {
                    path: "p".into(),
                    peer: "b".into(),
                    received: Timestamp { secs: n, nanos: 0 },
                    record: record("p", n as u64),
                    staged: Some(format!("s{n}")),
                })
                .collect();
            s.commit_with(&[], None, &new[..2], &[], None).unwrap();
            s.commit_with(&[], None, &new[2..], &[], None).unwrap();
        }
        let mut s = Store::open(&db).unwrap();
        let locks = s.locks().unwrap();
        assert_eq!(locks.len(), 1);
        assert_eq!(locks[0].queued, 3);
        assert_eq!(locks[0].owner, "alice");
        assert_eq!(locks[0].since, lock.since);
        let q = s.queue("p").unwrap();
        let sizes: Vec<u64> = q.iter().map(|q| q.record.size).collect();
        assert_eq!(sizes, vec![1, 2, 3], "FIFO order");
        assert_eq!(s.staged_names().unwrap().len(), 3);
        assert!(!s.remove_lock_if_drained("p").unwrap());
        let ids: Vec<i64> = q.iter().map(|q| q.id).collect();
        s.commit_with(&[], None, &[], &ids, None).unwrap();
        s.set_releasing("p").unwrap();
        assert!(s.lock("p").unwrap().unwrap().releasing);
        assert!(s.remove_lock_if_drained("p").unwrap());
        assert!(s.lock("p").unwrap().is_none());
        assert!(s.orphan_queues().unwrap().is_empty());
    }
}
