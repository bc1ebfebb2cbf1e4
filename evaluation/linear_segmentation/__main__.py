from alibi_dinov2.cli import run_command
from evaluation.linear_segmentation.cli import PROG, main


run_command(main, prog=PROG)
