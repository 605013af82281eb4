from nudge_common.cli import main
from nudge_scoring.spec import SPEC

main(SPEC)
