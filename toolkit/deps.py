"""`invoke deps.*`: the hash-locked requirements. One table says which lock is compiled from which input.

Each lock is pip-tools' `pip-compile --generate-hashes` output (every file of each pinned release is hashed, so
the lock installs on any platform PyPI has wheels for) plus one line of ours, `# inputs sha256: ...`, the digest
of the `.in` files it was compiled from. `deps.check` recomputes that digest offline: an input edited without a
new lock fails it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

from invoke import Context, Exit, task

ROOT = Path(__file__).resolve().parent.parent
# lock -> the input it is compiled from, in compile order: the dev lock is constrained by requirements.txt.
LOCKS = {
    "requirements.txt": "requirements.in",  # the service's image
    "requirements-sbom.txt": "requirements-sbom.in",  # the SBOM generator, run beside the image, never in it
    "requirements-dev.txt": "requirements-dev.in",  # develop, test, deploy (README: set-up)
}
COMPILE_FLAGS = ["--generate-hashes", "--allow-unsafe", "--strip-extras", "--no-emit-index-url",
                 "--no-emit-find-links", "--quiet"]  # fmt: skip
LOCK_PYTHON = (3, 12)  # the image's Python: environment markers resolve for it
DIGEST_LINE = re.compile(r"^# inputs sha256: ([0-9a-f]{64})", re.MULTILINE)
INCLUDE = re.compile(r"^\s*-(?:r|c|-requirement|-constraint)[ =]\s*(\S+)", re.MULTILINE)
REQUIREMENT = re.compile(r"^[A-Za-z0-9][^\s#]*==", re.MULTILINE)


def inputs(lock: str, root: Path = ROOT) -> list[Path]:
    """The .in file of `lock` and every file it pulls in with -r / -c, recursively, in a fixed order."""
    found: list[Path] = []
    pending = [root / LOCKS[lock]]
    while pending:
        path = pending.pop(0)
        if path in found:
            continue
        found.append(path)
        if path.suffix == ".in":
            pending += [path.parent / name for name in INCLUDE.findall(path.read_text())]
    return found


def inputs_digest(lock: str, root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for path in inputs(lock, root):
        text = path.read_text() if path.is_file() else ""
        digest.update(f"{path.relative_to(root).as_posix()}\0{text}\0".encode())
    return digest.hexdigest()


def recorded_digest(lock_path: Path) -> str | None:
    found = DIGEST_LINE.search(lock_path.read_text()) if lock_path.is_file() else None
    return found.group(1) if found else None


def stamp(lock: str, root: Path = ROOT) -> None:
    """Write the inputs' digest into `lock`, right after pip-compile's header."""
    path = root / lock
    lines = [line for line in path.read_text().splitlines(keepends=True) if not DIGEST_LINE.match(line)]
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    note = (f"# inputs sha256: {inputs_digest(lock, root)} "
            f"({', '.join(p.name for p in inputs(lock, root))}; `invoke deps.check` compares it)\n")
    path.write_text("".join([*lines[:header], note, *lines[header:]]))


def problems(root: Path = ROOT) -> list[str]:
    """Why the locks do not match their inputs, one line each; empty when they do."""
    found = []
    for lock, source in LOCKS.items():
        path = root / lock
        if not path.is_file():
            found.append(f"{lock} is missing: run `invoke deps.lock`.")
            continue
        recorded = recorded_digest(path)
        if recorded is None:
            found.append(f"{lock} has no `# inputs sha256:` line, so it was not made by `invoke deps.lock`: run it.")
        elif recorded != inputs_digest(lock, root):
            names = ", ".join(p.name for p in inputs(lock, root))
            found.append(f"{lock} is stale: {names} changed since it was locked; run `invoke deps.lock` and commit both.")
        unhashed = unhashed_pins(path.read_text())
        if unhashed:
            found.append(f"{lock} pins {', '.join(unhashed)} without --hash: run `invoke deps.lock`.")
    return found


def unhashed_pins(text: str) -> list[str]:
    requirements = re.sub(r"\\\n", " ", text).splitlines()  # join pip's line continuations
    return [line.split("==")[0] for line in requirements if REQUIREMENT.match(line) and "--hash=" not in line]


def compile_command(lock: str, upgrade: bool = False) -> list[str]:
    return [sys.executable, "-m", "piptools", "compile", *COMPILE_FLAGS, *(["--upgrade"] if upgrade else []),
            f"--output-file={lock}", LOCKS[lock]]  # fmt: skip


@task(
    help={
        "upgrade": "take the newest versions the inputs allow (default: keep every pin the lock has)",
        "dry_run": "print the pip-compile commands instead of running them",
    }
)
def lock(c, upgrade=False, dry_run=False):
    """Compile requirements*.txt with hashes from requirements*.in (pip-compile --generate-hashes)."""
    dry_run = dry_run or c.config.run.dry
    if sys.version_info[:2] != LOCK_PYTHON:
        wanted = ".".join(map(str, LOCK_PYTHON))
        raise Exit(f"Lock with Python {wanted}, the image's (this is {sys.version.split()[0]}): environment markers "
                   f"resolve for the running Python. Run it from a {wanted} venv: .venv/bin/invoke deps.lock")
    for lock_name in LOCKS:
        with c.cd(str(ROOT)):
            c.run(shlex.join(compile_command(lock_name, upgrade)), dry=dry_run)
        if not dry_run:
            stamp(lock_name)
            print(f"locked {lock_name}")


@task
def check(c):
    """Fail when a requirements*.in changed without a new lock (offline: compares the recorded input digest)."""
    found = problems()
    if found:
        raise Exit("\n".join(found))
    print(f"locks current: {', '.join(LOCKS)}")


@task(
    help={
        "lock_file": "the lock to audit (default: requirements.txt, what the image installs)",
        "dry_run": "print the pip-audit command instead of running it",
    }
)
def audit(c, lock_file="requirements.txt", dry_run=False):
    """Check the lock's pinned versions against PyPI's vulnerability advisories (pip-audit)."""
    command = [sys.executable, "-m", "pip_audit", "--requirement", str(ROOT / lock_file), "--disable-pip", "--no-deps",
               "--format", "json", "--progress-spinner", "off"]  # fmt: skip
    if dry_run or c.config.run.dry:
        print(shlex.join(command))
        return
    result = c.run(shlex.join(command), hide=True, warn=True)
    raise_unless_audited(lock_file, result.stdout, result.stderr)


def raise_unless_audited(lock_file: str, stdout: str, stderr: str) -> None:
    """Print pip-audit's verdict; Exit 1 on findings, 2 when any package could not be checked."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        reason = (stderr.strip().splitlines() or ["no output"])[-1]
        raise Exit(f"could not check {lock_file}: pip-audit failed ({reason})", code=2) from None
    findings = [(d["name"], d["version"], v) for d in report["dependencies"] for v in d.get("vulns", [])]
    unchecked = [d for d in report["dependencies"] if d.get("skip_reason")]
    for name, version, vuln in findings:
        fixed = ", ".join(vuln.get("fix_versions") or []) or "none yet"
        print(f"VULNERABLE {name}=={version}: {vuln['id']} (fixed in {fixed})")
    if findings:
        raise Exit(f"{len(findings)} known vulnerabilit{'y' if len(findings) == 1 else 'ies'} in {lock_file}", code=1)
    if unchecked:
        sample = unchecked[0]["skip_reason"]
        raise Exit(f"could not check {lock_file}: {len(unchecked)} of {len(report['dependencies'])} packages were not "
                   f"audited, so this is no pass (pip-audit's advisory source, PyPI's JSON API, did not answer for "
                   f"them; e.g. {sample!r}). Run `invoke deps.audit` where pypi.org is reachable.", code=2)
    print(f"no known vulnerabilities in the {len(report['dependencies'])} packages of {lock_file}")
