"""Invoke tasks that build, push, deploy and smoke-test the inference service.

`tasks.py` at the project root joins these modules into one collection; each module holds one concern:
`image` (docker build/push), `cloudrun` and `fly` (deploy targets), `cloudrun_yaml` (Cloud Run's service.yaml),
`gcp` (make a Google Cloud project ready: `gcp.setup`), `local` (run on this machine), `smoke` (prove a deployed
URL serves the model).
"""
