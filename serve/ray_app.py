"""The same server as a Ray Serve deployment: N replicas, one engine (and one batcher) each, behind Ray's
HTTP proxy, so a cluster of machines serves one endpoint. Needs `pip install 'ray[serve]'`.

    serve run serve.ray_app:app_builder engine=engines/demo-small replicas=2 threads=1 [backend=ort] [api_key=K]

or from Python: `serve.run(deployment(engine, replicas=2), route_prefix="/")`.
"""

from __future__ import annotations

from .app import ServerConfig, create_app


def deployment(engine: str, replicas: int = 1, threads: int = 1, backend: str = "auto", **config):
    """A bound Ray Serve application: `replicas` copies of the server, each loading `engine` on its replica."""
    from ray import serve

    def build_asgi():  # runs on each replica
        from runtime import Pipeline

        return create_app(Pipeline.load(engine, backend=backend, threads=threads), ServerConfig(**config))

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    @serve.ingress(build_asgi)
    class Qwen3VLServer:
        pass

    return Qwen3VLServer.bind()


def app_builder(args: dict):
    """`serve run serve.ray_app:app_builder engine=E replicas=N threads=T backend=B api_key=K`."""
    options = {key: args[key] for key in ("api_key", "model_name") if key in args}
    return deployment(args["engine"], int(args.get("replicas", 1)), int(args.get("threads", 1)),
                      args.get("backend", "auto"), **options)
