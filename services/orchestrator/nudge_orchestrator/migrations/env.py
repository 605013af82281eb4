from nudge_common.migrations import run_env
from nudge_orchestrator.store import metadata

run_env(metadata)
