//! The local spool: a durable, append-only file in front of the database.
//!
//! When the database cannot take the events the loop produced (it is away,
//! or a write failed or ran out of time), they are appended here and
//! `fsync`ed before the loop acts on them, so a crash during an outage
//! loses nothing that was acted on. Once spooling started, every later
//! event goes through the spool too until the database has taken all of
//! them; then the spool is emptied. At start, whatever it holds is replayed
//! into the database before the loop's memory is loaded from it.
//!
//! Guarantees:
//! - The spool holds, in order, a copy of every event pushed since the
//!   first one it holds: replaying it re-applies a contiguous run of the
//!   event stream, and [`Store::apply`](super::Store::apply) is idempotent,
//!   so events the database already had land once.
//! - A record is written whole or not at all as far as a reader is
//!   concerned: each carries its length and a CRC-32, and reading stops at
//!   the first torn or corrupt record (a crash mid-append), which is cut off
//!   and reported.
//! - Bounded by `max_bytes`: past it, an append is refused
//!   ([`SpoolError::Full`]) and the events stay in memory only. A disk that
//!   is full gives [`SpoolError::DiskFull`]; a failed append is rolled back
//!   so the file stays readable.
//! - One process at a time: the file is locked (`flock`) while open.
//!
//! Format: the header line `spire-healer spool v1\n`, then records of a
//! little-endian `u32` payload length, a little-endian `u32` CRC-32
//! (ISO-HDLC) of the payload, and the payload: a JSON array of events.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Store, StoreError};
use crate::model::Event;

const HEADER: &[u8] = b"spire-healer spool v1\n";
/// Length and checksum before each payload.
const RECORD_HEAD: u64 = 8;
/// A payload larger than this is not something we wrote.
const MAX_RECORD: u32 = 256 << 20;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading, writing or syncing the file failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The spool file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The disk holding the spool is full.
    #[error("spool {path}: the disk is full; events stay in memory only")]
    DiskFull {
        /// The spool file.
        path: PathBuf,
    },
    /// The spool reached `database.spool_max_bytes`.
    #[error("spool {path} is full ({max} bytes); events stay in memory only")]
    Full {
        /// The spool file.
        path: PathBuf,
        /// The bound.
        max: u64,
    },
    /// Another process has the spool open.
    #[error(
        "spool {path} is in use by another spire-healer; give each instance its own database.spool"
    )]
    Held {
        /// The spool file.
        path: PathBuf,
    },
    /// The file exists but is not a spool.
    #[error("{path} is not a spire-healer spool (unexpected header); move it away")]
    NotASpool {
        /// The file.
        path: PathBuf,
    },
}

impl SpoolError {
    /// Closed-set label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SpoolError::Io { .. } => "io",
            SpoolError::DiskFull { .. } => "disk_full",
            SpoolError::Full { .. } => "full",
            SpoolError::Held { .. } => "held",
            SpoolError::NotASpool { .. } => "not_a_spool",
        }
    }
}

/// What an opened spool held.
#[derive(Debug, Default)]
pub struct Replay {
    /// Events of the intact records, in order.
    pub events: Vec<Event>,
    /// Bytes cut off after the last intact record (a torn or corrupt tail).
    pub discarded_bytes: u64,
}

/// What [`open_and_replay`] landed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Events written to the store.
    pub events: usize,
    /// Bytes of a torn or corrupt tail that were cut off.
    pub discarded_bytes: u64,
}

/// Why a spool could not be replayed at start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The spool itself.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The store refused the events; the spool keeps them.
    #[error("replaying the spool: {0}")]
    Store(#[from] StoreError),
}

/// Events per `apply` when replaying.
const REPLAY_CHUNK: usize = 5_000;

/// Opens the spool at `path`, writes what a previous run left in it to
/// `store` in order (chunk by chunk; [`Store::apply`] is idempotent, so
/// events the store already had land once), and empties it.
///
/// # Errors
/// The spool cannot be opened, read or emptied, or the store refused the
/// events (the spool then keeps them for the next try).
pub async fn open_and_replay(
    path: &Path,
    max_bytes: u64,
    store: &dyn Store,
) -> Result<(Spool, Replayed), ReplayError> {
    let (mut spool, replay) = Spool::open(path, max_bytes)?;
    for chunk in replay.events.chunks(REPLAY_CHUNK) {
        store.apply(chunk).await?;
    }
    spool.clear()?;
    Ok((
        spool,
        Replayed {
            events: replay.events.len(),
            discarded_bytes: replay.discarded_bytes,
        },
    ))
}

/// An open, locked spool file.
pub struct Spool {
    path: PathBuf,
    file: nix::fcntl::Flock<File>,
    /// Current length of the file.
    len: u64,
    max_bytes: u64,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

// === impl Spool ===

impl Spool {
    /// Opens (or creates) the spool at `path`, locks it, and reads what it
    /// holds. A torn tail is cut off, so appends continue after the last
    /// intact record.
    ///
    /// # Errors
    /// The file cannot be opened, locked, read or repaired, or is not a
    /// spool.
    pub fn open(path: &Path, max_bytes: u64) -> Result<(Self, Replay), SpoolError> {
        let io = |source| SpoolError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut file =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(SpoolError::Held {
                        path: path.to_owned(),
                    });
                }
                Err((_, e)) => return Err(io(std::io::Error::from(e))),
            };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.is_empty() {
            file.write_all(HEADER).map_err(io)?;
            file.sync_all().map_err(io)?;
            bytes.extend_from_slice(HEADER);
        } else if !bytes.starts_with(HEADER) {
            return Err(SpoolError::NotASpool {
                path: path.to_owned(),
            });
        }
        let (events, intact) = read_records(&bytes[HEADER.len()..]);
        let intact = HEADER.len() as u64 + intact;
        let discarded_bytes = bytes.len() as u64 - intact;
        if discarded_bytes > 0 {
            file.set_len(intact).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let spool = Self {
            path: path.to_owned(),
            file,
            len: intact,
            max_bytes,
        };
        Ok((
            spool,
            Replay {
                events,
                discarded_bytes,
            },
        ))
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Holds no events.
    pub fn is_empty(&self) -> bool {
        self.len <= HEADER.len() as u64
    }

    /// Bytes of events held (without the header).
    pub fn bytes(&self) -> u64 {
        self.len.saturating_sub(HEADER.len() as u64)
    }

    /// Appends `events` as one record and syncs it to disk. Nothing is
    /// written for an empty slice.
    ///
    /// # Errors
    /// The spool would pass its bound, the disk is full, or the write or
    /// sync failed; the file is then cut back to where it was.
    pub fn append(&mut self, events: &[Event]) -> Result<(), SpoolError> {
        if events.is_empty() {
            return Ok(());
        }
        let payload = serde_json::to_vec(events).map_err(|e| SpoolError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let size = u32::try_from(payload.len())
            .ok()
            .filter(|n| *n <= MAX_RECORD);
        let total = RECORD_HEAD + payload.len() as u64;
        let Some(size) = size.filter(|_| self.bytes() + total <= self.max_bytes) else {
            return Err(SpoolError::Full {
                path: self.path.clone(),
                max: self.max_bytes,
            });
        };
        let mut record = Vec::with_capacity(payload.len() + RECORD_HEAD as usize);
        record.extend_from_slice(&size.to_le_bytes());
        record.extend_from_slice(&CRC.checksum(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        let written = self
            .file
            .write_all(&record)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += total;
                Ok(())
            }
            Err(source) => {
                // Best effort: leave the file as it was, whole records only.
                let _ = self.file.set_len(self.len);
                let _ = self.file.seek(SeekFrom::Start(self.len));
                Err(self.error(source))
            }
        }
    }

    /// Every event the spool holds, in order (the file was cut back to
    /// intact records when opened, and only whole records are appended).
    ///
    /// # Errors
    /// Reading failed.
    pub fn read_all(&mut self) -> Result<Vec<Event>, SpoolError> {
        let header = HEADER.len() as u64;
        let mut bytes = Vec::new();
        let read = self
            .file
            .seek(SeekFrom::Start(header))
            .and_then(|_| self.file.read_to_end(&mut bytes))
            .and_then(|_| self.file.seek(SeekFrom::Start(self.len)));
        if let Err(source) = read {
            return Err(self.error(source));
        }
        Ok(read_records(&bytes).0)
    }

    /// Empties the spool: the database has every event it held.
    ///
    /// # Errors
    /// Truncating or syncing failed; the events stay (a replay is
    /// idempotent).
    pub fn clear(&mut self) -> Result<(), SpoolError> {
        if self.is_empty() {
            return Ok(());
        }
        let header = HEADER.len() as u64;
        let cleared = self
            .file
            .set_len(header)
            .and_then(|()| self.file.seek(SeekFrom::Start(header)).map(drop))
            .and_then(|()| self.file.sync_data());
        match cleared {
            Ok(()) => {
                self.len = header;
                Ok(())
            }
            Err(source) => Err(self.error(source)),
        }
    }

    fn error(&self, source: std::io::Error) -> SpoolError {
        if source.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) {
            SpoolError::DiskFull {
                path: self.path.clone(),
            }
        } else {
            SpoolError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }
}

/// The events of the intact records at the start of `bytes`, and how many
/// bytes those records take.
fn read_records(mut bytes: &[u8]) -> (Vec<Event>, u64) {
    let mut events = Vec::new();
    let mut intact = 0u64;
    while bytes.len() >= RECORD_HEAD as usize {
        let size = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let sum = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let end = RECORD_HEAD as usize + size as usize;
        if size > MAX_RECORD || bytes.len() < end {
            break;
        }
        let payload = &bytes[RECORD_HEAD as usize..end];
        if CRC.checksum(payload) != sum {
            break;
        }
        let Ok(batch) = serde_json::from_slice::<Vec<Event>>(payload) else {
            break;
        };
        events.extend(batch);
        intact += end as u64;
        bytes = &bytes[end..];
    }
    (events, intact)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::model::{Outcome, OutcomeKind, Subject};

    fn seen(n: u64) -> Event {
        Event::SubjectSeen {
            subject: Subject::agent(format!("node-{n}")),
            at: UNIX_EPOCH + Duration::from_secs(n),
        }
    }

    fn finished(id: &str) -> Event {
        Event::ActionFinished {
            id: id.into(),
            outcome: Outcome {
                kind: OutcomeKind::Error,
                detail: serde_json::json!({"interrupted": true, "started": true}),
                error: Some("cut short".into()),
            },
            at: UNIX_EPOCH + Duration::from_millis(1_500),
        }
    }

    #[test]
    fn appended_records_are_read_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.spool");
        let (mut spool, replay) = Spool::open(&path, 1 << 20).unwrap();
        assert!(replay.events.is_empty() && spool.is_empty());
        spool.append(&[seen(1), seen(2)]).unwrap();
        spool.append(&[]).unwrap();
        spool.append(&[finished("a")]).unwrap();
        assert!(!spool.is_empty());
        drop(spool);
        let (spool, replay) = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(replay.events, vec![seen(1), seen(2), finished("a")]);
        assert_eq!(replay.discarded_bytes, 0);
        assert!(spool.bytes() > 0);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_continue_after_the_last_intact_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.spool");
        let (mut spool, _) = Spool::open(&path, 1 << 20).unwrap();
        spool.append(&[seen(1)]).unwrap();
        spool.append(&[seen(2)]).unwrap();
        drop(spool);
        // A crash half-way through the second record.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap();
        drop(f);
        let (mut spool, replay) = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(replay.events, vec![seen(1)]);
        assert!(replay.discarded_bytes > 0);
        spool.append(&[seen(3)]).unwrap();
        drop(spool);
        let (_, replay) = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(replay.events, vec![seen(1), seen(3)]);
        assert_eq!(replay.discarded_bytes, 0);
    }

    #[test]
    fn a_corrupt_record_stops_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.spool");
        let (mut spool, _) = Spool::open(&path, 1 << 20).unwrap();
        spool.append(&[seen(1)]).unwrap();
        let first_end = HEADER.len() as u64 + spool.bytes();
        spool.append(&[seen(2)]).unwrap();
        drop(spool);
        let mut bytes = std::fs::read(&path).unwrap();
        let flip = usize::try_from(first_end).unwrap() + RECORD_HEAD as usize + 3;
        bytes[flip] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, replay) = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(replay.events, vec![seen(1)]);
        assert_eq!(
            replay.discarded_bytes,
            bytes.len() as u64 - first_end,
            "everything from the corrupt record on"
        );
    }

    #[test]
    fn clear_empties_it_and_a_full_spool_refuses_without_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.spool");
        let (mut spool, _) = Spool::open(&path, 200).unwrap();
        spool.append(&[seen(1)]).unwrap();
        spool.clear().unwrap();
        assert!(spool.is_empty());
        spool.append(&[seen(2)]).unwrap();
        let many: Vec<Event> = (0..20).map(seen).collect();
        let err = spool.append(&many).unwrap_err();
        assert_eq!(err.kind(), "full");
        assert!(err.to_string().contains("s.spool"), "{err}");
        drop(spool);
        let (_, replay) = Spool::open(&path, 200).unwrap();
        assert_eq!(replay.events, vec![seen(2)]);
    }

    #[test]
    fn a_second_opener_is_refused_and_a_foreign_file_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.spool");
        let (_held, _) = Spool::open(&path, 1 << 20).unwrap();
        let err = Spool::open(&path, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), "held");
        assert!(err.to_string().contains("in use"), "{err}");

        let other = dir.path().join("notes.txt");
        std::fs::write(&other, "keep me").unwrap();
        let err = Spool::open(&other, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), "not_a_spool");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep me");
    }

    #[test]
    fn a_full_disk_is_named() {
        // /dev/full answers every write with ENOSPC.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut spool = Spool {
            path: PathBuf::from("/dev/full"),
            file: nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| e)
                .unwrap(),
            len: HEADER.len() as u64,
            max_bytes: 1 << 20,
        };
        let err = spool.append(&[seen(1)]).unwrap_err();
        assert_eq!(err.kind(), "disk_full", "{err}");
        assert!(err.to_string().contains("disk is full"), "{err}");
    }
}
