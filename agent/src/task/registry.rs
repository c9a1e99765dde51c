//! The tasks the agent has seen and what it issued to each.
//!
//! Held in the agent's [`Snapshot`](crate::cache::Snapshot), so that a task's credentials are
//! published (and withdrawn) through the same watch channel as everything else: a stream of an
//! ended task sees the change at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mayfly::entry::EntryId;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::queue::TaskEnd;
use super::{EndReason, TaskId};
use crate::cache::{CachedSvid, svid_serial};
use crate::revocation::Revocations;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Running; gets credentials.
    Live,
    /// Said it is done (`Task/Complete`) but its process still runs: refused from now on.
    Completed,
}

/// A JWT-SVID issued to a task, kept for reuse by that task only.
#[derive(Clone)]
pub struct TaskJwt {
    /// The compact token (a bearer credential: zeroized, never logged).
    pub token: Arc<Zeroizing<String>>,
    /// Its `jti`.
    pub jti: String,
    /// Reused until then (Unix seconds): half its lifetime.
    pub reuse_until: i64,
}

impl std::fmt::Debug for TaskJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskJwt")
            .field("jti", &self.jti)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The credentials issued to one live task, as kept on disk across agent restarts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    /// The task.
    pub task_id: String,
    /// Serials (hex) of its X.509-SVIDs.
    pub x509_serials: Vec<String>,
    /// `jti`s of its JWT-SVIDs.
    pub jwt_ids: Vec<String>,
}

/// One task.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    /// Its state.
    pub state: TaskState,
    /// Its X.509-SVIDs, by entry (task-scoped entries only).
    pub svids: BTreeMap<EntryId, Arc<CachedSvid>>,
    /// Serials (hex) of every X.509-SVID issued to it that has not been reported yet.
    pub x509_serials: BTreeSet<String>,
    /// Its JWT-SVIDs, by entry and (sorted) audience.
    pub jwts: BTreeMap<(EntryId, Vec<String>), TaskJwt>,
    /// `jti`s of every JWT-SVID issued to it.
    pub jwt_ids: BTreeSet<String>,
}

impl TaskRecord {
    fn new() -> Self {
        Self {
            state: TaskState::Live,
            svids: BTreeMap::new(),
            x509_serials: BTreeSet::new(),
            jwts: BTreeMap::new(),
            jwt_ids: BTreeSet::new(),
        }
    }
}

/// The tasks seen, their credentials and their state.
#[derive(Debug, Clone, Default)]
pub struct TaskRegistry {
    tasks: BTreeMap<TaskId, TaskRecord>,
}

fn jwt_key(entry: &EntryId, audience: &[String]) -> (EntryId, Vec<String>) {
    let aud: BTreeSet<&String> = audience.iter().collect();
    (entry.clone(), aud.into_iter().cloned().collect())
}

impl TaskRegistry {
    /// Records `task` as live if it is new; returns whether it was new (then it must be
    /// watched).
    pub fn observe(&mut self, task: &TaskId) -> bool {
        if self.tasks.contains_key(task) {
            return false;
        }
        self.tasks.insert(task.clone(), TaskRecord::new());
        true
    }

    /// The state of `task`, if it is known.
    pub fn state(&self, task: &TaskId) -> Option<TaskState> {
        self.tasks.get(task).map(|r| r.state)
    }

    /// The record of `task`.
    pub fn get(&self, task: &TaskId) -> Option<&TaskRecord> {
        self.tasks.get(task)
    }

    /// How many tasks are known.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is known.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The X.509-SVID of `task` for `entry`.
    pub fn svid(&self, task: &TaskId, entry: &EntryId) -> Option<&Arc<CachedSvid>> {
        self.tasks.get(task)?.svids.get(entry)
    }

    /// Every live task's SVIDs.
    pub fn svids(&self) -> impl Iterator<Item = (&TaskId, &EntryId, &Arc<CachedSvid>)> {
        self.tasks
            .iter()
            .flat_map(|(t, r)| r.svids.iter().map(move |(e, s)| (t, e, s)))
    }

    /// Keeps `svid` for a live `task` (replacing an older one for the same entry) and records
    /// its serial. Returns false (and keeps nothing) when the task is not live.
    pub fn insert_svid(&mut self, task: &TaskId, svid: Arc<CachedSvid>) -> bool {
        let Some(r) = self
            .tasks
            .get_mut(task)
            .filter(|r| r.state == TaskState::Live)
        else {
            return false;
        };
        if let Some(serial) = svid_serial(&svid) {
            r.x509_serials.insert(serial);
        }
        r.svids.insert(svid.entry_id.clone(), svid);
        true
    }

    /// A JWT-SVID of `task` for `entry` and `audience` still reusable at `now` (Unix seconds).
    pub fn jwt(
        &self,
        task: &TaskId,
        entry: &EntryId,
        audience: &[String],
        now: i64,
    ) -> Option<Arc<Zeroizing<String>>> {
        let r = self.tasks.get(task)?;
        let held = r.jwts.get(&jwt_key(entry, audience))?;
        (now < held.reuse_until).then(|| Arc::clone(&held.token))
    }

    /// Records a JWT-SVID minted for a live `task` (its `jti` is reported when the task ends).
    /// Returns false when the task is not live.
    pub fn insert_jwt(
        &mut self,
        task: &TaskId,
        entry: &EntryId,
        audience: &[String],
        jwt: TaskJwt,
    ) -> bool {
        let Some(r) = self
            .tasks
            .get_mut(task)
            .filter(|r| r.state == TaskState::Live)
        else {
            return false;
        };
        if !jwt.jti.is_empty() {
            r.jwt_ids.insert(jwt.jti.clone());
        }
        r.jwts.insert(jwt_key(entry, audience), jwt);
        true
    }

    /// Ends `task`: its credentials are dropped and returned as a [`TaskEnd`] to report (`None`
    /// when there is nothing new to report). An exited task is forgotten; a completed one is
    /// kept as [`TaskState::Completed`] so that its process is refused until it exits.
    pub fn end(
        &mut self,
        task: &TaskId,
        reason: EndReason,
        now: OffsetDateTime,
    ) -> Option<TaskEnd> {
        let record = match reason {
            EndReason::Ended => self.tasks.remove(task)?,
            EndReason::Completed => {
                let r = self
                    .tasks
                    .entry(task.clone())
                    .or_insert_with(TaskRecord::new);
                let mut taken = TaskRecord::new();
                taken.state = r.state;
                std::mem::swap(&mut taken.x509_serials, &mut r.x509_serials);
                std::mem::swap(&mut taken.jwt_ids, &mut r.jwt_ids);
                r.svids.clear();
                r.jwts.clear();
                r.state = TaskState::Completed;
                taken
            }
        };
        if record.state == TaskState::Completed && reason == EndReason::Ended {
            // Already reported when it completed.
            return None;
        }
        Some(TaskEnd {
            task_id: task.to_string(),
            x509_serials: record.x509_serials.into_iter().collect(),
            jwt_ids: record.jwt_ids.into_iter().collect(),
            reason: reason.as_str().to_owned(),
            ended_at: now.unix_timestamp(),
        })
    }

    /// What every live task was issued, for [`super::persist`]: tasks without credentials are
    /// left out.
    pub fn issued(&self) -> Vec<Issued> {
        self.tasks
            .iter()
            .filter(|(_, r)| r.state == TaskState::Live)
            .filter(|(_, r)| !r.x509_serials.is_empty() || !r.jwt_ids.is_empty())
            .map(|(t, r)| Issued {
                task_id: t.to_string(),
                x509_serials: r.x509_serials.iter().cloned().collect(),
                jwt_ids: r.jwt_ids.iter().cloned().collect(),
            })
            .collect()
    }

    /// Records what an earlier run issued to `task` (which must still be live), so that it is
    /// revoked when the task ends. Returns whether the task was new.
    pub fn restore(&mut self, task: &TaskId, issued: &Issued) -> bool {
        let new = self.observe(task);
        if let Some(r) = self
            .tasks
            .get_mut(task)
            .filter(|r| r.state == TaskState::Live)
        {
            r.x509_serials.extend(issued.x509_serials.iter().cloned());
            r.jwt_ids.extend(issued.jwt_ids.iter().cloned());
        }
        new
    }

    /// Drops the SVIDs of entries that are no longer authorized (`keep` is false for them).
    pub fn retain_entries(&mut self, keep: impl Fn(&EntryId) -> bool) {
        for r in self.tasks.values_mut() {
            r.svids.retain(|e, _| keep(e));
            r.jwts.retain(|(e, _), _| keep(e));
        }
    }

    /// Drops every credential that `revoked` lists, or that has expired at `now`. Returns how
    /// many were dropped.
    pub fn drop_revoked(&mut self, revoked: &Revocations, now: OffsetDateTime) -> usize {
        let mut dropped = 0;
        for r in self.tasks.values_mut() {
            let before = r.svids.len() + r.jwts.len();
            r.svids.retain(|_, s| {
                s.expires_at > now && !svid_serial(s).is_some_and(|x| revoked.serial(&x))
            });
            r.jwts.retain(|_, j| !revoked.jti(&j.jti));
            dropped += before - (r.svids.len() + r.jwts.len());
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::test_svid;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn jwt(jti: &str) -> TaskJwt {
        TaskJwt {
            token: Arc::new(Zeroizing::new(format!("token-{jti}"))),
            jti: jti.into(),
            reuse_until: i64::MAX,
        }
    }

    #[test]
    fn bookkeeping_of_credentials_and_ends() {
        let mut reg = TaskRegistry::default();
        let (a, b) = (TaskId::unix(10, 1), TaskId::unix(11, 1));
        assert!(reg.observe(&a));
        assert!(!reg.observe(&a), "seen once");
        assert!(reg.observe(&b));
        let (sa, serial_a) = test_svid("e");
        let (sb, serial_b) = test_svid("e");
        assert!(reg.insert_svid(&a, sa));
        assert!(reg.insert_svid(&b, sb));
        let e: EntryId = "e".parse().unwrap();
        let aud = vec!["x".to_owned(), "y".to_owned()];
        assert!(reg.insert_jwt(&a, &e, &aud, jwt("j-a")));
        // Another task never gets a's token; audience order does not matter.
        assert!(reg.jwt(&b, &e, &aud, 0).is_none());
        assert!(
            reg.jwt(&a, &e, &["y".into(), "x".into()], 0).is_some(),
            "same audiences"
        );
        assert_ne!(
            reg.svid(&a, &e).unwrap().chain_der,
            reg.svid(&b, &e).unwrap().chain_der
        );

        // a exits: its credentials only.
        let end = reg.end(&a, EndReason::Ended, t0()).unwrap();
        assert_eq!(end.task_id, "unix:10:1");
        assert_eq!(end.x509_serials, vec![serial_a]);
        assert_eq!(end.jwt_ids, vec!["j-a".to_owned()]);
        assert_eq!(end.reason, "task_ended");
        assert!(reg.state(&a).is_none(), "an exited task is forgotten");
        assert!(reg.end(&a, EndReason::Ended, t0()).is_none(), "once");

        // b completes: refused afterwards, nothing more issued, reported once.
        let end = reg.end(&b, EndReason::Completed, t0()).unwrap();
        assert_eq!(end.x509_serials, vec![serial_b]);
        assert_eq!(end.reason, "task_completed");
        assert_eq!(reg.state(&b), Some(TaskState::Completed));
        assert!(reg.svid(&b, &e).is_none());
        let (again, _) = test_svid("e");
        assert!(!reg.insert_svid(&b, again), "a completed task gets nothing");
        assert!(
            reg.end(&b, EndReason::Ended, t0()).is_none(),
            "its exit is not reported again"
        );
        assert!(reg.is_empty());
    }

    #[test]
    fn issued_credentials_round_trip_through_restore() {
        let mut reg = TaskRegistry::default();
        let (a, b) = (TaskId::unix(10, 1), TaskId::unix(11, 1));
        reg.observe(&a);
        reg.observe(&b);
        let (s, serial) = test_svid("e");
        reg.insert_svid(&a, s);
        // b holds nothing: not listed.
        let issued = reg.issued();
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].task_id, "unix:10:1");
        assert_eq!(issued[0].x509_serials, vec![serial.clone()]);

        // A new run takes it back, merged with what it issues itself.
        let mut next = TaskRegistry::default();
        assert!(next.restore(&a, &issued[0]));
        let (s2, serial2) = test_svid("e");
        next.insert_svid(&a, s2);
        let end = next.end(&a, EndReason::Completed, t0()).unwrap();
        let mut want = vec![serial, serial2];
        want.sort();
        assert_eq!(end.x509_serials, want);
        // A completed task is not listed as live.
        assert!(next.issued().is_empty());
    }

    #[test]
    fn revoked_and_removed_credentials_are_dropped() {
        let mut reg = TaskRegistry::default();
        let a = TaskId::unix(10, 1);
        reg.observe(&a);
        let (s, serial) = test_svid("e");
        reg.insert_svid(&a, s);
        let e: EntryId = "e".parse().unwrap();
        reg.insert_jwt(&a, &e, &["x".into()], jwt("j1"));
        let mut rev = Revocations::default();
        assert_eq!(reg.drop_revoked(&rev, t0()), 0);
        rev.add_serial(serial.clone(), i64::MAX);
        rev.add_jti("j1".into(), i64::MAX);
        assert_eq!(reg.drop_revoked(&rev, t0()), 2);
        assert!(reg.svid(&a, &e).is_none());
        // The serial is still reported when the task ends.
        let end = reg.end(&a, EndReason::Ended, t0()).unwrap();
        assert_eq!(end.x509_serials, vec![serial]);

        reg.observe(&a);
        let (s, _) = test_svid("e");
        reg.insert_svid(&a, s);
        reg.retain_entries(|id| id.as_str() != "e");
        assert!(reg.svid(&a, &e).is_none());
    }
}
