//! The server's signing authorities: X.509 CAs and JWT signing keys, each
//! in a slot that moves `prepared → active → old` (see `docs/authorities.md`).
//!
//! - [`AuthorityManager`]: the slots, behind a lock that readers hold only
//!   long enough to clone an `Arc` of the current [`Authorities`], so that
//!   signing never waits for a rotation's file I/O;
//! - `files`: persistence under `<data_dir>/ca/`;
//! - `rotate`: the background task that follows [`Schedule`].
//!
//! When each step happens is decided by the pure [`Schedule`] of the core
//! library; this module only carries it out and keeps it on disk.

pub mod files;
pub mod rotate;

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use mayfly::TrustDomain;
use mayfly::authority::{Lifetime, Phase, Schedule, Step, can_drop_old};
use mayfly::bundle::TrustBundle;
use mayfly::jwt::JwtSigningKey;
use mayfly::x509::{CaParams, X509Authority};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

pub use self::files::{AuthorityError, AuthorityFiles, write_private};
use self::files::{SlotRecord, StateRecord};
use crate::config::ServerConfig;
use crate::error::{ServiceError, ServiceResult};

/// How long an old authority stays in the bundle after its NotAfter, for
/// clock skew between the server and relying parties.
pub const DROP_GRACE: Duration = Duration::seconds(10);

/// The two kinds of authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An X.509 CA (signs X.509-SVIDs).
    X509,
    /// A JWT signing key (signs JWT-SVIDs).
    Jwt,
}

impl Kind {
    /// Both kinds, X.509 first.
    pub const ALL: [Kind; 2] = [Kind::X509, Kind::Jwt];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        })
    }
}

impl FromStr for Kind {
    type Err = ServiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x509" => Ok(Self::X509),
            "jwt" => Ok(Self::Jwt),
            other => Err(ServiceError::InvalidArgument(format!(
                "authority type must be x509 or jwt, not {other:?}"
            ))),
        }
    }
}

/// What callers see of one authority (never its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// X.509 CA or JWT key.
    pub kind: Kind,
    /// X.509: lowercase hex of the SubjectKeyIdentifier (or of the first 20
    /// bytes of SHA-256 of the SubjectPublicKeyInfo); JWT: the `kid`.
    pub id: String,
    /// Where it is in its life.
    pub phase: Phase,
    /// SVIDs it signed must be replaced now.
    pub tainted: bool,
    /// NotBefore (an X.509 CA's is backdated a little for clock skew).
    pub not_before: OffsetDateTime,
    /// NotAfter: nothing it signs outlives it.
    pub not_after: OffsetDateTime,
    /// When the server created it.
    pub issued_at: OffsetDateTime,
}

impl AuthorityInfo {
    /// The life the rotation schedule divides: from creation (not the
    /// backdated NotBefore, which would make a short-lived CA look half
    /// spent when it is new) to NotAfter.
    pub fn lifetime(&self) -> Lifetime {
        Lifetime {
            not_before: self.issued_at,
            not_after: self.not_after,
        }
    }
}

#[derive(Debug, Clone)]
struct X509Slot {
    id: String,
    ca: Arc<X509Authority>,
    phase: Phase,
    tainted: bool,
    issued_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
struct JwtSlot {
    key: Arc<JwtSigningKey>,
    phase: Phase,
    tainted: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// One consistent view of every slot and the bundle sequence. Cheap to
/// clone (keys are shared).
#[derive(Debug, Clone)]
pub struct Authorities {
    trust_domain: TrustDomain,
    refresh_hint: u64,
    x509: Vec<X509Slot>,
    jwt: Vec<JwtSlot>,
    sequence: u64,
}

impl Authorities {
    fn x509_info(s: &X509Slot) -> AuthorityInfo {
        AuthorityInfo {
            kind: Kind::X509,
            id: s.id.clone(),
            phase: s.phase,
            tainted: s.tainted,
            not_before: s.ca.not_before(),
            not_after: s.ca.not_after(),
            issued_at: s.issued_at,
        }
    }

    fn jwt_info(s: &JwtSlot) -> AuthorityInfo {
        AuthorityInfo {
            kind: Kind::Jwt,
            id: s.key.key_id().to_owned(),
            phase: s.phase,
            tainted: s.tainted,
            not_before: s.not_before,
            not_after: s.not_after,
            issued_at: s.not_before,
        }
    }

    /// The active X.509 CA and its id.
    pub fn active_x509(&self) -> Option<(&str, &Arc<X509Authority>)> {
        self.x509
            .iter()
            .find(|s| s.phase == Phase::Active)
            .map(|s| (s.id.as_str(), &s.ca))
    }

    /// Every X.509 authority (prepared, active, old) with its id, oldest
    /// first.
    pub fn x509_authorities(&self) -> impl Iterator<Item = (&str, &Arc<X509Authority>)> {
        self.x509.iter().map(|s| (s.id.as_str(), &s.ca))
    }

    /// The active JWT key and its NotAfter (no JWT-SVID outlives it).
    pub fn active_jwt(&self) -> Option<(&Arc<JwtSigningKey>, OffsetDateTime)> {
        self.jwt
            .iter()
            .find(|s| s.phase == Phase::Active)
            .map(|s| (&s.key, s.not_after))
    }

    /// Every authority of `kind`, oldest first.
    pub fn list(&self, kind: Kind) -> Vec<AuthorityInfo> {
        match kind {
            Kind::X509 => self.x509.iter().map(Self::x509_info).collect(),
            Kind::Jwt => self.jwt.iter().map(Self::jwt_info).collect(),
        }
    }

    /// The authority of `kind` in `phase`, if any (there is at most one
    /// prepared and one active).
    pub fn in_phase(&self, kind: Kind, phase: Phase) -> Option<AuthorityInfo> {
        self.list(kind).into_iter().find(|a| a.phase == phase)
    }

    /// The bundle sequence.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The trust bundle: every authority (prepared, active and old), the
    /// tainted ones also listed as such, and the sequence.
    pub fn bundle(&self) -> TrustBundle {
        let mut b = TrustBundle::new(self.trust_domain.clone());
        for s in &self.x509 {
            b.x509_authorities.push(s.ca.cert_der().to_vec());
            if s.tainted {
                b.tainted_x509_authorities.push(s.ca.cert_der().to_vec());
            }
        }
        for s in &self.jwt {
            match s.key.authority(Some(s.not_after.unix_timestamp())) {
                Ok(a) => b.jwt_authorities.push(a),
                Err(e) => {
                    tracing::error!(kid = s.key.key_id(), error = %e, "cannot publish a JWT key")
                }
            }
            if s.tainted {
                b.tainted_jwt_key_ids.push(s.key.key_id().to_owned());
            }
        }
        b.sequence = self.sequence;
        b.refresh_hint = Some(self.refresh_hint);
        b
    }

    fn record(&self) -> StateRecord {
        StateRecord {
            version: 1,
            x509: self
                .x509
                .iter()
                .map(|s| SlotRecord {
                    id: s.id.clone(),
                    phase: s.phase,
                    tainted: s.tainted,
                    issued_at: Some(s.issued_at.unix_timestamp()),
                    not_before: None,
                    not_after: None,
                })
                .collect(),
            jwt: self
                .jwt
                .iter()
                .map(|s| SlotRecord {
                    id: s.key.key_id().to_owned(),
                    phase: s.phase,
                    tainted: s.tainted,
                    issued_at: None,
                    not_before: Some(s.not_before.unix_timestamp()),
                    not_after: Some(s.not_after.unix_timestamp()),
                })
                .collect(),
        }
    }

    fn phases(&self, kind: Kind) -> Vec<Phase> {
        match kind {
            Kind::X509 => self.x509.iter().map(|s| s.phase).collect(),
            Kind::Jwt => self.jwt.iter().map(|s| s.phase).collect(),
        }
    }

    fn set_phase(&mut self, kind: Kind, index: usize, phase: Phase) {
        match kind {
            Kind::X509 => self.x509[index].phase = phase,
            Kind::Jwt => self.jwt[index].phase = phase,
        }
    }

    fn position(&self, kind: Kind, id: &str) -> Option<usize> {
        match kind {
            Kind::X509 => self.x509.iter().position(|s| s.id == id),
            Kind::Jwt => self.jwt.iter().position(|s| s.key.key_id() == id),
        }
    }

    fn info_at(&self, kind: Kind, index: usize) -> AuthorityInfo {
        match kind {
            Kind::X509 => Self::x509_info(&self.x509[index]),
            Kind::Jwt => Self::jwt_info(&self.jwt[index]),
        }
    }

    fn remove_at(&mut self, kind: Kind, index: usize) {
        match kind {
            Kind::X509 => {
                self.x509.remove(index);
            }
            Kind::Jwt => {
                self.jwt.remove(index);
            }
        }
    }
}

/// The identifier of an X.509 CA: lowercase hex of its
/// SubjectKeyIdentifier, or of SHA-256 of its SubjectPublicKeyInfo
/// truncated to 20 bytes when it has none.
pub fn x509_id(cert_der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| e.to_string())?;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(ki) = ext.parsed_extension()
            && !ki.0.is_empty()
        {
            return Ok(hex::encode(ki.0));
        }
    }
    let digest = Sha256::digest(cert.public_key().raw);
    Ok(hex::encode(&digest[..20]))
}

/// What new authorities are made of.
#[derive(Debug, Clone)]
struct Params {
    trust_domain: TrustDomain,
    ca_subject: String,
    ca_ttl: Duration,
    jwt_key_ttl: Duration,
}

/// The outcome of one pass of the rotation schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Whether any slot changed (the bundle must be republished).
    pub changed: bool,
    /// When the schedule next has something to do.
    pub next_check: OffsetDateTime,
}

/// Every X.509 CA and JWT key of this server, their phases, and the bundle
/// they make. See the module documentation.
#[derive(Debug)]
pub struct AuthorityManager {
    files: AuthorityFiles,
    params: Params,
    schedule: Schedule,
    current: RwLock<Arc<Authorities>>,
    // Serialises changes, so that each starts from the latest state and the
    // state file is written in the same order as memory changes.
    writes: Mutex<()>,
}

fn generate_x509(params: &Params, now: OffsetDateTime) -> Result<X509Slot, AuthorityError> {
    let ca = X509Authority::generate(
        &CaParams {
            trust_domain: params.trust_domain.clone(),
            ttl: params.ca_ttl,
            subject: params.ca_subject.clone(),
        },
        now,
    )
    .map_err(|e| AuthorityError::Generate(e.to_string()))?;
    let id = x509_id(ca.cert_der()).map_err(AuthorityError::Generate)?;
    Ok(X509Slot {
        id,
        ca: Arc::new(ca),
        phase: Phase::Prepared,
        tainted: false,
        issued_at: now.replace_nanosecond(0).unwrap_or(now),
    })
}

fn generate_jwt(params: &Params, now: OffsetDateTime) -> Result<JwtSlot, AuthorityError> {
    let key = JwtSigningKey::generate().map_err(|e| AuthorityError::Generate(e.to_string()))?;
    // JWTs carry whole seconds; so does the state file.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    Ok(JwtSlot {
        key: Arc::new(key),
        phase: Phase::Prepared,
        tainted: false,
        not_before: now,
        not_after: now + params.jwt_key_ttl,
    })
}

fn invalid(path: &std::path::Path, message: String) -> AuthorityError {
    AuthorityError::Invalid {
        path: path.to_owned(),
        message,
    }
}

impl AuthorityManager {
    /// Loads every slot from `<data_dir>/ca/`, migrating the single-CA
    /// layout of earlier versions (its CA and key become the active slots),
    /// or creates an active CA and JWT key on first start. Then catches up
    /// with the schedule: a server that was down past an activation point
    /// prepares and activates at once, and old authorities whose SVIDs
    /// have all expired are dropped.
    pub fn load_or_create(
        config: &ServerConfig,
        now: OffsetDateTime,
    ) -> Result<Self, AuthorityError> {
        let files = AuthorityFiles::open(config.data_dir.join("ca"))?;
        let params = Params {
            trust_domain: config.trust_domain.clone(),
            ca_subject: config.ca_subject.clone(),
            ca_ttl: config.ca_ttl.as_time(),
            jwt_key_ttl: config.jwt_key_ttl.as_time(),
        };
        let refresh_hint = (config.ca_ttl.as_secs() / 12).clamp(1, 300);
        let (x509, jwt) = match files.read_state()? {
            Some(state) => Self::load(&files, &state)?,
            None => Self::migrate_or_create(&files, &params, now)?,
        };
        let manager = Self {
            files,
            params,
            schedule: Schedule::default(),
            current: RwLock::new(Arc::new(Authorities {
                trust_domain: config.trust_domain.clone(),
                refresh_hint,
                x509,
                jwt,
                sequence: 0,
            })),
            writes: Mutex::new(()),
        };
        manager.rotate(now).map_err(|e| {
            AuthorityError::Generate(format!("catching up with the rotation schedule: {e}"))
        })?;
        Ok(manager)
    }

    fn load(
        files: &AuthorityFiles,
        state: &StateRecord,
    ) -> Result<(Vec<X509Slot>, Vec<JwtSlot>), AuthorityError> {
        let path = files.state_path();
        let mut x509 = Vec::new();
        for rec in &state.x509 {
            let ca = files.read_x509(&rec.id)?;
            let id =
                x509_id(ca.cert_der()).map_err(|e| invalid(&files.x509_paths(&rec.id).0, e))?;
            if id != rec.id {
                return Err(invalid(
                    &files.x509_paths(&rec.id).0,
                    format!("holds authority {id}, not {}", rec.id),
                ));
            }
            let issued_at = rec
                .issued_at
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
                .unwrap_or(ca.not_before())
                .clamp(ca.not_before(), ca.not_after());
            x509.push(X509Slot {
                id,
                ca: Arc::new(ca),
                phase: rec.phase,
                tainted: rec.tainted,
                issued_at,
            });
        }
        let mut jwt = Vec::new();
        for rec in &state.jwt {
            let key = files.read_jwt(&rec.id)?;
            let time = |t: Option<i64>, what: &str| {
                t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
                    .ok_or_else(|| invalid(&path, format!("JWT key {}: no valid {what}", rec.id)))
            };
            jwt.push(JwtSlot {
                key: Arc::new(key),
                phase: rec.phase,
                tainted: rec.tainted,
                not_before: time(rec.not_before, "not_before")?,
                not_after: time(rec.not_after, "not_after")?,
            });
        }
        for (kind, phases) in [
            (Kind::X509, x509.iter().map(|s| s.phase).collect::<Vec<_>>()),
            (Kind::Jwt, jwt.iter().map(|s| s.phase).collect()),
        ] {
            for phase in [Phase::Prepared, Phase::Active] {
                if phases.iter().filter(|p| **p == phase).count() > 1 {
                    return Err(invalid(
                        &path,
                        format!("more than one {phase} {kind} authority"),
                    ));
                }
            }
        }
        Ok((x509, jwt))
    }

    fn migrate_or_create(
        files: &AuthorityFiles,
        params: &Params,
        now: OffsetDateTime,
    ) -> Result<(Vec<X509Slot>, Vec<JwtSlot>), AuthorityError> {
        let (legacy_cert, legacy_key, legacy_jwt) = files.legacy_paths();
        let mut migrated = Vec::new();
        let mut x509 = if legacy_cert.exists() && legacy_key.exists() {
            let ca = AuthorityFiles::read_x509_pair(&legacy_cert, &legacy_key)?;
            let id = x509_id(ca.cert_der()).map_err(|e| invalid(&legacy_cert, e))?;
            tracing::info!(authority_id = %id, not_after = %ca.not_after(), "migrated the X.509 CA to the authority slots");
            migrated.extend([legacy_cert, legacy_key]);
            X509Slot {
                id,
                issued_at: ca.not_before(),
                ca: Arc::new(ca),
                phase: Phase::Active,
                tainted: false,
            }
        } else {
            let slot = generate_x509(params, now)?;
            tracing::info!(authority_id = %slot.id, phase = %Phase::Active, not_after = %slot.ca.not_after(), "created X.509 CA");
            slot
        };
        x509.phase = Phase::Active;
        files.write_x509(&x509.id, &x509.ca)?;

        let mut jwt = if legacy_jwt.exists() {
            let key = AuthorityFiles::read_jwt_file(&legacy_jwt)?;
            let now = now.replace_nanosecond(0).unwrap_or(now);
            tracing::info!(
                authority_id = key.key_id(),
                "migrated the JWT signing key to the authority slots"
            );
            migrated.push(legacy_jwt);
            // The old layout did not record when the key was made: it
            // starts a full lifetime now.
            JwtSlot {
                key: Arc::new(key),
                phase: Phase::Active,
                tainted: false,
                not_before: now,
                not_after: now + params.jwt_key_ttl,
            }
        } else {
            let slot = generate_jwt(params, now)?;
            tracing::info!(authority_id = slot.key.key_id(), phase = %Phase::Active, not_after = %slot.not_after, "created JWT signing key");
            slot
        };
        jwt.phase = Phase::Active;
        files.write_jwt(&jwt.key)?;

        let (x509, jwt) = (vec![x509], vec![jwt]);
        let state = Authorities {
            trust_domain: params.trust_domain.clone(),
            refresh_hint: 0,
            x509: x509.clone(),
            jwt: jwt.clone(),
            sequence: 0,
        }
        .record();
        files.write_state(&state)?;
        // Only once the new layout is durable.
        for path in migrated {
            files::remove(&path);
        }
        Ok((x509, jwt))
    }

    /// The current authorities. Never waits for a change in progress
    /// beyond the swap of one pointer.
    pub fn snapshot(&self) -> Arc<Authorities> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sets the bundle sequence (the server keeps it in its store, so that
    /// it never goes back across restarts).
    pub fn set_sequence(&self, sequence: u64) {
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = (*self.snapshot()).clone();
        next.sequence = sequence;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }

    /// Applies `f` to a copy of the current state, persists the result,
    /// deletes the files of slots that left, bumps the sequence and
    /// publishes it. On error nothing changes.
    fn change<R>(&self, f: impl FnOnce(&mut Authorities) -> ServiceResult<R>) -> ServiceResult<R> {
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.snapshot();
        let mut next = (*before).clone();
        let r = f(&mut next)?;
        self.files.write_state(&next.record())?;
        for s in &before.x509 {
            if !next.x509.iter().any(|n| n.id == s.id) {
                self.files.remove_x509(&s.id);
            }
        }
        for s in &before.jwt {
            if !next.jwt.iter().any(|n| n.key.key_id() == s.key.key_id()) {
                self.files.remove_jwt(s.key.key_id());
            }
        }
        next.sequence += 1;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(r)
    }

    /// Creates a prepared authority of `kind` (published, not signing).
    /// `AlreadyExists` when one is already prepared.
    pub fn prepare(&self, kind: Kind, now: OffsetDateTime) -> ServiceResult<AuthorityInfo> {
        self.change(|a| {
            if let Some(p) = a.in_phase(kind, Phase::Prepared) {
                return Err(ServiceError::AlreadyExists(format!(
                    "{kind} authority {} is already prepared; activate it first",
                    p.id
                )));
            }
            match kind {
                Kind::X509 => {
                    let slot = generate_x509(&self.params, now)?;
                    self.files.write_x509(&slot.id, &slot.ca)?;
                    a.x509.push(slot);
                }
                Kind::Jwt => {
                    let slot = generate_jwt(&self.params, now)?;
                    self.files.write_jwt(&slot.key)?;
                    a.jwt.push(slot);
                }
            }
            let info = a.info_at(kind, a.phases(kind).len() - 1);
            tracing::info!(authority_type = %kind, authority_id = %info.id, phase = %info.phase, not_after = %info.not_after, "authority prepared");
            Ok(info)
        })
    }

    /// Makes the prepared authority of `kind` active; the active one
    /// becomes old. `FailedPrecondition` when none is prepared.
    pub fn activate(&self, kind: Kind) -> ServiceResult<AuthorityInfo> {
        self.change(|a| {
            let phases = a.phases(kind);
            let Some(prepared) = phases.iter().position(|p| *p == Phase::Prepared) else {
                return Err(ServiceError::FailedPrecondition(format!(
                    "no {kind} authority is prepared; prepare one first"
                )));
            };
            if let Some(active) = phases.iter().position(|p| *p == Phase::Active) {
                a.set_phase(kind, active, Phase::Old);
                let old = a.info_at(kind, active);
                tracing::info!(authority_type = %kind, authority_id = %old.id, phase = %old.phase, not_after = %old.not_after, "authority retired");
            }
            a.set_phase(kind, prepared, Phase::Active);
            let info = a.info_at(kind, prepared);
            tracing::info!(authority_type = %kind, authority_id = %info.id, phase = %info.phase, not_after = %info.not_after, "authority activated");
            Ok(info)
        })
    }

    fn find(a: &Authorities, kind: Kind, id: &str) -> ServiceResult<usize> {
        a.position(kind, id)
            .ok_or_else(|| ServiceError::NotFound(format!("no {kind} authority {id:?}")))
    }

    /// Taints an old authority: agents replace every SVID it signed at
    /// once. `FailedPrecondition` unless it is old (the active one signs;
    /// a prepared one has signed nothing); `NotFound` for an unknown id.
    pub fn taint(&self, kind: Kind, id: &str) -> ServiceResult<AuthorityInfo> {
        self.change(|a| {
            let i = Self::find(a, kind, id)?;
            let info = a.info_at(kind, i);
            if info.phase != Phase::Old {
                return Err(ServiceError::FailedPrecondition(format!(
                    "{kind} authority {id} is {}; only an old authority can be tainted (activate a successor first)",
                    info.phase
                )));
            }
            match kind {
                Kind::X509 => a.x509[i].tainted = true,
                Kind::Jwt => a.jwt[i].tainted = true,
            }
            let info = a.info_at(kind, i);
            tracing::info!(authority_type = %kind, authority_id = %id, phase = %info.phase, tainted = true, "authority tainted");
            Ok(info)
        })
    }

    /// Removes a tainted authority from the bundle and deletes its key:
    /// what it signed stops verifying. `FailedPrecondition` unless it is
    /// tainted; `NotFound` for an unknown id. Returns it as it was.
    pub fn revoke(&self, kind: Kind, id: &str) -> ServiceResult<AuthorityInfo> {
        self.change(|a| {
            let i = Self::find(a, kind, id)?;
            let info = a.info_at(kind, i);
            if !info.tainted {
                return Err(ServiceError::FailedPrecondition(format!(
                    "{kind} authority {id} is not tainted; taint it first"
                )));
            }
            a.remove_at(kind, i);
            tracing::info!(authority_type = %kind, authority_id = %id, phase = %info.phase, "authority revoked and removed from the bundle");
            Ok(info)
        })
    }

    /// Drops an old authority whose SVIDs have all expired.
    fn drop_old(&self, kind: Kind, id: &str, now: OffsetDateTime) -> ServiceResult<bool> {
        self.change(|a| {
            let i = Self::find(a, kind, id)?;
            let info = a.info_at(kind, i);
            if info.phase != Phase::Old || !can_drop_old(info.lifetime(), now, DROP_GRACE) {
                return Ok(false);
            }
            a.remove_at(kind, i);
            tracing::info!(authority_type = %kind, authority_id = %id, phase = %info.phase, not_after = %info.not_after, "old authority expired and left the bundle");
            Ok(true)
        })
    }

    /// One pass of the schedule at `now`, for both kinds independently:
    /// prepare, activate (catching up at once after downtime), drop old
    /// authorities whose SVIDs have all expired. Returns whether anything
    /// changed and when to look again.
    pub fn rotate(&self, now: OffsetDateTime) -> ServiceResult<Rotation> {
        let mut changed = false;
        let mut next_check = now + Duration::days(1);
        for kind in Kind::ALL {
            // At most prepare then activate; the bound guards against a
            // schedule that would never wait.
            for _ in 0..3 {
                let a = self.snapshot();
                let active = a.in_phase(kind, Phase::Active).map(|i| i.lifetime());
                let prepared = a.in_phase(kind, Phase::Prepared).is_some();
                match self.schedule.next_step(active, prepared, now) {
                    Step::Prepare => {
                        self.prepare(kind, now)?;
                        changed = true;
                    }
                    Step::Activate => {
                        self.activate(kind)?;
                        changed = true;
                    }
                    Step::Wait(at) => {
                        next_check = next_check.min(at);
                        break;
                    }
                }
            }
            for old in self
                .snapshot()
                .list(kind)
                .into_iter()
                .filter(|a| a.phase == Phase::Old)
            {
                if can_drop_old(old.lifetime(), now, DROP_GRACE) {
                    changed |= self.drop_old(kind, &old.id, now)?;
                } else {
                    next_check = next_check.min(old.not_after + DROP_GRACE);
                }
            }
        }
        Ok(Rotation {
            changed,
            next_check,
        })
    }
}

#[cfg(test)]
mod tests;
