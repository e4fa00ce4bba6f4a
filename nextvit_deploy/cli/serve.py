"""``nextvit-deploy serve``: an artifact behind a real Triton server (HTTP, gRPC, metrics) until Ctrl-C."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import err, handle_errors, out

EXAMPLES = """
Examples:

  nextvit-deploy serve build/nextvit_small-onnx-fp32-224.onnx            # 127.0.0.1:8000 (HTTP), :8001 (gRPC)

  nextvit-deploy serve model.onnx --instances 2 --max-queue-delay-us 2000 --threads 4

  nextvit-deploy serve model.onnx --host 0.0.0.0 --http-port 9000 --grpc-port 9001 --metrics-port 9002

  nextvit-deploy serve model.onnx --timeout-s 60                          # stops by itself (benchmarks, tests)
"""


@handle_errors
def serve_cmd(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact with its manifest (any this machine can run).")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    instances: Annotated[int, typer.Option(help="Model instances, each with its own runner.")] = 1,
    max_queue_delay_us: Annotated[int, typer.Option(
        help="Dynamic batcher: longest wait to fill a batch, microseconds.")] = 1000,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads per instance. Default: the runtime's.")] = None,
    image_input: Annotated[bool, typer.Option(help="Also serve <name>_image, taking encoded image bytes.")] = True,
    name: Annotated[str | None, typer.Option(help="Model name. Default: the artifact's file name.")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Stop by itself after this many seconds.")] = None,
    server_log: Annotated[Path | None, typer.Option(help="Keep tritonserver's log in this file.")] = None,
) -> None:
    """Serve an artifact through Triton Inference Server with dynamic batching (stop with Ctrl-C or SIGTERM)."""
    from ..errors import BadInput
    from ..serve.server import ServeInfo, ServeOptions, serve

    if threads is not None and threads < 1:
        raise BadInput(f"--threads must be at least 1, got {threads}")

    def ready(info: ServeInfo) -> None:
        shape = "x".join(map(str, info.input_shape))
        out.print(f"serving {info.model!r} (input {info.input_name!r} float32 Nx{shape}, N <= {info.max_batch_size})"
                  + (f" and {info.image_model!r} (encoded image bytes, UINT8 1xL)" if info.image_model else ""),
                  highlight=False, soft_wrap=True)
        out.print(f"  HTTP {info.http_url}  gRPC {info.grpc_url}  metrics {info.metrics_url}  (tritonserver pid "
                  f"{info.pid})", highlight=False, soft_wrap=True)
        err.print("ready; stop with Ctrl-C or SIGTERM", highlight=False)

    opts = ServeOptions(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        instances=instances, max_queue_delay_us=max_queue_delay_us, threads=threads,
                        image_input=image_input, timeout_s=timeout_s, name=name, log_path=server_log)
    code = serve(artifact, opts, on_ready=ready)
    err.print("stopped", highlight=False)
    raise typer.Exit(code)
