"""The EditLens gRPC server (``editlens serve``).

app.py      start/stop, loading the registry and the model in the background, health, reflection
service.py  the EditLens servicer: Generate(Stream), Edit, versions, Diagnose, GetServerInfo
bundles.py  a registry version -> validated, attachable edits (one place; VisEdit is one more branch)
jobs.py     edits and diagnostics as queued jobs with streamed progress and cancellation
errors.py   every exception -> a gRPC status code with a readable message
convert.py  Python objects <-> editlens.v1 messages
config.py   address, model, registry, auth token, limits
"""
