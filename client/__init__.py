"""The ``editlens`` CLI (``client.cli``) and, with the service issue, the Python SDK."""
