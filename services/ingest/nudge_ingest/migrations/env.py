from nudge_common.migrations import run_env
from nudge_ingest.store import metadata

run_env(metadata)
