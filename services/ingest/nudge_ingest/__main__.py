from nudge_common.cli import main
from nudge_ingest.spec import SPEC

main(SPEC)
