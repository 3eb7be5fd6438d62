"""`invoke image.scan`: Artifact Analysis' on-demand scan of a pushed image, gated on a severity.

gcloud lists the image's packages (its `local-extract` component), the On-Demand Scanning API matches them with
known vulnerabilities, and `list-vulnerabilities` reads the findings. On-demand scanning covers OS packages (and
Go/Java); Python packages are covered by Artifact Registry's automatic scanning and by `invoke deps.audit`.
A finding above `image.max_severity` fails the scan unless its id is in the allowlist file (`image.scan_allowlist`:
one CVE id a line, `# the reason` after it).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from invoke import Context, Exit, task

from toolkit import image

SEVERITIES = ("MINIMAL", "LOW", "MEDIUM", "HIGH", "CRITICAL")  # Grafeas' order
ENABLE_HINT = "enable scanning with `invoke gcp.setup --scanning` (On-Demand Scanning API)"


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str
    package: str
    version: str
    fixed: str

    def line(self, verdict: str) -> str:
        fixed = f"fixed in {self.fixed}" if self.fixed else "no fix yet"
        return f"{verdict:8} {self.severity:8} {self.id:20} {self.package} {self.version} ({fixed})"


def allowlist_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def parse_findings(occurrences: list[dict]) -> list[Finding]:
    found = []
    for occurrence in occurrences:
        vulnerability = occurrence.get("vulnerability") or {}
        issue = (vulnerability.get("packageIssue") or [{}])[0]
        found.append(Finding(
            id=occurrence.get("noteName", "").rsplit("/", 1)[-1] or vulnerability.get("shortDescription", "?"),
            severity=vulnerability.get("effectiveSeverity") or vulnerability.get("severity") or "SEVERITY_UNSPECIFIED",
            package=issue.get("affectedPackage", "?"),
            version=(issue.get("affectedVersion") or {}).get("fullName", ""),
            fixed=(issue.get("fixedVersion") or {}).get("fullName", ""),
        ))  # fmt: skip
    return found


def over(severity: str, limit: str) -> bool:
    """True when `severity` is above `limit`; an unknown severity counts as above (never silently passed)."""
    return severity not in SEVERITIES or SEVERITIES.index(severity) > SEVERITIES.index(limit)


def gate(c: Context, ref: str, max_severity: str = "", allowlist: str = "", dry_run: bool = False) -> list[Finding]:
    """Scan `ref` (pushed to Artifact Registry) and Exit(1) when a finding above the limit is not allowlisted."""
    limit = (max_severity or c.image.max_severity).upper()
    if limit not in SEVERITIES:
        raise Exit(f"image.max_severity must be one of {', '.join(SEVERITIES)} (got {limit!r}).")
    if not c.gcp.project:
        raise Exit("gcp.project is not set: put `gcp: {project: MY-PROJECT}` in invoke.yaml or set INVOKE_GCP_PROJECT.")
    accepted_file = Path(allowlist or c.image.scan_allowlist)
    if not accepted_file.is_absolute():
        accepted_file = image.ROOT / accepted_file
    where = ["--project", c.gcp.project]
    scan_command = ["gcloud", "artifacts", "docker", "images", "scan", ref, "--remote", "--format=json", *where,
                    *shlex.split(c.image.scan_flags)]  # fmt: skip
    if dry_run:
        c.run(shlex.join(scan_command), dry=True)
        c.run(shlex.join(_list_command("SCAN_NAME", where)), dry=True)
        return []
    print(f"scanning {ref} (Artifact Analysis on-demand scan; fails above {limit})")
    scanned = c.run(shlex.join(scan_command), hide=True, warn=True)
    if not scanned.ok:
        reason = (scanned.stderr.strip().splitlines() or ["no output"])[-1]
        raise Exit(f"The scan of {ref} failed ({reason}): push the image first, and {ENABLE_HINT}.")
    response = json.loads(scanned.stdout or "{}")
    scan_name = response.get("scan") or (response.get("response") or {}).get("scan")
    if not scan_name:
        raise Exit(f"The scan of {ref} returned no scan name: {scanned.stdout.strip()[:500]}")
    listed = c.run(shlex.join(_list_command(scan_name, where)), hide=True, warn=True)
    if not listed.ok:
        raise Exit(f"Could not read the findings of {scan_name}: {listed.stderr.strip()[-500:]}")
    findings = parse_findings(json.loads(listed.stdout or "[]"))
    accepted = allowlist_ids(accepted_file)
    blocking = [f for f in findings if over(f.severity, limit) and f.id not in accepted]
    for f in sorted(findings, key=lambda f: -SEVERITIES.index(f.severity) if f.severity in SEVERITIES else -99):
        print(f.line("BLOCKS" if f in blocking else "accepted" if f.id in accepted else "ok"))
    if blocking:
        ids = ", ".join(f.id for f in blocking)
        raise Exit(f"{len(blocking)} finding(s) above {limit} in {ref}: {ids}. Rebuild on a patched base "
                   f"(image.base_image) or upgrade the package; or accept one with a reason in {accepted_file}.")
    print(f"scan passed: {len(findings)} finding(s), none above {limit} that is not accepted ({scan_name})")
    return findings


def _list_command(scan_name: str, where: list[str]) -> list[str]:
    return ["gcloud", "artifacts", "docker", "images", "list-vulnerabilities", scan_name, "--format=json", *where]


@task(
    help={
        "target": "the registry the image was pushed to: cloudrun (Artifact Registry), or any with image.registry",
        "tag": image.TAG_HELP,
        "ref": "the image to scan, REPOSITORY:TAG or REPOSITORY@sha256:DIGEST (default: from --target and --tag)",
        "max_severity": "fail on a finding above this: LOW, MEDIUM, HIGH or CRITICAL (default: image.max_severity)",
        "allowlist": "file of accepted findings, one CVE id a line (default: image.scan_allowlist)",
        "dry_run": "print the gcloud commands instead of running them",
    }
)
def scan(c, target="cloudrun", tag=None, ref="", max_severity="", allowlist="", dry_run=False):
    """Scan the pushed image for known vulnerabilities and fail above image.max_severity."""
    gate(c, ref or image.image_ref(c, target, tag), max_severity, allowlist, dry_run or c.config.run.dry)
