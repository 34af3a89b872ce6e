"""Deployment files: the systemd unit, the Dockerfile, the pinned dependencies, and the docs' links."""

from __future__ import annotations

import configparser
import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "syncd.service"
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "constraints.txt"
SKIP_DIRS = {".venv", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "node_modules"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser


def seconds(value: str) -> float:
    """A systemd time span as plain seconds ("30", "30s", "1min 30s")."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"{UNIT}: not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def verify(tool: str, path: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about the unit at ``path`` (its lines naming the unit)."""
    found = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False)
    said = [line for line in (found.stderr + found.stdout).splitlines() if path.name in line]
    return [*said, *([f"exit status {found.returncode}"] if found.returncode else [])]


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong with deploy/syncd.service (and does catch a bad value)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); the unit is checked statically below")
    # verify also checks that ExecStart's program exists: point it at the syncd installed here.
    installed = Path(sys.executable).parent / "syncd"
    text = UNIT.read_text(encoding="utf-8").replace("/opt/syncd/bin/syncd", str(installed))
    good = tmp_path / "good" / "syncd.service"
    good.parent.mkdir()
    good.write_text(text, encoding="utf-8")
    assert verify(tool, good) == []
    bad = tmp_path / "bad" / "syncd.service"
    bad.parent.mkdir()
    bad.write_text(text.replace("TimeoutStopSec=30", "TimeoutStopSec=soon"), encoding="utf-8")
    assert any("TimeoutStopSec" in line or "time value" in line for line in verify(tool, bad))


def test_the_systemd_unit_runs_syncd_unprivileged_and_waits_for_the_drain() -> None:
    """The service runs `syncd run --config` as a non-root user, restarts on failure, and allows 30 s or more to stop."""
    service = unit()["Service"]
    assert service["User"] not in {"", "root", "0"}
    assert re.fullmatch(r"\S*/syncd run --config \S+\.toml", service["ExecStart"])
    assert service["Restart"] == "on-failure"
    assert seconds(service["TimeoutStopSec"]) >= 30
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"


def test_the_dockerfile_pins_its_base_and_runs_unprivileged() -> None:
    """A pinned python:3.11.N-slim-bookworm base, installs held to constraints.txt, a non-root user, a data volume, /readyz checked."""
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    (base,) = [line for line in instructions if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm", base)
    installs = [line for line in instructions if "pip install" in line]
    assert installs
    assert all("-c constraints.txt" in line for line in installs)
    users = [index for index, line in enumerate(instructions) if line.startswith("USER ")]
    runs = [index for index, line in enumerate(instructions) if line.startswith("RUN ")]
    assert users
    assert instructions[users[-1]] not in {"USER root", "USER 0"}
    assert users[-1] > max(runs)
    assert any(line.startswith("VOLUME") and "/var/lib/syncd" in line for line in instructions)
    health = " ".join(lines[lines.index(next(line for line in lines if line.startswith("HEALTHCHECK"))) :][:2])
    assert "/readyz" in health


def test_constraints_pin_every_dependency_within_pyproject() -> None:
    """constraints.txt pins every runtime and dev dependency to a version pyproject.toml allows (else: make constraints)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    wanted = [Requirement(text) for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    missing = [str(req) for req in wanted if canonicalize_name(req.name) not in pins]
    assert missing == [], "constraints.txt lacks these; run `make constraints`"
    outside = [
        f"{req} (pinned {pins[canonicalize_name(req.name)]})"
        for req in wanted
        if not req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True)
    ]
    assert outside == [], "constraints.txt pins versions pyproject.toml excludes; run `make constraints`"


def test_the_makefile_installs_with_the_constraints() -> None:
    """`make install` and `make install-dev` install the same pinned versions as the image."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for target in ("install", "install-dev"):
        dry = subprocess.run([make, "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
        installs = [line for line in dry.stdout.splitlines() if "pip install" in line and " -e " in line]
        assert installs, dry.stdout
        assert all("-c constraints.txt" in line for line in installs), installs


def markdown_files() -> list[Path]:
    return [
        path
        for path in REPO.rglob("*.md")
        if not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in path.relative_to(REPO).parts)
    ]


def test_markdown_links_point_at_files_inside_the_repository() -> None:
    """Every relative link in the repository's Markdown names a file or folder that exists inside it."""
    broken = []
    for page in markdown_files():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or a heading on the same page
            resolved = (page.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_vendor_specs_are_the_copies_specs_readme_records() -> None:
    """Each file in specs/README.md's table is in the repository with the recorded size and SHA-256, and nothing else is."""
    rows = re.findall(
        r"^\| `([^`]+)` \|.*\| ([\d,]+) \| `([0-9a-f]{64})` \|$",
        (REPO / "specs" / "README.md").read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    assert len(rows) >= 4
    for name, size, digest in rows:
        data = (REPO / "specs" / name).read_bytes()
        assert len(data) == int(size.replace(",", "")), name
        assert hashlib.sha256(data).hexdigest() == digest, name
    on_disk = {path.relative_to(REPO / "specs").as_posix() for path in (REPO / "specs").glob("*/*")}
    assert on_disk == {name for name, _, _ in rows}
