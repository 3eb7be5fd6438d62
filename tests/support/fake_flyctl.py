"""A stand-in for `flyctl` that follows Fly's documented contract, not the real binary (which cannot be installed here).

Outputs follow flyctl's source and docs (superfly/flyctl internal/command/{status,apps,secrets,auth,version},
superfly/fly-go types.go, machine_types.go, secrets_types.go; superfly/docs flyctl/cmd/fly_*.md):
- `status --json`: {ID, Name, Deployed, Status, Hostname, Version, AppURL, Organization, PlatformVersion, Machines[]}
  where each Machine has id, name, state, region, image_ref{registry, repository, tag, digest}, config{image, env,
  metadata} (env: fly.toml's [env] and the deploy's --env flags), checks[].
- `releases --json`: fly.Release objects, newest first: ID, Version, Stable, InProgress, Reason, Description, Status,
  DeploymentStrategy, User{ID, Name, Email, EnablePaidHobby}, EvaluationID, CreatedAt, ImageRef.
- `apps list --json`: fly.App objects (the fields a deploy task reads: ID, Name, Status, Deployed, Hostname, AppURL,
  Version, Organization, CurrentRelease, PlatformVersion).
- `secrets list --json`: [{name, digest, status}] with status Deployed or Staged.
- logged out: "Error: no access token available. Please login with 'flyctl auth login'" on stderr, exit 1.

Supported: version, auth whoami, apps list, apps create, status, releases, deploy, secrets set/list. Anything else
exits 1 with `Error: unknown command ...`.

Environment:
- FAKE_FLY_STATE: JSON file with the apps (created empty if missing); FAKE_FLY_LOG: JSON lines, one per run, with
  argv, cwd, stdin (for `secrets set NAME=-`) and whether FLY_API_TOKEN / FLY_ACCESS_TOKEN was set (never the value).
- FAKE_FLY_LOGGED_OUT=1: every command that needs a session fails as flyctl does without a token.
- FAKE_FLY_DEPLOY_FAIL=MESSAGE: `deploy` records a failed release, leaves the Machines on the old image and exits 1.
- FAKE_FLY_DEPLOY_FAIL_STRATEGY=NAME: the same, for deploys with `--strategy NAME` only (as when the Machines API
  refuses an update mid-incident), with flyctl's error for a Machine it could not update.

Run as a script by the `flyctl`/`fly` shims that the `fake_flyctl` fixture writes; the fixture is below `main`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import tomllib
import uuid
from pathlib import Path

FLYCTL_VERSION = "0.3.209"
LOGGED_OUT = "Error: no access token available. Please login with 'flyctl auth login'"
NO_APP = ("Error: the config for your app is missing an app name, add an app field to the fly.toml file or "
          "specify with the -a flag")
STRATEGIES = {"canary", "rolling", "bluegreen", "immediate"}
USER = {"ID": "user_fake", "Name": "Fake User", "Email": "fake-user@example.com", "EnablePaidHobby": False}
ORG = {"ID": "org_fake", "Name": "Fake Org", "Slug": "personal", "RawSlug": "personal", "PaidPlan": False}

# flyctl flags that take a value (global and those of the supported commands); everything else is boolean.
VALUE_FLAGS = {
    "-a", "--app", "-c", "--config", "-i", "--image", "--strategy", "--wait-timeout", "-t", "--access-token",
    "--build-arg", "-e", "--env", "--dockerfile", "--ignorefile", "--build-target", "--image-label", "--regions",
    "--vm-size", "--release-command-timeout", "--max-unavailable", "--deploy-retries", "--org", "-o", "--region",
    "-r", "--label", "--build-secret", "--file-local", "--file-literal", "--file-secret", "--primary-region",
}
REPEATABLE = {"--build-arg", "-e", "--env", "--build-secret", "--label"}
# Flags whose meaning depends on the command: `releases --image` is a boolean ("display image information").
BOOLEAN_IN = {"releases": {"--image", "-i"}}


class FlyError(Exception):
    """Printed on stderr as flyctl prints errors; exit status 1."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, object]]:
    """Split argv into positional words and flags (`--flag value`, `--flag=value`, booleans `--flag[=false]`)."""
    words, flags = [], {}
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    value_flags = VALUE_FLAGS - BOOLEAN_IN.get(command, set())
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            words += argv[index:]
            break
        if not arg.startswith("-") or arg == "-":
            words.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        if name in value_flags:
            if not has_value:
                if index >= len(argv):
                    raise FlyError(f"Error: flag needs an argument: {name}")
                value = argv[index]
                index += 1
            if name in REPEATABLE:
                flags.setdefault(name, []).append(value)
            else:
                flags[name] = value
        else:
            flags[name] = value.lower() not in {"false", "0"} if has_value else True
    return words, flags


def _flag(flags: dict, *names: str, default=None):
    for name in names:
        if name in flags:
            return flags[name]
    return default


def _duration_ok(text: str) -> bool:
    """Go's time.ParseDuration forms (`5m0s`, `90s`, `1h`); a bare integer is also accepted as seconds."""
    return bool(re.fullmatch(r"\d+|(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", text))


class Fly:
    def __init__(self, state_path: Path, stdout, stderr, stdin):
        self.state_path = state_path
        self.out, self.err, self.stdin = stdout, stderr, stdin
        self.state = json.loads(state_path.read_text()) if state_path.exists() else {"apps": {}, "seq": 0}
        self.changed = False

    def save(self) -> None:
        if self.changed:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2))
            tmp.replace(self.state_path)

    def _tick(self) -> int:
        self.state["seq"] = self.state.get("seq", 0) + 1
        self.changed = True
        return self.state["seq"]

    def emit_json(self, value: object) -> None:
        # flyctl's render.JSON indents with two spaces
        self.out.write(json.dumps(value, indent="  ") + "\n")

    # ---- resolving the app ---------------------------------------------------------------------------------------

    def app_name(self, flags: dict) -> str:
        name = _flag(flags, "-a", "--app") or os.environ.get("FLY_APP")
        if name:
            return name
        config = _flag(flags, "-c", "--config")
        path = Path(config) if config else Path("fly.toml")
        if config and not path.exists():
            raise FlyError(f"Error: failed loading app config from {path}: open {path}: no such file or directory")
        if path.exists():
            with path.open("rb") as handle:
                name = tomllib.load(handle).get("app")
            if name:
                return name
        raise FlyError(NO_APP)

    def app(self, name: str) -> dict:
        if name not in self.state["apps"]:
            raise FlyError(f'Error: failed to get app: Could not find App "{name}"')
        return self.state["apps"][name]

    def create_app(self, name: str, org: dict | None = None) -> dict:
        if name in self.state["apps"]:
            raise FlyError("Error: Name has already been taken")
        app = {
            "ID": name, "Name": name, "Status": "pending", "Deployed": False, "Hostname": f"{name}.fly.dev",
            "AppURL": f"https://{name}.fly.dev", "PlatformVersion": "machines", "Organization": org or dict(ORG),
            "releases": [], "machines": [], "secrets": {},
        }
        self.state["apps"][name] = app
        self._tick()
        return app

    # ---- commands ------------------------------------------------------------------------------------------------

    def run(self, argv: list[str]) -> int:
        words, flags = parse_args(argv)
        command = " ".join(words[:2])
        if not words or words[0] in {"version", "help"} or _flag(flags, "--version", "-v"):
            return self.version(flags)
        if os.environ.get("FAKE_FLY_LOGGED_OUT"):
            raise FlyError(LOGGED_OUT)
        json_out = bool(_flag(flags, "-j", "--json"))
        if command == "auth whoami":
            if json_out:
                self.emit_json({"email": USER["Email"]})
            else:
                self.out.write(USER["Email"] + "\n")
            return 0
        if command in {"apps list", "apps ls"}:
            return self.apps_list(json_out)
        if command == "apps create":
            name = words[2] if len(words) > 2 else _flag(flags, "-a", "--app", "--name")
            if not name:
                raise FlyError("Error: an app name is required: fly apps create NAME")
            self.create_app(name)
            self.out.write(f"New app created: {name}\n")
            return 0
        if words[0] == "status":
            return self.status(self.app(self.app_name(flags)), json_out)
        if words[0] == "releases" or command == "apps releases":
            return self.releases(self.app(self.app_name(flags)), json_out, bool(flags.get("--image")))
        if words[0] == "deploy":
            return self.deploy(words[1:], flags)
        if command == "secrets set":
            return self.secrets_set(self.app(self.app_name(flags)), words[2:], flags)
        if command in {"secrets list", "secrets ls"}:
            return self.secrets_list(self.app(self.app_name(flags)), json_out)
        raise FlyError(f'Error: unknown command "{" ".join(words)}" for "flyctl" (the fake flyctl supports: '
                       "version, auth whoami, apps list|create, status, releases, deploy, secrets set|list)")

    def version(self, flags: dict) -> int:
        info = {"Name": "flyctl", "Version": FLYCTL_VERSION, "Commit": "fake", "BranchName": "",
                "BuildDate": "2026-01-01T00:00:00Z", "OS": "linux", "Architecture": "amd64",
                "Environment": "production"}
        if _flag(flags, "-j", "--json"):
            self.out.write(json.dumps(info) + "\n")
        else:
            self.out.write(f"flyctl v{FLYCTL_VERSION} linux/amd64 Commit: fake BuildDate: 2026-01-01T00:00:00Z\n")
        return 0

    def _current_release(self, app: dict) -> dict | None:
        done = [r for r in app["releases"] if r["Status"] == "complete"]
        return _public_release(done[-1]) if done else None

    def apps_list(self, json_out: bool) -> int:
        apps = [{
            "ID": a["ID"], "Name": a["Name"], "Status": a["Status"], "Deployed": a["Deployed"],
            "Hostname": a["Hostname"], "AppURL": a["AppURL"], "Version": _version(a),
            "Organization": a["Organization"], "CurrentRelease": self._current_release(a),
            "PlatformVersion": a["PlatformVersion"],
        } for a in self.state["apps"].values()]
        if json_out:
            self.emit_json(apps)
        else:
            self.out.write("NAME\tOWNER\tSTATUS\n")
            for a in apps:
                self.out.write(f"{a['Name']}\t{a['Organization']['Slug']}\t{a['Status']}\n")
        return 0

    def status(self, app: dict, json_out: bool) -> int:
        machines = sorted(app["machines"], key=lambda m: m["id"])
        if json_out:
            self.emit_json({
                "ID": app["ID"], "Name": app["Name"], "Deployed": app["Deployed"], "Status": app["Status"],
                "Hostname": app["Hostname"], "Version": _version(app), "AppURL": app["AppURL"],
                "Organization": app["Organization"], "PlatformVersion": app["PlatformVersion"],
                "Machines": machines,
            })
            return 0
        self.out.write(f"App\n  Name     = {app['Name']}\n  Owner    = {app['Organization']['Slug']}\n"
                       f"  Hostname = {app['Hostname']}\n  Platform = {app['PlatformVersion']}\n\n")
        self.out.write("ID\tPROCESS\tVERSION\tREGION\tSTATE\tCHECKS\tLAST UPDATED\n")
        for m in machines:
            checks = m.get("checks", [])
            passing = sum(1 for c in checks if c["status"] == "passing")
            self.out.write(f"{m['id']}\tapp\t{m['config']['metadata']['fly_release_version']}\t{m['region']}\t"
                           f"{m['state']}\t{passing} total, {passing} passing\t{m['updated_at']}\n")
        return 0

    def releases(self, app: dict, json_out: bool, image: bool) -> int:
        releases = sorted((_public_release(r) for r in app["releases"]), key=lambda r: -r["Version"])
        if json_out:
            self.emit_json(releases)
            return 0
        self.out.write("VERSION\tSTATUS\tDESCRIPTION\tUSER\tDATE" + ("\tDOCKER IMAGE" if image else "") + "\n")
        for r in releases:
            row = [f"v{r['Version']}", r["Status"], r["Description"], r["User"]["Email"], r["CreatedAt"]]
            self.out.write("\t".join(row + ([r["ImageRef"]] if image else [])) + "\n")
        return 0

    def deploy(self, words: list[str], flags: dict) -> int:
        strategy = _flag(flags, "--strategy", default="rolling")
        if strategy not in STRATEGIES:
            raise FlyError(f"Error: unsupported deployment strategy '{strategy}'; must be one of: "
                           f"{', '.join(sorted(STRATEGIES))}")
        wait_timeout = _flag(flags, "--wait-timeout")
        if wait_timeout is not None and not _duration_ok(str(wait_timeout)):
            raise FlyError(f'Error: invalid argument "{wait_timeout}" for "--wait-timeout" flag: '
                           f'time: invalid duration "{wait_timeout}"')
        if flags.get("--local-only") and flags.get("--remote-only"):
            raise FlyError("Error: if any flags in the group [local-only remote-only] are set none of the others "
                           "can be; [local-only remote-only] were all set")
        name = self.app_name(flags)
        app = self.app(name)
        config = self._config(flags, words)
        image = _flag(flags, "-i", "--image") or (config.get("build") or {}).get("image")
        self.out.write("==> Verifying app config\n--> Verified app config\n")
        if image:
            self.out.write(f"Searching for image '{image}' remotely...\nimage found: img_{_digest(image)[:14]}\n")
        else:
            label = _flag(flags, "--image-label") or f"deployment-{uuid.uuid4().hex[:26].upper()}"
            image = f"registry.fly.io/{name}:{label}"
            builder = "local" if flags.get("--local-only") else "remote"
            self.out.write(f"==> Building image with {builder} builder\n--> Pushing image done\nimage: {image}\n")
        if flags.get("--build-only"):
            return 0
        failure = os.environ.get("FAKE_FLY_DEPLOY_FAIL")
        if strategy == os.environ.get("FAKE_FLY_DEPLOY_FAIL_STRATEGY"):
            failure = failure or ("failed to update machine 0e286039f42e86: failed to update VM: request returned "
                                  "non-2xx status, 503")  # fmt: skip
        release = self._release(app, image, strategy, "complete" if not failure else "failed",
                                f"Deploy image {image}")
        if failure:
            self.err.write(f"Error: {failure}\n")
            return 1
        # A deploy rebuilds each Machine's env from fly.toml's [env] and the --env flags (not kept for the next one).
        env = {**(config.get("env") or {}), **dict(pair.partition("=")[::2] for pair in _flag(flags, "-e", "--env",
                                                                                                default=[]))}
        self._roll_machines(app, image, release, config.get("primary_region") or "iad",
                            count=1 if flags.get("--ha") is False else 2, env=env)
        self.out.write(f"Watch your deployment at https://fly.io/apps/{name}/monitoring\n\n"
                       f"Updating existing machines in '{name}' with {strategy} strategy\n"
                       f"-------\n ✔ Machines updated\n-------\n"
                       f"Visit your newly deployed app at {app['AppURL']}/\n")
        return 0

    def _config(self, flags: dict, words: list[str]) -> dict:
        config = _flag(flags, "-c", "--config")
        path = Path(config) if config else Path(words[0]) / "fly.toml" if words else Path("fly.toml")
        if not path.exists():
            return {}
        with path.open("rb") as handle:
            return tomllib.load(handle)

    def _release(self, app: dict, image: str, strategy: str, status: str, description: str) -> dict:
        release = {
            "ID": uuid.uuid4().hex[:12], "Version": len(app["releases"]) + 1, "Stable": status == "complete",
            "InProgress": False, "Reason": "deploy", "Description": description, "Status": status,
            "DeploymentStrategy": strategy.upper(), "User": dict(USER), "EvaluationID": uuid.uuid4().hex[:12],
            "CreatedAt": _now(), "ImageRef": image, "seq": self._tick(),
        }
        app["releases"].append(release)
        return release

    def _roll_machines(self, app: dict, image: str, release: dict, region: str, count: int,
                       env: dict | None = None) -> None:
        now = _now()
        if not app["machines"]:
            for _ in range(count):
                machine_id = uuid.uuid4().hex[:14]
                app["machines"].append({"id": machine_id, "name": f"{app['Name']}-{machine_id[:6]}",
                                        "region": region, "created_at": now})
        registry, repository, tag, digest = _split_image(image)
        for machine in app["machines"]:
            machine.update(
                state="started",
                image_ref={"registry": registry, "repository": repository, "tag": tag, "digest": digest,
                           "labels": {}},
                instance_id=uuid.uuid4().hex[:26].upper(),
                private_ip="fdaa:0:1:a7b:1::2",
                updated_at=now,
                config={"image": image, "env": dict(env or {}),
                        "metadata": {"fly_platform_version": "v2", "fly_process_group": "app",
                                                     "fly_release_id": release["ID"],
                                                     "fly_release_version": str(release["Version"])}},
                checks=[{"name": "servicecheck-00-http-8080", "status": "passing", "output": "200 OK",
                         "updated_at": now}],
            )
        app["Deployed"] = True
        app["Status"] = "deployed"
        self.changed = True

    def secrets_set(self, app: dict, pairs: list[str], flags: dict) -> int:
        if not pairs:
            raise FlyError("Error: requires at least one SECRET=VALUE pair")
        values = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise FlyError(f"Error: could not parse secrets: '{pair}' should be an assignment like NAME=VALUE")
            if value == "-":
                if self.stdin is None or self.stdin.isatty():
                    raise FlyError(f"Error: secret `{key}` expects standard input but none provided")
                value = self.stdin.read(64 * 1024 + 1)
                if len(value) > 64 * 1024:
                    raise FlyError(f"Error: error reading stdin for '{key}': read limit exceeded")
            values[key] = value
        for key, value in values.items():
            app["secrets"][key] = {"digest": _digest(value)[:16], "value": value, "seq": self._tick(),
                                   "updated_at": _now()}
        if flags.get("--stage") or not app["Deployed"]:
            self.out.write("Secrets are staged for the next deployment\n")
            return 0
        current = [r for r in app["releases"] if r["Status"] == "complete"][-1]
        release = self._release(app, current["ImageRef"], "rolling", "complete", "Update secrets")
        self._roll_machines(app, current["ImageRef"], release, app["machines"][0]["region"], len(app["machines"]),
                            env=app["machines"][0].get("config", {}).get("env"))  # a restart keeps the env
        self.out.write(f"Updating existing machines in '{app['Name']}' with rolling strategy\n")
        return 0

    def secrets_list(self, app: dict, json_out: bool) -> int:
        deployed_seq = max((r["seq"] for r in app["releases"] if r["Status"] == "complete"), default=0)
        rows = [{"name": name, "digest": s["digest"], "status": "Deployed" if s["seq"] < deployed_seq else "Staged"}
                for name, s in sorted(app["secrets"].items())]
        if json_out:
            self.emit_json(rows)
        else:
            self.out.write("NAME\tDIGEST\tSTATUS\n")
            for row in rows:
                prefix = "* " if row["status"] == "Staged" else ""
                self.out.write(f"{prefix}{row['name']}\t{row['digest']}\t{row['status']}\n")
        return 0


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _version(app: dict) -> int:
    done = [r["Version"] for r in app["releases"] if r["Status"] == "complete"]
    return done[-1] if done else 0


def _public_release(release: dict) -> dict:
    return {k: v for k, v in release.items() if k != "seq"}


def _split_image(image: str) -> tuple[str, str, str, str]:
    """registry.fly.io/app:tag@sha256:... -> (registry, repository, tag, digest) as in Machine.image_ref."""
    rest, _, digest = image.partition("@")
    first, _, path = rest.partition("/")
    registry, rest = (first, path) if ("." in first or ":" in first) and path else ("docker.io", rest)
    repository, _, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "latest")
    return registry, repository, tag, digest or "sha256:" + _digest(image)


def main(argv: list[str]) -> int:
    state_path = Path(os.environ.get("FAKE_FLY_STATE", "fake-fly-state.json"))
    stdin_text = None
    log_path = os.environ.get("FAKE_FLY_LOG")
    fly = Fly(state_path, sys.stdout, sys.stderr, sys.stdin)
    if "secrets" in argv and any(a.endswith("=-") for a in argv) and not sys.stdin.isatty():
        stdin_text = sys.stdin.read(64 * 1024 + 1)
        fly.stdin = _Text(stdin_text)
    try:
        status = fly.run(argv)
    except FlyError as error:
        sys.stderr.write(f"{error}\n")
        status = 1
    fly.save()
    if log_path:
        with open(log_path, "a") as log:
            log.write(json.dumps({
                "argv": argv, "cwd": os.getcwd(), "exit": status, "stdin": stdin_text,
                "token": {k: k in os.environ for k in ("FLY_API_TOKEN", "FLY_ACCESS_TOKEN")},
            }) + "\n")
    return status


class _Text:
    """Stdin already read for the log, served again to `secrets set`."""

    def __init__(self, text: str):
        self.text = text

    def isatty(self) -> bool:
        return False

    def read(self, size: int = -1) -> str:
        return self.text if size < 0 else self.text[:size]


if __name__ == "__main__":  # the shims run this file; what follows is the pytest side, kept out of the CLI's start-up
    sys.exit(main(sys.argv[1:]))


import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402


@dataclass
class FakeFly:
    """The fake flyctl as a test sees it: shims on PATH, the argv log and the state file."""

    bin_dir: Path
    state_path: Path
    log_path: Path
    env: dict[str, str]

    def calls(self) -> list[dict]:
        """Every flyctl run so far: {argv, cwd, exit, stdin, token{FLY_API_TOKEN, FLY_ACCESS_TOKEN}}."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]

    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {"apps": {}}

    def app(self, name: str) -> dict:
        return self.state()["apps"][name]

    def add_app(self, name: str, image: str | None = None, region: str = "iad", env: dict | None = None) -> dict:
        """Create an app, deployed with `image` (one release, two Machines, with `env`) when given."""
        fly = Fly(self.state_path, sys.stdout, sys.stderr, None)
        app = fly.create_app(name)
        if image:
            release = fly._release(app, image, "rolling", "complete", f"Deploy image {image}")
            fly._roll_machines(app, image, release, region, count=2, env=env)
        fly.save()
        return self.app(name)

    def run(self, *args: str, input: str | None = None, check: bool = False,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run the shim as a task would (`flyctl ARGS`)."""
        return subprocess.run([str(self.bin_dir / "flyctl"), *args], env=self.env, input=input, text=True,
                              capture_output=True, check=check, cwd=cwd)


def install_fake_flyctl(directory: Path) -> FakeFly:
    """Write `flyctl` and `fly` shims into DIRECTORY/bin that run this file with the current Python."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    for name in ("flyctl", "fly"):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
        shim.chmod(0o755)
    state_path, log_path = directory / "fly-state.json", directory / "fly-calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FAKE_FLY_STATE": str(state_path), "FAKE_FLY_LOG": str(log_path)}
    for name in ("FAKE_FLY_LOGGED_OUT", "FAKE_FLY_DEPLOY_FAIL", "FAKE_FLY_DEPLOY_FAIL_STRATEGY"):
        env.pop(name, None)
    return FakeFly(bin_dir, state_path, log_path, env)


@pytest.fixture
def fake_flyctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFly]:
    """The fake flyctl first on PATH for this test (os.environ is patched too, so tasks' `c.run` finds it)."""
    fake = install_fake_flyctl(tmp_path / "fake-flyctl")
    for name in ("PATH", "FAKE_FLY_STATE", "FAKE_FLY_LOG"):
        monkeypatch.setenv(name, fake.env[name])
    for name in ("FAKE_FLY_LOGGED_OUT", "FAKE_FLY_DEPLOY_FAIL", "FAKE_FLY_DEPLOY_FAIL_STRATEGY"):
        monkeypatch.delenv(name, raising=False)
    yield fake
