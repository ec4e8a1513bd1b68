"""MLflow-backed adapter versions, aliases, rollback and safetensors IO (service issue)."""
