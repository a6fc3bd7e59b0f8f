"""Running the reward-model service: deploy it on Ray Serve from Python (``deploy_rm``; again with a new
checkpoint to roll it), find or deploy it for a PPO job (``rm_service``), serve it from the CLI
(``rlhf-ray serve-rm``: ``serve_rm_forever``), and the checks around that (health, exposure)."""

import os
import time
from pathlib import Path

from ray import serve

from rlhf_ray.config import ServeConfig
from rlhf_ray.reward.serve import build_app


def service_url(serve_cfg: ServeConfig, route_prefix: str = "/") -> str:
    host = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::", "") else serve_cfg.host
    return f"http://{host}:{serve_cfg.port}{route_prefix.rstrip('/')}"


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    import requests

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200 and r.json().get("status") == "ok":
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except (requests.RequestException, ValueError) as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout_s:.0f} s ({last}); if Serve was already "
                       f"running on another port, serve.start ignored this one")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(serve_cfg: ServeConfig, token: str | None) -> None:
    """Refuse to serve without a token on a host other machines reach, unless told to."""
    from rlhf_ray.config import ConfigError

    if serve_cfg.host not in LOOPBACK and not token and not serve_cfg.allow_unauthenticated:
        raise ConfigError(f"serve.host={serve_cfg.host} reaches other machines, and no bearer token is set: set "
                          f"${serve_cfg.auth_token_env} (serve.auth_token_env), or serve.allow_unauthenticated=true "
                          f"to serve it open")


def deploy_rm(serve_cfg: ServeConfig, checkpoint_dir: str | Path, max_length: int | None = None, name: str = "rm", *,
              route_prefix: str = "/", batching: bool = True, timeout_s: float = 120.0, chat_template: str = "auto"):
    """Start Serve on serve_cfg.host:port (joining or starting Ray), run the RM app, wait until it
    answers /healthz; returns ``(url, handle)``. Called again with another checkpoint, it rolls the
    running app onto it without dropping requests. Auth is on when the env var
    ``serve_cfg.auth_token_env`` is set (read here, in the driver)."""
    from rlhf_ray.runtime import init_ray

    token = os.environ.get(serve_cfg.auth_token_env) or None
    check_exposure(serve_cfg, token)
    init_ray()
    app = build_app(serve_cfg, checkpoint_dir, max_length, auth_token=token, batching=batching,
                    chat_template=chat_template)
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    handle = serve.run(app, name=name, route_prefix=route_prefix)
    url = service_url(serve_cfg, route_prefix)
    wait_healthy(url, timeout_s)
    return url, handle


def rm_service(serve_cfg: ServeConfig, checkpoint_dir: str | Path | None, max_length: int | None = None,
               name: str = "rm", chat_template: str = "auto") -> tuple[str | None, object, bool]:
    """The RM as a service for a client job (PPO): the app ``name`` if it already runs on this Ray
    cluster (``rlhf-ray serve-rm``, another job), else one deployed from ``checkpoint_dir``.
    Returns ``(url or None for a running app, handle, deployed_here)``; remove what was deployed
    here with :func:`shutdown_rm`."""
    from ray.serve.schema import ApplicationStatus

    from rlhf_ray.runtime import init_ray

    init_ray()
    app = serve.status().applications.get(name)
    if app is not None and app.status == ApplicationStatus.RUNNING:
        return None, serve.get_app_handle(name), False
    if checkpoint_dir is None:
        raise ValueError(f"no Serve app {name!r} is running on this Ray cluster, and no RM checkpoint was "
                         f"given to deploy one")
    url, handle = deploy_rm(serve_cfg, checkpoint_dir, max_length, name, chat_template=chat_template)
    return url, handle, True


def shutdown_rm(name: str | None = None) -> None:
    """Delete the app ``name``, or (None) shut Serve down entirely; do this before ``ray.shutdown()``."""
    if name is None:
        serve.shutdown()
    else:
        serve.delete(name)


def serve_rm_forever(serve_cfg: ServeConfig, checkpoint_dir: str | Path, max_length: int | None = None,
                     chat_template: str = "auto") -> None:
    """For ``rlhf-ray serve-rm``: deploy, print the URL, serve until Ctrl-C (or SIGTERM), shut down
    Serve, and Ray too if this call started it."""
    import signal
    import threading

    import ray
    import requests

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    started_ray = not ray.is_initialized()
    try:
        url, _ = deploy_rm(serve_cfg, checkpoint_dir, max_length, chat_template=chat_template)
        if threading.current_thread() is threading.main_thread():  # after ray.init, which sets its own
            signal.signal(signal.SIGTERM, stop)  # docker stop, systemd: the same clean stop as Ctrl-C
        token = os.environ.get(serve_cfg.auth_token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        version = requests.get(f"{url}/version", headers=headers, timeout=10).json().get("model_version")
        print(f"reward model {version} serving at {url}  (docs: {url}/docs; auth: "
              f"{'bearer token from $' + serve_cfg.auth_token_env if token else 'off'}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down the reward model service", flush=True)
    finally:
        if ray.is_initialized():
            shutdown_rm()
            if started_ray:
                ray.shutdown()
