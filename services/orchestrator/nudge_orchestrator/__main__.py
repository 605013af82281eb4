from nudge_common.cli import main
from nudge_orchestrator.spec import SPEC

main(SPEC)
