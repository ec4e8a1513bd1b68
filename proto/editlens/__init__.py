"""The EditLens wire contract: generated gRPC stubs (import package ``editlens``, source in proto/editlens)."""
