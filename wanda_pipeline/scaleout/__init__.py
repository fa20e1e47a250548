"""Scale-out plumbing: start and stop a local Prefect server and process workers, and split
devices between workers. Knows nothing of pipelines or stage order."""

from wanda_pipeline.scaleout.devices import parse_devices, worker_devices
from wanda_pipeline.scaleout.processes import LocalPrefectServer, WorkerGroup, ensure_process_pool, stop_tree

__all__ = ["LocalPrefectServer", "WorkerGroup", "ensure_process_pool", "parse_devices", "stop_tree",
           "worker_devices"]
