"""gunicorn settings for the service: `gunicorn -c service/gunicorn.conf.py service.app:app`.

Read at start by the master, so a bad environment stops start-up here, before any worker is forked.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service import logs, metrics  # noqa: E402
from service.settings import SettingsError, load_settings  # noqa: E402
from service.worker import DrainingServer  # noqa: E402

try:
    _settings = load_settings()
except SettingsError as exc:
    logs.fatal(str(exc))
    sys.exit(2)

# Cloud Run sends traffic to $PORT on 0.0.0.0; Fly sends it to internal_port (8080), and sets no PORT.
bind = [f"{_settings.host}:{_settings.port}"]
# uvicorn-worker's UvicornWorker (uvloop, httptools) with a shutdown that answers every request that reached it.
worker_class = "service.worker.Worker"
DrainingServer.request_window = _settings.shutdown_request_window  # read in the worker after fork
# One worker per container by default: the platform scales out, and each worker holds a copy of the model.
workers = _settings.web_concurrency
# Sessions must be created after fork (onnxruntime thread pools do not survive it), so no preload.
preload_app = False
# A heartbeat, not a request timeout: it must outlast opening a large model, which holds the GIL.
timeout = _settings.worker_timeout
# In-flight requests finish within this after SIGTERM: under Cloud Run's 10 s and Fly's kill_timeout.
graceful_timeout = _settings.graceful_timeout
# Longer than the platform proxies' idle timeouts, so they never reuse a connection we just closed.
keepalive = _settings.keepalive
# The platform's proxy sets X-Forwarded-*; nothing else can reach the container.
forwarded_allow_ips = "*"
# The heartbeat file lives on tmpfs: on a disk-backed dir its fchmod can stall a worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No control socket under $HOME or $XDG_RUNTIME_DIR: the container's filesystem is read-only but /tmp.
control_socket_disable = True
# JSON lines on stdout for gunicorn, uvicorn and the service; the service writes the access log itself.
logconfig_dict = logs.logging_config(_settings.log_level)
logs.skip_unlogged_fields()
accesslog = None
loglevel = _settings.log_level


# A gs:// model: the storage client's modules (about half a second of imports) are loaded here, once, so that a
# forked worker begins its download at once instead of importing them while it also imports the app. Importing
# starts no thread and opens no socket, so nothing unsafe is forked; the client itself is made in the worker.
if _settings.source.is_gcs:
    import google.cloud.storage  # noqa: E402, F401


def post_fork(server, worker):
    if _settings.metrics_port:
        metrics.close_in_worker()
    # In the worker, before it imports the app: the model's files arrive while the web framework imports (about
    # a second of CPU), not after it. Imported here, not in the master, so none of it (numpy's threads) is forked.
    if getattr(server.app, "app_uri", None) == "service.app:app":  # not the bench's floor and peer apps
        from service.model_store import begin_in_worker

        begin_in_worker(_settings)


def post_worker_init(worker):
    logs.JsonFormatter.project = _settings.google_cloud_project


# Prometheus metrics summed over the workers (service/metrics.py), served by this master on METRICS_PORT.
if _settings.metrics_port:

    def on_starting(server):
        metrics.prepare_directory()  # before any worker imports prometheus_client

    def when_ready(server):
        metrics.serve(_settings.host, _settings.metrics_port)

    def child_exit(server, worker):
        metrics.worker_died(worker.pid)

    def on_exit(server):
        metrics.remove_directory()
