"""Benchmarks of the inference service, each figure beside a floor measured in the same run: `invoke bench`.

Absolute times on a shared 2-core machine drift, so every figure is paired with the least the same work costs
(a bare process, a bare ASGI app, an in-process call) and the target is the ratio. See docs/benchmarks.md.
"""
