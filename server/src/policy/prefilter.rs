//! A static pre-filter: per issuance request, the policies Cedar needs to
//! evaluate.
//!
//! Cedar evaluates every policy of the set it is given, and each costs a
//! few microseconds whatever its conditions. Most policies concern a few
//! entries (`resource.spiffe_id like "spiffe://td/payments/*"`), audiences
//! or agents, so for a given request most of them are plainly not
//! satisfied. At load time, each policy that applies to an issuance action
//! is compiled from Cedar's syntax tree ([`cedar_policy::pst`]) into a
//! small term over the request's facts ([`super::facts`]): the workload,
//! its node, the entry, the action and the context. What every request of
//! the action shares (the action, the principal and resource types) is
//! folded in at load. Per request, the term is evaluated with Cedar's
//! semantics (left-to-right, short-circuit `&&`, `||` and `if`, the scope
//! first).
//!
//! Soundness: a policy is left out only when its condition is **known
//! false, without error**. Every construct not modelled here (extension
//! functions, records, tags, attributes of entity literals, arithmetic
//! that overflows, ...) evaluates to "unknown, may fail", and "unknown"
//! spreads through every operator except a short-circuit that an earlier
//! known value decides. Cedar would therefore have found every left-out
//! policy not satisfied, without error: the decision, its reasons, its
//! errors and its TTL cap are those of the full set. The equivalence is
//! checked by a property test against Cedar on the full set.
//!
//! The policy sets Cedar gets are built once per combination of policies
//! (few in practice) and cached, with the request entities their policies
//! can read ([`Reads`]): Cedar gets only those.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cedar_policy::pst::{
    self, ActionConstraint, BinaryOp, Clause, EntityOrSlot, Expr, Literal, PatternElem,
    PrincipalConstraint, ResourceConstraint, UnaryOp, Var,
};
use cedar_policy::{Policy, PolicySet};

use super::facts::{ContextFacts, EntryFacts, NodeFacts};
use super::schema::NAMESPACE;

/// The most cached policy sets per action; past it the cache starts over.
const SET_CACHE_LIMIT: usize = 4_096;
/// The most policies held by the cached sets of one action (each holds a
/// copy of its policies), which lowers the set limit for large policy
/// sets.
const SET_CACHE_POLICIES: usize = 65_536;

/// What the pre-filter knows of one issuance request.
#[derive(Debug, Clone, Copy)]
pub struct IssueFacts<'a> {
    /// The action's name (`issue_x509` or `issue_jwt`).
    pub action: &'a str,
    /// The workload's entity id.
    pub workload_id: &'a str,
    /// The workload's task.
    pub task: &'a str,
    /// Its node.
    pub node: &'a NodeFacts,
    /// The entry.
    pub entry: &'a EntryFacts,
    /// The context.
    pub context: &'a ContextFacts<'a>,
}

/// The request entities a policy can read: their attributes (`.`,
/// `has`), ancestors (`in`) or tags. Cedar decides the same without the
/// entities no selected policy reads, so those are not built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    /// The workload (`principal`).
    pub workload: bool,
    /// Its node (`principal.node`).
    pub node: bool,
    /// The entry (`resource`).
    pub entry: bool,
}

impl Reads {
    /// No entity.
    pub const NONE: Self = Self {
        workload: false,
        node: false,
        entry: false,
    };
    /// Every entity.
    pub const ALL: Self = Self {
        workload: true,
        node: true,
        entry: true,
    };
    const WORKLOAD: Self = Self {
        workload: true,
        ..Self::NONE
    };
    const ENTRY: Self = Self {
        entry: true,
        ..Self::NONE
    };

    fn or(self, other: Self) -> Self {
        Self {
            workload: self.workload || other.workload,
            node: self.node || other.node,
            entry: self.entry || other.entry,
        }
    }
}

/// The policies Cedar evaluates for one request.
#[derive(Debug)]
pub struct Selected {
    /// The policies that can be satisfied.
    pub set: PolicySet,
    /// The entities they can read.
    pub reads: Reads,
}

/// One policy and what the pre-filter knows of it.
#[derive(Debug)]
struct Compiled {
    policy: Policy,
    condition: Term,
    reads: Reads,
}

/// The policies of one issuance action, each with its compiled condition,
/// and the subsets already built.
#[derive(Debug)]
pub struct ActionFilter {
    policies: Vec<Compiled>,
    sets: Mutex<HashMap<Vec<u64>, Arc<Selected>>>,
}

impl ActionFilter {
    /// Compiles the conditions of `policies` (those whose action scope can
    /// match the issuance action `action`). The parts known for every
    /// request of the action (the principal and resource types, the
    /// action) are folded in; a policy that can never be satisfied is
    /// dropped.
    pub fn new(action: &str, policies: impl IntoIterator<Item = Policy>) -> Self {
        let policies = policies
            .into_iter()
            .map(|policy| match policy.to_pst() {
                Ok(pst::Policy::Static(s)) => Compiled {
                    condition: fold(compile_policy(s.body()), action),
                    reads: policy_reads(s.body()),
                    policy,
                },
                // Templates are rejected at load; anything else is
                // evaluated by Cedar, with the entities.
                _ => Compiled {
                    policy,
                    condition: Term::Unknown,
                    reads: Reads::ALL,
                },
            })
            .filter(|p| !matches!(p.condition, Term::Bool(false)))
            .collect();
        Self {
            policies,
            sets: Mutex::new(HashMap::new()),
        }
    }

    /// The policies not left out for `facts`, as a set for Cedar.
    pub fn select(&self, facts: &IssueFacts<'_>) -> Result<Arc<Selected>, String> {
        let mut key = vec![0u64; self.policies.len().div_ceil(64)];
        for (i, p) in self.policies.iter().enumerate() {
            if !is_known_false(&p.condition, facts)
                && let Some(word) = key.get_mut(i / 64)
            {
                *word |= 1 << (i % 64);
            }
        }
        if let Some(set) = self
            .sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(Arc::clone(set));
        }
        let mut set = PolicySet::new();
        let mut reads = Reads::NONE;
        for (i, p) in self.policies.iter().enumerate() {
            if key.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0) {
                set.add(p.policy.clone())
                    .map_err(|e| format!("policy {}: {e}", p.policy.id()))?;
                reads = reads.or(p.reads);
            }
        }
        let set = Arc::new(Selected { set, reads });
        let limit = (SET_CACHE_POLICIES / self.policies.len().max(1)).clamp(16, SET_CACHE_LIMIT);
        let mut sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
        if sets.len() >= limit {
            sets.clear();
        }
        sets.insert(key, Arc::clone(&set));
        Ok(set)
    }

    /// The ids of the policies whose condition the pre-filter models (the
    /// others are always left to Cedar), for tests.
    #[cfg(test)]
    pub fn modelled(&self) -> Vec<String> {
        self.policies
            .iter()
            .filter(|p| !matches!(p.condition, Term::Unknown))
            .map(|p| p.policy.id().to_string())
            .collect()
    }
}

/// Whether `term` is known to evaluate to `false`, without error, for
/// `facts`.
fn is_known_false(term: &Term, facts: &IssueFacts<'_>) -> bool {
    matches!(eval(term, Some(facts)), Some(Val::Bool(false)))
}

/// The entity types of the issuance model.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EntityType {
    Workload,
    Node,
    Entry,
    Action,
    /// Any other type (spelled in full).
    Other(String),
}

impl EntityType {
    fn of(t: &pst::EntityType) -> Self {
        Self::of_name(&t.to_string())
    }

    fn of_name(name: &str) -> Self {
        match name
            .strip_prefix(NAMESPACE)
            .and_then(|n| n.strip_prefix("::"))
        {
            Some("Workload") => Self::Workload,
            Some("Node") => Self::Node,
            Some("Entry") => Self::Entry,
            Some("Action") => Self::Action,
            _ => Self::Other(name.to_owned()),
        }
    }
}

/// An attribute the pre-filter knows the value of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fact {
    /// `principal` (the workload entity).
    Principal,
    /// `action`.
    Action,
    /// `resource` (the entry entity).
    Resource,
    /// `principal.node` (the node entity).
    Node,
    WorkloadSelectors,
    WorkloadTask,
    NodeSpiffeId,
    NodeAttestor,
    NodeAssurance,
    NodeSelectors,
    NodeAttestedAt,
    NodeAttestationAge,
    NodeBanned,
    NodeCanReattest,
    EntrySpiffeId,
    EntryParentId,
    EntrySelectors,
    EntryMinAssurance,
    EntryMaxAttestationAge,
    EntryAdmin,
    EntryDownstream,
    EntryScope,
    EntryX509Ttl,
    EntryJwtTtl,
    ContextNow,
    ContextHour,
    ContextWeekday,
    ContextRequestedTtl,
    ContextAudience,
    ContextRenewal,
    ContextAttestationAge,
}

/// A value that has attributes in the issuance model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Workload,
    Node,
    Entry,
    Context,
}

impl Place {
    /// The attribute `name` of this place: a fact, and the place it leads
    /// to when it is an entity. `None`: the schema has no such attribute.
    fn attr(self, name: &str) -> Option<(Fact, Option<Place>)> {
        use Fact as F;
        let fact = match (self, name) {
            (Self::Workload, "selectors") => F::WorkloadSelectors,
            (Self::Workload, "task") => F::WorkloadTask,
            (Self::Workload, "node") => return Some((F::Node, Some(Self::Node))),
            (Self::Node, "spiffe_id") => F::NodeSpiffeId,
            (Self::Node, "attestor") => F::NodeAttestor,
            (Self::Node, "assurance") => F::NodeAssurance,
            (Self::Node, "selectors") => F::NodeSelectors,
            (Self::Node, "attested_at") => F::NodeAttestedAt,
            (Self::Node, "attestation_age") => F::NodeAttestationAge,
            (Self::Node, "banned") => F::NodeBanned,
            (Self::Node, "can_reattest") => F::NodeCanReattest,
            (Self::Entry, "spiffe_id") => F::EntrySpiffeId,
            (Self::Entry, "parent_id") => F::EntryParentId,
            (Self::Entry, "selectors") => F::EntrySelectors,
            (Self::Entry, "min_assurance") => F::EntryMinAssurance,
            (Self::Entry, "max_attestation_age") => F::EntryMaxAttestationAge,
            (Self::Entry, "admin") => F::EntryAdmin,
            (Self::Entry, "downstream") => F::EntryDownstream,
            (Self::Entry, "scope") => F::EntryScope,
            (Self::Entry, "x509_svid_ttl") => F::EntryX509Ttl,
            (Self::Entry, "jwt_svid_ttl") => F::EntryJwtTtl,
            (Self::Context, "now") => F::ContextNow,
            (Self::Context, "hour") => F::ContextHour,
            (Self::Context, "weekday") => F::ContextWeekday,
            (Self::Context, "requested_ttl") => F::ContextRequestedTtl,
            (Self::Context, "audience") => F::ContextAudience,
            (Self::Context, "renewal") => F::ContextRenewal,
            (Self::Context, "attestation_age") => F::ContextAttestationAge,
            _ => return None,
        };
        Some((fact, None))
    }

    /// Every attribute name of this place (for the consistency test).
    #[cfg(test)]
    pub(super) fn names(self) -> &'static [&'static str] {
        match self {
            Self::Workload => &["selectors", "task", "node"],
            Self::Node => &[
                "spiffe_id",
                "attestor",
                "assurance",
                "selectors",
                "attested_at",
                "attestation_age",
                "banned",
                "can_reattest",
            ],
            Self::Entry => &[
                "spiffe_id",
                "parent_id",
                "selectors",
                "min_assurance",
                "max_attestation_age",
                "admin",
                "downstream",
                "scope",
                "x509_svid_ttl",
                "jwt_svid_ttl",
            ],
            Self::Context => &[
                "now",
                "hour",
                "weekday",
                "requested_ttl",
                "audience",
                "renewal",
                "attestation_age",
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Less,
    LessEq,
    Greater,
    GreaterEq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOp {
    Contains,
    ContainsAll,
    ContainsAny,
}

/// A policy condition, compiled for issuance requests.
#[derive(Debug, Clone)]
enum Term {
    /// Not modelled: any value, or an error.
    Unknown,
    Bool(bool),
    Long(i64),
    Str(String),
    Entity(EntityType, String),
    Fact(Fact),
    Set(Vec<Term>),
    Not(Box<Term>),
    Neg(Box<Term>),
    IsEmpty(Box<Term>),
    And(Box<Term>, Box<Term>),
    Or(Box<Term>, Box<Term>),
    If(Box<Term>, Box<Term>, Box<Term>),
    Eq(Box<Term>, Box<Term>),
    Cmp(Cmp, Box<Term>, Box<Term>),
    Arith(Arith, Box<Term>, Box<Term>),
    In(Box<Term>, Box<Term>),
    SetOp(SetOp, Box<Term>, Box<Term>),
    Is(Box<Term>, EntityType),
    Like(Box<Term>, Pattern),
}

/// A `like` pattern: its literal parts, between the wildcards.
#[derive(Debug, Clone)]
struct Pattern {
    /// At least one part; `n` wildcards make `n + 1` parts (some empty).
    parts: Vec<String>,
}

impl Pattern {
    fn new(elems: &[PatternElem]) -> Self {
        let mut parts = vec![String::new()];
        for e in elems {
            match e {
                PatternElem::Wildcard => parts.push(String::new()),
                PatternElem::Char(c) => {
                    if let Some(last) = parts.last_mut() {
                        last.push(*c);
                    }
                }
            }
        }
        Self { parts }
    }

    /// Cedar's `like`: every wildcard matches any sequence of characters,
    /// the rest literally.
    fn matches(&self, s: &str) -> bool {
        let Some((first, rest)) = self.parts.split_first() else {
            return s.is_empty();
        };
        let Some((last, middle)) = rest.split_last() else {
            return s == first;
        };
        if s.len() < first.len() + last.len()
            || !s.starts_with(first.as_str())
            || !s.ends_with(last.as_str())
        {
            return false;
        }
        // Between the first and last parts, each middle part must appear
        // in order; taking the leftmost occurrence each time is enough.
        let Some(mut between) = s.get(first.len()..s.len() - last.len()) else {
            return false;
        };
        for part in middle {
            match between.find(part.as_str()) {
                Some(at) => between = between.get(at + part.len()..).unwrap_or_default(),
                None => return false,
            }
        }
        true
    }
}

fn boxed(e: &Expr) -> Box<Term> {
    Box::new(compile(e))
}

fn and(a: Term, b: Term) -> Term {
    Term::And(Box::new(a), Box::new(b))
}

fn entity_literal(uid: &pst::EntityUID) -> Term {
    Term::Entity(EntityType::of(&uid.ty), uid.eid.to_string())
}

fn scope_entity(e: &EntityOrSlot) -> Term {
    match e {
        EntityOrSlot::Entity(uid) => entity_literal(uid),
        EntityOrSlot::Slot(_) => Term::Unknown,
    }
}

/// The whole condition of a policy as Cedar evaluates it: principal,
/// action and resource scope, then the `when` and `unless` clauses in
/// order, joined by `&&`.
fn compile_policy(p: &pst::Template) -> Term {
    let var = |f| Box::new(Term::Fact(f));
    let principal = match &p.principal {
        PrincipalConstraint::Any => Term::Bool(true),
        PrincipalConstraint::Eq(e) => Term::Eq(var(Fact::Principal), Box::new(scope_entity(e))),
        PrincipalConstraint::In(e) => Term::In(var(Fact::Principal), Box::new(scope_entity(e))),
        PrincipalConstraint::Is(t) => Term::Is(var(Fact::Principal), EntityType::of(t)),
        PrincipalConstraint::IsIn(t, e) => and(
            Term::Is(var(Fact::Principal), EntityType::of(t)),
            Term::In(var(Fact::Principal), Box::new(scope_entity(e))),
        ),
    };
    let action = match &p.action {
        ActionConstraint::Any => Term::Bool(true),
        ActionConstraint::Eq(a) => Term::Eq(var(Fact::Action), Box::new(entity_literal(a))),
        ActionConstraint::In(list) => Term::In(
            var(Fact::Action),
            Box::new(Term::Set(list.iter().map(entity_literal).collect())),
        ),
    };
    let resource = match &p.resource {
        ResourceConstraint::Any => Term::Bool(true),
        ResourceConstraint::Eq(e) => Term::Eq(var(Fact::Resource), Box::new(scope_entity(e))),
        ResourceConstraint::In(e) => Term::In(var(Fact::Resource), Box::new(scope_entity(e))),
        ResourceConstraint::Is(t) => Term::Is(var(Fact::Resource), EntityType::of(t)),
        ResourceConstraint::IsIn(t, e) => and(
            Term::Is(var(Fact::Resource), EntityType::of(t)),
            Term::In(var(Fact::Resource), Box::new(scope_entity(e))),
        ),
    };
    let mut cond = and(principal, and(action, resource));
    for clause in p.clauses() {
        let c = match clause {
            Clause::When(e) => compile(e),
            Clause::Unless(e) => Term::Not(boxed(e)),
        };
        cond = and(cond, c);
    }
    cond
}

/// The request entities evaluating the policy can read. Cedar reads an
/// entity only for its attributes (`.`, `has`), its ancestors (`in`) and
/// its tags; the request's variables, literals, `==`, `is` and the context
/// do not. `action in ...` reads only action entities, which an issuance
/// request never holds. Anything else counts as reading every entity.
fn policy_reads(p: &pst::Template) -> Reads {
    let mut reads = Reads::NONE;
    if matches!(
        p.principal,
        PrincipalConstraint::In(_) | PrincipalConstraint::IsIn(..)
    ) {
        reads = reads.or(Reads::WORKLOAD);
    }
    if matches!(
        p.resource,
        ResourceConstraint::In(_) | ResourceConstraint::IsIn(..)
    ) {
        reads = reads.or(Reads::ENTRY);
    }
    for clause in p.clauses() {
        let (Clause::When(e) | Clause::Unless(e)) = clause;
        reads = reads.or(expr_reads(e));
    }
    reads
}

/// The entity an expression denotes, if it is one the request holds, and
/// what evaluating the expression itself reads.
fn entity_read(e: &Expr) -> Option<(Reads, Reads)> {
    match e {
        Expr::Var(Var::Principal) => Some((Reads::WORKLOAD, Reads::NONE)),
        Expr::Var(Var::Resource) => Some((Reads::ENTRY, Reads::NONE)),
        Expr::GetAttr { expr, attr }
            if attr.as_str() == "node" && matches!(**expr, Expr::Var(Var::Principal)) =>
        {
            Some((
                Reads {
                    node: true,
                    ..Reads::NONE
                },
                Reads::WORKLOAD,
            ))
        }
        _ => None,
    }
}

fn expr_reads(e: &Expr) -> Reads {
    // Reading an attribute of, or the ancestors of, `base`.
    let of = |base: &Expr| match base {
        Expr::Var(Var::Context) => Reads::NONE,
        _ => match entity_read(base) {
            Some((entity, inner)) => entity.or(inner),
            None => Reads::ALL,
        },
    };
    match e {
        Expr::Literal(_) | Expr::Var(_) => Reads::NONE,
        Expr::UnaryOp { expr, .. } | Expr::Like { expr, .. } => expr_reads(expr),
        Expr::BinaryOp { op, left, right } => match op {
            BinaryOp::GetTag | BinaryOp::HasTag => Reads::ALL,
            BinaryOp::In if matches!(**left, Expr::Var(Var::Action)) => expr_reads(right),
            BinaryOp::In => of(left).or(expr_reads(right)),
            _ => expr_reads(left).or(expr_reads(right)),
        },
        Expr::GetAttr { expr, .. } => of(expr),
        // `e has a.b` reads `e.a` too.
        Expr::HasAttr { expr, attrs } if attrs.tail.is_empty() => of(expr),
        Expr::Is {
            expr,
            in_expr: Some(target),
            ..
        } => of(expr).or(expr_reads(target)),
        Expr::Is { expr, .. } => expr_reads(expr),
        Expr::IfThenElse {
            cond,
            then_expr,
            else_expr,
        } => expr_reads(cond)
            .or(expr_reads(then_expr))
            .or(expr_reads(else_expr)),
        Expr::Set(items) => items.iter().fold(Reads::NONE, |r, i| r.or(expr_reads(i))),
        Expr::Record(fields) => fields
            .values()
            .fold(Reads::NONE, |r, v| r.or(expr_reads(v))),
        _ => Reads::ALL,
    }
}

/// Folds what is known for every request of `action`: the action itself,
/// and the types of the principal (a workload), its node and the resource
/// (an entry); then every part with no fact left, with Cedar's semantics
/// (as [`eval`]).
fn fold(t: Term, action: &str) -> Term {
    use Term as T;
    let f = |t: Box<Term>| Box::new(fold(*t, action));
    let t = match t {
        T::Fact(Fact::Action) => return T::Entity(EntityType::Action, action.to_owned()),
        T::Is(a, ty) => match *a {
            T::Fact(Fact::Principal) => return T::Bool(ty == EntityType::Workload),
            T::Fact(Fact::Node) => return T::Bool(ty == EntityType::Node),
            T::Fact(Fact::Resource) => return T::Bool(ty == EntityType::Entry),
            a => T::Is(Box::new(fold(a, action)), ty),
        },
        T::Set(items) => T::Set(items.into_iter().map(|i| fold(i, action)).collect()),
        T::Not(a) => T::Not(f(a)),
        T::Neg(a) => T::Neg(f(a)),
        T::IsEmpty(a) => T::IsEmpty(f(a)),
        T::And(a, b) => T::And(f(a), f(b)),
        T::Or(a, b) => T::Or(f(a), f(b)),
        T::If(c, a, b) => T::If(f(c), f(a), f(b)),
        T::Eq(a, b) => T::Eq(f(a), f(b)),
        T::Cmp(op, a, b) => T::Cmp(op, f(a), f(b)),
        T::Arith(op, a, b) => T::Arith(op, f(a), f(b)),
        T::In(a, b) => T::In(f(a), f(b)),
        T::SetOp(op, a, b) => T::SetOp(op, f(a), f(b)),
        T::Like(a, p) => T::Like(f(a), p),
        t => t,
    };
    match t {
        // A decided left side decides `&&` and `||`, or leaves the right
        // side, which Cedar then requires to be a boolean.
        T::And(a, b) => match (*a, *b) {
            (T::Bool(false), _) => T::Bool(false),
            (T::Bool(true), b) if is_boolean(&b) => b,
            (a, b) => T::And(Box::new(a), Box::new(b)),
        },
        T::Or(a, b) => match (*a, *b) {
            (T::Bool(true), _) => T::Bool(true),
            (T::Bool(false), b) if is_boolean(&b) => b,
            (a, b) => T::Or(Box::new(a), Box::new(b)),
        },
        T::If(c, a, b) => match *c {
            T::Bool(true) => *a,
            T::Bool(false) => *b,
            c => T::If(Box::new(c), a, b),
        },
        t if is_constant(&t) => match eval(&t, None) {
            Some(Val::Bool(b)) => T::Bool(b),
            Some(Val::Long(v)) => T::Long(v),
            Some(Val::Str(s)) => T::Str(s.to_owned()),
            Some(Val::Entity(ty, id)) => T::Entity(ty.clone(), id.to_owned()),
            _ => t,
        },
        t => t,
    }
}

/// Whether `t` always evaluates to a boolean (or fails).
fn is_boolean(t: &Term) -> bool {
    matches!(
        t,
        Term::Bool(_)
            | Term::Not(_)
            | Term::IsEmpty(_)
            | Term::And(..)
            | Term::Or(..)
            | Term::Eq(..)
            | Term::Cmp(..)
            | Term::In(..)
            | Term::SetOp(..)
            | Term::Is(..)
            | Term::Like(..)
    )
}

/// Whether `t` reads no fact and is modelled throughout.
fn is_constant(t: &Term) -> bool {
    match t {
        Term::Unknown | Term::Fact(_) => false,
        Term::Bool(_) | Term::Long(_) | Term::Str(_) | Term::Entity(..) => true,
        Term::Set(items) => items.iter().all(is_constant),
        Term::Not(a) | Term::Neg(a) | Term::IsEmpty(a) | Term::Is(a, _) | Term::Like(a, _) => {
            is_constant(a)
        }
        Term::And(a, b)
        | Term::Or(a, b)
        | Term::Eq(a, b)
        | Term::Cmp(_, a, b)
        | Term::Arith(_, a, b)
        | Term::In(a, b)
        | Term::SetOp(_, a, b) => is_constant(a) && is_constant(b),
        Term::If(c, a, b) => is_constant(c) && is_constant(a) && is_constant(b),
    }
}

/// The place an expression denotes, when it is one of the model's
/// entities or the context.
fn place(e: &Expr) -> Option<Place> {
    match e {
        Expr::Var(Var::Principal) => Some(Place::Workload),
        Expr::Var(Var::Resource) => Some(Place::Entry),
        Expr::Var(Var::Context) => Some(Place::Context),
        Expr::GetAttr { expr, attr } => place(expr)?.attr(attr)?.1,
        _ => None,
    }
}

fn compile(e: &Expr) -> Term {
    match e {
        Expr::Literal(Literal::Bool(b)) => Term::Bool(*b),
        Expr::Literal(Literal::Long(v)) => Term::Long(*v),
        Expr::Literal(Literal::String(s)) => Term::Str(s.to_string()),
        Expr::Literal(Literal::EntityUID(uid)) => entity_literal(uid),
        Expr::Var(Var::Principal) => Term::Fact(Fact::Principal),
        Expr::Var(Var::Action) => Term::Fact(Fact::Action),
        Expr::Var(Var::Resource) => Term::Fact(Fact::Resource),
        Expr::UnaryOp { op, expr } => match op {
            UnaryOp::Not => Term::Not(boxed(expr)),
            UnaryOp::Neg => Term::Neg(boxed(expr)),
            UnaryOp::IsEmpty => Term::IsEmpty(boxed(expr)),
            _ => Term::Unknown,
        },
        Expr::BinaryOp { op, left, right } => {
            let (l, r) = (boxed(left), boxed(right));
            match op {
                BinaryOp::Eq => Term::Eq(l, r),
                BinaryOp::NotEq => Term::Not(Box::new(Term::Eq(l, r))),
                BinaryOp::Less => Term::Cmp(Cmp::Less, l, r),
                BinaryOp::LessEq => Term::Cmp(Cmp::LessEq, l, r),
                BinaryOp::Greater => Term::Cmp(Cmp::Greater, l, r),
                BinaryOp::GreaterEq => Term::Cmp(Cmp::GreaterEq, l, r),
                BinaryOp::And => Term::And(l, r),
                BinaryOp::Or => Term::Or(l, r),
                BinaryOp::Add => Term::Arith(Arith::Add, l, r),
                BinaryOp::Sub => Term::Arith(Arith::Sub, l, r),
                BinaryOp::Mul => Term::Arith(Arith::Mul, l, r),
                BinaryOp::In => Term::In(l, r),
                BinaryOp::Contains => Term::SetOp(SetOp::Contains, l, r),
                BinaryOp::ContainsAll => Term::SetOp(SetOp::ContainsAll, l, r),
                BinaryOp::ContainsAny => Term::SetOp(SetOp::ContainsAny, l, r),
                _ => Term::Unknown,
            }
        }
        Expr::GetAttr { expr, attr } => match place(expr).and_then(|p| p.attr(attr)) {
            Some((fact, _)) => Term::Fact(fact),
            None => Term::Unknown,
        },
        Expr::HasAttr { expr, attrs } => {
            // `e has a.b` is `e has a && e.a has b`: known when every step
            // is a place of the model.
            let Some(mut at) = place(expr) else {
                return Term::Unknown;
            };
            let mut names = attrs.iter().peekable();
            while let Some(name) = names.next() {
                match at.attr(name) {
                    None => return Term::Bool(false),
                    Some(_) if names.peek().is_none() => return Term::Bool(true),
                    Some((_, Some(next))) => at = next,
                    // `has` on a value that is not an entity or record.
                    Some((_, None)) => return Term::Unknown,
                }
            }
            Term::Unknown
        }
        Expr::Like { expr, pattern } => Term::Like(boxed(expr), Pattern::new(pattern)),
        Expr::Is {
            expr,
            entity_type,
            in_expr,
        } => {
            let is = Term::Is(boxed(expr), EntityType::of(entity_type));
            match in_expr {
                Some(target) => and(is, Term::In(boxed(expr), boxed(target))),
                None => is,
            }
        }
        Expr::IfThenElse {
            cond,
            then_expr,
            else_expr,
        } => Term::If(boxed(cond), boxed(then_expr), boxed(else_expr)),
        Expr::Set(items) => Term::Set(items.iter().map(|i| compile(i)).collect()),
        _ => Term::Unknown,
    }
}

/// A known value. Entities are `(type, id)`.
#[derive(Debug, Clone)]
enum Val<'a> {
    Bool(bool),
    Long(i64),
    Str(&'a str),
    Entity(&'a EntityType, &'a str),
    Strs(&'a [String]),
    Set(Vec<Val<'a>>),
}

static WORKLOAD: EntityType = EntityType::Workload;
static NODE: EntityType = EntityType::Node;
static ENTRY: EntityType = EntityType::Entry;
static ACTION: EntityType = EntityType::Action;

fn fact<'a>(f: Fact, x: &IssueFacts<'a>) -> Val<'a> {
    let (n, e, c) = (x.node, x.entry, x.context);
    match f {
        Fact::Principal => Val::Entity(&WORKLOAD, x.workload_id),
        Fact::Action => Val::Entity(&ACTION, x.action),
        Fact::Resource => Val::Entity(&ENTRY, &e.id),
        Fact::Node => Val::Entity(&NODE, &n.spiffe_id),
        Fact::WorkloadSelectors => Val::Strs(&e.selectors),
        Fact::WorkloadTask => Val::Str(x.task),
        Fact::NodeSpiffeId => Val::Str(&n.spiffe_id),
        Fact::NodeAttestor => Val::Str(&n.attestor),
        Fact::NodeAssurance => Val::Long(n.assurance),
        Fact::NodeSelectors => Val::Strs(&n.selectors),
        Fact::NodeAttestedAt => Val::Long(n.attested_at),
        Fact::NodeAttestationAge => Val::Long(n.attestation_age),
        Fact::NodeBanned => Val::Bool(n.banned),
        Fact::NodeCanReattest => Val::Bool(n.can_reattest),
        Fact::EntrySpiffeId => Val::Str(&e.spiffe_id),
        Fact::EntryParentId => Val::Str(&e.parent_id),
        Fact::EntrySelectors => Val::Strs(&e.selectors),
        Fact::EntryMinAssurance => Val::Long(e.min_assurance),
        Fact::EntryMaxAttestationAge => Val::Long(e.max_attestation_age),
        Fact::EntryAdmin => Val::Bool(e.admin),
        Fact::EntryDownstream => Val::Bool(e.downstream),
        Fact::EntryScope => Val::Str(e.scope),
        Fact::EntryX509Ttl => Val::Long(e.x509_svid_ttl),
        Fact::EntryJwtTtl => Val::Long(e.jwt_svid_ttl),
        Fact::ContextNow => Val::Long(c.now),
        Fact::ContextHour => Val::Long(c.hour),
        Fact::ContextWeekday => Val::Long(c.weekday),
        Fact::ContextRequestedTtl => Val::Long(c.requested_ttl),
        Fact::ContextAudience => Val::Strs(c.audience),
        Fact::ContextRenewal => Val::Bool(c.renewal),
        Fact::ContextAttestationAge => Val::Long(c.attestation_age),
    }
}

/// Evaluates `t` for `x` as Cedar would. `None`: not known (any value, or
/// an error).
fn eval<'a>(t: &'a Term, x: Option<&IssueFacts<'a>>) -> Option<Val<'a>> {
    let bool_of = |t: &'a Term| match eval(t, x)? {
        Val::Bool(b) => Some(b),
        _ => None,
    };
    let long_of = |t: &'a Term| match eval(t, x)? {
        Val::Long(v) => Some(v),
        _ => None,
    };
    Some(match t {
        Term::Unknown => return None,
        Term::Bool(b) => Val::Bool(*b),
        Term::Long(v) => Val::Long(*v),
        Term::Str(s) => Val::Str(s),
        Term::Entity(ty, id) => Val::Entity(ty, id),
        Term::Fact(f) => fact(*f, x?),
        Term::Set(items) => Val::Set(
            items
                .iter()
                .map(|i| eval(i, x))
                .collect::<Option<Vec<_>>>()?,
        ),
        Term::Not(a) => Val::Bool(!bool_of(a)?),
        Term::Neg(a) => Val::Long(long_of(a)?.checked_neg()?),
        Term::IsEmpty(a) => Val::Bool(set_len(&eval(a, x)?)? == 0),
        // `&&` and `||` evaluate their right side only when the left one
        // does not decide; an unknown left side decides nothing.
        Term::And(a, b) => Val::Bool(bool_of(a)? && bool_of(b)?),
        Term::Or(a, b) => Val::Bool(bool_of(a)? || bool_of(b)?),
        Term::If(c, a, b) => {
            if bool_of(c)? {
                eval(a, x)?
            } else {
                eval(b, x)?
            }
        }
        Term::Eq(a, b) => Val::Bool(equal(&eval(a, x)?, &eval(b, x)?)),
        Term::Cmp(op, a, b) => {
            let (l, r) = (long_of(a)?, long_of(b)?);
            Val::Bool(match op {
                Cmp::Less => l < r,
                Cmp::LessEq => l <= r,
                Cmp::Greater => l > r,
                Cmp::GreaterEq => l >= r,
            })
        }
        Term::Arith(op, a, b) => {
            let (l, r) = (long_of(a)?, long_of(b)?);
            // Overflow is an error in Cedar: unknown here.
            Val::Long(match op {
                Arith::Add => l.checked_add(r)?,
                Arith::Sub => l.checked_sub(r)?,
                Arith::Mul => l.checked_mul(r)?,
            })
        }
        Term::In(a, b) => {
            let Val::Entity(ty, id) = eval(a, x)? else {
                return None;
            };
            let within = |target: &Val<'_>| match target {
                Val::Entity(t, i) => in_entity(x, (ty, id), (t, i)),
                _ => None,
            };
            if let Term::Set(items) = &**b {
                let mut found = false;
                for item in items {
                    found |= within(&eval(item, x)?)?;
                }
                return Some(Val::Bool(found));
            }
            match eval(b, x)? {
                target @ Val::Entity(..) => Val::Bool(within(&target)?),
                Val::Set(items) => {
                    let mut found = false;
                    for item in &items {
                        found |= within(item)?;
                    }
                    Val::Bool(found)
                }
                _ => return None,
            }
        }
        Term::SetOp(op, a, b) => {
            let set = eval(a, x)?;
            set_len(&set)?;
            let other = eval(b, x)?;
            Val::Bool(match op {
                SetOp::Contains => set_contains(&set, &other),
                SetOp::ContainsAll => {
                    set_len(&other)?;
                    set_items(&other).all(|v| set_contains(&set, &v))
                }
                SetOp::ContainsAny => {
                    set_len(&other)?;
                    set_items(&other).any(|v| set_contains(&set, &v))
                }
            })
        }
        Term::Is(a, ty) => match eval(a, x)? {
            Val::Entity(t, _) => Val::Bool(t == ty),
            _ => return None,
        },
        Term::Like(a, pattern) => match eval(a, x)? {
            Val::Str(s) => Val::Bool(pattern.matches(s)),
            _ => return None,
        },
    })
}

/// `a in b` for entities: `a == b`, or `b` is an ancestor of `a`. In an
/// issuance request the workload's only ancestor is its node; the node,
/// the entry and the action have none (the action entity is not in the
/// request's entities).
/// `None` without the facts, unless `a == b`.
fn in_entity(
    x: Option<&IssueFacts<'_>>,
    a: (&EntityType, &str),
    b: (&EntityType, &str),
) -> Option<bool> {
    if a == b {
        return Some(true);
    }
    let x = x?;
    Some(a == (&WORKLOAD, x.workload_id) && b == (&NODE, x.node.spiffe_id.as_str()))
}

/// The number of elements of a set value (`None`: not a set).
fn set_len(v: &Val<'_>) -> Option<usize> {
    match v {
        Val::Strs(s) => Some(s.len()),
        Val::Set(s) => Some(s.len()),
        _ => None,
    }
}

fn set_items<'a, 'b>(v: &'b Val<'a>) -> Box<dyn Iterator<Item = Val<'a>> + 'b> {
    match v {
        Val::Strs(s) => Box::new(s.iter().map(|s| Val::Str(s))),
        Val::Set(items) => Box::new(items.iter().cloned()),
        _ => Box::new(std::iter::empty()),
    }
}

fn set_contains(set: &Val<'_>, v: &Val<'_>) -> bool {
    match (set, v) {
        (Val::Strs(s), Val::Str(x)) => s.iter().any(|e| e == x),
        (Val::Strs(_), _) => false,
        _ => set_items(set).any(|e| equal(&e, v)),
    }
}

/// Cedar's `==`: values of different types are different, sets are equal
/// when they hold the same elements.
fn equal(a: &Val<'_>, b: &Val<'_>) -> bool {
    match (a, b) {
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Long(x), Val::Long(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Entity(t, i), Val::Entity(u, j)) => t == u && i == j,
        (Val::Strs(_) | Val::Set(_), Val::Strs(_) | Val::Set(_)) => {
            set_items(a).all(|v| set_contains(b, &v)) && set_items(b).all(|v| set_contains(a, &v))
        }
        _ => false,
    }
}

/// Checks that the pre-filter's value of `place.name` is `cedar` (the
/// value in the Cedar entity or context).
#[cfg(test)]
pub(super) fn check_attr(
    place: Place,
    name: &str,
    facts: &IssueFacts<'_>,
    cedar: &cedar_policy::EvalResult,
) -> Result<(), String> {
    use cedar_policy::EvalResult as E;
    let (f, _) = place
        .attr(name)
        .ok_or_else(|| format!("{place:?}.{name} is not modelled"))?;
    let ours = fact(f, facts);
    let same = match (&ours, cedar) {
        (Val::Bool(a), E::Bool(b)) => a == b,
        (Val::Long(a), E::Long(b)) => a == b,
        (Val::Str(a), E::String(b)) => a == b,
        (Val::Entity(ty, id), E::EntityUid(uid)) => {
            **ty == EntityType::of_name(&uid.type_name().to_string()) && *id == uid.id().unescaped()
        }
        (Val::Strs(a), E::Set(b)) => {
            let a: std::collections::BTreeSet<&str> = a.iter().map(String::as_str).collect();
            a.len() == b.len()
                && b.iter()
                    .all(|v| matches!(v, E::String(s) if a.contains(s.as_str())))
        }
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(format!(
            "{place:?}.{name}: ours {ours:?}, Cedar's {cedar:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pattern(p: &str) -> Vec<PatternElem> {
        p.chars()
            .map(|c| match c {
                '*' => PatternElem::Wildcard,
                c => PatternElem::Char(c),
            })
            .collect()
    }

    #[test]
    fn like_matches_as_cedar_does() {
        for (s, p, want) in [
            ("spiffe://td/payments/api", "spiffe://td/payments/*", true),
            ("spiffe://td/payments", "spiffe://td/payments/*", false),
            ("spiffe://td/payments/", "spiffe://td/payments/*", true),
            ("abc", "a*c", true),
            ("ac", "a*c", true),
            ("abcbc", "a*bc", true),
            ("abcbd", "a*bc", false),
            ("", "*", true),
            ("", "", true),
            ("a", "", false),
            ("ééx", "é*x", true),
            ("xaaay", "x*a*y", true),
            ("xy", "x**y", true),
            ("mississippi", "m*iss*ppi", true),
            ("mississippi", "m*iss*ppx", false),
            ("aXa", "a*a", true),
            ("a", "a*a", false),
            ("aba", "*b*", true),
            ("ab", "a*b*", true),
            ("abc", "abc", true),
            ("abcd", "abc", false),
        ] {
            assert_eq!(
                Pattern::new(&pattern(p)).matches(s),
                want,
                "{s:?} like {p:?}"
            );
        }
    }
}
