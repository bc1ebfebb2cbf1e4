from evaluation.linear_segmentation.cli import main

main()
