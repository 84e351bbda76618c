"""Benchmarks for cbtool: `python -m benchmarks NAME [options]`; each benchmarks/NAME.py has main(argv)."""
