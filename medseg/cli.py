"""Command-line interface: `medseg <stage> ...`."""
def main(argv=None) -> int:
    return 0
