//! The compiled policy set and the decision function.

use std::collections::{HashMap, HashSet};

use cedar_policy::{
    ActionConstraint, Authorizer, Decision as CedarDecision, Entities, Entity, EntityUid, PolicyId,
    PolicySet,
};
use mayfly::ttl::Ttl;
use serde::Serialize;
use time::OffsetDateTime;

use super::loader::{LoadError, LoadErrors, LoadedPolicies};
use super::prefilter::{ActionFilter, IssueFacts};
use super::request::{self, Action, CedarInput, Issue, IssueInput, PolicyRequest};
use super::schema;

/// The outcome of a policy decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Why: the ids of the permits that allowed it, or of the forbids that
    /// denied it, or a "no policy permits ..." sentence when nothing
    /// permitted it (default deny).
    pub reasons: Vec<String>,
    /// The shortest `@max_ttl` of the permits that allowed it, if any.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_ttl")]
    pub ttl_cap: Option<Ttl>,
    /// Evaluation errors (`policy <id>: <message>`); any error denies.
    pub errors: Vec<String>,
}

fn ser_ttl<S: serde::Serializer>(t: &Option<Ttl>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&t.to_string()),
        None => s.serialize_none(),
    }
}

impl Decision {
    fn deny(reason: String) -> Self {
        Self {
            allowed: false,
            reasons: vec![reason],
            ttl_cap: None,
            errors: Vec::new(),
        }
    }

    /// The default deny: no policy permits the request.
    fn no_permit(action: &Action, principal: &EntityUid, resource: &EntityUid) -> Self {
        Self::deny(format!(
            "no policy permits {} for {principal} on {resource}",
            action.name()
        ))
    }

    /// `ttl` limited by the cap, if any.
    pub fn cap(&self, ttl: Ttl) -> Ttl {
        match self.ttl_cap {
            Some(cap) if cap < ttl => cap,
            _ => ttl,
        }
    }

    /// The reasons, joined for messages.
    pub fn reasons_text(&self) -> String {
        let mut all = self.reasons.clone();
        all.extend(self.errors.iter().cloned());
        all.join("; ")
    }
}

/// A compiled, validated policy set, ready to decide.
#[derive(Debug)]
pub struct Engine {
    loaded: LoadedPolicies,
    authorizer: Authorizer,
    /// Action uid and entity (with its `admin` group parent), by name.
    actions: HashMap<String, (EntityUid, Entity)>,
    /// For each action, the policies whose action scope can match it, so
    /// that a decision evaluates only those (the result is the same: the
    /// others cannot apply).
    per_action: HashMap<String, PolicySet>,
    /// For the issuance actions, the same policies behind the pre-filter.
    filters: HashMap<String, ActionFilter>,
    /// Node and entry entities already built.
    cache: request::EntityCache,
}

impl Engine {
    /// An engine over policies loaded by [`super::loader`].
    pub fn new(loaded: LoadedPolicies) -> Result<Self, LoadErrors> {
        let fail = |message: String| {
            LoadErrors(vec![LoadError {
                file: "<schema>".into(),
                line: None,
                column: None,
                message,
            }])
        };
        let schema = schema::schema().map_err(|e| fail(e.to_owned()))?;
        let action_entities = schema
            .action_entities()
            .map_err(|e| fail(format!("schema actions: {e}")))?;
        let actions: HashMap<String, (EntityUid, Entity)> = action_entities
            .iter()
            .map(|e| {
                let uid = e.uid();
                (uid.id().unescaped().to_owned(), (uid, e.clone()))
            })
            .collect();
        let mut per_action = HashMap::new();
        for (name, (uid, _)) in &actions {
            let mut scope: HashSet<&EntityUid> = HashSet::from([uid]);
            if let Some(ancestors) = action_entities.ancestors(uid) {
                scope.extend(ancestors);
            }
            let mut set = PolicySet::new();
            for policy in loaded.set.policies() {
                let applies = match policy.action_constraint() {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(a) => &a == uid,
                    ActionConstraint::In(list) => list.iter().any(|a| scope.contains(a)),
                };
                if applies {
                    set.add(policy.clone())
                        .map_err(|e| fail(format!("policy {}: {e}", policy.id())))?;
                }
            }
            per_action.insert(name.clone(), set);
        }
        let filters = [Action::IssueX509, Action::IssueJwt]
            .iter()
            .filter_map(|a| {
                let set = per_action.get(a.name())?;
                Some((
                    a.name().to_owned(),
                    ActionFilter::new(a.name(), set.policies().cloned()),
                ))
            })
            .collect();
        Ok(Self {
            loaded,
            authorizer: Authorizer::new(),
            actions,
            per_action,
            filters,
            cache: request::EntityCache::default(),
        })
    }

    /// The built-in policy set alone.
    pub fn builtin() -> Result<Self, LoadErrors> {
        Self::new(super::loader::compile(true, &[])?)
    }

    /// How many policies are loaded.
    pub fn len(&self) -> usize {
        self.loaded.len()
    }

    /// Whether no policy is loaded (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }

    /// Whether the schema defines action `name`.
    pub fn knows_action(&self, name: &str) -> bool {
        self.actions.contains_key(name)
    }

    /// Decides `req` at `now`. Never fails: a request that cannot be
    /// evaluated is denied with the error.
    ///
    /// Issuance requests go through the pre-filter ([`super::prefilter`]):
    /// Cedar evaluates only the policies that can be satisfied, which gives
    /// the decision of the full set.
    pub fn decide(&self, req: &PolicyRequest<'_>, now: OffsetDateTime) -> Decision {
        self.decide_with(req, now, true)
    }

    /// [`Engine::decide`] without the pre-filter and without cached
    /// entities: Cedar evaluates every policy whose action scope matches.
    /// The reference the pre-filter is tested against.
    #[cfg(test)]
    pub(super) fn decide_full_set(&self, req: &PolicyRequest<'_>, now: OffsetDateTime) -> Decision {
        self.decide_with(req, now, false)
    }

    /// The ids of the issuance policies the pre-filter models, for tests.
    #[cfg(test)]
    pub(super) fn prefiltered(&self, action: &str) -> Vec<String> {
        self.filters
            .get(action)
            .map(ActionFilter::modelled)
            .unwrap_or_default()
    }

    fn decide_with(&self, req: &PolicyRequest<'_>, now: OffsetDateTime, fast: bool) -> Decision {
        let action = req.action();
        let Some((action_uid, action_entity)) = self.actions.get(action.name()) else {
            return Decision::deny(format!(
                "unknown policy action {:?}; `mayfly-server policy schema` lists them",
                action.name()
            ));
        };
        let full_set = self
            .per_action
            .get(action.name())
            .unwrap_or(&self.loaded.set);
        if fast
            && let PolicyRequest::Issue(issue) = req
            && let Some(filter) = self.filters.get(action.name())
        {
            return self.decide_issue(issue, &action, action_uid, filter, now);
        }
        let input = match request::to_cedar_cached(req, now, fast.then_some(&self.cache)) {
            Ok(i) => i,
            Err(e) => return Decision::deny(e.to_string()),
        };
        let mut entities = input.entities;
        // Only admin operations belong to an action group; the others match
        // `action == A` / `action in [A, ...]` by equality, without their
        // entity (fewer entities, a cheaper transitive closure).
        if matches!(action, Action::Admin(_)) {
            entities.push(action_entity.clone());
            if let Some((_, group)) = self.actions.get("admin") {
                entities.push(group.clone());
            }
        }
        self.evaluate(
            &action,
            action_uid,
            CedarInput { entities, ..input },
            full_set,
        )
    }

    /// An issuance: the pre-filter picks the policies that can be
    /// satisfied, Cedar decides on those.
    fn decide_issue(
        &self,
        issue: &Issue<'_>,
        action: &Action,
        action_uid: &EntityUid,
        filter: &ActionFilter,
        now: OffsetDateTime,
    ) -> Decision {
        let input = match IssueInput::new(issue, now, Some(&self.cache)) {
            Ok(i) => i,
            Err(e) => return Decision::deny(e.to_string()),
        };
        let facts = IssueFacts {
            action: action.name(),
            workload_id: &input.workload_id,
            task: input.task,
            node: &input.node.facts,
            entry: &input.entry.facts,
            context: &input.context,
        };
        let selected = match filter.select(&facts) {
            Ok(s) => s,
            Err(e) => return Decision::deny(format!("policy set: {e}")),
        };
        if selected.set.is_empty() {
            // What Cedar decides on an empty set, without building the
            // request.
            return Decision::no_permit(action, &input.principal(), &input.resource());
        }
        // Only the entities the selected policies can read are built:
        // Cedar decides the same without the others.
        match input.to_cedar(selected.reads, Some(&self.cache)) {
            Ok(cedar) => self.evaluate(action, action_uid, cedar, &selected.set),
            Err(e) => Decision::deny(e.to_string()),
        }
    }

    /// Evaluates `set` on `input` with Cedar.
    fn evaluate(
        &self,
        action: &Action,
        action_uid: &EntityUid,
        input: CedarInput,
        set: &PolicySet,
    ) -> Decision {
        let entities = if input.entities.is_empty() {
            Entities::empty()
        } else {
            match Entities::from_entities(input.entities, None) {
                Ok(e) => e,
                Err(e) => return Decision::deny(format!("policy entities: {e}")),
            }
        };
        let cedar_req = match cedar_policy::Request::new(
            input.principal.clone(),
            action_uid.clone(),
            input.resource.clone(),
            input.context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return Decision::deny(format!("policy request: {e}")),
        };
        let resp = self.authorizer.is_authorized(&cedar_req, set, &entities);
        let diag = resp.diagnostics();
        let mut reasons: Vec<String> = diag.reason().map(ToString::to_string).collect();
        reasons.sort();
        // Sorted, so that the order does not depend on the set's.
        let mut errors: Vec<String> = diag.errors().map(ToString::to_string).collect();
        errors.sort();
        let mut allowed = resp.decision() == CedarDecision::Allow;
        let mut ttl_cap = None;
        if allowed {
            ttl_cap = diag
                .reason()
                .filter_map(|id| self.loaded.ttl_caps.get(id))
                .min()
                .copied();
        }
        if !errors.is_empty() && allowed {
            // Fail closed: a policy that could not be evaluated might have
            // forbidden the request.
            allowed = false;
            ttl_cap = None;
            reasons = vec!["a policy failed to evaluate (see errors)".into()];
        }
        if !allowed && reasons.is_empty() {
            return Decision {
                errors,
                ..Decision::no_permit(action, &input.principal, &input.resource)
            };
        }
        Decision {
            allowed,
            reasons,
            ttl_cap,
            errors,
        }
    }

    /// The ids of every loaded policy.
    pub fn policy_ids(&self) -> HashSet<PolicyId> {
        self.loaded.set.policies().map(|p| p.id().clone()).collect()
    }
}
