//! Typed policy inputs and their Cedar form (entities and context).
//!
//! Building these is on the path of every issuance, so it stays cheap:
//! a handful of entities with flat attributes, no schema checks (the
//! policies were validated against the schema at load time, and the
//! entities built here follow it by construction; a unit test checks it).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use cedar_policy::{
    Context, ContextCreationError, Entity, EntityId, EntityTypeName, EntityUid,
    RestrictedExpression,
};
use mayfly::SpiffeId;
use mayfly::entry::{Assurance, Entry, EntryId};
use mayfly::selector::SelectorSet;
use time::OffsetDateTime;

use super::facts::{ContextFacts, EntryFacts, NodeFacts};
use super::prefilter::Reads;
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

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> RestrictedExpression {
    RestrictedExpression::new_set(items.into_iter().map(string))
}

pub use super::facts::{assurance_level, attestation_age};

/// The most cached entities of each kind; past it the cache starts over.
const CACHE_LIMIT: usize = 100_000;

/// Everything a node entity is built from, besides its id: equal keys
/// give equal entities.
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

    /// `*self == NodeKey::of(node, now)`, without copying.
    fn matches(&self, node: &NodeRecord, now: OffsetDateTime) -> bool {
        self.age == attestation_age(node, now)
            && self.attested_at == node.attested_at.unix_timestamp()
            && self.assurance == node.assurance
            && self.banned == node.banned
            && self.can_reattest == node.can_reattest
            && self.attestor == node.attestor
            && self.selectors == node.selectors
    }
}

/// Node entities, by SPIFFE ID, with what they were built from.
type Nodes = HashMap<SpiffeId, (NodeKey, Arc<Built<NodeFacts>>)>;

/// Entry entities, by id, with their revision.
type Entries = HashMap<EntryId, (u64, Arc<Built<EntryFacts>>)>;

/// Built issuance contexts of one second, by (requested TTL, attestation
/// age), then audience.
type Contexts = HashMap<(i64, i64), Vec<(Vec<String>, Context)>>;

/// Facts and the Cedar entity built from them.
#[derive(Debug)]
pub struct Built<F> {
    /// The attribute values.
    pub facts: F,
    /// The Cedar entity with those values.
    pub entity: Entity,
}

/// Cedar entities already built, so that the issuance path does not
/// rebuild them on every request: entries by id and revision (an entry's
/// revision changes with every change), nodes by SPIFFE ID with every
/// attribute they were built from (the attestation age changes every
/// second, so a node entity is reused within the same second).
#[derive(Debug, Default)]
pub struct EntityCache {
    nodes: Mutex<Nodes>,
    entries: Mutex<Entries>,
    // Issuance contexts of the current second; emptied when the second
    // changes.
    contexts: Mutex<(i64, Contexts, usize)>,
}

impl EntityCache {
    fn node(
        &self,
        node: &NodeRecord,
        now: OffsetDateTime,
    ) -> Result<Arc<Built<NodeFacts>>, RequestError> {
        {
            let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((k, b)) = nodes.get(&node.spiffe_id)
                && k.matches(node, now)
            {
                return Ok(Arc::clone(b));
            }
        }
        let built = Arc::new(node_entity(NodeFacts::of(node, now))?);
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if nodes.len() >= CACHE_LIMIT {
            nodes.clear();
        }
        nodes.insert(
            node.spiffe_id.clone(),
            (NodeKey::of(node, now), Arc::clone(&built)),
        );
        Ok(built)
    }

    fn issue_context(&self, facts: &ContextFacts<'_>) -> Result<Context, RequestError> {
        let key = (facts.requested_ttl, facts.attestation_age);
        {
            let cached = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0 == facts.now
                && let Some(built) = cached.1.get(&key)
                && let Some((_, c)) = built.iter().find(|(a, _)| a == facts.audience)
            {
                return Ok(c.clone());
            }
        }
        let c = context(facts)?;
        let mut cached = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.0 != facts.now || cached.2 >= CACHE_LIMIT {
            *cached = (facts.now, HashMap::new(), 0);
        }
        cached
            .1
            .entry(key)
            .or_default()
            .push((facts.audience.to_vec(), c.clone()));
        cached.2 += 1;
        Ok(c)
    }

    fn entry(&self, entry: &Entry) -> Result<Arc<Built<EntryFacts>>, RequestError> {
        // Revision 0 is an entry that was never stored (a dry run).
        if entry.revision == 0 {
            return Ok(Arc::new(entry_entity(EntryFacts::of(entry))?));
        }
        if let Some((revision, b)) = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&entry.id)
            && *revision == entry.revision
        {
            return Ok(Arc::clone(b));
        }
        let built = Arc::new(entry_entity(EntryFacts::of(entry))?);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CACHE_LIMIT {
            entries.clear();
        }
        entries.insert(entry.id.clone(), (entry.revision, Arc::clone(&built)));
        Ok(built)
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

fn node_entity(facts: NodeFacts) -> Result<Built<NodeFacts>, RequestError> {
    let f = &facts;
    let entity = entity(
        uid(&TYPES.node, &f.spiffe_id),
        vec![
            ("spiffe_id", string(f.spiffe_id.as_str())),
            ("attestor", string(f.attestor.as_str())),
            ("assurance", long(f.assurance)),
            ("selectors", strings(f.selectors.iter().map(String::as_str))),
            ("attested_at", long(f.attested_at)),
            ("attestation_age", long(f.attestation_age)),
            ("banned", RestrictedExpression::new_bool(f.banned)),
            (
                "can_reattest",
                RestrictedExpression::new_bool(f.can_reattest),
            ),
        ],
        HashSet::new(),
    )?;
    Ok(Built { facts, entity })
}

fn entry_entity(facts: EntryFacts) -> Result<Built<EntryFacts>, RequestError> {
    let f = &facts;
    let entity = entity(
        uid(&TYPES.entry, &f.id),
        vec![
            ("spiffe_id", string(f.spiffe_id.as_str())),
            ("parent_id", string(f.parent_id.as_str())),
            ("selectors", strings(f.selectors.iter().map(String::as_str))),
            ("min_assurance", long(f.min_assurance)),
            ("max_attestation_age", long(f.max_attestation_age)),
            ("admin", RestrictedExpression::new_bool(f.admin)),
            ("downstream", RestrictedExpression::new_bool(f.downstream)),
            ("scope", string(f.scope)),
            ("x509_svid_ttl", long(f.x509_svid_ttl)),
            ("jwt_svid_ttl", long(f.jwt_svid_ttl)),
        ],
        HashSet::new(),
    )?;
    Ok(Built { facts, entity })
}

fn context(f: &ContextFacts<'_>) -> Result<Context, RequestError> {
    Context::from_pairs([
        ("now".to_owned(), long(f.now)),
        ("hour".to_owned(), long(f.hour)),
        ("weekday".to_owned(), long(f.weekday)),
        ("requested_ttl".to_owned(), long(f.requested_ttl)),
        (
            "audience".to_owned(),
            strings(f.audience.iter().map(String::as_str)),
        ),
        (
            "renewal".to_owned(),
            RestrictedExpression::new_bool(f.renewal),
        ),
        ("attestation_age".to_owned(), long(f.attestation_age)),
    ])
    .map_err(|e: ContextCreationError| RequestError::Context(e.to_string()))
}

/// An issuance request's facts, with the node and entry entities they were
/// built with: what the pre-filter reads, and what [`IssueInput::to_cedar`]
/// turns into the Cedar request.
#[derive(Debug)]
pub struct IssueInput<'a> {
    /// The calling agent.
    pub node: Arc<Built<NodeFacts>>,
    /// The entry.
    pub entry: Arc<Built<EntryFacts>>,
    /// The workload's entity id, `<agent>#<entry id>#<task>`.
    pub workload_id: String,
    /// Its task id.
    pub task: &'a str,
    /// The context.
    pub context: ContextFacts<'a>,
}

impl<'a> IssueInput<'a> {
    /// The facts of `issue` at `now`, reusing (and filling) `cache`.
    pub fn new(
        issue: &Issue<'a>,
        now: OffsetDateTime,
        cache: Option<&EntityCache>,
    ) -> Result<Self, RequestError> {
        let node = match cache {
            Some(c) => c.node(issue.node, now)?,
            None => Arc::new(node_entity(NodeFacts::of(issue.node, now))?),
        };
        let entry = match cache {
            Some(c) => c.entry(issue.entry)?,
            None => Arc::new(entry_entity(EntryFacts::of(issue.entry))?),
        };
        let workload_id = format!(
            "{}#{}#{}",
            node.facts.spiffe_id, entry.facts.id, issue.task_id
        );
        let context = ContextFacts::at(
            now,
            issue.requested_ttl,
            issue.audience,
            false,
            node.facts.attestation_age,
        );
        Ok(Self {
            node,
            entry,
            workload_id,
            task: issue.task_id,
            context,
        })
    }

    /// The principal (the workload).
    pub fn principal(&self) -> EntityUid {
        uid(&TYPES.workload, &self.workload_id)
    }

    /// The resource (the entry).
    pub fn resource(&self) -> EntityUid {
        self.entry.entity.uid()
    }

    /// The Cedar context, reusing (and filling) `cache`.
    pub fn context(&self, cache: Option<&EntityCache>) -> Result<Context, RequestError> {
        match cache {
            Some(c) => c.issue_context(&self.context),
            None => context(&self.context),
        }
    }

    /// The Cedar form with the entities `reads` names, reusing (and
    /// filling) `cache` for the context.
    pub fn to_cedar(
        &self,
        reads: Reads,
        cache: Option<&EntityCache>,
    ) -> Result<CedarInput, RequestError> {
        let workload_id = self.principal();
        let mut entities = Vec::with_capacity(3);
        if reads.workload {
            let node_id = self.node.entity.uid();
            entities.push(entity(
                workload_id.clone(),
                vec![
                    (
                        "selectors",
                        strings(self.entry.facts.selectors.iter().map(String::as_str)),
                    ),
                    ("task", string(self.task)),
                    (
                        "node",
                        RestrictedExpression::new_entity_uid(node_id.clone()),
                    ),
                ],
                HashSet::from([node_id]),
            )?);
        }
        if reads.node {
            entities.push(self.node.entity.clone());
        }
        if reads.entry {
            entities.push(self.entry.entity.clone());
        }
        Ok(CedarInput {
            principal: workload_id,
            resource: self.resource(),
            entities,
            context: self.context(cache)?,
        })
    }
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
            let age = if renewal {
                attestation_age(node, now)
            } else {
                0
            };
            let built = node_entity(NodeFacts::of(node, now))?;
            let id = built.entity.uid();
            Ok(CedarInput {
                principal: id.clone(),
                resource: id,
                entities: vec![built.entity],
                context: context(&ContextFacts::at(now, 0, &[], renewal, age))?,
            })
        }
        PolicyRequest::Issue(i) => IssueInput::new(i, now, cache)?.to_cedar(Reads::ALL, cache),
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
                context: context(&ContextFacts::at(now, 0, &[], false, 0))?,
            })
        }
    }
}
