"""The release journal and the way back. `invoke.releases.json` (next to invoke.yaml) holds every release: what it
put out, the state it started from (Cloud Run: the stable revision; Fly: the image and env the Machines ran), and
one event per state, written before the action it names. `guarded` is the one place every exit of a release passes
through: a failure or a signal (SIGINT, SIGTERM) inside it goes back to where the release started and says so.

After a promotion the model is also written into invoke.yaml (`model.uri`, `model.sha256`): the one record of the
serving model, which `deploy` reads, and `rollback` after a release brings the previous one back.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from invoke import Context, Exit
from invoke.exceptions import UnexpectedExit

from toolkit.defaults import config_path

# A release in one of these states needs nothing more; any other state (started, resuming, deploying, deployed, step,
# held, failed, rollback_failed) is in flight, held, or was interrupted, and `invoke status` says how to finish it.
FINAL_STATES = {"promoted", "rolled_back", "stopped"}
# Every command of the way back runs after this in its shell: SIGINT and SIGTERM ignored, which a command inherits
# unless it installs its own handler (gcloud does): a Ctrl-C at the terminal reaches the whole process group.
UNINTERRUPTED = "trap '' INT TERM"
WAY_BACK_TRIES = 3  # a way back that a signal cut short runs again (it reads the platform first: no harm)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- the files -----------------------------------------------------------------------------------------------------


def config_file(c: Context) -> Path:
    """The invoke.yaml that holds model.uri: release.record, else the -f file, else the project's."""
    return Path(c.release.record) if c.release.record else config_path(c)


def journal_file(c: Context) -> Path:
    path = config_file(c)
    return path.with_name(path.stem + ".releases.json")


def entries(c: Context) -> list[dict]:
    path = journal_file(c)
    try:
        found = json.loads(path.read_text()) if path.is_file() else []
    except ValueError as exc:
        raise Exit(f"{path} is not the JSON list `invoke release` writes: {exc}") from None
    for entry in found:  # entries from before the journal: a promotion, maybe rolled back since
        entry.setdefault("state", "rolled_back" if entry.get("rolled_back") else "promoted")
    return found


def _save(c: Context, found: list[dict]) -> None:
    """Replace the file in one step, so that a signal between two writes never leaves half a journal."""
    path = journal_file(c)
    spare = path.with_name(path.name + ".tmp")
    spare.write_text(json.dumps(found, indent=2) + "\n")
    os.replace(spare, path)


def last_release(c: Context, target: str) -> dict | None:
    """The newest release to `target` that was promoted and not rolled back since."""
    return next((e for e in reversed(entries(c)) if e["target"] == target and e["state"] == "promoted"), None)


def unfinished(c: Context, target: str) -> dict | None:
    """The newest release to `target` when it did not end (held, interrupted, in flight, or stranded)."""
    newest = next((e for e in reversed(entries(c)) if e["target"] == target), None)
    return newest if newest and newest["state"] not in FINAL_STATES else None


def in_flight(entry: dict) -> bool:
    """The process that runs the release is alive (a release from another machine: not known, so not). Alive
    means its pid runs and, where the entry recorded it, is the same process: a pid the kernel gave to another
    process since (after the release died, or after a reboot) is not the release."""
    if entry.get("host") != socket.gethostname():
        return False
    try:
        pid = int(entry.get("pid", 0))
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    recorded = entry.get("process")
    return pid > 0 and (recorded is None or recorded == process_identity(pid))


def process_identity(pid: int) -> str | None:
    """Which process `pid` is, as no other process can be: this boot's id and the process's start time (in clock
    ticks since boot, field 22 of /proc/<pid>/stat). None where /proc does not say (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat[stat.rindex(')') + 2:].split()[19]}"  # after "pid (comm) ", fields from the 3rd


def note(c: Context, entry: dict, state: str, detail: str = "", **fields) -> None:
    """Record that `entry` is now in `state` (before the action the state names), with why or what in `detail`."""
    entry.update(fields, state=state)
    entry.setdefault("events", []).append({"at": _now(), "state": state, "detail": detail})
    found = [e for e in entries(c) if e.get("id") != entry["id"]]
    _save(c, [*found, entry])


def begin(c: Context, target: str, model: dict, previous: dict, stable: dict) -> dict:
    """A new journal entry: the release of `model` to `target`, replacing `previous`, from the `stable` state."""
    entry = {"id": f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S%f}-{target}", "target": target,
             "model": model, "previous": previous, "stable": stable, "pid": os.getpid(), "host": socket.gethostname(),
             "process": process_identity(os.getpid()), "started_at": _now()}
    note(c, entry, "started", f"{model['uri']} to replace {previous.get('uri')}")
    return entry


# ---- the way back --------------------------------------------------------------------------------------------------


class Held(Exit):
    """A step with too few requests to judge: the split stays, the release is recorded as held (not a failure)."""


@dataclass
class WayBack:
    """What a platform gives `guarded`: how to go back to the stable state (returns what it did, in words), what the
    platform holds now (in words, for when going back fails), and the one command that finishes going back."""

    go: Callable[[], str]
    state_now: Callable[[], str]
    command: str


def reason_of(exc: BaseException, signal_name: str) -> str:
    if signal_name or isinstance(exc, KeyboardInterrupt):
        return f"interrupted by {signal_name or 'SIGINT'}"
    if isinstance(exc, Exit):
        return str(exc.message or f"exit {exc.code}")
    if isinstance(exc, UnexpectedExit):
        lines = (exc.result.stderr or exc.result.stdout or "").strip().splitlines()
        command = exc.result.command.removeprefix(f"{UNINTERRUPTED} && ")
        return f"`{command}` exited {exc.result.exited}: {lines[-1] if lines else 'no output'}"
    return f"{type(exc).__name__}: {exc}"


class _Signals:
    """SIGINT and SIGTERM for the release's duration (installed even when the shell started us ignoring SIGINT; the
    handlers from before come back after). While the release runs, either raises KeyboardInterrupt, noting which
    came (one that lands during a `c.run` reaches us as the command's failure, after Invoke forwarded it to the
    command). Once going back has begun, a second Ctrl-C or SIGTERM must not cut it short: it is said and ignored."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.going_back = False
        self.while_going_back = 0  # signals that came once going back had begun
        self.before: dict[int, Callable] = {}

    def __enter__(self) -> "_Signals":
        self.before = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.before.items():
            signal.signal(number, handler)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.going_back:
            self.while_going_back += 1
            print(f"{name}: going back to the stable state first, then exiting", flush=True)
            return
        self.received.append(name)
        raise KeyboardInterrupt

    @property
    def last(self) -> str:
        return self.received[-1] if self.received else ""


@contextlib.contextmanager
def guarded(c: Context, entry: dict, back: WayBack) -> Iterator[None]:
    """Run a release's changes. On a hold: record it and let the Exit through. On any other exception or a signal,
    once something changed: record the failure, go back through `back`, record that, and exit non-zero with both;
    if going back fails too: print the platform's state and the command that finishes it."""
    with _Signals() as signals:
        try:
            yield
        except Held as exc:
            note(c, entry, "held", exc.message)
            raise
        except BaseException as exc:
            signals.going_back = True
            if isinstance(exc, SystemExit) and not exc.code:
                raise
            reason = reason_of(exc, signals.last)
            code = {"SIGINT": 130, "SIGTERM": 143}.get(signals.last, 1)
            if entry["state"] == "started":  # nothing changed on the platform yet
                note(c, entry, "stopped", reason)
                raise Exit(f"release stopped before any change: {reason}", code=code) from None
            note(c, entry, "failed", reason)
            try:
                done = _go_back(c, back, signals)
            except BaseException as failure:  # noqa: BLE001 - whatever stopped the way back, the user must know
                trouble = reason_of(failure, "")
                note(c, entry, "rollback_failed", f"{reason}; going back failed: {trouble}")
                with c.prefix(UNINTERRUPTED):
                    print(f"the platform now: {_safely(back.state_now)}", flush=True)
                raise Exit(f"release failed: {reason}\ngoing back failed too: {trouble}\nfinish it with:\n  "
                           f"{back.command}\n(or `invoke rollback --target {entry['target']}`, which reads the "
                           "journal)", code=code) from None
            note(c, entry, "rolled_back", f"{done}: {reason}")
            raise Exit(f"{done}: {reason}", code=code) from None


def _go_back(c: Context, back: WayBack, signals: _Signals) -> str:
    """`back.go()`, again when a signal killed one of its commands (gcloud handles SIGINT itself), up to
    WAY_BACK_TRIES times; any other failure ends it."""
    attempt = 1
    while True:
        seen = signals.while_going_back
        try:
            with c.prefix(UNINTERRUPTED):
                return back.go()
        except Exception:
            if signals.while_going_back == seen or attempt == WAY_BACK_TRIES:
                raise
        print("a signal cut a command of the way back short: going back again", flush=True)
        attempt += 1


def _safely(describe: Callable[[], str]) -> str:
    try:
        return describe()
    except BaseException as exc:  # noqa: BLE001 - the state is shown when it can be read
        return f"(could not read it: {reason_of(exc, '')})"


# ---- the model record (invoke.yaml) --------------------------------------------------------------------------------


def write_model(path: Path, uri: str, sha256: str) -> None:
    """Set model.uri and model.sha256 in invoke.yaml, keeping every other line and comment as it is."""
    lines = path.read_text().splitlines() if path.is_file() else []
    values = {"uri": json.dumps(uri), "sha256": json.dumps(sha256)}
    start = next((i for i, line in enumerate(lines) if re.match(r"model:\s*(#.*)?$", line)), None)
    if start is None:
        lines += ["model:", *(f"  {key}: {value}" for key, value in values.items())]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()
                    and not lines[i].startswith("#")), len(lines))
        seen = set()
        for i in range(start + 1, end):
            match = re.match(r"(\s+)(uri|sha256):\s*(?:\"[^\"]*\"|'[^']*'|[^\s#]*)(\s*#.*)?$", lines[i])
            if match:
                indent, key, comment = match.group(1), match.group(2), match.group(3) or ""
                lines[i] = f"{indent}{key}: {values[key]}" + (f"  {comment.strip()}" if comment else "")
                seen.add(key)
        lines[start + 1:start + 1] = [f"  {key}: {values[key]}" for key in values if key not in seen]
    path.write_text("\n".join(lines) + "\n")


def promote(c: Context, entry: dict, **fields) -> None:
    """After the last step: the model into invoke.yaml, the promotion into the journal."""
    path = config_file(c)
    write_model(path, entry["model"]["uri"], entry["model"]["sha256"])
    note(c, entry, "promoted", f"{entry['model']['uri']} serves all traffic", released_at=_now(), **fields)
    print(f"recorded: model.uri {entry['model']['uri']} in {path}; a later `invoke deploy` serves it")


def rolled_back_by_hand(c: Context, entry: dict, done: str) -> None:
    """`invoke rollback` went back from `entry`: recorded, and the model before a promotion back in invoke.yaml."""
    if entry["state"] == "promoted":
        previous = entry["previous"]
        write_model(config_file(c), previous["uri"], previous.get("sha256", ""))
        print(f"recorded: model.uri {previous['uri']} in {config_file(c)} again")
    note(c, entry, "rolled_back", f"{done}: `invoke rollback`", rolled_back=True)


def warn_if_unreleased_model(c: Context, target: str) -> None:
    """`deploy` calls this: a code deploy whose model differs from the last release says so, loudly."""
    released = last_release(c, target)
    if released and str(c.model.uri) != released["model"]["uri"]:
        print(f"WARNING: this deploy sends model.uri {c.model.uri}, not {released['model']['uri']} that "
              f"`invoke release` put on {target} at {released['released_at']}: the serving model changes with it")


def describe_unfinished(entry: dict, finish: str) -> str:
    """One paragraph for `invoke status`: which release did not end, where it stopped, and how to finish it."""
    last = entry["events"][-1]
    how = ("in flight (pid {}): wait for it, or Ctrl-C it to go back".format(entry["pid"]) if in_flight(entry)
           else "held" if entry["state"] == "held" else f"interrupted at {entry['state']}")
    resume = shlex.join(["invoke", "release", "--target", entry["target"], "--model", entry["model"]["uri"],
                         *(["--sha256", entry["model"]["sha256"]] if entry["model"].get("sha256") else [])])
    lines = [f"release of {entry['model']['uri']} (journal {entry['id']}): {how}",
             f"  last: {last['at']} {last['state']}: {last['detail']}"]
    if not in_flight(entry):
        lines.append(f"  finish it: `invoke rollback --target {entry['target']}` ({finish})"
                     + (f", or `{resume}` to judge it again" if entry["state"] == "held" else ""))
    return "\n".join(lines)
