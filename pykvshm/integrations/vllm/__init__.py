"""pykvshm as an out-of-tree vLLM KV connector.

Every engine (prefill, decode, or both) attaches to one pykvshm pool; each one's
prefill becomes a prefix-cache hit for every other engine that maps the pool::

    from vllm.config import KVTransferConfig

    KVTransferConfig(
        kv_connector="PykvshmConnector",
        kv_connector_module_path="pykvshm.integrations.vllm",
        kv_role="kv_both",                      # or kv_producer / kv_consumer
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"pool": "vllm-kv", "capacity": "8GiB"},
    )

See docs/design/vllm.md for what is guaranteed and how it is tested.
"""

from .config import ConnectorConfig, request_keys
from .connector import PykvshmConnector
from .metadata import BlockTransfer, PykvshmMetadata

__all__ = ["BlockTransfer", "ConnectorConfig", "PykvshmConnector", "PykvshmMetadata", "request_keys"]
