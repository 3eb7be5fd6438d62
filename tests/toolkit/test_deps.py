"""`invoke deps.*`: the locks carry hashes and the digest of their inputs; a changed input without a new lock fails
`deps.check`; `deps.audit` never passes on packages it could not check."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.support.models import ROOT
from toolkit import deps

INVOKE = [sys.executable, "-m", "invoke"]


def run_invoke(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*INVOKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def project_copy(tmp_path):
    """The requirements files of the work tree, copied so a test can edit them."""
    for path in ROOT.glob("requirements*"):
        shutil.copy2(path, tmp_path / path.name)
    return tmp_path


def test_the_committed_locks_are_current_and_hash_every_pin():
    done = run_invoke("deps.check")
    assert done.returncode == 0, done.stderr
    assert "locks current: requirements.txt, requirements-sbom.txt, requirements-dev.txt" in done.stdout
    for lock in deps.LOCKS:
        text = (ROOT / lock).read_text()
        assert "pip-compile --allow-unsafe --generate-hashes" in text  # the command, in pip-compile's header
        assert deps.unhashed_pins(text) == []


def test_every_pin_of_requirements_in_is_what_the_lock_installs():
    lock = dict(re.findall(r"^([a-z0-9._-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    wanted = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "requirements.in").read_text(), re.MULTILINE)
    assert wanted and all(lock[name.lower()] == version for name, version in wanted)
    # the dev lock installs the service's packages at the very same versions
    dev = dict(re.findall(r"^([a-z0-9._-]+)==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.MULTILINE))
    assert {name: dev[name] for name in lock} == lock


def test_an_input_changed_without_a_new_lock_is_stale(project_copy):
    assert deps.problems(project_copy) == []
    with open(project_copy / "requirements.in", "a") as source:
        source.write("rich==14.2.0\n")
    found = deps.problems(project_copy)
    # the runtime lock, and the dev lock that includes requirements.in
    assert found == [
        "requirements.txt is stale: requirements.in changed since it was locked; run `invoke deps.lock` and commit both.",
        "requirements-dev.txt is stale: requirements-dev.in, requirements.in, requirements.txt changed since it was "
        "locked; run `invoke deps.lock` and commit both.",
    ]


def test_a_lock_edited_by_hand_is_caught(project_copy):
    lock = project_copy / "requirements-sbom.txt"
    lock.write_text(lock.read_text().replace("# inputs sha256:", "# edited:") + "six==1.17.0\n")
    found = deps.problems(project_copy)
    assert found == [
        "requirements-sbom.txt has no `# inputs sha256:` line, so it was not made by `invoke deps.lock`: run it.",
        "requirements-sbom.txt pins six without --hash: run `invoke deps.lock`.",
    ]


def test_lock_dry_run_prints_one_deterministic_pip_compile_per_lock():
    done = run_invoke("deps.lock", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in done.stdout.splitlines()]
    assert [line.split()[-1] for line in lines] == ["requirements.in", "requirements-sbom.in", "requirements-dev.in"]
    for line in lines:
        assert " -m piptools compile --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url " in line


@pytest.mark.slow
def test_audit_never_passes_on_packages_it_could_not_check():
    """Run pip-audit on the lock as `deps.audit` does; wherever its advisory source did not answer for a package
    (as on this machine), the task must exit 2 and say so instead of reporting a pass."""
    done = run_invoke("deps.audit", "--lock-file", "requirements-sbom.txt")
    raw = subprocess.run([sys.executable, "-m", "pip_audit", "--requirement", str(ROOT / "requirements-sbom.txt"),
                          "--disable-pip", "--no-deps", "--format", "json", "--progress-spinner", "off"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    report = json.loads(raw.stdout)
    skipped = [d for d in report["dependencies"] if d.get("skip_reason")]
    vulnerable = [d for d in report["dependencies"] if d.get("vulns")]
    if vulnerable:
        assert done.returncode == 1 and "VULNERABLE" in done.stdout
    elif skipped:
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"could not check requirements-sbom.txt: {len(skipped)} of" in done.stderr
        assert "no known vulnerabilities" not in done.stdout
    else:
        assert done.returncode == 0 and "no known vulnerabilities" in done.stdout
