"""Where the PPO actors run: an actor's node, and a node's address with a free port on it (where a
process group meets), found by a zero-CPU task on that node.

Free of torch on purpose: the task runs in a plain Ray worker, often a fresh process, which imports this
module (and Ray) in well under a second; through a module that imports torch it took ~2.7 s here.
"""

from __future__ import annotations

from rlhf_ray.ppo import refs


def node_address() -> tuple[str, int]:
    """This node's address and a free port on it."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def address_on(scheduling_strategy=None) -> tuple[str, int]:
    """:func:`node_address` of the node a zero-CPU task lands on with ``scheduling_strategy`` (a Ray
    scheduling strategy; None: any node)."""
    import ray

    task = ray.remote(num_cpus=0)(node_address)
    if scheduling_strategy is not None:
        task = task.options(scheduling_strategy=scheduling_strategy)
    return tuple(refs.get_small(task.remote()))


def node_of(actor) -> str:
    """The Ray id of ``actor``'s node (waits for the calls submitted to it before)."""
    import ray

    return refs.get_small(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))
