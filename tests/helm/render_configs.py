#!/usr/bin/env python3
"""Writes the server.toml and agent.toml that the chart renders, for each values set.

    python3 tests/helm/render_configs.py OUT_DIR

writes OUT_DIR/<set>/server.toml, OUT_DIR/<set>/agent.toml and the policy files of
server.policy.files (OUT_DIR/<set>/policy/*.cedar) for the sets `default`, `dev` and `production`
(the chart's defaults and helm/mayfly/examples/values-*.yaml), so that the real binaries can load
them, for example:

    mayfly-server policy validate OUT_DIR/production/policy/*.cedar
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chart_render import VALUES_FILES, render_file  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    for name in VALUES_FILES:
        rendered = render_file(name)
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        (target / "server.toml").write_text(rendered.server_toml_text)
        (target / "agent.toml").write_text(rendered.agent_toml_text)
        for file_name, content in rendered.values["server"]["policy"]["files"].items():
            (target / "policy").mkdir(exist_ok=True)
            (target / "policy" / file_name).write_text(content)
        print(f"{target}/server.toml, {target}/agent.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
