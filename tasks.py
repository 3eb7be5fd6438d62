"""Composition root of the project's Invoke tasks: `invoke --list` shows them."""

from invoke import Collection

from toolkit import compare, deps, fly, gcp, image, local, optimize, scan, smoke
from toolkit.defaults import DEFAULTS
from toolkit.bench import bench
from toolkit.deploy import deploy, render, rollback
from toolkit.release import release, status
from toolkit.tune import tune

ns = Collection(deploy, render, rollback, smoke.smoke, bench, release, status, tune)
image_tasks = Collection.from_module(image)
image_tasks.add_task(scan.scan)
ns.add_collection(image_tasks, name="image")
ns.add_collection(Collection(deps.lock, deps.check, deps.audit), name="deps")
ns.add_collection(Collection(local.stop), name="local")
ns.add_collection(Collection(fly.credentials, fly.api_key), name="fly")
ns.add_collection(Collection(gcp.setup), name="gcp")
ns.add_collection(Collection(compare.compare, optimize.optimize), name="model")
ns.configure(DEFAULTS)
