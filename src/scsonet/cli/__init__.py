"""Thin argparse shells over the library; ``scsonet.cli.main:main`` is the console script."""
