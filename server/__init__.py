"""The EditLens gRPC server (``editlens serve``).

app.py         start/stop, loading the registry and the model in the background, health, reflection
service.py     the servicer: every RPC checks its request and calls one of the modules below
host.py        what the work runs on: the loaded model, the registry, versions, input checks
versions.py    which version serves a request: the live-alias cache, version resolution, the bundle cache
bundles.py     a registry version: ``publish`` writes one, ``load_bundle`` reads one (through the editor registry)
generation.py  Generate and GenerateStream
editing.py     the Edit and TrainVisEdit jobs
diagnosing.py  the Diagnose job
jobs.py        long requests as queued jobs with streamed progress and cancellation
inputs.py      images, texts and prompts checked against the limits
auth.py        the bearer token of the calls that change the registry
errors.py      every exception -> a gRPC status code with a readable message (by type)
convert.py     Python objects <-> editlens.v1 messages
config.py      address, model, registry, auth token, limits
"""
