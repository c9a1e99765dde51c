//! The part of the kubelet's pod list (`GET /pods`, a `v1.PodList`) that workload attestation
//! reads, and how a pod and one of its containers become `k8s` selectors.
//!
//! Only the fields used are modelled; everything else in the (large) answer is skipped
//! while parsing. A field the kubelet leaves out or writes as `null` reads as empty.

use std::collections::{BTreeMap, HashMap};

use mayfly::selector::{Selector, SelectorSet};
use serde::{Deserialize, Deserializer};

/// A `v1.PodList`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodList {
    /// The pods.
    #[serde(default, deserialize_with = "null_default")]
    pub items: Vec<Pod>,
}

/// A `v1.Pod`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pod {
    /// Name, namespace, UID, labels, owners.
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: PodMeta,
    /// Service account and node.
    #[serde(default, deserialize_with = "null_default")]
    pub spec: PodSpec,
    /// Phase and container statuses.
    #[serde(default, deserialize_with = "null_default")]
    pub status: PodStatus,
}

/// The pod's `metadata`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    /// Pod name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// Namespace.
    #[serde(default, deserialize_with = "null_default")]
    pub namespace: String,
    /// Pod UID.
    #[serde(default, deserialize_with = "null_default")]
    pub uid: String,
    /// Labels.
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    /// The objects that own the pod (a ReplicaSet, a Job, a StatefulSet, a DaemonSet, ...).
    #[serde(default, deserialize_with = "null_default")]
    pub owner_references: Vec<OwnerReference>,
}

/// One `metadata.ownerReferences` item.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OwnerReference {
    /// Kind of the owner (`ReplicaSet`).
    #[serde(default, deserialize_with = "null_default")]
    pub kind: String,
    /// Its name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// Its UID.
    #[serde(default, deserialize_with = "null_default")]
    pub uid: String,
}

/// The pod's `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// The service account the pod runs as.
    #[serde(default, deserialize_with = "null_default")]
    pub service_account_name: String,
    /// The node the pod is bound to.
    #[serde(default, deserialize_with = "null_default")]
    pub node_name: String,
}

/// The pod's `status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    #[serde(default, deserialize_with = "null_default")]
    pub phase: String,
    /// The app containers.
    #[serde(default, deserialize_with = "null_default")]
    pub container_statuses: Vec<ContainerStatus>,
    /// The init containers (sidecars included).
    #[serde(default, deserialize_with = "null_default")]
    pub init_container_statuses: Vec<ContainerStatus>,
    /// Ephemeral (debug) containers.
    #[serde(default, deserialize_with = "null_default")]
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

/// One container's status.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerStatus {
    /// Container name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// The image as the spec names it (`nginx:1.27`, as resolved by the runtime).
    #[serde(default, deserialize_with = "null_default")]
    pub image: String,
    /// The image by digest (`docker.io/library/nginx@sha256:…`).
    #[serde(default, rename = "imageID", deserialize_with = "null_default")]
    pub image_id: String,
    /// `<runtime>://<id>` (`containerd://…`, `cri-o://…`, `docker://…`); empty until the
    /// container was created.
    #[serde(default, rename = "containerID", deserialize_with = "null_default")]
    pub container_id: String,
}

impl ContainerStatus {
    /// The container ID without its `<runtime>://` prefix.
    pub fn bare_id(&self) -> Option<&str> {
        let (_, id) = self.container_id.split_once("://")?;
        (!id.is_empty()).then_some(id)
    }
}

impl Pod {
    /// The status of the container whose ID is `container_id` (64 hex digits, as read from
    /// the cgroup), among the app, init and ephemeral containers.
    pub fn container(&self, container_id: &str) -> Option<&ContainerStatus> {
        let s = &self.status;
        s.container_statuses
            .iter()
            .chain(&s.init_container_statuses)
            .chain(&s.ephemeral_container_statuses)
            .find(|c| c.bare_id() == Some(container_id))
    }

    /// Whether the pod has finished for good: all its containers terminated and none will
    /// restart (phase `Succeeded` or `Failed`).
    pub fn is_finished(&self) -> bool {
        matches!(self.status.phase.as_str(), "Succeeded" | "Failed")
    }

    /// The `k8s` selectors of a process in `container` of this pod, spelled as SPIRE spells
    /// them so that entries port:
    ///
    /// `ns`, `sa`, `pod-uid`, `pod-name`, `node-name`, `pod-label:<key>:<value>`,
    /// `pod-owner:<Kind>:<name>`, `pod-owner-uid:<Kind>:<uid>`, `container-name`,
    /// `container-image` (both the image and the image ID), `pod-image` and `pod-init-image`
    /// (every app and init container's image and image ID), `pod-image-count` and
    /// `pod-init-image-count`. A fact the kubelet left empty gives no selector.
    pub fn selectors(&self, container: &ContainerStatus) -> SelectorSet {
        let mut out = SelectorSet::new();
        let mut add = |key: &str, value: &str| {
            if !value.is_empty()
                && let Ok(s) = Selector::new("k8s", format!("{key}:{value}"))
            {
                out.insert(s);
            }
        };
        let (meta, spec, status) = (&self.metadata, &self.spec, &self.status);
        add("ns", &meta.namespace);
        add("sa", &spec.service_account_name);
        add("pod-uid", &meta.uid);
        add("pod-name", &meta.name);
        add("node-name", &spec.node_name);
        for (k, v) in &meta.labels {
            // A label's value may be empty; its key never is.
            add("pod-label", &format!("{k}:{v}"));
        }
        for owner in &meta.owner_references {
            if !owner.kind.is_empty() {
                add("pod-owner", &with_kind(&owner.kind, &owner.name));
                add("pod-owner-uid", &with_kind(&owner.kind, &owner.uid));
            }
        }
        add("container-name", &container.name);
        add("container-image", &container.image);
        add("container-image", &container.image_id);
        for c in &status.container_statuses {
            add("pod-image", &c.image);
            add("pod-image", &c.image_id);
        }
        for c in &status.init_container_statuses {
            add("pod-init-image", &c.image);
            add("pod-init-image", &c.image_id);
        }
        add(
            "pod-image-count",
            &status.container_statuses.len().to_string(),
        );
        add(
            "pod-init-image-count",
            &status.init_container_statuses.len().to_string(),
        );
        out
    }
}

/// `<Kind>:<value>`, or nothing when the value is empty.
fn with_kind(kind: &str, value: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!("{kind}:{value}")
    }
}

/// The pods of one list, by UID.
#[derive(Debug, Clone, Default)]
pub struct PodIndex(HashMap<String, Pod>);

impl PodIndex {
    /// Indexes `list` by pod UID (pods without a UID are left out).
    pub fn new(list: PodList) -> Self {
        Self(
            list.items
                .into_iter()
                .filter(|p| !p.metadata.uid.is_empty())
                .map(|p| (p.metadata.uid.clone(), p))
                .collect(),
        )
    }

    /// Parses a kubelet answer.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<PodList>(body).map(Self::new)
    }

    /// The pod with UID `uid`.
    pub fn get(&self, uid: &str) -> Option<&Pod> {
        self.0.get(uid)
    }

    /// How many pods are listed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no pod is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads `null` as the type's default (the kubelet writes some empty fields as `null`).
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/pods` answer as a kubelet (v1.30, containerd) returns it, trimmed to three pods:
    /// a Deployment's pod with an init container and a sidecar, a finished Job pod, and a
    /// pod whose container is still being created.
    const FIXTURE: &[u8] = include_bytes!("../../tests/data/kubelet-pods.json");

    const WEB_POD: &str = "7f3c1a52-1b2e-4a55-9d1e-6c0e8f2b9a11";
    const WEB_CID: &str = "4c5d8e2f9a1b3c7d6e0f2a4b8c1d3e5f7a9b0c2d4e6f8a1b3c5d7e9f0a2b4c6d";
    const INIT_CID: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    fn sels(list: &[&str]) -> SelectorSet {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_kubelet_answer_maps_to_the_right_selectors() {
        let index = PodIndex::from_json(FIXTURE).unwrap();
        assert_eq!(index.len(), 3);
        let pod = index.get(WEB_POD).unwrap();
        let app = pod.container(WEB_CID).unwrap();
        assert_eq!(app.name, "web");
        let got = pod.selectors(app);
        let want = sels(&[
            "k8s:ns:payments",
            "k8s:sa:web",
            "k8s:pod-uid:7f3c1a52-1b2e-4a55-9d1e-6c0e8f2b9a11",
            "k8s:pod-name:web-6d4cf56db6-x2x7q",
            "k8s:node-name:worker-1",
            "k8s:pod-label:app:web",
            "k8s:pod-label:pod-template-hash:6d4cf56db6",
            "k8s:pod-label:tier:",
            "k8s:pod-owner:ReplicaSet:web-6d4cf56db6",
            "k8s:pod-owner-uid:ReplicaSet:0e9b4a3c-5d2f-4c1b-8a7e-3f6d2c1b0a99",
            "k8s:container-name:web",
            "k8s:container-image:registry.example.com/payments/web:1.4.2",
            "k8s:container-image:registry.example.com/payments/web@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "k8s:pod-image:registry.example.com/payments/web:1.4.2",
            "k8s:pod-image:registry.example.com/payments/web@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "k8s:pod-image:docker.io/envoyproxy/envoy:v1.31.0",
            "k8s:pod-image:docker.io/envoyproxy/envoy@sha256:60303ae22b998861bce3b3f7d0f8b4e5bd4b3e1fae0ef6f0c7e5a3a1f0b2c3d4",
            "k8s:pod-init-image:docker.io/library/busybox:1.36",
            "k8s:pod-init-image:docker.io/library/busybox@sha256:3fbc632167424a6d997e74f52b878d7cc478225cffac6bc977eedfe51c7f4e79",
            "k8s:pod-image-count:2",
            "k8s:pod-init-image-count:1",
        ]);
        assert_eq!(
            got,
            want,
            "extra: {:?}",
            got.difference(&want).collect::<Vec<_>>()
        );

        // An init container is found too, and names itself.
        let init = pod.container(INIT_CID).unwrap();
        let got = pod.selectors(init);
        assert!(got.contains(&"k8s:container-name:migrate".parse().unwrap()));
        assert!(
            got.contains(
                &"k8s:container-image:docker.io/library/busybox:1.36"
                    .parse()
                    .unwrap()
            )
        );
        assert!(!got.contains(&"k8s:container-name:web".parse().unwrap()));
        assert!(!pod.is_finished());
    }

    #[test]
    fn finished_and_starting_pods() {
        let index = PodIndex::from_json(FIXTURE).unwrap();
        let job = index.get("c0ffee00-0000-4000-8000-00000000b0b0").unwrap();
        assert!(job.is_finished());
        let got = job.selectors(&job.status.container_statuses[0]);
        assert!(got.contains(&"k8s:pod-owner:Job:nightly-report-28731540".parse().unwrap()));
        // No labels, no init containers: no such selectors, and the counts say so.
        assert!(!got.iter().any(|s| s.value().starts_with("pod-label:")));
        assert!(got.contains(&"k8s:pod-init-image-count:0".parse().unwrap()));

        let starting = index.get("5a5a5a5a-1111-4222-8333-944444444444").unwrap();
        assert!(!starting.is_finished());
        // Its container has no ID yet: nothing matches, not even an empty ID.
        assert!(starting.container("").is_none());
        assert!(starting.status.container_statuses[0].bare_id().is_none());
    }

    #[test]
    fn the_runtime_prefix_is_not_part_of_the_id() {
        for (raw, id) in [
            ("containerd://abc", Some("abc")),
            ("cri-o://abc", Some("abc")),
            ("docker://abc", Some("abc")),
            ("abc", None),
            ("containerd://", None),
            ("", None),
        ] {
            let c = ContainerStatus {
                container_id: raw.into(),
                ..Default::default()
            };
            assert_eq!(c.bare_id(), id, "{raw}");
        }
    }

    #[test]
    fn nulls_and_missing_fields_read_as_empty() {
        let index = PodIndex::from_json(
            br#"{"kind":"PodList","items":[{"metadata":{"uid":"u1","labels":null,"ownerReferences":null},"spec":null,"status":{"containerStatuses":null}},{"metadata":{"name":"no-uid"}}]}"#,
        )
        .unwrap();
        assert_eq!(index.len(), 1, "a pod without a UID is left out");
        let pod = index.get("u1").unwrap();
        assert!(pod.metadata.labels.is_empty() && pod.status.container_statuses.is_empty());
        assert!(
            PodIndex::from_json(br#"{"items":null}"#)
                .unwrap()
                .is_empty()
        );
        assert!(PodIndex::from_json(b"not json").is_err());
        assert!(PodIndex::from_json(br#"{"items":{}}"#).is_err());
    }
}
