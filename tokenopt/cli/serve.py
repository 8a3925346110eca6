"""``tokenopt serve``: the policy behind OpenAI-compatible endpoints."""

from __future__ import annotations

import os
from typing import Any

from tokenopt.cli.common import ConfigOptions, Flag, config_options, console, fail

__all__ = ["SERVE_OPTIONS", "serve_command"]


def _threads(count: int) -> int:
    # torch's spinning workers fight the event loop for the cores: leave it one.
    return count or max(1, (os.cpu_count() or 2) - 1)


SERVE_OPTIONS = ConfigOptions(
    "tokenopt.serve.config:ServeConfig",
    flags={
        "upstream_api_key": Flag(envvar="TOKENOPT_UPSTREAM_API_KEY"),
        "api_key": Flag(envvar="TOKENOPT_API_KEY"),
        "threads": Flag(
            kind=int,
            default=0,
            help="torch CPU threads of the local LM; 0: one fewer than the cores (at least 1).",
            parse=_threads,
        ),
    },
)
"""Every field of :class:`~tokenopt.serve.config.ServeConfig` is a flag."""


@config_options(settings=SERVE_OPTIONS)
def serve_command(*, settings: dict[str, Any]) -> None:
    """Serve the policy behind OpenAI-compatible endpoints (needs `pip install 'tokenopt[serve]'`)."""
    try:
        import uvicorn

        from tokenopt.serve import ServeConfig, create_app
    except ImportError as error:
        fail(ImportError(f"{error}: the server needs the serve extra: pip install 'tokenopt[serve]'"))
    from tokenopt.runtime import PolicyLoadError

    try:
        config = ServeConfig(**settings)
        if not config.upstream:
            from tokenopt.lm.local import model_source

            model_source(config.model)  # a missing folder stops start-up; loading the model waits for /readyz
        # The policies are validated now; the model loads once the server listens, behind /readyz.
        application = create_app(config, load_in_background=True)
    except (ValueError, OSError, PolicyLoadError) as error:  # FileNotFoundError included
        fail(error)
    arms = ", ".join(f"{name}={arm.policy.policy_id}" for name, arm in application.state.tokenopt.arms.items())
    budgets = {name: arm.controller for name, arm in application.state.tokenopt.arms.items() if arm.controller}
    if budgets:
        held = ", ".join(
            f"{name}: {c.target.value:.6g} {c.target.unit} from cost weight {c.cost_weight:.4g}"
            for name, c in budgets.items()
        )
        console.print(f"holding {held} (state {config.budget_state_path()})")
    console.print(
        f"serving {arms} on http://{config.host}:{config.port}/v1 (decision log {config.log}); "
        "SIGHUP reloads the policies"
    )
    uvicorn.run(
        application, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=10,
        timeout_keep_alive=config.keep_alive,
    )  # fmt: skip
