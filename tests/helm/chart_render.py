"""Renders the Mayfly chart with Helm's own engine and splits the result into objects.

Helm runs in-process: helm-python-sdk binds Helm's Go SDK (libhelm_c, shipped in its wheel), so
rendering and linting need neither a `helm` binary nor a cluster nor the network.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "mayfly"
EXAMPLES = CHART / "examples"

# The values sets every check runs against: the chart's defaults and each example file.
VALUES_FILES: dict[str, Path | None] = {
    "default": None,
    "dev": EXAMPLES / "values-dev.yaml",
    "production": EXAMPLES / "values-production.yaml",
}

RELEASE = "mayfly"
NAMESPACE = "mayfly-system"


def load_values(path: Path | None) -> dict[str, Any]:
    """A values file parsed the way `helm -f` parses it ({} for the defaults)."""
    if path is None:
        return {}
    return helm.values_from_yaml(path.read_text())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` layered over `base`, as a second `-f`/`--set` would be."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Rendered:
    """One rendering of the chart: its objects, its NOTES and the merged values used."""

    values: dict[str, Any]
    objects: list[dict[str, Any]]
    notes: str
    sources: dict[str, str] = field(default_factory=dict)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        if len(found) != 1:
            names = [o["metadata"]["name"] for o in self.all(kind)]
            raise AssertionError(f"expected one {kind} named {name!r}, found {names}")
        return found[0]

    def config_map_file(self, name: str, key: str) -> str:
        return self.one("ConfigMap", name)["data"][key]

    @property
    def fullname(self) -> str:
        return self.one("StatefulSet")["metadata"]["name"].removesuffix("-server")

    @property
    def server_toml_text(self) -> str:
        return self.config_map_file(f"{self.fullname}-server", "server.toml")

    @property
    def agent_toml_text(self) -> str:
        return self.config_map_file(f"{self.fullname}-agent", "agent.toml")

    @property
    def server_toml(self) -> dict[str, Any]:
        return tomllib.loads(self.server_toml_text)

    @property
    def agent_toml(self) -> dict[str, Any]:
        return tomllib.loads(self.agent_toml_text)


def render(
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> Rendered:
    """Renders the chart as `helm install` would (values checked against the schema first)."""
    values = values or {}
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(values=merged, objects=objects, notes=notes, sources=manifests)


def render_file(name: str, override: dict[str, Any] | None = None) -> Rendered:
    """Renders with the values set `name` of VALUES_FILES, plus `override`."""
    values = load_values(VALUES_FILES[name])
    if override:
        values = deep_merge(values, override)
    return render(values)
