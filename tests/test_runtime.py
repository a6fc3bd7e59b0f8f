"""The quiet console: Ray's own lines hidden at the default level, the known-harmless error lines
dropped, everything else (our progress, real errors) kept; the level set by RLHF_RAY_LOG_LEVEL."""

import logging

import pytest

from rlhf_ray.progress import duration, eta
from rlhf_ray.runtime import LOG_LEVEL_ENV, log_level


def test_the_log_level_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    assert log_level() == logging.ERROR
    monkeypatch.setenv(LOG_LEVEL_ENV, "Info")
    assert log_level() == logging.INFO
    monkeypatch.setenv(LOG_LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match=r"\$RLHF_RAY_LOG_LEVEL='loud': expected debug, info, warning or error"):
        log_level()


def test_cli_verbose_sets_info_and_a_bad_level_exits_2(monkeypatch, capsys):
    from rlhf_ray.cli import main

    monkeypatch.setenv(LOG_LEVEL_ENV, "loud")
    assert main(["show-config"]) == 2 and "expected debug, info, warning or error" in capsys.readouterr().err
    assert main(["show-config", "--verbose"]) == 0  # --verbose replaces the bad value with info
    import os

    assert os.environ[LOG_LEVEL_ENV] == "info"


def test_known_ray_noise_is_dropped_and_the_rest_is_kept(ray_cluster, capsys):
    """What the driver prints of the cluster's messages (the path "(raylet) ..." lines take, and the
    workers' output)."""
    from ray._private import worker

    noise = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
             "will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    watcher = ("[2026-11-30 13:54:46,845 E 8235 8339] core_worker.cc:2465: Actor with class name: "
               "'PreemptionWatcher' and ID: '16de' has constructor arguments in the object store and max_restarts > 0.")
    worker.print_to_stdstream({"lines": [noise, "a real error from the raylet"], "pid": "raylet", "is_err": False},
                              ignore_prefix=False)
    worker.print_to_stdstream({"lines": [watcher], "pid": 4242, "ip": "10.0.0.1", "is_err": False,
                               "actor_name": "TrainController", "task_name": ""}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "a real error from the raylet" in out
    assert "graceful_shutdown" not in out and "PreemptionWatcher" not in out


def test_eta_and_durations():
    assert [duration(s) for s in (9.4, 75.2, 3725)] == ["9s", "1m15s", "1h02m"]
    assert eta(10, 150, 20.0) == "eta 4m40s"  # 140 left at 2 s each
    assert eta(0, 150, 0.0) == "eta ?" and eta(150, 150, 300.0) == "eta 0s"


def test_a_bar_is_drawn_only_for_print_on_a_terminal_and_lines_pass_through():
    from rlhf_ray.progress import Bar

    said = []
    bar = Bar(3, "[ppo]", said.append)  # a caller's own log (tests, notebooks): no bar, its lines as they are
    bar.update()
    bar.log("[ppo] it 1/3")
    bar.close()
    assert said == ["[ppo] it 1/3"] and bar._bar is None
    assert Bar(3, "[ppo]")._bar is None  # print, but pytest's stdout is no terminal


def test_on_a_terminal_print_draws_a_bar_and_the_lines_above_it():
    """In a pseudo-terminal, a stage logging with print gets tqdm's bar (its count and rate) with the
    stage's own lines written above it."""
    import os
    import pty
    import subprocess
    import sys

    import fcntl
    import struct
    import termios

    script = ("import time\nfrom rlhf_ray.progress import Bar\n"
              "bar = Bar(3, '[ppo]')\nassert bar._bar is not None\n"
              "for i in range(3):\n    time.sleep(0.15)\n    bar.update()\n    bar.log(f'[ppo] it {i + 1}/3')\n"
              "bar.close()\n")
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # (0 columns: tqdm draws nothing)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0, out
    text = out.decode(errors="replace")
    assert "[ppo] it 1/3" in text and "[ppo] it 3/3" in text
    assert "[ppo]: 100%|" in text and "| 3/3 [" in text and "it/s]" in text  # tqdm's bar, count and rate
    assert text.index("[ppo]:  33%|") < text.index("[ppo] it 1/3")  # the line went above the drawn bar
