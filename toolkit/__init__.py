"""Invoke tasks that build, push, deploy and smoke-test the inference service.

`tasks.py` at the project root joins these modules into one collection; each module holds one concern:
`image` (docker build/push), `cloudrun` and `fly` (deploy targets), `cloudrun_spec` (what a Cloud Run revision is
made of: port, probe, env, volume), `cloudrun_yaml` (Cloud Run's service.yaml), `gcp` (make a Google Cloud project
ready: `gcp.setup`), `local` (run on this machine), `smoke` (prove a deployed URL serves the model), `release`
(the tasks: a new model on the serving image, compared and moved in steps; `status`), with what every release needs
in `release_core`, its journal and way back in `release_journal`, its platform parts `release_cloudrun` and
`release_fly`, and the Cloud Monitoring reader `monitoring`.
"""
