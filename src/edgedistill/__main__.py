"""`python -m edgedistill` = the `edgedistill` command."""

from edgedistill.cli import main

if __name__ == "__main__":
    main()
