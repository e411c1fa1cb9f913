"""The Ray listener's option checks: Ray installed, options Ray takes, a handler Ray can send.

``listener_options`` runs them for ``executor="ray"``; the Ray listener imports Ray
through ``import_ray`` too. Nothing here imports a listener, so the option checks
stay below every listener module.
"""

from __future__ import annotations

from typing import Any

from fanout._version import DISTRIBUTION

__all__ = ["OWNED_OPTIONS", "check_ray_options", "import_ray", "pickle_for_ray"]

# Options fanout sets on every actor itself, and why a user may not.
OWNED_OPTIONS = {
    "max_restarts": "fanout always sets -1: Ray restarts a dead actor and fanout resends",
    "max_task_retries": "fanout resends itself (Ray's retries would break per-key order)",
    "max_concurrency": "one call at a time keeps per-key order",
    "concurrency_groups": "one call at a time keeps per-key order",
    "allow_out_of_order_execution": "calls must run in order to keep per-key order",
    "max_pending_calls": "fanout bounds the calls in flight itself",
    "lifetime": "the actors belong to the listener and end with it",
    "name": "fanout names no actor (two listeners must not share one)",
    "namespace": "fanout names no actor",
    "get_if_exists": "fanout names no actor",
}


def import_ray() -> Any:
    """Import Ray, or raise ``ImportError`` naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"executor='ray' needs Ray, which is not installed: pip install '{DISTRIBUTION}[ray]'"
        ) from exc
    return ray


def check_ray_options(options: Any) -> dict[str, Any]:
    """Return a copy of ``ray_options`` after Ray's own checks, or raise naming the key."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(
            f"ray_options must be a dict of Ray actor options (num_cpus, resources, "
            f"runtime_env, scheduling_strategy, ...), not {options!r:.80}"
        )
    for key in options:
        if key in OWNED_OPTIONS:
            raise ValueError(f"ray_options[{key!r}] cannot be set: {OWNED_OPTIONS[key]}")
    try:
        from ray._common.ray_option_utils import actor_options, validate_actor_options
    except ImportError:  # another Ray layout: Ray checks them when the actor is made
        return dict(options)
    unknown = [k for k in options if k not in actor_options]
    if unknown:
        allowed = sorted(k for k in actor_options if k not in OWNED_OPTIONS and k[0] != "_")
        raise ValueError(
            f"ray_options: unknown Ray actor option {unknown[0]!r}; the options Ray "
            f"actors take here are {', '.join(allowed)}"
        )
    try:
        validate_actor_options(dict(options), in_options=True)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"ray_options: {exc}") from exc
    return dict(options)


def pickle_for_ray(handler: Any) -> bytes:
    """Serialise ``handler`` as Ray would, or raise ``TypeError`` saying why not."""
    ray = import_ray()
    try:
        return bytes(ray.cloudpickle.dumps(handler))
    except Exception as exc:
        raise TypeError(
            f"handler {handler!r:.80} cannot be serialised for Ray actors ({exc}); "
            f"pass a zero-argument class or factory that builds it in each actor"
        ) from exc
