"""Composition root of the project's Invoke tasks: `invoke --list` shows them."""

from invoke import Collection

from toolkit import compare, fly, gcp, image, local, smoke
from toolkit.defaults import DEFAULTS
from toolkit.bench import bench
from toolkit.deploy import deploy, render, rollback
from toolkit.release import release, status

ns = Collection(deploy, render, rollback, smoke.smoke, bench, release, status)
ns.add_collection(Collection.from_module(image), name="image")
ns.add_collection(Collection(local.stop), name="local")
ns.add_collection(Collection(fly.credentials, fly.api_key), name="fly")
ns.add_collection(Collection(gcp.setup), name="gcp")
ns.add_collection(Collection(compare.compare), name="model")
ns.configure(DEFAULTS)
