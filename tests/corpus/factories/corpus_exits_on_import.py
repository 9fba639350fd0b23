"""Corpus: a factory module that exits while it is imported (as a script's argparse would on unknown arguments)."""

import sys

sys.exit("corpus: usage: train.py --data DIR")
