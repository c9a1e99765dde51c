//! Checking an audit chain: every record's hash, the links between
//! records, the stored head, and (optionally) the JSON-lines copy.
//!
//! What it detects: a modified record (its hash no longer matches), a
//! removed or reordered record (a gap in `seq` or a `prev_hash` that does
//! not link), a removed tail (the last record is not the stored head), and
//! a JSON-lines file that disagrees with the store.
//!
//! What it cannot detect: someone with write access to the store who
//! rewrites the whole chain from the first altered record on *and* the
//! head. Hashes without a secret only make tampering evident against a
//! copy kept elsewhere: ship the JSON lines off the host (to a SIEM) and
//! compare.

use serde::Serialize;

use super::record::{AuditHead, AuditRecord, GENESIS_HASH};

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// The record's fields do not give its hash: it was modified.
    Modified,
    /// The record cannot be read (corrupt bytes): it was modified.
    Unreadable,
    /// A record is missing before this one (gap in seq, or its
    /// `prev_hash` does not name the previous record): removed or reordered.
    Removed,
    /// The log ends before the stored head: its tail was removed.
    Truncated,
    /// The JSON-lines file and the store disagree on this record.
    FileMismatch,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Whether the chain is intact.
    pub ok: bool,
    /// How many records were checked.
    pub records: u64,
    /// The stored head's seq.
    pub head_seq: u64,
    /// The first bad record's seq (the expected one when it is missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<u64>,
    /// What is wrong with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
    /// A sentence an operator can act on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether a JSON-lines file was compared.
    pub file_checked: bool,
}

impl VerifyReport {
    fn bad(records: u64, head: &AuditHead, seq: u64, problem: Problem, message: String) -> Self {
        Self {
            ok: false,
            records,
            head_seq: head.seq,
            first_bad_seq: Some(seq),
            problem: Some(problem),
            message: Some(message),
            file_checked: false,
        }
    }
}

/// One item read from the store: a record, or the seq of one that could
/// not be decoded and why.
pub type StoredItem = Result<AuditRecord, (u64, String)>;

/// Verifies the store's records (in seq order) against its head.
pub fn verify_chain(
    records: impl IntoIterator<Item = StoredItem>,
    head: &AuditHead,
) -> VerifyReport {
    let mut prev_seq = 0u64;
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut count = 0u64;
    for item in records {
        let r = match item {
            Ok(r) => r,
            Err((seq, reason)) => {
                return VerifyReport::bad(
                    count,
                    head,
                    seq,
                    Problem::Unreadable,
                    format!("record {seq} cannot be read ({reason}): it was modified"),
                );
            }
        };
        let expected = prev_seq + 1;
        if r.seq != expected {
            return VerifyReport::bad(
                count,
                head,
                expected,
                Problem::Removed,
                format!(
                    "record {expected} is missing (the next record is {}): records were removed or reordered",
                    r.seq
                ),
            );
        }
        if r.compute_hash() != r.hash {
            return VerifyReport::bad(
                count,
                head,
                r.seq,
                Problem::Modified,
                format!("record {} does not match its hash: it was modified", r.seq),
            );
        }
        if r.prev_hash != prev_hash {
            return VerifyReport::bad(
                count,
                head,
                r.seq,
                Problem::Removed,
                format!(
                    "record {} does not link to record {prev_seq} (prev_hash differs): a record was removed, replaced or reordered",
                    r.seq
                ),
            );
        }
        prev_seq = r.seq;
        prev_hash = r.hash;
        count += 1;
    }
    if prev_seq != head.seq || prev_hash != head.hash {
        let seq = if prev_seq < head.seq {
            prev_seq + 1
        } else {
            prev_seq
        };
        return VerifyReport::bad(
            count,
            head,
            seq,
            Problem::Truncated,
            format!(
                "the log ends at record {prev_seq} but the stored head is record {}: the tail was removed or the head altered",
                head.seq
            ),
        );
    }
    VerifyReport {
        ok: true,
        records: count,
        head_seq: head.seq,
        first_bad_seq: None,
        problem: None,
        message: None,
        file_checked: false,
    }
}

/// Compares the store's records with the JSON-lines file's lines (records
/// in the file beyond the store's last one are reported too). Call after
/// [`verify_chain`] passed; returns the first disagreement.
pub fn compare_file(
    store: &[AuditRecord],
    lines: impl IntoIterator<Item = String>,
) -> Option<(u64, String)> {
    let mut lines = lines.into_iter().filter(|l| !l.trim().is_empty());
    for r in store {
        let Some(line) = lines.next() else {
            return Some((
                r.seq,
                format!("record {} is in the store but missing from the file", r.seq),
            ));
        };
        match serde_json::from_str::<AuditRecord>(&line) {
            Ok(f) if &f == r => {}
            Ok(f) if f.seq != r.seq => {
                return Some((
                    r.seq,
                    format!(
                        "the file has record {} where the store has record {}",
                        f.seq, r.seq
                    ),
                ));
            }
            Ok(_) => {
                return Some((
                    r.seq,
                    format!("record {} differs between the file and the store", r.seq),
                ));
            }
            Err(e) => {
                return Some((
                    r.seq,
                    format!("the file's line for record {} cannot be read: {e}", r.seq),
                ));
            }
        }
    }
    lines.next().map(|_| {
        let seq = store.last().map_or(1, |r| r.seq + 1);
        (
            seq,
            format!("the file has record {seq} and more, which the store does not have"),
        )
    })
}

/// [`verify_chain`] then, when `file_lines` is given, [`compare_file`].
pub fn verify(
    records: Vec<StoredItem>,
    head: &AuditHead,
    file_lines: Option<Vec<String>>,
) -> VerifyReport {
    let readable: Vec<AuditRecord> = records
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let mut report = verify_chain(records, head);
    if !report.ok {
        return report;
    }
    let Some(lines) = file_lines else {
        return report;
    };
    if let Some((seq, message)) = compare_file(&readable, lines) {
        report = VerifyReport::bad(report.records, head, seq, Problem::FileMismatch, message);
    }
    report.file_checked = true;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Actor, ActorKind, AuditEvent};
    use time::OffsetDateTime;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_owned();
        let t = OffsetDateTime::now_utc();
        (1..=n)
            .map(|seq| {
                let e = AuditEvent::ok(
                    Actor::new(
                        ActorKind::Server,
                        "spiffe://example.org/mayfly/server",
                        "self",
                    ),
                    "x509.issue",
                )
                .detail("serial", format!("{seq:02x}"));
                let r = AuditRecord::new(seq, t, e, prev.clone());
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn run(records: &[AuditRecord], head: &AuditHead) -> VerifyReport {
        verify_chain(records.iter().cloned().map(Ok), head)
    }

    #[test]
    fn an_untouched_chain_passes() {
        let c = chain(5);
        let r = run(&c, &c[4].head());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.records, 5);
        assert!(run(&[], &AuditHead::empty()).ok);
    }

    #[test]
    fn a_modified_field_is_named() {
        let mut c = chain(5);
        c[2].event.details.insert("serial".into(), "ff".into());
        let r = run(&c, &c[4].head());
        assert_eq!(
            (r.ok, r.first_bad_seq, r.problem),
            (false, Some(3), Some(Problem::Modified))
        );
        // Recomputing its hash does not help: the next record no longer links.
        c[2].hash = c[2].compute_hash();
        let r = run(&c, &c[4].head());
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(4), Some(Problem::Removed))
        );
    }

    #[test]
    fn removed_middle_record_and_renumbered_chain() {
        let c = chain(5);
        let mut gap = c.clone();
        gap.remove(2);
        let r = run(&gap, &c[4].head());
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(3), Some(Problem::Removed))
        );
        assert!(r.message.unwrap().contains("record 3 is missing"));
    }

    #[test]
    fn removed_last_record_is_a_truncation() {
        let c = chain(5);
        let r = run(&c[..4], &c[4].head());
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(5), Some(Problem::Truncated))
        );
        // Removing every record is noticed as well.
        let r = run(&[], &c[4].head());
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(1), Some(Problem::Truncated))
        );
    }

    #[test]
    fn reordered_records_are_detected() {
        let c = chain(4);
        let mut swapped = c.clone();
        swapped.swap(1, 2);
        let r = run(&swapped, &c[3].head());
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(2), Some(Problem::Removed))
        );
        // Swapping and renumbering: the links break.
        swapped[1].seq = 2;
        swapped[2].seq = 3;
        let r = run(&swapped, &c[3].head());
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(2));
    }

    #[test]
    fn unreadable_records_are_named() {
        let c = chain(3);
        let items = vec![
            Ok(c[0].clone()),
            Err((2, "bad json".into())),
            Ok(c[2].clone()),
        ];
        let r = verify_chain(items, &c[2].head());
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(2), Some(Problem::Unreadable))
        );
    }

    #[test]
    fn file_divergence_is_detected() {
        let c = chain(3);
        let lines: Vec<String> = c
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        let all: Vec<StoredItem> = c.iter().cloned().map(Ok).collect();
        let r = verify(all.clone(), &c[2].head(), Some(lines.clone()));
        assert!(r.ok && r.file_checked, "{r:?}");

        let mut edited = lines.clone();
        edited[1] = edited[1].replace("x509.issue", "x509.isshe");
        let r = verify(all.clone(), &c[2].head(), Some(edited));
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(2), Some(Problem::FileMismatch))
        );

        let r = verify(all.clone(), &c[2].head(), Some(lines[..2].to_vec()));
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(3), Some(Problem::FileMismatch))
        );

        let mut dropped = lines.clone();
        dropped.remove(0);
        let r = verify(all.clone(), &c[2].head(), Some(dropped));
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(1), Some(Problem::FileMismatch))
        );

        let mut extra = lines;
        extra.push(extra[2].clone());
        let r = verify(all, &c[2].head(), Some(extra));
        assert_eq!(
            (r.first_bad_seq, r.problem),
            (Some(4), Some(Problem::FileMismatch))
        );
    }
}
