"""Corpus: ``model.factory`` names something that is not a function."""

build = [32, 512]
