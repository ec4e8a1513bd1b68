"""The ``editlens`` CLI (``client.cli``) and the Python SDK (``client.sdk``).

``from client import EditLensClient`` gives the SDK's client; it is imported
lazily so that the CLI's start-up does not pay for gRPC.
"""


def __getattr__(name):
    if name in ("EditLensClient", "EditLensError"):
        from . import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
