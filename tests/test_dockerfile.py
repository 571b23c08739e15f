"""The image (``Dockerfile``), checked by parsing it (images cannot be built
or pulled here): two stages on one base (the venv's interpreter is the
base's), the final one without build tools, running as an unprivileged user,
``pdg`` as the entry point, a health check on ``/healthz``, every package of
the project copied in, and nothing of a working copy (venv, data, git)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).parents[1]


def stages() -> list[list[dict[str, Any]]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    found: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            found.append([])
        if found and instruction["instruction"] != "COMMENT":
            found[-1].append(instruction)
    return found


def values(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_two_stages_on_one_base_and_no_build_tools_in_the_last() -> None:
    build, final = stages()
    base = values(build, "FROM")[0].split()[0]
    assert values(final, "FROM") == [base]  # the venv's python is the base's
    assert re.fullmatch(r"python:3\.11-slim", base)
    for run in values(final, "RUN"):
        assert not re.search(r"\b(apt-get|apk|pip|gcc|make|build-essential)\b", run), run
    assert any(v.startswith("--from=build /opt/pdg ") for v in values(final, "COPY"))


def test_the_last_stage_runs_pdg_unprivileged_with_a_health_check() -> None:
    _build, final = stages()
    users = values(final, "USER")
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 1000
    names = [i["instruction"] for i in final]
    assert names.index("USER") > max(n for n, name in enumerate(names) if name in ("RUN", "COPY"))
    assert json.loads(values(final, "ENTRYPOINT")[-1]) == ["pdg"]
    assert json.loads(values(final, "CMD")[-1]) == ["serve"]
    (check,) = values(final, "HEALTHCHECK")
    assert "/healthz" in check
    env = " ".join(values(final, "ENV"))
    port = re.search(r"PDG_PORT=(\d+)", env)
    assert port is not None
    assert values(final, "EXPOSE") == [port.group(1)]
    assert f"127.0.0.1:{port.group(1)}/healthz" in check
    assert "PDG_DATA_DIR=/var/lib/pdg" in env


def test_every_package_of_the_project_is_copied_and_nothing_of_a_working_copy() -> None:
    build, _final = stages()
    copied = {v.split()[0] for v in values(build, "COPY")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    assert {"pyproject.toml", "README.md"} <= {p for v in values(build, "COPY") for p in v.split()[:-1]}
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "pdg-data", "**/__pycache__"} <= ignored
