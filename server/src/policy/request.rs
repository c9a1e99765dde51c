//! Typed policy inputs and their Cedar form (entities and context).
//!
//! Building these is on the path of every issuance, so it stays cheap:
//! a handful of entities with flat attributes, no schema checks (the
//! policies were validated against the schema at load time, and the
//! entities built here follow it by construction; a unit test checks it).

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex, PoisonError};

use cedar_policy::{
    Context, ContextCreationError, Entity, EntityId, EntityTypeName, EntityUid,
    RestrictedExpression,
};
use mayfly::entry::{Assurance, Entry, Scope};
use mayfly::selector::SelectorSet;
use time::OffsetDateTime;

use crate::admin::caller::AdminCaller;
use crate::store::NodeRecord;

/// A policy action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A node attests (`attest_node`).
    AttestNode,
    /// An agent renews its SVID (`renew_agent`).
    RenewAgent,
    /// An X.509-SVID for a workload (`issue_x509`).
    IssueX509,
    /// A JWT-SVID for a workload (`issue_jwt`).
    IssueJwt,
    /// An admin API operation (e.g. `entry.delete`), member of the action
    /// group `admin`.
    Admin(String),
}

impl Action {
    /// The action's name in policies (`Mayfly::Action::"<name>"`).
    pub fn name(&self) -> &str {
        match self {
            Self::AttestNode => "attest_node",
            Self::RenewAgent => "renew_agent",
            Self::IssueX509 => "issue_x509",
            Self::IssueJwt => "issue_jwt",
            Self::Admin(op) => op,
        }
    }

    /// The action named `name` (one of the four above, else an admin
    /// operation; the engine checks that the schema knows it).
    pub fn from_name(name: &str) -> Self {
        match name {
            "attest_node" => Self::AttestNode,
            "renew_agent" => Self::RenewAgent,
            "issue_x509" => Self::IssueX509,
            "issue_jwt" => Self::IssueJwt,
            op => Self::Admin(op.to_owned()),
        }
    }
}

/// An SVID issuance for a workload of an agent.
#[derive(Debug, Clone, Copy)]
pub struct Issue<'a> {
    /// The calling agent.
    pub node: &'a NodeRecord,
    /// The entry the SVID is for (already authorized by registration).
    pub entry: &'a Entry,
    /// The task asking; empty for shared entries.
    pub task_id: &'a str,
    /// JWT audience (empty for X.509).
    pub audience: &'a [String],
    /// The lifetime the SVID would get, seconds.
    pub requested_ttl: u64,
    /// JWT-SVID rather than X.509-SVID.
    pub jwt: bool,
}

/// An admin API request.
#[derive(Debug, Clone, Copy)]
pub struct AdminCall<'a> {
    /// The authenticated caller.
    pub caller: &'a AdminCaller,
    /// The operation (e.g. `entry.delete`).
    pub operation: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Route template (e.g. `/v1/entries/{id}`).
    pub route: &'a str,
    /// The request path.
    pub path: &'a str,
}

/// What policy is asked to decide.
#[derive(Debug, Clone, Copy)]
pub enum PolicyRequest<'a> {
    /// A node attestation (`attest_node`); the record about to be stored.
    Attest(&'a NodeRecord),
    /// An agent SVID renewal (`renew_agent`).
    Renew(&'a NodeRecord),
    /// An SVID issuance (`issue_x509` / `issue_jwt`).
    Issue(Issue<'a>),
    /// An admin operation.
    Admin(AdminCall<'a>),
}

impl PolicyRequest<'_> {
    /// The action decided.
    pub fn action(&self) -> Action {
        match self {
            Self::Attest(_) => Action::AttestNode,
            Self::Renew(_) => Action::RenewAgent,
            Self::Issue(i) if i.jwt => Action::IssueJwt,
            Self::Issue(_) => Action::IssueX509,
            Self::Admin(a) => Action::Admin(a.operation.to_owned()),
        }
    }
}

/// The Cedar form of a request (action excepted).
#[derive(Debug)]
pub struct CedarInput {
    /// The principal.
    pub principal: EntityUid,
    /// The resource.
    pub resource: EntityUid,
    /// Principal, resource and related entities.
    pub entities: Vec<Entity>,
    /// The context.
    pub context: Context,
}

struct Types {
    node: EntityTypeName,
    workload: EntityTypeName,
    operator: EntityTypeName,
    entry: EntityTypeName,
    api: EntityTypeName,
}

fn type_name(name: &str) -> EntityTypeName {
    match format!("{}::{name}", super::schema::NAMESPACE).parse() {
        Ok(t) => t,
        // The names above are constants and valid; covered by unit tests.
        Err(e) => unreachable!("invalid entity type name {name}: {e}"),
    }
}

static TYPES: LazyLock<Types> = LazyLock::new(|| Types {
    node: type_name("Node"),
    workload: type_name("Workload"),
    operator: type_name("Operator"),
    entry: type_name("Entry"),
    api: type_name("Api"),
});

fn uid(t: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id))
}

fn string(s: impl Into<String>) -> RestrictedExpression {
    RestrictedExpression::new_string(s.into())
}

fn long(v: i64) -> RestrictedExpression {
    RestrictedExpression::new_long(v)
}

fn secs(v: u64) -> RestrictedExpression {
    long(i64::try_from(v).unwrap_or(i64::MAX))
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> RestrictedExpression {
    RestrictedExpression::new_set(items.into_iter().map(string))
}

/// The number policies see for an assurance level: 1 low, 2 medium, 3 high.
pub fn assurance_level(a: Assurance) -> i64 {
    match a {
        Assurance::Low => 1,
        Assurance::Medium => 2,
        Assurance::High => 3,
    }
}

/// Seconds since the node's last full attestation (0 if in the future).
pub fn attestation_age(node: &NodeRecord, now: OffsetDateTime) -> i64 {
    (now - node.attested_at).whole_seconds().max(0)
}

/// The most cached entities of each kind; past it the cache starts over.
const CACHE_LIMIT: usize = 100_000;

/// Everything a node entity is built from: equal keys give equal entities.
#[derive(Debug, PartialEq, Eq)]
struct NodeKey {
    attestor: String,
    assurance: Assurance,
    selectors: SelectorSet,
    attested_at: i64,
    age: i64,
    banned: bool,
    can_reattest: bool,
}

impl NodeKey {
    fn of(node: &NodeRecord, now: OffsetDateTime) -> Self {
        Self {
            attestor: node.attestor.clone(),
            assurance: node.assurance,
            selectors: node.selectors.clone(),
            attested_at: node.attested_at.unix_timestamp(),
            age: attestation_age(node, now),
            banned: node.banned,
            can_reattest: node.can_reattest,
        }
    }
}

/// What varies in an issuance context within one second: requested TTL,
/// audience, attestation age.
type ContextKey = (u64, Vec<String>, i64);

/// Cedar entities already built, so that the issuance path does not
/// rebuild them on every request: entries by (id, revision) (an entry's
/// revision changes with every change), nodes by SPIFFE ID with every
/// attribute they were built from (the attestation age changes every
/// second, so a node entity is reused within the same second).
#[derive(Debug, Default)]
pub struct EntityCache {
    nodes: Mutex<HashMap<String, (NodeKey, Entity)>>,
    entries: Mutex<HashMap<(String, u64), Entity>>,
    // Issuance contexts of the current second, by (requested TTL,
    // audience, attestation age); emptied when the second changes.
    contexts: Mutex<(i64, HashMap<ContextKey, Context>)>,
}

impl EntityCache {
    fn node(
        &self,
        node: &NodeRecord,
        now: OffsetDateTime,
    ) -> Result<(EntityUid, Entity), RequestError> {
        let key = NodeKey::of(node, now);
        let id = node.spiffe_id.to_string();
        {
            let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((k, e)) = nodes.get(&id)
                && *k == key
            {
                return Ok((e.uid(), e.clone()));
            }
        }
        let (uid, e) = node_entity(node, now)?;
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if nodes.len() >= CACHE_LIMIT {
            nodes.clear();
        }
        nodes.insert(id, (key, e.clone()));
        Ok((uid, e))
    }

    fn issue_context(
        &self,
        now: OffsetDateTime,
        requested_ttl: u64,
        audience: &[String],
        attestation_age: i64,
    ) -> Result<Context, RequestError> {
        let second = now.unix_timestamp();
        let key = (requested_ttl, audience.to_vec(), attestation_age);
        {
            let cached = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0 == second
                && let Some(c) = cached.1.get(&key)
            {
                return Ok(c.clone());
            }
        }
        let c = context(
            now,
            ContextValues {
                requested_ttl,
                audience,
                renewal: false,
                attestation_age,
            },
        )?;
        let mut cached = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.0 != second || cached.1.len() >= CACHE_LIMIT {
            *cached = (second, HashMap::new());
        }
        cached.1.insert(key, c.clone());
        Ok(c)
    }

    fn entry(&self, entry: &Entry) -> Result<(EntityUid, Entity), RequestError> {
        // Revision 0 is an entry that was never stored (a dry run).
        if entry.revision == 0 {
            return entry_entity(entry);
        }
        let key = (entry.id.as_str().to_owned(), entry.revision);
        if let Some(e) = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok((e.uid(), e.clone()));
        }
        let (uid, e) = entry_entity(entry)?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CACHE_LIMIT {
            entries.clear();
        }
        entries.insert(key, e.clone());
        Ok((uid, e))
    }
}

/// Errors building a request (attribute values out of Cedar's range).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// An entity attribute could not be converted.
    #[error("policy entity {0}: {1}")]
    Entity(String, String),
    /// The context could not be built.
    #[error("policy context: {0}")]
    Context(String),
}

fn entity(
    uid: EntityUid,
    attrs: Vec<(&str, RestrictedExpression)>,
    parents: HashSet<EntityUid>,
) -> Result<Entity, RequestError> {
    let attrs = attrs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Entity::new(uid.clone(), attrs, parents)
        .map_err(|e| RequestError::Entity(uid.to_string(), e.to_string()))
}

fn node_entity(
    node: &NodeRecord,
    now: OffsetDateTime,
) -> Result<(EntityUid, Entity), RequestError> {
    let id = uid(&TYPES.node, &node.spiffe_id.to_string());
    let selectors: Vec<String> = node.selectors.iter().map(ToString::to_string).collect();
    let e = entity(
        id.clone(),
        vec![
            ("spiffe_id", string(node.spiffe_id.to_string())),
            ("attestor", string(node.attestor.as_str())),
            ("assurance", long(assurance_level(node.assurance))),
            ("selectors", strings(selectors.iter().map(String::as_str))),
            ("attested_at", long(node.attested_at.unix_timestamp())),
            ("attestation_age", long(attestation_age(node, now))),
            ("banned", RestrictedExpression::new_bool(node.banned)),
            (
                "can_reattest",
                RestrictedExpression::new_bool(node.can_reattest),
            ),
        ],
        HashSet::new(),
    )?;
    Ok((id, e))
}

fn entry_entity(entry: &Entry) -> Result<(EntityUid, Entity), RequestError> {
    let id = uid(&TYPES.entry, entry.id.as_str());
    let selectors: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
    let e = entity(
        id.clone(),
        vec![
            ("spiffe_id", string(entry.spiffe_id.to_string())),
            ("parent_id", string(entry.parent_id.to_string())),
            ("selectors", strings(selectors.iter().map(String::as_str))),
            (
                "min_assurance",
                long(entry.min_assurance.map_or(0, assurance_level)),
            ),
            (
                "max_attestation_age",
                secs(entry.max_attestation_age.map_or(0, |t| t.as_secs())),
            ),
            ("admin", RestrictedExpression::new_bool(entry.admin)),
            (
                "downstream",
                RestrictedExpression::new_bool(entry.downstream),
            ),
            (
                "scope",
                string(match entry.scope {
                    Scope::Shared => "shared",
                    _ => "task",
                }),
            ),
            (
                "x509_svid_ttl",
                secs(entry.x509_svid_ttl.map_or(0, |t| t.as_secs())),
            ),
            (
                "jwt_svid_ttl",
                secs(entry.jwt_svid_ttl.map_or(0, |t| t.as_secs())),
            ),
        ],
        HashSet::new(),
    )?;
    Ok((id, e))
}

struct ContextValues<'a> {
    requested_ttl: u64,
    audience: &'a [String],
    renewal: bool,
    attestation_age: i64,
}

fn context(now: OffsetDateTime, v: ContextValues<'_>) -> Result<Context, RequestError> {
    let utc = now.to_offset(time::UtcOffset::UTC);
    Context::from_pairs([
        ("now".to_owned(), long(utc.unix_timestamp())),
        ("hour".to_owned(), long(i64::from(utc.hour()))),
        (
            "weekday".to_owned(),
            long(i64::from(utc.weekday().number_from_monday())),
        ),
        ("requested_ttl".to_owned(), secs(v.requested_ttl)),
        (
            "audience".to_owned(),
            strings(v.audience.iter().map(String::as_str)),
        ),
        (
            "renewal".to_owned(),
            RestrictedExpression::new_bool(v.renewal),
        ),
        ("attestation_age".to_owned(), long(v.attestation_age)),
    ])
    .map_err(|e: ContextCreationError| RequestError::Context(e.to_string()))
}

/// Builds the Cedar principal, resource, entities and context of `req` at
/// `now`.
pub fn to_cedar(req: &PolicyRequest<'_>, now: OffsetDateTime) -> Result<CedarInput, RequestError> {
    to_cedar_cached(req, now, None)
}

/// [`to_cedar`], reusing (and filling) `cache` for node and entry entities.
pub fn to_cedar_cached(
    req: &PolicyRequest<'_>,
    now: OffsetDateTime,
    cache: Option<&EntityCache>,
) -> Result<CedarInput, RequestError> {
    match req {
        PolicyRequest::Attest(node) | PolicyRequest::Renew(node) => {
            let renewal = matches!(req, PolicyRequest::Renew(_));
            let (id, e) = node_entity(node, now)?;
            Ok(CedarInput {
                principal: id.clone(),
                resource: id,
                entities: vec![e],
                context: context(
                    now,
                    ContextValues {
                        requested_ttl: 0,
                        audience: &[],
                        renewal,
                        attestation_age: if renewal {
                            attestation_age(node, now)
                        } else {
                            0
                        },
                    },
                )?,
            })
        }
        PolicyRequest::Issue(i) => {
            let (node_id, node) = match cache {
                Some(c) => c.node(i.node, now)?,
                None => node_entity(i.node, now)?,
            };
            let (entry_id, entry) = match cache {
                Some(c) => c.entry(i.entry)?,
                None => entry_entity(i.entry)?,
            };
            let workload_id = uid(
                &TYPES.workload,
                &format!("{}#{}#{}", i.node.spiffe_id, i.entry.id.as_str(), i.task_id),
            );
            let selectors: Vec<String> =
                i.entry.selectors.iter().map(ToString::to_string).collect();
            let workload = entity(
                workload_id.clone(),
                vec![
                    ("selectors", strings(selectors.iter().map(String::as_str))),
                    ("task", string(i.task_id)),
                    (
                        "node",
                        RestrictedExpression::new_entity_uid(node_id.clone()),
                    ),
                ],
                HashSet::from([node_id]),
            )?;
            Ok(CedarInput {
                principal: workload_id,
                resource: entry_id,
                entities: vec![workload, node, entry],
                context: match cache {
                    Some(c) => c.issue_context(
                        now,
                        i.requested_ttl,
                        i.audience,
                        attestation_age(i.node, now),
                    )?,
                    None => context(
                        now,
                        ContextValues {
                            requested_ttl: i.requested_ttl,
                            audience: i.audience,
                            renewal: false,
                            attestation_age: attestation_age(i.node, now),
                        },
                    )?,
                },
            })
        }
        PolicyRequest::Admin(a) => {
            let op_id = uid(&TYPES.operator, &a.caller.id());
            let operator = entity(
                op_id.clone(),
                vec![
                    ("uid", long(i64::from(a.caller.uid))),
                    ("authenticated_by", string(a.caller.authenticated_by)),
                ],
                HashSet::new(),
            )?;
            let api_id = uid(&TYPES.api, a.operation);
            let api = entity(
                api_id.clone(),
                vec![
                    ("method", string(a.method)),
                    ("route", string(a.route)),
                    ("path", string(a.path)),
                ],
                HashSet::new(),
            )?;
            Ok(CedarInput {
                principal: op_id,
                resource: api_id,
                entities: vec![operator, api],
                context: context(
                    now,
                    ContextValues {
                        requested_ttl: 0,
                        audience: &[],
                        renewal: false,
                        attestation_age: 0,
                    },
                )?,
            })
        }
    }
}
