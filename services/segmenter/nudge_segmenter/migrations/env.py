from nudge_common.migrations import run_env
from nudge_segmenter.store import metadata

run_env(metadata)
