#!/usr/bin/env python3
"""Tests of the Helm chart in helm/mayfly, with Helm's own engine and Kubernetes' schemas.

    python3 -m pip install -r tests/helm/requirements.txt
    python3 tests/helm/test_chart.py            # unittest; -v for every test's name

The chart is rendered with the chart's defaults and with each example values file. Every check
below runs on each of them: `helm lint --strict` passes, every object validates strictly against
the Kubernetes API schema of K8S_VERSION, the security posture holds, the RBAC rules are exactly
the intended ones, the rendered server.toml and agent.toml parse and agree with the objects around
them, and values.schema.json rejects what it should. Besides: the Dockerfile (parsed with
BuildKit's parser) builds images that run what the chart runs, the schema is strict at every level
and matches values.yaml, and docs/kubernetes.md documents every value. Nothing here needs a
cluster or the network.
"""

from __future__ import annotations

import sys
import tomllib
import unittest
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dockerfile  # noqa: E402
import helm_python as helm  # noqa: E402
import kubernetes_validate  # noqa: E402
from chart_render import (  # noqa: E402
    CHART,
    NAMESPACE,
    REPO,
    VALUES_FILES,
    Rendered,
    load_values,
    render,
    render_file,
)

# The Kubernetes version `helm lint` and the schema checks use (Chart.yaml kubeVersion is >= 1.29;
# 1.30 is the oldest release most providers still maintain), and the newest one kubernetes-validate
# knows, so that an API removed since would show.
K8S_VERSION = "1.30.0"
K8S_VERSIONS = (K8S_VERSION, "1.37.0")

EXPECTED_KINDS = {
    "ConfigMap": 3,  # server.toml, agent.toml, the bundle (+1 with policy files)
    "Service": 2,
    "StatefulSet": 1,
    "DaemonSet": 1,
    "ServiceAccount": 2,
    "ClusterRole": 2,
    "ClusterRoleBinding": 2,
    "Role": 1,
    "RoleBinding": 1,
    "Pod": 1,  # the `helm test` pod
}


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {workload['metadata']['name']}")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for v in spec["volumes"]:
        if v["name"] == name:
            return v
    raise AssertionError(f"no volume {name}")


def mount(c: dict[str, Any], volume_name: str) -> dict[str, Any]:
    found = [m for m in c["volumeMounts"] if m["name"] == volume_name]
    if len(found) != 1:
        raise AssertionError(f"container {c['name']} mounts volume {volume_name} {len(found)} times")
    return found[0]


def port_number(c: dict[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    for p in c.get("ports", []):
        if p["name"] == port:
            return p["containerPort"]
    raise AssertionError(f"container {c['name']} has no port named {port}")


def every_pod_spec(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    specs = [(o["metadata"]["name"], pod_spec(o)) for o in r.all("StatefulSet") + r.all("DaemonSet")]
    specs += [(o["metadata"]["name"], o["spec"]) for o in r.all("Pod")]
    return specs


def rules(
    role: dict[str, Any],
) -> list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    """Rules as sorted tuples, so that comparisons do not depend on order."""
    return sorted(
        (
            tuple(sorted(r.get("apiGroups", []))),
            tuple(sorted(r.get("resources", []))),
            tuple(sorted(r.get("verbs", []))),
            tuple(sorted(r.get("resourceNames", []))),
        )
        for r in role["rules"]
    )


class ValuesSets(unittest.TestCase):
    """Runs each check on every values set (defaults and example files), reporting which failed."""

    rendered: ClassVar[dict[str, Rendered]] = {}

    @classmethod
    def setUpClass(cls) -> None:
        cls.rendered = {name: render_file(name) for name in VALUES_FILES}


class LintAndValidate(ValuesSets):
    def test_helm_lint_strict_passes(self) -> None:
        for name in self.rendered:
            with self.subTest(values=name):
                report = helm.lint(
                    CHART,
                    load_values(VALUES_FILES[name]),
                    strict=True,
                    namespace=NAMESPACE,
                    kube_version=f"v{K8S_VERSION}",
                )
                problems = [m for m in report["messages"] if m["severity"] >= 2]
                self.assertEqual(report["errors"], [], report)
                self.assertEqual(problems, [], report)
                self.assertEqual(report["total_charts_linted"], 1)

    def test_every_object_validates_strictly_against_kubernetes(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                for obj, version in [(o, v) for o in r.objects for v in K8S_VERSIONS]:
                    ident = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
                    try:
                        kubernetes_validate.validate(obj, version, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        path = ".".join(str(p) for p in e.path)
                        self.fail(f"{name}: {ident} is invalid for Kubernetes {version}: {path}: {e.message}")
                    except kubernetes_validate.SchemaNotFoundError as e:
                        self.fail(f"{name}: {ident}: {e.message}")

    def test_the_objects_are_the_expected_ones(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                counts: dict[str, int] = {}
                for obj in r.objects:
                    counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
                expected = dict(EXPECTED_KINDS)
                if r.values["server"]["policy"]["files"]:
                    expected["ConfigMap"] += 1
                self.assertEqual(counts, expected)

    def test_names_are_unique_and_namespaced_objects_in_the_release_namespace(self) -> None:
        cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                seen = set()
                for obj in r.objects:
                    key = (obj["kind"], obj["metadata"]["name"])
                    self.assertNotIn(key, seen)
                    seen.add(key)
                    if obj["kind"] in cluster_scoped:
                        self.assertNotIn("namespace", obj["metadata"])
                    else:
                        self.assertEqual(obj["metadata"].get("namespace"), NAMESPACE, key)

    def test_standard_labels_everywhere_and_selectors_match_pods(self) -> None:
        standard = [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ]
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                for obj in r.objects:
                    labels = obj["metadata"].get("labels", {})
                    for key in standard:
                        self.assertIn(key, labels, f"{obj['kind']}/{obj['metadata']['name']}")
                    self.assertEqual(labels["app.kubernetes.io/instance"], "mayfly")
                for wl in r.all("StatefulSet") + r.all("DaemonSet"):
                    selector = wl["spec"]["selector"]["matchLabels"]
                    pod_labels = wl["spec"]["template"]["metadata"]["labels"]
                    self.assertLessEqual(selector.items(), pod_labels.items())
                sts, ds = r.one("StatefulSet"), r.one("DaemonSet")
                for svc in r.all("Service"):
                    self.assertEqual(svc["spec"]["selector"], sts["spec"]["selector"]["matchLabels"])
                self.assertNotEqual(sts["spec"]["selector"], ds["spec"]["selector"])

    def test_long_release_names_stay_within_kubernetes_limits(self) -> None:
        r = render(release="a-very-long-release-name-that-goes-on-and-on-and-on-and-on")
        for obj in r.objects:
            self.assertLessEqual(len(obj["metadata"]["name"]), 63, obj["metadata"]["name"])
            for value in obj["metadata"].get("labels", {}).values():
                self.assertLessEqual(len(value), 63)
        # A StatefulSet's pods are "<name>-0" and carry a controller-revision-hash label of
        # "<name>-<10 chars>", which must fit 63 characters.
        self.assertLessEqual(len(r.one("StatefulSet")["metadata"]["name"]) + 11, 63)
        for obj in r.objects:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


class SecurityPosture(ValuesSets):
    def test_no_host_network_and_no_privileged_anything(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                for name, spec in every_pod_spec(r):
                    self.assertFalse(spec.get("hostNetwork", False), name)
                    self.assertFalse(spec.get("hostIPC", False), name)
                    for c in spec["containers"] + spec.get("initContainers", []):
                        sc = c["securityContext"]
                        self.assertFalse(sc.get("privileged", False), name)
                        self.assertIs(sc["allowPrivilegeEscalation"], False, name)
                        self.assertIs(sc["readOnlyRootFilesystem"], True, name)
                        self.assertEqual(sc["capabilities"]["drop"], ["ALL"], name)
                        self.assertNotIn("hostPort", str(c.get("ports", [])), name)
                    self.assertEqual(
                        spec["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"}, name
                    )

    def test_server_runs_as_non_root_with_no_capability(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                spec = pod_spec(r.one("StatefulSet"))
                self.assertIs(spec["securityContext"]["runAsNonRoot"], True)
                self.assertNotEqual(spec["securityContext"].get("runAsUser"), 0)
                c = container(r.one("StatefulSet"), "server")
                self.assertIs(c["securityContext"]["runAsNonRoot"], True)
                self.assertNotIn("add", c["securityContext"]["capabilities"])
                self.assertFalse(spec.get("hostPID", False))
                self.assertFalse(any("hostPath" in v for v in spec["volumes"]))

    def test_agent_host_access_is_exactly_pid_namespace_socket_and_data(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                ds = r.one("DaemonSet")
                spec = pod_spec(ds)
                self.assertIs(spec["hostPID"], True)
                host_paths = sorted(v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v)
                expected = [r.values["agent"]["socketDir"]]
                if r.values["agent"]["dataDir"]["type"] == "hostPath":
                    expected.append(r.values["agent"]["dataDir"]["hostPath"])
                else:
                    self.assertEqual(volume(spec, "data"), {"name": "data", "emptyDir": {}})
                self.assertEqual(host_paths, sorted(expected))
                caps = container(ds, "agent")["securityContext"]["capabilities"]
                if r.values["agent"]["sysPtrace"]:
                    self.assertEqual(caps.get("add"), ["SYS_PTRACE"])
                else:
                    self.assertNotIn("add", caps)

    def test_sys_ptrace_only_when_asked_for(self) -> None:
        plain = render()
        self.assertNotIn("add", container(plain.one("DaemonSet"), "agent")["securityContext"]["capabilities"])
        with_ptrace = render({"agent": {"sysPtrace": True}})
        caps = container(with_ptrace.one("DaemonSet"), "agent")["securityContext"]["capabilities"]
        self.assertEqual(caps, {"drop": ["ALL"], "add": ["SYS_PTRACE"]})

    def test_test_pod_is_an_unprivileged_workload(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                pod = r.one("Pod")
                self.assertEqual(pod["metadata"]["annotations"]["helm.sh/hook"], "test")
                spec = pod["spec"]
                self.assertIs(spec["securityContext"]["runAsNonRoot"], True)
                self.assertIs(spec["automountServiceAccountToken"], False)
                self.assertFalse(spec.get("hostPID", False))
                socket_volume = volume(spec, "sockets")
                self.assertEqual(socket_volume["hostPath"]["path"], r.values["agent"]["socketDir"])
                self.assertIs(mount(spec["containers"][0], "sockets")["readOnly"], True)
                socket = r.agent_toml["agent"]["socket_path"]
                env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
                self.assertEqual(env["SPIFFE_ENDPOINT_SOCKET"], f"unix://{socket}")

    def test_tests_can_be_disabled(self) -> None:
        r = render({"tests": {"enabled": False}})
        self.assertEqual(r.all("Pod"), [])

    def test_every_container_has_requests_and_limits(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                for name, spec in every_pod_spec(r):
                    for c in spec["containers"]:
                        for kind in ("requests", "limits"):
                            self.assertIn("cpu", c["resources"][kind], name)
                            self.assertIn("memory", c["resources"][kind], name)


class Rbac(ValuesSets):
    def test_server_cluster_role_is_token_reviews_pods_and_nodes(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                role = r.one("ClusterRole", f"{r.fullname}-server")
                self.assertEqual(
                    rules(role),
                    [
                        (("",), ("nodes", "pods"), ("get",), ()),
                        (("authentication.k8s.io",), ("tokenreviews",), ("create",), ()),
                    ],
                )

    def test_server_role_writes_only_the_bundle_config_map(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                role = r.one("Role", f"{r.fullname}-server")
                bundle = f"{r.fullname}-bundle"
                self.assertEqual(
                    rules(role), [(("",), ("configmaps",), ("get", "patch", "update"), (bundle,))]
                )
                r.one("ConfigMap", bundle)

    def test_agent_cluster_role_is_nodes_pods_only(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                role = r.one("ClusterRole", f"{r.fullname}-agent")
                expected = [(("",), ("nodes/pods",), ("get",), ())]
                if r.values["agent"]["kubelet"]["grantNodesProxy"]:
                    expected.append((("",), ("nodes/proxy",), ("get",), ()))
                self.assertEqual(rules(role), sorted(expected))

    def test_nodes_proxy_only_when_asked_for(self) -> None:
        r = render({"agent": {"kubelet": {"grantNodesProxy": True}}})
        role = r.one("ClusterRole", f"{r.fullname}-agent")
        self.assertEqual(
            rules(role),
            [(("",), ("nodes/pods",), ("get",), ()), (("",), ("nodes/proxy",), ("get",), ())],
        )

    def test_bindings_tie_each_role_to_its_own_service_account(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                for component, workload in (("server", r.one("StatefulSet")), ("agent", r.one("DaemonSet"))):
                    sa = pod_spec(workload)["serviceAccountName"]
                    r.one("ServiceAccount", sa)
                    kinds = [("ClusterRoleBinding", "ClusterRole")]
                    if component == "server":
                        kinds.append(("RoleBinding", "Role"))
                    for binding_kind, role_kind in kinds:
                        binding = r.one(binding_kind, f"{r.fullname}-{component}")
                        self.assertEqual(binding["roleRef"]["kind"], role_kind)
                        self.assertEqual(binding["roleRef"]["name"], f"{r.fullname}-{component}")
                        self.assertEqual(
                            binding["subjects"],
                            [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
                        )


class Probes(ValuesSets):
    def test_server_probes_hit_the_public_http_port(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                c = container(r.one("StatefulSet"), "server")
                http_port = int(r.server_toml["server"]["http_address"].rsplit(":", 1)[1])
                self.assertTrue(r.server_toml["server"]["http_address"].startswith("0.0.0.0:"))
                self.assertEqual(c["livenessProbe"]["httpGet"]["path"], "/healthz")
                self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/readyz")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    self.assertEqual(port_number(c, c[probe]["httpGet"]["port"]), http_port, probe)

    def test_agent_probes_hit_its_health_address(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                c = container(r.one("DaemonSet"), "agent")
                health = r.agent_toml["agent"]["health_address"]
                self.assertTrue(health.startswith("0.0.0.0:"))
                self.assertEqual(c["livenessProbe"]["httpGet"]["path"], "/healthz")
                self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/readyz")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    self.assertEqual(
                        port_number(c, c[probe]["httpGet"]["port"]), int(health.rsplit(":", 1)[1])
                    )

    def test_service_ports_reach_the_server_listeners(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                c = container(r.one("StatefulSet"), "server")
                server = r.server_toml["server"]
                svc = r.one("Service", f"{r.fullname}-server")
                by_name = {p["name"]: p for p in svc["spec"]["ports"]}
                self.assertEqual(
                    port_number(c, by_name["grpc-node"]["targetPort"]),
                    int(server["bind_address"].rsplit(":", 1)[1]),
                )
                self.assertEqual(
                    port_number(c, by_name["http"]["targetPort"]),
                    int(server["http_address"].rsplit(":", 1)[1]),
                )
                self.assertEqual(by_name["grpc-node"]["port"], r.values["server"]["service"]["nodeApiPort"])
                headless = r.one("Service", f"{r.fullname}-server-headless")
                self.assertEqual(headless["spec"]["clusterIP"], "None")
                self.assertEqual(r.one("StatefulSet")["spec"]["serviceName"], headless["metadata"]["name"])


class RenderedConfig(ValuesSets):
    def test_server_toml_has_the_keys_and_values_of_the_chart(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                v = r.values
                server = r.server_toml["server"]
                self.assertEqual(server["trust_domain"], v["trustDomain"])
                self.assertEqual(server["data_dir"], "/var/lib/mayfly/server")
                self.assertEqual(server["bind_address"], f"0.0.0.0:{v['server']['service']['nodeApiPort']}")
                self.assertEqual(server["http_address"], f"0.0.0.0:{v['server']['service']['httpPort']}")
                self.assertEqual(server["log_format"], v["server"]["logFormat"])
                self.assertEqual(server["log_level"], v["server"]["logLevel"])
                self.assertEqual(server["ca_ttl"], v["server"]["ttl"]["ca"])
                self.assertEqual(server["default_x509_svid_ttl"], v["server"]["ttl"]["x509Svid"])
                self.assertEqual(server["default_jwt_svid_ttl"], v["server"]["ttl"]["jwtSvid"])
                self.assertEqual(server["agent_svid_ttl"], v["server"]["ttl"]["agentSvid"])
                self.assertEqual(server["crl_ttl"], v["server"]["ttl"]["crl"])
                self.assertIs(server["default_policy"], v["server"]["policy"]["builtin"])
                self.assertEqual(server.get("jwt_issuer", ""), v["server"]["jwtIssuer"])
                self.assertNotIn("admin_socket_path", server)  # the default, <data_dir>/admin.sock

                clusters = server["node_attestors"]["k8s_psat"]["clusters"]
                self.assertEqual(list(clusters), [v["clusterName"]])
                cluster = clusters[v["clusterName"]]
                agent_sa = pod_spec(r.one("DaemonSet"))["serviceAccountName"]
                self.assertEqual(cluster["service_account_allow_list"], [f"{NAMESPACE}:{agent_sa}"])
                self.assertEqual(cluster["audience"], v["attestation"]["audience"])
                self.assertEqual(cluster["allowed_node_label_keys"], v["attestation"]["allowedNodeLabelKeys"])
                self.assertEqual(cluster["allowed_pod_label_keys"], v["attestation"]["allowedPodLabelKeys"])
                self.assertNotIn("kubeconfig_path", cluster)  # in-cluster credentials
                self.assertEqual(
                    cluster["pod_identities"],
                    [
                        {
                            "namespaces": p["namespaces"],
                            "exclude_namespaces": p.get("excludeNamespaces", []),
                            "path": p["path"],
                        }
                        for p in v["podIdentities"]
                    ],
                )
                self.assertEqual(
                    server["k8s_bundle"],
                    {"namespace": NAMESPACE, "configmap": f"{r.fullname}-bundle", "key": "bundle.pem"},
                )

    def test_server_data_dir_is_on_the_persistent_volume(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                sts = r.one("StatefulSet")
                data = mount(container(sts, "server"), "data")["mountPath"]
                self.assertTrue(r.server_toml["server"]["data_dir"].startswith(data.rstrip("/") + "/"))
                claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
                self.assertEqual(claims, ["data"])
                claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
                self.assertEqual(
                    claim["resources"]["requests"]["storage"], r.values["server"]["persistence"]["size"]
                )
                self.assertEqual(sts["spec"]["replicas"], 1)
                self.assertEqual(
                    container(sts, "server")["args"], ["run", "--config", "/etc/mayfly/server.toml"]
                )

    def test_agent_toml_has_the_keys_and_agrees_with_the_pod(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                v = r.values
                agent = r.agent_toml["agent"]
                ds = r.one("DaemonSet")
                spec, c = pod_spec(ds), container(ds, "agent")
                self.assertEqual(agent["trust_domain"], v["trustDomain"])
                self.assertEqual(agent["trust_domain"], r.server_toml["server"]["trust_domain"])
                svc = r.one("Service", f"{r.fullname}-server")
                self.assertEqual(
                    agent["server_address"],
                    f"{svc['metadata']['name']}.{NAMESPACE}.svc:{v['server']['service']['nodeApiPort']}",
                )
                self.assertEqual(agent["node_attestor"], "k8s_psat")
                self.assertEqual(agent["log_format"], v["agent"]["logFormat"])

                self.assertEqual(
                    agent["socket_path"], f"{v['agent']['socketDir']}/{v['agent']['socketName']}"
                )
                self.assertEqual(mount(c, "sockets")["mountPath"], v["agent"]["socketDir"])

                self.assertEqual(agent["data_dir"], mount(c, "data")["mountPath"])

                bundle_mount = mount(c, "bundle")["mountPath"]
                bundle_volume = volume(spec, "bundle")["configMap"]
                self.assertEqual(bundle_volume, {"name": f"{r.fullname}-bundle", "optional": True})
                bundle_key = r.server_toml["server"]["k8s_bundle"]["key"]
                self.assertEqual(agent["trust_bundle_path"], f"{bundle_mount}/{bundle_key}")

                psat = r.agent_toml["agent"]["k8s_psat"]
                self.assertEqual(psat["cluster"], v["clusterName"])
                self.assertIn(
                    psat["cluster"], r.server_toml["server"]["node_attestors"]["k8s_psat"]["clusters"]
                )

                k8s = r.agent_toml["agent"]["k8s"]
                self.assertEqual(k8s["kubelet_ca_path"], v["agent"]["kubelet"]["caPath"])
                self.assertIs(
                    k8s["insecure_skip_kubelet_verification"], v["agent"]["kubelet"]["insecureSkipVerify"]
                )
                self.assertEqual(k8s["token_path"], "/var/run/secrets/kubernetes.io/serviceaccount/token")
                self.assertIs(spec["automountServiceAccountToken"], True)
                self.assertEqual(k8s.get("kubelet_url", ""), v["agent"]["kubelet"]["url"])

                env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
                self.assertEqual(
                    env, {"MAYFLY_NODE_NAME": "spec.nodeName", "MAYFLY_NODE_IP": "status.hostIP"}
                )
                self.assertEqual(c["args"], ["run", "--config", "/etc/mayfly/agent.toml"])

    def test_projected_token_audience_and_path_match_the_server(self) -> None:
        for override in (
            None,
            {
                "attestation": {
                    "audience": "spiffe://example.org/mayfly/server",
                    "tokenExpirationSeconds": 900,
                }
            },
        ):
            for name in VALUES_FILES:
                with self.subTest(values=name, override=override):
                    r = render_file(name, override)
                    ds = r.one("DaemonSet")
                    sources = volume(pod_spec(ds), "psat-token")["projected"]["sources"]
                    self.assertEqual(len(sources), 1)
                    token = sources[0]["serviceAccountToken"]
                    server_audience = r.server_toml["server"]["node_attestors"]["k8s_psat"]["clusters"][
                        r.values["clusterName"]
                    ]["audience"]
                    self.assertEqual(token["audience"], server_audience)
                    self.assertEqual(token["audience"], r.values["attestation"]["audience"])
                    self.assertEqual(
                        token["expirationSeconds"], r.values["attestation"]["tokenExpirationSeconds"]
                    )
                    token_mount = mount(container(ds, "agent"), "psat-token")
                    self.assertIs(token_mount["readOnly"], True)
                    self.assertEqual(
                        r.agent_toml["agent"]["k8s_psat"]["token_path"],
                        f"{token_mount['mountPath']}/{token['path']}",
                    )
                    self.assertEqual(
                        r.agent_toml["agent"]["k8s_psat"]["token_path"],
                        "/var/run/secrets/tokens/mayfly-agent",
                    )

    def test_pod_identities_off_renders_an_empty_list(self) -> None:
        r = render({"podIdentities": []})
        cluster = r.server_toml["server"]["node_attestors"]["k8s_psat"]["clusters"]["default"]
        self.assertEqual(cluster["pod_identities"], [])

    def test_strings_are_escaped_for_toml(self) -> None:
        tricky = 'https://issuer.example/"quoted"\\back\tslash<&>'
        r = render({"server": {"jwtIssuer": tricky}, "clusterName": "a.b_c-d"})
        self.assertEqual(r.server_toml["server"]["jwt_issuer"], tricky)
        self.assertIn("a.b_c-d", r.server_toml["server"]["node_attestors"]["k8s_psat"]["clusters"])
        self.assertEqual(r.agent_toml["agent"]["k8s_psat"]["cluster"], "a.b_c-d")

    def test_optional_keys_render_only_when_set(self) -> None:
        r = render(
            {
                "server": {"ttl": {"jwtKey": "12h"}},
                "agent": {"kubelet": {"url": "https://kubelet.local:10250"}},
            }
        )
        self.assertEqual(r.server_toml["server"]["jwt_key_ttl"], "12h")
        self.assertEqual(r.agent_toml["agent"]["k8s"]["kubelet_url"], "https://kubelet.local:10250")
        plain = render()
        self.assertNotIn("jwt_key_ttl", plain.server_toml["server"])
        self.assertNotIn("kubelet_url", plain.agent_toml["agent"]["k8s"])

    def test_bundle_config_map_is_empty_and_kept(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                cm = r.one("ConfigMap", f"{r.fullname}-bundle")
                self.assertNotIn("data", cm)
                self.assertNotIn("binaryData", cm)
                self.assertEqual(cm["metadata"]["annotations"]["helm.sh/resource-policy"], "keep")

    def test_policy_files_are_mounted_and_listed(self) -> None:
        policy = "permit (principal, action, resource) when { false };\n"
        r = render({"server": {"policy": {"files": {"extra.cedar": policy}}}})
        cm = r.one("ConfigMap", f"{r.fullname}-server-policy")
        self.assertEqual(cm["data"], {"extra.cedar": policy})
        sts = r.one("StatefulSet")
        policy_mount = mount(container(sts, "server"), "policy")["mountPath"]
        self.assertEqual(r.server_toml["server"]["policy_paths"], [policy_mount])
        self.assertEqual(volume(pod_spec(sts), "policy")["configMap"]["name"], cm["metadata"]["name"])
        self.assertNotIn("policy_paths", render().server_toml["server"])

    def test_builtin_policy_off_without_files_is_refused(self) -> None:
        with self.assertRaisesRegex(helm.HelmError, "server.policy.builtin=false needs server.policy.files"):
            render({"server": {"policy": {"builtin": False}}})
        r = render(
            {
                "server": {
                    "policy": {
                        "builtin": False,
                        "files": {"p.cedar": "permit (principal, action, resource);"},
                    }
                }
            }
        )
        self.assertIs(r.server_toml["server"]["default_policy"], False)

    def test_a_config_change_rolls_the_pods(self) -> None:
        def checksums(r: Rendered) -> tuple[str, str]:
            return tuple(
                wl["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for wl in (r.one("StatefulSet"), r.one("DaemonSet"))
            )

        base = checksums(render())
        self.assertEqual(checksums(render()), base)
        server_changed = checksums(render({"server": {"logLevel": "debug"}}))
        self.assertNotEqual(server_changed[0], base[0])
        self.assertEqual(server_changed[1], base[1])
        agent_changed = checksums(render({"agent": {"logLevel": "debug"}}))
        self.assertEqual(agent_changed[0], base[0])
        self.assertNotEqual(agent_changed[1], base[1])

    def test_images_default_to_the_app_version_and_honour_digests(self) -> None:
        with helm.Chart.load(CHART) as chart:
            app_version = chart.metadata["appVersion"]
        r = render()
        self.assertEqual(container(r.one("StatefulSet"), "server")["image"], f"mayfly-server:{app_version}")
        self.assertEqual(container(r.one("DaemonSet"), "agent")["image"], f"mayfly-agent:{app_version}")
        digest = "sha256:" + "ab" * 32
        r = render(
            {"server": {"image": {"repository": "reg.example/mayfly-server", "tag": "9.9", "digest": digest}}}
        )
        self.assertEqual(
            container(r.one("StatefulSet"), "server")["image"], f"reg.example/mayfly-server@{digest}"
        )

    def test_notes_explain_registration_and_the_test(self) -> None:
        for name, r in self.rendered.items():
            with self.subTest(values=name):
                self.assertIn("mayfly-server entry create", r.notes)
                self.assertIn(f"helm test mayfly -n {NAMESPACE}", r.notes)
                self.assertIn(f"{r.fullname}-bundle", r.notes)


class Schema(unittest.TestCase):
    def setUp(self) -> None:
        self.chart = helm.Chart.load(CHART)
        self.addCleanup(self.chart.close)

    def rejects(self, values: dict[str, Any], message: str) -> None:
        with self.assertRaises(helm.HelmValuesError) as caught:
            self.chart.validate_schema(values)
        self.assertIn(message, str(caught.exception))
        # and `helm install` (render) refuses the same values
        with self.assertRaises(helm.HelmError):
            render(values)

    def test_defaults_and_examples_are_valid(self) -> None:
        for name, path in VALUES_FILES.items():
            with self.subTest(values=name):
                self.chart.validate_schema(load_values(path))

    def test_a_typo_is_rejected_at_every_level(self) -> None:
        self.rejects({"trustDomian": "example.org"}, "additional properties 'trustDomian' not allowed")
        self.rejects({"agent": {"sysPtrac": True}}, "additional properties 'sysPtrac' not allowed")
        self.rejects({"agent": {"kubelet": {"insecureSkipVerfy": True}}}, "'insecureSkipVerfy'")
        self.rejects({"server": {"persistence": {"sise": "1Gi"}}}, "'sise'")
        self.rejects(
            {"podIdentities": [{"namespaces": ["*"], "path": "ns/{namespace}", "exclude": []}]}, "'exclude'"
        )

    def test_wrong_values_are_rejected(self) -> None:
        self.rejects({"server": {"replicas": 2}}, "/server/replicas")
        self.rejects({"server": {"ttl": {"ca": "one day"}}}, "/server/ttl/ca")
        self.rejects({"trustDomain": "Example.ORG"}, "/trustDomain")
        self.rejects({"attestation": {"tokenExpirationSeconds": 60}}, "/attestation/tokenExpirationSeconds")
        self.rejects({"agent": {"dataDir": {"type": "pvc"}}}, "/agent/dataDir/type")
        self.rejects({"agent": {"socketDir": "relative/dir"}}, "/agent/socketDir")
        self.rejects({"server": {"logFormat": "yaml"}}, "/server/logFormat")
        self.rejects({"server": {"securityContext": {"runAsUser": 0}}}, "/server/securityContext/runAsUser")
        self.rejects({"server": {"policy": {"files": {"policy.txt": "x"}}}}, "policy.txt")
        self.rejects({"agent": {"kubelet": {"url": "http://plain:10255"}}}, "/agent/kubelet/url")

    def test_null_security_ids_are_allowed_for_platforms_that_assign_them(self) -> None:
        values = {"server": {"securityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}}
        self.chart.validate_schema(values)
        spec = pod_spec(render(values).one("StatefulSet"))
        self.assertEqual(
            spec["securityContext"], {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        )


# Values whose content is free-form Kubernetes (or a list of rules): documented as one key.
OPAQUE_VALUES = {
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "podAnnotations",
    "podLabels",
    "annotations",
    "files",
}


def value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the chart's values, stopping at free-form maps and lists."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in OPAQUE_VALUES:
            paths += value_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


class Documentation(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        with helm.Chart.load(CHART) as chart:
            cls.defaults = chart.values
            cls.schema = chart.schema
        cls.doc_lines = (REPO / "docs" / "kubernetes.md").read_text().splitlines()

    def documented(self, path: str) -> bool:
        """`a.b.c` in backticks, or `.c` on a line that names `a.b.` (the doc's short form)."""
        parent, _, leaf = path.rpartition(".")
        for line in self.doc_lines:
            if f"`{path}`" in line or f"`{path}," in line:
                return True
            if parent and f"`{parent}." in line and (f"`.{leaf}`" in line or f", .{leaf}" in line):
                return True
        return False

    def test_every_value_is_in_docs_kubernetes_md(self) -> None:
        missing = [p for p in value_paths(self.defaults) if not self.documented(p)]
        self.assertEqual(missing, [], "values missing from docs/kubernetes.md")

    def test_schema_and_values_yaml_describe_the_same_keys(self) -> None:
        def walk(schema: dict[str, Any], values: dict[str, Any], path: str) -> None:
            props = schema.get("properties")
            if props is None and "$ref" in schema:
                name = schema["$ref"].removeprefix("#/definitions/")
                return walk(self.schema["definitions"][name], values, path)
            if props is None:
                return
            for key in props:
                if path == "" and key == "global":
                    continue
                self.assertIn(key, values, f"schema key {path}{key} has no default in values.yaml")
                if isinstance(values[key], dict) and values[key] and key not in OPAQUE_VALUES:
                    walk(props[key], values[key], f"{path}{key}.")

        walk(self.schema, self.defaults, "")
        self.chart_schema_is_strict(self.schema, "")

    def chart_schema_is_strict(self, schema: dict[str, Any], path: str) -> None:
        """Every object schema with named properties refuses unknown keys."""
        if "properties" in schema:
            self.assertIs(schema.get("additionalProperties"), False, f"{path or 'top level'} is not strict")
            for key, sub in schema["properties"].items():
                self.chart_schema_is_strict(sub, f"{path}{key}.")
        for key in ("items",):
            if isinstance(schema.get(key), dict):
                self.chart_schema_is_strict(schema[key], f"{path}[].")
        for name, sub in schema.get("definitions", {}).items():
            self.chart_schema_is_strict(sub, f"#/definitions/{name}.")

    def test_readme_lists_the_guide(self) -> None:
        self.assertIn("`docs/kubernetes.md`", (REPO / "README.md").read_text())


class ImagesMatchTheChart(unittest.TestCase):
    """The Dockerfile (parsed with BuildKit's own parser) builds what the chart runs.

    Docker Hub is out of reach here, so the images cannot be built in this sandbox; these checks
    catch a Dockerfile that does not parse or that drifted from the chart.
    """

    @classmethod
    def setUpClass(cls) -> None:
        cls.stages: dict[str, list[Any]] = {}
        cls.args: dict[str, str] = {}
        current = None
        for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
            if command.cmd == "FROM":
                name = command.value[2]
                current = cls.stages.setdefault(name, [])
                current.append(command)
            elif current is None and command.cmd == "ARG":
                key, _, default = command.value[0].partition("=")
                cls.args[key] = default
            elif current is not None:
                current.append(command)
        cls.chart = render()

    def instruction(self, stage: str, cmd: str) -> Any:
        found = [c for c in self.stages[stage] if c.cmd == cmd]
        self.assertEqual(len(found), 1, f"{stage}: {cmd}")
        return found[0]

    def base(self, stage: str) -> str:
        ref = self.instruction(stage, "FROM").value[0]
        return self.args[ref.removeprefix("${").removesuffix("}")] if ref.startswith("${") else ref

    def test_targets_and_builder(self) -> None:
        self.assertEqual(sorted(self.stages), ["agent", "builder", "server"])
        with open(REPO / "Cargo.toml", "rb") as f:
            rust_version = tomllib.load(f)["workspace"]["package"]["rust-version"]
        self.assertEqual(self.base("builder"), f"rust:{rust_version}-bookworm")
        build = self.instruction("builder", "RUN").value[0]
        self.assertIn("cargo build --release --locked -p mayfly-server -p mayfly-agent", build)
        self.assertEqual(self.base("server"), "gcr.io/distroless/cc-debian12:nonroot")

    def test_each_image_runs_what_the_chart_runs(self) -> None:
        for stage, workload, name, port_values in (
            ("server", self.chart.one("StatefulSet"), "server", ("nodeApiPort", "httpPort")),
            ("agent", self.chart.one("DaemonSet"), "agent", ("healthPort",)),
        ):
            with self.subTest(image=stage):
                c = container(workload, name)
                binary = f"mayfly-{stage}"
                self.assertEqual(c["command"], [binary])
                copy = self.instruction(stage, "COPY")
                self.assertEqual(copy.flags, ("--from=builder",))
                self.assertEqual(copy.value[1], f"/usr/local/bin/{binary}")
                self.assertEqual(self.instruction(stage, "ENTRYPOINT").value, (f"/usr/local/bin/{binary}",))
                self.assertEqual(list(self.instruction(stage, "CMD").value), c["args"])
                values = (
                    self.chart.values["server"]["service"]
                    if stage == "server"
                    else self.chart.values["agent"]
                )
                exposed = sorted(int(p) for p in self.instruction(stage, "EXPOSE").value)
                self.assertEqual(exposed, sorted(values[k] for k in port_values))

    def test_server_image_user_is_the_charts_non_root_user(self) -> None:
        uid, gid = self.instruction("server", "USER").value[0].split(":")
        security = self.chart.values["server"]["securityContext"]
        self.assertEqual((int(uid), int(gid)), (security["runAsUser"], security["runAsGroup"]))
        self.assertNotEqual(int(uid), 0)
        self.assertEqual(self.instruction("agent", "USER").value, ("0:0",))

    def test_dockerignore_keeps_build_output_and_state_out(self) -> None:
        ignored = {
            line.strip()
            for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        self.assertLessEqual({"target/", ".git", ".mayfly/"}, ignored)


if __name__ == "__main__":
    unittest.main()
