"""`qwen3vl serve`: an OpenAI-compatible chat server over an engine (serve/; needs the `[serve]` extra)."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible chat server (POST /v1/chat/completions)")
    parser.add_argument("--engine", required=True, help="engine folder from `qwen3vl build`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend", choices=("auto", "trt", "ort"), default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY`")
    parser.add_argument("--max-batch", type=int, default=8, help="requests per batch")
    parser.add_argument("--max-queue", type=int, default=32, help="waiting requests before 429")
    parser.add_argument("--model-name", default="qwen3vl", help="the model id /v1/models lists")
    parser.add_argument("--allow-local-images", metavar="DIR", help="accept image paths, confined to DIR")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (off by default: the server would fetch what clients name)")
    parser.add_argument("--ray", action="store_true",
                        help="run as a Ray Serve deployment (needs ray[serve]; joins a running cluster or starts one)")
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas behind one endpoint")
    parser.set_defaults(handler=serve)


def serve(args) -> int:
    from runtime.errors import Qwen3VLError

    try:
        import uvicorn

        from serve import ServerConfig, create_app
    except ImportError as exc:
        raise Qwen3VLError(f"the server needs its extra: pip install -e '.[serve]' ({exc})") from None
    from runtime import Pipeline

    if args.max_batch < 1 or args.max_queue < 1:
        raise Qwen3VLError("--max-batch and --max-queue must be at least 1")
    config = ServerConfig(model_name=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
                          max_queue=args.max_queue, allow_local_images=args.allow_local_images,
                          allow_remote_images=args.allow_remote_images)
    if args.ray:
        return serve_on_ray(args)
    app = create_app(config=config, loader=lambda: Pipeline.load(args.engine, backend=args.backend,
                                                                   threads=args.threads))
    print(f"serving {args.engine} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serve_on_ray(args) -> int:
    import time

    from runtime.errors import Qwen3VLError

    try:
        from ray import serve as ray_serve

        from serve.ray_app import deployment
    except ImportError as exc:
        raise Qwen3VLError(f"--ray needs Ray Serve: pip install -e '.[ray]' ({exc})") from None
    if args.replicas < 1:
        raise Qwen3VLError("--replicas must be at least 1")
    options = {"api_key": args.api_key, "model_name": args.model_name, "max_batch": args.max_batch,
               "max_queue": args.max_queue, "allow_local_images": args.allow_local_images,
               "allow_remote_images": args.allow_remote_images}
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    ray_serve.run(deployment(args.engine, args.replicas, args.threads or 1, args.backend, **options), route_prefix="/")
    print(f"serving {args.engine} on http://{args.host}:{args.port}/v1 with {args.replicas} Ray Serve replicas",
          file=sys.stderr)
    try:
        while True:  # Ray serves; Ctrl-C or SIGTERM ends it
            time.sleep(3600)
    finally:
        ray_serve.shutdown()
