"""`python -m cbtool ...` is the `cbtool` command."""

from cbtool.cli import main

main()
