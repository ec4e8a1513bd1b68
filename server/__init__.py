"""gRPC servicer, model host, request scheduling, auth and limits (service issue)."""
