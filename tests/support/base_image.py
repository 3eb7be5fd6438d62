"""A stand-in for the official `python:X.Y-slim` image, made on this machine (no image registry is reachable).

Recipe: `debootstrap --variant=minbase` of the host's Debian suite from its configured mirror, the runtime
libraries the official slim image installs, and the running CPython copied into /usr/local with the official
layout. The interpreter was built against the host's libraries, which is why the suite is the host's.

Two deliberate differences from the official image, both because of where it is built:
- pip is the test environment's pip (the interpreter's bundled one is older than what the official image ships);
- the host's locally added CA certificates (/usr/local/share/ca-certificates) are trusted, so that pip inside
  `docker build` works behind the same TLS-inspecting proxy as pip on the host.

The root filesystem is cached as a tarball keyed by everything that goes into it, so later runs only
`docker import` it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.debian_packages import ensure_installed
from tests.support.docker_engine import DockerEngine
from tests.support.external import missing_tool
from tests.support.mounts import unmount_under

# Bump when the recipe changes, so cached root filesystems built by an older recipe are not reused.
RECIPE_VERSION = 1
# What the official slim image keeps after building Python: certificates, /etc/services, zones, and the
# shared libraries the interpreter's extension modules link to.
RUNTIME_PACKAGES = (
    "ca-certificates", "netbase", "tzdata",
    "libssl3", "libsqlite3-0", "libffi8", "libbz2-1.0", "liblzma5", "zlib1g", "libexpat1", "libuuid1",
    "libncursesw6", "libreadline8", "libgdbm6", "libgdbm-compat4", "libnsl2", "libtirpc3", "libcrypt1",
)  # fmt: skip
# Dropped like the official image does (test suites, bytecode, static library), plus Tk, which has no
# libraries in a slim image anyway.
DROPPED_NAMES = ("test", "tests", "idle_test", "__pycache__", "*.pyc", "*.pyo", "libpython*.a",
                 "tkinter", "idlelib", "turtledemo", "_tkinter*.so")  # fmt: skip
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
LABEL = "org.onnx-serve.tests.base-recipe"
IMPORT_CHECK = "import ctypes, sqlite3, ssl, zlib, bz2, lzma, uuid, readline, decimal, json; print(ssl.OPENSSL_VERSION)"


@dataclass(frozen=True)
class BaseImage:
    name: str
    python_version: str
    seconds: float  # what getting it took this run
    from_cache: bool  # True when the root filesystem came from the cache (only `docker import` ran)


def python_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def stand_in_name() -> str:
    """The stand-in's image name; never `python:X.Y-slim` itself, which would shadow the real one."""
    return f"onnx-serve-tests/python:{python_minor()}-slim"


def build_base_image(engine: DockerEngine, cache_dir: Path | None = None) -> BaseImage:
    """Make the stand-in image in `engine` (from the cached root filesystem when there is one) and check it."""
    started = time.monotonic()
    suite = host_suite()
    key = recipe_key(suite)
    name = stand_in_name()
    if _image_label(engine, name) == key:
        return BaseImage(name, platform.python_version(), time.monotonic() - started, from_cache=True)
    tarball = (cache_dir or default_cache_dir()) / f"python-{key}.tar"
    from_cache = tarball.is_file()
    if not from_cache:
        build_rootfs_tarball(suite, tarball)
    _import(engine, tarball, name, key)
    try:
        check_image(engine, name)
    except RuntimeError:
        tarball.unlink(missing_ok=True)  # never keep a cached root filesystem that makes a broken image
        raise
    return BaseImage(name, platform.python_version(), time.monotonic() - started, from_cache)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "onnx-serve-tests"


def host_suite() -> str:
    release = _os_release()
    if release.get("ID") != "debian" or not release.get("VERSION_CODENAME"):
        missing_tool("the stand-in base image is made with debootstrap on a Debian host, and this host is not Debian")
    return release["VERSION_CODENAME"]


def recipe_key(suite: str) -> str:
    """Everything that changes the root filesystem: Python, suite, recipe, pip, and the local CAs it trusts."""
    digest = hashlib.sha256()
    for ca in sorted(LOCAL_CA_DIR.rglob("*.crt")):
        digest.update(ca.read_bytes())
    digest.update(importlib.metadata.version("pip").encode())
    return f"{platform.python_version()}-{suite}-{platform.machine()}-r{RECIPE_VERSION}-{digest.hexdigest()[:12]}"


def build_rootfs_tarball(suite: str, tarball: Path) -> None:
    if os.geteuid() != 0:
        missing_tool("making the stand-in base image needs root (debootstrap, chroot)")
    debootstrap = ensure_installed("debootstrap", "debootstrap")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-serve-rootfs-", dir=tarball.parent) as workdir:
        root = Path(workdir) / "root"
        try:
            _run(debootstrap, "--variant=minbase", f"--include={','.join(RUNTIME_PACKAGES)}", suite, str(root),
                 debian_mirror(suite))  # fmt: skip
        finally:
            unmount_under(root)  # debootstrap leaves /proc and /sys mounted when it fails
        _trust_local_cas(root)
        _install_python(root)
        _slim_down(root)
        _run("ldconfig", "-r", str(root))
        partial = tarball.with_suffix(".partial")
        _run("tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "--exclude=./dev/*", "--exclude=./proc/*",
             "--exclude=./sys/*", ".")  # fmt: skip
        partial.rename(tarball)


def debian_mirror(suite: str) -> str:
    """The host's configured mirror for `suite` (deb822 .sources or one-line sources.list), else Debian's CDN."""
    apt = Path("/etc/apt")
    for sources in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if suite in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    for listing in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if listing.is_file():
            match = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{suite}\s", listing.read_text(), re.M)
            if match:
                return match[1]
    return "http://deb.debian.org/debian"


def check_image(engine: DockerEngine, name: str) -> None:
    """What the project needs from a python:slim base: pip, and the stdlib modules that link system libraries."""
    for command in (["python3", "-m", "pip", "--version"], ["python3", "-c", IMPORT_CHECK]):
        done = engine.docker("run", "--rm", "--network", "none", name, *command, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"stand-in base image {name}: `{' '.join(command)}` failed:\n{done.stderr[-2000:]}")


def _install_python(root: Path) -> None:
    """Lay the running CPython out as the official image does: /usr/local/{bin,lib,include}."""
    prefix = Path(sys.base_prefix)
    version = python_minor()
    local = root / "usr" / "local"
    ignore = shutil.ignore_patterns(*DROPPED_NAMES, "site-packages")
    shutil.copytree(prefix / "lib" / f"python{version}", local / "lib" / f"python{version}", ignore=ignore, symlinks=True)
    for library in (prefix / "lib").glob("libpython3*.so*"):
        shutil.copy2(library, local / "lib", follow_symlinks=False)
    include = prefix / "include" / f"python{version}"
    if include.is_dir():
        shutil.copytree(include, local / "include" / f"python{version}", symlinks=True)
    bin_dir = local / "bin"
    shutil.copy2(prefix / "bin" / f"python{version}", bin_dir)
    for alias, target in (("python3", f"python{version}"), ("python", "python3")):
        (bin_dir / alias).symlink_to(target)
    _install_pip(local, version)


def _install_pip(local: Path, version: str) -> None:
    site_packages = local / "lib" / f"python{version}" / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    pip_package = _pip_dir()
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(pip_package, site_packages / "pip", ignore=ignore)
    for dist_info in pip_package.parent.glob("pip-*.dist-info"):
        shutil.copytree(dist_info, site_packages / dist_info.name, ignore=ignore)
    script = local / "bin" / f"pip{version}"
    script.write_text(
        f"#!/usr/local/bin/python{version}\n"
        "import sys\nfrom pip._internal.cli.main import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    script.chmod(0o755)
    for alias in ("pip3", "pip"):
        (local / "bin" / alias).symlink_to(script.name)


def _pip_dir() -> Path:
    import pip

    return Path(pip.__file__).parent


def _trust_local_cas(root: Path) -> None:
    cas = sorted(LOCAL_CA_DIR.rglob("*.crt"))
    if not cas:
        return
    target = root / LOCAL_CA_DIR.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for ca in cas:
        shutil.copy2(ca, target / ca.name)
    _run("chroot", str(root), "update-ca-certificates")


def _slim_down(root: Path) -> None:
    """What debian:slim leaves out (docs but copyrights, manuals, translations), what the official image removes
    after apt, and what debootstrap copied from this host."""
    for path in root.glob("usr/share/doc/*/*"):
        if path.name != "copyright":
            _remove(path)
    for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/groff/*",
                    "usr/share/lintian/*", "var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "var/log/*.log", "etc/resolv.conf", "etc/hostname"):  # fmt: skip
        for path in root.glob(pattern):
            if path.name != "locale.alias":
                _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _import(engine: DockerEngine, tarball: Path, name: str, key: str) -> None:
    version = platform.python_version()
    changes = [
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        f"ENV PYTHON_VERSION={version}",
        f"LABEL {LABEL}={key}",
        'CMD ["python3"]',
    ]
    engine.docker("import", *(arg for change in changes for arg in ("--change", change)), str(tarball), name)


def _image_label(engine: DockerEngine, name: str) -> str | None:
    done = engine.docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', name, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _os_release() -> dict[str, str]:
    path = Path("/etc/os-release")
    if not path.is_file():
        return {}
    return {k: v.strip('"') for k, v in re.findall(r"^(\w+)=(.*)$", path.read_text(), re.M)}


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}):\n{output}")
