"""Contract tests run against a real stack (the gateway tests' helpers)."""

from ..gateway.conftest import dev_models, stack_db, start_stack  # noqa: F401 - fixtures re-exported
