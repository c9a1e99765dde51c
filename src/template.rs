//! Identity templates: entries derived at request time from a workload's
//! selectors, so that Kubernetes workloads get an identity by namespace and
//! service account without anyone registering them (automatic pod
//! identities).
//!
//! A template is configured on the server per cluster. Agents of that
//! cluster receive it with their entries; when a workload's selectors carry
//! exactly one `k8s:ns` and one `k8s:sa` and the namespace is covered, the
//! agent derives an entry named
//! `template:<template id>:<namespace>:<service account>` and asks the server
//! to sign for it. The server derives the same entry again from that name
//! and the template it holds, checks that the template applies to the
//! calling agent, and runs policy on it like on any registered entry. No
//! controller, no stored entries, no full-list reconciles.
//!
//! Namespaces and service account names are DNS names (checked), so a
//! derived SPIFFE ID path cannot be steered outside the template.

use crate::entry::{Entry, EntryId, Scope};
use crate::k8s_psat::{is_dns_label, is_dns_subdomain};
use crate::selector::{Selector, SelectorSet};
use crate::ttl::Ttl;
use crate::{SpiffeId, TrustDomain};

/// The prefix of derived entry ids.
pub const ENTRY_ID_PREFIX: &str = "template:";

/// The default path: `ns/{namespace}/sa/{service_account}`.
pub const DEFAULT_PATH: &str = "ns/{namespace}/sa/{service_account}";

/// Why a template or a derived entry id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The path template is not usable.
    #[error("identity template path {path:?}: {reason}")]
    BadPath {
        /// The path as written.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A namespace glob has characters a namespace cannot have.
    #[error(
        "namespace pattern {0:?} may only use lowercase letters, digits, '-' and '*' (any run of characters)"
    )]
    BadGlob(String),
    /// The template id is not usable in entry ids.
    #[error("template id {0:?} must be lowercase letters, digits, '-' and '.'")]
    BadId(String),
    /// The namespace or service account is not a DNS name.
    #[error("{what} {value:?} is not a valid Kubernetes name")]
    BadName {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The namespace is not covered by the template.
    #[error("namespace {namespace:?} is not covered by identity template {template:?}")]
    NotCovered {
        /// The template.
        template: String,
        /// The namespace.
        namespace: String,
    },
    /// The derived SPIFFE ID is invalid or reserved.
    #[error("identity template {template:?} derives {id:?}, which {reason}")]
    BadSpiffeId {
        /// The template.
        template: String,
        /// The derived ID.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// A namespace pattern: literal text and `*` (any run of characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceGlob(String);

impl NamespaceGlob {
    /// Whether `ns` matches.
    pub fn matches(&self, ns: &str) -> bool {
        glob_match(self.0.as_bytes(), ns.as_bytes())
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for NamespaceGlob {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty()
            || s.len() > 63
            || !s
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
        {
            return Err(TemplateError::BadGlob(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }
}

/// `*` matches any run of bytes (greedy with backtracking to the last star).
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&b| b == b'*')
}

/// A validated identity template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityTemplate {
    id: String,
    path: String,
    namespaces: Vec<NamespaceGlob>,
    exclude_namespaces: Vec<NamespaceGlob>,
    x509_svid_ttl: Option<Ttl>,
    jwt_svid_ttl: Option<Ttl>,
}

/// Where a derived entry comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedId<'a> {
    /// The template's id.
    pub template: &'a str,
    /// The workload's namespace.
    pub namespace: &'a str,
    /// The workload's service account.
    pub service_account: &'a str,
}

impl<'a> DerivedId<'a> {
    /// Parses `template:<template>:<namespace>:<service account>`; `None`
    /// for any other id (registered entries).
    pub fn parse(entry_id: &'a str) -> Option<Self> {
        let rest = entry_id.strip_prefix(ENTRY_ID_PREFIX)?;
        let mut parts = rest.split(':');
        let (template, namespace, service_account) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            template,
            namespace,
            service_account,
        })
    }
}

impl IdentityTemplate {
    /// A template. `path` is the SPIFFE ID path after the trust domain, with
    /// `{namespace}` and `{service_account}`; it must use `{namespace}` and
    /// may not point into the reserved `/mayfly` space. An empty `namespaces`
    /// list covers every namespace.
    pub fn new(
        id: &str,
        path: &str,
        namespaces: Vec<NamespaceGlob>,
        exclude_namespaces: Vec<NamespaceGlob>,
        x509_svid_ttl: Option<Ttl>,
        jwt_svid_ttl: Option<Ttl>,
    ) -> Result<Self, TemplateError> {
        if id.is_empty()
            || id.len() > 80
            || !id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(TemplateError::BadId(id.to_owned()));
        }
        let bad = |reason: &str| TemplateError::BadPath {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if !path.contains("{namespace}") {
            return Err(bad(
                "must use {namespace} (and usually {service_account}), so that namespaces never share an identity",
            ));
        }
        let probe = path
            .replace("{namespace}", "ns")
            .replace("{service_account}", "sa");
        if probe.contains(['{', '}']) {
            return Err(bad(
                "only {namespace} and {service_account} can be used as placeholders",
            ));
        }
        let probe = probe.trim_start_matches('/');
        if probe == "mayfly" || probe.starts_with("mayfly/") {
            return Err(bad("must not be under the reserved /mayfly path"));
        }
        let td = TrustDomain::new("example.org").map_err(|e| bad(&e.to_string()))?;
        SpiffeId::from_segments(td, &probe.split('/').collect::<Vec<_>>())
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            id: id.to_owned(),
            path: path.trim_start_matches('/').to_owned(),
            namespaces,
            exclude_namespaces,
            x509_svid_ttl,
            jwt_svid_ttl,
        })
    }

    /// The template's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The path template.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the template covers namespace `ns`.
    pub fn covers(&self, ns: &str) -> bool {
        !self.exclude_namespaces.iter().any(|g| g.matches(ns))
            && (self.namespaces.is_empty() || self.namespaces.iter().any(|g| g.matches(ns)))
    }

    /// The id of the entry derived for `namespace` and `service_account`.
    pub fn entry_id(&self, namespace: &str, service_account: &str) -> String {
        format!("{ENTRY_ID_PREFIX}{}:{namespace}:{service_account}", self.id)
    }

    /// The entry this template gives a workload of `namespace` running as
    /// `service_account` under agent `parent`.
    pub fn derive_for(
        &self,
        td: &TrustDomain,
        parent: &SpiffeId,
        namespace: &str,
        service_account: &str,
    ) -> Result<Entry, TemplateError> {
        if !is_dns_label(namespace) {
            return Err(TemplateError::BadName {
                what: "namespace",
                value: namespace.to_owned(),
            });
        }
        if !is_dns_subdomain(service_account) {
            return Err(TemplateError::BadName {
                what: "service account",
                value: service_account.to_owned(),
            });
        }
        if !self.covers(namespace) {
            return Err(TemplateError::NotCovered {
                template: self.id.clone(),
                namespace: namespace.to_owned(),
            });
        }
        let path = self
            .path
            .replace("{namespace}", namespace)
            .replace("{service_account}", service_account);
        let bad_id = |reason: String| TemplateError::BadSpiffeId {
            template: self.id.clone(),
            id: format!("spiffe://{td}/{path}"),
            reason,
        };
        let spiffe_id = SpiffeId::from_segments(td.clone(), &path.split('/').collect::<Vec<_>>())
            .map_err(|e| bad_id(format!("is not valid: {e}")))?;
        if crate::id::is_reserved(&spiffe_id) {
            return Err(bad_id("is reserved for Mayfly".into()));
        }
        let id: EntryId = self
            .entry_id(namespace, service_account)
            .parse()
            .map_err(|e: crate::entry::EntryError| bad_id(e.to_string()))?;
        let mut selectors = SelectorSet::new();
        for (k, v) in [("ns", namespace), ("sa", service_account)] {
            if let Ok(s) = Selector::new("k8s", format!("{k}:{v}")) {
                selectors.insert(s);
            }
        }
        Ok(Entry {
            id,
            spiffe_id,
            parent_id: parent.clone(),
            selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: Vec::new(),
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
            hint: String::new(),
            expires_at: None,
            revision: 0,
            scope: Scope::Task,
            min_assurance: None,
            max_attestation_age: None,
        })
    }

    /// The entry a workload with `selectors` gets from this template, if
    /// any: it needs exactly one `k8s:ns` and one `k8s:sa` selector and a
    /// covered namespace.
    pub fn derive(
        &self,
        td: &TrustDomain,
        parent: &SpiffeId,
        selectors: &SelectorSet,
    ) -> Option<Entry> {
        let one = |prefix: &str| {
            let mut it = selectors
                .iter()
                .filter(|s| s.kind() == "k8s")
                .filter_map(|s| s.value().strip_prefix(prefix));
            let first = it.next()?;
            it.next().is_none().then_some(first)
        };
        let (ns, sa) = (one("ns:")?, one("sa:")?);
        self.derive_for(td, parent, ns, sa).ok()
    }

    /// The wire form.
    pub fn to_proto(&self) -> crate::proto::node::IdentityTemplate {
        crate::proto::node::IdentityTemplate {
            id: self.id.clone(),
            path: self.path.clone(),
            namespaces: self.namespaces.iter().map(|g| g.0.clone()).collect(),
            exclude_namespaces: self
                .exclude_namespaces
                .iter()
                .map(|g| g.0.clone())
                .collect(),
            x509_svid_ttl_seconds: ttl_secs(self.x509_svid_ttl),
            jwt_svid_ttl_seconds: ttl_secs(self.jwt_svid_ttl),
        }
    }

    /// From the wire form, validated again.
    pub fn from_proto(p: &crate::proto::node::IdentityTemplate) -> Result<Self, TemplateError> {
        let globs = |v: &[String]| {
            v.iter()
                .map(|g| g.parse())
                .collect::<Result<Vec<NamespaceGlob>, _>>()
        };
        let ttl = |s: i64| u64::try_from(s).ok().and_then(Ttl::from_secs);
        Self::new(
            &p.id,
            &p.path,
            globs(&p.namespaces)?,
            globs(&p.exclude_namespaces)?,
            ttl(p.x509_svid_ttl_seconds),
            ttl(p.jwt_svid_ttl_seconds),
        )
    }
}

fn ttl_secs(t: Option<Ttl>) -> i64 {
    t.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn globs(v: &[&str]) -> Vec<NamespaceGlob> {
        v.iter().map(|g| g.parse().unwrap()).collect()
    }

    fn template(ns: &[&str], ex: &[&str]) -> IdentityTemplate {
        IdentityTemplate::new("k8s.prod.0", DEFAULT_PATH, globs(ns), globs(ex), None, None).unwrap()
    }

    fn sels(v: &[&str]) -> SelectorSet {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn derives_the_default_identity_with_its_selectors() {
        let td = TrustDomain::new("example.org").unwrap();
        let agent = SpiffeId::new("spiffe://example.org/mayfly/agent/k8s_psat/prod/n1").unwrap();
        let t = template(&["*"], &["kube-system"]);
        let e = t
            .derive(
                &td,
                &agent,
                &sels(&["k8s:ns:payments", "k8s:sa:api", "k8s:pod-name:api-1"]),
            )
            .unwrap();
        assert_eq!(
            e.spiffe_id.to_string(),
            "spiffe://example.org/ns/payments/sa/api"
        );
        assert_eq!(e.id.as_str(), "template:k8s.prod.0:payments:api");
        assert_eq!(e.parent_id, agent);
        assert_eq!(e.selectors, sels(&["k8s:ns:payments", "k8s:sa:api"]));
        assert_eq!(
            DerivedId::parse(e.id.as_str()).unwrap(),
            DerivedId {
                template: "k8s.prod.0",
                namespace: "payments",
                service_account: "api"
            }
        );
        // Not covered, ambiguous or incomplete selectors derive nothing.
        assert!(
            t.derive(&td, &agent, &sels(&["k8s:ns:kube-system", "k8s:sa:x"]))
                .is_none()
        );
        assert!(t.derive(&td, &agent, &sels(&["k8s:ns:a"])).is_none());
        assert!(
            t.derive(&td, &agent, &sels(&["k8s:ns:a", "k8s:ns:b", "k8s:sa:x"]))
                .is_none()
        );
        assert!(t.derive(&td, &agent, &sels(&["unix:uid:0"])).is_none());
    }

    #[test]
    fn names_cannot_escape_the_template() {
        let td = TrustDomain::new("example.org").unwrap();
        let agent = SpiffeId::new("spiffe://example.org/mayfly/agent/k8s_psat/prod/n1").unwrap();
        let t = template(&[], &[]);
        for (ns, sa) in [
            ("a/b", "x"),
            ("a", "../mayfly"),
            ("A", "x"),
            ("a", "x:y"),
            ("", "x"),
        ] {
            assert!(t.derive_for(&td, &agent, ns, sa).is_err(), "{ns} {sa}");
        }
        let t = IdentityTemplate::new("t", "mayfly/{namespace}", vec![], vec![], None, None);
        assert!(t.is_err());
        for bad in ["ns/sa", "ns/{namespace}/{pod}", "a//{namespace}"] {
            assert!(
                IdentityTemplate::new("t", bad, vec![], vec![], None, None).is_err(),
                "{bad}"
            );
        }
        assert!(IdentityTemplate::new("T:x", DEFAULT_PATH, vec![], vec![], None, None).is_err());
        assert!("Kube*".parse::<NamespaceGlob>().is_err());
        assert!(DerivedId::parse("template:a:b").is_none());
        assert!(DerivedId::parse("template:a:b:c:d").is_none());
        assert!(DerivedId::parse("0b2c").is_none());
    }

    #[test]
    fn globs_and_exclusions() {
        let t = template(&["team-*", "payments"], &["team-secret*"]);
        assert!(t.covers("team-a") && t.covers("payments") && t.covers("team-"));
        assert!(!t.covers("team-secret-x") && !t.covers("default") && !t.covers("xteam-a"));
        let g: NamespaceGlob = "a*b*c".parse().unwrap();
        assert!(g.matches("abc") && g.matches("a-b-b-c") && !g.matches("a-b-cd"));
        assert!(template(&[], &[]).covers("anything"));
    }

    #[test]
    fn wire_round_trip() {
        let t = IdentityTemplate::new(
            "k8s.prod.1",
            "k8s/prod/{namespace}/{service_account}",
            globs(&["a*"]),
            globs(&["ab"]),
            Ttl::from_secs(600),
            None,
        )
        .unwrap();
        assert_eq!(IdentityTemplate::from_proto(&t.to_proto()).unwrap(), t);
    }
}
