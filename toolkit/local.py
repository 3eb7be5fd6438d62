"""The whole flow on one machine: run the service (in Docker when an engine answers, else straight under
gunicorn), smoke-test it, print its URL. No cloud account needed with the bundled demo model.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from invoke import Context, Exit, task

from toolkit import image, smoke
from toolkit.model import model_env

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".cache" / "local"
CONTAINER = "onnx-serve-local"


def runtime(c: Context) -> str:
    chosen = c.local.runtime
    if chosen == "auto":
        return "docker" if image.engine_answers(c) else "process"
    if chosen not in {"docker", "process"}:
        raise Exit(f"local.runtime is {chosen!r}: use auto, docker or process.")
    return chosen


def check_model(c: Context) -> None:
    uri = str(c.model.uri)
    if not uri.startswith("gs://") and not (ROOT / uri).is_file() and not Path(uri).is_file():
        raise Exit(f"model.uri {uri!r} is not a file: use a path to an .onnx file or gs://BUCKET/OBJECT.")


def start_process(c: Context, port: int, dry_run: bool) -> str:
    """gunicorn with the service's own config, in the background, its PID and log under .cache/local."""
    env = {**model_env(c), "PORT": str(port), "HOST": "127.0.0.1"}
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = f"{shlex.quote(str(gunicorn))} -c service/gunicorn.conf.py service.app:app"
    log = STATE / "service.log"
    if not dry_run:
        STATE.mkdir(parents=True, exist_ok=True)
    c.run(f"nohup {command} > {shlex.quote(str(log))} 2>&1 & echo $! > {shlex.quote(str(STATE / 'pid'))}",
          env=env, dry=dry_run)  # fmt: skip
    return f"logs: {log}"


def start_container(c: Context, port: int, dry_run: bool) -> str:
    tag = image.default_tag(c)
    image.build(c, tag=tag, dry_run=dry_run)
    env = model_env(c)
    mounts = []
    if not env["MODEL_URI"].startswith("gs://"):
        model = (ROOT / env["MODEL_URI"]).resolve()
        mounts += ["--volume", f"{model}:/models/{model.name}:ro"]
        env["MODEL_URI"] = f"/models/{model.name}"
    adc = Path.home() / ".config" / "gcloud" / "application_default_credentials.json"
    if env["MODEL_URI"].startswith("gs://") and adc.is_file():
        mounts += ["--volume", f"{adc}:/secrets/adc.json:ro"]
        env["GOOGLE_APPLICATION_CREDENTIALS"] = "/secrets/adc.json"
    command = ["docker", "run", "--detach", "--rm", "--name", CONTAINER, "--publish", f"127.0.0.1:{port}:8080",
               "--read-only", "--tmpfs", "/tmp", *mounts]  # fmt: skip
    for name, value in env.items():
        command += ["--env", f"{name}={value}"]
    c.run(shlex.join([*command, image.image_ref(c, "local", tag)]), dry=dry_run)
    return f"logs: docker logs -f {CONTAINER}"


def deploy(c: Context, tag: str, dry_run: bool) -> None:
    check_model(c)
    stop(c, quiet=True, dry_run=dry_run)
    port = int(c.local.port)
    how = runtime(c)
    where = (start_container if how == "docker" else start_process)(c, port, dry_run)
    url = f"http://127.0.0.1:{port}"
    if dry_run:
        print(f"# then: smoke test {url}")
        return
    print(f"started the service ({how}) at {url}; {where}")
    result = smoke.after_deploy(c, url)
    if not result.ok:
        raise Exit(f"smoke test failed: {result.reason}\nthe service is still running: `invoke local.stop` ends it")
    print(f"\nserving {c.model.uri} at {url}. Try:\n"
          f"  curl -s {url}/health\n"
          f"  curl -s {url}/metadata\n"
          f"  curl -s -X POST {url}/predict -H 'content-type: application/json' "
          f"-d '{_sample_json(result)}'\n"
          "stop it with: invoke local.stop")  # fmt: skip


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _sample_json(result: smoke.SmokeResult) -> str:
    import json

    return json.dumps(result.request)


@task(help={"dry_run": "print the commands instead of running them"})
def stop(c, quiet=False, dry_run=False):
    """Stop the service that `invoke deploy --target local` started."""
    dry_run = dry_run or c.config.run.dry
    pid_file = STATE / "pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text().strip() or 0)
        if dry_run:
            print(f"kill -TERM {pid}")
            return
        try:
            os.kill(pid, signal.SIGTERM)
            _wait_gone(pid, seconds=15)  # gunicorn drains in-flight requests first
            if not quiet:
                print(f"stopped gunicorn (pid {pid})")
        except ProcessLookupError:
            pass
        pid_file.unlink()
    if shutil.which("docker") and image.engine_answers(c):
        result = c.run(f"docker rm -f {CONTAINER}", hide=True, warn=True, dry=dry_run)
        if result.ok and not quiet and not dry_run and result.stdout.strip():
            print(f"removed container {CONTAINER}")
