"""Composition root of the project's Invoke tasks: `invoke --list` shows them."""

from invoke import Collection

from toolkit import image
from toolkit.defaults import DEFAULTS

ns = Collection()
ns.add_collection(Collection.from_module(image), name="image")
ns.configure(DEFAULTS)
