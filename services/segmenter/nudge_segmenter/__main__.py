from nudge_common.cli import main
from nudge_segmenter.spec import SPEC

main(SPEC)
