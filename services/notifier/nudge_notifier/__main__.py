from nudge_common.cli import main
from nudge_notifier.spec import SPEC

main(SPEC)
