"""The fake flyctl answers as Fly documents flyctl's output (it is not the real binary)."""

import json
import shutil
import subprocess


IMAGE = "registry.fly.io/onnx-serve:v1"


def test_shims_are_first_on_path_and_every_run_is_logged(fake_flyctl, monkeypatch):
    monkeypatch.setenv("FLY_API_TOKEN", "secret-token")
    assert shutil.which("fly") == str(fake_flyctl.bin_dir / "fly")

    version = subprocess.run(["fly", "version"], capture_output=True, text=True, check=True)

    assert version.stdout.startswith("flyctl v0.3.")
    (call,) = fake_flyctl.calls()
    assert call["argv"] == ["version"]
    assert call["token"] == {"FLY_API_TOKEN": True, "FLY_ACCESS_TOKEN": False}
    assert "secret-token" not in fake_flyctl.log_path.read_text()


def test_logged_out_fails_as_flyctl_does(fake_flyctl):
    fake_flyctl.env["FAKE_FLY_LOGGED_OUT"] = "1"

    result = fake_flyctl.run("auth", "whoami")

    assert result.returncode == 1
    assert result.stderr.strip() == "Error: no access token available. Please login with 'flyctl auth login'"


def test_deploy_makes_a_release_and_rolls_machines_to_the_image(fake_flyctl, tmp_path):
    fake_flyctl.add_app("onnx-serve", image=IMAGE)
    (tmp_path / "fly.toml").write_text('app = "onnx-serve"\nprimary_region = "iad"\n')

    fake_flyctl.run("deploy", "--image", "registry.fly.io/onnx-serve:v2", "--remote-only", "-c",
                    str(tmp_path / "fly.toml"), "--strategy", "rolling", "--wait-timeout", "5m0s", check=True)

    status = json.loads(fake_flyctl.run("status", "--json", "-a", "onnx-serve", check=True).stdout)
    assert set(status) == {"ID", "Name", "Deployed", "Status", "Hostname", "Version", "AppURL", "Organization",
                           "PlatformVersion", "Machines"}
    assert status["Version"] == 2
    assert {(m["state"], m["image_ref"]["repository"], m["image_ref"]["tag"]) for m in status["Machines"]} == {
        ("started", "onnx-serve", "v2")}
    releases = json.loads(fake_flyctl.run("releases", "--json", "--image", "-a", "onnx-serve", check=True).stdout)
    assert [(r["Version"], r["Status"], r["ImageRef"]) for r in releases] == [
        (2, "complete", "registry.fly.io/onnx-serve:v2"), (1, "complete", IMAGE)]
    assert releases[0]["DeploymentStrategy"] == "ROLLING"


def test_a_failing_deploy_records_a_failed_release_and_keeps_the_old_image(fake_flyctl):
    fake_flyctl.add_app("onnx-serve", image=IMAGE)
    fake_flyctl.env["FAKE_FLY_DEPLOY_FAIL"] = "smoke checks for 1234 failed: the app crashed"

    result = fake_flyctl.run("deploy", "-a", "onnx-serve", "--image", "registry.fly.io/onnx-serve:bad")

    assert result.returncode == 1
    assert "smoke checks for 1234 failed" in result.stderr
    app = fake_flyctl.app("onnx-serve")
    assert [r["Status"] for r in app["releases"]] == ["complete", "failed"]
    assert {m["image_ref"]["tag"] for m in app["machines"]} == {"v1"}


def test_staged_secret_from_stdin_is_listed_as_staged(fake_flyctl):
    fake_flyctl.add_app("onnx-serve", image=IMAGE)

    result = fake_flyctl.run("secrets", "set", "GCP_SA_JSON_B64=-", "--stage", "-a", "onnx-serve", input="eyJ9")

    assert result.returncode == 0
    assert "Secrets are staged for the next deployment" in result.stdout
    assert fake_flyctl.app("onnx-serve")["secrets"]["GCP_SA_JSON_B64"]["value"] == "eyJ9"
    listed = json.loads(fake_flyctl.run("secrets", "list", "--json", "-a", "onnx-serve", check=True).stdout)
    assert [(s["name"], s["status"]) for s in listed] == [("GCP_SA_JSON_B64", "Staged")]


def test_apps_list_and_unknown_commands(fake_flyctl):
    fake_flyctl.add_app("onnx-serve", image=IMAGE)

    apps = json.loads(fake_flyctl.run("apps", "list", "--json", check=True).stdout)
    unknown = fake_flyctl.run("machines", "list")

    assert [(a["Name"], a["Deployed"], a["CurrentRelease"]["ImageRef"]) for a in apps] == [
        ("onnx-serve", True, IMAGE)]
    assert unknown.returncode == 1
    assert unknown.stderr.startswith('Error: unknown command "machines list"')
